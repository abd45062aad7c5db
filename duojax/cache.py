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

Each cache kind brings its attention: the kinds defined here register theirs with
`duojax.attention.dispatch` at the end of this module. Streaming parts of another
kind (the compensated one of `duojax.compensation`) register how they are built and
sized with `register_stream_part`, so this module imports no feature module.

Quantised caches (init_cache(..., kv_dtype="int8" | "int4" | "k8v4")): every k / v buffer
is a `duojax.kv_quant.QuantKV` (codes + a float32 scale and zero per token per KV head)
instead of an array. Writes quantise the chunk (`write_full`, `write_stream` act on each
of its leaves alike), attention reads the codes and dequantises: the xla reference up
front (the oracle), a kernel backend inside the kernel where its op table lists the op
under "kv_quant" (else the reference runs). Streaming heads attend the chunk's own keys
quantised too, so every key a query sees went through the cache's quantiser.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from duojax import kv_quant
from duojax.attention import dispatch
from duojax.config import ModelConfig


def pytree_dataclass(data: Sequence[str], meta: Sequence[str] = ()):
  """Decorator: a dataclass as a pytree whose `data` fields are leaves and `meta` fields
  static (part of the jit cache key)."""
  return functools.partial(jax.tree_util.register_dataclass, data_fields=list(data),
                           meta_fields=list(meta))


@pytree_dataclass(["k", "v"])
@dataclasses.dataclass
class FullLayerCache:
  k: jax.Array  # [B, S, H, D] (or a kv_quant.QuantKV of that logical shape)
  v: jax.Array  # [B, S, H, D]


@pytree_dataclass(["k", "v"], ["sink", "recent"])
@dataclasses.dataclass
class StreamLayerCache:
  k: jax.Array  # [B, sink + recent, H, D]
  v: jax.Array  # [B, sink + recent, H, D]
  sink: int
  recent: int


@pytree_dataclass(["full", "stream"])
@dataclasses.dataclass
class DuoLayerCache:
  full: FullLayerCache  # leading n_retrieval KV heads
  stream: StreamLayerCache  # the remaining KV heads (or a compensation.CompLayerCache)

  @property
  def n_retrieval(self) -> int:
    return self.full.k.shape[2]


LayerCache = Union[FullLayerCache, StreamLayerCache, DuoLayerCache]


@dataclasses.dataclass(frozen=True)
class StreamPart:
  """How to build and size a streaming part other than the plain StreamLayerCache.

  init(shape, dtype, sink, recent) -> the empty part, shape = (B, sink + recent, H, D);
  extra_nbytes(shape) -> bytes it holds beyond the plain part's k and v.
  """
  init: Callable
  extra_nbytes: Callable


_STREAM_PARTS: dict[str, StreamPart] = {}
# The module that registers each known part: named in the error, never imported here.
_STREAM_PART_HOME = {"compensation": "duojax.compensation"}


def register_stream_part(name: str, part: StreamPart) -> None:
  _STREAM_PARTS[name] = part


def _stream_part(name: str) -> StreamPart:
  if name not in _STREAM_PARTS:
    home = _STREAM_PART_HOME.get(name, "the module that defines it")
    raise ValueError(f"the {name!r} streaming cache is defined in {home}: import it before "
                     f"init_cache / kv_cache_bytes (e.g. `import {home}`)")
  return _STREAM_PARTS[name]


@pytree_dataclass(["layers", "lengths"])
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


def _kv_storage(dtype, kv_dtype, compensation):
  """(dtype of plain buffers, (key bits, value bits) or None) for init_cache / kv_cache_bytes."""
  bits = kv_quant.kv_bits_of(kv_dtype)
  if bits is not None and compensation:
    raise ValueError("the compensation token is built for unquantised caches only; use "
                     "kv_dtype bf16 (--kv-dtype bf16) with --compensation")
  plain = {None: dtype, "bf16": jnp.bfloat16, "fp32": jnp.float32}.get(kv_dtype, dtype)
  return plain, bits


def _buffers(shape, dtype, bits):
  """The (k, v) buffers of one cache part: plain, or quantised with (key, value) bits."""
  if bits is None:
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
  return kv_quant.empty(shape, bits[0]), kv_quant.empty(shape, bits[1])


