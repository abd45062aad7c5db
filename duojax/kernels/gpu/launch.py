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
  # (input index, output index) pairs updated in place (jax-triton's input_output_aliases;
  # `torch` passes those inputs as the outputs)
  aliases: tuple[tuple[int, int], ...] = ()

  def jax(self, *arrays):
    import jax
    import jax_triton as jt
    import jax.numpy as jnp
    outs = [jax.ShapeDtypeStruct(s, jnp.dtype(d)) for s, d in self.out_shapes]
    res = jt.triton_call(*arrays, kernel=self.kernel, out_shape=outs, grid=self.grid,
                         num_warps=self.num_warps, num_stages=self.num_stages,
                         input_output_aliases=dict(self.aliases), **self.consts)
    return tuple(res) if isinstance(res, (list, tuple)) else (res,)

  def torch(self, *tensors, outs=None):
    import torch
    dev = tensors[0].device
    if outs is None:
      alias = {o: i for i, o in self.aliases}
      outs = [tensors[alias[j]] if j in alias else torch.empty(s, dtype=torch_dtype(d), device=dev)
              for j, (s, d) in enumerate(self.out_shapes)]
    self.kernel[self.grid](*tensors, *outs, num_warps=self.num_warps,
                           num_stages=self.num_stages, **self.consts)
    return tuple(outs)


def patch_interpreter_scalars():
  """Triton 3.6's interpreter turns a scalar into a shape-(1,) array and `int()` of that is an
  error under numpy >= 2.? (`range(lo, hi)` with a loaded bound fails); read element 0.
  For CPU runs through TRITON_INTERPRET=1 only (tests, benchmark smoke checks)."""
  import numpy as np
  from triton.runtime import interpreter as ti
  orig = ti._patch_lang_tensor

  def patched(tensor, scope):
    orig(tensor, scope)
    scope.set_attr(tensor, "__index__",
                   lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
  ti._patch_lang_tensor = patched


def torch_dtype(d):
  import torch
  name = d if isinstance(d, str) else np.dtype(d).name
  return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "int32": torch.int32, "int64": torch.int64, "bool": torch.bool, "int8": torch.int8,
          "uint8": torch.uint8}[name]


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


def kv_bits(x) -> int:
  """8 / 4 for a quantised cache buffer (duojax.kv_quant.QuantKV, known here by its fields:
  kernels import nothing above them), 0 for plain values."""
  return int(getattr(x, "bits", 0) or 0)


def kv_parts(x, dtype=None) -> tuple:
  """A cache buffer as the three kernel arguments (values or codes, scale, zero). A plain
  array (cast to `dtype` when given) stands in for its own scale and zero, which a kernel
  compiled with BITS = 0 never reads."""
  if kv_bits(x):
    return x.codes, x.scale, x.zero
  x = x if dtype is None else x.astype(dtype)
  return x, x, x


def kv_strides(shape, bits: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Element strides of a cache buffer of logical shape [..., D] as stored: its values or
  codes (int4: D/2 bytes a row) and its [..., 1] scales / zeros (zeros when plain)."""
  *lead, d = (int(n) for n in shape)
  codes = strides((*lead, d // 2 if bits == 4 else d))
  side = strides((*lead, 1)) if bits else (0,) * len(codes)
  return codes, side
