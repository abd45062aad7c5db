"""The whole accuracy comparison for one model, as a Markdown table with heatmaps.

  python -m infer.eval_table --out results/smollm2            # the full table
  python -m infer.eval_table --out /tmp/quick --quick          # a tiny CPU smoke run

  python -m infer.eval_table --ckpt qwen2.5-coder-0.5b --pattern PAT \
      --patterns razor=RAZOR,rscore=RSCORE --attention full,duo,streaming,random,razor,rscore \
      --tasks niah,mkniah,passkey,ppl --lengths 4k,8k,16k,32k --ppl-haystack HELDOUT --out OUT
  python -m infer.eval_table --render OUT                       # the table again, from OUT/*.json

Methods, all on identical prompts: full attention; DuoAttention (the model's
pattern) at each --sparsities value; streaming (every head sink + recent, the
StreamingLLM-style budget); random heads at each sparsity (seeded); any
--patterns (razor, rscore, ...) at each sparsity, as `--attention` names them.
Tasks: needle in a haystack, multi-key NIAH (--keys same-kind needles, one
asked, exact match), numeric passkey over --lengths x --depths (greedy), and
perplexity of held-out windows (--ppl-haystack: text the gates were not trained
on) at the longest length, for --ppl-attention. The model loads once, and the
retrieval tasks share their compiled programs (one prefill + one decode per
method, compiled up front in parallel). Writes OUT/table.md,
OUT/{niah,mkniah,passkey}.png, OUT/ppl.png and the JSON of every cell and
setting (OUT/{niah,mkniah,passkey,ppl}.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import json

from duojax import cache as kvc
from duojax.kv_quant import KV_DTYPES
from duojax.eval import grid, harness, plots, ppl
from duojax.eval.methods import Method, build_methods

RETRIEVAL = ("niah", "mkniah", "passkey")
TASKS = RETRIEVAL + ("ppl",)

# A smoke run that finishes in minutes on a CPU: 4 methods, 2 x 2 cells per task.
QUICK = dict(lengths="300,600", depths="2", sparsities="0.5", ppl_samples=1, max_new_tokens=32)


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", default=None, help="checkpoint folder or embedded name (smollm2-135m)")
  ap.add_argument("--pattern", default=None, help="head pattern (default: the model's)")
  ap.add_argument("--out", default=None, help="output folder")
  ap.add_argument("--render", default=None, metavar="DIR",
                  help="print the table of an earlier run from DIR/*.json (runs nothing)")
  ap.add_argument("--haystack", default=None)
  ap.add_argument("--ppl-haystack", default=None,
                  help="held-out text for perplexity (default: --haystack); give text the "
                       "gates were not trained on")
  ap.add_argument("--attention", default=None,
                  help="comma list as in `python -m duojax.eval` (default: full, duo, streaming, "
                       "random at every --sparsities value)")
  ap.add_argument("--patterns", default=None, help="NAME=DIR[,NAME=DIR]: more patterns to compare")
  ap.add_argument("--ppl-attention", default=None,
                  help="methods for perplexity (default: --attention without random)")
  ap.add_argument("--samples", type=int, default=1, help="haystack windows per grid cell")
  ap.add_argument("--keys", type=int, default=4, help="mkniah: needles per prompt")
  ap.add_argument("--lengths", default="1000,2000,4000,8000")
  ap.add_argument("--depths", default="10")
  ap.add_argument("--sparsities", default="0.25,0.5,0.75")
  ap.add_argument("--tasks", default="niah,mkniah,passkey,ppl")
  ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                  help="chat template around prompts (default; --no-chat for raw text)")
  ap.add_argument("--sink", type=int, default=None)
  ap.add_argument("--recent", type=int, default=None)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
  ap.add_argument("--backend", default="auto")
  ap.add_argument("--kv-dtype", default=None, choices=KV_DTYPES,
                  help="the KV cache's storage for every method (default: the compute dtype); "
                       "int8 / int4 are quantised per token per KV head")
  ap.add_argument("--max-new-tokens", type=int, default=32)
  ap.add_argument("--batch-size", type=int, default=10)
  ap.add_argument("--prefill-chunk", type=int, default=1024)
  ap.add_argument("--ppl-samples", type=int, default=2, help="haystack windows for perplexity")
  ap.add_argument("--quick", action="store_true", help=f"tiny smoke run: {QUICK}")
  ap.add_argument("--no-progress", action="store_true")
  return ap


def methods_for(sparsities: list[float], attention: str | None = None,
                ppl_attention: str | None = None, sources: dict | None = None
                ) -> tuple[list[Method], list[Method]]:
  """(grid methods, perplexity methods)."""
  from duojax.eval.methods import parse_methods
  if attention is None:
    grid_m = ([Method("full")] + [Method("duo", s) for s in sparsities] + [Method("streaming")]
              + [Method("random", s) for s in sparsities])
  else:
    grid_m = parse_methods(attention, ",".join(map(str, sparsities)), sources=sources or {})
  if ppl_attention is None:
    ppl_m = [m for m in grid_m if m.kind != "random"]
  else:
    ppl_m = parse_methods(ppl_attention, ",".join(map(str, sparsities)), sources=sources or {})
  return grid_m, ppl_m


def main(argv=None) -> int:
  from duojax.checkpoint.hf import CheckpointError
  try:
    return run(argv)
  except (CheckpointError, ValueError) as e:  # PatternError, InputError, ConfigError included
    print(f"eval_table: error: {e}", file=sys.stderr)
    return 2


def run(argv=None) -> int:
  a = build_parser().parse_args(argv)
  if a.render:
    print(render_saved(Path(a.render)))
    return 0
  if not a.out:
    raise ValueError("--out is required (or --render DIR to print an earlier run's table)")
  if a.quick:
    for k, v in QUICK.items():
      setattr(a, k, v)
  from duojax.attention.dispatch import resolve_backend
  from duojax.eval.methods import parse_named_patterns, parse_sparsities
  from duojax.pattern import load_any
  t_start = time.perf_counter()
  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
  unknown = set(tasks) - set(TASKS)
  if unknown:
    raise ValueError(f"--tasks takes {', '.join(TASKS)}; got {sorted(unknown)}")
  lengths, depths = grid.parse_lengths(a.lengths), grid.parse_depths(a.depths)
  sparsities = parse_sparsities(a.sparsities)
  named = parse_named_patterns(a.patterns)
  grid_m, ppl_m = methods_for(sparsities, a.attention, a.ppl_attention, named)
  progress = not a.no_progress
  _compile_cache()
  model = harness.load_eval_model(a.ckpt, a.pattern, a.dtype, progress=progress)
  hay, hay_path = harness.load_haystack_tokens(a.haystack, model.tokenizer)
  backend = resolve_backend(a.backend)
  loaded = {n: load_any(d) for n, d in named.items()}
  every = list(dict.fromkeys(grid_m + ppl_m))
  built_all = build_methods(every, model.config, model.pattern, a.sink, a.recent, a.seed, loaded)
  by_name = {b.method.name: b for b in built_all}
  built = [by_name[m.name] for m in grid_m]
  gen_kw = dict(max_new_tokens=a.max_new_tokens, prefill_chunk=a.prefill_chunk,
                batch_size=a.batch_size, backend=backend, kv_dtype=a.kv_dtype)
  docs, wall, programs = {}, {}, {}
  for task in RETRIEVAL:
    if task not in tasks:
      continue
    t0 = time.perf_counter()
    docs[task] = harness.run_retrieval(task, model, hay, built, lengths, depths, a.chat, gen_kw,
                                       a.samples, seed=a.seed, num_keys=a.keys,
                                       progress=progress, programs=programs,
                                       extra_settings={"haystack": hay_path, "patterns": named,
                                                       "kv_dtype": a.kv_dtype})
    wall[task] = round(time.perf_counter() - t0, 1)
    harness.write_json(docs[task], out / f"{task}.json")
    metric = docs[task]["plot_metric"]
    plots.heatmaps(docs[task]["summary"][metric], out / f"{task}.png",
                   f"{task} - {model.config.name} ({metric.replace('_', ' ')})",
                   metric.replace("_", " "), panel_size=2.0)
  if "ppl" in tasks:
    t0 = time.perf_counter()
    held, held_path = (harness.load_haystack_tokens(a.ppl_haystack, model.tokenizer)
                       if a.ppl_haystack else (hay, hay_path))
    docs["ppl"] = ppl.evaluate(model.params, model.config, held,
                               [by_name[m.name] for m in ppl_m], max(lengths),
                               a.ppl_samples, lengths[:-1], a.prefill_chunk, backend,
                               progress=progress, kv_dtype=a.kv_dtype)
    docs["ppl"]["settings"] = {"haystack": held_path, "kv_dtype": a.kv_dtype}
    wall["ppl"] = round(time.perf_counter() - t0, 1)
    harness.write_json(docs["ppl"], out / "ppl.json")
    plots.ppl_bands(docs["ppl"], out / "ppl.png")
  wall["total"] = round(time.perf_counter() - t_start, 1)
  masks = [b.mask for b in built_all if b.mask is not None]
  info = {"model": model.config.name, "ckpt": model.name or str(model.ckpt),
          "pattern": model.pattern_source, "device": harness.device_info(), "dtype": model.dtype,
          "chat": a.chat, "lengths": lengths, "depths": len(depths), "samples": a.samples,
          "haystack": hay_path, "sink": masks[0].sink if masks else None,
          "recent": masks[0].recent if masks else None, "wall_seconds": wall,
          "kv_dtype": a.kv_dtype,
          "command": "python -m infer.eval_table " + " ".join(argv if argv is not None
                                                               else sys.argv[1:])}
  rows = [_row(b, model.config, max(lengths), a.kv_dtype) for b in built_all]
  (out / "table.json").write_text(json.dumps({"info": info, "methods": rows}, indent=1))
  md = render_table(docs, rows, info)
  (out / "table.md").write_text(md)
  print(md)
  return 0


def _compile_cache() -> None:
  """JAX's persistent compilation cache (as duojax.infer uses): a second run of the
  grid, or of a task, loads its programs instead of compiling them."""
  from duojax.infer import enable_compile_cache
  enable_compile_cache()


def _row(bm, config, longest: int, kv_dtype: str | None = None) -> dict:
  """A method's name, share of retrieval heads and KV cache size at the longest length
  (in the run's KV storage: bf16 unless --kv-dtype; a quantised cache's scales counted)."""
  return {"name": bm.method.name, "kind": bm.method.kind,
          "retrieval_fraction": bm.retrieval_fraction,
          "kv_mib": kvc.kv_cache_bytes(config, bm.mask, longest, 1,
                                       kv_dtype=kv_dtype) / 2**20}


def render_saved(d: Path) -> str:
  """The table of an earlier run, from its table.json and task JSONs."""
  meta = json.loads((d / "table.json").read_text())
  docs = {t: json.loads((d / f"{t}.json").read_text()) for t in TASKS
          if (d / f"{t}.json").is_file()}
  return render_table(docs, meta["methods"], meta["info"])


# -- rendering --------------------------------------------------------------------------

def _pct(v) -> str:
  return "-" if v is None else f"{100 * v:.1f}"


def render_table(docs: dict, rows: list[dict], info: dict) -> str:
  """rows: `_row` per method (name, kind, retrieval_fraction, kv_mib)."""
  longest = max(info["lengths"])
  wall = info["wall_seconds"]
  samples = info.get("samples", 1)
  lines = [f"### {info['model']}: full vs DuoAttention vs baselines", "",
           f"Device: {info['device']['device_kind'] or info['device']['platform']} "
           f"(jax {info['device']['jax']}), {info['dtype']}; prompts "
           f"{'in the chat template' if info['chat'] else 'as raw text'}; greedy; streaming "
           f"heads keep sink {info['sink']} + recent {info['recent']}; lengths "
           f"{', '.join(map(str, info['lengths']))} tokens x {info['depths']} depths"
           f"{f' x {samples} samples' if samples != 1 else ''}. "
           f"Wall time: {wall['total']:.0f} s "
           f"({', '.join(f'{k} {v:.0f} s' for k, v in wall.items() if k != 'total')}).",
           ""]
  has = [t for t in RETRIEVAL if t in docs]
  head = ["method", "retrieval heads",
          f"KV cache @{longest}, {info.get('kv_dtype') or 'bf16'} (MiB)"]
  if "niah" in docs:
    head += ["NIAH ROUGE-1 %", "NIAH exact %"]
  if "mkniah" in docs:
    head += [f"multi-key NIAH ({docs['mkniah']['settings'].get('num_keys', '?')} keys) exact %"]
  if "passkey" in docs:
    head += ["passkey %"]
  if "ppl" in docs:
    head += [f"ppl @{docs['ppl']['length']}"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  grid_names = set()
  for t in has:
    grid_names |= set(docs[t]["summary"][docs[t]["plot_metric"]])
  for r in rows:
    name = r["name"]
    row = [name, f"{100 * r['retrieval_fraction']:.0f}%", f"{r['kv_mib']:.2f}"]
    summ = lambda t, m: docs[t]["summary"][m].get(name, {}).get("mean")
    if "niah" in docs:
      row += [_pct(summ("niah", "rouge1_recall")), _pct(summ("niah", "contains"))]
    if "mkniah" in docs:
      row += [_pct(summ("mkniah", "exact"))]
    if "passkey" in docs:
      row += [_pct(summ("passkey", "contains"))]
    if "ppl" in docs:
      res = docs["ppl"]["results"].get(name)
      row += ["-" if res is None else f"{res['ppl']:.3f}"]
    lines.append("| " + " | ".join(row) + " |")
  for task in has:
    metric = docs[task]["plot_metric"]
    lines += ["", f"{task} by context length ({metric.replace('_', ' ')}, %):", ""]
    lens = info["lengths"]
    lines += ["| method | " + " | ".join(map(str, lens)) + " |", "|---|" + "---|" * len(lens)]
    for r in rows:
      s = docs[task]["summary"][metric].get(r["name"])
      if s is None:
        continue
      lines.append(f"| {r['name']} | " + " | ".join(_pct(s["by_length"].get(str(l)))
                                                   for l in lens) + " |")
    lines += ["", f"![{task}]({task}.png)"]
  if "ppl" in docs:
    p = docs["ppl"]
    bands = [f"{b['from']}-{b['to']}" for b in next(iter(p["results"].values()))["bands"]]
    src = (p.get("settings") or {}).get("haystack")
    lines += ["", f"Perplexity of {len(p['windows'])} held-out windows of {p['length']} tokens"
                  f"{f' ({src})' if src else ''}, per position band:", "",
              "| method | all | " + " | ".join(bands) + " |", "|---|---|" + "---|" * len(bands)]
    for name, r in p["results"].items():
      lines.append(f"| {name} | {r['ppl']:.3f} | "
                   + " | ".join(f"{b['ppl']:.3f}" for b in r["bands"]) + " |")
    lines += ["", "![ppl](ppl.png)"]
  lines += ["", *losses(docs, rows), "", f"Command: `{info['command']}`", ""]
  return "\n".join(lines)


def losses(docs: dict, rows: list[dict]) -> list[str]:
  """Where each pattern method (duo and the --patterns ones) is below full: cells
  full gets right that it misses."""
  out = ["Where a head pattern loses against full (cells full answers and it does not):"]
  for task in RETRIEVAL:
    if task not in docs:
      continue
    metric = docs[task]["plot_metric"]
    cells = docs[task]["cells"]
    key = lambda c: (c["length"], c["depth"], c["sample"])
    full = {key(c): c["scores"][metric] for c in cells if c["method"] == "full"}
    if not full:
      continue
    s = docs[task]["summary"][metric]
    for r in rows:
      if r["kind"] != "duo" or r["name"] not in s:
        continue
      mine = [c for c in cells if c["method"] == r["name"]]
      lost = [c for c in mine if float(c["scores"][metric]) < float(full[key(c)])]
      won = [c for c in mine if float(c["scores"][metric]) > float(full[key(c)])]
      delta = 100 * (s[r["name"]]["mean"] - s["full"]["mean"])
      where = ", ".join(f"{c['length']}@{c['depth']:.0%}" for c in lost[:12])
      more = f" (+{len(lost) - 12} more)" if len(lost) > 12 else ""
      out.append(f"- {task} {r['name']}: {delta:+.1f} points vs full; worse on "
                 f"{len(lost)}/{len(mine)} cells{': ' + where + more if lost else ''}; better on "
                 f"{len(won)}.")
  return out


if __name__ == "__main__":
  sys.exit(main())
