"""Cache-aware attention for a chunk of queries on TPU (Pallas Mosaic): prefill chunks.

Ops (signatures of `duojax.attention.reference`):
  full_chunk(q, k_cache, v_cache, q_pos, kv_len)            retrieval heads, causal over the cache
  streaming_chunk(q, slot_k, slot_v, slot_pos, slot_valid,  streaming heads, exact sink + window
                  k, v, q_pos, n_valid, sink, recent)       mask over sink/ring slots + the chunk
Both take `return_partial=True` to return the unnormalised softmax state (m, l, acc) in
fp32 instead of the output: `_finish` then writes the scratch as it stands, so partials of
disjoint key sets (a sequence-sharded cache's slices, `duojax.context_parallel`) merge
exactly.

One flash-attention kernel (online softmax over key blocks) serves both, and decode too
(`decode_attention.py` calls it with T = 1 and a decode tiling). Its layout:

  q    [B, H, R, D]   R = T * G rows, row r = (t, g) = (r // G, r % G): the chunk's queries of
                      one KV head's G query heads, so a (rows x keys) tile feeds the MXU
  keys [B, N, H * D]  the cache as it lies ([B, S, H, D] reshaped for free, never copied):
                      a key block holds the lanes of a block of hb heads, head h its slice
                      h*D:(h+1)*D, and the kernel loops over those heads, so every key is
                      read from HBM once per query block
  qpos [B, R, 1]      absolute position of each row; kpos [B, 1, N] (streaming only)
  out  [B, H, R, D]

grid = (B, H / hb, R / block_q, N / block_k): the first three parallel, key blocks last
("arbitrary"), with running max / sum / accumulator per head in VMEM scratch. The mask is
computed in-kernel from positions, so it is exact for any q_pos.

Skipping key blocks (scalar prefetch, so the decision is made before any DMA):
- full (retrieval) heads: per (row b, query block i) `limit = min(kv_len[b], max q_pos in
  the block + 1)`; key blocks at or past `limit` are neither computed (`pl.when`) nor read:
  their index_map returns the last needed block again, and Pallas skips a copy whose block
  index did not change. A ragged batch thus reads each row's keys up to its own length, and
  a prefill chunk's query block reads keys up to its own last position (causal).
- streaming heads: keys are [sink + ring slots | chunk] with explicit positions (not sorted:
  the ring wraps). The wrapper computes per key block its min / max valid position and per
  query block its min / max position; block (i, j) is needed iff some key could be visible
  (`kmin <= qmax and (kmin < sink or kmax > qmin - recent)`). Tables `needed` and `fetch`
  (the block to hold at step j: the last needed one, so skipped steps issue no copy) go to
  SMEM. A long chunk's early query blocks skip its late keys and its late query blocks skip
  the ring and the chunk's early keys, so the cost per query block is O(window), not O(T).
  The ring holds positions, not slots in order, so the mask never assumes contiguity.

TPU rules kept: block_q a multiple of 8 (or all rows), block_k a multiple of 128 (or all
keys), hb * D a multiple of 128 (or all heads); logits and softmax in fp32, p cast to v's
dtype for the second matmul as in the reference; matmul precision pinned per dtype; the
VMEM of a step (tile-padded blocks, double buffers, scratch, logits) kept under
`VMEM_BUDGET` by `plan_tiling`. Compiled ahead of time with libtpu's Mosaic for v4, v5e,
v5p and v6e at SmolLM2, Llama-3-8B and Llama-2-7B shapes (see the tests).

Quantised caches (duojax.kv_quant.QuantKV, int8 or packed int4 codes with a float32 scale
and zero per key per head): the kernels load the code blocks [bk, H * Dc] and the scale /
zero blocks [bk, H] and dequantise each head's keys and values in VMEM into the queries'
dtype (`_head_block`), so HBM traffic is the codes and scales only. Checked against the
dequantising reference in interpret mode on CPU only (not yet compiled with Mosaic): the
[bk, H] scale blocks pad H to 128 lanes in VMEM, and the int4 unpack concatenates two
half-head lane slices; a lane-dense [H, S] scale layout, applying the scales to the
logits instead, is the next step for speed on a real TPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG = -1e30  # finite "minus infinity" for the running max: exp(NEG - NEG) stays 1, never NaN
FAR = 1 << 30  # position of an invalid streaming key: later than any query
VMEM_BUDGET = 12 * 2 ** 20  # per grid step, all in; default scoped VMEM is 16 MiB or more
SUBLANES, LANES = 8, 128


# -- tiling -----------------------------------------------------------------------------

def _round(x: int, m: int) -> int:
  return -(-x // m) * m


def vmem_bytes(heads: int, block_q: int, block_k: int, head_dim: int, q_item: int, k_item: int,
               o_item: int, stats: bool = False) -> int:
  """VMEM one grid step needs, with TPU tile padding ((8, 128); a [rows, 1] array takes
  128 lanes): double-buffered q / out / k / v / position blocks, scratch, fp32 logits.
  stats: the step also writes max and sum blocks (the partial result, `return_partial`)."""
  bq, bk, d = _round(block_q, SUBLANES), _round(block_k, SUBLANES), _round(head_dim, LANES)
  qo = 2 * heads * bq * d * (q_item + o_item)
  kv = 2 * 2 * bk * _round(heads * head_dim, LANES) * k_item
  scratch = heads * bq * (d + 2 * LANES) * 4  # acc, m, l
  pos = 2 * bq * LANES * 4 + 2 * SUBLANES * _round(block_k, LANES) * 4
  logits = 3 * bq * _round(block_k, LANES) * 4
  stat_out = 2 * 2 * heads * bq * LANES * 4 if stats else 0  # m, l: [rows, 1] blocks
  return qo + kv + scratch + pos + logits + stat_out


def pick_block_q(rows: int, block_q: int | None = None, max_rows: int = 256) -> int:
  """Query rows per block: all of them if few, else a multiple of 8."""
  bq = max_rows if block_q is None else block_q
  if bq >= rows:
    return rows
  if bq % SUBLANES:
    raise ValueError(f"block_q={bq} must be a multiple of {SUBLANES} (or cover all {rows} rows)")
  return bq


def pick_block_k(n_keys: int, block_k: int | None = None, max_keys: int = 512) -> int:
  """Keys per block: all of them if few, else a multiple of 128."""
  bk = max_keys if block_k is None else block_k
  if bk >= n_keys:
    return n_keys
  if bk % LANES:
    raise ValueError(f"block_k={bk} must be a multiple of {LANES} (or cover all {n_keys} keys)")
  return bk


def plan_tiling(rows: int, n_keys: int, heads: int, head_dim: int, q_item: int, k_item: int,
                o_item: int, *, block_q: int | None = None, block_k: int | None = None,
                block_h: int | None = None, max_rows: int = 256, max_keys: int = 512,
                budget: int | None = None, stats: bool = False) -> tuple[int, int, int]:
  """(heads per step, block_q, block_k) fitting `budget` bytes of VMEM.

  A step takes as many KV heads as fit (their lanes of the key block: hb * D a multiple of
  128, or all heads), else fewer keys, else fewer rows. Explicit sizes are kept as given.
  """
  budget = VMEM_BUDGET if budget is None else budget
  bq = pick_block_q(rows, block_q, max_rows)
  bk = pick_block_k(n_keys, block_k, max_keys)
  options = [x for x in range(heads, 0, -1)
             if heads % x == 0 and (x == heads or x * head_dim % LANES == 0)]
  if block_h is not None:
    if block_h not in options:
      raise ValueError(f"block_h={block_h} must divide {heads} with block_h * D % 128 == 0")
    options = [block_h]
  fits = lambda hb, q, k: vmem_bytes(hb, q, k, head_dim, q_item, k_item, o_item,
                                     stats) <= budget
  for hb in options:
    if fits(hb, bq, bk):
      return hb, bq, bk
  hb = options[-1]
  while block_k is None and bk > LANES and not fits(hb, bq, bk):
    bk = max(LANES, bk // 2 // LANES * LANES)
  while block_q is None and bq > SUBLANES and not fits(hb, bq, bk):
    bq = max(SUBLANES, bq // 2 // SUBLANES * SUBLANES)
  return hb, bq, bk


# -- the kernel ---------------------------------------------------------------------------

def _precision(dtype):
  """Explicit, so a global `jax_default_matmul_precision` cannot reach the kernel: Mosaic
  rejects bf16 operands at HIGHEST ("Bad lhs type"); fp32 operands get full fp32 passes."""
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _attend_block(q_ref, k_ref, v_ref, m_sc, l_sc, acc_sc, mask, row_ok, *, heads, head_dim,
                  scale):
  """One key block for every head: online-softmax update of (m, l, acc) per head."""
  for h in range(heads):  # static: heads are lane slices of the key block
    lanes = slice(h * head_dim, (h + 1) * head_dim)
    q = q_ref[h]  # [bq, D]
    k = _head_block(k_ref, h, lanes, q.dtype)  # [bk, D] (dequantised here if quantised)
    v = _head_block(v_ref, h, lanes, q.dtype)
    ct = jnp.promote_types(q.dtype, k.dtype)
    s = jax.lax.dot_general(q.astype(ct), k.astype(ct), (((1,), (1,)), ((), ())),
                            precision=_precision(ct),
                            preferred_element_type=jnp.float32) * scale  # [bq, bk]
    s = jnp.where(mask, s, NEG)
    m_prev = m_sc[h]  # [bq, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    m_sc[h] = m_new
    l_sc[h] = alpha * l_sc[h] + jnp.sum(p, axis=-1, keepdims=True)
    if row_ok is not None:  # a ragged last key block: rows past the array are garbage
      v = jnp.where(row_ok, v, jnp.zeros_like(v))
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=_precision(v.dtype), preferred_element_type=jnp.float32)
    acc_sc[h] = alpha * acc_sc[h] + pv


# -- quantised caches (duojax.kv_quant): codes + a scale and zero per key per head ----------

class QuantBlocks(NamedTuple):
  """A quantised key or value operand as the kernel reads it: codes [B, N, H * Dc] (int8,
  Dc = D; or uint8 with two int4 codes a byte, Dc = D / 2: element i in the low nibble,
  i + D/2 in the high one), scale and zero [B, N, H] float32; value = code * scale + zero.
  Its blocks are (bk, hb * Dc) and (bk, hb): the scales' lanes are heads, so a step takes
  all H heads (hb == H, the full last dim that TPU tiling allows)."""
  bits: int
  codes: jax.Array
  scale: jax.Array
  zero: jax.Array

  @property
  def shape(self):
    return self.codes.shape


class _QuantRefs(NamedTuple):  # the kernel's refs of one QuantBlocks operand
  bits: int
  codes: object
  scale: object
  zero: object


def _head_block(ref, h: int, lanes: slice, dtype):
  """Head h's [bk, D] keys or values of a block; a quantised block is dequantised here,
  in VMEM, into the queries' dtype (as `kv_quant.dequantize` does before the reference)."""
  if not isinstance(ref, _QuantRefs):
    return ref[:, lanes]
  d = lanes.stop - lanes.start
  if ref.bits == 4:
    c = ref.codes[:, h * d // 2:(h + 1) * d // 2].astype(jnp.int32)
    c = jnp.concatenate([c & 15, (c >> 4) & 15], axis=-1)  # the two halves of the head dim
  else:
    c = ref.codes[:, lanes].astype(jnp.int32)
  x = c.astype(jnp.float32) * ref.scale[:, h:h + 1] + ref.zero[:, h:h + 1]
  return x.astype(dtype)


def _flat_kv(x, b: int, n: int, h: int):
  """A cache operand [B, N, H, D] (or a kv_quant.QuantKV, duck-typed: kernels import
  nothing above attention) -> the kernel's [B, N, H * D] (or QuantBlocks); free reshapes."""
  if hasattr(x, "bits"):
    return QuantBlocks(x.bits, x.codes.reshape(b, n, -1), x.scale.reshape(b, n, h),
                       x.zero.reshape(b, n, h))
  return x.reshape(b, n, -1)


def _kv_tiling(x, heads: int, block_h):
  """(bytes per element for plan_tiling, block_h) for a cache operand: a quantised one
  takes all heads per step (its scale blocks) and is planned at 2 bytes per element,
  covering the 1-byte codes and the dequantised copy of one head."""
  if not hasattr(x, "bits"):
    return x.dtype.itemsize, block_h
  if block_h not in (None, heads):
    raise ValueError(f"a quantised KV cache is read with all {heads} KV heads per step; "
                     f"block_h={block_h} cannot be used (drop it)")
  return 2, heads


def _concat_keys(slots, chunk):
  if hasattr(slots, "bits"):
    return jax.tree_util.tree_map(lambda a, c: jnp.concatenate([a, c], axis=1), slots, chunk)
  return jnp.concatenate([slots, chunk], axis=1)


def _pad_keys(x, pad: int):
  pad_one = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0)))  # padded keys dequantise to 0
  if isinstance(x, QuantBlocks):
    return QuantBlocks(x.bits, pad_one(x.codes), pad_one(x.scale), pad_one(x.zero))
  return pad_one(x)


