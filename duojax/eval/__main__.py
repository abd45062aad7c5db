"""Evaluate full, DuoAttention, streaming and random-head attention on the same samples.

  python -m duojax.eval niah --attention full,duo,streaming --lengths 1000,2000,4000,8000 \\
      --depths 10 --out niah.json --plot niah.png
  python -m duojax.eval mkniah --attention full,duo --keys 4 --lengths 4k,8k --out mk.json
  python -m duojax.eval passkey --attention full,duo,random --sparsity 0.5 --out pk.json
  python -m duojax.eval ppl --attention full,duo --lengths 2000,4000,8000 --out ppl.json
  python -m duojax.eval ppl --attention full,duo --kv-dtype int4 --weights-dtype int8 \\
      --lengths 2000,4000,8000 --out ppl_q.json   # quantised cache and weights, any task
  python -m duojax.eval influence ...   (duojax.eval.influence)

--attention takes a comma list; duo and random expand over every --sparsity
value (or pin one: duo@0.75). With no --ckpt the embedded SmolLM2-135M-Instruct
is used; duo then takes --pattern, else the checkpoint's or the shipped pattern.
Other patterns compete under their own names, and `+comp` adds the
compensation token (see duojax/eval/methods.py):

  python -m duojax.eval niah --attention full,duo,razor,rscore,random,duo+comp \
      --sparsity 0.5 --patterns razor=runs/razor,rscore=runs/rscore --out cmp.json
"""

from __future__ import annotations

import argparse
import sys

from duojax import kv_quant
from duojax.checkpoint.hf import CheckpointError
from duojax.config import ConfigError
from duojax.engine import InputError
from duojax.pattern import PatternError

TASKS = ("niah", "mkniah", "passkey", "ppl")


def _common(ap: argparse.ArgumentParser, lengths: str) -> None:
  ap.add_argument("--ckpt", default=None, help="checkpoint folder or embedded name (smollm2-135m)")
  ap.add_argument("--attention", default="full",
                  help="comma list of full, duo, streaming, random or a --patterns name "
                       "(duo@S pins a sparsity, duo+comp adds the compensation token)")
  ap.add_argument("--pattern", default=None, help="head-pattern folder for duo")
  ap.add_argument("--patterns", default=None,
                  help="more patterns to compare, NAME=DIR[,NAME=DIR] (e.g. razor=DIR); "
                       "--attention then names them like duo")
  ap.add_argument("--sparsity", default=None,
                  help="streaming fraction for duo/random; a comma list compares several")
  ap.add_argument("--sink", type=int, default=None, help="sink tokens of streaming heads (64)")
  ap.add_argument("--recent", type=int, default=None, help="recent window (256)")
  ap.add_argument("--lengths", default=lengths, help="context lengths in tokens, e.g. 1000,2000,4k")
  ap.add_argument("--haystack", default=None,
                  help="haystack text: folder of .txt, .txt, .json/.jsonl (default: the Paul "
                       "Graham essays beside the checkout, or $DUOJAX_HAYSTACK)")
  ap.add_argument("--samples", type=int, default=None, help="samples (haystack windows) per cell")
  ap.add_argument("--seed", type=int, default=0, help="seeds keys, offsets and random heads")
  ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                  help="auto: bfloat16 on GPU/TPU, float32 on CPU")
  ap.add_argument("--backend", default="auto", help="attention backend: auto, xla, gpu, tpu")
  ap.add_argument("--prefill-chunk", type=int, default=1024)
  ap.add_argument("--kv-dtype", default=None, choices=kv_quant.KV_DTYPES,
                  help="KV cache storage: int8/int4 quantise per token per KV head (scale + "
                       "zero, duojax.kv_quant); k8v4: int8 keys, int4 values; default: the "
                       "compute dtype")
  ap.add_argument("--weights-dtype", default="bf16", choices=("bf16", "int8"),
                  help="bf16: the weights as loaded (in --dtype); int8: weight-only int8 "
                       "projections through qwix (duojax/model/quant.py), quantised per "
                       "method after its head reordering, as serving.load_model does")
  ap.add_argument("--mesh", default=None,
                  help="device mesh, e.g. tensor=3 or data=2,sequence=4 (axes data, tensor, "
                       "sequence; the sizes multiply to the device count; ppl splits its "
                       "windows over data); default: one device")
  ap.add_argument("--out", required=True, help="results JSON")
  ap.add_argument("--plot", default=None, help="PNG figure")
  ap.add_argument("--no-progress", action="store_true")


