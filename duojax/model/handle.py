"""A model used functionally: the static graphdef and the state as a plain dict.

`ModelHandle` is what loading hands out and what the jitted steps take. It is a
pytree whose only leaves are the state's arrays; the graphdef (structure, head
splits, logical axis names) rides in its treedef, so jit treats it as static:
one compile per (shape, pattern), and `nnx.merge` runs inside the trace only.
The state is `nnx.to_pure_dict` of the model's, so flattening it per call costs
what the plain params dict did (nnx.State flattens in Python, several times slower).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from duojax.config import ModelConfig
from duojax.model import modules as M
from duojax.model import pack as _pack
from duojax.model import quant


class _Graph:
  """The static part of a handle, hashed once: jit hashes static parts on every call,
  and hashing a graphdef walks all its nodes (~0.3 ms for 30 layers)."""
  __slots__ = ("graphdef", "mask", "_hash")

  def __init__(self, graphdef, mask=None):
    self.graphdef, self.mask = graphdef, mask
    self._hash = hash((graphdef, mask))

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (isinstance(other, _Graph) and self._hash == other._hash
                             and self.graphdef == other.graphdef and self.mask == other.mask)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["state"], meta_fields=["graph"])
@dataclasses.dataclass(frozen=True)
class ModelHandle:
  graph: _Graph  # graphdef + the HeadMask the weights are reordered for (None: HF order)
  state: dict  # nnx.to_pure_dict of the model's state: arrays only

  @property
  def graphdef(self):
    return self.graph.graphdef

  @property
  def mask(self):
    return self.graph.mask

  def module(self) -> M.Llama:
    """The NNX model (call inside jit: merging outside it walks the graph per call)."""
    return nnx.merge(self.graph.graphdef, self.state)

  @property
  def dtype(self):
    return self.state["embedding"]["embed"].dtype

  @property
  def params(self) -> dict:
    """The plain params dict in served order (retrieval heads first under `mask`), in the
    unpacked layout even when the handle serves packed weights (then this copies them)."""
    return to_params_dict(self)

  @property
  def packed(self) -> bool:
    """Whether the weights are served packed (model/pack.py: wqkv, w_gate_up)."""
    return "w_gate_up" in self.state["layers"][0]["mlp"]

  def replace(self, state: dict) -> "ModelHandle":
    return dataclasses.replace(self, state=state)


def split(model: M.Llama) -> ModelHandle:
  """Splits an NNX model once (at load) into a handle."""
  gd, st = nnx.split(model)
  return ModelHandle(_graph_of(gd, model.mask), nnx.to_pure_dict(st))


_GRAPHS: dict = {}


def _graph_of(gd, mask) -> _Graph:
  """One _Graph per distinct graphdef, so handles of a model compare by identity."""
  g = _Graph(gd, mask)
  return _GRAPHS.setdefault(g, g)


@functools.lru_cache(maxsize=64)
def _cached_graph(config: ModelConfig, mask, splits, packed: bool = False) -> _Graph:
  from duojax.model.llama import init_params

  def build():
    params = init_params(config, jax.random.PRNGKey(0))
    return M.Llama(config, _pack.pack_params(params) if packed else params, mask, splits)
  return _graph_of(nnx.split(nnx.eval_shape(build))[0], mask)


def _layer_state(lp: dict) -> dict:
  return {"attn_norm": lp["attn_norm"], "mlp_norm": lp["mlp_norm"],
          "attn": {n: lp[n] for n in M.ATTN_NAMES if n in lp},
          "mlp": {n: lp[n] for n in M.MLP_NAMES if n in lp}}


def prepare_params(params: dict, mask=None, weights_dtype: str = "bf16",
                   pack: bool = False) -> dict:
  """The plain params dict as a model serves it for `mask`: the heads reordered (retrieval
  heads first; None: as stored), then, with `pack`, q/k/v and gate/up packed (model/pack.py),
  then, for weights_dtype "int8", the projections quantised (model/quant.py). The reorder
  comes first: a QArray's per-channel scales would otherwise need reordering with its
  values. Packing before quantising gives the same scales as after (they are per output
  channel), and params packed already stay as they are."""
  if mask is not None:
    from duojax.model.llama import apply_head_mask
    params = apply_head_mask(params, mask)
  if pack:
    params = _pack.pack_params(params)
  return quant.quantize_params(params, weights_dtype)


def from_params(config: ModelConfig, params: dict, mask=None, *, reordered: bool = False,
                splits=None, weights_dtype: str = "bf16", pack: bool = False) -> ModelHandle:
  """A handle from the plain params dict (per-layer list); see `Llama.from_params`.

  The graphdef is built once per (config, pattern, packing) and the state is the dict's
  arrays re-nested, so this is cheap enough to run per `generate` call.
  weights_dtype: "int8" quantises the projections (model/quant.py) after the
  heads are reordered (a QArray's scales would otherwise need reordering too).
  pack: serve q/k/v and gate/up packed (model/pack.py: fewer, larger products per
  decode step); params that arrive packed (or int8 and packed) are served so either way.
  """
  params = prepare_params(params, None if reordered else mask, weights_dtype, pack)
  if isinstance(params.get("layers"), dict):
    raise ValueError("a handle serves per-layer params; unstack them (a list of layer dicts)")
  splits = M.splits_for(config, mask) if splits is None else tuple(splits)
  forms = {_pack.layer_form(lp, f"layer {i}") for i, lp in enumerate(params["layers"])}
  cheap = ("lm_head" in params) != config.tie_word_embeddings and all(
      set(lp) == set(M.check_layer_weights(lp, config, f"layer {i}"))
      for i, lp in enumerate(params["layers"])) and len(params["layers"]) == config.num_layers
  # the cached graphdef holds one layout for all layers; layers packed differently (not
  # what prepare_params makes) get their own from the module
  if not cheap or len(forms) != 1:  # let the module constructor name what is wrong
    return split(M.Llama(config, params, mask, splits))
  state = {"embedding": {"embed": params["embed"]}, "final_norm": params["final_norm"],
           "layers": {i: _layer_state(lp) for i, lp in enumerate(params["layers"])}}
  if "lm_head" in params:
    state["lm_head"] = params["lm_head"]
  return ModelHandle(_cached_graph(config, mask, splits, forms == {"packed"}), state)


def to_params_dict(h: ModelHandle) -> dict:
  """The handle's weights as the plain params dict, in served (reordered) order and the
  unpacked layout (model/pack.py), whatever layout the handle serves."""
  st = h.state
  layers = []
  for i in range(len(st["layers"])):
    ls = st["layers"][i]
    layers.append(_pack.unpack_layer({"attn_norm": ls["attn_norm"], **ls["attn"],
                                      "mlp_norm": ls["mlp_norm"], **ls["mlp"]}))
  out = {"embed": st["embedding"]["embed"], "final_norm": st["final_norm"], "layers": layers}
  if "lm_head" in st:
    out["lm_head"] = st["lm_head"]
  return {k: out[k] for k in ("embed", "final_norm", "lm_head", "layers") if k in out}


def as_handle(model, config: ModelConfig, mask=None) -> ModelHandle:
  """A ModelHandle as it is, or one from a plain params dict already reordered for
  `mask` (the contract of the engine's dict callers). A handle must have been built
  for the same mask."""
  if isinstance(model, ModelHandle):
    if model.mask != mask:
      raise ValueError("the model was built for another head mask than the one given; pass "
                       "the mask the model was loaded with (LoadedModel.mask)")
    return model
  if isinstance(model, M.Llama):
    raise ValueError("pass a ModelHandle (duojax.model.handle.split(model)), not the NNX "
                     "module: splitting per call would walk the graph every time")
  return from_params(config, model, mask, reordered=True)


def abstract(h: ModelHandle) -> ModelHandle:
  """The handle with ShapeDtypeStructs for arrays (for AOT lowering)."""
  return h.replace(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                          h.state))


def cast(h: ModelHandle, dtype) -> ModelHandle:
  return h.replace(jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), h.state))


def init(config: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02,
         mask=None) -> ModelHandle:
  """A handle with random weights (tests, benchmarks); see `llama.init_params`."""
  from duojax.model.llama import init_params
  return from_params(config, init_params(config, key, dtype, scale), mask, reordered=True)
