"""Mesh axes and the logical-axis rules: the one place that says what is split where.

Every array that crosses a jit boundary names its dimensions with *logical* axis
names (the NNX model's `nnx.Param` metadata uses the same names):

  embed [V, E] (vocab, embed)            lm_head [E, V] (embed, vocab)
  attn_norm, mlp_norm, final_norm [E] (embed,)
  wq [E, Hkv, G, D] (embed, kv_heads, q_group, head_dim)
  wk, wv [E, Hkv, D] (embed, kv_heads, head_dim)
  wo [Hkv, G, D, E] (kv_heads, q_group, head_dim, embed)
  bq [Hkv, G, D], bk, bv [Hkv, D]; q_norm, k_norm [D] (head_dim,)
  w_gate, w_up [E, F] (embed, mlp); w_down [F, E] (mlp, embed)
  packed for serving (duojax/model/pack.py): wqkv [E, Hkv, G+2, D] (embed, kv_heads,
  qkv_group, head_dim), bqkv [Hkv, G+2, D], w_gate_up [E, 2, F] (embed, gate_up, mlp):
  the packing axes are never split, so these shard over kv_heads and mlp as the unpacked
  weights do and a device's shard of the product holds whole q/k/v or gate/up slices
  gates [Hkv] (kv_heads,) or [L, Hkv] (layers, kv_heads)
  KV cache k, v [B, S, H, D] (batch, sequence, kv_heads, head_dim); the streaming
  part [B, W, H, D] (batch, window, kv_heads, head_dim)
  activations [B, T, E] (batch, length, embed)

`RULES` maps each logical name to mesh axes, one column for inference and one for
gate training (where the frozen weights are FSDP-sharded over `fsdp`). A mesh axis
whose size does not divide a dimension is dropped for that dimension (a warning
says so; `strict` raises instead), except where the model cannot run at all: a
`tensor` axis that does not divide the KV heads is an error naming the sizes that
work.

Retrieval heads' caches split over `sequence` (context parallelism, see
`duojax.context_parallel`); the streaming heads' sink + ring is tiny and
is replicated over it. A DuoAttention layer whose retrieval-head count does not
divide `tensor` (4 of Llama-3-8B's 8 KV heads at tensor=8; SmolLM2's 1 or 2 of 3 at
tensor=3) cannot split that part's heads over `tensor`; replicating it there would
hold every retrieval head's whole cache on each device of the axis (4x full
attention's per-device cache in that example). Instead `tensor` *spills* onto the
part's sequence dimension (`SPILL`): its slots split over ("sequence", "tensor")
jointly, device (s, t) holding slice s * tensor + t, and context-parallel attention
merges over both axes. Where the capacity is not a multiple of sequence x tensor the
part stays replicated over `tensor` (a note says so), so any pattern runs on any mesh
the model's KV heads allow. (Heads over a divisor of `tensor` and sequence over the
rest would need `tensor` factored into two mesh axes; the joint sequence split holds
the same bytes per device without that.)

Inference splits the MLP width and the vocabulary over ("tensor", "sequence"): the
attention weights can split only whole KV heads (at most Hkv ways), and replicating
the rest over `sequence` left a 70B shape at >= 17.6 GB of weights per device on any
mesh; the MLP is ~80% of a Llama's weights. GSPMD inserts the reduction of w_down's
(and the LM head's) partial sums over both axes; at decode the activations are
[B, 1, E], so that extra all-reduce is small next to reading the weights. Training
keeps `mlp` and `vocab` on `tensor` only (`sequence` splits the activations there).

Quantised weights (`--weights-dtype int8`, duojax/model/quant.py) are qwix QArrays: an
integer value array of the weight's shape and a scale with 1 on the contracted axes. The
value takes the weight's sharding; the scale takes the same mesh axes on every dimension
it shares with the weight and is replicated where it is 1 (one scale spans that whole
dimension; there is nothing to split), so each device holds the scales of the output
channels it computes and the int8 weights split exactly as the bf16 ones did.
"""

from __future__ import annotations

