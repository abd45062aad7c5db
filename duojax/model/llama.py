"""The Llama-family decoder as pure functions over a params pytree.

Params (plain dicts, so orbax stores them as they are):
  embed [V, E]; final_norm [E]; lm_head [E, V] (absent when tied)
  layers: list of per-layer dicts
    attn_norm [E]; wq [E, Hkv, G, D]; wk, wv [E, Hkv, D]; wo [Hkv, G, D, E]
    bq [Hkv, G, D], bk, bv [Hkv, D] (only with attention_bias: Qwen2)
    q_norm, k_norm [D] (only with qk_norm: Qwen3; shared by all heads, so head
    reordering leaves them alone)
    mlp_norm [E]; w_gate, w_up [E, F]; w_down [F, E]
Query heads are grouped by KV head (HF's head h -> KV head h // G, slot h % G),
so reordering KV heads for DuoAttention permutes one axis of every tensor.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from duojax.attention import dispatch
from duojax.cache import KVCache
from duojax.config import ModelConfig

Params = dict


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """[D/2] float32 inverse frequencies, with Llama 3.1 scaling when configured."""
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
  return inv.astype(np.float32)


def apply_rope(x: jax.Array, pos: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """x [B, T, ..., D] rotated at positions pos [B, T] (HF's rotate-half layout)."""
  ang = pos.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  ang = ang.reshape(ang.shape[:2] + (1,) * (x.ndim - 3) + ang.shape[-1:])
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def qkv(lp: dict, h: jax.Array, config: ModelConfig, pos: jax.Array):
  """h [B, T, E] -> q [B, T, Hkv, G, D], k, v [B, T, Hkv, D] with RoPE applied."""
  q = jnp.einsum("bte,ehgd->bthgd", h, lp["wq"])
  k = jnp.einsum("bte,ehd->bthd", h, lp["wk"])
  v = jnp.einsum("bte,ehd->bthd", h, lp["wv"])
  if config.attention_bias:
    q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
  if config.qk_norm:  # Qwen3 normalises each head's q and k over D, before RoPE
    q = rms_norm(q, lp["q_norm"], config.rms_norm_eps)
    k = rms_norm(k, lp["k_norm"], config.rms_norm_eps)
  inv = rope_inv_freq(config)
  return apply_rope(q, pos, inv), apply_rope(k, pos, inv), v


def mlp(lp: dict, x: jax.Array, config: ModelConfig) -> jax.Array:
  h = rms_norm(x, lp["mlp_norm"], config.rms_norm_eps)
  g = jnp.einsum("bte,ef->btf", h, lp["w_gate"])
  u = jnp.einsum("bte,ef->btf", h, lp["w_up"])
  return jnp.einsum("btf,fe->bte", jax.nn.silu(g) * u, lp["w_down"])


def embed(params: Params, tokens: jax.Array) -> jax.Array:
  return jnp.take(params["embed"], tokens, axis=0)


def logits_from_hidden(params: Params, hidden: jax.Array) -> jax.Array:
  """hidden [..., E] (after the final norm) -> fp32 logits [..., V]."""
  if "lm_head" in params:
    return jnp.einsum("...e,ev->...v", hidden, params["lm_head"],
                      preferred_element_type=jnp.float32)
  return jnp.einsum("...e,ve->...v", hidden, params["embed"], preferred_element_type=jnp.float32)


def forward_chunk(params: Params, config: ModelConfig, tokens: jax.Array, cache: KVCache,
                  n_valid: jax.Array, backend: str = "xla"):
  """Runs a chunk through the decoder, reading and extending the cache.

  tokens [B, T] int32 (row b's first n_valid[b] are real; the rest padding);
  the chunk starts at position cache.lengths[b] in each row.
  Returns (hidden [B, T, E] after the final RMSNorm, new cache).
  """
  t = tokens.shape[1]
  start = cache.lengths
  pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  x = embed(params, tokens)
  layers = []
  for lp, lc in zip(params["layers"], cache.layers):
    h = rms_norm(x, lp["attn_norm"], config.rms_norm_eps)
    q, k, v = qkv(lp, h, config, pos)
    o, lc = dispatch.attend(lc, q, k, v, start, n_valid, backend)
    x = x + jnp.einsum("bthgd,hgde->bte", o, lp["wo"])
    x = x + mlp(lp, x, config)
    layers.append(lc)
  hidden = rms_norm(x, params["final_norm"], config.rms_norm_eps)
  return hidden, KVCache(tuple(layers), start + n_valid)


# -- params ------------------------------------------------------------------------

def param_shapes(config: ModelConfig) -> Params:
  """The params tree as jax.ShapeDtypeStruct-free shapes (tuples)."""
  e, f, d = config.hidden_size, config.intermediate_size, config.head_dim
  h, g, v = config.num_kv_heads, config.group_size, config.vocab_size
  layer = {"attn_norm": (e,), "wq": (e, h, g, d), "wk": (e, h, d), "wv": (e, h, d),
           "wo": (h, g, d, e), "mlp_norm": (e,), "w_gate": (e, f), "w_up": (e, f),
           "w_down": (f, e)}
  if config.attention_bias:
    layer.update(bq=(h, g, d), bk=(h, d), bv=(h, d))
  if config.qk_norm:
    layer.update(q_norm=(d,), k_norm=(d,))
  tree = {"embed": (v, e), "final_norm": (e,), "layers": [dict(layer) for _ in range(config.num_layers)]}
  if not config.tie_word_embeddings:
    tree["lm_head"] = (e, v)
  return tree


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
  """Random weights of the config's shape (tests and speed benchmarks)."""
  shapes = param_shapes(config)
  leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  out = []
  for k, shp in zip(keys, leaves):
    if len(shp) == 1:  # norms near 1 so activations stay well scaled
      out.append((1.0 + 0.1 * jax.random.normal(k, shp)).astype(dtype))
    else:
      out.append((scale * jax.random.normal(k, shp)).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


_HEAD_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 0, "bq": 0, "bk": 0, "bv": 0}


def reorder_heads(params: Params, orders) -> Params:
  """Permutes each layer's KV heads (with their query groups) by orders[l]."""
  layers = []
  for lp, order in zip(params["layers"], orders):
    idx = np.asarray(order)
    layers.append({n: (jnp.take(w, idx, axis=_HEAD_AXES[n]) if n in _HEAD_AXES else w)
                   for n, w in lp.items()})
  return {**params, "layers": layers}


def apply_head_mask(params: Params, mask) -> Params:
  """Reorders weights so each layer's retrieval heads come first (see HeadMask.order)."""
  return reorder_heads(params, [mask.order(l) for l in range(len(params["layers"]))])


def undo_head_mask(params: Params, mask) -> Params:
  return reorder_heads(params, [mask.inverse_order(l) for l in range(len(params["layers"]))])


def stack_layers(params: Params) -> Params:
  """Per-layer dicts -> one dict of [L, ...] arrays (for `lax.scan` over layers)."""
  return {**params, "layers": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *params["layers"])}


