"""The weights' layout from a ModelConfig alone: logical axis names and shapes.

The one table of logical axis names: the model's nnx.Param metadata (model/modules.py),
the sharding rules (sharding.py) and checkpoint restores (checkpoint/store.py) all read
it here, so an axis is renamed in one place. It depends on config.py only, so checkpoint/
and sharding.py need not import the model.

The plain params dict (documented in duojax/model/llama.py) is what checkpoint/ reads and
writes; restoring it against `abstract_params` gives back exactly that structure (layers as
a list, never orbax's {'0': ...}) and lets orbax place every tensor with its sharding.
"""

from __future__ import annotations

from typing import Any

from duojax.config import ModelConfig

# Logical axis names of each weight: per layer, and at the top of the params dict.
LAYER_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("embed",), "mlp_norm": ("embed",),
    "wq": ("embed", "kv_heads", "q_group", "head_dim"),
    "wk": ("embed", "kv_heads", "head_dim"), "wv": ("embed", "kv_heads", "head_dim"),
    "wo": ("kv_heads", "q_group", "head_dim", "embed"),
    "bq": ("kv_heads", "q_group", "head_dim"), "bk": ("kv_heads", "head_dim"),
    "bv": ("kv_heads", "head_dim"), "q_norm": ("head_dim",), "k_norm": ("head_dim",),
    "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed"),
    # packed for serving (duojax/model/pack.py): per KV head its G query heads, k, v; and
    # gate, up. The packing axes get names of their own that no rule splits.
    "wqkv": ("embed", "kv_heads", "qkv_group", "head_dim"),
    "bqkv": ("kv_heads", "qkv_group", "head_dim"),
    "w_gate_up": ("embed", "gate_up", "mlp")}
TOP_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"), "final_norm": ("embed",), "lm_head": ("embed", "vocab")}
GATE_AXES = ("kv_heads",)  # one DuoAttention gate per KV head of a layer
LAYERS_AXIS = "layers"  # the leading axis of stacked (scanned) layer weights
CACHE_AXES = ("batch", "sequence", "kv_heads", "head_dim")  # retrieval heads' k, v
WINDOW_AXES = ("batch", "window", "kv_heads", "head_dim")  # streaming heads' sink + ring
# A quantised cache (duojax.kv_quant.QuantKV) holds codes [B, S, H, D] int8 or [B, S, H, D/2]
# uint8 (two int4 codes a byte) under the axes above, and a float32 scale and zero per token
# per KV head, [B, S, H, 1] ([B, W, H, 1] streaming): named like the values (the last axis,
# one group spanning the head dim, keeps head_dim's name), so they are split exactly as the
# values they belong to.
CACHE_SCALE_AXES = ("batch", "sequence", "kv_heads", "head_dim")
WINDOW_SCALE_AXES = ("batch", "window", "kv_heads", "head_dim")
ACTIVATION_AXES = ("batch", "length", "embed")


def _layer_keys(config: ModelConfig) -> list[str]:
  keys = ["attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"]
  if config.attention_bias:
    keys += ["bq", "bk", "bv"]
  if config.qk_norm:
    keys += ["q_norm", "k_norm"]
  return keys


def param_axes(config: ModelConfig) -> dict:
  """The params tree with each leaf replaced by its tuple of logical axis names."""
  layer = {k: LAYER_AXES[k] for k in _layer_keys(config)}
  tree: dict[str, Any] = {"embed": TOP_AXES["embed"], "final_norm": TOP_AXES["final_norm"],
                          "layers": [dict(layer) for _ in range(config.num_layers)]}
  if not config.tie_word_embeddings:
    tree["lm_head"] = TOP_AXES["lm_head"]
  return tree


def param_shapes(config: ModelConfig) -> dict:
  """The params tree with each leaf replaced by its shape tuple."""
  size = {"vocab": config.vocab_size, "embed": config.hidden_size, "mlp": config.intermediate_size,
          "kv_heads": config.num_kv_heads, "q_group": config.group_size,
          "qkv_group": config.group_size + 2, "gate_up": 2,
          "head_dim": config.head_dim}
  return _map_axes(lambda axes: tuple(size[a] for a in axes), param_axes(config))


def _map_axes(fn, tree):
  if isinstance(tree, tuple):
    return fn(tree)
  if isinstance(tree, list):
    return [_map_axes(fn, t) for t in tree]
  return {k: _map_axes(fn, v) for k, v in tree.items()}


def abstract_params(config: ModelConfig, dtype, shardings=None) -> dict:
  """The params tree as jax.ShapeDtypeStructs, the target a restore fills in.

  shardings: None (host numpy arrays come back), one jax.sharding.Sharding for every leaf,
  or a tree of the params' structure (dicts, the layers list) with a Sharding or None per
  leaf, e.g. built from param_axes(config) by the sharding rules.
  """
  import jax

  def walk(shape, sh, where):
    if isinstance(shape, tuple):
      if sh is not None and not isinstance(sh, jax.sharding.Sharding):
        raise ValueError(f"shardings{where} is a {type(sh).__name__}, not a jax Sharding; "
                         "give one Sharding per tensor (or None)")
      return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    if isinstance(sh, jax.sharding.Sharding) or sh is None:
      sub = lambda k: sh
    elif isinstance(shape, list) and isinstance(sh, (list, tuple)) and len(sh) == len(shape):
      sub = lambda k: sh[k]
    elif isinstance(shape, dict) and isinstance(sh, dict) and set(sh) == set(shape):
      sub = lambda k: sh[k]
    else:
      raise ValueError(f"shardings{where} does not have the params' structure (a "
                       f"{type(shape).__name__} of {len(shape)}); build it from "
                       "duojax.layout.param_axes(config)")
    keys = range(len(shape)) if isinstance(shape, list) else shape
    out = {k: walk(shape[k], sub(k), f"{where}[{k!r}]") for k in keys}
    return [out[k] for k in keys] if isinstance(shape, list) else out

  return walk(param_shapes(config), shardings, "")
