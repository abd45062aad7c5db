"""How much of the gate-training signal survives bf16: the distillation loss and its gradient
with respect to the gates, at gates near 1, in bf16 and in fp32 on the same real samples.

  python train/distill_floor.py --ckpt smollm2-135m --haystack ../shared/data/paul_graham_essays \\
      --lengths 2048 --out OUT
  python train/distill_floor.py --ckpt qwen2.5-coder-0.5b --haystack HAY --lengths 8192 \\
      --pattern duojax/patterns/qwen2.5-coder-0.5b --out OUT          # on a GPU

Why: Qwen2.5-Coder's 400-step gates on the official recipe (from 1, reg 0.05) saturated
(mean 0.963, the top 24 within 0.991-1.000), so the ranking at sparsity 0.75 was on noise
(README, "Its pattern"). With every gate at 1 the student is the teacher, bit for bit, and
the distillation loss is 0; at gates of 0.998 the student's mix, 0.998 full + 0.002
streaming, is rounded to bf16 in every layer, and those roundings compound. If that
rounding, not the streaming branch, is most of the loss near 1, the gradient there is
mostly noise and the gates cannot separate.

For each gate setting (all 1, all 0.998, 0.99, 0.9, 0.5, and --pattern's trained gates) and
each dtype (the frozen weights and activations in bf16, or fp32), on the same --samples
passkey samples (the training data generator, exactly --lengths tokens), with the
regulariser off: the distillation loss, the gradient's norm, and how well the bf16
gradient points where the fp32 one does (cosine; 1 = the same direction). The attention
is the XLA reference in both (cuDNN refuses fp32). Writes distill_floor.json and
distill_floor.md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SETTINGS = ("1.0", "0.998", "0.99", "0.9", "0.5")


def gate_settings(shape, pattern: str | None, which=SETTINGS) -> dict[str, np.ndarray]:
  out = {s: np.full(shape, float(s), np.float32) for s in which if s != "trained"}
  if pattern and "trained" in which:
    tsv = Path(pattern) / "full_attention_heads.tsv"
    if not tsv.exists():
      raise SystemExit(f"--pattern {pattern}: no full_attention_heads.tsv there (a pattern "
                       "folder from python -m duojax.identify duo)")
    g = np.loadtxt(tsv, dtype=np.float32, ndmin=2)
    if g.shape != shape:
      raise SystemExit(f"--pattern {pattern}: gates of shape {g.shape}, the model has {shape}")
    out["trained"] = np.clip(g, 0.0, 1.0)
  return out


def cosine(a, b) -> float:
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  return float(a @ b / (na * nb)) if na and nb else float("nan")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--ckpt", required=True, help="checkpoint folder or embedded name")
  ap.add_argument("--haystack", required=True)
  ap.add_argument("--lengths", default="2048", help="comma list of sample lengths in tokens")
  ap.add_argument("--samples", type=int, default=2, help="passkey samples per length")
  ap.add_argument("--pattern", default=None, help="a trained pattern folder: its gates too")
  ap.add_argument("--gates", default=",".join((*SETTINGS, "trained")),
                  help="gate settings: values for every gate, and `trained` (--pattern's)")
  ap.add_argument("--sink", type=int, default=128)
  ap.add_argument("--recent", type=int, default=256)
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from duojax.checkpoint import store
  from duojax.checkpoint.embedded import resolve_checkpoint
  from duojax.data.haystack import HaystackTokens, load_haystack
  from duojax.data.passkey import MultiPasskeyConfig, make_sample
  from duojax.identify import duo
  from duojax.model import llama

  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  folder = resolve_checkpoint(args.ckpt)
  config = store.load_config(folder)
  params = store.load_params(folder)
  tok = store.load_tokenizer(folder)
  hay = HaystackTokens(load_haystack(args.haystack), tok, line_breaks=False)
  shape = (config.num_layers, config.num_kv_heads)
  settings = gate_settings(shape, args.pattern, args.gates.split(","))
  stacked = {dt: llama.stack_layers(jax.tree_util.tree_map(lambda x: jnp.asarray(x, dt), params))
             for dt in (jnp.bfloat16, jnp.float32)}
  del params

  @jax.jit
  def loss_and_grad(gates, p, tokens, lengths, mask):
    f = lambda g: duo.gate_loss(g, p, config, tokens, lengths, mask, sink=args.sink,
                                recent=args.recent, reg=0.0, backend="xla")
    (_, aux), g = jax.value_and_grad(f, has_aux=True)(gates)
    return aux["distill"], g

  rows = []
  for t in (int(x) for x in args.lengths.split(",")):
    data_cfg = MultiPasskeyConfig(min_len=t, max_len=t, len_intervals=1, seed=7)
    for i in range(args.samples):
      s = make_sample(hay, tok, data_cfg, i)
      tokens = jnp.asarray(np.asarray(s.input_ids, np.int32)[None])
      lengths = jnp.asarray([len(s.input_ids)], jnp.int32)
      mask = jnp.asarray(np.asarray(s.loss_mask, bool)[None])
      for name, g in settings.items():
        res = {}
        for dt, p in stacked.items():
          t0 = time.perf_counter()
          d, grad = loss_and_grad(jnp.asarray(g), p, tokens, lengths, mask)
          res[jnp.dtype(dt).name] = (float(d), np.asarray(grad, np.float64),
                                     time.perf_counter() - t0)
        (d16, g16, s16), (d32, g32, s32) = res["bfloat16"], res["float32"]
        row = {"length": t, "sample": i, "gates": name, "distill_bf16": d16,
               "distill_fp32": d32, "grad_norm_bf16": float(np.linalg.norm(g16)),
               "grad_norm_fp32": float(np.linalg.norm(g32)), "grad_cosine": cosine(g16, g32),
               "seconds": round(s16 + s32, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
  meta = {"ckpt": args.ckpt, "device": str(jax.devices()[0]), "sink": args.sink,
          "recent": args.recent, "samples": args.samples,
          "command": " ".join(["python train/distill_floor.py"] + (argv or sys.argv[1:]))}
  (out / "distill_floor.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  table = format_table(rows, meta)
  (out / "distill_floor.md").write_text(table)
  print(table)


def format_table(rows, meta) -> str:
  """Means over samples, per (length, gates)."""
  lines = [f"{meta['ckpt']} on {meta['device']}; reg 0, sink {meta['sink']} / recent "
           f"{meta['recent']}, {meta['samples']} samples a length (means)", "",
           "| length | gates | distill bf16 | distill fp32 | bf16 / fp32 | grad norm bf16 | "
           "grad norm fp32 | cosine(grad bf16, grad fp32) |", "|---|---|---|---|---|---|---|---|"]
  keys = []
  for r in rows:
    if (r["length"], r["gates"]) not in keys:
      keys.append((r["length"], r["gates"]))
  for t, name in keys:
    rs = [r for r in rows if (r["length"], r["gates"]) == (t, name)]
    m = {k: float(np.mean([r[k] for r in rs])) for k in
         ("distill_bf16", "distill_fp32", "grad_norm_bf16", "grad_norm_fp32", "grad_cosine")}
    ratio = m["distill_bf16"] / m["distill_fp32"] if m["distill_fp32"] else float("inf")
    lines.append(f"| {t} | {name} | {m['distill_bf16']:.3g} | {m['distill_fp32']:.3g} | "
                 f"{ratio:.3g} | {m['grad_norm_bf16']:.3g} | {m['grad_norm_fp32']:.3g} | "
                 f"{m['grad_cosine']:.3f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