import math
import warnings
from typing import Collection, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from duojax import cache as kvc
from duojax import layout

# Outermost to innermost: devices next to each other (one host, one ICI ring) end
# up on the last axes, which carry the most traffic (tensor: every layer; sequence:
# every attention call); data-parallel replicas talk only for gradients.
MESH_AXES = ("data", "fsdp", "sequence", "tensor")
MODES = ("inference", "training")

# logical name -> (mesh axes for inference, mesh axes for gate training)
RULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "batch": (("data",), ("data", "fsdp")),
    "length": ((), ("sequence",)),  # inference: every sequence shard sees the whole chunk
    "sequence": (("sequence",), ("sequence",)),
    "window": ((), ()),
    "vocab": (("tensor", "sequence"), ("tensor",)),  # inference: see the module docstring
    "embed": ((), ("fsdp",)),
    "kv_heads": (("tensor",), ("tensor",)),
    "q_group": ((), ()),
    "qkv_group": ((), ()),  # packed q/k/v slots of a KV head: sliced after the product
    "gate_up": ((), ()),  # packed gate/up: split apart after the product
    "head_dim": ((), ()),
    "mlp": (("tensor", "sequence"), ("tensor",)),
    "layers": ((), ()),
}

# Inference: a mesh axis that a dimension named on the left cannot take (it does not
# divide it) goes to the dimension named on the right of the same array, where that
# divides: the KV cache's heads -> its slots (see the module docstring). Only divisibility
# spills; an axis already used elsewhere does not.
SPILL: dict[str, str] = {"kv_heads": "sequence"}

# The weights' and the cache's logical names come from the one table (duojax/layout.py).
PARAM_AXES: dict[str, tuple[str, ...]] = {**layout.TOP_AXES, "gates": layout.GATE_AXES}
LAYER_AXES = layout.LAYER_AXES
CACHE_AXES, WINDOW_AXES = layout.CACHE_AXES, layout.WINDOW_AXES
ACTIVATION_AXES = layout.ACTIVATION_AXES


class ShardingError(ValueError):
  """A mesh spec or a mesh that cannot hold the arrays asked of it."""


class ShardingWarning(UserWarning):
  """A mesh axis was dropped for a dimension it does not divide (that part is replicated)."""


# -- meshes ----------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _format(sizes: Mapping[str, int]) -> str:
  return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if sizes.get(a, 1) != 1) or "data=1"


