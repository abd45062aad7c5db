"""One entry point for a layer's attention, whatever its cache holds.

`attend` writes a chunk's keys/values into the layer's cache and attends the
chunk's queries, choosing per part of the cache (full / streaming) an
implementation from the selected backend. The model calls only this, so a new
cache kind or kernel slots in here without the layer knowing.

Backends register ops with these signatures (see attention/reference.py):
  full_chunk(q, k_cache, v_cache, q_pos, kv_len)
  streaming_chunk(q, slot_k, slot_v, slot_pos, slot_valid, k, v, q_pos, n_valid, sink, recent)
and optionally `full_decode` / `streaming_decode` with the same signatures, used
when the chunk holds one token, and `duo_decode` (reference.duo_decode_attention),
a DuoAttention layer's retrieval and streaming heads in one launch: it replaces
the two decode ops and the concatenation of their outputs. A backend may omit
any op; the reference is used.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from duojax import cache as kvc
from duojax import compensation
from duojax.attention import reference

_BACKENDS: dict[str, dict[str, Callable]] = {
    "xla": {
        "full_chunk": reference.full_chunk_attention,
        "streaming_chunk": reference.streaming_chunk_attention,
        "dense_causal": lambda q, k, v, lengths: reference.dense_attention(q, k, v, lengths),
        "dense_streaming": lambda q, k, v, lengths, sink, recent: reference.dense_attention(
            q, k, v, lengths, jnp.ones((q.shape[2],), bool), sink, recent),
    }
}
# Backends whose module registers them on import; `auto` tries them in order.
_LAZY = {"gpu": "duojax.kernels.gpu", "tpu": "duojax.kernels.tpu",
         "tpu-interpret": "duojax.kernels.tpu"}


class BackendUnavailable(RuntimeError, ValueError):
  """A known backend that cannot run here (no such device, a missing package)."""


def register_backend(name: str, ops: dict[str, Callable]) -> None:
  _BACKENDS[name] = dict(ops)


def available_backends() -> list[str]:
  names = ["xla"]
  for name, module in _LAZY.items():
    try:
      _load(name)
      names.append(name)
    except BackendUnavailable:
      pass
  return names


def _load(name: str):
  why = ""
  if name not in _BACKENDS and name in _LAZY:
    import importlib
    try:
      module = importlib.import_module(_LAZY[name])  # registers itself
      why = f": {module.UNAVAILABLE[name]}" if name in getattr(module, "UNAVAILABLE", {}) else ""
    except (ImportError, RuntimeError) as e:
      why = f": {e}"
  if name not in _BACKENDS:
    raise BackendUnavailable(f"attention backend {name!r} is not available here{why}; "
                             "--backend auto picks the best one this machine has, xla runs "
                             "everywhere")
  return _BACKENDS[name]


def resolve_backend(name: str = "auto") -> str:
  """`auto` picks the kernel backend of the default device's platform, else xla."""
  if name != "auto":
    if name not in _BACKENDS and name not in _LAZY:
      raise ValueError(
          f"unknown attention backend {name!r}; choose from auto, xla, {', '.join(_LAZY)}")
    _load(name)
    return name
  platform = jax.default_backend()
  want = {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(platform)
  if want:
    try:
      _load(want)
      return want
    except BackendUnavailable:
      pass
  return "xla"


def _op(backend: str, name: str, decode: bool) -> Callable:
  ops = _load(backend)
  if decode and name.replace("chunk", "decode") in ops:
    return ops[name.replace("chunk", "decode")]
  return ops.get(name) or _BACKENDS["xla"][name]


def _attend_full(c: kvc.FullLayerCache, q, k, v, start, n_valid, backend):
  c = kvc.write_full(c, k, v, start, n_valid)
  t = q.shape[1]
  q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  out = _op(backend, "full_chunk", t == 1)(q, c.k, c.v, q_pos, start + n_valid)
  return out, c


def _attend_stream(c: kvc.StreamLayerCache, q, k, v, start, n_valid, backend):
  if isinstance(c, compensation.CompLayerCache):  # no kernel has it yet: the reference
    return compensation.attend(c, q, k, v, start, n_valid)
  t = q.shape[1]
  q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  slot_pos, slot_valid = kvc.stream_slot_positions(start, c.sink, c.recent)
  out = _op(backend, "streaming_chunk", t == 1)(
      q, c.k, c.v, slot_pos, slot_valid, k, v, q_pos, n_valid, c.sink, c.recent)
  return out, kvc.write_stream(c, k, v, start, n_valid)


def _attend_duo_fused(fused, c: kvc.DuoLayerCache, q, k, v, start, n_valid):
  n_r = c.n_retrieval
  (kr, ks), (vr, vs) = (kvc.split_heads(x, n_r, 2) for x in (k, v))
  fc = kvc.write_full(c.full, kr, vr, start, n_valid)
  sc = c.stream
  slot_pos, slot_valid = kvc.stream_slot_positions(start, sc.sink, sc.recent)
  out = fused(q, fc.k, fc.v, start[:, None], start + n_valid, sc.k, sc.v, slot_pos, slot_valid,
              k, v, n_valid, sc.sink, sc.recent)
  return out, kvc.DuoLayerCache(fc, kvc.write_stream(sc, ks, vs, start, n_valid))


def attend(layer_cache: kvc.LayerCache, q: jax.Array, k: jax.Array, v: jax.Array,
           start: jax.Array, n_valid: jax.Array, backend: str = "xla"):
  """q [B, T, Hkv, G, D], k/v [B, T, Hkv, D] (after RoPE, retrieval heads first);
  start [B] tokens already cached per row, n_valid [B] real tokens in the chunk.
  Returns (out [B, T, Hkv, G, D], updated layer cache)."""
  if isinstance(layer_cache, kvc.FullLayerCache):
    return _attend_full(layer_cache, q, k, v, start, n_valid, backend)
  if isinstance(layer_cache, (kvc.StreamLayerCache, compensation.CompLayerCache)):
    return _attend_stream(layer_cache, q, k, v, start, n_valid, backend)
  n_r = layer_cache.n_retrieval
  fused = _load(backend).get("duo_decode")
  if fused is not None and q.shape[1] == 1 and isinstance(layer_cache.stream,
                                                          kvc.StreamLayerCache):
    return _attend_duo_fused(fused, layer_cache, q, k, v, start, n_valid)
  (qr, qs), (kr, ks), (vr, vs) = (kvc.split_heads(x, n_r, 2) for x in (q, k, v))
  out_r, fc = _attend_full(layer_cache.full, qr, kr, vr, start, n_valid, backend)
  out_s, sc = _attend_stream(layer_cache.stream, qs, ks, vs, start, n_valid, backend)
  return jnp.concatenate([out_r, out_s], axis=2), kvc.DuoLayerCache(fc, sc)