def _grid_args(ap: argparse.ArgumentParser, max_new: int) -> None:
  ap.add_argument("--depths", default="10", help="a count (10 -> 0%%..100%%) or fractions 0,0.5,1")
  ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                  help="wrap prompts in the chat template (default on; --no-chat for raw text)")
  ap.add_argument("--offset", type=int, default=0, help="haystack token where sample 0 starts")
  ap.add_argument("--max-new-tokens", type=int, default=max_new)
  ap.add_argument("--batch-size", type=int, default=10, help="prompts per batch (one compile)")


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m duojax.eval", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="task", required=True)
  n = sub.add_parser("niah", help="needle in a haystack over lengths x depths")
  _common(n, "1000,2000,4000,8000")
  _grid_args(n, 32)
  n.add_argument("--needle", default=None, help="the sentence to hide")
  n.add_argument("--question", default=None)
  n.add_argument("--answer", default=None)
  k = sub.add_parser("mkniah", help="multi-key NIAH: --keys same-kind needles (a city's "
                                    "magic number), one asked, exact match, lengths x depths")
  _common(k, "1000,2000,4000,8000")
  _grid_args(k, 32)
  k.add_argument("--keys", type=int, default=4, help="needles per prompt, one of them asked")
  p = sub.add_parser("passkey", help="passkey retrieval over lengths x depths")
  _common(p, "1000,2000,4000,8000")
  _grid_args(p, 32)
  p.add_argument("--variant", default="numeric", choices=("numeric", "multi"))
  p.add_argument("--num-keys", type=int, default=4, help="multi: passkeys per prompt")
  p.add_argument("--key-words", type=int, default=4, help="multi: NATO words per passkey")
  q = sub.add_parser("ppl", help="perplexity of haystack windows (the longest --lengths), "
                                 "reported per position band (the other --lengths)")
  _common(q, "1000,2000,4000,8000")
  sub.add_parser("influence", help="AttentionInfluence data scoring (duojax.eval.influence)",
                 add_help=False)
  return ap


def check_args(a) -> None:
  """Before any model is loaded: ranges, and output paths that can be written (a grid can run
  for hours; its results must not be lost to an unwritable --out at the end)."""
  from duojax import validate
  from duojax.eval.methods import parse_sparsities
  for s in parse_sparsities(a.sparsity):
    validate.selection(s, None)
  validate.window(a.sink, a.recent)
  validate.at_least("--prefill-chunk", a.prefill_chunk, 1)
  validate.at_least("--samples", a.samples, 1)
  for flag in ("max_new_tokens", "batch_size", "keys"):
    validate.at_least("--" + flag.replace("_", "-"), getattr(a, flag, None), 1)
  quantised_kv = kv_quant.kv_bits_of(a.kv_dtype) is not None
  comp = [m for m in a.attention.split(",") if m.strip().endswith("+comp")]
  if quantised_kv and comp:
    raise validate.ArgumentError(f"{comp[0]}: the compensation token is built for "
                                 "unquantised caches only; drop +comp or use --kv-dtype bf16")
  if a.mesh:
    from duojax.eval.harness import parse_eval_mesh
    mesh = parse_eval_mesh(a.mesh)  # the product must match the devices, before any loading
    if comp and mesh.shape["sequence"] > 1:
      raise validate.ArgumentError(f"{comp[0]}: the compensation token is not built for "
                                   "--mesh sequence>1; use sequence=1 (data/tensor) or drop "
                                   "+comp")
  validate.writable_file("--out", a.out)
  validate.writable_file("--plot", a.plot)