def parse_mesh(spec: str | Mapping[str, int] | None,
               n_devices: int | None = None) -> dict[str, int]:
  """"data=2,tensor=4" -> {data: 2, fsdp: 1, sequence: 1, tensor: 4}.

  Unnamed axes have size 1. With n_devices, the sizes must multiply to it.
  """
  sizes = dict.fromkeys(MESH_AXES, 1)
  if spec is None or spec == "":
    items: list[tuple[str, object]] = []
  elif isinstance(spec, Mapping):
    items = list(spec.items())
  elif isinstance(spec, str):
    items = []
    for part in spec.split(","):
      key, eq, val = part.strip().partition("=")
      if not eq or not key.strip():
        raise ShardingError(f"--mesh {spec!r}: {part.strip()!r} is not AXIS=SIZE; write e.g. "
                            "data=2,tensor=4 (axes: " + ", ".join(MESH_AXES) + ")")
      items.append((key.strip(), val.strip()))
  else:
    raise ShardingError(f"a mesh spec is a string like 'data=2,tensor=4' or a dict, got {spec!r}")
  seen = set()
  for key, val in items:
    if key not in sizes:
      raise ShardingError(f"--mesh: unknown axis {key!r}; the axes are {', '.join(MESH_AXES)}")
    if key in seen:
      raise ShardingError(f"--mesh: axis {key!r} is given twice")
    seen.add(key)
    if isinstance(val, (int, np.integer)) and not isinstance(val, bool):
      n = int(val)
    elif isinstance(val, str) and val.isdigit():
      n = int(val)
    else:
      n = 0
    if n < 1:
      raise ShardingError(f"--mesh: {key}={val!r} is not a size; sizes are whole numbers >= 1")
    sizes[key] = n
  if n_devices is not None:
    total = math.prod(sizes.values())
    if total != n_devices:
      if n_devices % total == 0:
        hint = dict(sizes, data=sizes["data"] * (n_devices // total))
      else:
        hint = dict.fromkeys(MESH_AXES, 1) | {"data": n_devices}
      raise ShardingError(
          f"--mesh {_format(sizes)} uses {total} devices but {n_devices} are there: the sizes "
          f"must multiply to {n_devices} (each a divisor of it: "
          f"{', '.join(map(str, _divisors(n_devices)))}), e.g. {_format(hint)}; to use fewer "
          "devices, pass them explicitly (make_mesh(spec, jax.devices()[:n]))")
  return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A Mesh with all four axes (size 1 where not named). spec None: one device."""
  if devices is None:
    devices = jax.devices()[:1] if not spec else jax.devices()
  devices = list(devices)
  sizes = parse_mesh(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:  # keeps ICI neighbours on the inner axes on TPU
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    arr = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(arr, MESH_AXES)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
  return {a: int(mesh.shape.get(a, 1)) for a in MESH_AXES}


# -- logical names -> PartitionSpec ------------------------------------------------------

def mesh_axes_for(name: str | None, mode: str = "inference") -> tuple[str, ...]:
  if mode not in MODES:
    raise ShardingError(f"sharding mode {mode!r}: choose from {', '.join(MODES)}")
  if name is None:
    return ()
  if name not in RULES:
    raise ShardingError(f"unknown logical axis {name!r}; the rules know {', '.join(RULES)} "
                        "(add new names to RULES in duojax/sharding.py)")
  return RULES[name][MODES.index(mode)]


def flax_rules(mode: str = "inference") -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """The rules as (logical, mesh axes) pairs, the form flax's logical-axis helpers take."""
  out = []
  for name in RULES:
    axes = mesh_axes_for(name, mode)
    out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(out)


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             mode: str = "inference", strict: bool | Collection[str] = False,
             what: str = "array", notes: list | None = None) -> P:
  """PartitionSpec of an array whose dimensions carry logical `names`.

  A mesh axis that does not divide its dimension (or was already used by an
  earlier dimension) is dropped there. strict: True, or the logical names for
  which that is an error instead; otherwise the reason is appended to `notes`
  (or warned when notes is None).
  """
  if len(names) != len(shape):
    raise ShardingError(f"{what}: {len(names)} logical names {tuple(names)} for a "
                        f"{len(shape)}-d shape {tuple(shape)}")
  sizes = mesh_sizes(mesh)
  own_notes = notes is None
  notes = [] if notes is None else notes
  used: set[str] = set()
  kept: list[list[str]] = []
  dropped: list[tuple[int, str, str]] = []  # (dim index, mesh axis, note) a SPILL may take
  for i, (name, dim) in enumerate(zip(names, shape)):
    keep, prod = [], 1
    for ax in mesh_axes_for(name, mode):
      n = sizes[ax]
      if n == 1 or ax not in mesh.shape:
        continue
      if ax in used or dim % (prod * n):
        why = (f"{what}: {name} dimension of size {dim} is not divisible by {ax}={n}"
               if ax not in used else f"{what}: {ax} already splits another dimension")
        if strict is True or (strict and name in strict):
          raise ShardingError(f"{why}; sizes of {ax} that divide it: "
                              f"{', '.join(map(str, _divisors(dim)))}")
        if ax not in used and mode == "inference" and SPILL.get(name) in names:
          dropped.append((i, ax, why))
        else:
          notes.append(why + f"; replicated over {ax}")
        continue
      keep.append(ax)
      prod *= n
    used.update(keep)
    kept.append(keep)
  for i, ax, why in dropped:
    j = list(names).index(SPILL[names[i]])
    n_j = math.prod(sizes[a] for a in kept[j]) * sizes[ax]
    if ax not in used and shape[j] % n_j == 0:
      kept[j].append(ax)  # after the dimension's own axes: slice = own index * n + ax index
      used.add(ax)
    else:
      split = " x ".join(f"{a}={sizes[a]}" for a in kept[j] + [ax])
      notes.append(why + f"; replicated over {ax} (its {names[j]} dimension {shape[j]} is not "
                   f"divisible by {split} either: a multiple of {n_j} would split it)")
  out = [None if not k else k[0] if len(k) == 1 else tuple(k) for k in kept]
  if own_notes:
    _warn(notes)
  return P(*out)


def dim_axes(spec: P, i: int) -> tuple[str, ...]:
  """The mesh axes dimension i of `spec` is split over (outermost first)."""
  e = spec[i] if i < len(spec) else None
  return () if e is None else (e,) if isinstance(e, str) else tuple(e)


def capacity_multiple(mesh: Mesh | None) -> int:
  """A KV cache capacity that is a multiple of this can split its slots over `sequence`
  and, where a retrieval part's heads do not divide `tensor`, over `tensor` too."""
  if mesh is None:
    return 1
  s = mesh_sizes(mesh)
  return s["sequence"] * s["tensor"]


def _warn(notes: list) -> None:
  if notes:
    uniq = list(dict.fromkeys(notes))
    more = f" (and {len(uniq) - 8} more)" if len(uniq) > 8 else ""
    warnings.warn("; ".join(uniq[:8]) + more, ShardingWarning, stacklevel=3)


def named(mesh: Mesh, specs):
  """A tree of PartitionSpecs -> the same tree of NamedShardings."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


def logical_sharding(names, shape, mesh: Mesh, mode: str = "inference",
                     strict: bool | Collection[str] = False) -> NamedSharding:
  return NamedSharding(mesh, spec_for(names, shape, mesh, mode, strict))


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh,
              mode: str = "inference") -> jax.Array:
  """An activation constraint from logical names (inside jit)."""
  return jax.lax.with_sharding_constraint(x, logical_sharding(names, x.shape, mesh, mode))


# -- model fit ---------------------------------------------------------------------------

def check_fits(config, mesh: Mesh) -> None:
  """A tensor axis that does not divide the KV heads cannot hold the model: say what does.

  (The MLP and vocabulary fall back to replication; attention heads are not
  split inside a head.)
  """
  t = mesh_sizes(mesh)["tensor"]
  hkv = config.num_kv_heads
  if hkv % t:
    ok = ", ".join(map(str, _divisors(hkv)))
    raise ShardingError(
        f"mesh tensor={t} does not divide the {hkv} KV heads of {config.name}: tensor "
        f"parallelism splits whole KV heads; tensor sizes that work for this model: {ok}. "
        "To use more devices, put the rest on sequence (context parallelism) or data")


# -- params ------------------------------------------------------------------------------

def _shape_of(x) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, tuple) else tuple(x.shape)


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, (int, np.integer)) for d in x)


def _param_names(path, shape) -> tuple[str, ...]:
  keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
  name = keys[-1] if keys else None
  in_layers = bool(keys) and keys[0] == "layers"
  table = LAYER_AXES if in_layers else PARAM_AXES
  if not isinstance(name, str) or name not in table:
    where = "/".join(map(str, keys))
    raise ShardingError(f"param {where!r} has no logical axes; add its name to "
                        f"{'LAYER_AXES' if in_layers else 'PARAM_AXES'} in duojax/layout.py")
  names = table[name]
  # stacked params (gate training scans layers: [L, ...]) carry one more leading axis
  if len(shape) == len(names) + 1:
    return ("layers",) + names
  if len(shape) != len(names):
    raise ShardingError(f"param {'/'.join(map(str, keys))!r} has shape {shape}; expected "
                        f"{len(names)} dims {names} (or a leading layers axis)")
  return names


def _is_quantized(x) -> bool:
  """A quantised weight (a qwix QArray: its integer `qvalue` and its `scale`), checked by
  its fields so that bf16 models and this module need no qwix."""
  return hasattr(x, "qvalue") and hasattr(x, "scale")


def _is_param_leaf(x) -> bool:
  return _is_shape(x) or _is_quantized(x)


def _quantized_parts(q, value_rule, part_rule):
  """A QArray with `value_rule(qvalue)` in place of its value leaf and `part_rule(leaf)`
  in place of each other leaf (scale, zero point), through the QArray's own pytree node, so
  the result has the params' tree structure (what device_put and jit's shardings need)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(q)
  out = [value_rule(x) if any(getattr(k, "name", None) == "qvalue" for k in p) else part_rule(x)
         for p, x in leaves]
  return jax.tree_util.tree_unflatten(treedef, out)


