"""DuoAttention vs RazorAttention vs retrieval-score heads on one model, same prompts.

  python -m infer.compare_patterns --out results/compare-smollm2     # the full run (GPU)
  python -m infer.compare_patterns --out /tmp/cmp --quick            # a CPU smoke run

Patterns (each saved under OUT/patterns/NAME in our format):
  duo     DuoAttention's trained gates: --duo-pattern DIR, else the checkpoint's
          default, else the pattern shipped for an embedded model
  razor   RazorAttention's echo/induction scores from one forward pass over BOS + a
          random block repeated (--razor-block x --razor-repeats); `auto` takes the
          paper's 2500 tokens when 4 copies fit the context, else the largest
          multiple of 100 that fits (SmolLM2's 8192: 2000 x 4). Or --razor-pattern DIR.
  rscore  Wu et al.'s copy-paste retrieval score over NIAH decoding with full
          attention. Its needles and its haystack window (--rscore-offset, default
          the middle of the haystack) differ from the evaluation's, so it is not
          tuned on the test prompts. Or --rscore-pattern DIR.
Methods, all answering the very same NIAH and passkey prompts (greedy):
  full; at each --sparsities value S: duo@S, razor@S, rscore@S, random@S and
  duo@S+comp (RazorAttention's compensation token on duo's streaming heads);
  streaming (every head sink + recent).
Writes into OUT: table.md (README-ready), niah.json / passkey.json (every cell and
setting), niah.png / passkey.png (length x depth heatmaps), patterns.png (the three
score maps side by side), compare.json (settings, step timings, overlaps, patterns).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from duojax import cache as kvc
from duojax.config import DEPLOY
from duojax.eval import grid, harness, plots
from duojax.eval.methods import Method, build_methods, parse_sparsities

PATTERNS = ("duo", "razor", "rscore")
DEFAULTS = dict(lengths="1000,2000,4000,8000", depths="10", sparsities="0.5",
                razor_block="auto", razor_repeats=4, rscore_lengths="1000,2000,4000,8000",
                rscore_depths=5, rscore_needles=3, max_new_tokens=32)
# A smoke run that finishes in a few minutes on a CPU: 7 methods x 2 cells per task. The
# needle sits mid-prompt, beyond sink 64 + recent 256, so streaming heads must lose it.
QUICK = dict(lengths="500,800", depths="0.5", sparsities="0.5", razor_block="250",
             razor_repeats=2, rscore_lengths="400,800", rscore_depths=2, rscore_needles=1,
             max_new_tokens=24)

# Needles for the retrieval score: none is the evaluation's (duojax.data.niah.NeedleTask()).
RSCORE_NEEDLES = (
    ("The secret ingredient in the old lighthouse keeper's soup was a spoonful of "
     "smoked paprika and a handful of fresh basil.",
     "What was the secret ingredient in the old lighthouse keeper's soup?",
     "a spoonful of smoked paprika and a handful of fresh basil"),
    ("The winning lottery ticket was hidden inside a blue teapot on the top shelf of the "
     "library.",
     "Where was the winning lottery ticket hidden?",
     "inside a blue teapot on the top shelf of the library"),
    ("The captain's favourite meal on the long voyage was grilled salmon with lemon and "
     "rice.",
     "What was the captain's favourite meal on the long voyage?",
     "grilled salmon with lemon and rice"),
)
# (SmolLM2-135M answered each of these at 1K-4K tokens on CPU; an astronaut needle it
# never answered was dropped, since tests answered wrong add nothing to the scores.)


class CompareError(ValueError):
  """Settings this comparison cannot run with; the message names the fix."""


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  d = lambda k: f" (default {DEFAULTS[k]}; --quick {QUICK[k]})"
  ap.add_argument("--ckpt", default=None, help="checkpoint folder or embedded name (smollm2-135m)")
  ap.add_argument("--out", required=True, help="output folder")
  ap.add_argument("--duo-pattern", default=None, help="DuoAttention pattern (default: the model's)")
  ap.add_argument("--razor-pattern", default=None, help="reuse this RazorAttention pattern")
  ap.add_argument("--rscore-pattern", default=None, help="reuse this retrieval-score pattern")
  ap.add_argument("--haystack", default=None, help="haystack text (default: the Paul Graham essays)")
  ap.add_argument("--lengths", default=None, help="context lengths in tokens" + d("lengths"))
  ap.add_argument("--depths", default=None, help="needle depths: a count or fractions" + d("depths"))
  ap.add_argument("--sparsities", default=None,
                  help="fractions of KV heads that stream, comma list" + d("sparsities"))
  ap.add_argument("--tasks", default="niah,passkey")
  ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                  help="chat template around prompts (default; --no-chat for raw text)")
  ap.add_argument("--sink", type=int, default=None, help=f"streaming sink tokens ({DEPLOY.sink})")
  ap.add_argument("--recent", type=int, default=None,
                  help=f"streaming recent window ({DEPLOY.recent})")
  ap.add_argument("--seed", type=int, default=0, help="seeds random heads, razor's block, keys")
  ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                  help="evaluation dtype; auto: bfloat16 on GPU/TPU, float32 on CPU")
  ap.add_argument("--identify-dtype", default="float32", choices=("float32", "bfloat16"),
                  help="dtype for razor and retrieval-score identification")
  ap.add_argument("--backend", default="auto", help="attention backend: auto, xla, gpu, tpu")
  ap.add_argument("--max-new-tokens", type=int, default=None, help=d("max_new_tokens").strip())
  ap.add_argument("--batch-size", type=int, default=10)
  ap.add_argument("--prefill-chunk", type=int, default=1024)
  g = ap.add_argument_group("razor identification")
  g.add_argument("--razor-block", default=None, help="random tokens per copy" + d("razor_block"))
  g.add_argument("--razor-repeats", type=int, default=None, help="copies" + d("razor_repeats"))
  g.add_argument("--razor-induction-top", type=float, default=0.14)
  g.add_argument("--razor-echo-top", type=float, default=0.01)
  g = ap.add_argument_group("retrieval-score identification")
  g.add_argument("--rscore-lengths", default=None, help="NIAH lengths" + d("rscore_lengths"))
  g.add_argument("--rscore-depths", type=int, default=None, help="depths" + d("rscore_depths"))
  g.add_argument("--rscore-needles", type=int, default=None,
                 help=f"needles, 1..{len(RSCORE_NEEDLES)}" + d("rscore_needles"))
  g.add_argument("--rscore-offset", default="auto",
                 help="haystack token where its prompts start (auto: the middle)")
  g.add_argument("--rscore-min-recall", type=float, default=0.5,
                 help="a test counts iff ROUGE-1 recall > this")
  ap.add_argument("--identify-only", action="store_true",
                  help="compute and save the patterns, their overlaps and figure; no evaluation")
  ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run; flags still override")
  ap.add_argument("--no-progress", action="store_true")
  return ap


def main(argv=None) -> int:
  from duojax.checkpoint.hf import CheckpointError
  try:
    return run(argv)
  except (CheckpointError, ValueError) as e:  # PatternError, ScoreError, RazorError included
    print(f"compare_patterns: error: {e}", file=sys.stderr)
    return 2


def _say(msg: str) -> None:
  print(f"[compare] {msg}", file=sys.stderr, flush=True)


def razor_block(setting, repeats: int, context: int, has_bos: bool) -> int:
  """The block size: a number, or `auto` = 2500 if it fits else the largest 100s that do."""
  room = (context - int(has_bos)) // max(repeats, 1)
  if str(setting) != "auto":
    try:
      return int(setting)
    except ValueError:
      raise CompareError(f"--razor-block takes a token count or auto, got {setting!r}") from None
  block = min(2500, room // 100 * 100 or room)
  if block < 2:
    raise CompareError(f"{repeats} copies of a block do not fit the context of {context}; "
                       "lower --razor-repeats")
  return block


def _int_list(text: str, flag: str) -> list[int]:
  try:
    out = [int(x) for x in str(text).split(",") if x.strip()]
  except ValueError:
    raise CompareError(f"{flag} takes comma-separated token counts, got {text!r}") from None
  if not out:
    raise CompareError(f"{flag} is empty")
  return out


def run(argv=None) -> int:
  a = build_parser().parse_args(argv)
  for k, v in (QUICK if a.quick else DEFAULTS).items():
    if getattr(a, k) is None:
      setattr(a, k, v)
  import jax.numpy as jnp

  from duojax.attention.dispatch import resolve_backend
  t_start = time.perf_counter()
  steps: dict[str, float] = {}
  out = Path(a.out)
  tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
  if not tasks or any(t not in ("niah", "passkey") for t in tasks):
    raise CompareError(f"--tasks takes niah and/or passkey, got {a.tasks!r}")
  if a.identify_only:
    tasks = []
  lengths, depths = grid.parse_lengths(a.lengths), grid.parse_depths(a.depths)
  sparsities = [s for s in parse_sparsities(a.sparsities) if s is not None]
  if not sparsities:
    raise CompareError("--sparsities is empty; give e.g. 0.5")
  if not 1 <= a.rscore_needles <= len(RSCORE_NEEDLES):
    raise CompareError(f"--rscore-needles must be in 1..{len(RSCORE_NEEDLES)}")
  progress = not a.no_progress
  backend = resolve_backend(a.backend)
  out.mkdir(parents=True, exist_ok=True)

  t0 = time.perf_counter()
  model = harness.load_eval_model(a.ckpt, a.duo_pattern, a.dtype, progress=progress)
  if model.pattern is None:
    raise CompareError("this checkpoint has no DuoAttention pattern: pass --duo-pattern DIR "
                       "(made by `python -m duojax.identify duo`)")
  hay, hay_path = harness.load_haystack_tokens(a.haystack, model.tokenizer)
  grid.check_haystack(hay, max(lengths))
  steps["load"] = round(time.perf_counter() - t0, 2)

  patterns, sources, id_info = {}, {}, {}
  command = "python -m infer.compare_patterns " + " ".join(sys.argv[1:] if argv is None else argv)
  dev = harness.device_info()
  id_params = None

  def identify_params():
    nonlocal id_params
    if id_params is None:
      from duojax.checkpoint import store
      id_params = (model.params if a.identify_dtype == model.dtype else
                   store.load_params(model.ckpt, dtype=getattr(jnp, a.identify_dtype)))
    return id_params

  def keep(name, pat, source, seconds=None):
    """Record and save a pattern at once, so a later failing step does not lose it."""
    if seconds is not None:  # computed here: say how to make it again
      steps[f"identify_{name}"] = seconds
      pat.metadata.update(command=command, identify_dtype=a.identify_dtype,
                          device=f"{dev['device_kind'] or dev['platform']}, JAX {dev['jax']}",
                          wall_seconds=seconds)
    patterns[name], sources[name] = pat, source
    pat.save(out / "patterns" / name, overwrite=True)
    id_info[name] = pattern_summary(name, pat, source, seconds)

  keep("duo", model.pattern, model.pattern_source)

  # -- razor ------------------------------------------------------------------------
  if a.razor_pattern:
    keep("razor", _load(a.razor_pattern), a.razor_pattern)
  else:
    from duojax.identify.razor import razor_pattern
    cfg = model.config
    block = razor_block(a.razor_block, a.razor_repeats, cfg.max_position_embeddings,
                        cfg.bos_token_id is not None)
    _say(f"razor: one forward pass over bos + {block} random tokens x {a.razor_repeats}")
    t0 = time.perf_counter()
    pat = razor_pattern(identify_params(), cfg, block=block, repeats=a.razor_repeats,
                        induction_top=a.razor_induction_top, echo_top=a.razor_echo_top,
                        seed=a.seed, exclude_ids=_special_ids(model.tokenizer),
                        model_name=cfg.name)
    keep("razor", pat, f"computed: block {block} x {a.razor_repeats}",
         round(time.perf_counter() - t0, 2))
    _say(f"razor: {steps['identify_razor']:.1f} s")

  # -- retrieval score --------------------------------------------------------------
  if a.rscore_pattern:
    keep("rscore", _load(a.rscore_pattern), a.rscore_pattern)
  else:
    from duojax.data.niah import NeedleTask
    from duojax.identify import retrieval_score as rs
    r_lengths = _int_list(a.rscore_lengths, "--rscore-lengths")
    if a.rscore_offset == "auto":
      offset = max(max(lengths), len(hay) // 2)
    else:
      try:
        offset = int(a.rscore_offset)
      except ValueError:
        raise CompareError(f"--rscore-offset takes a token index or auto, got "
                           f"{a.rscore_offset!r}") from None
    if offset < max(lengths):  # the evaluation reads the haystack from token 0
      _say(f"warning: --rscore-offset {offset} overlaps the evaluation's haystack window "
           f"[0, {max(lengths)})")
    needles = [NeedleTask(*n) for n in RSCORE_NEEDLES[:a.rscore_needles]]
    _say(f"rscore: {len(needles)} needle(s) x lengths {r_lengths} x {a.rscore_depths} depths, "
         f"haystack from token {offset}")
    t0 = time.perf_counter()
    pat, _ = rs.identify(
        identify_params(), model.config, model.tokenizer, hay, out / "patterns" / "rscore",
        tasks=needles, lengths=r_lengths, depths=a.rscore_depths, chat=a.chat, offset=offset,
        max_new_tokens=a.max_new_tokens, min_recall=a.rscore_min_recall,
        batch=a.batch_size, prefill_chunk=a.prefill_chunk, progress=progress,
        haystack_name=hay_path)
    keep("rscore", pat, f"computed: {len(needles)} needle(s), lengths {r_lengths}, "
                        f"{a.rscore_depths} depths, offset {offset}",
         round(time.perf_counter() - t0, 2))
    _say(f"rscore: {steps['identify_rscore']:.1f} s")
  del id_params

  # -- evaluation -------------------------------------------------------------------
  methods = methods_for(sparsities)
  built = build_methods(methods, model.config, model.pattern, a.sink, a.recent, a.seed,
                        patterns={k: v for k, v in patterns.items() if k != "duo"})
  gen_kw = dict(max_new_tokens=a.max_new_tokens, prefill_chunk=a.prefill_chunk,
                batch_size=a.batch_size, backend=backend)
  settings = {"haystack": hay_path, "patterns": sources}
  docs = {}
  for task in tasks:
    t0 = time.perf_counter()
    docs[task] = harness.run_retrieval(task, model, hay, built, lengths, depths, a.chat, gen_kw,
                                       seed=a.seed, progress=progress, extra_settings=settings)
    steps[f"eval_{task}"] = round(time.perf_counter() - t0, 2)
    harness.write_json(docs[task], out / f"{task}.json")
    metric = docs[task]["plot_metric"]
    plots.heatmaps(docs[task]["summary"][metric], out / f"{task}.png",
                   f"{task} - {model.config.name} ({metric.replace('_', ' ')})",
                   metric.replace("_", " "), panel_size=1.8)

  # -- overlaps, figure, table ------------------------------------------------------
  sets = {b.method.name: b.mask.as_array() for b in built if b.mask is not None}
  overlaps = {f"{s:g}": jaccard_table({k: sets[f"{k}@{s:g}"] for k in (*PATTERNS, "random")})
              for s in sparsities}
  s0 = sparsities[0]
  maps, titles = score_maps(patterns)
  plots.pattern_maps(maps, out / "patterns.png", {k: sets[f"{k}@{s0:g}"] for k in PATTERNS},
                     f"{model.config.name}: dots = retrieval heads at sparsity {s0:g}", titles)
  steps["total"] = round(time.perf_counter() - t_start, 2)
  info = {"model": model.config.name, "ckpt": model.name or str(model.ckpt),
          "device": dev, "dtype": model.dtype, "identify_dtype": a.identify_dtype,
          "backend": backend, "chat": a.chat, "lengths": lengths, "depths": len(depths),
          "sparsities": sparsities, "haystack": hay_path, "seed": a.seed, "quick": a.quick,
          "sink": built[-1].mask.sink, "recent": built[-1].mask.recent,
          "max_new_tokens": a.max_new_tokens, "seconds": steps,
          "command": command}
  doc = {"settings": info, "patterns": id_info, "methods": [b.describe() for b in built],
         "overlap_jaccard": overlaps,
         "summary": {t: {m: d["summary"][m] for m in ("contains", "rouge1_recall")}
                     for t, d in docs.items()},
         "seconds_per_method": {t: d["seconds"]["per_method"] for t, d in docs.items()}}
  harness.write_json(doc, out / "compare.json")
  md = render_table(docs, built, model.config, info, id_info, overlaps)
  (out / "table.md").write_text(md)
  print(md)
  return 0


def methods_for(sparsities: list[float]) -> list[Method]:
  out = [Method("full")]
  for s in sparsities:
    out += [Method("duo", s), Method("duo", s, "razor"), Method("duo", s, "rscore"),
            Method("random", s), Method("duo", s, compensation=True)]
  return out + [Method("streaming")]


def _load(folder: str):
  from duojax.pattern import load_any
  return load_any(folder)


def _special_ids(tokenizer) -> list[int]:
  """Token ids razor's random block must avoid (as `duojax.identify razor` does)."""
  special = set(getattr(tokenizer, "all_special_ids", []) or [])
  special |= set(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
  return sorted(special)


# -- pattern statistics -------------------------------------------------------------

def jaccard(a: np.ndarray, b: np.ndarray) -> float:
  """|A & B| / |A | B| of two [L, Hkv] retrieval-head sets (1.0 for two empty sets)."""
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum() / union) if union else 1.0


