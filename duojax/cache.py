"""KV caches as pytrees: full, streaming (sink + ring) and the DuoAttention split.

Per layer the cache is one of
  FullLayerCache    k, v [B, S, H, D]   slot j holds position j
  StreamLayerCache  k, v [B, W, H, D]   W = sink + recent: sink slots, then a ring
  DuoLayerCache     a FullLayerCache for the layer's leading `n_retrieval` KV
                    heads and a StreamLayerCache for the rest
and `KVCache` adds the per-row lengths [B] shared by all layers. Streaming heads
never hold a full-length buffer: their keys go straight from a chunk into the ring.

The streaming window is the same in training, prefill and decode: the query at
position t sees j < sink and t - recent < j <= t, i.e. `recent` keys counting its
own (the official training mask; the official *decode* appends the new token to
sink + the last `recent` and so sees recent + 1). Before a chunk starting at p the
ring holds positions p - recent .. p - 1; position p - recent is no longer visible
to plain streaming heads, but it is the one RazorAttention's compensation token
(`duojax.compensation`) reads from the ring as it leaves the window, so the ring
keeps `recent` slots: one slot per streaming head (1/(sink + recent) of its cache)
buys one cache layout for both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from duojax.config import ModelConfig


def _pytree(data: Sequence[str], meta: Sequence[str] = ()):
  return functools.partial(jax.tree_util.register_dataclass, data_fields=list(data),
                           meta_fields=list(meta))


@_pytree(["k", "v"])
@dataclasses.dataclass
class FullLayerCache:
  k: jax.Array  # [B, S, H, D]
  v: jax.Array  # [B, S, H, D]


@_pytree(["k", "v"], ["sink", "recent"])
@dataclasses.dataclass
class StreamLayerCache:
  k: jax.Array  # [B, sink + recent, H, D]
  v: jax.Array  # [B, sink + recent, H, D]
  sink: int
  recent: int


@_pytree(["full", "stream"])
@dataclasses.dataclass
class DuoLayerCache:
  full: FullLayerCache  # leading n_retrieval KV heads
  stream: StreamLayerCache  # the remaining KV heads (or a compensation.CompLayerCache)

  @property
  def n_retrieval(self) -> int:
    return self.full.k.shape[2]


LayerCache = Union[FullLayerCache, StreamLayerCache, DuoLayerCache]


@_pytree(["layers", "lengths"])
@dataclasses.dataclass
class KVCache:
  layers: tuple  # one LayerCache per layer
  lengths: jax.Array  # [B] int32 tokens already in the cache


# -- construction ---------------------------------------------------------------

def layer_split(config: ModelConfig, mask=None) -> tuple[int, ...]:
  """Retrieval KV heads per layer (all of them without a mask)."""
  if mask is None:
    return (config.num_kv_heads,) * config.num_layers
  mask.check_fits(config.num_layers, config.num_kv_heads)
  return tuple(mask.n_retrieval(l) for l in range(config.num_layers))


def _layer_shapes(config, mask, batch, capacity):
  """[(kind, shapes)] per layer without allocating: shared by init and byte counts."""
  d, hkv = config.head_dim, config.num_kv_heads
  out = []
  for n_r in layer_split(config, mask):
    full = (batch, capacity, n_r, d)
    if mask is None or n_r == hkv:
      out.append(("full", full, None))
    else:
      stream = (batch, mask.sink + mask.recent, hkv - n_r, d)
      out.append(("stream" if n_r == 0 else "duo", full, stream))
  return out


def init_cache(config: ModelConfig, batch: int, capacity: int, mask=None,
               dtype=jnp.bfloat16, compensation: bool = False) -> KVCache:
  """An empty cache. mask: a HeadMask (None = every head full attention).

  compensation: streaming parts also keep RazorAttention's compensation token
  (a `duojax.compensation.CompLayerCache`).
  """
  layers = []
  for kind, full, stream in _layer_shapes(config, mask, batch, capacity):
    fc = FullLayerCache(jnp.zeros(full, dtype), jnp.zeros(full, dtype))
    if kind == "full":
      layers.append(fc)
      continue
    if compensation:
      from duojax.compensation import init_comp_cache  # it imports this module
      sc = init_comp_cache(stream, dtype, mask.sink, mask.recent)
    else:
      sc = StreamLayerCache(jnp.zeros(stream, dtype), jnp.zeros(stream, dtype), mask.sink,
                            mask.recent)
    layers.append(sc if kind == "stream" else DuoLayerCache(fc, sc))
  return KVCache(tuple(layers), jnp.zeros((batch,), jnp.int32))


def kv_cache_bytes(config: ModelConfig, mask, length: int, batch: int = 1,
                   dtype=jnp.bfloat16, compensation: bool = False) -> int:
  """Bytes of the cache `init_cache(config, batch, length, mask, dtype, compensation)`
  allocates."""
  item = np.dtype(dtype).itemsize
  total = batch * 4  # lengths
  for kind, full, stream in _layer_shapes(config, mask, batch, length):
    if kind != "stream":
      total += 2 * item * int(np.prod(full))
    if kind != "full":
      total += 2 * item * int(np.prod(stream))
      if compensation:
        from duojax.compensation import comp_nbytes
        total += comp_nbytes(stream)
  return total


def cache_nbytes(cache: KVCache) -> int:
  """Bytes actually held by a cache's arrays."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))