def _quant_operands(kernel, k: QuantBlocks, v: QuantBlocks, n_before: int, heads: int,
                    block_k: int, kv_block):
  """(kernel taking (codes, scale, zero) refs as one k and one v operand, in_specs, inputs)."""
  def spec(lanes):
    return pl.BlockSpec((None, block_k, lanes),
                        lambda bi, hi, i, j, *refs: (bi, kv_block(bi, i, j, *refs), hi))
  assert heads == k.scale.shape[-1], "a quantised operand is read with all heads per step"
  specs = [spec(x.shape[-1]) for x in (k.codes, k.scale, k.zero)]  # all heads' lanes

  def body(*refs):
    kr = _QuantRefs(k.bits, *refs[n_before:n_before + 3])
    vr = _QuantRefs(v.bits, *refs[n_before + 3:n_before + 6])
    return kernel(*refs[:n_before], kr, vr, *refs[n_before + 6:])
  return body, specs * 2, [k.codes, k.scale, k.zero, v.codes, v.scale, v.zero]


def _init(m_sc, l_sc, acc_sc):
  m_sc[...] = jnp.full_like(m_sc, NEG)
  l_sc[...] = jnp.zeros_like(l_sc)
  acc_sc[...] = jnp.zeros_like(acc_sc)


def _finish(o_ref, l_sc, acc_sc):
  l = l_sc[...]
  o_ref[...] = (acc_sc[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)  # no key -> 0


def _finish_partial(acc_ref, m_ref, l_ref, m_sc, l_sc, acc_sc):
  """The unnormalised state itself (`return_partial`): what merges exactly with other key
  sets' (another device's slice of the cache). A row that saw no key keeps m = NEG, l = 0;
  the wrapper turns that m into -inf."""
  acc_ref[...] = acc_sc[...]
  m_ref[...] = m_sc[...]
  l_ref[...] = l_sc[...]


def _finish_outputs(outs, m_sc, l_sc, acc_sc):
  if len(outs) == 1:
    _finish(outs[0], l_sc, acc_sc)
  else:
    _finish_partial(*outs, m_sc, l_sc, acc_sc)


def _full_kernel(limit_ref, kv_len_ref, qpos_ref, q_ref, k_ref, v_ref, *refs, heads, head_dim,
                 block_k, n_keys, nq, scale):
  outs, (m_sc, l_sc, acc_sc) = refs[:-3], refs[-3:]  # out, or (acc, m, l) with return_partial
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    _init(m_sc, l_sc, acc_sc)

  @pl.when(j * block_k < limit_ref[b * nq + i])
  def _():
    kpos = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    mask = (kpos <= qpos_ref[...]) & (kpos < kv_len_ref[b])  # [bq, bk]
    row_ok = None
    if n_keys % block_k:
      row_ok = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < n_keys
    _attend_block(q_ref, k_ref, v_ref, m_sc, l_sc, acc_sc, mask, row_ok, heads=heads,
                  head_dim=head_dim, scale=scale)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    _finish_outputs(outs, m_sc, l_sc, acc_sc)


def _stream_kernel(needed_ref, fetch_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, *refs, heads,
                   head_dim, nq, nk, sink, recent, scale):
  del fetch_ref  # used by the index maps only
  outs, (m_sc, l_sc, acc_sc) = refs[:-3], refs[-3:]
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    _init(m_sc, l_sc, acc_sc)

  @pl.when(needed_ref[(b * nq + i) * nk + j] != 0)
  def _():
    kpos = kpos_ref[...]  # [1, bk]; invalid keys sit at FAR
    d = qpos_ref[...] - kpos  # [bq, bk]
    mask = (d >= 0) & ((kpos < sink) | (d < recent))
    _attend_block(q_ref, k_ref, v_ref, m_sc, l_sc, acc_sc, mask, None, heads=heads,
                  head_dim=head_dim, scale=scale)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    _finish_outputs(outs, m_sc, l_sc, acc_sc)


# -- layout helpers -----------------------------------------------------------------------

def _rows(q: jax.Array, q_pos: jax.Array):
  """q [B, T, H, G, D] -> [B, H, T*G, D]; q_pos [B, T] -> row positions [B, T*G, 1]."""
  b, t, h, g, d = q.shape
  qr = q.transpose(0, 2, 1, 3, 4).reshape(b, h, t * g, d)  # free when T == 1
  pos = jnp.repeat(q_pos.astype(jnp.int32), g, axis=1)
  return qr, pos[:, :, None]


def _unrows(o: jax.Array, t: int, g: int) -> jax.Array:
  b, h, _, d = o.shape
  return o.reshape(b, h, t, g, d).transpose(0, 2, 1, 3, 4)


def _unrows_partial(res, t: int, g: int):
  """The kernel's (acc [B, H, R, D], m, l [B, H, R, 1]) -> (m, l [B, T, H, G], acc
  [B, T, H, G, D]) in fp32, m = -inf where a row saw no key (l = 0), so that merging
  it with other partials weighs it exactly 0 whatever their maxima."""
  acc, m, l = (_unrows(x, t, g) for x in res)
  m, l = m[..., 0], l[..., 0]
  return jnp.where(l > 0, m, -jnp.inf), l, acc


def _block_minmax(pos: jax.Array, valid: jax.Array, n_blocks: int, block: int):
  """Per block min / max of valid positions: pos, valid [B, N] -> 2 x [B, n_blocks]."""
  b, n = pos.shape
  pad = n_blocks * block - n
  pos = jnp.pad(pos, ((0, 0), (0, pad)))
  valid = jnp.pad(valid, ((0, 0), (0, pad)))
  pos, valid = pos.reshape(b, n_blocks, block), valid.reshape(b, n_blocks, block)
  lo = jnp.min(jnp.where(valid, pos, FAR), axis=-1)
  hi = jnp.max(jnp.where(valid, pos, -FAR), axis=-1)
  return lo, hi


def full_block_limits(qpos: jax.Array, kv_len: jax.Array, block_q: int, n_keys: int):
  """limit [B, nq]: keys at or past it are invisible to every row of query block i.

  qpos [B, R] row positions; kv_len [B]. Key blocks j with j * block_k >= limit are skipped.
  """
  b, rows = qpos.shape
  nq = pl.cdiv(rows, block_q)
  qmax = jnp.max(jnp.pad(qpos, ((0, 0), (0, nq * block_q - rows)), constant_values=-FAR)
                 .reshape(b, nq, block_q), axis=-1)
  return jnp.clip(jnp.minimum(kv_len[:, None], qmax + 1), 0, n_keys).astype(jnp.int32)


def stream_block_tables(qpos: jax.Array, kpos: jax.Array, kvalid: jax.Array, block_q: int,
                        block_k: int, sink: int, recent: int):
  """Which (query block, key block) pairs may hold a visible key under the streaming mask.

  qpos [B, R] row positions; kpos, kvalid [B, N] (N a multiple of block_k). Returns
  needed [B, nq, nk] bool and fetch [B, nq, nk] int32: the key block to hold at step j (the
  last needed one so far, else the first needed one), so skipped steps issue no new copy.
  """
  b, rows = qpos.shape
  nq, nk = pl.cdiv(rows, block_q), kpos.shape[1] // block_k
  kmin, kmax = _block_minmax(kpos, kvalid, nk, block_k)  # [B, nk]
  qmin, qmax = _block_minmax(qpos, jnp.ones((b, rows), bool), nq, block_q)  # [B, nq]
  kmin, kmax = kmin[:, None, :], kmax[:, None, :]
  qmin, qmax = qmin[:, :, None], qmax[:, :, None]
  needed = (kmin <= qmax) & ((kmin < sink) | (kmax > qmin - recent))  # [B, nq, nk]
  jj = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), needed.shape)
  last = jax.lax.cummax(jnp.where(needed, jj, -1), axis=2)
  first = jnp.argmax(needed, axis=2).astype(jnp.int32)[:, :, None]  # 0 if none
  return needed, jnp.where(last >= 0, last, first)


