"""Pure jnp building blocks of the Llama-family decoder (the modules' __call__s use them).

A layer's weights `lp` is any mapping with the names of the params layout (see
duojax/model/llama.py): a per-layer dict of the exchange format, or the dict an
`Attention` / `MLP` module hands out; q/k/v and gate/up may be packed for serving
(duojax/model/pack.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from duojax.config import ModelConfig
from duojax.model import quant  # weights may be qwix QArrays (int8/int4 weight-only)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * w.astype(jnp.float32)).astype(x.dtype)


@functools.lru_cache(maxsize=64)
def _inv_freq(config: ModelConfig) -> np.ndarray:
  d = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  rs = config.rope_scaling
  if rs.kind == "llama3":
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    wl = 2 * math.pi / inv
    smooth = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    scaled = np.where(wl > low_wl, inv / rs.factor, inv)
    mid = (wl <= low_wl) & (wl >= high_wl)
    inv = np.where(mid, (1 - smooth) * inv / rs.factor + smooth * inv, scaled)
  out = inv.astype(np.float32)
  out.flags.writeable = False  # shared by every caller through the cache
  return out


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """[D/2] float32 inverse frequencies, with Llama 3.1 scaling when configured."""
  return _inv_freq(config)


def apply_rope(x: jax.Array, pos: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """x [B, T, ..., D] rotated at positions pos [B, T] (HF's rotate-half layout)."""
  ang = pos.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  ang = ang.reshape(ang.shape[:2] + (1,) * (x.ndim - 3) + ang.shape[-1:])
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _project_qkv(lp, h: jax.Array, config: ModelConfig):
  """h [B, T, E] -> q [B, T, Hkv, G, D], k, v [B, T, Hkv, D], biases added."""
  if "wqkv" in lp:  # packed (model/pack.py): one product reads q, k and v at once
    # s: a KV head's G + 2 slots (its query heads, then its key, then its value)
    x = quant.einsum("bte,ehsd->bthsd", h, lp["wqkv"])
    if config.attention_bias:
      x = x + lp["bqkv"]
    g = config.group_size
    return x[..., :g, :], x[..., g, :], x[..., g + 1, :]
  q = quant.einsum("bte,ehgd->bthgd", h, lp["wq"])
  k = quant.einsum("bte,ehd->bthd", h, lp["wk"])
  v = quant.einsum("bte,ehd->bthd", h, lp["wv"])
  if config.attention_bias:
    q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
  return q, k, v


def qkv(lp, h: jax.Array, config: ModelConfig, pos: jax.Array):
  """h [B, T, E] -> q [B, T, Hkv, G, D], k, v [B, T, Hkv, D] with RoPE applied.
  lp holds wq/wk/wv (bq/bk/bv) or their packed wqkv (bqkv)."""
  q, k, v = _project_qkv(lp, h, config)
  if config.qk_norm:  # Qwen3 normalises each head's q and k over D, before RoPE
    q = rms_norm(q, lp["q_norm"], config.rms_norm_eps)
    k = rms_norm(k, lp["k_norm"], config.rms_norm_eps)
  inv = rope_inv_freq(config)
  return apply_rope(q, pos, inv), apply_rope(k, pos, inv), v


def out_proj(o: jax.Array, wo: jax.Array) -> jax.Array:
  """o [B, T, Hkv, G, D] -> [B, T, E]."""
  return quant.einsum("bthgd,hgde->bte", o, wo)


def swiglu(lp, h: jax.Array) -> jax.Array:
  """h [B, T, E] (already normalised) -> [B, T, E]; lp holds w_gate and w_up or their
  packed w_gate_up, and w_down."""
  if "w_gate_up" in lp:  # packed (model/pack.py): one product reads both
    gu = quant.einsum("bte,esf->btsf", h, lp["w_gate_up"])  # s: gate, up
    g, u = gu[..., 0, :], gu[..., 1, :]
  else:
    g = quant.einsum("bte,ef->btf", h, lp["w_gate"])
    u = quant.einsum("bte,ef->btf", h, lp["w_up"])
  return quant.einsum("btf,fe->bte", jax.nn.silu(g) * u, lp["w_down"])


def mlp(lp, x: jax.Array, config: ModelConfig) -> jax.Array:
  """The MLP sub-block's residual update for x [B, T, E] (mlp_norm, then SwiGLU)."""
  return swiglu(lp, rms_norm(x, lp["mlp_norm"], config.rms_norm_eps))


def lm_logits(hidden: jax.Array, lm_head: jax.Array | None, embed: jax.Array) -> jax.Array:
  """hidden [..., E] (after the final norm) -> fp32 logits [..., V]; tied when lm_head is None."""
  if lm_head is not None:
    return quant.einsum("...e,ev->...v", hidden, lm_head, preferred_element_type=jnp.float32)
  return jnp.einsum("...e,ve->...v", hidden, embed, preferred_element_type=jnp.float32)
