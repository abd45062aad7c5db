"""Chunked prefill time and memory: full attention vs DuoAttention.

  python -m infer.bench_prefill --out out/bench_prefill                # GPU
  python -m infer.bench_prefill --out /tmp/bp --smoke                  # CPU check (tiny model)

The Llama-3-8B shape (or --model llama2-7b) with random bf16 weights made on
the device, batch 1, random prompt tokens, chunks of --chunk tokens through
`engine.prefill_step` (compiled once per config for a cache of the longest
context). One pass over the longest context; the prefill time of a shorter
context is the cumulative time at its last chunk (the chunks before it are the
same work), each chunk synchronised. Configs: full and duo at --sparsities
(random seeded masks, sink 64, recent 256). Memory `peak` = weights + the cache
at exactly that context + XLA's temporary buffers of the compiled chunk step.
Writes bench_prefill.json, .md and .png into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
from infer.bench_decode import K, kfmt, model_configs, random_mask  # noqa: E402


def retrieval_route(backend: str) -> str:
  """Which kernel the backend's full_chunk runs: tokamax's Mosaic GPU or our Triton one."""
  if backend != "gpu":
    return backend
  from duojax.kernels.gpu import tokamax_chunk
  return "tokamax Mosaic GPU" if tokamax_chunk.available() else "Triton"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--model", default="llama3-8b")
  ap.add_argument("--contexts", default="32,64,128,256", help="in K tokens")
  ap.add_argument("--chunk", type=int, default=4096)
  ap.add_argument("--sparsities", default="0.5")
  ap.add_argument("--backend", default="auto")
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from duojax import cache as kvc
  from duojax import engine
  from duojax.attention import dispatch
  from duojax.model import llama

  backend = dispatch.resolve_backend(args.backend)
  configs = model_configs(args.smoke)
  name = "tiny-gqa" if args.smoke else args.model
  config = configs[name]
  ctxs = [256, 512] if args.smoke else [int(c) * K for c in args.contexts.split(",")]
  chunk = 64 if args.smoke else args.chunk
  dev = jax.devices()[0]
  limit = (dev.memory_stats() or {}).get("bytes_limit", 16 * 2**30)
  meta = {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__,
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "command": "python -m infer.bench_prefill " + " ".join(argv or sys.argv[1:]),
          "backend": backend, "chunk": chunk, "model": name,
          "retrieval_chunk_route": retrieval_route(backend)}
  print(f"# {meta['device']} backend {backend} ({meta['retrieval_chunk_route']}), chunk {chunk}",
        flush=True)

  params = llama.init_params(config, jax.random.PRNGKey(0), jnp.bfloat16)
  w_alloc = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  rng = np.random.default_rng(0)
  rows = []
  setups = [("full", None)] + [(f"duo-{s}", random_mask(config, float(s)))
                               for s in args.sparsities.split(",")]
  for label, mask in setups:
    fits = [c for c in ctxs if w_alloc + kvc.kv_cache_bytes(config, mask, c) + 8 * 2**30 < limit]
    for c in ctxs:
      if c not in fits:
        rows.append({"config": label, "ctx": c, "error": "does not fit"})
    if not fits:
      continue
    cap = max(fits)
    cache = kvc.init_cache(config, 1, cap, mask, jnp.bfloat16)
    i32 = jax.ShapeDtypeStruct((1,), jnp.int32)
    hid = jax.ShapeDtypeStruct((1, config.hidden_size), jnp.bfloat16)
    t0 = time.perf_counter()
    step = engine.prefill_step.lower(params, config, jax.ShapeDtypeStruct((1, chunk), jnp.int32),
                                     cache, i32, i32, hid, backend).compile()
    compile_s = time.perf_counter() - t0
    try:
      temp = step.memory_analysis().temp_size_in_bytes
    except Exception:  # noqa: BLE001
      temp = 0
    tokens = rng.integers(3, config.vocab_size, (1, cap)).astype(np.int32)
    lengths = jnp.asarray([cap], jnp.int32)
    last = jnp.zeros((1, config.hidden_size), jnp.bfloat16)
    # Warm-up: the first call loads every kernel (jax-triton JIT-compiles each distinct
    # kernel's PTX at its first launch; a duo layer split has several). It writes chunk 0,
    # which the timed pass rewrites identically; resetting the lengths makes the streaming
    # slots it filled invisible again, so the timed pass starts from an empty cache.
    n0 = jnp.clip(lengths, 0, chunk)
    last, cache, _ = step(params, jnp.asarray(tokens[:, :chunk]), cache, n0, lengths - 1, last)
    jax.block_until_ready(last)
    cache = kvc.KVCache(cache.layers, jnp.zeros((1,), jnp.int32))
    last = jnp.zeros((1, config.hidden_size), jnp.bfloat16)
    elapsed = 0.0
    marks = {}
    for c0 in range(0, cap, chunk):
      n_valid = jnp.clip(lengths - c0, 0, chunk)
      tk = jnp.asarray(tokens[:, c0:c0 + chunk])
      jax.block_until_ready(tk)
      t0 = time.perf_counter()
      last, cache, _ = step(params, tk, cache, n_valid, lengths - 1 - c0, last)
      jax.block_until_ready(last)
      elapsed += time.perf_counter() - t0
      if c0 + chunk in fits:
        marks[c0 + chunk] = elapsed
    for c in fits:
      row = {"config": label, "ctx": c, "seconds": marks[c], "tokens_per_s": c / marks[c],
             "kv_cache_GB": kvc.kv_cache_bytes(config, mask, c) / 1e9,
             "peak_GB": (w_alloc + kvc.kv_cache_bytes(config, mask, c) + temp) / 1e9,
             "xla_temp_GB": temp / 1e9, "compile_s": compile_s}
      rows.append(row)
      print(json.dumps(row), flush=True)
    del cache

  (out / "bench_prefill.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  full = {r["ctx"]: r for r in rows if r["config"] == "full" and "seconds" in r}
  lines = [f"Device {meta['device']}, {meta['date']}; {name}, batch 1, chunk {chunk}, backend "
           f"{backend} (retrieval-head chunks: {meta['retrieval_chunk_route']}); "
           f"`{meta['command']}`", "",
           "| ctx | config | prefill s | tokens/s | peak GB | speed-up vs full |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    if "seconds" not in r:
      lines.append(f"| {kfmt(r['ctx'])} | {r['config']} | {r['error']} | | | |")
      continue
    f = full.get(r["ctx"])
    sp = f"{f['seconds'] / r['seconds']:.2f}x" if f and r["config"] != "full" else "-"
    lines.append(f"| {kfmt(r['ctx'])} | {r['config']} | {r['seconds']:.2f} | "
                 f"{r['tokens_per_s']:.0f} | {r['peak_GB']:.1f} | {sp} |")
  table = "\n".join(lines) + "\n"
  (out / "bench_prefill.md").write_text(table)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for label in dict(setups):
    pts = sorted((r["ctx"], r["seconds"]) for r in rows if r["config"] == label and "seconds" in r)
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("context (tokens)")
  ax.set_ylabel("prefill seconds (batch 1)")
  ax.set_title(f"chunked prefill, {name}: {meta['device']}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "bench_prefill.png", dpi=120)
  print(table)


if __name__ == "__main__":
  main()
