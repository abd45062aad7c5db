"""Cache-aware attention for a chunk of queries on TPU (Pallas Mosaic): prefill chunks.

Ops (signatures of `duojax.attention.reference`):
  full_chunk(q, k_cache, v_cache, q_pos, kv_len)            retrieval heads, causal over the cache
  streaming_chunk(q, slot_k, slot_v, slot_pos, slot_valid,  streaming heads, exact sink + window
                  k, v, q_pos, n_valid, sink, recent)       mask over sink/ring slots + the chunk

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
"""

from __future__ import annotations

import functools

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
               o_item: int) -> int:
  """VMEM one grid step needs, with TPU tile padding ((8, 128); a [rows, 1] array takes
  128 lanes): double-buffered q / out / k / v / position blocks, scratch, fp32 logits."""
  bq, bk, d = _round(block_q, SUBLANES), _round(block_k, SUBLANES), _round(head_dim, LANES)
  qo = 2 * heads * bq * d * (q_item + o_item)
  kv = 2 * 2 * bk * _round(heads * head_dim, LANES) * k_item
  scratch = heads * bq * (d + 2 * LANES) * 4  # acc, m, l
  pos = 2 * bq * LANES * 4 + 2 * SUBLANES * _round(block_k, LANES) * 4
  logits = 3 * bq * _round(block_k, LANES) * 4
  return qo + kv + scratch + pos + logits


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
                budget: int | None = None) -> tuple[int, int, int]:
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
  fits = lambda hb, q, k: vmem_bytes(hb, q, k, head_dim, q_item, k_item, o_item) <= budget
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
    k = k_ref[:, lanes]  # [bk, D]
    v = v_ref[:, lanes]
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


def _init(m_sc, l_sc, acc_sc):
  m_sc[...] = jnp.full_like(m_sc, NEG)
  l_sc[...] = jnp.zeros_like(l_sc)
  acc_sc[...] = jnp.zeros_like(acc_sc)


