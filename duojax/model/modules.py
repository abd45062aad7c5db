"""The Llama-family decoder as Flax NNX modules.

Weights are `nnx.Param`s whose `out_sharding` metadata holds logical axis names
(`AXES`), so sharding rules and head reordering find an axis by name; the
DuoAttention gates are their own variable type, `Gate`, so `nnx.state(model, Gate)`
is exactly what gate training differentiates. The head pattern is static: each
`Attention` is built with its layer's `HeadSplit` (retrieval heads first, the
weights reordered beforehand), so it lives in the graphdef and a pattern compiles
once. Modules are used functionally (`duojax.model.handle`): split once at load,
merged inside jit.

Tree of a model (matching the plain params dict of duojax/model/llama.py):
  embedding.embed [V, E]; final_norm [E]; lm_head [E, V] or None (tied)
  layers: nnx.List of Block, or one Block of stacked [L, ...] weights (for scans)
    Block: attn_norm [E], mlp_norm [E]
      attn: wq [E, Hkv, G, D], wk, wv [E, Hkv, D], wo [Hkv, G, D, E],
            bq [Hkv, G, D], bk, bv [Hkv, D] (Qwen2), q_norm, k_norm [D] (Qwen3),
            gate [Hkv] (a `Gate`, only when built for gate training)
      mlp: w_gate, w_up [E, F]; w_down [F, E]
    served packed (model/pack.py; handle.prepare_params(pack=True)): attn wqkv
    [E, Hkv, G+2, D] (bqkv [Hkv, G+2, D]) for wq/wk/wv (bq/bk/bv), mlp w_gate_up
    [E, 2, F] for w_gate/w_up; `to_params` unpacks again
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from duojax import cache as kvc
from duojax.attention import dispatch
from duojax import layout
from duojax.config import ModelConfig
from duojax.model import ops
from duojax.model import pack as _pack

# Logical axis names per weight (duojax/layout.py: the one table, which the sharding rules
# and checkpoint restores read too).
AXES: dict[str, tuple[str, ...]] = {**layout.TOP_AXES, **layout.LAYER_AXES, "gate": layout.GATE_AXES}
LAYERS_AXIS = layout.LAYERS_AXIS
ATTN_NAMES = ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "q_norm", "k_norm", "wqkv", "bqkv")
MLP_NAMES = ("w_gate", "w_up", "w_down", "w_gate_up")  # an MLP holds w_gate/w_up or w_gate_up
BLOCK_NAMES = ("attn_norm", "mlp_norm")


class Gate(nnx.Variable):
  """DuoAttention gate alpha per KV head: [Hkv] per layer ([L, Hkv] when stacked)."""


def _axes(name: str, stacked: bool) -> tuple[str, ...]:
  return ((LAYERS_AXIS,) if stacked else ()) + AXES[name]


def _param(value: jax.Array, name: str, stacked: bool = False) -> nnx.Param:
  names = _axes(name, stacked)
  if jnp.ndim(value) != len(names):
    raise ValueError(f"weight {name!r} has shape {jnp.shape(value)} but the layout wants "
                     f"{len(names)} axes {names}; convert the checkpoint again (duojax.convert)")
  # eager_sharding off: the names are metadata for sharding rules, not a placement now
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class HeadSplit(NamedTuple):
  """One layer's static head pattern: the first n_retrieval KV heads keep the full
  cache, the rest sink + recent (sink/recent None when every head is full)."""
  n_retrieval: int
  sink: int | None = None
  recent: int | None = None


def splits_for(config: ModelConfig, mask=None) -> tuple[HeadSplit, ...]:
  """Per-layer splits of a HeadMask (every head full without one)."""
  hkv = config.num_kv_heads
  return tuple(HeadSplit(hkv) if n == hkv else HeadSplit(n, mask.sink, mask.recent)
               for n in kvc.layer_split(config, mask))


def cache_split(lc, hkv: int) -> HeadSplit:
  """The split a layer cache was built for."""
  if isinstance(lc, kvc.FullLayerCache):
    return HeadSplit(hkv) if lc.k.shape[2] == hkv else HeadSplit(lc.k.shape[2])
  if isinstance(lc, kvc.DuoLayerCache):
    return HeadSplit(lc.n_retrieval, lc.stream.sink, lc.stream.recent)
  return HeadSplit(0, lc.sink, lc.recent)  # streaming (with or without compensation)


def splits_from_cache(config: ModelConfig, cache: kvc.KVCache) -> tuple[HeadSplit, ...]:
  return tuple(cache_split(lc, config.num_kv_heads) for lc in cache.layers)


class Embedding(nnx.Module):
  def __init__(self, table: jax.Array):
    self.embed = _param(table, "embed")

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> [B, T, E]."""
    return jnp.take(self.embed[...], tokens, axis=0)


