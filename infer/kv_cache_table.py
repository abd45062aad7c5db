"""KV-cache bytes, full vs DuoAttention, for real model shapes (no weights needed).

  python -m infer.kv_cache_table [--patterns ../shared/data/duo_attention_patterns] [--out DIR]

Uses the official DuoAttention patterns of Llama-3-8B and Llama-2-7B binarised at
each sparsity (the real per-layer splits), bf16, batch 1, deployment sink 64 /
recent 256. Prints a Markdown table and writes kv_cache_table.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp

from duojax.cache import kv_cache_bytes
from duojax.config import DEPLOY, LLAMA2_7B, LLAMA3_8B
from duojax.pattern import load_any

MODELS = {"Llama-3-8B (GQA 32/8)": (LLAMA3_8B, "Llama-3-8B-Instruct-Gradient-1048k"),
          "Llama-2-7B (MHA 32/32)": (LLAMA2_7B, "Llama-2-7B-32K-Instruct")}
LENGTHS = {"32K": 32 * 1024, "128K": 128 * 1024, "1M": 1024 * 1024}


def gib(n: int) -> str:
  return f"{n / 2**30:.2f}"


def main(argv=None):
  here = Path(__file__).resolve().parents[1]
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--patterns", default=str(here.parent / "shared/data/duo_attention_patterns"))
  ap.add_argument("--out", default=None)
  a = ap.parse_args(argv)
  rows = []
  print("| model | tokens | full GiB | duo 0.5 GiB | ratio | duo 0.75 GiB | ratio |")
  print("|---|---|---|---|---|---|---|")
  for label, (cfg, folder) in MODELS.items():
    pat = load_any(Path(a.patterns) / folder).with_settings(sink=DEPLOY.sink,
                                                            recent=DEPLOY.recent)
    masks = {s: pat.binarize(sparsity=s) for s in (0.5, 0.75)}
    for lname, n in LENGTHS.items():
      full = kv_cache_bytes(cfg, None, n, 1, jnp.bfloat16)
      duo = {s: kv_cache_bytes(cfg, m, n, 1, jnp.bfloat16) for s, m in masks.items()}
      rows.append({"model": label, "tokens": n, "full_bytes": full,
                   **{f"duo_{s}_bytes": b for s, b in duo.items()}})
      print(f"| {label} | {lname} | {gib(full)} | {gib(duo[0.5])} | {full / duo[0.5]:.2f}x | "
            f"{gib(duo[0.75])} | {full / duo[0.75]:.2f}x |")
  if a.out:
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "kv_cache_table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
  main()