def _part_spec(value_spec: P, value_shape, shape, what: str, mesh: Mesh) -> P:
  """A scale's (or zero point's) PartitionSpec from its weight's: the weight's mesh axes
  on a dimension of the weight's size, replicated on a size-1 one (one scale spans it);
  a per-group dimension (qwix subchannel scales) keeps the weight's axes where every shard
  holds whole groups, else it is replicated."""
  if len(shape) != len(value_shape):
    raise ShardingError(f"{what}: a quantisation scale of shape {tuple(shape)} for a weight "
                        f"of shape {tuple(value_shape)}; scales keep the weight's rank (1 on "
                        "the contracted axes: duojax/model/quant.py)")
  sizes = mesh_sizes(mesh)
  out = []
  for i, (n, d) in enumerate(zip(value_shape, shape)):
    axes = dim_axes(value_spec, i)
    split = math.prod(sizes[a] for a in axes)
    keep = axes if d == n or (d > 1 and n % d == 0 and d % split == 0) else ()
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out)


def param_logical_axes(params):
  """The params tree (arrays, ShapeDtypeStructs or shape tuples) -> logical names per leaf.
  A quantised weight's value has the weight's names; its scale None where it is 1."""
  def one(p, x):
    if not _is_quantized(x):
      return _param_names(p, _shape_of(x))
    names = _param_names(p, _shape_of(x.qvalue))
    return _quantized_parts(x, lambda v: names, lambda s: tuple(
        None if d == 1 != n else a for a, d, n in zip(names, _shape_of(s), _shape_of(x.qvalue))))
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_param_leaf)