def _call(kernel, prefetch, qpos, kpos, q, k, v, *, heads, block_q, block_k, kv_block, name,
          interpret, partial=False):
  """pallas_call over grid (B, head blocks, query blocks, key blocks).

  prefetch: int32 vectors for SMEM; qpos [B, R, 1]; kpos [B, 1, N] or None; q [B, H, R, D];
  k, v [B, N, H * D]. kv_block(b, i, j, *prefetch_refs) is the key block to hold at step j.
  Returns out [B, H, R, D] in q's dtype; with partial, (acc [B, H, R, D], m, l [B, H, R, 1])
  in fp32 instead.
  """
  b, h, rows, d = q.shape
  hb, bq, bk = heads, block_q, block_k
  grid = (b, h // hb, pl.cdiv(rows, bq), pl.cdiv(k.shape[1], bk))
  q_spec = pl.BlockSpec((None, hb, bq, d), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
  kv_spec = pl.BlockSpec((None, bk, hb * d),
                         lambda bi, hi, i, j, *refs: (bi, kv_block(bi, i, j, *refs), hi))
  in_specs = [pl.BlockSpec((None, bq, 1), lambda bi, hi, i, j, *_: (bi, i, 0))]
  inputs = [qpos]
  if kpos is not None:
    in_specs.append(pl.BlockSpec((None, 1, bk),
                                 lambda bi, hi, i, j, *refs: (bi, 0, kv_block(bi, i, j, *refs))))
    inputs.append(kpos)
  kv_specs, kv_inputs = [kv_spec, kv_spec], [k, v]
  if isinstance(k, QuantBlocks):  # codes, scales and zeros in; dequantised in the kernel
    kernel, kv_specs, kv_inputs = _quant_operands(kernel, k, v, len(prefetch) + len(inputs) + 1,
                                                  hb, bk, kv_block)
  out_specs, out_shape = q_spec, jax.ShapeDtypeStruct(q.shape, q.dtype)
  if partial:
    stat_spec = pl.BlockSpec((None, hb, bq, 1), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
    stat = jax.ShapeDtypeStruct((b, h, rows, 1), jnp.float32)
    out_specs = [q_spec, stat_spec, stat_spec]
    out_shape = [jax.ShapeDtypeStruct(q.shape, jnp.float32), stat, stat]
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=grid,
          in_specs=in_specs + [q_spec, *kv_specs],
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((hb, bq, 1), jnp.float32),  # running max
                          pltpu.VMEM((hb, bq, 1), jnp.float32),  # running sum
                          pltpu.VMEM((hb, bq, d), jnp.float32)]),  # accumulator
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name=name,
  )(*prefetch, *inputs, q, *kv_inputs)