class Attention(nnx.Module):
  """q/k/v/o projections (+ biases, q/k norms) of one layer, built for a HeadSplit."""

  def __init__(self, config: ModelConfig, weights: dict, split: HeadSplit,
               gate: jax.Array | None = None, stacked: bool = False, layer: int | None = None):
    self.config, self.split, self.layer = config, split, layer
    for n in ATTN_NAMES:
      setattr(self, n, _param(weights[n], n, stacked) if n in weights else None)
    self.gate = (Gate(jnp.asarray(gate), out_sharding=_axes("gate", stacked), eager_sharding=False)
                 if gate is not None else None)

  def weights(self) -> dict:
    return {n: getattr(self, n)[...] for n in ATTN_NAMES if getattr(self, n) is not None}

  def qkv(self, h: jax.Array, pos: jax.Array):
    """h [B, T, E] (normalised), pos [B, T] -> q [B, T, Hkv, G, D], k, v [B, T, Hkv, D]."""
    return ops.qkv(self.weights(), h, self.config, pos)

  def out(self, o: jax.Array) -> jax.Array:
    return ops.out_proj(o, self.wo[...])

  def __call__(self, h: jax.Array, pos: jax.Array, lc, start: jax.Array, n_valid: jax.Array,
               backend: str = "xla"):
    """Attends a chunk through the layer cache. Returns (out [B, T, E], new layer cache)."""
    got = cache_split(lc, self.config.num_kv_heads)
    if got != self.split:
      raise ValueError(
          f"layer {self.layer}: the KV cache holds head split {tuple(got)} but the model was "
          f"built for {tuple(self.split)} (n_retrieval, sink, recent); build the cache and the "
          "model from the same HeadMask (cache.init_cache(config, ..., mask) and "
          "Llama.from_params(config, params, mask))")
    q, k, v = self.qkv(h, pos)
    o, lc = dispatch.attend(lc, q, k, v, start, n_valid, backend)
    return self.out(o), lc


class MLP(nnx.Module):
  def __init__(self, weights: dict, stacked: bool = False):
    for n in MLP_NAMES:  # unpacked or packed: the absent names stay None (static)
      setattr(self, n, _param(weights[n], n, stacked) if n in weights else None)

  def weights(self) -> dict:
    return {n: getattr(self, n)[...] for n in MLP_NAMES if getattr(self, n) is not None}

  def __call__(self, h: jax.Array) -> jax.Array:
    """h [B, T, E] (normalised) -> [B, T, E]."""
    return ops.swiglu(self.weights(), h)


class Block(nnx.Module):
  def __init__(self, config: ModelConfig, weights: dict, split: HeadSplit,
               gate: jax.Array | None = None, stacked: bool = False, layer: int | None = None):
    self.eps = config.rms_norm_eps
    self.attn_norm = _param(weights["attn_norm"], "attn_norm", stacked)
    self.attn = Attention(config, weights, split, gate, stacked, layer)
    self.mlp_norm = _param(weights["mlp_norm"], "mlp_norm", stacked)
    self.mlp = MLP(weights, stacked)

  def norm_attn(self, x: jax.Array) -> jax.Array:
    return ops.rms_norm(x, self.attn_norm[...], self.eps)

  def _mlp_residual(self, x: jax.Array) -> jax.Array:
    return x + self.mlp(ops.rms_norm(x, self.mlp_norm[...], self.eps))

  def finish(self, x: jax.Array, o: jax.Array) -> jax.Array:
    """Residual + o_proj of the attention output o [B, T, Hkv, G, D], then the MLP."""
    return self._mlp_residual(x + self.attn.out(o))

  def __call__(self, x, pos, lc, start, n_valid, backend: str = "xla"):
    """x [B, T, E] -> (x, new layer cache)."""
    a, lc = self.attn(self.norm_attn(x), pos, lc, start, n_valid, backend)
    return self._mlp_residual(x + a), lc

  def sequence(self, x: jax.Array, pos: jax.Array, attend) -> jax.Array:
    """Whole sequences, no cache: attend(q, k, v) -> o [B, T, Hkv, G, D]."""
    q, k, v = self.attn.qkv(self.norm_attn(x), pos)
    return self.finish(x, attend(q, k, v))


