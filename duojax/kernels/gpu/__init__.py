"""GPU attention kernels (Triton, called from JAX through jax-triton).

The attention backend "gpu", whose op table `duojax.attention.dispatch` asks for
with `backend_ops("gpu")` when it is first used:
  full_chunk        retrieval heads, prefill chunk: causal flash attention over the
                    cache (prefill.py; through tokamax's Mosaic GPU kernel when
                    tokamax is installed, tokamax_chunk.py)
  streaming_chunk   streaming heads, prefill chunk: exact sink + window mask, visiting
                    only the key blocks inside it (prefill.py)
  full_decode       retrieval heads, one token: split-K flash-decoding, GQA packed,
                    reads each row only up to its length (decode.py)
  streaming_decode  streaming heads, one token: sink + ring + the new token (decode.py)
  duo_decode        a DuoAttention layer, one token: both of the above in one launch,
                    merged straight into the layer's output (decode.py)
  full_decode_write, duo_decode_write
                    full_decode / duo_decode with the new token's cache write in the same
                    launches (decode.py `decode_write`): no XLA write before them
  full_chunk_partial, full_decode_partial
                    the retrieval heads' ops returning the softmax state (m, l, acc)
                    instead of the output: context-parallel attention's per-device ops
                    (duojax/context_parallel.py)
Every op also reads a quantised cache (duojax.kv_quant: int8 or int4 codes with a scale
and zero per token per KV head), dequantising its tiles in registers, so an int4 cache
moves a quarter of bf16's bytes and nothing O(T) is materialised; the table lists them
under "kv_quant" for dispatch.
Gate training's whole-sequence ops need gradients, which jax-triton calls do not have:
  dense_causal      every head causal, through cuDNN's fused attention (dense.py; bf16 /
                    fp16 inputs, the XLA path otherwise)
and the streaming heads' `dense_streaming` stays on the blocked XLA path, which costs
O(T x (sink + recent)) and is cheap.

Importing this package queries no device and needs no triton: the ops and the
kernel modules load on first attribute access (`duojax.kernels.gpu.full_decode`,
`.decode`, ...), which needs triton; with TRITON_INTERPRET=1 (Triton's CPU
interpreter) the kernels can then be checked on torch CPU tensors through
`launch.Launch.torch`. `backend_ops` raises RuntimeError when JAX has no GPU
(checked first: that is the fix a user needs) and ImportError when jax-triton /
triton are missing, so `dispatch.resolve_backend("auto")` falls back to "xla".
"""

from __future__ import annotations

import importlib
import os

__all__ = ["full_chunk", "streaming_chunk", "full_decode", "streaming_decode", "duo_decode",
           "full_chunk_partial", "full_decode_partial", "full_decode_write", "duo_decode_write",
           "dense_causal", "OPS", "backend_ops"]

_OP_HOME = {"full_chunk": "prefill", "streaming_chunk": "prefill", "full_decode": "decode",
            "streaming_decode": "decode", "duo_decode": "decode",
            "full_chunk_partial": "prefill", "full_decode_partial": "decode",
            "full_decode_write": "decode", "duo_decode_write": "decode"}
_MODULES = ("decode", "prefill", "tokamax_chunk", "launch", "dense")


def _need_triton() -> None:
  try:
    import triton  # noqa: F401
  except ImportError as e:  # pragma: no cover - depends on the machine
    raise ImportError("the gpu attention backend needs triton (pip install 'duojax[gpu]')") from e


def _ops() -> dict:
  _need_triton()
  ops = {name: getattr(importlib.import_module(f"{__name__}.{mod}"), name)
         for name, mod in _OP_HOME.items()}
  ops["kv_quant"] = tuple(_OP_HOME)  # every kernel dequantises int8 / int4 caches itself
  # decode writes the new token inside the attention launches (decode.decode_write): 0.2-0.8
  # ms a token faster on an H100 when the cache holds more than the context
  # (infer/results/h100-2026-12-08/); DUOJAX_FUSED_WRITE=0 keeps XLA's write, for comparison
  if os.environ.get("DUOJAX_FUSED_WRITE", "1") == "0":
    ops.pop("full_decode_write")
    ops.pop("duo_decode_write")
  from duojax.kernels.gpu import dense  # cuDNN, no triton: always importable with JAX
  ops["dense_causal"] = dense.dense_causal
  ops["dense_supports"] = dense.supports  # which inputs dense_causal takes
  return ops


def __getattr__(name: str):
  if name in _OP_HOME:
    _need_triton()
    return getattr(importlib.import_module(f"{__name__}.{_OP_HOME[name]}"), name)
  if name == "dense_causal":
    from duojax.kernels.gpu import dense
    return dense.dense_causal
  if name == "OPS":
    return _ops()
  if name in _MODULES:
    if name not in ("launch", "dense"):
      _need_triton()
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def backend_ops(name: str = "gpu") -> dict:
  """The op table of backend "gpu" for dispatch, after checking this machine can run it."""
  if name != "gpu":
    raise ValueError(f"duojax.kernels.gpu has the backend 'gpu', not {name!r}")
  import jax
  platform = jax.default_backend()
  if platform != "gpu":  # say what is missing first: a GPU, not a package
    raise RuntimeError(
        f"the gpu attention backend needs an NVIDIA GPU, and JAX sees none (it runs on "
        f"{platform!r}); on a GPU machine install JAX for CUDA "
        f"(pip install 'jax[cuda12]') and 'duojax[gpu]'")
  ops = _ops()
  try:
    import jax_triton  # noqa: F401
  except ImportError as e:
    raise ImportError(
        "the gpu attention backend needs jax-triton (pip install 'duojax[gpu]')") from e
  return ops
