"""The Triton kernels on CPU: Triton's interpreter runs them on torch tensors against the
plain-jnp reference, plain and quantised (int8 / int4) caches, so CI checks the GPU
kernels' logic without a GPU (tests/triton_interpret_cases.py; compiled and in bf16 they
are checked by tests/test_kernels_gpu.py on a GPU). Skipped where triton is not installed.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TOL = 1e-4  # fp32: the interpreter has no bf16 products
TOL_F16 = 2e-3  # "f16c-" cases: fp16 products and an fp16 output (its rounding alone ~2.5e-4)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (pip install triton)")
def test_triton_kernels_interpret():
  # a process of its own: TRITON_INTERPRET must be set before the kernels are decorated
  env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, str(HERE / "triton_interpret_cases.py")], env=env,
                     capture_output=True, text=True, timeout=900, cwd=HERE.parent)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(r.stdout.strip().splitlines()[-1])
  assert len(res) >= 30 and sum(k.startswith("f16c-") for k in res) >= 10, res
  tol = lambda name: TOL_F16 if name.startswith("f16c-") else TOL
  bad = {k: v for k, v in res.items() if not (isinstance(v, float) and v < tol(k))}
  assert not bad, f"kernels off the reference (relative error, or the error raised): {bad}"