def _finish(o_ref, l_sc, acc_sc):
  l = l_sc[...]
  o_ref[...] = (acc_sc[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)  # no key -> 0


def _full_kernel(limit_ref, kv_len_ref, qpos_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc,
                 acc_sc, *, heads, head_dim, block_k, n_keys, nq, scale):
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
    _finish(o_ref, l_sc, acc_sc)


def _stream_kernel(needed_ref, fetch_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, o_ref, m_sc,
                   l_sc, acc_sc, *, heads, head_dim, nq, nk, sink, recent, scale):
  del fetch_ref  # used by the index maps only
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
    _finish(o_ref, l_sc, acc_sc)


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
          interpret):
  """pallas_call over grid (B, head blocks, query blocks, key blocks).

  prefetch: int32 vectors for SMEM; qpos [B, R, 1]; kpos [B, 1, N] or None; q [B, H, R, D];
  k, v [B, N, H * D]. kv_block(b, i, j, *prefetch_refs) is the key block to hold at step j.
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
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=grid,
          in_specs=in_specs + [q_spec, kv_spec, kv_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((hb, bq, 1), jnp.float32),  # running max
                          pltpu.VMEM((hb, bq, 1), jnp.float32),  # running sum
                          pltpu.VMEM((hb, bq, d), jnp.float32)]),  # accumulator
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name=name,
  )(*prefetch, *inputs, q, k, v)


# -- the ops --------------------------------------------------------------------------------

def full_chunk(q, k_cache, v_cache, q_pos, kv_len, *, interpret: bool = False,
               block_q: int | None = None, block_k: int | None = None,
               block_h: int | None = None, max_keys: int = 512):
  """Retrieval heads: queries at q_pos over cache slots j < kv_len with j <= q_pos.

  q [B, T, H, G, D]; k_cache, v_cache [B, S, H, D] (slot j = position j); q_pos [B, T];
  kv_len [B] -> [B, T, H, G, D] in q's dtype. block_* override the tiling (tests).
  """
  b, t, h, g, d = q.shape
  s = k_cache.shape[1]
  qr, qpos = _rows(q, q_pos)
  rows = t * g
  hb, bq, bk = plan_tiling(rows, s, h, d, q.dtype.itemsize, k_cache.dtype.itemsize,
                           q.dtype.itemsize, block_q=block_q, block_k=block_k,
                           block_h=block_h, max_keys=max_keys)
  nq = pl.cdiv(rows, bq)
  kv_len = kv_len.astype(jnp.int32)
  limit = full_block_limits(qpos[:, :, 0], kv_len, bq, s).reshape(-1)

  def kv_block(bi, i, j, limit_ref, kv_len_ref):
    last = jnp.maximum(pl.cdiv(limit_ref[bi * nq + i], bk) - 1, 0)
    return jnp.minimum(j, last)  # past the limit: hold the last needed block (no copy)

  kernel = functools.partial(_full_kernel, heads=hb, head_dim=d, block_k=bk, n_keys=s, nq=nq,
                             scale=d ** -0.5)
  out = _call(kernel, (limit, kv_len), qpos, None, qr, k_cache.reshape(b, s, h * d),
              v_cache.reshape(b, s, h * d), heads=hb, block_q=bq, block_k=bk,
              kv_block=kv_block, name="duojax_full_chunk", interpret=interpret)
  return _unrows(out, t, g)


def streaming_chunk(q, slot_k, slot_v, slot_pos, slot_valid, k, v, q_pos, n_valid, sink: int,
                    recent: int, *, interpret: bool = False, block_q: int | None = None,
                    block_k: int | None = None, block_h: int | None = None,
                    max_keys: int = 512):
  """Streaming heads: the chunk over sink + ring slots (before the chunk) and its own keys,
  with the exact mask `j <= t and (j < sink or t - j < recent)`.

  q [B, T, H, G, D]; slot_k, slot_v [B, W, H, D]; slot_pos, slot_valid [B, W]; k, v
  [B, T, H, D]; q_pos [B, T]; n_valid [B] -> [B, T, H, G, D] in q's dtype.
  """
  b, t, h, g, d = q.shape
  sink, recent = int(sink), int(recent)
  chunk_valid = jnp.arange(t)[None, :] < n_valid[:, None]
  keys = jnp.concatenate([slot_k, k], axis=1)  # [B, N, H, D]; N = W + T
  vals = jnp.concatenate([slot_v, v], axis=1)
  kvalid = jnp.concatenate([slot_valid, chunk_valid], axis=1)
  kpos = jnp.concatenate([slot_pos, q_pos], axis=1).astype(jnp.int32)
  n = keys.shape[1]
  qr, qpos = _rows(q, q_pos)
  rows = t * g
  hb, bq, bk = plan_tiling(rows, n, h, d, q.dtype.itemsize, keys.dtype.itemsize,
                           q.dtype.itemsize, block_q=block_q, block_k=block_k,
                           block_h=block_h, max_keys=max_keys)
  nq, nk = pl.cdiv(rows, bq), pl.cdiv(n, bk)
  pad = nk * bk - n  # keys are built here anyway, so pad them to whole blocks
  keys = jnp.pad(keys.reshape(b, n, h * d), ((0, 0), (0, pad), (0, 0)))
  vals = jnp.pad(vals.reshape(b, n, h * d), ((0, 0), (0, pad), (0, 0)))
  kvalid = jnp.pad(kvalid, ((0, 0), (0, pad)))
  kpos = jnp.where(kvalid, jnp.pad(kpos, ((0, 0), (0, pad))), FAR)
  needed, fetch = stream_block_tables(qpos[:, :, 0], kpos, kvalid, bq, bk, sink, recent)

  def kv_block(bi, i, j, needed_ref, fetch_ref):
    return fetch_ref[(bi * nq + i) * nk + j]

  kernel = functools.partial(_stream_kernel, heads=hb, head_dim=d, nq=nq, nk=nk, sink=sink,
                             recent=recent, scale=d ** -0.5)
  out = _call(kernel, (needed.astype(jnp.int32).reshape(-1), fetch.reshape(-1)), qpos,
              kpos[:, None, :], qr, keys, vals, heads=hb, block_q=bq, block_k=bk,
              kv_block=kv_block, name="duojax_streaming_chunk", interpret=interpret)
  return _unrows(out, t, g)
