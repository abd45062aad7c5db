"""Plain-jnp attention: the oracle every kernel is compared with.

Layouts (GQA packed by KV head so a KV head's G query heads sit together):
  q      [B, T, Hkv, G, D]
  k, v   [B, S, Hkv, D]
  out    [B, T, Hkv, G, D]
Positions are absolute token positions; keys are cached after RoPE at their
original positions, so masks compare positions, never slot indices.

The chunk ops also read quantised caches (`duojax.kv_quant.QuantKV` for any cache
argument, and for a streaming op's chunk k, v): they dequantise them into q's dtype
first, the oracle for kernels that dequantise inside.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from duojax.kv_quant import as_dense


def causal_mask(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
  """q_pos [..., T], k_pos [..., S] -> bool [..., T, S]: key j visible iff j <= t."""
  return k_pos[..., None, :] <= q_pos[..., :, None]


def streaming_mask(q_pos: jax.Array, k_pos: jax.Array, sink: int, recent: int) -> jax.Array:
  """Key j visible from t iff j <= t and (j < sink or t - j < recent)."""
  d = q_pos[..., :, None] - k_pos[..., None, :]
  return (d >= 0) & ((k_pos[..., None, :] < sink) | (d < recent))


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     logit_bias: jax.Array | None = None) -> jax.Array:
  """Softmax attention with an explicit mask.

  q [B, T, Hkv, G, D]; k, v [B, S, Hkv, D]; mask bool broadcastable to
  [B, Hkv, T, S]; logit_bias (optional) broadcastable to [B, Hkv, T, S], added
  to the logits of visible keys. A query that sees no key returns zeros (padding
  rows), never NaN. Logits and softmax in fp32; output in q's dtype.
  """
  scale = q.shape[-1] ** -0.5
  ct = jnp.promote_types(q.dtype, jnp.float32)  # fp32, or fp64 under x64 (gradient checks)
  s = jnp.einsum("bthgd,bshd->bhgts", q, k, preferred_element_type=ct) * scale
  if logit_bias is not None:
    s = s + logit_bias[:, :, None].astype(ct)
  m4 = mask[:, :, None]  # [B, Hkv, 1, T, S]
  s = jnp.where(m4, s, -jnp.inf)
  mx = jnp.max(s, axis=-1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  p = jnp.where(m4, jnp.exp(s - mx), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.maximum(denom, 1e-30)
  out = jnp.einsum("bhgts,bshd->bthgd", p.astype(v.dtype), v, preferred_element_type=ct)
  return out.astype(q.dtype)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                    streaming: jax.Array | None = None, sink: int = 0,
                    recent: int = 0) -> jax.Array:
  """Whole-sequence attention with a per-KV-head mask: the slow ground truth.

  q [B, T, Hkv, G, D]; k, v [B, T, Hkv, D]; lengths [B] (keys at positions
  >= length are padding). streaming: bool [Hkv] (None = all causal); those heads
  get the streaming mask, the others causal.
  """
  b, t = q.shape[:2]
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  valid = pos < lengths[:, None]  # [B, T]
  causal = causal_mask(pos, pos) & valid[:, None, :]  # [B, T, T]
  if streaming is None:
    mask = causal[:, None]
  else:
    stream = streaming_mask(pos, pos, sink, recent) & valid[:, None, :]
    mask = jnp.where(streaming[None, :, None, None], stream[:, None], causal[:, None])
  return masked_attention(q, k, v, mask)


def masked_softmax(s: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax of logits s over the last axis where mask holds (0 elsewhere; rows
  with no key give 0).

  Each mask gets its own max. Normalising the streaming softmax by the causal
  max instead (they share logits) underflows at long contexts: when a query's
  largest logit lies outside its window, every windowed exp can round to 0 or a
  subnormal, the sum divides by ~1e-30 and the backward overflows to NaN (gate
  training on Qwen2.5 turned every gate NaN after its first 32K-token step).
  """
  s = jnp.where(mask, s, -jnp.inf)
  mx = jnp.max(s, axis=-1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  e = jnp.where(mask, jnp.exp(s - mx), 0.0)
  den = e.sum(-1, keepdims=True)  # >= 1 wherever a key is visible
  return e / jnp.where(den > 0, den, 1.0)


def gated_attention(q: jax.Array, k: jax.Array, v: jax.Array, gates: jax.Array,
                    lengths: jax.Array, sink: int, recent: int) -> jax.Array:
  """DuoAttention's training mix: alpha * full + (1 - alpha) * streaming.

  gates [Hkv] (one alpha per KV head, shared by its G query heads), used as
  given: the caller clamps them into [0, 1] (gate training with a straight-through
  gradient, `identify.duo.clamp01`). Shapes as in `dense_attention`. The logits
  are computed once and softmaxed under both masks, since the streaming mask is
  a subset of the causal one.
  """
  b, t = q.shape[:2]
  pos = jnp.arange(t)
  valid = pos[None, :] < lengths[:, None]  # [B, T]
  causal = causal_mask(pos, pos)[None] & valid[:, None, :]  # [B, T, T]
  stream = streaming_mask(pos, pos, sink, recent)[None] & valid[:, None, :]
  scale = q.shape[-1] ** -0.5
  ct = jnp.promote_types(q.dtype, jnp.float32)
  s = jnp.einsum("bthgd,bshd->bhgts", q, k, preferred_element_type=ct) * scale
  p_full = masked_softmax(s, causal[:, None, None])
  p_stream = masked_softmax(s, stream[:, None, None])
  a = gates.astype(ct)[None, :, None, None, None]
  p = a * p_full + (1 - a) * p_stream
  out = jnp.einsum("bhgts,bshd->bthgd", p.astype(v.dtype), v, preferred_element_type=ct)
  return out.astype(q.dtype)


# -- chunked (cache-aware) attention: prefill chunks and decode (T = 1) -------

def full_chunk_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                         q_pos: jax.Array, kv_len: jax.Array) -> jax.Array:
  """Retrieval heads: a chunk of queries over the whole (already written) cache.

  q [B, T, H, G, D]; k_cache, v_cache [B, S, H, D] with slot j holding position j;
  q_pos [B, T] absolute positions; kv_len [B] valid cache length after the chunk.
  """
  k_cache, v_cache = as_dense(k_cache, q.dtype), as_dense(v_cache, q.dtype)
  s = k_cache.shape[1]
  k_pos = jnp.arange(s)[None, :]
  mask = causal_mask(q_pos, k_pos) & (k_pos < kv_len[:, None])[:, None, :]
  return masked_attention(q, k_cache, v_cache, mask[:, None])


