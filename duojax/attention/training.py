"""Whole-sequence attention for gate training, computed in query blocks.

Same signatures and semantics as `reference.dense_attention` and
`reference.gated_attention` (which stay the oracle), but memory is
O(block x T) in the forward and in the backward instead of O(T x T): the
reference materialises [B, Hkv, G, T, T] fp32 logits, 57 GB per layer for
Qwen2.5-0.5B at 32K tokens, twice that with its backward.

How:
  * Queries go in blocks of `block` rows through `jax.lax.map`, each block under
    `jax.checkpoint`, so the backward holds one block's [B, Hkv, G, block, keys]
    buffers at a time, never all of them. A causal or gated block also has a
    hand-written backward (recomputing its probabilities from the saved row
    maxima): autodiff of it read and wrote about twice as many such buffers, and
    the block is memory-bound (gradient 1.9-3x faster on CPU, less memory).
  * Causal (and gated) blocks are grouped into up to `_MAX_SEGMENTS` segments;
    a segment's blocks attend only the key prefix its last block can see, a
    static slice. With 4 segments that is 62.5% of the T x T square instead of
    100% (50% is the exact triangle); more segments would mean more compiled
    loop bodies per layer for a shrinking gain.
  * Streaming-only heads attend the sink keys plus a `block + recent - 1` wide
    window that ends at the block's last query (a dynamic slice of static size),
    so they cost O(T x (sink + recent + block)) whatever T is.
  * Gated heads compute the logits once per block and softmax them under both
    masks, as the reference does, so the mix costs one causal pass.

Small sequences keep the reference path (`pick_block` returns None): there the
T x T buffers are small and one fused op is faster than a loop.

Layouts as in reference.py: q [B, T, Hkv, G, D]; k, v [B, T, Hkv, D];
out [B, T, Hkv, G, D]; lengths [B].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from duojax.attention import reference

# A [B, Hkv, G, block, keys] fp32 buffer of at most this many elements (512 MiB):
# a block's forward and backward keep a handful of them live at once.
_BLOCK_ELEMENTS = 1 << 27
_MIN_BLOCK, _MAX_BLOCK = 64, 2048
_MAX_SEGMENTS = 4


def pick_block(batch: int, t: int, q_heads: int) -> int | None:
  """Query-block size for a [batch, t] sequence with q_heads query heads, or
  None when the whole T x T logits fit in one buffer (the reference path).

  The block is the largest power of two with batch * q_heads * block * t
  within `_BLOCK_ELEMENTS`, clipped to [64, 2048]: e.g. 256 for Qwen2.5-0.5B
  (14 query heads) at 32K tokens, batch 1.
  """
  if batch * q_heads * t * t <= _BLOCK_ELEMENTS:
    return None
  fit = _BLOCK_ELEMENTS // max(1, batch * q_heads * t)
  b = 1 << max(0, int(fit).bit_length() - 1)
  return int(min(_MAX_BLOCK, max(_MIN_BLOCK, b)))


def _resolve_block(q: jax.Array, block: int | None) -> int | None:
  b, t, hkv, g = q.shape[:4]
  if block is None:
    return pick_block(b, t, hkv * g)
  if not isinstance(block, (int, np.integer)) or block < 1:
    raise ValueError(f"block must be a positive int (query rows per step) or None for the "
                     f"automatic choice, got {block!r}")
  return int(block)


def _segments(n_blocks: int) -> list[tuple[int, int]]:
  """(first block, number of blocks) of up to _MAX_SEGMENTS near-equal runs."""
  n = min(n_blocks, _MAX_SEGMENTS)
  edges = [round(i * n_blocks / n) for i in range(n + 1)]
  return [(a, b - a) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _pad_time(x: jax.Array, tp: int) -> jax.Array:
  t = x.shape[1]
  if tp == t:
    return x
  return jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))


def _map_blocks(fn, q: jax.Array, first: int, count: int, block: int) -> jax.Array:
  """fn(q_block [B, block, Hkv, G, D], start) over `count` blocks from `first`,
  each under jax.checkpoint; returns [B, count * block, Hkv, G, D].

  The checkpoint stays for blocks with a custom backward too: without it their
  residuals outlived the enclosing layer's checkpoint (memory grew with depth)."""
  b, _, hkv, g, d = q.shape
  qs = q[:, first * block:(first + count) * block].reshape(b, count, block, hkv, g, d)
  qs = jnp.moveaxis(qs, 1, 0)  # [count, B, block, Hkv, G, D]
  starts = (first + jnp.arange(count, dtype=jnp.int32)) * block
  # prevent_cse=False is safe (and faster) inside a scan, which lax.map is.
  body = jax.checkpoint(lambda xs: fn(*xs), prevent_cse=False)
  out = jax.lax.map(body, (qs, starts))  # [count, B, block, Hkv, G, D]
  return jnp.moveaxis(out, 0, 1).reshape(b, count * block, hkv, g, d)


