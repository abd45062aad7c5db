"""One gate-training step at a long context: step time and memory, one device or a mesh.

  python -m infer.bench_train_step --out OUT --tokens 32K                        # one GPU
  python -m infer.bench_train_step --out OUT --tokens 32K --mesh none --mesh sequence=2
  python -m infer.bench_train_step --out /tmp/bt --smoke                         # CPU check

The step is DuoAttention's gate training as `python -m duojax.identify duo` runs it
(`duo.build_step`: the frozen model stacked and scanned with remat, full and streaming
branches, distillation loss + L1 on the gates, optax update), on the Llama-3-8B shape
(--model llama2-7b: the MHA shape) with random bf16 weights (bench_decode's), gates at 1,
one row of random tokens with the loss on its last --loss-tokens tokens. Each --mesh
(repeatable; `none` is one device) builds the step on that mesh (axes data, fsdp, sequence,
tensor; the weights placed by the training rules) and times --steps steps after one warm-up.

Memory is per device, from the compiled step (`memory_analysis`: its arguments, i.e. the
frozen weights' shards, gates and batch, and XLA's temporaries), plus the device's own
high-water mark where it reports one (GPU: `peak_bytes_in_use`, the whole process so far,
so it only grows from one --mesh to the next). Writes bench_train_step.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # pragma: no cover - run as a file
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infer.bench_decode import (  # noqa: E402
    build_mesh, build_params, kfmt, model_configs, parse_context)


def _memory(compiled) -> tuple[float | None, float | None]:
  """(arguments GB, temporaries GB) per device of a compiled step, or Nones."""
  try:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes / 1e9, m.temp_size_in_bytes / 1e9
  except Exception:  # noqa: BLE001  (a backend without memory analysis)
    return None, None


def _device_peak_GB(mesh) -> float | None:
  devs = mesh.devices.flat if mesh is not None else []
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devs]
  return None if not peaks or None in peaks else max(peaks) / 1e9


def run_one(spec: str | None, params, config, tokens: int, loss_tokens: int, steps: int,
            seed: int = 0) -> dict:
  import jax
  import numpy as np
  from duojax.identify import duo
  n = None if spec in (None, "none") else spec
  mesh = duo.make_mesh(1) if n is None else build_mesh(n)
  cfg = duo.GateTrainConfig(steps=steps + 1, max_len=tokens, min_len=min(1000, tokens))
  t0 = time.perf_counter()
  step, state = duo.build_step(params, config, cfg, mesh)
  gates, opt_state = step.place_state(state)
  rng = np.random.default_rng(seed)
  tok = rng.integers(3, config.vocab_size, (cfg.batch_size, tokens)).astype(np.int32)
  lengths = np.full((cfg.batch_size,), tokens, np.int32)
  mask = np.zeros((cfg.batch_size, tokens), bool)
  mask[:, -loss_tokens:] = True
  batch = step.place_batch(tok, lengths, mask)
  compiled = step.fn.lower(gates, opt_state, step.frozen, *batch).compile()
  compile_s = time.perf_counter() - t0
  args_GB, temp_GB = _memory(compiled)
  times = []
  for i in range(steps + 1):  # the first is the warm-up
    # the step's outputs may come back sharded otherwise than its compiled (replicated)
    # inputs: put the gates and optimizer state back (a few KB), outside the timing
    gates, opt_state = jax.device_put((gates, opt_state), step.replicated)
    jax.block_until_ready(gates)
    t0 = time.perf_counter()
    gates, opt_state, metrics, _ = compiled(gates, opt_state, step.frozen, *batch)
    jax.block_until_ready(metrics)
    if i:
      times.append(time.perf_counter() - t0)
  return {"mesh": n or "one device", "devices": mesh.size, "tokens": tokens,
          "step_s": float(np.median(times)), "step_s_all": times, "compile_s": compile_s,
          "args_GB_per_device": args_GB, "xla_temp_GB_per_device": temp_GB,
          "device_peak_GB": _device_peak_GB(mesh), "loss": float(metrics["loss"])}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--model", default="llama3-8b")
  ap.add_argument("--tokens", default="32K", help="sequence length, e.g. 32K, 16384")
  ap.add_argument("--loss-tokens", type=int, default=64, help="tokens at the end with loss")
  ap.add_argument("--mesh", action="append", default=None,
                  help="repeatable: none (one device) or a training mesh, e.g. sequence=2, "
                       "data=2, fsdp=2, tensor=2 (default: none)")
  ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
  ap.add_argument("--smoke", action="store_true", help="tiny model, 256 tokens (CPU)")
  args = ap.parse_args(argv)
  if args.steps < 1 or args.loss_tokens < 1:
    raise SystemExit("--steps and --loss-tokens must be >= 1")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  import jax
  name = "tiny-gqa" if args.smoke else args.model
  config = model_configs(args.smoke)[name]
  tokens = 256 if args.smoke else parse_context(args.tokens)
  if args.loss_tokens > tokens:
    raise SystemExit(f"--loss-tokens {args.loss_tokens} is more than --tokens {tokens}")
  specs = args.mesh or ["none"]
  dev = jax.devices()[0]
  meta = {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__,
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "command": "python -m infer.bench_train_step " + " ".join(argv or sys.argv[1:]),
          "model": name, "tokens": tokens, "loss_tokens": args.loss_tokens,
          "device_count": jax.device_count()}
  print(f"# {meta['device']}: {name}, {kfmt(tokens)} tokens, meshes {specs}", flush=True)
  # gate training reads the unpacked layout (model/pack.py is a serving option)
  params = build_params(config, "bf16", pack=False)
  rows = []
  for spec in specs:
    row = run_one(spec, params, config, tokens, args.loss_tokens, args.steps)
    rows.append(row)
    print(json.dumps(row), flush=True)

  (out / "bench_train_step.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  fmt = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
  base = rows[0]["step_s"]
  lines = [f"Device {meta['device']}, {meta['date']}; {name}, one row of {kfmt(tokens)} tokens, "
           f"loss on the last {args.loss_tokens}; `{meta['command']}`", "",
           "| mesh | devices | step s | vs the first row | compile s | weights+batch GB / device "
           "| XLA temp GB / device | device peak GB |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['mesh']} | {r['devices']} | {r['step_s']:.3f} | "
                 f"{base / r['step_s']:.2f}x | {r['compile_s']:.0f} | "
                 f"{fmt(r['args_GB_per_device'])} | {fmt(r['xla_temp_GB_per_device'])} | "
                 f"{fmt(r['device_peak_GB'])} |")
  table = "\n".join(lines) + "\n"
  (out / "bench_train_step.md").write_text(table)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
  labels = [f"{r['mesh']}\n({r['devices']} dev)" for r in rows]
  a1.bar(labels, [r["step_s"] for r in rows], color="tab:blue")
  a1.set_ylabel("seconds per step")
  mem = [(r["args_GB_per_device"] or 0) + (r["xla_temp_GB_per_device"] or 0) for r in rows]
  a2.bar(labels, mem, color="tab:orange")
  a2.set_ylabel("GB per device (arguments + temporaries)")
  fig.suptitle(f"gate-training step, {name}, {kfmt(tokens)} tokens: {meta['device']}")
  fig.tight_layout()
  fig.savefig(out / "bench_train_step.png", dpi=120)
  print(table)


if __name__ == "__main__":
  main()