def streaming_chunk_attention(q: jax.Array, slot_k: jax.Array, slot_v: jax.Array,
                              slot_pos: jax.Array, slot_valid: jax.Array, k: jax.Array,
                              v: jax.Array, q_pos: jax.Array, n_valid: jax.Array,
                              sink: int, recent: int) -> jax.Array:
  """Streaming heads: a chunk over sink + ring slots (as they were before the
  chunk) plus the chunk's own keys, with the exact streaming mask.

  q [B, T, H, G, D]; slot_k, slot_v [B, W, H, D] (W = sink + recent);
  slot_pos, slot_valid [B, W]; k, v [B, T, H, D] the chunk's keys; q_pos [B, T];
  n_valid [B] how many chunk tokens are real.
  Cost is O(T * (W + T)), independent of the sequence length.
  """
  slot_k, slot_v, k, v = (as_dense(x, q.dtype) for x in (slot_k, slot_v, k, v))
  t = q.shape[1]
  chunk_valid = jnp.arange(t)[None, :] < n_valid[:, None]  # [B, T]
  keys = jnp.concatenate([slot_k, k], axis=1)
  vals = jnp.concatenate([slot_v, v], axis=1)
  k_pos = jnp.concatenate([slot_pos, q_pos], axis=1)
  k_valid = jnp.concatenate([slot_valid, chunk_valid], axis=1)
  mask = streaming_mask(q_pos, k_pos, sink, recent) & k_valid[:, None, :]  # [B, T, W+T]
  return masked_attention(q, keys, vals, mask[:, None])


def duo_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                         q_pos: jax.Array, kv_len: jax.Array, slot_k: jax.Array,
                         slot_v: jax.Array, slot_pos: jax.Array, slot_valid: jax.Array,
                         k: jax.Array, v: jax.Array, n_valid: jax.Array, sink: int,
                         recent: int) -> jax.Array:
  """A DuoAttention layer's decode step as one op (what a fused kernel computes).

  q [B, 1, Hr + Hs, G, D] with the Hr retrieval heads first; k/v_cache
  [B, S, Hr, D] already holding the new token; slot_k/v [B, W, Hs, D] as before
  it; k, v [B, 1, Hr + Hs, D] the new token's keys/values. Returns
  [B, 1, Hr + Hs, G, D].
  """
  hr = k_cache.shape[2]
  # the streaming heads' new keys: a slice of every buffer (codes, scale, zero) if quantised
  ks, vs = (jax.tree_util.tree_map(lambda a: a[:, :, hr:], x) for x in (k, v))
  full = full_chunk_attention(q[:, :, :hr], k_cache, v_cache, q_pos, kv_len)
  stream = streaming_chunk_attention(q[:, :, hr:], slot_k, slot_v, slot_pos, slot_valid,
                                     ks, vs, q_pos, n_valid, sink, recent)
  return jnp.concatenate([full, stream], axis=2)