# -- writes -----------------------------------------------------------------------

def write_full(c: FullLayerCache, k: jax.Array, v: jax.Array, start: jax.Array,
               n_valid: jax.Array) -> FullLayerCache:
  """Writes chunk token i of row b at slot start[b] + i, for i < n_valid[b].

  k, v [B, T, H, D]. Padding tokens and anything past capacity are dropped, so a
  ragged batch never overwrites a row's valid entries.
  """
  b, t = k.shape[:2]
  s = c.k.shape[1]
  i = jnp.arange(t)[None, :]
  slot = jnp.where(i < n_valid[:, None], start[:, None] + i, s)  # s = out of range: dropped
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  kk = c.k.at[rows, slot].set(k.astype(c.k.dtype), mode="drop")
  vv = c.v.at[rows, slot].set(v.astype(c.v.dtype), mode="drop")
  return FullLayerCache(kk, vv)


def stream_slot_positions(length: jax.Array, sink: int, recent: int):
  """Positions held by each slot of a streaming cache holding `length` tokens.

  length [B] -> (pos [B, W] int32, valid [B, W] bool), W = sink + recent.
  Sink slot s holds position s; ring slot r holds the latest position
  t < length with t >= sink and (t - sink) % recent == r.
  """
  e = length[:, None].astype(jnp.int32)
  s = jnp.arange(sink, dtype=jnp.int32)[None, :]
  sink_pos = jnp.broadcast_to(s, (length.shape[0], sink))
  sink_valid = s < e
  if recent == 0:
    return sink_pos, sink_valid
  r = jnp.arange(recent, dtype=jnp.int32)[None, :]
  ring_pos = e - 1 - jnp.mod(e - 1 - sink - r, recent)
  ring_valid = ring_pos >= sink
  return (jnp.concatenate([sink_pos, ring_pos], 1),
          jnp.concatenate([sink_valid, ring_valid], 1))


def write_stream(c: StreamLayerCache, k: jax.Array, v: jax.Array, start: jax.Array,
                 n_valid: jax.Array) -> StreamLayerCache:
  """Moves a chunk into sink slots and the ring. k, v [B, T, H, D].

  Each slot takes the latest valid chunk token that maps to it (a gather, so
  there are no conflicting writes when the chunk is longer than the ring).
  """
  t = k.shape[1]
  end = start + n_valid
  pos, valid = stream_slot_positions(end, c.sink, c.recent)  # positions after the chunk
  idx = pos - start[:, None]  # index into the chunk
  from_chunk = valid & (idx >= 0) & (idx < t)
  idx = jnp.clip(idx, 0, t - 1)

  def take(buf, new):
    g = jnp.take_along_axis(new, idx[:, :, None, None], axis=1).astype(buf.dtype)
    return jnp.where(from_chunk[:, :, None, None], g, buf)

  return StreamLayerCache(take(c.k, k), take(c.v, v), c.sink, c.recent)


# -- reordering helpers used by the model ---------------------------------------------

def split_heads(x: jax.Array, n_retrieval: int, axis: int):
  """Retrieval heads lead (weights were reordered), so the split is a static slice."""
  return (jax.lax.slice_in_dim(x, 0, n_retrieval, axis=axis),
          jax.lax.slice_in_dim(x, n_retrieval, x.shape[axis], axis=axis))