def param_specs(params, mesh: Mesh, mode: str = "inference",
                strict: bool | Collection[str] = False, config=None):
  """PartitionSpec per param. config: checks first that the mesh can hold the model.
  Quantised weights (QArrays) get one per leaf: see the module docstring."""
  if config is not None:
    check_fits(config, mesh)
  notes: list = []

  def one(path, x):
    what = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    if _is_quantized(x):
      shape = _shape_of(x.qvalue)
      spec = spec_for(_param_names(path, shape), shape, mesh, mode, strict, what, notes)
      return _quantized_parts(x, lambda v: spec,
                              lambda s: _part_spec(spec, shape, _shape_of(s), what, mesh))
    shape = _shape_of(x)
    return spec_for(_param_names(path, shape), shape, mesh, mode, strict, what, notes)
  out = jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_param_leaf)
  _warn(_dedup_layers(notes))
  return out


def _dedup_layers(notes: list) -> list:
  """"layers/3/wq: ..." for every layer says the same thing once."""
  import re
  return list(dict.fromkeys(re.sub(r"layers/\d+/", "layers/*/", n) for n in notes))


def param_shardings(params, mesh: Mesh, mode: str = "inference",
                    strict: bool | Collection[str] = False, config=None):
  """NamedSharding per param (the target of device_put or an orbax restore)."""
  return named(mesh, param_specs(params, mesh, mode, strict, config))


def config_param_shardings(config, mesh: Mesh, mode: str = "inference",
                           strict: bool | Collection[str] = False):
  """NamedShardings of the plain params dict (per-layer list) of `config`, from its shapes
  alone (duojax/layout.py): the target of a checkpoint restore straight onto `mesh`."""
  return param_shardings(layout.param_shapes(config), mesh, mode, strict, config)


# -- KV cache ----------------------------------------------------------------------------