def _key_valid(k_pos: jax.Array, lengths: jax.Array, t: int) -> jax.Array:
  """[B, S]: key real (not padding of the caller, nor of our block rounding)."""
  return (k_pos[None, :] < lengths[:, None]) & (k_pos[None, :] < t)


def _block_masks(q_pos, k_valid, sink, recent, gated):
  """[B, 1, 1, Bq, S] causal (and streaming) masks of a query block over keys 0..S-1."""
  k_pos = jnp.arange(k_valid.shape[1], dtype=jnp.int32)
  causal = reference.causal_mask(q_pos, k_pos)[None] & k_valid[:, None, :]  # [B, Bq, S]
  stream = None
  if gated:
    stream = reference.streaming_mask(q_pos, k_pos, sink, recent)[None] & k_valid[:, None, :]
    stream = stream[:, None, None]
  return causal[:, None, None], stream


def _row_max(s, mask):
  """Row max of logits s under mask (0 for a row with no key, so exp stays finite)."""
  mx = jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1, keepdims=True)
  return jnp.where(jnp.isfinite(mx), mx, 0.0)


def _normalise(e):
  den = e.sum(-1, keepdims=True)  # >= 1 wherever a key is visible
  return e / jnp.where(den > 0, den, 1.0)


def _block_probs(qb, kp, q_pos, k_valid, sink, recent, gated, mx=None):
  """(p_full, p_stream or None, row maxima) [B, Hkv, G, Bq, S] in fp32: the reference's
  two softmaxes of one set of logits, each normalised by its own row max (the causal max
  would underflow the windowed one at long contexts: see reference.masked_softmax)."""
  c5, s5 = _block_masks(q_pos, k_valid, sink, recent, gated)
  ct = jnp.promote_types(qb.dtype, jnp.float32)
  s = jnp.einsum("bthgd,bshd->bhgts", qb, kp, preferred_element_type=ct) * qb.shape[-1] ** -0.5
  if mx is None:
    mx = (_row_max(s, c5), _row_max(s, s5) if gated else None)
  p_full = _normalise(jnp.where(c5, jnp.exp(jnp.where(c5, s, -jnp.inf) - mx[0]), 0.0))
  p_stream = None
  if gated:
    p_stream = _normalise(jnp.where(s5, jnp.exp(jnp.where(s5, s, -jnp.inf) - mx[1]), 0.0))
  return p_full, p_stream, mx


def _mix(p_full, p_stream, a, ct):
  if p_stream is None:
    return p_full
  w = a.astype(ct)[None, :, None, None, None]
  return w * p_full + (1 - w) * p_stream


# A hand-written backward: autodiff of the block keeps and re-reads about twice as
# many [B, Hkv, G, Bq, S] fp32 buffers, and the block is memory-bound.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _gated_block_core(qb, kp, vp, a, k_valid, start, sink, recent, gated):
  return _gated_block_fwd(qb, kp, vp, a, k_valid, start, sink, recent, gated)[0]