def jaccard_table(sets: dict) -> dict:
  """{a: {b: J}} over every pair of named [L, Hkv] bool sets."""
  return {x: {y: round(jaccard(sets[x], sets[y]), 4) for y in sets} for x in sets}


def chance_jaccard(k: int, n: int) -> float:
  """Expected-size Jaccard of two independent random k-subsets of n: k^2/n over 2k - k^2/n."""
  if k == 0:
    return 1.0
  inter = k * k / n
  return inter / (2 * k - inter)


def score_maps(patterns: dict) -> tuple[dict, dict]:
  """([L, Hkv] maps in [0, 1] to draw, panel titles): duo's gates; razor's induction
  score and the retrieval score as sqrt(score / max), since one or two heads dominate
  those scores and a linear scale would leave every other head black."""
  maps, titles = {}, {}
  for name, pat in patterns.items():
    m, label = np.asarray(pat.gates, float), "gate"
    scores = pat.metadata.get("scores")
    if name == "razor" and isinstance(scores, dict) and "induction" in scores:
      m, label = np.asarray(scores["induction"], float), "sqrt(induction / max)"
    elif name == "rscore":
      label = "sqrt(score / max)"
    if label.startswith("sqrt") and m.max() > 0:
      m = np.sqrt(np.clip(m, 0, None) / m.max())
    maps[name], titles[name] = m, f"{name}\n{label}"
  return maps, titles


