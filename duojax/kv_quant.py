"""Quantised KV cache values: int8 and int4 codes with a scale and a zero point.

Asymmetric quantisation, one group per token per KV head (the head dim is the group, as
in the DuoAttention paper's INT4 KV with groups of 128 at head dim 128):

  scale = (max - min) / (2^bits - 1)      over the D values of one (token, head)
  code  = round((x - zero) / scale)       clipped to the code range
  x'    = code * scale + zero             what attention reads back

`zero` is stored as the value of code 0 (a float offset, not an integer zero point), so
dequantising is one multiply-add and |x - x'| <= scale / 2 holds for every element
(no clipping error at the ends of the range). Codes:
  int8  int8 codes in [-128, 127]: zero = min + 128 * scale  (stored [..., D] int8)
  int4  codes in [0, 15], two per byte  (stored [..., D/2] uint8)
int4 packs the two halves of the head dim, not neighbours: byte i holds element i in
its low nibble and element i + D/2 in its high nibble, so unpacking is a mask and a shift
giving the two contiguous halves of the head dim, with no interleave (the TPU kernels
concatenate them; a kernel may also split q . k into q[:D/2] . lo + q[D/2:] . hi).

Mixed: "k8v4" keeps keys in int8 and values in int4. Keys carry the outlier channels (a
few RoPE pairs many times the median, Qwen2.5's k bias), so one range per (token, head)
leaves int4 keys a few levels for the rest; values have no such channels. Measured on the
attention output of each layer (infer/kv_quant_error.py, Qwen2.5-Coder-0.5B at 2048 tokens):
int4 0.35 mean relative error, k8v4 0.10, int8 0.04, for 208 bytes per (token, head) at
D = 128 against 144 (int4) and 272 (int8).

Scales and zeros are float32 ([..., 1], so they carry the values' logical axes). Why not
fp16/bf16: a bf16 scale (8-bit mantissa) is off by up to 2^-9 relative, and code * scale
at code 255 then misses by up to half a step, doubling int8's error; fp16 is good enough
for the values but Mosaic TPU handles it poorly. fp32 costs 8 bytes per (token, head)
per k or v: 12.5% on top of int4 codes at D = 128 (6% more than fp16 would).

No model imports: the cache (duojax/cache.py) and the reference attention read this.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

KV_DTYPES = ("bf16", "fp32", "int8", "int4", "k8v4")  # what init_cache / --kv-dtype take
BITS = {"int8": (8, 8), "int4": (4, 4), "k8v4": (8, 4)}  # (key bits, value bits)
SCALE_DTYPE = jnp.float32


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scale", "zero"],
                   meta_fields=["bits"])
@dataclasses.dataclass
class QuantKV:
  """Quantised keys or values of shape [..., D] (a pytree: codes, scale, zero; bits static).

  codes [..., D] int8 (bits 8) or [..., D/2] uint8 (bits 4); scale, zero [..., 1] float32.
  Cache buffers are [B, S, H, *] (retrieval) or [B, W, H, *] (streaming).
  """
  codes: jax.Array
  scale: jax.Array
  zero: jax.Array
  bits: int

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical shape [..., D] of the values held."""
    *lead, dc = self.codes.shape
    return (*lead, dc * 2 if self.bits == 4 else dc)

  @property
  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in (self.codes, self.scale, self.zero))


def kv_bits_of(kv_dtype: str | None) -> tuple[int, int] | None:
  """(key bits, value bits): (8, 8) int8, (4, 4) int4, (8, 4) k8v4; None for an unquantised
  cache; a clear error otherwise."""
  if kv_dtype is None or kv_dtype in ("bf16", "fp32"):
    return None
  if kv_dtype not in BITS:
    raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
  return BITS[kv_dtype]


def is_quantized(x) -> bool:
  return isinstance(x, QuantKV)