def _gated_block_fwd(qb, kp, vp, a, k_valid, start, sink, recent, gated):
  ct = jnp.promote_types(qb.dtype, jnp.float32)
  q_pos = start + jnp.arange(qb.shape[1], dtype=jnp.int32)
  p_full, p_stream, mx = _block_probs(qb, kp, q_pos, k_valid, sink, recent, gated)
  p = _mix(p_full, p_stream, a, ct)
  out = jnp.einsum("bhgts,bshd->bthgd", p.astype(vp.dtype), vp, preferred_element_type=ct)
  # Residuals: the inputs (k, v and k_valid are the same for every block of a
  # segment) and the row maxima; probabilities are recomputed in the backward.
  return out.astype(qb.dtype), (qb, kp, vp, a, k_valid, start, mx)


def _gated_block_bwd(sink, recent, gated, res, d_out):
  qb, kp, vp, a, k_valid, start, mx = res
  ct = jnp.promote_types(qb.dtype, jnp.float32)
  q_pos = start + jnp.arange(qb.shape[1], dtype=jnp.int32)
  p_full, p_stream, _ = _block_probs(qb, kp, q_pos, k_valid, sink, recent, gated, mx)
  do = d_out.astype(ct)
  dp = jnp.einsum("bthgd,bshd->bhgts", do, vp, preferred_element_type=ct)
  # softmax backward per branch: d s = w_b * p_b * (dp - rowsum(p_b * dp))
  ds = p_full * (dp - jnp.sum(p_full * dp, -1, keepdims=True))
  if gated:
    w = a.astype(ct)[None, :, None, None, None]
    ds_s = p_stream * (dp - jnp.sum(p_stream * dp, -1, keepdims=True))
    da = jnp.einsum("bhgts->h", dp * (p_full - p_stream)).astype(a.dtype)
    ds = w * ds + (1 - w) * ds_s
  else:
    da = None if a is None else jnp.zeros_like(a)
  p = _mix(p_full, p_stream, a, ct)
  scale = qb.shape[-1] ** -0.5
  dq = jnp.einsum("bhgts,bshd->bthgd", ds, kp.astype(ct)) * scale
  dk = jnp.einsum("bhgts,bthgd->bshd", ds, qb.astype(ct)) * scale
  dv = jnp.einsum("bhgts,bthgd->bshd", p, do)
  return (dq.astype(qb.dtype), dk.astype(kp.dtype), dv.astype(vp.dtype), da, None, None)


_gated_block_core.defvjp(_gated_block_fwd, _gated_block_bwd)


def _gated_block(qb, kp, vp, a, k_valid, start, sink, recent):
  """Reference gated mix for one query block over a key prefix.

  qb [B, Bq, Hkv, G, D]; kp, vp [B, S, Hkv, D] (keys 0..S-1); a [Hkv] (None:
  plain causal); k_valid [B, S].
  """
  return _gated_block_core(qb, kp, vp, a, k_valid, start, sink, recent, a is not None)