def forward_sequence(params: Params, config: ModelConfig, tokens: jax.Array, lengths: jax.Array,
                     attention, remat: bool = False) -> jax.Array:
  """Whole sequences at once, no cache: the dense reference and gate training's path.

  tokens [B, T], lengths [B]; attention(layer, q, k, v, lengths) -> out
  [B, T, Hkv, G, D] (q [B, T, Hkv, G, D], k/v [B, T, Hkv, D]). With stacked
  layers (`stack_layers`) the layers run under `lax.scan` and `layer` is a traced
  index; remat then recomputes each layer in the backward pass, so memory holds
  one layer's activations, not all of them. Returns hidden [B, T, E] after the
  final RMSNorm.
  """
  t = tokens.shape[1]
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
  x = embed(params, tokens)

  def layer(x, lp, i):
    h = rms_norm(x, lp["attn_norm"], config.rms_norm_eps)
    q, k, v = qkv(lp, h, config, pos)
    x = x + jnp.einsum("bthgd,hgde->bte", attention(i, q, k, v, lengths), lp["wo"])
    return x + mlp(lp, x, config)

  if isinstance(params["layers"], dict):
    body = jax.checkpoint(layer) if remat else layer
    x, _ = jax.lax.scan(lambda x, li: (body(x, *li), None), x,
                        (params["layers"], jnp.arange(config.num_layers)))
  else:
    for i, lp in enumerate(params["layers"]):
      x = layer(x, lp, i)
  return rms_norm(x, params["final_norm"], config.rms_norm_eps)
