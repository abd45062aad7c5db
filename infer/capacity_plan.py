"""Capacity plan: per-device bytes of serving a model on a mesh, from compiled executables.

Nothing is allocated. The weights (bf16) and the KV cache are ShapeDtypeStructs carrying
the shardings the library itself would place them with (`engine.mesh_placement`: the
rules of duojax/sharding.py over the param shapes of duojax/layout.py and the cache
shapes of duojax/cache.py); the engine's jitted decode step (`engine.decode`, one token:
sample from the last hidden state, run every layer on the cache, retrieval heads
context-parallel over `sequence`) is lowered and compiled AOT for fake CPU devices, and
XLA's memory analysis gives what each device holds.

  python -m infer.capacity_plan          # the default plan below, ~5 min on 2 CPU cores
  python -m infer.capacity_plan --models llama3-8b --contexts 32K --meshes "sequence=2,tensor=4"
  python -m infer.capacity_plan --devices 4 --meshes "tensor=4" --contexts 64 --out /tmp/plan \
      --shape layers=2,kv_heads=4,heads=8,head_dim=8,hidden=16,mlp=24,vocab=41  # a tiny check

Default plan: Llama-3-8B and a Llama-3-70B shape, full attention vs "duo 0.5" (every
layer keeps half its KV heads as retrieval heads, the shape a global 50% pattern has on
average; sink 64, recent 256), 128K / 1M / 4M tokens, batch 1, on 4, 8, 16 and 64
devices. Tensor parallelism splits whole KV heads, so `tensor` is at most 8 for both
models and the rest of the devices go on `sequence` (context parallelism); the MLP width
and the vocabulary split over tensor x sequence. Two shapes per device count from 8 on:
tensor=8 and tensor=4 (a duo 0.5 layer has 4 retrieval heads: at tensor=8 they do not
divide `tensor`, and the rules split that cache part's slots over sequence x tensor
instead of its heads; both shapes are kept to show that this costs nothing).

Method, as measured (per device):
  weights   sum over the params of their shard's bytes (sharding.param_shardings)
  KV cache  sum over the cache arrays of their shard's bytes (sharding.cache_shardings)
  temp      XLA's temporaries of the compiled decode step of a ONE-layer model with the
            real widths (embedding, LM head, one block, that layer's cache): layers run one
            after another, so an accelerator's peak holds one layer's temporaries. (On CPU
            a deeper compile grows them: the CPU compiler turns every bf16 dot into an fp32
            one and hoists the fp32 copies of all layers' weights out of the loop.)
  other     the step's other arguments (last hidden state, PRNG key) and its outputs that
            do not alias the donated cache
  total     weights + KV cache + temp + other, for the whole depth
The compiled argument bytes are checked against weights + cache + other for the compiled
depth (`args_check_bytes` = 0); `--compile-layers all` compiles the whole depth instead.

The temp figure is the CPU compiler's and an upper bound for TPU/GPU: it holds fp32 copies
of the LM head's and the embedding's slices, of one layer's weight slices and of the
attended cache slice (CPU dots run in fp32), which a bf16 dot on an accelerator does not
make. Verdict: the chips whose HBM holds the total with 10% headroom (GB = 1e9 bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "capacity-plan"

# name: (layers, KV heads, query heads, head dim, d_model, MLP width, vocab)
MODELS = {
    "llama3-8b": (32, 8, 32, 128, 4096, 14336, 128256),
    "llama3-70b": (80, 8, 64, 128, 8192, 28672, 128256),
}
SHAPE_KEYS = ("layers", "kv_heads", "heads", "head_dim", "hidden", "mlp", "vocab")
# mesh specs (duojax.sharding.parse_mesh) of 4, 8, 16, 64 devices; tensor <= the 8 KV heads
DEFAULT_MESHES = ("tensor=4", "tensor=8", "sequence=2,tensor=4", "sequence=2,tensor=8",
                  "sequence=4,tensor=4", "sequence=8,tensor=8", "sequence=16,tensor=4")
CHIPS = (("v5e", 16e9), ("v5p", 95e9), ("H200", 141e9))  # HBM per chip, bytes
HEADROOM = 0.10
GB = 1e9


def _tokens(s: str) -> int:
  s = s.strip().upper()
  mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
  try:
    return int(s[:-1] if s[-1:] in "KM" else s) * mult
  except ValueError:
    raise SystemExit(f"--contexts: {s!r} is not a token count; write e.g. 128K,1M,4M or 4096")


def _label(n: int) -> str:
  for unit, m in (("M", 1 << 20), ("K", 1 << 10)):
    if n % m == 0:
      return f"{n // m}{unit}"
  return str(n)


def parse_shape(spec: str) -> tuple[int, ...]:
  """'layers=2,kv_heads=4,heads=8,head_dim=8,hidden=16,mlp=24,vocab=41' -> MODELS tuple."""
  got = {}
  for part in spec.split(","):
    k, eq, v = part.strip().partition("=")
    if not eq or k not in SHAPE_KEYS or not v.isdigit() or int(v) < 1:
      raise SystemExit(f"--shape {spec!r}: {part.strip()!r} is not KEY=N with KEY one of "
                       f"{', '.join(SHAPE_KEYS)}")
    got[k] = int(v)
  missing = [k for k in SHAPE_KEYS if k not in got]
  if missing:
    raise SystemExit(f"--shape {spec!r} lacks {', '.join(missing)}")
  return tuple(got[k] for k in SHAPE_KEYS)


def model_config(name: str, shape: tuple[int, ...] | None = None, layers: int | None = None):
  """The ModelConfig of a plan model (the real widths; `layers` overrides the depth)."""
  from duojax.config import ModelConfig
  n_layers, hkv, hq, d, e, f, v = shape if shape is not None else MODELS[name]
  return ModelConfig(vocab_size=v, hidden_size=e, intermediate_size=f,
                     num_layers=layers or n_layers, num_heads=hq, num_kv_heads=hkv,
                     head_dim=d, rope_theta=500000.0, max_position_embeddings=1 << 23,
                     name=name)


def duo_mask(config, sparsity: float, sink: int, recent: int):
  """None for full attention; else every layer keeps its first Hkv - round(sparsity * Hkv)
  KV heads as retrieval heads (what a global quantile leaves a layer on average)."""
  import numpy as np
  from duojax.pattern import HeadMask
  if sparsity == 0:
    return None
  hkv = config.num_kv_heads
  n_r = hkv - int(round(sparsity * hkv))
  rows = np.broadcast_to(np.arange(hkv)[None, :] < n_r, (config.num_layers, hkv))
  return HeadMask.from_array(rows, sink, recent)


def _total_bytes(tree) -> int:
  import jax
  import numpy as np
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def placement(config, mask, batch: int, context: int, mesh, dtype="bfloat16"):
  """(abstract handle, abstract cache, MeshPlacement, notes): what the engine would place,
  as ShapeDtypeStructs with their shardings (nothing allocated)."""
  import jax
  import jax.numpy as jnp
  from duojax import cache as kvc
  from duojax import engine, layout
  from duojax import sharding as sh
  from duojax.model import handle as model_handle

  dtype = jnp.dtype(dtype)
  handle = model_handle.from_params(config, layout.abstract_params(config, dtype), mask,
                                    reordered=True)
  cache = jax.eval_shape(lambda: kvc.init_cache(config, batch, context, mask, dtype))
  with warnings.catch_warnings(record=True) as caught:  # the rules' "replicated over" notes
    warnings.simplefilter("always", sh.ShardingWarning)
    pl = engine.mesh_placement(mesh, handle, cache, config)
  notes = sorted({str(w.message) for w in caught if issubclass(w.category, sh.ShardingWarning)})
  return sh.abstract(handle, pl.model), sh.abstract(cache, pl.cache), pl, notes


def compile_decode(config, handle, cache, pl, mesh):
  """The engine's decode step for one token, jitted as engine.mesh_decode jits it (explicit
  in/out shardings, the cache donated), lowered and compiled; returns the executable."""
  import jax
  from duojax import engine
  from duojax import sharding as sh

  be = engine.mesh_backend(mesh, "xla", cache)  # context-parallel where the slots split
  sampling = engine.SamplingSettings()
  eos = tuple(config.eos_token_ids)

  def dec(model, cache, last_hidden, key):
    return engine.decode(model, config, cache, last_hidden, key, 1, sampling, eos, be)
  step = jax.jit(dec, in_shardings=(pl.model, pl.cache, pl.hidden, pl.replicated),
                 out_shardings=(pl.tokens, pl.replicated, pl.cache), donate_argnums=(1,))
  b = cache.lengths.shape[0]
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  args = (handle, cache,
          jax.ShapeDtypeStruct((b, config.hidden_size), handle.dtype, sharding=pl.hidden),
          jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=pl.replicated))
  with warnings.catch_warnings(record=True) as caught:  # tracing repeats placement's notes
    warnings.simplefilter("always", sh.ShardingWarning)
    exe = step.lower(*args).compile()
  notes = sorted({str(w.message) for w in caught if issubclass(w.category, sh.ShardingWarning)})
  return exe, args, notes


def plan_row(model: str, context: int, mesh_spec: str, sparsity: float, batch: int = 1,
             sink: int = 64, recent: int = 256, compile_layers: int | None = 1,
             shape: tuple[int, ...] | None = None, dtype: str = "bfloat16") -> dict:
  """One configuration: per-device bytes of weights, cache, temporaries (see the module
  docstring). compile_layers: depth of the compiled model (None: the whole depth)."""
  import jax
  from duojax import sharding as sh

  full = model_config(model, shape)
  sizes = sh.parse_mesh(mesh_spec)
  n = math.prod(sizes.values())
  if n > jax.device_count():
    raise sh.ShardingError(f"mesh {mesh_spec} needs {n} devices, this process has "
                           f"{jax.device_count()}; run with --devices {n} (fake CPU devices)")
  mesh = sh.make_mesh(mesh_spec, jax.devices()[:n])
  sh.check_fits(full, mesh)  # a mesh that cannot hold the weights is no plan
  mask = duo_mask(full, sparsity, sink, recent)
  # the whole depth, from the library's shapes and rules (no compile)
  handle, cache, _, notes = placement(full, mask, batch, context, mesh, dtype)
  w_dev, c_dev = _dev_bytes(handle), _dev_bytes(cache)
  c_dev_layer = _dev_bytes(cache.layers[0])
  # the compiled depth
  lc = full.num_layers if compile_layers is None else min(compile_layers, full.num_layers)
  cfg_c = model_config(model, shape, lc)
  mask_c = duo_mask(cfg_c, sparsity, sink, recent)
  h_c, cache_c, pl_c, _ = placement(cfg_c, mask_c, batch, context, mesh, dtype)
  t0 = time.perf_counter()
  exe, args, compile_notes = compile_decode(cfg_c, h_c, cache_c, pl_c, mesh)
  compile_s = time.perf_counter() - t0
  mem = exe.memory_analysis()
  w_c, c_c = _dev_bytes(h_c), _dev_bytes(cache_c)
  other_args = _dev_bytes(args[2:])  # last hidden state, PRNG key
  extra_out = mem.output_size_in_bytes - mem.alias_size_in_bytes
  other = other_args + extra_out
  total = w_dev + c_dev + mem.temp_size_in_bytes + other
  return {
      "model": model, "layers": full.num_layers, "context": context, "batch": batch,
      "mesh": mesh_spec, "devices": n, "tensor": sizes["tensor"], "sequence": sizes["sequence"],
      "data": sizes["data"],
      "attention": "full" if sparsity == 0 else f"duo {sparsity:g}",
      "retrieval_heads_per_layer": full.num_kv_heads if mask is None else mask.n_retrieval(0),
      "sink": sink, "recent": recent, "dtype": dtype,
      "weights_total": _total_bytes(handle.state), "cache_total": _total_bytes(cache),
      "weights_per_device": w_dev, "cache_per_device": c_dev,
      "cache_per_device_layer": c_dev_layer,
      "temp_per_device": mem.temp_size_in_bytes, "other_per_device": other,
      "total_per_device": total, "fits": fits(total), "verdict": verdict(total),
      "notes": sorted(set(notes) | set(compile_notes)),
      "compiled": {"layers": lc, "seconds": round(compile_s, 2),
                   "argument_bytes": mem.argument_size_in_bytes,
                   "output_bytes": mem.output_size_in_bytes,
                   "alias_bytes": mem.alias_size_in_bytes,
                   "temp_bytes": mem.temp_size_in_bytes,
                   "weights_per_device": w_c, "cache_per_device": c_c,
                   "other_args_per_device": other_args,
                   # 0 when the executable's arguments are exactly what the rules place
                   "args_check_bytes": mem.argument_size_in_bytes - (w_c + c_c + other_args)},
  }


def _dev_bytes(tree) -> int:
  """Bytes of one device's shard of every ShapeDtypeStruct in `tree` (its own sharding;
  every device of a NamedSharding holds the same shard shape)."""
  import jax
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(tree))


def fits(total: int) -> list[str]:
  """Chips whose HBM holds `total` bytes with HEADROOM to spare."""
  return [name for name, hbm in CHIPS if total <= (1 - HEADROOM) * hbm]


def verdict(total: int) -> str:
  ok = fits(total)
  return ", ".join(ok) if ok else f"none (> {(1 - HEADROOM) * CHIPS[-1][1] / GB:.0f} GB)"


# -- output ----------------------------------------------------------------------------

COLUMNS = ("model", "context", "devices", "mesh", "attention", "weights GB", "KV cache GB",
           "temp GB", "total GB", "fits (10% headroom)")


def _gb(x: int) -> str:
  return f"{x / GB:.2f}" if x < 10 * GB else f"{x / GB:.1f}"


def table_line(r: dict) -> str:
  if "error" in r:
    return (f"| {r['model']} | {_label(r['context'])} | | {r['mesh']} | sparsity {r['sparsity']:g} "
            f"| error: {r['error']} | | | | |")
  cells = (r["model"], _label(r["context"]), r["devices"], r["mesh"], r["attention"],
           _gb(r["weights_per_device"]), _gb(r["cache_per_device"]), _gb(r["temp_per_device"]),
           _gb(r["total_per_device"]), r["verdict"])
  return "| " + " | ".join(map(str, cells)) + " |"


def table(rows: list[dict]) -> str:
  head = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  return "\n".join(head + [table_line(r) for r in rows]) + "\n"


def summary(rows: list[dict]) -> str:
  """Per (model, attention, context) and device count: the mesh with the fewest bytes per
  device, its total GB and the chips it fits."""
  ok = [r for r in rows if "error" not in r]
  counts = sorted({r["devices"] for r in ok})
  head = ("| model | attention | context | " + " | ".join(f"{n} devices" for n in counts)
          + " |\n|---|---|---|" + "---|" * len(counts))
  lines = [head]
  keys = dict.fromkeys((r["model"], r["attention"], r["context"]) for r in ok)
  for m, att, ctx in keys:
    cells = []
    for n in counts:
      cand = [r for r in ok if (r["model"], r["attention"], r["context"], r["devices"])
              == (m, att, ctx, n)]
      if not cand:
        cells.append("")
        continue
      best = min(cand, key=lambda r: r["total_per_device"])
      cells.append(f"{_gb(best['total_per_device'])} GB ({best['mesh']}): "
                   f"{', '.join(best['fits']) or 'none'}")
    lines.append(f"| {m} | {att} | {_label(ctx)} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
  """Per-device GB vs context, one line per mesh (colour) and attention (full solid, duo
  dashed), one panel per model; the chips' HBM as horizontal lines."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FuncFormatter
  ok = [r for r in rows if "error" not in r]
  models = list(dict.fromkeys(r["model"] for r in ok))
  meshes = sorted(dict.fromkeys((r["devices"], r["mesh"]) for r in ok))
  atts = list(dict.fromkeys(r["attention"] for r in ok))
  colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(meshes)}
  fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5.8), squeeze=False)
  for ax, model in zip(axes[0], models):
    for dev, mesh in meshes:
      for att in atts:
        pts = sorted((r["context"], r["total_per_device"]) for r in ok if
                     (r["model"], r["mesh"], r["attention"]) == (model, mesh, att))
        if pts:
          ax.plot([p[0] for p in pts], [p[1] / GB for p in pts],
                  "-" if att == "full" else "--", marker="o" if att == "full" else "s",
                  ms=4, color=colors[(dev, mesh)], label=f"{dev} devices: {mesh}, {att}")
    for chip, hbm in CHIPS:
      ax.axhline(hbm / GB, color="gray", lw=0.9, ls=":")
      ax.text(0.99, hbm / GB * 1.03, f"{chip} {hbm / GB:.0f} GB", fontsize=8, color="dimgray",
              ha="right", va="bottom", transform=ax.get_yaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if str(y)[0] in "25" else ""))
    ctxs = sorted({r["context"] for r in ok})
    ax.set_xticks(ctxs, [_label(c) for c in ctxs])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("GB per device (weights + KV cache + temp)")
    ax.set_title(f"{model}: batch 1, bf16, one decode step")
    ax.grid(alpha=0.25, which="both")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7.5, frameon=False)
  fig.tight_layout(rect=(0, 0.05 + 0.028 * math.ceil(len(labels) / 4), 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", default="llama3-8b,llama3-70b",
                  help=f"comma list of {', '.join(MODELS)}")
  ap.add_argument("--shape", default=None,
                  help="a custom model instead: " + ",".join(f"{k}=N" for k in SHAPE_KEYS))
  ap.add_argument("--contexts", default="128K,1M,4M", help="comma list, K = 1024, M = 1024^2")
  ap.add_argument("--meshes", default=";".join(DEFAULT_MESHES),
                  help="';'-separated mesh specs (duojax.sharding.parse_mesh)")
  ap.add_argument("--sparsities", default="0,0.5", help="0 = full attention")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--sink", type=int, default=64)
  ap.add_argument("--recent", type=int, default=256)
  ap.add_argument("--compile-layers", default="1",
                  help="depth of the compiled model: N, or 'all' (CPU temps then grow, see above)")
  ap.add_argument("--devices", type=int, default=64, help="fake CPU devices to compile for")
  ap.add_argument("--out", default=str(DEFAULT_OUT), help="folder for plan.json/.png, table.md")
  ap.add_argument("--render-only", action="store_true",
                  help="rewrite table.md, README-snippet.md and plan.png from OUT/plan.json")
  return ap.parse_args(argv)


def _reading(rows) -> str:
  """What the rules imply, with figures from the rows."""
  ok = [r for r in rows if "error" not in r]
  lines = []
  rep = [r for r in ok if r["attention"] != "full" and r["retrieval_heads_per_layer"] % r["tensor"]]
  if rep:
    r = max(rep, key=lambda r: (r["context"], -r["devices"]))
    full = next((f for f in ok if f["attention"] == "full" and
                 (f["model"], f["mesh"], f["context"]) == (r["model"], r["mesh"], r["context"])),
                None)
    ratio = (f" ({r['cache_per_device'] / full['cache_per_device']:.2f}x full attention's "
             f"per-device cache on {r['mesh']}, {r['model']}, {_label(r['context'])})"
             if full else "")
    lines.append(
        f"- A duo layer keeps {r['retrieval_heads_per_layer']} retrieval heads: where `tensor` "
        "does not divide them the rules split that cache part's slots over sequence x tensor "
        "instead of its heads (context-parallel attention merges over both axes)" + ratio + ".")
  w = {}
  for r in ok:
    if r["model"] not in w or r["weights_per_device"] < w[r["model"]][0]:
      w[r["model"]] = (r["weights_per_device"], r["mesh"])
  for m, (b, mesh) in w.items():
    lines.append(f"- {m}: weights {_gb(b)} GB per device at best ({mesh}): attention splits "
                 "whole KV heads over `tensor`, the MLP and the vocabulary over tensor x "
                 "sequence.")
  lines.append("- temp is the CPU compiler's temporaries of a one-layer decode step (fp32 "
               "copies of bf16 operands, which a TPU/GPU dot does not make): an upper bound; "
               "weights and KV cache are exact shard bytes.")
  return ("\n" + "\n".join(lines) + "\n") if lines else ""


def _snippet(rows, command: str, wall_s: float) -> str:
  return (
      "### Capacity plan (compiled, nothing allocated)\n\n"
      "Per-device bytes of serving with `--mesh`, bf16, batch 1, from the engine's decode step "
      "compiled AOT for fake CPU devices (`jax.jit(...).lower(...).compile().memory_analysis()`): "
      "weights and KV cache as the sharding rules place them, plus the compiled step's "
      "temporaries (a one-layer compile; the CPU compiler's, an upper bound for TPU/GPU). "
      "\"duo 0.5\": half of every layer's KV heads are retrieval heads (sink 64, recent 256). "
      "Each cell: the best mesh of that many devices, its total GB per device, and the chips "
      "that hold it with 10% headroom (TPU v5e 16 GB, v5p 95 GB, H200 141 GB).\n\n"
      + summary(rows) + _reading(rows) +
      f"\nAll meshes, with the weights / KV cache / temp split: "
      f"`infer/results/capacity-plan/table.md` (plot: `plan.png`). Reproduce "
      f"({wall_s / 60:.0f} min on 2 CPU cores):\n\n```\n{command}\n```\n")


def main(argv=None) -> int:
  a = _args(argv)
  if a.render_only:
    plan = json.loads((Path(a.out) / "plan.json").read_text())
    write_reports(plan["meta"], plan["rows"], Path(a.out))
    return 0
  if "jax" not in sys.modules:  # fake devices must be asked for before jax starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={a.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  from duojax.sharding import ShardingError, parse_mesh
  shape = parse_shape(a.shape) if a.shape else None
  models = ["custom"] if shape else [m.strip() for m in a.models.split(",")]
  for m in models:
    if m not in MODELS and not shape:
      raise SystemExit(f"--models: unknown {m!r}; choose from {', '.join(MODELS)} or give --shape")
  layers = None if a.compile_layers == "all" else int(a.compile_layers)
  meshes = [s.strip() for s in a.meshes.split(";") if s.strip()]
  need = max(math.prod(parse_mesh(s).values()) for s in meshes)
  if jax.device_count() < need:
    raise SystemExit(f"the meshes need {need} devices, this process has {jax.device_count()}: "
                     f"pass --devices {need} (it only works before jax is imported)")
  t0 = time.perf_counter()
  rows = []
  print(table([]), end="", flush=True)
  for model in models:
    for ctx in (_tokens(c) for c in a.contexts.split(",")):
      for spec in sorted(meshes, key=lambda s: (math.prod(parse_mesh(s).values()), s)):
        for sp in (float(s) for s in a.sparsities.split(",")):
          try:
            r = plan_row(model, ctx, spec, sp, a.batch, a.sink, a.recent, layers, shape)
          except ShardingError as e:
            rows.append({"model": model, "context": ctx, "mesh": spec, "sparsity": sp,
                         "error": str(e)})
            print(table_line(rows[-1]), flush=True)
            continue
          if r["compiled"]["args_check_bytes"]:
            print(f"warning: compiled arguments differ from the placed bytes by "
                  f"{r['compiled']['args_check_bytes']} ({spec}, {r['attention']})",
                  file=sys.stderr)
          rows.append(r)
          print(table_line(r), flush=True)
  wall = time.perf_counter() - t0
  ok = [r for r in rows if "error" not in r]
  print(f"\n{len(ok)} configurations compiled in {wall:.0f} s\n")
  print(summary(rows))
  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  args_given = sys.argv[1:] if argv is None else list(argv)
  command = shlex.join(["python", "-m", "infer.capacity_plan", *args_given])
  meta = {"command": command, "wall_seconds": round(wall, 1), "jax": jax.__version__,
          "backend": jax.default_backend(), "chips_bytes": dict(CHIPS), "headroom": HEADROOM,
          "method": __doc__.split("Method, as measured (per device):")[1].strip()}
  (out / "plan.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  write_reports(meta, rows, out)
  return 0


def write_reports(meta: dict, rows: list[dict], out: Path) -> None:
  """table.md, README-snippet.md and plan.png from a plan's rows (--render-only redoes
  them from plan.json without compiling)."""
  wall, command = meta["wall_seconds"], meta["command"]
  (out / "table.md").write_text(f"# Capacity plan\n\n`{command}` ({wall:.0f} s, jax "
                                f"{meta['jax']}, CPU)\n\n## Best mesh per device count\n\n"
                                + summary(rows) + "\n## All meshes\n\n" + table(rows))
  (out / "README-snippet.md").write_text(_snippet(rows, command, wall))
  if any("error" not in r for r in rows):
    plot(rows, out / "plan.png")
  print(f"wrote {out}/plan.json, table.md, README-snippet.md, plan.png")

if __name__ == "__main__":
  sys.exit(main())