def _run(a) -> dict:
  from duojax.attention.dispatch import resolve_backend
  check_args(a)
  resolve_backend(a.backend)  # an unavailable backend fails now, not after loading
  from duojax.data.niah import NeedleTask
  from duojax.eval import grid, harness, plots, ppl
  from duojax.eval.methods import build_methods, parse_methods, parse_named_patterns
  from duojax.pattern import load_any
  named = parse_named_patterns(a.patterns)
  methods = parse_methods(a.attention, a.sparsity, sources=named)
  lengths = grid.parse_lengths(a.lengths)
  depths = grid.parse_depths(a.depths) if a.task != "ppl" else None
  needle = None
  if a.task == "niah":
    base = NeedleTask()
    needle = NeedleTask(a.needle if a.needle is not None else base.needle,
                        a.question if a.question is not None else base.question,
                        a.answer if a.answer is not None else base.answer)
  progress = not a.no_progress
  mesh = harness.parse_eval_mesh(a.mesh)
  model = harness.load_eval_model(a.ckpt, a.pattern, a.dtype, progress=progress, mesh=mesh,
                                  weights_dtype=a.weights_dtype)
  loaded = {n: load_any(d) for n, d in named.items()}
  built = build_methods(methods, model.config, model.pattern, a.sink, a.recent, a.seed, loaded)
  hay, hay_path = harness.load_haystack_tokens(a.haystack, model.tokenizer)
  backend = resolve_backend(a.backend)
  if a.task == "ppl":
    doc = ppl.evaluate(model.params, model.config, hay, built, max(lengths),
                       a.samples or 2, lengths[:-1], a.prefill_chunk, backend, progress=progress,
                       kv_dtype=a.kv_dtype, weights_dtype=model.weights_dtype, mesh=mesh)
    doc["settings"] = {"ckpt": model.name or str(model.ckpt), "haystack": hay_path,
                       "dtype": model.dtype, "pattern": model.pattern_source,
                       "device": harness.device_info(mesh), "prefill_chunk": a.prefill_chunk,
                       "patterns": named, "kv_dtype": a.kv_dtype,
                       "weights_dtype": model.weights_dtype}
    if a.plot:
      plots.ppl_bands(doc, a.plot)
  else:
    gen_kw = dict(max_new_tokens=a.max_new_tokens, prefill_chunk=a.prefill_chunk,
                  batch_size=a.batch_size, backend=backend, kv_dtype=a.kv_dtype, mesh=mesh,
                  weights_dtype=model.weights_dtype)
    doc = harness.run_retrieval(
        a.task, model, hay, built, lengths, depths, a.chat, gen_kw, a.samples or 1, a.seed,
        a.offset, needle=needle, variant=getattr(a, "variant", "numeric"),
        num_keys=a.keys if a.task == "mkniah" else getattr(a, "num_keys", 4),
        key_words=getattr(a, "key_words", 4),
        progress=progress, extra_settings={"haystack": hay_path, "patterns": named,
                                           "kv_dtype": a.kv_dtype,
                                           "weights_dtype": model.weights_dtype})
    if a.plot:
      metric = doc["plot_metric"]
      plots.heatmaps(doc["summary"][metric], a.plot, f"{a.task} ({model.config.name})",
                     metric.replace("_", " "))
  harness.write_json(doc, a.out)
  return doc


def _print_summary(doc: dict) -> None:
  if doc["task"] == "ppl":
    for name, r in doc["results"].items():
      bands = "  ".join(f"[{b['from']},{b['to']}) {b['ppl']:.2f}" for b in r["bands"])
      print(f"{name:14s} ppl {r['ppl']:.3f}   {bands}")
    return
  metric = doc["plot_metric"]
  for name, s in doc["summary"][metric].items():
    per = "  ".join(f"{l}: {v:.2f}" for l, v in s["by_length"].items())
    print(f"{name:14s} {metric} {s['mean']:.3f}   {per}")


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "influence":
    return _influence(argv[1:])
  a = build_parser().parse_args(argv)
  try:
    doc = _run(a)
  except (InputError, CheckpointError, ConfigError, PatternError, ValueError, OSError) as e:
    print(f"duojax.eval: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("duojax.eval: interrupted; nothing was written", file=sys.stderr)
    return 130
  _print_summary(doc)
  print(f"wrote {a.out}" + (f" and {a.plot}" if a.plot else ""), file=sys.stderr)
  return 0


def _influence(argv: list[str]) -> int:
  from duojax.eval import influence  # its own parser; imported only when asked for
  return influence.main(argv)


if __name__ == "__main__":
  sys.exit(main())
