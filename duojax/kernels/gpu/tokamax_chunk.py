"""Retrieval heads' prefill chunk through tokamax's Pallas Mosaic GPU flash attention.

On an H100 (infer/bench_kernels.py, 4096-token chunk, 32 query / 8 KV heads,
D = 128) tokamax's Mosaic GPU kernel ran at 590-643 TFLOP/s against 487-494 for
our Triton `full_chunk`, so when tokamax is installed the `gpu` backend routes the
retrieval heads' chunks here. Its public `dot_product_attention` takes one causal
offset for the whole batch; a ragged batch needs a per-row one, so this calls the
op with a `Mask(k_end=...)`: query t of row b sees keys [0, min(q_pos[b, t] + 1,
kv_len[b])), exactly `reference.full_chunk_attention`. That op lives in tokamax's
private modules, so anything unexpected (an import, a shape it rejects) falls back
to the Triton kernel, and `DUOJAX_TOKAMAX=0` turns the route off.
"""

from __future__ import annotations

import functools
import os
import warnings


@functools.lru_cache(maxsize=1)
def _op():
  """tokamax's Mosaic GPU attention op and its Mask type, or None."""
  if os.environ.get("DUOJAX_TOKAMAX", "1") == "0":
    return None
  try:
    from tokamax._src.ops.attention import base
    from tokamax._src.ops.attention import pallas_mosaic_gpu
    return pallas_mosaic_gpu.PallasMosaicGpuFlashAttention(), base.Mask
  except Exception:  # noqa: BLE001 - not installed, or another layout of its internals
    return None


def available() -> bool:
  return _op() is not None


def supports(q_shape, dtype) -> bool:
  """The shapes the route is tested on (tests/test_kernels_gpu.py): bf16 / fp16,
  D = 64 or 128, chunks of at least 64 tokens. Others take the Triton kernel."""
  import numpy as np
  _, t, _, _, d = q_shape
  return np.dtype(dtype).name in ("bfloat16", "float16") and d in (64, 128) and t >= 64


def full_chunk(q, k_cache, v_cache, q_pos, kv_len):
  """q [B, T, H, G, D]; k/v_cache [B, S, H, D]; q_pos [B, T]; kv_len [B] -> [B, T, H, G, D],
  or None when tokamax cannot take it (the caller then runs the Triton kernel)."""
  import jax.numpy as jnp
  found = _op()
  if found is None or not supports(q.shape, k_cache.dtype):
    return None
  op, mask_type = found
  b, t, h, g, d = q.shape
  k_end = jnp.minimum(q_pos.astype(jnp.int32) + 1, kv_len.astype(jnp.int32)[:, None])
  try:
    out = op(q.astype(k_cache.dtype).reshape(b, t, h * g, d), k_cache, v_cache.astype(k_cache.dtype),
             mask=mask_type(k_end=k_end[:, None, :]))
  except Exception as e:  # noqa: BLE001 - e.g. NotImplementedError for a shape
    warnings.warn(f"tokamax attention declined {q.shape}: {e!r:.200}; using the Triton kernel")
    return None
  return out.reshape(q.shape).astype(q.dtype)