def _cache_axes(c):
  """The cache pytree with each array leaf replaced by its logical names."""
  from duojax import compensation  # imports cache; only needed for its cache type
  if isinstance(c, kvc.KVCache):
    return kvc.KVCache(tuple(_cache_axes(l) for l in c.layers), ("batch",))
  from duojax.kv_quant import axes_like  # quantised buffers: codes, scale, zero
  if isinstance(c, kvc.FullLayerCache):
    return kvc.FullLayerCache(*(axes_like(x, CACHE_AXES, layout.CACHE_SCALE_AXES)
                                for x in (c.k, c.v)))
  if isinstance(c, kvc.StreamLayerCache):
    return kvc.StreamLayerCache(*(axes_like(x, WINDOW_AXES, layout.WINDOW_SCALE_AXES)
                                  for x in (c.k, c.v)), c.sink, c.recent)
  if isinstance(c, kvc.DuoLayerCache):
    return kvc.DuoLayerCache(_cache_axes(c.full), _cache_axes(c.stream))
  if isinstance(c, compensation.CompLayerCache):
    comp = ("batch", "kv_heads", "head_dim")
    return compensation.CompLayerCache(_cache_axes(c.stream), comp, comp, ("batch",))
  raise ShardingError(f"no sharding rule for cache part {type(c).__name__}; add it to "
                      "_cache_axes in duojax/sharding.py")


def cache_specs(cache, mesh: Mesh, mode: str = "inference"):
  """PartitionSpecs for a KVCache (or one layer's cache) of arrays or ShapeDtypeStructs.

  Retrieval parts split over `sequence` (their capacity must be a multiple of it:
  an error otherwise, since context-parallel attention relies on it) and batch over
  `data`; a part whose heads `tensor` does not divide splits its slots over
  ("sequence", "tensor") instead where the capacity allows (`SPILL`); streaming parts
  are replicated over `sequence`.
  """
  axes = _cache_axes(cache)
  notes: list = []
  is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, str) for n in x)
  flat_names, treedef = jax.tree_util.tree_flatten(axes, is_leaf=is_names)
  leaves = treedef.flatten_up_to(cache)
  specs = [_cache_spec(n, l.shape, mesh, mode, notes) for n, l in zip(flat_names, leaves)]
  _warn(notes)
  return jax.tree_util.tree_unflatten(treedef, specs)


def _cache_spec(names, shape, mesh, mode, notes):
  if "sequence" in names and shape[names.index("sequence")] % mesh_sizes(mesh)["sequence"]:
    n, s = mesh_sizes(mesh)["sequence"], shape[names.index("sequence")]
    raise ShardingError(f"KV cache capacity {s} is not a multiple of sequence={n}; allocate "
                        f"{-(-s // n) * n} slots (capacity rounded up to a multiple of {n})")
  what = "kv cache (streaming part)" if "window" in names else "kv cache (retrieval part)"
  return spec_for(names, shape, mesh, mode, False, what, notes)


def splits_sequence(cache, mesh: Mesh, mode: str = "inference") -> bool:
  """Whether any retrieval part of `cache` has its slots split over a mesh axis: then
  attention must run context-parallel (duojax.context_parallel), not GSPMD-partitioned
  (which would gather the slices back onto every device)."""
  axes = _cache_axes(cache)
  is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, str) for n in x)
  flat_names, treedef = jax.tree_util.tree_flatten(axes, is_leaf=is_names)
  for names, leaf in zip(flat_names, treedef.flatten_up_to(cache)):
    if "sequence" in names:
      spec = spec_for(names, leaf.shape, mesh, mode, False, "kv cache", [])
      if dim_axes(spec, names.index("sequence")):
        return True
  return False


def cache_shardings(cache, mesh: Mesh, mode: str = "inference"):
  return named(mesh, cache_specs(cache, mesh, mode))


def abstract(tree, shardings):
  """Arrays or ShapeDtypeStructs -> ShapeDtypeStructs carrying `shardings` (for AOT
  lowering without allocating anything)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
