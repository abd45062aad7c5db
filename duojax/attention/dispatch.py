"""One entry point for a layer's attention, whatever its cache holds.

`attend` writes a chunk's keys/values into the layer's cache and attends the
chunk's queries. It knows no cache class: each cache kind brings its attention
by `register_cache_attention(kind, fn)` where the kind is defined (duojax/cache.py
for the full / streaming / DuoAttention parts, duojax/compensation.py for
RazorAttention's compensated streaming part). An instance can only exist once
its class was defined, so the table is complete for every cache there is. The
model calls only `attend`, so a new cache kind or kernel slots in without the
layer knowing.

Backends supply ops with these signatures (see attention/reference.py):
  full_chunk(q, k_cache, v_cache, q_pos, kv_len)
  streaming_chunk(q, slot_k, slot_v, slot_pos, slot_valid, k, v, q_pos, n_valid, sink, recent)
and optionally `full_decode` / `streaming_decode` with the same signatures, used
when the chunk holds one token, and `duo_decode` (reference.duo_decode_attention),
a DuoAttention layer's retrieval and streaming heads in one launch: it replaces
the two decode ops and the concatenation of their outputs. A backend may omit
any op; the reference is used.

Quantised caches (duojax.kv_quant): the cache arguments (k_cache, v_cache, slot_k,
slot_v) and the streaming ops' chunk k, v are then `kv_quant.QuantKV` pytrees (codes,
scale, zero; `bits` static). A backend's table lists under "kv_quant" the op names
that read them (dequantising inside the kernel); for any other op the reference runs,
which dequantises first.

Kernel backends live in duojax/kernels/<name>/ and are loaded on first use: the
package's `backend_ops(name)` checks the device and packages (importing a kernel
package queries no device) and returns the op table or raises with the fix.
"""

from __future__ import annotations

import importlib
from typing import Callable

import jax
import jax.numpy as jnp

from duojax.attention import reference

_BACKENDS: dict[str, dict[str, Callable]] = {
    "xla": {
        "full_chunk": reference.full_chunk_attention,
        "streaming_chunk": reference.streaming_chunk_attention,
        "dense_causal": lambda q, k, v, lengths: reference.dense_attention(q, k, v, lengths),
        "dense_streaming": lambda q, k, v, lengths, sink, recent: reference.dense_attention(
            q, k, v, lengths, jnp.ones((q.shape[2],), bool), sink, recent),
        "kv_quant": ("full_chunk", "streaming_chunk"),
    }
}
# Kernel backends and the package that builds each; `auto` picks by platform.
_LAZY = {"gpu": "duojax.kernels.gpu", "tpu": "duojax.kernels.tpu",
         "tpu-interpret": "duojax.kernels.tpu"}
_UNAVAILABLE: dict[str, str] = {}  # why a lazy backend failed to load (asked once)

# attention per cache kind: fn(layer_cache, q, k, v, start, n_valid, backend) -> (out, cache)
_CACHE_ATTENTION: dict[type, Callable] = {}


class BackendUnavailable(RuntimeError, ValueError):
  """A known backend that cannot run here (no such device, a missing package)."""


def register_backend(name: str, ops: dict[str, Callable]) -> None:
  """Adds (or replaces) a backend's op table; ops missing from it fall back to xla."""
  _BACKENDS[name] = dict(ops)
  _UNAVAILABLE.pop(name, None)


def backend_ops(name: str) -> dict[str, Callable]:
  """The op table of backend `name`, loading a kernel backend on first use.

  Raises BackendUnavailable (naming why and what to do) for a known backend this
  machine cannot run, ValueError for an unknown name. The table is the registry's
  own: copy it before changing it (or register a new backend).
  """
  if name in _BACKENDS:
    return _BACKENDS[name]
  if name not in _LAZY:
    raise ValueError(f"unknown attention backend {name!r}; choose from auto, xla, "
                     f"{', '.join(sorted(set(_BACKENDS) - {'xla'} | set(_LAZY)))}")
  if name not in _UNAVAILABLE:
    try:
      register_backend(name, importlib.import_module(_LAZY[name]).backend_ops(name))
    except (ImportError, RuntimeError) as e:
      _UNAVAILABLE[name] = str(e)
  if name not in _BACKENDS:
    raise BackendUnavailable(f"attention backend {name!r} is not available here: "
                             f"{_UNAVAILABLE[name]}; --backend auto picks the best one this "
                             "machine has, xla runs everywhere")
  return _BACKENDS[name]


def available_backends() -> list[str]:
  names = ["xla"]
  for name in _LAZY:
    try:
      backend_ops(name)
      names.append(name)
    except BackendUnavailable:
      pass
  return names


def resolve_backend(name: str = "auto") -> str:
  """`auto` picks the kernel backend of the default device's platform, else xla."""
  if name != "auto":
    backend_ops(name)
    return name
  platform = jax.default_backend()
  want = {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(platform)
  if want:
    try:
      backend_ops(want)
      return want
    except BackendUnavailable:
      pass
  return "xla"


def op(backend: str, name: str, decode: bool = False, quantized: bool = False) -> Callable:
  """Backend op `name` ("full_chunk", "streaming_chunk"); with decode=True its one-token
  variant ("full_decode", ...) when the backend has one. Falls back to the xla reference.
  quantized: the cache holds kv_quant.QuantKV buffers; only ops the backend lists under
  "kv_quant" take them."""
  ops = backend_ops(backend)
  if quantized:
    ops = {n: f for n, f in ops.items() if n in ops.get("kv_quant", ())}
  if decode and name.replace("chunk", "decode") in ops:
    return ops[name.replace("chunk", "decode")]
  return ops.get(name) or _BACKENDS["xla"][name]


def register_cache_attention(kind: type, fn: Callable) -> None:
  """Makes `attend` route caches of class `kind` to
  fn(layer_cache, q, k, v, start, n_valid, backend) -> (out, new layer cache)."""
  _CACHE_ATTENTION[kind] = fn


def attend(layer_cache, q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array,
           n_valid: jax.Array, backend: str = "xla"):
  """q [B, T, Hkv, G, D], k/v [B, T, Hkv, D] (after RoPE, retrieval heads first);
  start [B] tokens already cached per row, n_valid [B] real tokens in the chunk.
  Returns (out [B, T, Hkv, G, D], updated layer cache).

  backend: a name, or a hashable object with an `attend(layer_cache, q, k, v, start,
  n_valid)` method that takes over the whole layer (a mesh-aware backend such as
  `context_parallel.ContextParallel`); it rides through jit as a static argument,
  so the model and this module need not know meshes."""
  if not isinstance(backend, str):
    return backend.attend(layer_cache, q, k, v, start, n_valid)
  fn = _CACHE_ATTENTION.get(type(layer_cache))
  if fn is None:
    raise TypeError(f"no attention is registered for cache kind {type(layer_cache).__name__}; "
                    "register one with duojax.attention.dispatch.register_cache_attention "
                    "where the kind is defined")
  return fn(layer_cache, q, k, v, start, n_valid, backend)