# -- the ops --------------------------------------------------------------------------------

def full_chunk(q, k_cache, v_cache, q_pos, kv_len, *, interpret: bool = False,
               block_q: int | None = None, block_k: int | None = None,
               block_h: int | None = None, max_keys: int = 512, return_partial: bool = False):
  """Retrieval heads: queries at q_pos over cache slots j < kv_len with j <= q_pos.

  q [B, T, H, G, D]; k_cache, v_cache [B, S, H, D] (slot j = position j); q_pos [B, T];
  kv_len [B] -> [B, T, H, G, D] in q's dtype. block_* override the tiling (tests).
  return_partial: return the softmax state instead, (m [B, T, H, G] the max logit, -inf
  where a row sees no key; l [B, T, H, G] the sum of exp(logit - m); acc [B, T, H, G, D]
  the sum of exp(logit - m) * v), all fp32, natural-log units: what a context-parallel
  merge over cache slices needs. A q_pos below 0 is allowed (that row sees no key).
  """
  b, t, h, g, d = q.shape
  s = k_cache.shape[1]
  qr, qpos = _rows(q, q_pos)
  rows = t * g
  k_item, block_h = _kv_tiling(k_cache, h, block_h)
  hb, bq, bk = plan_tiling(rows, s, h, d, q.dtype.itemsize, k_item,
                           4 if return_partial else q.dtype.itemsize, block_q=block_q,
                           block_k=block_k, block_h=block_h, max_keys=max_keys,
                           stats=return_partial)
  nq = pl.cdiv(rows, bq)
  kv_len = kv_len.astype(jnp.int32)
  limit = full_block_limits(qpos[:, :, 0], kv_len, bq, s).reshape(-1)

  def kv_block(bi, i, j, limit_ref, kv_len_ref):
    last = jnp.maximum(pl.cdiv(limit_ref[bi * nq + i], bk) - 1, 0)
    return jnp.minimum(j, last)  # past the limit: hold the last needed block (no copy)

  kernel = functools.partial(_full_kernel, heads=hb, head_dim=d, block_k=bk, n_keys=s, nq=nq,
                             scale=d ** -0.5)
  out = _call(kernel, (limit, kv_len), qpos, None, qr, _flat_kv(k_cache, b, s, h),
              _flat_kv(v_cache, b, s, h), heads=hb, block_q=bq, block_k=bk,
              kv_block=kv_block, name="duojax_full_chunk", interpret=interpret,
              partial=return_partial)
  return _unrows_partial(out, t, g) if return_partial else _unrows(out, t, g)


