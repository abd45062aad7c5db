"""`python -m duojax.identify {duo,razor,retrieval-score} ...`: find retrieval heads."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path

import numpy as np

USAGE = """usage: python -m duojax.identify {duo,razor,retrieval-score} [options]

  duo              train one gate per (layer, KV head) (DuoAttention)
  razor            training-free echo/induction scores (RazorAttention)
  retrieval-score  copy-paste retrieval score over NIAH decoding (Wu et al.)
"""


def duo_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m duojax.identify duo",
                               description="Train DuoAttention gates with all weights frozen.")
  ap.add_argument("--config", help="a YAML file of settings (see configs/); flags override it")
  ap.add_argument("--ckpt", default=None, help="checkpoint folder or embedded name (smollm2-135m)")
  ap.add_argument("--haystack", default=None, help="folder of .txt files, a .txt, or .json/.jsonl")
  ap.add_argument("--out", default=None, help="output folder (pattern, log, checkpoints, heatmap)")
  for name, typ in (("steps", int), ("batch-size", int), ("min-len", int), ("max-len", int),
                    ("len-intervals", int), ("sink", int), ("recent", int), ("lr", float),
                    ("reg", float), ("seed", int), ("save-every", int), ("pad-multiple", int),
                    ("num-passkeys", int), ("passkey-words", int)):
    ap.add_argument(f"--{name}", type=typ, default=None)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  ap.add_argument("--mesh", default=None, help="data=N: data-parallel devices (default: all)")
  ap.add_argument("--distributed", action="store_true",
                  help="call jax.distributed.initialize() first (multi-host)")
  ap.add_argument("--backend", default="auto",
                  help="attention backend for training: auto (tpu on a TPU: splash kernels with "
                       "their backward; elsewhere the XLA reference), xla, tpu")
  ap.add_argument("--sparsity", type=float, default=None,
                  help="record this binarisation in the pattern (default 0.5 GQA / 0.75 MHA)")
  ap.add_argument("--set-default", action="store_true",
                  help="also install the pattern as the checkpoint's default pattern")
  return ap


def _settings(a) -> tuple[dict, dict]:
  """YAML file merged with flags -> (GateTrainConfig fields, job fields)."""
  import yaml
  d = {}
  if a.config:
    p = Path(a.config)
    if not p.is_file():
      raise ValueError(f"--config {p} not found")
    d = yaml.safe_load(p.read_text()) or {}
  job = {k: d.pop(k, None) for k in ("ckpt", "haystack", "out", "mesh", "sparsity")}
  for k, v in vars(a).items():
    if v is None or k in ("config", "resume", "distributed", "backend", "set_default"):
      continue
    if k in job:
      job[k] = v
    else:
      d[k] = v
  return d, job


def run_duo(argv) -> int:
  a = duo_parser().parse_args(argv)
  from duojax.checkpoint import store
  from duojax.checkpoint.embedded import resolve_checkpoint
  from duojax.checkpoint.hf import CheckpointError
  from duojax.data.haystack import HaystackTokens, load_haystack
  from duojax.identify import duo
  from duojax.pattern import HeadPattern
  from duojax.serving import default_sparsity
  try:
    fields, job = _settings(a)
    cfg = duo.GateTrainConfig.from_dict(fields)
    if not job["haystack"] or not job["out"]:
      raise ValueError("--haystack and --out are required (or set them in --config)")
    if a.distributed:
      import jax
      jax.distributed.initialize()
    data = None
    if job["mesh"]:
      key, _, val = str(job["mesh"]).partition("=")
      if key != "data" or not val.isdigit():
        raise ValueError(f"--mesh takes data=N, got {job['mesh']!r}")
      data = int(val)
    mesh = duo.make_mesh(data)
    folder = resolve_checkpoint(job["ckpt"])
    config = store.load_config(folder)
    params = store.load_params(folder)
    tok = store.load_tokenizer(folder)
    hay = HaystackTokens(load_haystack(job["haystack"]), tok, line_breaks=False)
    out = Path(job["out"])
    from duojax.attention.dispatch import resolve_backend
    state = duo.train_gates(params, config, tok, hay, cfg, out, mesh, a.resume,
                            resolve_backend(a.backend))
    gates = np.asarray(state.gates)
    sparsity = job["sparsity"] if job["sparsity"] is not None else default_sparsity(config)
    meta = {"model": config.name, "method": "duo", "data": str(job["haystack"]), "seed": cfg.seed,
            "steps": cfg.steps, "train_settings": dataclasses.asdict(cfg),
            "selection": {"sparsity": sparsity}}
    last = _last_log(out / "log.jsonl")
    if last:
      meta["final"] = last
    pat = HeadPattern(gates, cfg.sink, cfg.recent, meta, clip=True)
    pat.save(out / "pattern", overwrite=True)
    duo.plot_gates(gates, out / "gates.png", f"{config.name}: DuoAttention gates")
    if a.set_default:
      name = f"duo-{out.name}"
      pat.save(store.pattern_dir(folder, name), overwrite=True)
      store.set_default_pattern(folder, name)
  except (ValueError, CheckpointError) as e:
    print(f"duojax.identify duo: error: {e}", file=sys.stderr)
    return 2
  mask = pat.mask()
  print(json.dumps({"out": str(out), "steps": state.step, "final": last,
                    "retrieval_fraction": mask.retrieval_fraction}))
  return 0


def _last_log(path: Path) -> dict | None:
  if not path.is_file():
    return None
  lines = path.read_text().strip().splitlines()
  return json.loads(lines[-1]) if lines else None


SUBCOMMANDS = {"razor": "duojax.identify.razor", "retrieval-score": "duojax.identify.retrieval_score"}


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE)
    return 0 if argv else 2
  cmd, rest = argv[0], argv[1:]
  if cmd == "duo":
    return run_duo(rest)
  if cmd in SUBCOMMANDS:
    try:
      mod = importlib.import_module(SUBCOMMANDS[cmd])
    except ImportError as e:
      print(f"duojax.identify {cmd}: not available ({e})", file=sys.stderr)
      return 2
    return mod.main(rest)
  print(f"duojax.identify: unknown method {cmd!r}\n{USAGE}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
