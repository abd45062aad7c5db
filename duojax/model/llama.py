"""The plain params dict (the exchange format with checkpoint/) and functions over it.

Params (plain dicts, so orbax stores them as they are):
  embed [V, E]; final_norm [E]; lm_head [E, V] (absent when tied)
  layers: list of per-layer dicts
    attn_norm [E]; wq [E, Hkv, G, D]; wk, wv [E, Hkv, D]; wo [Hkv, G, D, E]
    bq [Hkv, G, D], bk, bv [Hkv, D] (only with attention_bias: Qwen2)
    q_norm, k_norm [D] (only with qk_norm: Qwen3; shared by all heads, so head
    reordering leaves them alone)
    mlp_norm [E]; w_gate, w_up [E, F]; w_down [F, E]
A served model may hold q/k/v and gate/up packed (duojax/model/pack.py); the dict this
module documents, and `to_params` returns, is always the unpacked one.
Query heads are grouped by KV head (HF's head h -> KV head h // G, slot h % G),
so reordering KV heads for DuoAttention permutes one axis of every tensor.

The model itself is `duojax.model.modules.Llama` (Flax NNX), built from this dict
(`Llama.from_params`, `handle.from_params`) and back (`Llama.to_params`). The
functions here that run it (`forward_chunk`, `forward_sequence`) build the
modules inside the caller's trace, for code that holds a dict.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from duojax.cache import KVCache
from duojax.config import ModelConfig
from duojax.layout import param_shapes  # noqa: F401  (re-exported: the model's shapes)
from duojax.model import handle as _handle
from duojax.model import modules as _modules
from duojax.model.ops import apply_rope, mlp, qkv, rms_norm, rope_inv_freq  # noqa: F401

Params = dict


def _top(params) -> dict:
  """embed and lm_head of the dict or a ModelHandle (read from its state: `.params` would
  rebuild, and for packed weights copy, every layer)."""
  if isinstance(params, _handle.ModelHandle):
    st = params.state
    return {"embed": st["embedding"]["embed"], **({"lm_head": st["lm_head"]}
                                                   if "lm_head" in st else {})}
  return params


def embed(params, tokens: jax.Array) -> jax.Array:
  """tokens [B, T] -> [B, T, E]; params: the dict or a ModelHandle."""
  return jnp.take(_top(params)["embed"], tokens, axis=0)


def logits_from_hidden(params, hidden: jax.Array) -> jax.Array:
  """hidden [..., E] (after the final norm) -> fp32 logits [..., V]."""
  from duojax.model.ops import lm_logits
  top = _top(params)
  return lm_logits(hidden, top.get("lm_head"), top["embed"])


def forward_chunk(params, config: ModelConfig, tokens: jax.Array, cache: KVCache,
                  n_valid: jax.Array, backend: str = "xla"):
  """`Llama.__call__` for a params dict (reordered for the cache's pattern) or a handle.

  tokens [B, T] int32; returns (hidden [B, T, E] after the final RMSNorm, new cache).
  """
  if not isinstance(params, _handle.ModelHandle):
    params = _handle.from_params(config, params, reordered=True,
                                 splits=_modules.splits_from_cache(config, cache))
  return params.module()(tokens, cache, n_valid, backend)


# -- params ------------------------------------------------------------------------

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


# the KV-head axis of each weight (packed ones too: model/pack.py keeps it in place)
_HEAD_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 0, "bq": 0, "bk": 0, "bv": 0, "wqkv": 1, "bqkv": 0}


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


def forward_sequence(params, config: ModelConfig, tokens: jax.Array, lengths: jax.Array,
                     attention, remat: bool = False) -> jax.Array:
  """`Llama.forward_sequence` for a params dict (per-layer list, or `stack_layers`'
  stacked layers: then a `lax.scan`, `layer` traced, remat optional) or a handle.

  tokens [B, T], lengths [B]; attention(layer, q, k, v, lengths) -> out
  [B, T, Hkv, G, D]. Returns hidden [B, T, E] after the final RMSNorm.
  """
  model = (params.module() if isinstance(params, _handle.ModelHandle)
           else _modules.Llama(config, params))
  return model.forward_sequence(tokens, lengths, attention, remat)


def to_params(model, reordered: bool = False) -> Params:
  """The plain params dict of a `Llama` module or a ModelHandle, in HF head order unless
  `reordered` (then retrieval heads first, as the model serves them)."""
  if isinstance(model, _handle.ModelHandle):
    d = model.params
    return d if reordered or model.mask is None else undo_head_mask(d, model.mask)
  return model.to_params(reordered)