def streaming_chunk(q, slot_k, slot_v, slot_pos, slot_valid, k, v, q_pos, n_valid, sink: int,
                    recent: int, *, interpret: bool = False, block_q: int | None = None,
                    block_k: int | None = None, block_h: int | None = None,
                    max_keys: int = 512, return_partial: bool = False):
  """Streaming heads: the chunk over sink + ring slots (before the chunk) and its own keys,
  with the exact mask `j <= t and (j < sink or t - j < recent)`.

  q [B, T, H, G, D]; slot_k, slot_v [B, W, H, D]; slot_pos, slot_valid [B, W]; k, v
  [B, T, H, D]; q_pos [B, T]; n_valid [B] -> [B, T, H, G, D] in q's dtype.
  return_partial: (m, l, acc) in fp32 instead, as `full_chunk` returns them.
  """
  b, t, h, g, d = q.shape
  sink, recent = int(sink), int(recent)
  chunk_valid = jnp.arange(t)[None, :] < n_valid[:, None]
  keys = _concat_keys(slot_k, k)  # [B, N, H, D]; N = W + T
  vals = _concat_keys(slot_v, v)
  kvalid = jnp.concatenate([slot_valid, chunk_valid], axis=1)
  kpos = jnp.concatenate([slot_pos, q_pos], axis=1).astype(jnp.int32)
  n = keys.shape[1]
  qr, qpos = _rows(q, q_pos)
  rows = t * g
  k_item, block_h = _kv_tiling(keys, h, block_h)
  hb, bq, bk = plan_tiling(rows, n, h, d, q.dtype.itemsize, k_item,
                           4 if return_partial else q.dtype.itemsize, block_q=block_q,
                           block_k=block_k, block_h=block_h, max_keys=max_keys,
                           stats=return_partial)
  nq, nk = pl.cdiv(rows, bq), pl.cdiv(n, bk)
  pad = nk * bk - n  # keys are built here anyway, so pad them to whole blocks
  keys = _pad_keys(_flat_kv(keys, b, n, h), pad)
  vals = _pad_keys(_flat_kv(vals, b, n, h), pad)
  kvalid = jnp.pad(kvalid, ((0, 0), (0, pad)))
  kpos = jnp.where(kvalid, jnp.pad(kpos, ((0, 0), (0, pad))), FAR)
  needed, fetch = stream_block_tables(qpos[:, :, 0], kpos, kvalid, bq, bk, sink, recent)

  def kv_block(bi, i, j, needed_ref, fetch_ref):
    return fetch_ref[(bi * nq + i) * nk + j]

  kernel = functools.partial(_stream_kernel, heads=hb, head_dim=d, nq=nq, nk=nk, sink=sink,
                             recent=recent, scale=d ** -0.5)
  out = _call(kernel, (needed.astype(jnp.int32).reshape(-1), fetch.reshape(-1)), qpos,
              kpos[:, None, :], qr, keys, vals, heads=hb, block_q=bq, block_k=bk,
              kv_block=kv_block, name="duojax_streaming_chunk", interpret=interpret,
              partial=return_partial)
  return _unrows_partial(out, t, g) if return_partial else _unrows(out, t, g)
