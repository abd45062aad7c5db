"""Peak host memory of `python -m duojax.convert --hf` on a Llama-3-8B-wide model.

A few layers of Llama-3-8B's width (hidden 4096, 32 q / 8 kv heads, intermediate 14336,
vocab 128256, untied head) with random weights, written by transformers' save_pretrained
as bf16 safetensors shards, converted with `--dtype bfloat16`. Each conversion runs in its
own process, watched by a small parent that reads its peak RSS from getrusage, so the
figure is the converter's alone. With two layer counts the slope is the cost per layer;
Llama-3-8B has 32 layers, so its conversion needs about intercept + 32 * slope.

  python infer/bench_convert_memory.py --layers 2,4 --old /tmp/old_worktree --out results/x
  python infer/bench_convert_memory.py --smoke     # a tiny model: checks the script only

--old: a checkout of an older duojax (e.g. `git worktree add DIR COMMIT`), measured the same
way with PYTHONPATH=DIR. The HF folders and converted checkpoints go into --work and are
deleted afterwards (several GB each) unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA3_8B_WIDE = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, head_dim=128,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=256, head_dim=16, max_position_embeddings=256, rope_theta=10000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=False)

# Writes the random HF folder in a child process, so its torch memory is gone before the
# conversions are measured. bf16 from the start: an fp32 init of 4 layers would need 8 GB.
_MAKE = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
shape, layers, out, shard = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
cfg = LlamaConfig(num_hidden_layers=layers, torch_dtype="bfloat16", **shape)
with torch.no_grad():
  model = LlamaForCausalLM(cfg)
model.save_pretrained(out, max_shard_size=shard, safe_serialization=True)
"""

# Runs argv and prints the child's peak RSS (KiB on Linux) as the last line.
_WATCH = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(r.returncode)
"""


def make_hf_folder(out: Path, layers: int, shape: dict, shard: str) -> None:
  subprocess.run([sys.executable, "-c", _MAKE, json.dumps(shape), str(layers), str(out), shard],
                 check=True)


def output_bytes(shape: dict, layers: int, itemsize: int = 2) -> int:
  """Bytes of the converted params (what the conversion must hold and write)."""
  e, f, v, d = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["head_dim"]
  hq, hkv = shape["num_attention_heads"], shape["num_key_value_heads"]
  per_layer = e * d * (2 * hq + 2 * hkv) + 3 * e * f + 2 * e
  return itemsize * (layers * per_layer + 2 * v * e + e)


def measure(code_root: Path, hf: Path, out: Path) -> dict:
  env = {**os.environ, "PYTHONPATH": str(code_root), "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "duojax.convert", "--hf", str(hf), "--out", str(out),
         "--dtype", "bfloat16", "--no-progress"]
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, "-c", _WATCH, *cmd], env=env, capture_output=True, text=True,
                     cwd=out.parent)
  secs = time.perf_counter() - t0
  if r.returncode != 0:
    raise SystemExit(f"conversion with {code_root} failed:\n{r.stdout}\n{r.stderr}")
  kib = int(r.stdout.strip().splitlines()[-1])
  return {"peak_rss_gb": kib * 1024 / 1e9, "seconds": round(secs, 1)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--layers", default="2,4", help="comma-separated layer counts")
  ap.add_argument("--old", help="root of an older duojax checkout to measure as well")
  ap.add_argument("--only-old", action="store_true", help="measure --old alone (with --keep, "
                  "the HF folders stay for a later run)")
  ap.add_argument("--work", default="/tmp/duojax_bench_convert", help="scratch folder (GBs)")
  ap.add_argument("--shard-size", default="2GB")
  ap.add_argument("--out", help="folder for convert_memory.json and .md")
  ap.add_argument("--keep", action="store_true", help="keep the HF folders")
  ap.add_argument("--smoke", action="store_true", help="a tiny model (checks the script only)")
  a = ap.parse_args(argv)
  shape = TINY if a.smoke else LLAMA3_8B_WIDE
  layer_counts = [int(x) for x in a.layers.split(",")]
  codes = {} if a.only_old else {"new": REPO}
  if a.old:
    codes = {"old": Path(a.old).resolve(), **codes}
  if not codes:
    ap.error("--only-old needs --old DIR")
  work = Path(a.work)
  work.mkdir(parents=True, exist_ok=True)
  rows = []
  try:
    for n in layer_counts:
      hf = work / f"hf_{n}l"
      if not hf.is_dir():
        make_hf_folder(hf, n, shape, "1MB" if a.smoke else a.shard_size)
      shards = sorted(hf.glob("*.safetensors"))
      largest = max(p.stat().st_size for p in shards)
      for name, root in codes.items():
        out = work / f"out_{n}l_{name}"
        shutil.rmtree(out, ignore_errors=True)
        m = measure(root, hf, out)
        shutil.rmtree(out, ignore_errors=True)
        rows.append({"layers": n, "code": name, **m, "output_gb": output_bytes(shape, n) / 1e9,
                     "largest_shard_gb": largest / 1e9, "shards": len(shards)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
      if not a.keep:
        shutil.rmtree(hf, ignore_errors=True)
  finally:
    if not a.keep:
      shutil.rmtree(work, ignore_errors=True)
  slopes = {}
  if len(layer_counts) >= 2:
    lo, hi = min(layer_counts), max(layer_counts)
    for name in codes:
      r = {x["layers"]: x["peak_rss_gb"] for x in rows if x["code"] == name}
      slope = (r[hi] - r[lo]) / (hi - lo)
      slopes[name] = {"gb_per_layer": slope, "intercept_gb": r[lo] - lo * slope,
                      "llama3_8b_32_layers_gb": r[lo] + (32 - lo) * slope}
  per_layer_bytes = output_bytes(shape, 1) - output_bytes(shape, 0)
  lines = ["| layers | code | peak RSS (GB) | output bf16 (GB) | largest shard (GB) | seconds |",
           "|---:|---|---:|---:|---:|---:|"]
  lines += [f"| {r['layers']} | {r['code']} | {r['peak_rss_gb']:.2f} | {r['output_gb']:.2f} | "
            f"{r['largest_shard_gb']:.2f} | {r['seconds']} |" for r in rows]
  for name, s in slopes.items():
    lines.append(f"\n{name}: {s['gb_per_layer']:.3f} GB per layer "
                 f"({s['gb_per_layer'] * 1e9 / per_layer_bytes:.2f}x a layer's bf16 bytes), "
                 f"intercept {s['intercept_gb']:.2f} GB; 32 layers: about "
                 f"{s['llama3_8b_32_layers_gb']:.1f} GB")
  table = "\n".join(lines)
  print(table)
  if a.out:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convert_memory.json").write_text(json.dumps(
        {"shape": shape, "rows": rows, "slopes": slopes, "layer_bf16_bytes": per_layer_bytes},
        indent=2))
    (out / "convert_memory.md").write_text(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
