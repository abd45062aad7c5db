"""One description of a Triton launch, run through jax-triton or (benchmarks, CPU
interpreter checks) straight on torch tensors.

A kernel's wrapper builds a `Launch` from static shapes only: the grid, the
compile-time constants (strides are constants: shapes are static under jit, so a
kernel is specialised per shape) and the outputs. `Launch.jax(*arrays)` is what
the attention backend calls; `Launch.torch(*tensors)` launches the very same
kernel with the same constants, so `infer/bench_kernels.py` can time the kernel
alone with CUDA events, and the Triton interpreter can check it on a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Launch:
  kernel: Callable  # a @triton.jit function: (inputs..., outputs..., constexprs...)
  grid: tuple[int, ...]
  out_shapes: tuple[tuple[tuple[int, ...], Any], ...]  # ((shape, numpy-like dtype), ...)
  consts: dict
  num_warps: int = 4
  num_stages: int = 2

  def jax(self, *arrays):
    import jax
    import jax_triton as jt
    import jax.numpy as jnp
    outs = [jax.ShapeDtypeStruct(s, jnp.dtype(d)) for s, d in self.out_shapes]
    res = jt.triton_call(*arrays, kernel=self.kernel, out_shape=outs, grid=self.grid,
                         num_warps=self.num_warps, num_stages=self.num_stages, **self.consts)
    return tuple(res) if isinstance(res, (list, tuple)) else (res,)

  def torch(self, *tensors, outs=None):
    import torch
    dev = tensors[0].device
    if outs is None:
      outs = [torch.empty(s, dtype=torch_dtype(d), device=dev) for s, d in self.out_shapes]
    self.kernel[self.grid](*tensors, *outs, num_warps=self.num_warps,
                           num_stages=self.num_stages, **self.consts)
    return tuple(outs)


def torch_dtype(d):
  import torch
  name = d if isinstance(d, str) else np.dtype(d).name
  return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}[name]


def dtype_name(x) -> str:
  """A dtype's numpy name ("bfloat16", "float32"): the form `Launch.out_shapes` takes."""
  return np.dtype(x).name


def next_pow2(n: int) -> int:
  return 1 << max(0, int(n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def strides(shape) -> tuple[int, ...]:
  """Element strides of a row-major (contiguous) array."""
  out, acc = [], 1
  for s in reversed(tuple(shape)):
    out.append(acc)
    acc *= int(s)
  return tuple(reversed(out))