def init_cache(config: ModelConfig, batch: int, capacity: int, mask=None,
               dtype=jnp.bfloat16, compensation: bool = False,
               kv_dtype: str | None = None) -> KVCache:
  """An empty cache. mask: a HeadMask (None = every head full attention).

  compensation: streaming parts also keep RazorAttention's compensation token
  (a `duojax.compensation.CompLayerCache`).
  kv_dtype: None (buffers in `dtype`), "bf16", "fp32", or "int8" / "int4" / "k8v4": every
  k / v buffer a kv_quant.QuantKV (codes + float32 scale and zero per token per KV head;
  k8v4: int8 keys, int4 values).
  """
  dtype, bits = _kv_storage(dtype, kv_dtype, compensation)
  layers = []
  for kind, full, stream in _layer_shapes(config, mask, batch, capacity):
    fc = FullLayerCache(*_buffers(full, dtype, bits))
    if kind == "full":
      layers.append(fc)
      continue
    if compensation:
      sc = _stream_part("compensation").init(stream, dtype, mask.sink, mask.recent)
    else:
      sc = StreamLayerCache(*_buffers(stream, dtype, bits), mask.sink, mask.recent)
    layers.append(sc if kind == "stream" else DuoLayerCache(fc, sc))
  return KVCache(tuple(layers), jnp.zeros((batch,), jnp.int32))


def kv_cache_bytes(config: ModelConfig, mask, length: int, batch: int = 1,
                   dtype=jnp.bfloat16, compensation: bool = False,
                   kv_dtype: str | None = None) -> int:
  """Bytes of the cache `init_cache(config, batch, length, mask, dtype, compensation,
  kv_dtype)` allocates (a quantised cache's scales and zeros included)."""
  dtype, bits = _kv_storage(dtype, kv_dtype, compensation)
  item = np.dtype(dtype).itemsize
  if bits is None:
    size = lambda shape: 2 * item * int(np.prod(shape))
  else:
    size = lambda shape: kv_quant.nbytes(shape, bits[0]) + kv_quant.nbytes(shape, bits[1])
  total = batch * 4  # lengths
  for kind, full, stream in _layer_shapes(config, mask, batch, length):
    if kind != "stream":
      total += size(full)
    if kind != "full":
      total += size(stream)
      if compensation:
        total += _stream_part("compensation").extra_nbytes(stream)
  return total


