"""Chunked prefill time and memory: full attention vs DuoAttention.

  python -m infer.bench_prefill --out out/bench_prefill                # GPU
  python -m infer.bench_prefill --out OUT --contexts 1M --kv-dtype int4 --weights-dtype int8
  python -m infer.bench_prefill --out /tmp/bp --smoke                  # CPU check (tiny model)
  python -m infer.bench_prefill --out OUT --contexts 256K,1M --mesh sequence=2   # 2 GPUs

The Llama-3-8B shape (or --model llama2-7b) with random bf16 weights made on
the device, batch 1, random prompt tokens, chunks of --chunk tokens through
`engine.prefill_step` (compiled once per config for a cache of the longest
context). One pass over the longest context; the prefill time of a shorter
context is the cumulative time at its last chunk (the chunks before it are the
same work), each chunk synchronised. Configs: full and duo at --sparsities
(random seeded masks, sink 64, recent 256). Memory `peak` = weights + the cache
at exactly that context + XLA's temporary buffers of the compiled chunk step.
--kv-dtype / --weights-dtype quantise the cache / the projections as on bench_decode.

Nothing O(T) but the cache: the chunk step is also compiled for a cache of --probe-chunks
chunks, and the table gives XLA's temporaries at both capacities. A step whose temporaries
grow with the capacity holds something the size of the context besides the cache (the XLA
reference does: it scores a chunk against the whole cache; the GPU kernels walk it in
blocks), which is what decides whether prefill reaches millions of tokens.
--mesh SPEC (e.g. sequence=2, tensor=2, sequence=2,tensor=2) runs the same pass on a device
mesh: weights and cache placed as serving places them (`engine.place_on_mesh`; the cache
made straight into its shards), the chunk step compiled by `engine.mesh_prefill_step`
(context parallel where the cache splits over sequence). Memory is then per device: the
bytes its shards of the weights and the cache hold, plus that device's XLA temporaries
(the random weights are made on the first device and copied onto the mesh, so that device
also keeps one whole copy beside its shards, which the figure leaves out).
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
from infer.bench_decode import (  # noqa: E402
    build_mesh, build_params, kfmt, model_configs, parse_contexts, random_mask, weights_alloc)


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
  ap.add_argument("--contexts", default="32,64,128,256",
                  help="K tokens, or with a suffix: 256K, 1M, 2.5M")
  ap.add_argument("--chunk", type=int, default=4096)
  ap.add_argument("--sparsities", default="0.5")
  ap.add_argument("--configs", default="full,duo", help="full, duo (at each --sparsities)")
  ap.add_argument("--kv-dtype", default="bf16", choices=("bf16", "int8", "int4", "k8v4"))
  ap.add_argument("--weights-dtype", default="bf16", choices=("bf16", "int8"))
  ap.add_argument("--probe-chunks", type=int, default=4,
                  help="also compile for a cache of this many chunks: XLA's temporaries there "
                       "against those at the longest context (0: skip)")
  ap.add_argument("--backend", default="auto")
  ap.add_argument("--mesh", default=None,
                  help="run on a device mesh, e.g. sequence=2 or tensor=2 (default: one "
                       "device, the plain path)")
  ap.add_argument("--f16-codes", action="store_true",
                  help="quantised KV: the chunk kernels read fp16 codes (decode.py's "
                       "`_scan_codes` products; off by default: measured slower, see "
                       "prefill.FULL_CHUNK_CONFIG), to time one against the other")
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
  from duojax.model import handle as model_handle

  backend = dispatch.resolve_backend(args.backend)
  if args.f16_codes and backend == "gpu":  # read when a launch is planned
    from duojax.kernels.gpu import prefill as kp
    kp.FULL_CHUNK_CONFIG["f16_codes"] = kp.STREAM_CHUNK_CONFIG["f16_codes"] = True
  configs = model_configs(args.smoke)
  name = "tiny-gqa" if args.smoke else args.model
  config = configs[name]
  ctxs = [256, 512] if args.smoke else parse_contexts(args.contexts)
  kv_dtype = None if args.kv_dtype == "bf16" else args.kv_dtype
  chunk = 64 if args.smoke else args.chunk
  dev = jax.devices()[0]
  limit = (dev.memory_stats() or {}).get("bytes_limit", 16 * 2**30)
  mesh = build_mesh(args.mesh) if args.mesh else None
  n_dev = 1 if mesh is None else mesh.size
  meta = {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__,
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "command": "python -m infer.bench_prefill " + " ".join(argv or sys.argv[1:]),
          "backend": backend, "chunk": chunk, "model": name, "kv_dtype": args.kv_dtype,
          "weights_dtype": args.weights_dtype, "f16_codes": args.f16_codes,
          "packed_weights": True,  # build_params packs q/k/v and gate/up, as serving does
          "retrieval_chunk_route": retrieval_route(backend),
          "mesh": args.mesh, "device_count": n_dev}
  print(f"# {meta['device']} backend {backend} ({meta['retrieval_chunk_route']}), chunk {chunk}"
        f", KV {args.kv_dtype}, weights {args.weights_dtype}"
        + (f", mesh {args.mesh}" if mesh else ""), flush=True)

  params = build_params(config, args.weights_dtype)
  w_alloc = weights_alloc(params)
  rng = np.random.default_rng(0)
  rows = []
  wanted = set(args.configs.split(","))
  if not wanted <= {"full", "duo"}:
    raise SystemExit(f"--configs takes full and duo, got {args.configs!r}")
  setups = ([("full", None)] if "full" in wanted else []) + (
      [(f"duo-{s}", random_mask(config, float(s))) for s in args.sparsities.split(",")]
      if "duo" in wanted else [])
  i32 = jax.ShapeDtypeStruct((1,), jnp.int32)
  hid = jax.ShapeDtypeStruct((1, config.hidden_size), jnp.bfloat16)
  tok = jax.ShapeDtypeStruct((1, chunk), jnp.int32)

  def cache_of(mask, capacity):
    return kvc.init_cache(config, 1, capacity, mask, jnp.bfloat16, kv_dtype=kv_dtype)

  def temp_of(compiled) -> int:
    try:
      return compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # noqa: BLE001  (a backend without memory analysis)
      return 0

  def compiled_temp(h, cache):
    """(step(h, tokens, cache, n_valid, last_idx, last_hidden), XLA temporaries)."""
    if mesh is None:
      step = engine.prefill_step.lower(h, config, tok, cache, i32, i32, hid, backend).compile()
      return step, temp_of(step)
    pl = engine.mesh_placement(mesh, h, cache, config)
    step = engine.mesh_prefill_step(mesh, pl, h, config, cache, chunk, backend)
    return step, temp_of(step.compiled)

  def placed(h, mask, capacity):
    """(handle, cache, placement) on the mesh, the cache made in its shards; one device:
    as they are."""
    if mesh is None:
      return h, cache_of(mask, capacity), None
    abstract = jax.eval_shape(lambda: cache_of(mask, capacity))
    pl = engine.mesh_placement(mesh, h, abstract, config)
    cache = jax.jit(lambda: cache_of(mask, capacity), out_shardings=pl.cache)()
    return jax.device_put(h, pl.model), cache, pl

  def per_device_bytes(tree) -> int:
    """The largest bytes any one device holds of these arrays' shards."""
    held: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
      for sh in leaf.addressable_shards:
        held[sh.device] = held.get(sh.device, 0) + sh.data.nbytes
    return max(held.values())

  for label, mask in setups:
    kv_bytes = lambda c: kvc.kv_cache_bytes(config, mask, c, kv_dtype=kv_dtype)  # noqa: E731
    # on a mesh the first device also keeps the whole random weights (made there)
    dev0 = 0 if mesh is None else w_alloc
    fits = [c for c in ctxs if dev0 + (w_alloc + kv_bytes(c)) / n_dev + 8 * 2**30 < limit]
    if mesh is not None:  # the cache's slots split evenly over the sequence axis
      from duojax import sharding
      mult = sharding.capacity_multiple(mesh)
      bad = [c for c in fits if c % mult]
      if bad:
        raise SystemExit(f"--mesh {args.mesh}: contexts {bad} are not multiples of {mult}")
    for c in ctxs:
      if c not in fits:
        rows.append({"config": label, "ctx": c, "error": "does not fit"})
    if not fits:
      continue
    cap = max(fits)
    # Random weights: the head reordering DuoAttention applies to real weights permutes
    # random values into random values, so it is skipped (as in bench_decode).
    h = model_handle.from_params(config, params, mask, reordered=True)
    probe = args.probe_chunks * chunk
    probe_temp = None
    if 0 < probe < cap:  # compiled for a small cache first, then dropped
      hp, small, _ = placed(h, mask, probe)
      probe_temp = compiled_temp(hp, small)[1]
      del small, hp
    h, cache, pl = placed(h, mask, cap)
    t0 = time.perf_counter()
    step, temp = compiled_temp(h, cache)
    if mesh is not None:  # the most loaded device's weights and cache at the capacity
      dev_w, dev_kv = per_device_bytes(h.state), per_device_bytes(cache)
    compile_s = time.perf_counter() - t0
    # said before the pass, so a run cut off by a time limit still reports them
    print(f"# {label}: XLA temporaries {temp / 1e9:.3g} GB at {kfmt(cap)} tokens"
          + ("" if probe_temp is None else f", {probe_temp / 1e9:.3g} GB at {kfmt(probe)}"),
          file=sys.stderr, flush=True)
    tokens = rng.integers(3, config.vocab_size, (1, cap)).astype(np.int32)
    lengths = jnp.asarray([cap], jnp.int32)
    last = jnp.zeros((1, config.hidden_size), jnp.bfloat16)
    # Warm-up: the first call loads every kernel (jax-triton JIT-compiles each distinct
    # kernel's PTX at its first launch; a duo layer split has several). It writes chunk 0,
    # which the timed pass rewrites identically; resetting the lengths makes the streaming
    # slots it filled invisible again, so the timed pass starts from an empty cache.
    n0 = jnp.clip(lengths, 0, chunk)
    last, cache, _ = step(h, jnp.asarray(tokens[:, :chunk]), cache, n0, lengths - 1, last)
    jax.block_until_ready(last)
    zero = jnp.zeros((1,), jnp.int32)
    zero = zero if pl is None else jax.device_put(zero, pl.cache.lengths)
    cache = kvc.KVCache(cache.layers, zero)
    last = jnp.zeros((1, config.hidden_size), jnp.bfloat16)
    elapsed = 0.0
    marks = {}
    for c0 in range(0, cap, chunk):
      n_valid = jnp.clip(lengths - c0, 0, chunk)
      tk = jnp.asarray(tokens[:, c0:c0 + chunk])
      jax.block_until_ready(tk)
      t0 = time.perf_counter()
      last, cache, _ = step(h, tk, cache, n_valid, lengths - 1 - c0, last)
      jax.block_until_ready(last)
      elapsed += time.perf_counter() - t0
      if c0 + chunk in fits:
        marks[c0 + chunk] = elapsed
      if (c0 // chunk + 1) % 32 == 0 or c0 + chunk in fits:
        # a long pass (1M tokens: minutes) says how far it got, so a run cut off by a time
        # limit still tells its rate
        print(f"# {label}: {kfmt(c0 + chunk)} tokens prefilled in {elapsed:.1f} s",
              file=sys.stderr, flush=True)
    for c in fits:
      row = {"config": label, "ctx": c, "seconds": marks[c], "tokens_per_s": c / marks[c],
             "kv_cache_GB": kv_bytes(c) / 1e9, "peak_GB": (w_alloc + kv_bytes(c) + temp) / 1e9,
             "xla_temp_GB": temp / 1e9, "capacity": cap, "compile_s": compile_s,
             "probe_capacity": probe if probe_temp is not None else None,
             "xla_temp_probe_GB": None if probe_temp is None else probe_temp / 1e9}
      if mesh is not None:  # per device: its shards (the cache's scaled to this context:
        # each device holds the same share of every context), its temporaries
        row["peak_GB"] = (dev_w + dev_kv * kv_bytes(c) / kv_bytes(cap) + temp) / 1e9
        row["per_device"] = True
      rows.append(row)
      print(json.dumps(row), flush=True)
    del cache

  (out / "bench_prefill.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  full = {r["ctx"]: r for r in rows if r["config"] == "full" and "seconds" in r}
  lines = [f"Device {meta['device']}, {meta['date']}; {name}, batch 1, chunk {chunk}, backend "
           f"{backend} (retrieval-head chunks: {meta['retrieval_chunk_route']}), KV "
           f"{args.kv_dtype}, weights {args.weights_dtype}"
           + (f", mesh {args.mesh} ({n_dev} devices; peak GB per device)" if mesh else "")
           + f"; `{meta['command']}`", "",
           "| ctx | config | prefill s | tokens/s | KV GB | peak GB | XLA temp GB: at the "
           "capacity / at the probe | speed-up vs full |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "seconds" not in r:
      lines.append(f"| {kfmt(r['ctx'])} | {r['config']} | {r['error']} | | | | | |")
      continue
    f = full.get(r["ctx"])
    sp = f"{f['seconds'] / r['seconds']:.2f}x" if f and r["config"] != "full" else "-"
    tp = (f"{r['xla_temp_GB']:.3g} ({kfmt(r['capacity'])}) / {r['xla_temp_probe_GB']:.3g} "
          f"({kfmt(r['probe_capacity'])})" if r["xla_temp_probe_GB"] is not None
          else f"{r['xla_temp_GB']:.3g}")
    lines.append(f"| {kfmt(r['ctx'])} | {r['config']} | {r['seconds']:.2f} | "
                 f"{r['tokens_per_s']:.0f} | {r['kv_cache_GB']:.3g} | {r['peak_GB']:.3g} | "
                 f"{tp} | {sp} |")
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
