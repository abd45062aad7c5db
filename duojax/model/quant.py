"""Weight-only quantisation of the projection weights, through qwix.

Decode is bound by the bytes it reads: at batch 1 every step reads all the weights once,
so int8 weights halve that share of the step against bf16. The projections (q/k/v/o,
gate/up/down, an untied lm_head) become qwix QArrays: int8 values plus one scale per
output channel. The matmuls take the int8 codes into the product and scale its output
(`einsum`); activations stay in the model's
dtype (weight-only: no activation calibration, no accuracy cliff from outlier activations).
Scales are symmetric absmax / 127.5 (qwix's bound: qmax + 0.5), values rounded to nearest
and clipped to +-127.

Not offered: int4 weights. qwix makes them (two values a byte, per-group scales) and tiny
models run, but with the embedded SmolLM2 the AOT-compiled decode step on CPU (JAX 0.10)
asks for a packed int4 argument layout that the arrays do not have, and refuses them.

Why qwix: it is the JAX quantisation library that works on plain arrays inside Flax NNX
modules (a QArray is a pytree, so it lives in an nnx.Param, flows through nnx.split /
merge and jit like any weight, and shards by its leaves). Its quantize makes the codes and
scales; the product is ours (see `einsum`) because qwix.einsum's weight-only path scales
the weight before the dot. AQT targets Linen/Pax layers and its own
training-time injection; weight-only PTQ needs none of that.

Left in the model dtype: the embedding table (a gather reads only B rows of it per step,
and a tied lm_head shares it), norms, biases, and the DuoAttention gates.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from duojax.layout import LAYER_AXES, TOP_AXES

WEIGHT_DTYPES = ("bf16", "int8")

# The contracted (input) axes of each projection, by logical name; every other axis gets
# its own scales, so the output of a channel is its integer dot product times one scale.
CONTRACTED = {
    "wq": ("embed",), "wk": ("embed",), "wv": ("embed",),
    "wo": ("kv_heads", "q_group", "head_dim"),
    "w_gate": ("embed",), "w_up": ("embed",), "w_down": ("mlp",),
    # packed for serving (model/pack.py): a scale per (kv_head, slot, d) and per (gate/up,
    # f), the same values the unpacked weights' per-channel scales take
    "wqkv": ("embed",), "w_gate_up": ("embed",),
    "lm_head": ("embed",)}


def is_quantized(w: Any) -> bool:
  """A qwix QArray (checked without importing qwix: bf16 models never need it)."""
  return hasattr(w, "qvalue") and hasattr(w, "scale")


def einsum(spec: str, x: jax.Array, w, **kw) -> jax.Array:
  """jnp.einsum, or for a quantised weight the integer product scaled on its output.

  The weight's scales are per output channel (every axis of w that is not contracted), so
  x . (q s) = (x . q) s: the int8 codes go into the product as they are (converted to x's
  dtype, exact for |q| <= 127) and the scales multiply the output. XLA fuses such a
  convert into its GEMM kernel, so a step reads the int8 bytes only; qwix.einsum's
  weight-only path multiplies the scales into the weight first, which XLA wrote out in
  bf16 every decode step (3x the bytes of the int8 weight: measured 15.9 ms a token at 32K
  against 5.7 with bf16 weights, infer/results/h200-2026-12-03/).
  """
  if not is_quantized(w):
    return jnp.einsum(spec, x, w, **kw)
  if getattr(w, "zero_point", None) is not None:
    raise ValueError("asymmetric weights are not built; quantize_params makes symmetric ones")
  ins, out = spec.replace(" ", "").split("->")
  _, ws = ins.split(",")
  out_dtype = kw.pop("preferred_element_type", None) or x.dtype
  y = jnp.einsum(spec, x, w.qvalue.astype(x.dtype), preferred_element_type=jnp.float32, **kw)
  # the scale keeps w's rank with size 1 on contracted axes: keep the output's axes, in
  # the output's order, and broadcast over the rest (batch, tokens; a leading "..." of the
  # output broadcasts from the right)
  if "..." in out and not out.startswith("..."):
    raise ValueError(f"{spec}: an ellipsis is supported at the start of the output only")
  out = out.replace("...", "")
  kept = [i for i, c in enumerate(ws) if c in out]
  if any(w.scale.shape[i] != 1 for i, c in enumerate(ws) if c not in out):
    raise ValueError(f"{spec}: the weight's scales must be per output channel")
  sc = w.scale.reshape([w.scale.shape[i] for i in kept])
  letters = [ws[i] for i in kept]
  order = sorted(range(len(letters)), key=lambda j: out.index(letters[j]))
  sc = jnp.transpose(sc, order)
  shape = [sc.shape[[letters[j] for j in order].index(c)] if c in letters else 1 for c in out]
  return (y * sc.reshape(shape).astype(jnp.float32)).astype(out_dtype)


def _qwix():
  try:
    import qwix
  except ImportError as e:
    raise ImportError("int8/int4 weights need the qwix package: pip install qwix") from e
  return qwix


def _quantize_weight(w: jax.Array, axes: tuple[str, ...], name: str, dtype: str):
  """One weight (logical axes `axes`) -> QArray with a scale per output channel."""
  qwix = _qwix()
  channel = tuple(i for i, a in enumerate(axes) if a not in CONTRACTED[name])
  return qwix.quantize(w, jnp.int8, channelwise_axes=channel)


def quantize_params(params: dict, dtype: str = "int8") -> dict:
  """The plain params dict (duojax/model/llama.py) with its projections as QArrays.

  `dtype`: one of WEIGHT_DTYPES; "bf16" returns params as they are (in the checkpoint's
  dtype). The scales keep each weight's dtype, so a bf16 model computes in bf16.
  """
  if dtype not in WEIGHT_DTYPES:
    raise ValueError(f"weights dtype {dtype!r}: choose one of {', '.join(WEIGHT_DTYPES)}")
  if dtype == "bf16":
    return params
  if any(is_quantized(w) for w in jax.tree.leaves(params, is_leaf=is_quantized)):
    raise ValueError("these weights are quantised already; load the checkpoint again")
  out = dict(params)
  # one compiled program per weight shape instead of a dozen eager ops per weight
  quantize_weight = jax.jit(_quantize_weight, static_argnums=(1, 2, 3))
  out["layers"] = [{k: (quantize_weight(v, LAYER_AXES[k], k, dtype) if k in CONTRACTED else v)
                    for k, v in lp.items()} for lp in params["layers"]]
  if out.get("lm_head") is not None:
    out["lm_head"] = quantize_weight(params["lm_head"], TOP_AXES["lm_head"], "lm_head", dtype)
  return out


def weight_bytes(params: dict) -> int:
  """Bytes the weights occupy, scales included."""
  total = 0
  for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
    if is_quantized(leaf):
      total += leaf.qvalue.size * leaf.qvalue.dtype.itemsize
      total += leaf.scale.size * leaf.scale.dtype.itemsize
    else:
      total += leaf.size * leaf.dtype.itemsize
  return total
