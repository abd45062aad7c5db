"""RazorAttention's compensation token for streaming heads.

A streaming head forgets every token that leaves its window. The compensation
token gives it one extra key/value per KV head that stands in for all of them:
the mean of the keys and of the values dropped so far, whose logit gets
`+ log(n_dropped)` so that it weighs what `n_dropped` copies of the mean key
would. Sink tokens are never dropped, so they never enter the mean.

Exact semantics (checked against a slow per-position reference in
tests/test_compensation.py): a query at position t attends
  - the streaming keys: j <= t and (j < sink or t - j < recent), and
  - while D(t) = {j : sink <= j <= t - recent} is not empty, one more key
    mean_{j in D(t)} k_j and value mean_{j in D(t)} v_j, with logit
    q . k_mean / sqrt(head_dim) + log |D(t)|.
D(t) is what the streaming mask hides from t, so the compensation is exact in
chunked prefill (whatever the chunk length, also longer than the ring) and in
decoding, and every query of a chunk gets its own mean.

Cache: `CompLayerCache` wraps the usual `StreamLayerCache` (sink slots + ring)
and adds the running means of the dropped keys/values in float32 and the count
n_dropped. After `length` tokens the ring holds positions >= length - recent,
so the means cover positions [sink, sink + n_dropped) with
n_dropped = max(0, length - recent - sink). Only the xla reference implements
it (any backend falls back to it for these caches). Importing this module registers
the kind with `duojax.cache` (init_cache(..., compensation=True) builds it) and its
attention with `duojax.attention.dispatch`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from duojax import cache as kvc
from duojax.attention import dispatch
from duojax.attention.reference import masked_attention, streaming_mask


@kvc.pytree_dataclass(["stream", "comp_k", "comp_v", "n_dropped"])
@dataclasses.dataclass
class CompLayerCache:
  stream: kvc.StreamLayerCache  # sink slots + ring, as without compensation
  comp_k: jax.Array  # [B, H, D] float32 mean of the dropped keys (0 while none)
  comp_v: jax.Array  # [B, H, D] float32 mean of the dropped values
  n_dropped: jax.Array  # [B] int32 tokens dropped so far

  @property
  def sink(self) -> int:
    return self.stream.sink

  @property
  def recent(self) -> int:
    return self.stream.recent


def init_comp_cache(shape, dtype, sink: int, recent: int) -> CompLayerCache:
  """An empty cache; shape = (B, sink + recent, H, D) of the streaming buffer."""
  b, _, h, d = shape
  stream = kvc.StreamLayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), sink, recent)
  # two arrays, not one shared: jit donates the cache and a buffer can go only once
  return CompLayerCache(stream, jnp.zeros((b, h, d), jnp.float32),
                        jnp.zeros((b, h, d), jnp.float32), jnp.zeros((b,), jnp.int32))


def comp_nbytes(shape) -> int:
  """Bytes the compensation adds to a streaming buffer of `shape` (B, W, H, D)."""
  b, _, h, d = shape
  return 2 * 4 * b * h * d + 4 * b


def n_dropped_after(length: jax.Array, sink: int, recent: int) -> jax.Array:
  """Tokens outside sink + window once `length` tokens were seen: [B] int32."""
  return jnp.maximum(length - recent - sink, 0).astype(jnp.int32)


def _keys(c: CompLayerCache, k, v, start, n_valid):
  """The pre-chunk slots followed by the chunk: keys, values [B, W+T, H, D],
  positions and validity [B, W+T]."""
  t = k.shape[1]
  slot_pos, slot_valid = kvc.stream_slot_positions(start, c.sink, c.recent)
  q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  chunk_valid = jnp.arange(t)[None, :] < n_valid[:, None]
  keys = jnp.concatenate([c.stream.k, k.astype(c.stream.k.dtype)], axis=1)
  vals = jnp.concatenate([c.stream.v, v.astype(c.stream.v.dtype)], axis=1)
  return (keys, vals, jnp.concatenate([slot_pos, q_pos], 1),
          jnp.concatenate([slot_valid, chunk_valid], 1), q_pos)


def _fold(mean: jax.Array, sel: jax.Array, x: jax.Array, n_new: jax.Array) -> jax.Array:
  """Means after adding the selected tokens: mean + sum_j sel (x_j - mean) / n_new.

  mean [B, H, D] over the tokens folded so far; sel [B, ..., S] 0/1 over x [B, S, H, D];
  n_new [B, ...] the new counts. Returns [B, ..., H, D] float32. Summing
  deviations from the old mean (not raw sums) keeps float32 accurate over long
  contexts.
  """
  dev = x.astype(jnp.float32) - mean[:, None]  # [B, S, H, D]
  s = jnp.einsum("b...s,bshd->b...hd", sel.astype(jnp.float32), dev,
                 precision=jax.lax.Precision.HIGHEST)
  scale = 1.0 / jnp.maximum(n_new, 1).astype(jnp.float32)
  m = mean.reshape(mean.shape[:1] + (1,) * (sel.ndim - 2) + mean.shape[1:])
  return m + s * scale[..., None, None]


def comp_chunk_attention(c: CompLayerCache, q: jax.Array, k: jax.Array, v: jax.Array,
                         start: jax.Array, n_valid: jax.Array) -> jax.Array:
  """Streaming attention plus the compensation slot, for a chunk (T = 1: decode).

  q [B, T, H, G, D]; k, v [B, T, H, D] the chunk's keys (after RoPE); start [B]
  tokens already cached; n_valid [B] real tokens in the chunk. c is the cache as
  it was before the chunk. Returns out [B, T, H, G, D].

  The compensation key of query t is folded from the cache's mean and the keys
  in [sink + n_dropped, t - recent] (old ring slots and earlier chunk tokens),
  and enters as one extra column that only query t sees, with logit bias
  log |D(t)|: so the reference `masked_attention` does the softmax.
  """
  keys, vals, k_pos, k_valid, q_pos = _keys(c, k, v, start, n_valid)
  t = q.shape[1]
  visible = streaming_mask(q_pos, k_pos, c.sink, c.recent) & k_valid[:, None, :]  # [B, T, S]
  first_new = (c.sink + c.n_dropped)[:, None, None]
  newly = k_valid[:, None, :] & (k_pos[:, None, :] >= first_new) & (
      k_pos[:, None, :] <= q_pos[:, :, None] - c.recent)  # [B, T, S]
  n_t = c.n_dropped[:, None] + jnp.sum(newly, axis=-1, dtype=jnp.int32)  # [B, T] = |D(t)|
  ck = _fold(c.comp_k, newly, keys, n_t).astype(keys.dtype)  # [B, T, H, D]
  cv = _fold(c.comp_v, newly, vals, n_t).astype(vals.dtype)
  eye = jnp.eye(t, dtype=bool)[None]
  mask = jnp.concatenate([visible, eye & (n_t > 0)[:, :, None]], axis=-1)  # [B, T, S + T]
  log_n = jnp.log(jnp.maximum(n_t, 1).astype(jnp.float32))
  bias = jnp.concatenate([jnp.zeros(visible.shape, jnp.float32),
                          jnp.where(eye, log_n[:, :, None], 0.0)], axis=-1)
  return masked_attention(q, jnp.concatenate([keys, ck], 1), jnp.concatenate([vals, cv], 1),
                          mask[:, None], bias[:, None])


def write_comp(c: CompLayerCache, k: jax.Array, v: jax.Array, start: jax.Array,
               n_valid: jax.Array) -> CompLayerCache:
  """Folds the tokens that leave the window during the chunk into the means,
  then moves the chunk into the sink slots and ring. k, v [B, T, H, D]."""
  keys, vals, k_pos, k_valid, _ = _keys(c, k, v, start, n_valid)
  n_new = n_dropped_after(start + n_valid, c.sink, c.recent)  # [B]
  sel = k_valid & (k_pos >= (c.sink + c.n_dropped)[:, None]) & (
      k_pos < (c.sink + n_new)[:, None])  # [B, S]
  return CompLayerCache(kvc.write_stream(c.stream, k, v, start, n_valid),
                        _fold(c.comp_k, sel, keys, n_new),
                        _fold(c.comp_v, sel, vals, n_new), n_new)


def attend(c: CompLayerCache, q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array,
           n_valid: jax.Array, backend: str = "xla"):
  """dispatch.attend for a compensated streaming part: (out [B, T, H, G, D], new cache).
  No kernel has the compensation slot yet, so every backend runs this reference."""
  del backend
  out = comp_chunk_attention(c, q, k, v, start, n_valid)
  return out, write_comp(c, k, v, start, n_valid)


kvc.register_stream_part("compensation", kvc.StreamPart(init_comp_cache, comp_nbytes))
dispatch.register_cache_attention(CompLayerCache, attend)
