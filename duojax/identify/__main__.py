"""`python -m duojax.identify {duo,razor,retrieval-score} ...`: find retrieval heads."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import signal
import sys
import threading
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
                    ("reg", float), ("init-gate", float), ("seed", int), ("save-every", int),
                    ("pad-multiple", int), ("num-passkeys", int), ("passkey-words", int)):
    ap.add_argument(f"--{name}", type=typ, default=None)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  ap.add_argument("--student", choices=("official", "deployed"), default=None,
                  help="which hidden states the student's full-attention branch reads "
                       "(default deployed: it found the better SmolLM2 heads). official: the "
                       "teacher's full attention of that layer, from the teacher's hidden "
                       "states without gradient (the official code's two-way forward). "
                       "deployed: the student's own hidden states, like the streaming branch "
                       "(the paper's equations; the model as served)")
  ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  ap.add_argument("--mesh", default=None,
                  help="device mesh, e.g. data=4 or data=2,fsdp=2,tensor=2 or data=2,sequence=4 "
                       "(axes data, fsdp, sequence, tensor; frozen weights FSDP over fsdp, KV "
                       "heads and the MLP over tensor, each sample's tokens over sequence; "
                       "default: every device on data)")
  ap.add_argument("--distributed", action="store_true",
                  help="multi-host: join the other processes with jax.distributed.initialize "
                       "first (a no-op when there is one process)")
  ap.add_argument("--coordinator", default=None,
                  help="with --distributed: host:port of process 0 (default: "
                       "$JAX_COORDINATOR_ADDRESS, else what JAX detects on SLURM / MPI / TPU)")
  ap.add_argument("--num-processes", type=int, default=None,
                  help="with --distributed: processes in the job (default: $JAX_NUM_PROCESSES)")
  ap.add_argument("--process-id", type=int, default=None,
                  help="with --distributed: this process's rank (default: $JAX_PROCESS_ID)")
  ap.add_argument("--backend", default="auto",
                  help="attention backend for training: auto (tpu on a TPU: splash kernels with "
                       "their backward; gpu on an NVIDIA GPU: cuDNN's fused causal attention "
                       "for bf16; elsewhere the XLA reference), xla, tpu, gpu")
  ap.add_argument("--sparsity", type=float, default=None,
                  help="record this binarisation in the pattern (default 0.5 GQA / 0.75 MHA)")
  ap.add_argument("--set-default", action="store_true",
                  help="also install the pattern as the checkpoint's default pattern")
  return ap


DISTRIBUTED_FLAGS = ("distributed", "coordinator", "num_processes", "process_id")


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> int:
  """Joins a multi-host job; returns the number of processes (1: nothing was done).

  Unset values come from $JAX_COORDINATOR_ADDRESS (which JAX itself reads), and
  $JAX_NUM_PROCESSES / $JAX_PROCESS_ID (read here: JAX takes them only as arguments);
  what is still unset JAX detects on a cluster (SLURM, Open MPI, Cloud TPU). One process,
  or no coordinator and no cluster to detect, is a single-host run: a no-op, so the same
  command runs on a laptop and on every host of a pod.
  """
  import jax
  env = os.environ
  coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
  try:
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
      num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
      process_id = int(env["JAX_PROCESS_ID"])
  except ValueError as e:
    raise ValueError(f"$JAX_NUM_PROCESSES / $JAX_PROCESS_ID must be integers ({e})") from None
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
  if num_processes == 1:
    return 1
  if num_processes is not None and (process_id is None or coordinator is None):
    missing = [n for n, v in (("--process-id", process_id), ("--coordinator", coordinator))
               if v is None]
    raise ValueError(f"--num-processes {num_processes} also needs {' and '.join(missing)} "
                     "(or $JAX_PROCESS_ID / $JAX_COORDINATOR_ADDRESS) on every host")
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  except ValueError as e:
    if coordinator is None and num_processes is None:  # nothing to join: one host
      print(f"--distributed: no coordinator and no cluster found ({e}); running on this host "
            "alone", file=sys.stderr)
      return 1
    raise
  return jax.process_count()


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
    if v is None or k in ("config", "resume", "backend", "set_default") + DISTRIBUTED_FLAGS:
      continue
    if k in job:
      job[k] = v
    else:
      d[k] = v
  return d, job


@contextlib.contextmanager
def _ctrl_c(prog: str, out: Path):
  """Ctrl-C during training: the first sets the yielded event, and training stops after the step
  in flight and saves it; the second quits at once.

  The handler only sets a flag: a KeyboardInterrupt raised wherever Python happens to be can
  land inside orbax's writer threads, after which the run hangs at exit ("cannot schedule new
  futures after shutdown"; seen in CI). A compile or a long step runs in XLA, where Python's
  own handler cannot run, so a thread watches signal.set_wakeup_fd, which the interpreter
  writes to the moment a signal arrives, for the second Ctrl-C. The last complete checkpoint
  always stays: `--resume` continues from it.
  """
  stop = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield stop
    return
  r, w = os.pipe()
  os.set_blocking(w, False)
  try:
    old_fd = signal.set_wakeup_fd(w)
  except ValueError:
    os.close(r), os.close(w)
    yield stop
    return
  old_handler = signal.signal(signal.SIGINT, lambda *_: stop.set())
  done = threading.Event()

  def watch():
    seen = 0
    while not done.is_set():
      try:
        data = os.read(r, 64)
      except OSError:
        return
      if not data:
        return
      seen += data.count(bytes([signal.SIGINT]))
      if seen == 1 and data.count(bytes([signal.SIGINT])):
        print(f"\n{prog}: interrupted; stopping after the work in flight (the last checkpoint in "
              f"{out / 'checkpoints'} stays; --resume continues from it). Ctrl-C again quits "
              "at once.", file=sys.stderr, flush=True)
      elif seen >= 2:
        print(f"{prog}: quitting now; the last complete checkpoint stays (--resume)",
              file=sys.stderr, flush=True)
        os._exit(130)

  t = threading.Thread(target=watch, daemon=True)
  t.start()
  try:
    yield stop
  finally:
    done.set()
    signal.set_wakeup_fd(old_fd)
    signal.signal(signal.SIGINT, old_handler)
    os.close(w)  # ends the watcher's read
    t.join(timeout=1)
    os.close(r)


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
    _check_job(job["haystack"], job["out"], job["sparsity"])
    if a.distributed:
      init_distributed(a.coordinator, a.num_processes, a.process_id)
    # data=N, or any of data, fsdp, sequence, tensor (sizes multiplying to a divisor of
    # the devices); none: every device on data
    mesh = duo.make_mesh(str(job["mesh"]) if job["mesh"] else None)
    duo.check_backend(a.backend, mesh)  # before loading: kernels need one device for now
    folder = resolve_checkpoint(job["ckpt"])
    config = store.load_config(folder)
    # on a mesh of several devices every tensor is read straight into its training shard
    params = store.load_params(folder, shardings=duo.restore_shardings(config, mesh))
    tok = store.load_tokenizer(folder)
    hay = HaystackTokens(load_haystack(job["haystack"]), tok, line_breaks=False)
    out = Path(job["out"])
    from duojax.attention.dispatch import resolve_backend
    # the kernels do not run under a sharded jit yet: auto means xla on several devices
    backend = "xla" if a.backend == "auto" and mesh.size > 1 else resolve_backend(a.backend)
    with _ctrl_c("duojax.identify duo", out) as stop:
      state = duo.train_gates(params, config, tok, hay, cfg, out, mesh, a.resume, backend,
                              stop=stop)
    if stop.is_set() and state.step < cfg.steps:
      print(f"duojax.identify duo: stopped at step {state.step} (saved); checkpoints are in "
            f"{out / 'checkpoints'}: continue with --resume", file=sys.stderr)
      return 130
    # replicated on every device: one local copy is the whole array, also multi-host
    gates = np.asarray(state.gates.addressable_data(0))
    sparsity = job["sparsity"] if job["sparsity"] is not None else default_sparsity(config)
    meta = {"model": config.name, "method": "duo", "data": str(job["haystack"]), "seed": cfg.seed,
            "steps": cfg.steps, "train_settings": dataclasses.asdict(cfg),
            "selection": {"sparsity": sparsity}}
    last = _last_log(out / "log.jsonl")
    if last:
      meta["final"] = last
    pat = HeadPattern(gates, cfg.sink, cfg.recent, meta, clip=True)
    import jax
    if jax.process_index() != 0:  # multi-host: the hosts hold the same gates; one writes
      return 0
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


def _check_job(haystack, out, sparsity=None) -> None:
  """Before the model loads: the data exists, the output folder can be written."""
  from duojax import validate
  if haystack is not None and not Path(haystack).exists():
    raise validate.ArgumentError(f"--haystack {haystack} not found; pass a folder of .txt files, "
                                 "a .txt, or a .json/.jsonl file")
  validate.writable_dir("--out", out)
  validate.selection(sparsity, None)


def _last_log(path: Path) -> dict | None:
  if not path.is_file():
    return None
  lines = path.read_text().strip().splitlines()
  return json.loads(lines[-1]) if lines else None


def _precheck(cmd: str, argv: list[str]) -> None:
  """The checks razor and retrieval-score share, before their model loads (their own parser
  reports unknown or missing flags; this one only reads the values it checks)."""
  from duojax import validate
  ap = argparse.ArgumentParser(add_help=False)
  ap.add_argument("--out")
  ap.add_argument("--haystack")
  ap.add_argument("--sparsity", type=float)
  ap.add_argument("--threshold", type=float)
  ap.add_argument("--sink", type=int)
  ap.add_argument("--recent", type=int)
  try:
    a, _ = ap.parse_known_args(argv)
  except SystemExit:
    return  # malformed values: the subcommand's own parser says what is wrong
  if "-h" in argv or "--help" in argv:
    return
  _check_job(a.haystack, a.out, a.sparsity)
  if cmd == "retrieval-score":
    validate.in_range("--threshold", a.threshold, 0.0, 1.0,
                      hint="a KV head's retrieval score is a fraction of its decoding steps")
  validate.window(a.sink, a.recent)


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
    try:
      _precheck(cmd, rest)
    except ValueError as e:
      print(f"duojax.identify {cmd}: error: {e}", file=sys.stderr)
      return 2
    try:
      return mod.main(rest)
    except KeyboardInterrupt:
      print(f"duojax.identify {cmd}: interrupted; nothing was written", file=sys.stderr)
      return 130
  print(f"duojax.identify: unknown method {cmd!r}\n{USAGE}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  try:
    sys.exit(main())
  except KeyboardInterrupt:  # a Ctrl-C outside the handled stretches: no traceback
    sys.exit(130)