def pattern_summary(name: str, pat, source: str, seconds: float | None) -> dict:
  """What the table says about a pattern: where it came from, its own selection rule."""
  m = pat.metadata
  info = {"source": source, "method": m.get("method"), "shape": list(pat.shape),
          "sink": pat.sink, "recent": pat.recent, "seconds": seconds,
          "selection": m.get("selection")}
  try:
    info["own_rule_retrieval_fraction"] = round(pat.mask().retrieval_fraction, 4)
  except ValueError:
    info["own_rule_retrieval_fraction"] = None
  info["own_rule"] = _rule(m.get("selection"))
  st = m.get("settings") if isinstance(m.get("settings"), dict) else {}
  if m.get("method") == "razor" and "induction_top" in st:
    info["own_rule"] = (f"top {100 * st['induction_top']:g}% induction + top "
                        f"{100 * st['echo_top']:g}% echo")
  if name == "duo":
    info["trained"] = {k: m.get(k) for k in ("device", "steps", "wall_seconds", "command")
                       if m.get(k) is not None}
  elif m.get("method") == "razor":
    info["settings"] = m.get("settings")
    info["n_induction"], info["n_echo"] = m.get("n_induction"), m.get("n_echo")
  elif m.get("method") == "retrieval_score":
    info.update({k: m.get(k) for k in ("n_tests", "n_counted", "lengths", "depths", "offset")})
    info["nonzero_heads"] = int((np.asarray(pat.gates) > 0).sum())
  return info


