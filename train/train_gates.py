"""Gate-training job: DuoAttention gates for one model, from a configs/ YAML recipe.

  python train/train_gates.py --config configs/smollm2_duo.yaml \
      --haystack ../shared/data/paul_graham_essays --out runs/smollm2
  train/launch_multihost.sh --config configs/llama3_8b_duo.yaml ...   # every host of a pod

The recipe (model, steps, lengths, sink / recent, lr, reg, ...) is the YAML; any flag of
`python -m duojax.identify duo` overrides it (`--steps 2`, `--resume`, `--mesh data=4`).
The training itself is the library's (`duojax.identify.duo.train_gates` through the
`duo` command); this job adds what a long run wants around it: the multi-host start
(`--distributed`: jax.distributed.initialize with `--coordinator`, `--num-processes`,
`--process-id` or the environment; a no-op on one host), and a record of the run in
`--out`: the recipe as given (`recipe.yaml`) and `job.json` (per start or resume: command,
processes, devices, JAX version), written by process 0 before the first step.

Needs duojax importable (`pip install -e .` at the repository root).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from duojax.identify import __main__ as identify_cli


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
      prog="train/train_gates.py", add_help=False,
      description="Train DuoAttention gates from a configs/ YAML; other flags go to "
                  "`python -m duojax.identify duo` (see its --help).")
  ap.add_argument("--config", help="the recipe: a YAML file (see configs/); required")
  ap.add_argument("--out", default=None, help="output folder (default: the recipe's `out`)")
  ap.add_argument("-h", "--help", action="store_true")
  return ap


def _record(config: Path, out: Path, argv: list[str], resume: bool) -> None:
  """recipe.yaml (the recipe a run started from) and job.json (one entry per start or
  resume), so a run folder says how it was made."""
  import jax
  ckpts = out / "checkpoints"
  if not resume and ckpts.is_dir() and any(ckpts.iterdir()):
    return  # the duo command refuses this folder; leave the earlier run's record alone
  out.mkdir(parents=True, exist_ok=True)
  if not resume or not (out / "recipe.yaml").exists():
    shutil.copyfile(config, out / "recipe.yaml")
  dev = jax.devices()
  start = {"command": " ".join(["python train/train_gates.py", *argv]),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "resume": resume,
           "processes": jax.process_count(), "devices": len(dev),
           "device_kind": dev[0].device_kind, "jax": jax.__version__}
  runs = []
  if resume and (out / "job.json").is_file():
    runs = json.loads((out / "job.json").read_text()).get("runs", [])
  (out / "job.json").write_text(json.dumps({"runs": runs + [start]}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  a, rest = _parser().parse_known_args(argv)
  if a.help:
    _parser().print_help()
    print("\nflags of the duo command (all may be given here):\n")
    identify_cli.duo_parser().print_help()
    return 0
  if not a.config:
    print("train_gates: error: --config is required (a recipe from configs/)", file=sys.stderr)
    return 2
  config = Path(a.config)
  if not config.is_file():
    print(f"train_gates: error: --config {config} not found (the recipes are in configs/)",
          file=sys.stderr)
    return 2
  duo_argv = ["--config", str(config), *rest] + (["--out", a.out] if a.out else [])
  d = identify_cli.duo_parser().parse_args(duo_argv)  # flags checked before anything starts
  if d.distributed:
    try:
      identify_cli.init_distributed(d.coordinator, d.num_processes, d.process_id)
    except ValueError as e:
      print(f"train_gates: error: {e}", file=sys.stderr)
      return 2
    # joined once here; the duo command must not initialise again
    duo_argv = [x for x in duo_argv if x != "--distributed"]
  import yaml
  out = a.out or (yaml.safe_load(config.read_text()) or {}).get("out")
  import jax
  if out and jax.process_index() == 0:
    try:
      _record(config, Path(out), argv, d.resume)
    except OSError as e:
      print(f"train_gates: error: cannot write the run record into --out {out}: {e}",
            file=sys.stderr)
      return 2
  return identify_cli.run_duo(duo_argv)


if __name__ == "__main__":
  sys.exit(main())