def layer_weight_names(config: ModelConfig, packed: bool = False) -> set[str]:
  """The names one layer's weights have for `config`, unpacked or packed (model/pack.py)."""
  want = set(BLOCK_NAMES + ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
  if config.attention_bias:
    want |= {"bq", "bk", "bv"}
  if config.qk_norm:
    want |= {"q_norm", "k_norm"}
  if packed:
    for name, parts in _pack.GROUPS.items():
      if parts[0] in want:
        want = (want - set(parts)) | {name}
  return want


def check_layer_weights(lp: dict, config: ModelConfig, where: str) -> dict:
  """lp as it is when it holds exactly the unpacked or exactly the packed set of names."""
  packed = _pack.layer_form(lp, where) == "packed"  # refuses a mix of the two layouts
  want = layer_weight_names(config, packed)
  if set(lp) != want:
    raise ValueError(f"{where} has weights {sorted(lp)} but the config wants {sorted(want)} "
                     f"(attention_bias / qk_norm{'; packed' if packed else ''}); convert the "
                     "checkpoint again with this config")
  return lp


class Llama(nnx.Module):
  """The decoder. Build it with `from_params` (the plain params dict) or `init`."""

  def __init__(self, config: ModelConfig, params: dict, mask=None,
               splits: tuple[HeadSplit, ...] | None = None, gates: jax.Array | None = None):
    """params: the plain dict (per-layer list, or stacked [L, ...] layers), already
    reordered for `mask`; splits default to the mask's. gates [L, Hkv]: add `Gate`s."""
    self.config, self.mask = config, mask
    self.eps = config.rms_norm_eps
    splits = splits_for(config, mask) if splits is None else tuple(splits)
    if len(splits) != config.num_layers:
      raise ValueError(f"{len(splits)} head splits for a {config.num_layers}-layer model; "
                       "give one per layer")
    self.embedding = Embedding(params["embed"])
    self.final_norm = _param(params["final_norm"], "final_norm")
    if ("lm_head" in params) == config.tie_word_embeddings:
      raise ValueError(f"params {'have' if 'lm_head' in params else 'lack'} an lm_head but the "
                       f"config says tie_word_embeddings={config.tie_word_embeddings}; convert "
                       "the checkpoint again or fix the config")
    self.lm_head = _param(params["lm_head"], "lm_head") if "lm_head" in params else None
    self.stacked = isinstance(params["layers"], dict)
    if self.stacked:
      if len(set(splits)) != 1:
        raise ValueError("stacked (scanned) layers need one head split for all layers; build "
                         "per-layer modules (a list of layer dicts) for a DuoAttention mask")
      lp = check_layer_weights(params["layers"], config, "stacked layers")
      n = jax.tree_util.tree_leaves(lp)[0].shape[0]
      if n != config.num_layers:
        raise ValueError(f"stacked layers hold {n} layers, the config {config.num_layers}")
      self.layers = Block(config, lp, splits[0], gates, stacked=True)
    else:
      if len(params["layers"]) != config.num_layers:
        raise ValueError(f"params hold {len(params['layers'])} layers, the config "
                         f"{config.num_layers}; use the config the checkpoint was converted with")
      self.layers = nnx.List([
          Block(config, check_layer_weights(lp, config, f"layer {i}"), splits[i],
                None if gates is None else gates[i], layer=i)
          for i, lp in enumerate(params["layers"])])

  # -- builders --------------------------------------------------------------------

  @classmethod
  def from_params(cls, config: ModelConfig, params: dict, mask=None, *, reordered: bool = False,
                  gates: jax.Array | None = None, pack: bool = False) -> "Llama":
    """A model from the plain params dict (HF head order unless `reordered`: then the
    weights already have each layer's retrieval heads first, as `apply_head_mask` leaves them).
    pack: serve q/k/v and gate/up packed (model/pack.py), after the reorder."""
    if mask is not None and not reordered:
      from duojax.model.llama import apply_head_mask
      params = apply_head_mask(params, mask)
    if pack:
      params = _pack.pack_params(params)
    return cls(config, params, mask, gates=gates)

  @classmethod
  def init(cls, config: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02,
           mask=None) -> "Llama":
    """Random weights (tests, benchmarks); random weights need no reordering for a mask."""
    from duojax.model.llama import init_params
    return cls(config, init_params(config, key, dtype, scale), mask)

  def to_params(self, reordered: bool = False) -> dict:
    """The plain params dict (HF head order unless `reordered`), unpacked however the
    model serves its weights (model/pack.py); gates are left out."""
    def layer(b: Block) -> dict:  # unpacked: what every reader of the params dict expects
      d = {n: getattr(b, n)[...] for n in BLOCK_NAMES}
      d.update(b.attn.weights())
      d.update(b.mlp.weights())
      return _pack.unpack_layer(d)
    out = {"embed": self.embedding.embed[...], "final_norm": self.final_norm[...],
           "layers": layer(self.layers) if self.stacked else [layer(b) for b in self.layers]}
    if self.lm_head is not None:
      out["lm_head"] = self.lm_head[...]
    if self.mask is not None and not reordered:
      from duojax.model.llama import undo_head_mask
      out = undo_head_mask(out, self.mask)
    return out

  def gate_values(self) -> jax.Array | None:
    """[L, Hkv] gate values, or None when built without gates."""
    if self.stacked:
      return None if self.layers.attn.gate is None else self.layers.attn.gate[...]
    if self.layers[0].attn.gate is None:
      return None
    return jnp.stack([b.attn.gate[...] for b in self.layers])

  # -- running -------------------------------------------------------------------------

  def embed(self, tokens: jax.Array) -> jax.Array:
    return self.embedding(tokens)

  def final(self, x: jax.Array) -> jax.Array:
    return ops.rms_norm(x, self.final_norm[...], self.eps)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., E] (after the final norm) -> fp32 logits [..., V]."""
    return ops.lm_logits(hidden, None if self.lm_head is None else self.lm_head[...],
                         self.embedding.embed[...])

  def __call__(self, tokens: jax.Array, cache: kvc.KVCache, n_valid: jax.Array,
               backend: str = "xla"):
    """Runs a chunk through the decoder, reading and extending the cache.

    tokens [B, T] int32 (row b's first n_valid[b] are real; the rest padding);
    the chunk starts at position cache.lengths[b] in each row.
    Returns (hidden [B, T, E] after the final RMSNorm, new cache).
    """
    if self.stacked:
      raise ValueError("a model with stacked layers is for whole-sequence scans; build it from "
                       "per-layer params to run it on a KV cache")
    t = tokens.shape[1]
    start = cache.lengths
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    x = self.embed(tokens)
    layers = []
    for blk, lc in zip(self.layers, cache.layers):
      x, lc = blk(x, pos, lc, start, n_valid, backend)
      layers.append(lc)
    return self.final(x), kvc.KVCache(tuple(layers), start + n_valid)

  def run_layers(self, fn, x, xs=None, remat: bool = False):
    """x, y_l = fn(block, x, l, xs_l) over the layers: `lax.scan` (the stacked block
    split once, merged per step; l traced; remat optional) or a Python loop (l an int).
    Returns (x, ys stacked over layers, or None)."""
    if self.stacked:
      gd, st = nnx.split(self.layers)

      def body(c, s, i, x_i):
        return fn(nnx.merge(gd, s), c, i, x_i)
      body = jax.checkpoint(body) if remat else body
      return jax.lax.scan(lambda c, a: body(c, *a), x,
                          (st, jnp.arange(self.config.num_layers), xs))
    ys = []
    for i, blk in enumerate(self.layers):
      x, y = fn(blk, x, i, None if xs is None else jax.tree_util.tree_map(lambda a: a[i], xs))
      ys.append(y)
    return x, (None if ys[0] is None else jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ys))

  def forward_sequence(self, tokens: jax.Array, lengths: jax.Array, attention,
                       remat: bool = False) -> jax.Array:
    """Whole sequences at once, no cache: the dense reference and gate training's path.

    tokens [B, T], lengths [B]; attention(layer, q, k, v, lengths) -> out
    [B, T, Hkv, G, D]. With stacked layers `layer` is a traced index and remat
    recomputes each layer in the backward pass. Returns hidden [B, T, E] after the
    final RMSNorm.
    """
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

    def layer(blk, x, i, _):
      return blk.sequence(x, pos, lambda q, k, v: attention(i, q, k, v, lengths)), None
    x, _ = self.run_layers(layer, self.embed(tokens), remat=remat)
    return self.final(x)
