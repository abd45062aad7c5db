"""The whole accuracy comparison for one model, as a Markdown table with heatmaps.

  python infer/eval_table.py --out results/smollm2            # the full table
  python infer/eval_table.py --out /tmp/quick --quick          # a tiny CPU smoke run

Methods, all on identical prompts: full attention; DuoAttention (the model's
pattern) at each --sparsities value; streaming (every head sink + recent, the
StreamingLLM-style budget); random heads at each sparsity (seeded). Tasks:
needle in a haystack and numeric passkey over --lengths x --depths (greedy),
and perplexity of held-out haystack windows (full, duo, streaming).
Writes OUT/table.md, OUT/{niah,passkey}.png, OUT/ppl.png and the JSON of every
cell and setting (OUT/{niah,passkey,ppl}.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from duojax import cache as kvc
from duojax.eval import grid, harness, plots, ppl
from duojax.eval.methods import Method, build_methods

# A smoke run that finishes in minutes on a CPU: 4 methods, 2 x 2 cells per task.
QUICK = dict(lengths="300,600", depths="2", sparsities="0.5", ppl_samples=1, max_new_tokens=32)


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", default=None, help="checkpoint folder or embedded name (smollm2-135m)")
  ap.add_argument("--pattern", default=None, help="head pattern (default: the model's)")
  ap.add_argument("--out", required=True, help="output folder")
  ap.add_argument("--haystack", default=None)
  ap.add_argument("--lengths", default="1000,2000,4000,8000")
  ap.add_argument("--depths", default="10")
  ap.add_argument("--sparsities", default="0.25,0.5,0.75")
  ap.add_argument("--tasks", default="niah,passkey,ppl")
  ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                  help="chat template around prompts (default; --no-chat for raw text)")
  ap.add_argument("--sink", type=int, default=None)
  ap.add_argument("--recent", type=int, default=None)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
  ap.add_argument("--backend", default="auto")
  ap.add_argument("--max-new-tokens", type=int, default=32)
  ap.add_argument("--batch-size", type=int, default=10)
  ap.add_argument("--prefill-chunk", type=int, default=1024)
  ap.add_argument("--ppl-samples", type=int, default=2, help="haystack windows for perplexity")
  ap.add_argument("--quick", action="store_true", help=f"tiny smoke run: {QUICK}")
  ap.add_argument("--no-progress", action="store_true")
  return ap


def methods_for(sparsities: list[float]) -> tuple[list[Method], list[Method]]:
  """(grid methods, perplexity methods)."""
  grid_m = ([Method("full")] + [Method("duo", s) for s in sparsities] + [Method("streaming")]
            + [Method("random", s) for s in sparsities])
  ppl_m = [Method("full")] + [Method("duo", s) for s in sparsities] + [Method("streaming")]
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
  if a.quick:
    for k, v in QUICK.items():
      setattr(a, k, v)
  from duojax.attention.dispatch import resolve_backend
  from duojax.eval.methods import parse_sparsities
  t_start = time.perf_counter()
  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
  lengths, depths = grid.parse_lengths(a.lengths), grid.parse_depths(a.depths)
  sparsities = parse_sparsities(a.sparsities)
  progress = not a.no_progress
  model = harness.load_eval_model(a.ckpt, a.pattern, a.dtype, progress=progress)
  hay, hay_path = harness.load_haystack_tokens(a.haystack, model.tokenizer)
  backend = resolve_backend(a.backend)
  grid_m, ppl_m = methods_for(sparsities)
  built = build_methods(grid_m, model.config, model.pattern, a.sink, a.recent, a.seed)
  gen_kw = dict(max_new_tokens=a.max_new_tokens, prefill_chunk=a.prefill_chunk,
                batch_size=a.batch_size, backend=backend)
  docs, wall = {}, {}
  for task in ("niah", "passkey"):
    if task not in tasks:
      continue
    t0 = time.perf_counter()
    docs[task] = harness.run_retrieval(task, model, hay, built, lengths, depths, a.chat, gen_kw,
                                       seed=a.seed, progress=progress,
                                       extra_settings={"haystack": hay_path})
    wall[task] = round(time.perf_counter() - t0, 1)
    harness.write_json(docs[task], out / f"{task}.json")
    metric = docs[task]["plot_metric"]
    plots.heatmaps(docs[task]["summary"][metric], out / f"{task}.png",
                   f"{task} - {model.config.name} ({metric.replace('_', ' ')})",
                   metric.replace("_", " "), panel_size=2.0)
  if "ppl" in tasks:
    t0 = time.perf_counter()
    names = {m.name for m in ppl_m}
    docs["ppl"] = ppl.evaluate(model.params, model.config, hay,
                               [b for b in built if b.method.name in names], max(lengths),
                               a.ppl_samples, lengths[:-1], a.prefill_chunk, backend,
                               progress=progress)
    wall["ppl"] = round(time.perf_counter() - t0, 1)
    harness.write_json(docs["ppl"], out / "ppl.json")
    plots.ppl_bands(docs["ppl"], out / "ppl.png")
  wall["total"] = round(time.perf_counter() - t_start, 1)
  masks = [b.mask for b in built if b.mask is not None]
  info = {"model": model.config.name, "ckpt": model.name or str(model.ckpt),
          "pattern": model.pattern_source, "device": harness.device_info(), "dtype": model.dtype,
          "chat": a.chat, "lengths": lengths, "depths": len(depths), "haystack": hay_path,
          "sink": masks[0].sink, "recent": masks[0].recent, "wall_seconds": wall,
          "command": "python infer/eval_table.py " + " ".join(argv if argv is not None
                                                               else sys.argv[1:])}
  md = render_table(docs, built, model.config, info)
  (out / "table.md").write_text(md)
  print(md)
  return 0


# -- rendering --------------------------------------------------------------------------

def _pct(v) -> str:
  return "-" if v is None else f"{100 * v:.1f}"


def render_table(docs: dict, built, config, info: dict) -> str:
  longest = max(info["lengths"])
  lines = [f"### {info['model']}: full vs DuoAttention vs baselines", "",
           f"Device: {info['device']['device_kind'] or info['device']['platform']} "
           f"(jax {info['device']['jax']}), {info['dtype']}; prompts "
           f"{'in the chat template' if info['chat'] else 'as raw text'}; greedy; streaming "
           f"heads keep sink {info['sink']} + recent {info['recent']}; lengths "
           f"{', '.join(map(str, info['lengths']))} tokens x {info['depths']} depths. "
           f"Wall time: {info['wall_seconds']['total']:.0f} s "
           f"({', '.join(f'{k} {v:.0f} s' for k, v in info['wall_seconds'].items() if k != 'total')}).",
           ""]
  has = [t for t in ("niah", "passkey") if t in docs]
  head = ["method", "retrieval heads", f"KV cache @{longest}, bf16 (MiB)"]
  if "niah" in docs:
    head += ["NIAH ROUGE-1 %", "NIAH exact %"]
  if "passkey" in docs:
    head += ["passkey %"]
  if "ppl" in docs:
    head += [f"ppl @{docs['ppl']['length']}"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for bm in built:
    name = bm.method.name
    kv = kvc.kv_cache_bytes(config, bm.mask, longest, 1) / 2**20
    row = [name, f"{100 * bm.retrieval_fraction:.0f}%", f"{kv:.2f}"]
    if "niah" in docs:
      s = docs["niah"]["summary"]
      row += [_pct(s["rouge1_recall"][name]["mean"]), _pct(s["contains"][name]["mean"])]
    if "passkey" in docs:
      row += [_pct(docs["passkey"]["summary"]["contains"][name]["mean"])]
    if "ppl" in docs:
      r = docs["ppl"]["results"].get(name)
      row += ["-" if r is None else f"{r['ppl']:.3f}"]
    lines.append("| " + " | ".join(row) + " |")
  for task in has:
    metric = docs[task]["plot_metric"]
    lines += ["", f"{task} by context length ({metric.replace('_', ' ')}, %):", ""]
    lens = info["lengths"]
    lines += ["| method | " + " | ".join(map(str, lens)) + " |", "|---|" + "---|" * len(lens)]
    for bm in built:
      by = docs[task]["summary"][metric][bm.method.name]["by_length"]
      lines.append(f"| {bm.method.name} | " + " | ".join(_pct(by[str(l)]) for l in lens) + " |")
    lines += ["", f"![{task}]({task}.png)"]
  if "ppl" in docs:
    p = docs["ppl"]
    bands = [f"{b['from']}-{b['to']}" for b in next(iter(p["results"].values()))["bands"]]
    lines += ["", f"Perplexity of {len(p['windows'])} held-out windows of {p['length']} tokens "
                  "(the last essays), per position band:", "",
              "| method | all | " + " | ".join(bands) + " |", "|---|---|" + "---|" * len(bands)]
    for name, r in p["results"].items():
      lines.append(f"| {name} | {r['ppl']:.3f} | "
                   + " | ".join(f"{b['ppl']:.3f}" for b in r["bands"]) + " |")
    lines += ["", "![ppl](ppl.png)"]
  lines += ["", *losses(docs, built), "", f"Command: `{info['command']}`", ""]
  return "\n".join(lines)


def losses(docs: dict, built) -> list[str]:
  """Where each duo setting is below full: cells full gets right that duo misses."""
  out = ["Where duo loses against full (cells full answers and duo does not):"]
  for task in ("niah", "passkey"):
    if task not in docs:
      continue
    metric = docs[task]["plot_metric"]
    cells = docs[task]["cells"]
    key = lambda c: (c["length"], c["depth"], c["sample"])
    full = {key(c): c["scores"][metric] for c in cells if c["method"] == "full"}
    for bm in built:
      if bm.method.kind != "duo":
        continue
      mine = [c for c in cells if c["method"] == bm.method.name]
      lost = [c for c in mine if float(c["scores"][metric]) < float(full[key(c)])]
      won = [c for c in mine if float(c["scores"][metric]) > float(full[key(c)])]
      s = docs[task]["summary"][metric]
      delta = 100 * (s[bm.method.name]["mean"] - s["full"]["mean"])
      where = ", ".join(f"{c['length']}@{c['depth']:.0%}" for c in lost[:12])
      more = f" (+{len(lost) - 12} more)" if len(lost) > 12 else ""
      out.append(f"- {task} {bm.method.name}: {delta:+.1f} points vs full; worse on "
                 f"{len(lost)}/{len(mine)} cells{': ' + where + more if lost else ''}; better on "
                 f"{len(won)}.")
  return out


if __name__ == "__main__":
  sys.exit(main())
