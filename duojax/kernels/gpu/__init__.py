"""GPU attention kernels (Triton, called from JAX through jax-triton).

Importing this module registers the attention backend "gpu" with
`duojax.attention.dispatch`:
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
Gate training's whole-sequence ops (`dense_causal`, `dense_streaming`) need
gradients, which jax-triton calls do not have: they stay on the XLA reference.

It raises RuntimeError when JAX has no GPU (checked first: that is the fix a user
needs) and ImportError when jax-triton / triton are missing, so `dispatch.resolve_backend("auto")` falls back to "xla". With
TRITON_INTERPRET=1 (Triton's CPU interpreter) it imports without registering, so
the kernels can be checked on torch CPU tensors through `launch.Launch.torch`.
"""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET") != "1":
  import jax
  if jax.default_backend() != "gpu":  # say what is missing first: a GPU, not a package
    raise RuntimeError(
        f"the gpu attention backend needs an NVIDIA GPU, and JAX sees none (it runs on "
        f"{jax.default_backend()!r}); on a GPU machine install JAX for CUDA "
        f"(pip install 'jax[cuda12]') and 'duojax[gpu]')")

try:
  import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the machine
  raise ImportError("the gpu attention backend needs triton (pip install 'duojax[gpu]')") from e

from duojax.kernels.gpu import decode, prefill  # noqa: E402
from duojax.kernels.gpu.decode import duo_decode, full_decode, streaming_decode  # noqa: E402
from duojax.kernels.gpu.prefill import full_chunk, streaming_chunk  # noqa: E402

__all__ = ["full_chunk", "streaming_chunk", "full_decode", "streaming_decode", "duo_decode",
           "OPS"]

OPS = {"full_chunk": full_chunk, "streaming_chunk": streaming_chunk,
       "full_decode": full_decode, "streaming_decode": streaming_decode, "duo_decode": duo_decode}


def _register() -> None:
  import jax
  try:
    import jax_triton  # noqa: F401
  except ImportError as e:
    raise ImportError(
        "the gpu attention backend needs jax-triton (pip install 'duojax[gpu]')") from e
  if jax.default_backend() != "gpu":
    raise RuntimeError(f"the gpu attention backend needs a GPU; JAX runs on "
                       f"{jax.default_backend()!r}")
  from duojax.attention import dispatch
  dispatch.register_backend("gpu", OPS)


if os.environ.get("TRITON_INTERPRET") != "1":
  _register()