# -- rendering ------------------------------------------------------------------------

def _pct(v) -> str:
  return "-" if v is None else f"{100 * v:.1f}"


def _secs(v) -> str:
  return "-" if v is None else (f"{v:.0f} s" if v >= 10 else f"{v:.1f} s")


def render_table(docs: dict, built, config, info: dict, id_info: dict, overlaps: dict) -> str:
  longest = max(info["lengths"])
  sec = info["seconds"]
  lines = [f"### {info['model']}: DuoAttention vs RazorAttention vs retrieval-score heads", "",
           f"Device: {info['device']['device_kind'] or info['device']['platform']} "
           f"(jax {info['device']['jax']}), {info['dtype']}; prompts "
           f"{'in the chat template' if info['chat'] else 'as raw text'}; greedy, "
           f"{info['max_new_tokens']} new tokens; streaming heads keep sink {info['sink']} + "
           f"recent {info['recent']}; lengths {', '.join(map(str, info['lengths']))} tokens x "
           f"{info['depths']} depths; every method answers the same prompts.", ""]
  head = ["method", "retrieval heads", f"KV cache @{longest}, bf16 (MiB)"]
  if "niah" in docs:
    head += ["NIAH ROUGE-1 %", "NIAH exact %"]
  if "passkey" in docs:
    head += ["passkey %"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for bm in built:
    name = bm.method.name
    kv = kvc.kv_cache_bytes(config, bm.mask, longest, 1,
                            compensation=bm.method.compensation and bm.mask is not None) / 2**20
    row = [name, f"{100 * bm.retrieval_fraction:.0f}%", f"{kv:.2f}"]
    if "niah" in docs:
      s = docs["niah"]["summary"]
      row += [_pct(s["rouge1_recall"][name]["mean"]), _pct(s["contains"][name]["mean"])]
    if "passkey" in docs:
      row += [_pct(docs["passkey"]["summary"]["contains"][name]["mean"])]
    lines.append("| " + " | ".join(row) + " |")
  lines += ["", "duo: DuoAttention's trained gates; razor: RazorAttention's echo/induction "
                "ranking; rscore: copy-paste retrieval score (Wu et al.); random: seeded "
                "random heads; +comp: streaming heads keep the compensation token "
                "(mean of the dropped keys/values, logit + log n)."]
  for task in ("niah", "passkey"):
    if task not in docs:
      continue
    metric = docs[task]["plot_metric"]
    lens = info["lengths"]
    lines += ["", f"{task} by context length ({metric.replace('_', ' ')}, %):", "",
              "| method | " + " | ".join(map(str, lens)) + " |", "|---|" + "---|" * len(lens)]
    for bm in built:
      by = docs[task]["summary"][metric][bm.method.name]["by_length"]
      lines.append(f"| {bm.method.name} | " + " | ".join(_pct(by[str(l)]) for l in lens) + " |")
    lines += ["", f"![{task}]({task}.png)"]
  n = config.num_layers * config.num_kv_heads
  for s, table in overlaps.items():
    k = round((1 - float(s)) * n)
    names = list(table)
    lines += ["", f"Overlap of the retrieval-head sets at sparsity {s} ({k} of {n} KV heads; "
                  f"Jaccard |A ∩ B| / |A ∪ B|; two random sets of that size: "
                  f"{chance_jaccard(k, n):.2f} on average):", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for x in names:
      lines.append(f"| {x} | " + " | ".join(f"{table[x][y]:.2f}" for y in names) + " |")
  rs = id_info.get("rscore", {})
  for s in overlaps:
    k = round((1 - float(s)) * n)
    if rs.get("nonzero_heads") is not None and rs["nonzero_heads"] < k:
      lines += ["", f"rscore@{s}: only {rs['nonzero_heads']} KV heads scored above 0, so "
                    f"{k - rs['nonzero_heads']} of its {k} retrieval heads are ties at 0, "
                    "settled by the tie rule (the lower layer-major index streams first)."]
  lines += ["", "![patterns](patterns.png)", "", "Patterns and time per step:", "",
            "| pattern | source | own rule keeps | time |", "|---|---|---|---|"]
  for name, p in id_info.items():
    own = p.get("own_rule_retrieval_fraction")
    own = "-" if own is None else f"{100 * own:.0f}% ({p['own_rule']})"
    src = p["source"]
    if name == "duo" and p.get("trained"):
      t = p["trained"]
      when = f"trained earlier: {_secs(t.get('wall_seconds'))}"
      when += f" on {t['device']}" if t.get("device") else ""
    else:
      when = _secs(p.get("seconds")) if p.get("seconds") is not None else "loaded"
    if p.get("method") == "retrieval_score" and p.get("n_tests") is not None:
      src += f"; {p['n_counted']}/{p['n_tests']} tests right, {p['nonzero_heads']} heads > 0"
    lines.append(f"| {name} | {src} | {own} | {when} |")
  evals = ", ".join(f"{k[5:]} {_secs(v)}" for k, v in sec.items() if k.startswith("eval_"))
  lines += ["", f"Evaluation: {evals or 'not run (--identify-only)'}; loading "
                f"{_secs(sec['load'])}; total {_secs(sec['total'])}.", "",
            f"Command: `{info['command']}`", ""]
  return "\n".join(lines)


def _rule(sel) -> str:
  if not isinstance(sel, dict):
    return "no rule"
  if sel.get("sparsity") is not None:
    return f"sparsity {sel['sparsity']:g}"
  if sel.get("threshold") is not None:
    return f"score {'>' if sel.get('strict') else '>='} {sel['threshold']:g}"
  return "no rule"


if __name__ == "__main__":
  sys.exit(main())