def storage_shapes(shape, bits: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of each buffer holding values of logical `shape` [..., D]."""
  *lead, d = shape
  if bits == 4 and d % 2:
    raise ValueError(f"int4 KV packs two values per byte along the head dim; head_dim={d} is "
                     "odd: use kv_dtype int8")
  codes = ((*lead, d // 2), np.dtype(np.uint8)) if bits == 4 else ((*lead, d), np.dtype(np.int8))
  side = ((*lead, 1), np.dtype(SCALE_DTYPE))
  return {"codes": codes, "scale": side, "zero": side}


def empty(shape, bits: int) -> QuantKV:
  """An all-zero buffer (dequantises to 0) for values of logical `shape`."""
  s = storage_shapes(shape, bits)
  return QuantKV(*(jnp.zeros(*s[n]) for n in ("codes", "scale", "zero")), bits)


def nbytes(shape, bits: int) -> int:
  return sum(int(np.prod(sh)) * dt.itemsize for sh, dt in storage_shapes(shape, bits).values())


# -- quantise / dequantise ------------------------------------------------------------------

def pack_int4(codes: jax.Array) -> jax.Array:
  """[..., D] codes in [0, 15] -> [..., D/2] uint8: byte i = codes[i] | codes[i + D/2] << 4."""
  half = codes.shape[-1] // 2
  c = codes.astype(jnp.uint8)
  return c[..., :half] | (c[..., half:] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
  """[..., D/2] uint8 -> [..., D] int32 codes in [0, 15] (the inverse of pack_int4)."""
  p = packed.astype(jnp.int32)
  return jnp.concatenate([p & 15, (p >> 4) & 15], axis=-1)


def quantize(x: jax.Array, bits: int) -> QuantKV:
  """x [..., D] float -> its codes, scale and zero over the last axis (see the module doc).

  A constant group gets scale 0 and dequantises exactly to its value.
  """
  x = x.astype(jnp.float32)
  levels = (1 << bits) - 1
  lo = jnp.min(x, axis=-1, keepdims=True)
  hi = jnp.max(x, axis=-1, keepdims=True)
  scale = (hi - lo) / levels
  safe = jnp.where(scale > 0, scale, 1.0)
  code = jnp.clip(jnp.round((x - lo) / safe), 0, levels)  # 0 .. levels
  if bits == 8:
    # int8 storage: shift the codes by 128, and the zero with them (x' = code * scale + zero)
    return QuantKV((code - 128).astype(jnp.int8), scale, lo + 128 * scale, 8)
  if bits == 4:
    return QuantKV(pack_int4(code.astype(jnp.int32)), scale, lo, 4)
  raise ValueError(f"KV quantisation has 8 or 4 bits, not {bits}")


def codes_of(q: QuantKV) -> jax.Array:
  """The integer codes [..., D] (int32) of a QuantKV."""
  return unpack_int4(q.codes) if q.bits == 4 else q.codes.astype(jnp.int32)


def dequantize(q: QuantKV, dtype=jnp.float32) -> jax.Array:
  """[..., D] values code * scale + zero, computed in fp32, returned in `dtype`."""
  return (codes_of(q).astype(jnp.float32) * q.scale + q.zero).astype(dtype)


def as_dense(x, dtype) -> jax.Array:
  """A cache buffer as plain values: dequantised in `dtype` if quantised, else as it is."""
  return dequantize(x, dtype) if is_quantized(x) else x


def encode_like(buf, x: jax.Array):
  """New values x [..., D] in the storage of `buf`: cast for a plain buffer, quantised with
  buf's bits for a QuantKV (what a cache write stores)."""
  return quantize(x, buf.bits) if is_quantized(buf) else x.astype(buf.dtype)


def roundtrip(x: jax.Array, bits: int) -> jax.Array:
  """What a quantised cache gives back for x: dequantize(quantize(x)) in x's dtype."""
  return dequantize(quantize(x, bits), x.dtype)


def axes_like(x, value_axes: tuple, side_axes: tuple):
  """Logical axis names for a cache buffer: `value_axes` for a plain array; for a QuantKV
  the same structure with value_axes for its codes and side_axes for scale and zero
  (duojax/layout.py's CACHE_SCALE_AXES / WINDOW_SCALE_AXES)."""
  return QuantKV(value_axes, side_axes, side_axes, x.bits) if is_quantized(x) else value_axes