def _causal_like(q, k, v, lengths, a, sink, recent, block):
  """Causal (a None) or gated attention over the whole sequence, blocked."""
  t = q.shape[1]
  nb = -(-t // block)
  tp = nb * block
  q, k, v = (_pad_time(x, tp) for x in (q, k, v))
  outs = []
  for first, count in _segments(nb):
    end = (first + count) * block  # the last query of the segment sees keys < end
    kp, vp = k[:, :end], v[:, :end]
    k_valid = _key_valid(jnp.arange(end, dtype=jnp.int32), lengths, t)
    fn = lambda qb, start, kp=kp, vp=vp, kv=k_valid: _gated_block(qb, kp, vp, a, kv, start,
                                                                  sink, recent)
    outs.append(_map_blocks(fn, q, first, count, block))
  return jnp.concatenate(outs, axis=1)[:, :t]


def _streaming(q, k, v, lengths, sink, recent, block):
  """Streaming attention for every head, blocked: sink keys + a sliding window."""
  t = q.shape[1]
  nb = -(-t // block)
  tp = nb * block
  q, k, v = (_pad_time(x, tp) for x in (q, k, v))
  ns = min(sink, tp)
  # Keys of the window part: the block's queries see positions
  # [start - recent + 1, start + block - 1]; positions < sink come from the sink part.
  w = min(block + recent - 1, tp) if recent > 0 else 0

  def fn(qb, start):
    q_pos = start + jnp.arange(block, dtype=jnp.int32)
    keys, vals, pos, valid = [], [], [], []
    if ns:
      pos.append(jnp.arange(ns, dtype=jnp.int32))
      keys.append(k[:, :ns])
      vals.append(v[:, :ns])
      valid.append(jnp.ones((ns,), bool))
    if w:
      ws = jnp.clip(start - recent + 1, 0, tp - w)
      pos.append(ws + jnp.arange(w, dtype=jnp.int32))
      keys.append(jax.lax.dynamic_slice_in_dim(k, ws, w, axis=1))
      vals.append(jax.lax.dynamic_slice_in_dim(v, ws, w, axis=1))
      valid.append(pos[-1] >= sink)  # those below sink are in the sink part already
    if not keys:  # sink = recent = 0: no query sees any key
      return jnp.zeros_like(qb)
    k_pos = jnp.concatenate(pos)
    kv_valid = _key_valid(k_pos, lengths, t) & jnp.concatenate(valid)[None, :]
    mask = reference.streaming_mask(q_pos, k_pos, sink, recent)[None] & kv_valid[:, None, :]
    return reference.masked_attention(qb, jnp.concatenate(keys, 1), jnp.concatenate(vals, 1),
                                      mask[:, None])

  return _map_blocks(fn, q, 0, nb, block)[:, :t]


def _concrete_bools(x) -> np.ndarray | None:
  """x as a numpy bool array if its value is known at trace time, else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x, bool)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                    streaming: jax.Array | None = None, sink: int = 0, recent: int = 0,
                    *, block: int | None = None) -> jax.Array:
  """`reference.dense_attention`, blocked over queries when T is large.

  q [B, T, Hkv, G, D]; k, v [B, T, Hkv, D]; lengths [B]; streaming bool [Hkv]
  or None (all causal). block: query rows per step (None: `pick_block`, which
  keeps the reference path for small T). A `streaming` known at trace time
  (numpy, or a concrete array) that is all True takes the cheap windowed path;
  a traced one mixes the two masks per head in one causal pass.
  """
  block = _resolve_block(q, block)
  if block is None:
    return reference.dense_attention(q, k, v, lengths, streaming, sink, recent)
  if streaming is None:
    return _causal_like(q, k, v, lengths, None, sink, recent, block)
  known = _concrete_bools(streaming)
  if known is not None and known.all():
    return _streaming(q, k, v, lengths, sink, recent, block)
  if known is not None and not known.any():
    return _causal_like(q, k, v, lengths, None, sink, recent, block)
  # gate 1 = causal, 0 = streaming: exactly one of the two softmaxes per head
  a = 1.0 - jnp.asarray(streaming, jnp.float32)
  return _causal_like(q, k, v, lengths, a, sink, recent, block)


def gated_attention(q: jax.Array, k: jax.Array, v: jax.Array, gates: jax.Array,
                    lengths: jax.Array, sink: int, recent: int, *,
                    block: int | None = None) -> jax.Array:
  """`reference.gated_attention` (alpha * full + (1 - alpha) * streaming per KV
  head), blocked over queries when T is large.

  gates [Hkv], used as given (the caller clamps them); other shapes as in
  `dense_attention`. Gradients w.r.t. q, k, v and gates equal the reference's.
  """
  block = _resolve_block(q, block)
  if block is None:
    return reference.gated_attention(q, k, v, gates, lengths, sink, recent)
  return _causal_like(q, k, v, lengths, gates, sink, recent, block)
