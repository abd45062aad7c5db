"""Packed projection weights: q/k/v in one tensor, gate/up in one tensor, for serving.

At batch 1 a decode step is bound by reading the weights, and one matrix-vector product
over a packed weight reads faster than several small ones: on an H200 the three q/k/v
products read at ~1.1 TB/s against ~2.7 TB/s for one packed [E, Hkv, G+2, D] product, and
gate/up at 3.79 TB/s separately against 4.18 packed (a micro-benchmark of 32 layers). In
the whole Llama-3-8B-shape decode step it saves 0.32-0.40 ms per token at batch 1, 32K and
128K, on an H100 (infer/results/h100-2026-12-07/). So a served model may hold

  wqkv [E, Hkv, G+2, D]   per KV head: its G query heads, then its key, then its value
  bqkv [Hkv, G+2, D]      the same for the biases (attention_bias: Qwen2)
  w_gate_up [E, 2, F]     gate, then up

in place of wq/wk/wv (bq/bk/bv) and w_gate/w_up. The KV-head axis stays where it was, so
a split over kv_heads (tensor parallelism, the DuoAttention head reorder) takes whole
groups exactly as before, and the MLP width stays the last axis.

Packing is a serving option only (`handle.prepare_params(pack=True)`): checkpoints, gate
training and every reader of the plain params dict (`Llama.to_params`, `ModelHandle.params`)
keep the unpacked layout, and `unpack_layer` gives it back bit for bit.

Axes are counted from the end, so a stacked [L, ...] layer dict packs the same way; a
quantised weight (a qwix QArray) packs leaf by leaf: its per-output-channel scales have
the weight's rank, so they concatenate with the codes and are exactly the scales that
quantising the packed weight would give.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# packed name -> the unpacked names it holds, in packing order
GROUPS: dict[str, tuple[str, ...]] = {
    "wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gate_up": ("w_gate", "w_up")}
PACKED_NAMES = tuple(GROUPS)
UNPACKED_NAMES = tuple(n for parts in GROUPS.values() for n in parts)


def _leafwise(fn, *ws):
  """fn over plain arrays, or over each leaf (codes, scales) of QArrays alike."""
  return jax.tree.map(fn, *ws)


def _pack_qkv(q, k, v):
  """q [..., Hkv, G, D], k, v [..., Hkv, D] -> [..., Hkv, G+2, D]."""
  return _leafwise(lambda q, k, v: jnp.concatenate([q, k[..., None, :], v[..., None, :]], -2),
                   q, k, v)


def _unpack_qkv(x):
  """[..., Hkv, G+2, D] -> q [..., Hkv, G, D], k, v [..., Hkv, D] (static slices)."""
  g = x.shape[-2] - 2
  return (_leafwise(lambda a: a[..., :g, :], x), _leafwise(lambda a: a[..., g, :], x),
          _leafwise(lambda a: a[..., g + 1, :], x))


def _pack_gate_up(gate, up):
  """gate, up [..., E, F] -> [..., E, 2, F]."""
  return _leafwise(lambda a, b: jnp.stack([a, b], axis=-2), gate, up)


def _unpack_gate_up(x):
  """[..., E, 2, F] -> gate, up [..., E, F]."""
  return _leafwise(lambda a: a[..., 0, :], x), _leafwise(lambda a: a[..., 1, :], x)


_PACK = {"wqkv": _pack_qkv, "bqkv": _pack_qkv, "w_gate_up": _pack_gate_up}
_UNPACK = {"wqkv": _unpack_qkv, "bqkv": _unpack_qkv, "w_gate_up": _unpack_gate_up}


def _check_unpackable(name: str, w) -> None:
  """Every leaf must span the packed axis whole (scales per output channel): a leaf with
  size 1 there would be one scale for q, k and v together, which slicing cannot split."""
  n = w.shape[-2]
  for leaf in jax.tree.leaves(w):
    if leaf.shape[-2] != n:
      raise ValueError(f"{name}: a part of shape {leaf.shape} does not span the packed axis "
                       f"({n}); its scales must be per output channel (model/quant.py)")


def layer_form(lp, where: str = "layer") -> str:
  """"packed" or "unpacked" for one layer's weight dict; a ValueError for a mix.

  A group is packed when its packed name is present, unpacked when any of its parts is;
  both at once, or attention packed but the MLP not (or the other way), is refused: the
  model is built for one layout per layer."""
  forms = {}
  for name, parts in GROUPS.items():
    have = [p for p in parts if p in lp]
    if name in lp and have:
      raise ValueError(f"{where} holds both the packed {name!r} and {have} (a mix of the "
                       "packed and unpacked layouts); pack or unpack the whole layer with "
                       "duojax.model.pack")
    if name in lp:
      forms[name] = "packed"
    elif have:
      forms[name] = "unpacked"
  got = set(forms.values())
  if len(got) > 1:
    packed = sorted(n for n, f in forms.items() if f == "packed")
    raise ValueError(f"{where} packs {packed} but not {sorted(set(forms) - set(packed))}; "
                     "pack or unpack the whole layer with duojax.model.pack")
  return got.pop() if got else "unpacked"


def is_packed(lp) -> bool:
  return layer_form(lp) == "packed"


def pack_layer(lp: dict) -> dict:
  """One layer's weights (per-layer or stacked [L, ...]) with q/k/v (and their biases) and
  gate/up packed; other weights as they are. A packed layer comes back as it is."""
  if layer_form(lp) == "packed":
    return lp
  out = {k: v for k, v in lp.items() if k not in UNPACKED_NAMES}
  for name, parts in GROUPS.items():
    have = [p for p in parts if p in lp]
    if not have:
      continue  # e.g. no biases
    if len(have) != len(parts):
      raise ValueError(f"layer weights have {have} but not all of {list(parts)}; cannot "
                       f"pack {name!r}")
    out[name] = _PACK[name](*(lp[p] for p in parts))
  return out


def unpack_layer(lp: dict) -> dict:
  """The exact inverse of `pack_layer` (static slices: bit-identical); an unpacked layer
  comes back as it is."""
  if layer_form(lp) == "unpacked":
    return lp
  out = {k: v for k, v in lp.items() if k not in PACKED_NAMES}
  for name in PACKED_NAMES:
    if name in lp:
      _check_unpackable(name, lp[name])
      out.update(zip(GROUPS[name], _UNPACK[name](lp[name])))
  return out


def _map_layers(fn, params: dict) -> dict:
  layers = params["layers"]
  return {**params, "layers": fn(layers) if isinstance(layers, dict) else [fn(l) for l in layers]}


def pack_params(params: dict, in_place: bool = False) -> dict:
  """The plain params dict (duojax/model/llama.py) with every layer packed.

  in_place: replace the layers of `params` itself (a per-layer list) one at a time, so each
  layer's unpacked q/k/v and gate/up are let go as soon as its packed copy exists, and the
  two layouts never sit side by side whole (for an 8B model in bf16 that is ~9 GB of
  device memory less at load). For a dict nothing else holds, e.g. one just read from a
  checkpoint; returns `params`.
  """
  if not in_place:
    return _map_layers(pack_layer, params)
  layers = params["layers"]
  if not isinstance(layers, list):
    raise ValueError("in_place packing takes per-layer params (a list of layer dicts)")
  for i in range(len(layers)):
    layers[i] = pack_layer(layers[i])  # the unpacked dict's last reference goes here
  return params


def unpack_params(params: dict) -> dict:
  """The plain params dict with every layer unpacked: the documented (checkpoint) layout."""
  return _map_layers(unpack_layer, params)
