"""TPU attention kernels (Pallas Mosaic TPU and splash attention) for duojax.

Two attention backends, whose op tables `duojax.attention.dispatch` asks for with
`backend_ops(name)` when one is first used (importing this module queries no device):
  "tpu"            the compiled kernels; only when `jax.default_backend() == "tpu"`, so that
                   `resolve_backend("auto")` picks it on a TPU and nowhere else
  "tpu-interpret"  the same kernels in Pallas' TPU interpret mode: runs on CPU (slowly),
                   for tests and for checking a model end to end without a TPU
The ops are also importable directly, each taking `interpret=`:
  full_chunk, streaming_chunk    prefill chunks (chunk_attention.py)
  full_decode, streaming_decode  one token per row, ragged lengths (decode_attention.py)
  dense_causal, dense_streaming  whole sequences with gradients, via splash (splash_dense.py)
The chunk and decode ops take `return_partial=True` (softmax state (m, l, acc) instead of
the output); the op table names those variants `*_partial` (full_chunk_partial, ...), the
per-device ops of context-parallel attention (duojax/context_parallel.py).
"""

from __future__ import annotations

import functools
import re

import jax

from duojax.kernels.tpu.chunk_attention import full_chunk, streaming_chunk
from duojax.kernels.tpu.decode_attention import full_decode, streaming_decode
from duojax.kernels.tpu.splash_dense import dense_causal, dense_streaming

__all__ = ["full_chunk", "streaming_chunk", "full_decode", "streaming_decode", "dense_causal",
           "dense_streaming", "ops", "backend_ops"]

_OPS = {"full_chunk": full_chunk, "streaming_chunk": streaming_chunk, "full_decode": full_decode,
        "streaming_decode": streaming_decode, "dense_causal": dense_causal,
        "dense_streaming": dense_streaming}


_PARTIAL_OPS = ("full_chunk", "streaming_chunk", "full_decode", "streaming_decode")


def ops(interpret: bool = False) -> dict:
  """The backend's op table, in dispatch's names and signatures (plus `*_partial`)."""
  table = {name: functools.partial(fn, interpret=interpret) for name, fn in _OPS.items()}
  table.update({f"{name}_partial": functools.partial(_OPS[name], interpret=interpret,
                                                     return_partial=True)
                for name in _PARTIAL_OPS})
  # these also read quantised caches (int8 / int4 codes + scales, dequantised in the kernel)
  table["kv_quant"] = ("full_chunk", "streaming_chunk", "full_decode", "streaming_decode")
  return table


def chip_supported(device_kind: str) -> bool:
  """TPU v2 and v3 are out: Mosaic rejects the kernels' bf16 matmul operands there (JAX's
  own splash attention too), and in fp32 the retrieval-head kernels outgrow their 16 MiB
  of VMEM (checked by compiling ahead of time with libtpu)."""
  return re.match(r"TPU v[23]\b", device_kind) is None


def backend_ops(name: str) -> dict:
  """The op table of backend `name` ("tpu" or "tpu-interpret") for dispatch.

  Raises RuntimeError naming why when "tpu" cannot run here (no TPU, or too old a chip).
  """
  if name == "tpu-interpret":
    return ops(interpret=True)
  if name != "tpu":
    raise ValueError(f"duojax.kernels.tpu has backends 'tpu' and 'tpu-interpret', not {name!r}")
  platform = jax.default_backend()
  if platform != "tpu":
    raise RuntimeError(f"JAX runs on {platform!r}, not a TPU")
  kind = jax.devices()[0].device_kind
  if not chip_supported(kind):
    raise RuntimeError(f"the Pallas TPU kernels need TPU v4 or later, this is {kind}")
  return ops()
