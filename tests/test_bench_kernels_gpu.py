"""infer/bench_kernels.py's raw-kernel tuning grid (`--variants`) on a GPU: every timed
variant returns a time and a bandwidth, on both layouts. The grid launches the kernel
through torch with the kernel's own argument list, which it once fell behind (the
quantised caches' scale and zero arguments), so a run on the device is what tests it."""

import pytest

import jax


def _why_skip():
  if jax.default_backend() != "gpu":
    return f"raw GPU kernel launches: no GPU here (JAX runs on {jax.default_backend()})"
  try:
    import jax_triton  # noqa: F401
    import torch
  except ImportError as e:
    return f"raw GPU kernel launches need jax-triton and torch: {e}"
  if not torch.cuda.is_available():
    return "raw GPU kernel launches: torch sees no CUDA device"
  return None


SKIP = _why_skip()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


def test_decode_variants_gpu():
  from infer import bench_kernels as bk
  rows, layout = bk.decode_variants(4096, h=2, g=4, d=128, grid=[(64, 4, 2, 264),
                                                                 (128, 8, 3, 528)])
  assert [r.get("error") for r in rows] == [None, None]
  for r in rows:
    assert r["us"] > 0 and r["GBps"] > 0 and r["splits"] >= 1
  assert set(layout) == {"BSHD", "BHSD"} and all(v["us"] > 0 for v in layout.values())