def cache_nbytes(cache: KVCache) -> int:
  """Bytes actually held by a cache's arrays."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))


# -- writes -----------------------------------------------------------------------

def write_full(c: FullLayerCache, k: jax.Array, v: jax.Array, start: jax.Array,
               n_valid: jax.Array) -> FullLayerCache:
  """Writes chunk token i of row b at slot start[b] + i, for i < n_valid[b].

  k, v [B, T, H, D] (or already in the cache's storage: a QuantKV). Padding tokens and
  anything past capacity are dropped, so a ragged batch never overwrites a row's valid
  entries. A quantised cache stores the chunk's codes, scales and zeros alike.
  """
  b, t = k.shape[:2]
  s = c.k.shape[1]
  i = jnp.arange(t)[None, :]
  slot = jnp.where(i < n_valid[:, None], start[:, None] + i, s)  # s = out of range: dropped
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  put = lambda buf, new: buf.at[rows, slot].set(new, mode="drop")
  kk, vv = (jax.tree_util.tree_map(put, buf, _stored(buf, x)) for buf, x in ((c.k, k), (c.v, v)))
  return FullLayerCache(kk, vv)


def _stored(buf, x):
  """x as `buf` stores it (cast, or quantised with buf's bits); a QuantKV passes as is."""
  return x if kv_quant.is_quantized(x) else kv_quant.encode_like(buf, x)


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
  """Moves a chunk into sink slots and the ring. k, v [B, T, H, D] (or a QuantKV).

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

  kk, vv = (jax.tree_util.tree_map(take, buf, _stored(buf, x)) for buf, x in ((c.k, k), (c.v, v)))
  return StreamLayerCache(kk, vv, c.sink, c.recent)


# -- reordering helpers used by the model ---------------------------------------------

def split_heads(x, n_retrieval: int, axis: int):
  """Retrieval heads lead (weights were reordered), so the split is a static slice (of
  each buffer of a QuantKV: its scales and zeros share the head axis)."""
  cut = lambda lo, hi: jax.tree_util.tree_map(
      lambda a: jax.lax.slice_in_dim(a, lo, a.shape[axis] if hi is None else hi, axis=axis), x)
  return cut(0, n_retrieval), cut(n_retrieval, None)


# -- attention per cache kind (dispatch.attend routes by the cache's class) --------------

def _q_pos(start: jax.Array, t: int) -> jax.Array:
  return start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


def _write_op(backend, name: str, quant: bool):
  """The backend's decode op `name` that also writes the new token (`full_decode_write`,
  `duo_decode_write`: one launch fewer per buffer than a write before the attention), or
  None when it has none for this cache."""
  ops = dispatch.backend_ops(backend)
  fn = ops.get(name)
  return fn if fn is not None and (not quant or name in ops.get("kv_quant", ())) else None


def attend_full(c: FullLayerCache, q, k, v, start, n_valid, backend):
  """Retrieval heads: the chunk enters the cache, then attends everything up to itself."""
  write = _write_op(backend, "full_decode_write", kv_quant.is_quantized(c.k)) \
      if q.shape[1] == 1 else None
  if write is not None:
    out, kk, vv = write(q, c.k, c.v, start, n_valid, _stored(c.k, k), _stored(c.v, v))
    return out, FullLayerCache(kk, vv)
  c = write_full(c, k, v, start, n_valid)
  t = q.shape[1]
  out = dispatch.op(backend, "full_chunk", t == 1, kv_quant.is_quantized(c.k))(
      q, c.k, c.v, _q_pos(start, t), start + n_valid)
  return out, c


def attend_stream(c: StreamLayerCache, q, k, v, start, n_valid, backend):
  """Streaming heads: the op gets the pre-chunk slots and the chunk itself, so the mask is
  exact even for a chunk longer than the ring; then the chunk enters the ring."""
  t = q.shape[1]
  slot_pos, slot_valid = stream_slot_positions(start, c.sink, c.recent)
  quant = kv_quant.is_quantized(c.k)
  if quant:  # the chunk's keys are attended as the cache will hold them
    k, v = kv_quant.quantize(k, c.k.bits), kv_quant.quantize(v, c.v.bits)
  out = dispatch.op(backend, "streaming_chunk", t == 1, quant)(
      q, c.k, c.v, slot_pos, slot_valid, k, v, _q_pos(start, t), n_valid, c.sink, c.recent)
  return out, write_stream(c, k, v, start, n_valid)


def _attend_duo_fused(fused, c: DuoLayerCache, q, k, v, start, n_valid):
  n_r = c.n_retrieval
  if kv_quant.is_quantized(c.full.k):  # the new token as both parts will hold it, once
    k, v = kv_quant.quantize(k, c.full.k.bits), kv_quant.quantize(v, c.full.v.bits)
  (kr, ks), (vr, vs) = (split_heads(x, n_r, 2) for x in (k, v))
  fc = write_full(c.full, kr, vr, start, n_valid)
  sc = c.stream
  slot_pos, slot_valid = stream_slot_positions(start, sc.sink, sc.recent)
  out = fused(q, fc.k, fc.v, start[:, None], start + n_valid, sc.k, sc.v, slot_pos, slot_valid,
              k, v, n_valid, sc.sink, sc.recent)
  return out, DuoLayerCache(fc, write_stream(sc, ks, vs, start, n_valid))


def _attend_duo_write(write, c: DuoLayerCache, q, k, v, start, n_valid):
  sc = c.stream
  slot_pos, slot_valid = stream_slot_positions(start, sc.sink, sc.recent)
  out, fk, fv, sk, sv = write(q, c.full.k, c.full.v, start, n_valid, sc.k, sc.v, slot_pos,
                              slot_valid, _stored(c.full.k, k), _stored(c.full.v, v), sc.sink,
                              sc.recent)
  return out, DuoLayerCache(FullLayerCache(fk, fv), StreamLayerCache(sk, sv, sc.sink, sc.recent))


def attend_duo(c: DuoLayerCache, q, k, v, start, n_valid, backend):
  """Retrieval heads lead, so each part attends a static slice of the heads; a backend's
  fused `duo_decode_write` (or `duo_decode`, after an XLA write) does both in one launch
  when decoding a plain streaming part."""
  ops = dispatch.backend_ops(backend)
  fused = ops.get("duo_decode")
  quant = kv_quant.is_quantized(c.full.k)
  if q.shape[1] == 1 and type(c.stream) is StreamLayerCache:
    write = _write_op(backend, "duo_decode_write", quant)
    if write is not None:
      return _attend_duo_write(write, c, q, k, v, start, n_valid)
  if (fused is not None and q.shape[1] == 1 and type(c.stream) is StreamLayerCache
      and (not quant or "duo_decode" in ops.get("kv_quant", ()))):
    return _attend_duo_fused(fused, c, q, k, v, start, n_valid)
  n_r = c.n_retrieval
  (qr, qs), (kr, ks), (vr, vs) = (split_heads(x, n_r, 2) for x in (q, k, v))
  out_r, fc = dispatch.attend(c.full, qr, kr, vr, start, n_valid, backend)
  out_s, sc = dispatch.attend(c.stream, qs, ks, vs, start, n_valid, backend)
  return jnp.concatenate([out_r, out_s], axis=2), DuoLayerCache(fc, sc)


dispatch.register_cache_attention(FullLayerCache, attend_full)
dispatch.register_cache_attention(StreamLayerCache, attend_stream)
dispatch.register_cache_attention(DuoLayerCache, attend_duo)
