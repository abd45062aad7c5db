"""Per-token decode latency and memory: full attention vs DuoAttention, against HF
transformers and the memory-bandwidth floor.

  python -m infer.bench_decode --out out/bench_decode                 # GPU, defaults below
  python -m infer.bench_decode --out /tmp/bd --smoke                  # CPU check (tiny model)

Models: the Llama-3-8B shape (GQA 32/8) and the Llama-2-7B shape (MHA 32/32),
random bf16 weights made on the device. Configs: full attention and duo at each
--sparsities (random head masks of exactly that fraction of streaming heads,
seeded; sink 64, recent 256). For each (model, batch, config) the decode loop
(`engine.decode`, a jitted while_loop, greedy sampling) is compiled once for a
cache of the largest context that fits; the cache is filled with random values
and `cache.lengths` set to each context in turn (the kernels read each row only
up to its length, so the capacity does not change the work), and --steps tokens
are decoded; per-token latency = wall time / steps, median of 3.

floor = (weight bytes read + KV bytes read) / copy bandwidth, with the copy
bandwidth measured in this run (jitted device copy, read + write bytes); weight
bytes are every parameter except the embedding table (one row of it is read),
KV bytes are the retrieval heads' keys/values up to the context plus the
streaming heads' sink + recent slots. Memory: `peak` = weights + the cache at
exactly that context + XLA's temporary buffers of the compiled step (from the
compiled executable), i.e. what a run with capacity = context holds.

HF transformers runs first, in a child process (PyTorch alone on the GPU):
LlamaForCausalLM, attn_implementation="sdpa", a StaticCache filled with random
values, one token per step, eager; timed with CUDA events, median of the steps.
In the same child, the strong peer (infer/torch_peer.py, unless --no-peer): our own
torch Llama step, sdpa with GQA over a static cache, the whole step captured in a
CUDA graph (the gpt-fast approach), batch 1 and the --batches > 1.
Writes bench_decode.json, bench_decode.md and bench_decode.png into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from duojax.config import DEPLOY

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
K = 1024
SINK, RECENT = DEPLOY.sink, DEPLOY.recent


def kfmt(n: int) -> str:
  return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def model_configs(smoke: bool):
  from duojax.config import LLAMA2_7B, LLAMA3_8B, tiny_config
  if smoke:
    return {"tiny-gqa": tiny_config(num_layers=2, head_dim=16, hidden_size=64, num_heads=8,
                                    num_kv_heads=4, max_position_embeddings=1 << 20),
            "tiny-mha": tiny_config(num_layers=2, head_dim=16, hidden_size=64, num_heads=4,
                                    num_kv_heads=4, max_position_embeddings=1 << 20)}
  return {"llama3-8b": LLAMA3_8B, "llama2-7b": LLAMA2_7B}


def random_mask(config, sparsity: float, seed: int = 0):
  """A HeadMask with exactly round((1 - sparsity) * L * Hkv) retrieval heads."""
  import numpy as np
  from duojax.pattern import HeadMask
  n = config.num_layers * config.num_kv_heads
  n_ret = int(round((1 - sparsity) * n))
  arr = np.zeros(n, bool)
  arr[np.random.default_rng(seed).permutation(n)[:n_ret]] = True
  return HeadMask.from_array(arr.reshape(config.num_layers, config.num_kv_heads), SINK, RECENT)


def weight_bytes_read(config, item=2) -> int:
  return (config.param_count() - config.vocab_size * config.hidden_size) * item


def kv_bytes_read(config, mask, ctx: int, batch: int, item=2) -> int:
  d, hkv = config.head_dim, config.num_kv_heads
  total = 0
  for l in range(config.num_layers):
    n_r = hkv if mask is None else mask.n_retrieval(l)
    total += 2 * item * batch * d * (n_r * ctx + (hkv - n_r) * min(ctx, SINK + RECENT))
  return total


# -- HF transformers (child process, torch only) -------------------------------------------

def torch_copy_GBps(nbytes=2 * 2**30):
  """(read + write bytes) / time of a device-to-device copy through torch, or None."""
  import torch
  if not torch.cuda.is_available():
    return None
  from infer import torch_peer
  return torch_peer.copy_GBps(nbytes)


def hf_worker(args):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM, StaticCache
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  copy = torch_copy_GBps() if dev == "cuda" else None
  print(f"[hf] torch device copy: {copy} GB/s", flush=True)
  rows = []
  for name, config in model_configs(args.smoke).items():
    if name not in args.models.split(",") and not args.smoke:
      continue
    hf = dict(config.to_hf())
    hf.pop("architectures", None)
    hcfg = LlamaConfig(**hf)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
      try:
        model = LlamaForCausalLM._from_config(hcfg, attn_implementation="sdpa",
                                              dtype=torch.bfloat16)
      except TypeError:
        model = LlamaForCausalLM._from_config(hcfg, attn_implementation="sdpa",
                                              torch_dtype=torch.bfloat16)
    model.eval()
    print(f"[hf] {name}: built in {time.perf_counter() - t0:.1f}s", flush=True)
    ctxs = contexts(args)
    if config.num_kv_heads == config.num_heads and not args.smoke:
      ctxs = [int(c) * K for c in args.hf_contexts_mha.split(",")]
    for ctx in ctxs:
      row = {"model": name, "impl": "hf-sdpa-static", "batch": 1, "ctx": ctx}
      cache = None
      try:
        if dev == "cuda":
          torch.cuda.empty_cache()
          torch.cuda.reset_peak_memory_stats()
        cache = StaticCache(config=model.config, max_cache_len=ctx + args.steps + 2)
        tok = torch.tensor([[5]], device=dev)
        with torch.no_grad():
          model(input_ids=tok, past_key_values=cache,
                cache_position=torch.tensor([0], device=dev), use_cache=True)
          for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
          times = []
          for i in range(args.steps + 2):
            if dev == "cuda":
              a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
              a.record()
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache,
                        cache_position=torch.tensor([ctx + i], device=dev), use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            if dev == "cuda":
              b.record()
              torch.cuda.synchronize()
              dt = a.elapsed_time(b) / 1e3
            else:
              dt = time.perf_counter() - t0
            if i >= 2:
              times.append(dt)
        row["ms_per_token"] = statistics.median(times) * 1e3
        if dev == "cuda":
          row["peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
      except torch.cuda.OutOfMemoryError as e:  # type: ignore[attr-defined]
        row["error"] = "OOM: " + str(e).split("\n")[0][:160]
      del cache
      print("[hf]", json.dumps(row), flush=True)
      rows.append(row)
    del model
    if dev == "cuda":
      torch.cuda.empty_cache()
  peer_rows = []
  if args.peer:  # the gpt-fast-style peer: sdpa over a static cache, the step in a CUDA graph
    from infer import torch_peer
    for name, config in model_configs(args.smoke).items():
      if name not in args.models.split(",") and not args.smoke:
        continue
      ctxs = contexts(args)
      if config.num_kv_heads == config.num_heads and not args.smoke:
        ctxs = [int(c) * K for c in args.hf_contexts_mha.split(",")]
      batches_ = [1] + [b for b in map(int, args.batches.split(",")) if b > 1]
      for b in batches_:
        cs = ctxs if b == 1 else [c for c in ctxs if c <= args.max_batch_ctx * K or args.smoke]
        peer_rows += torch_peer.measure(name, peer_config(config), [b], cs, 8, copy,
                                        dev == "cuda")
  Path(args.hf_json).write_text(json.dumps({"rows": rows, "peer": peer_rows,
                                            "torch_copy_GBps": copy}))


def peer_config(config) -> dict:
  return {"num_layers": config.num_layers, "num_heads": config.num_heads,
          "num_kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
          "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
          "vocab_size": config.vocab_size, "rms_eps": config.rms_norm_eps,
          "rope_theta": config.rope_theta}


# -- JAX -----------------------------------------------------------------------------------

def contexts(args):
  if args.smoke:
    return [64, 200]
  return [int(c) * K for c in args.contexts.split(",")]


def copy_bandwidth(nbytes):
  import jax
  import jax.numpy as jnp
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda x: x.copy())
  jax.block_until_ready(f(x))
  ts = []
  for _ in range(10):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    ts.append(time.perf_counter() - t0)
  del x
  return 2 * nbytes / statistics.median(ts) / 1e9


def kv_item(config, kv_dtype) -> float:
  """Bytes read per cached k or v element: 2 for bf16; int8 / int4 codes plus their float32
  scale and zero per token per KV head (duojax.kv_quant)."""
  from duojax import kv_quant
  bits = kv_quant.bits_of(kv_dtype)
  if bits is None:
    return 4 if kv_dtype == "fp32" else 2
  return kv_quant.nbytes((1, config.head_dim), bits) / config.head_dim


def random_cache(config, batch, capacity, mask, seed=0, kv_dtype=None):
  import jax
  import jax.numpy as jnp
  from duojax import cache as kvc
  shapes = jax.eval_shape(lambda: kvc.init_cache(config, batch, capacity, mask, jnp.bfloat16,
                                                 kv_dtype=kv_dtype))
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  gen = {}
  out = []
  for i, s in enumerate(leaves):
    if s.dtype == jnp.int32:
      out.append(jnp.zeros(s.shape, jnp.int32))
      continue
    if (s.shape, s.dtype) not in gen:
      if jnp.issubdtype(s.dtype, jnp.integer):  # quantised codes: random bytes
        f = lambda k, shape=s.shape, dt=s.dtype: jax.random.bits(k, shape, jnp.uint8).astype(dt)
      else:  # values, or a quantised cache's scales and zeros
        f = lambda k, shape=s.shape, dt=s.dtype: jax.random.normal(k, shape, dt)
      gen[s.shape, s.dtype] = jax.jit(f)
    out.append(gen[s.shape, s.dtype](jax.random.PRNGKey(seed * 1000 + i)))
  return jax.tree_util.tree_unflatten(tree, out)


def run_jax(args, copy_GBps):
  import jax
  import jax.numpy as jnp
  from duojax import cache as kvc
  from duojax import engine
  from duojax.model import llama

  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  limit = stats.get("bytes_limit", 16 * 2**30)
  backend = args.backend
  rows = []
  for name, config in model_configs(args.smoke).items():
    if name not in args.models.split(",") and not args.smoke:
      continue
    t0 = time.perf_counter()
    params = llama.init_params(config, jax.random.PRNGKey(0), jnp.bfloat16)
    jax.block_until_ready(params)
    w_alloc = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    print(f"[jax] {name}: params {w_alloc / 1e9:.1f} GB in {time.perf_counter() - t0:.1f}s",
          flush=True)
    # Random weights: the head reordering DuoAttention applies to real weights
    # (llama.apply_head_mask) permutes random values into random values, so it is skipped.
    sps = sparsities(args, name)
    setups = [(1, None, "full")] + [(1, random_mask(config, float(s)), f"duo-{s}") for s in sps]
    if args.unfused:  # the same masks through the two decode ops + concatenation
      setups += [(1, random_mask(config, float(sps[0])), f"duo-{sps[0]}-unfused")]
    for b in batches(args):
      if b > 1 and (name in args.multi_batch_models.split(",") or args.smoke):
        setups += [(b, None, "full"), (b, random_mask(config, float(sps[0])), f"duo-{sps[0]}")]
    for batch, mask, label in setups:
      backend = unfused_backend(args.backend) if label.endswith("-unfused") else args.backend
      ctxs = [c for c in contexts(args) if batch == 1 or c <= args.max_batch_ctx * K
              or args.smoke]
      kvd = args.kv_dtype
      fits = [c for c in ctxs if w_alloc + kvc.kv_cache_bytes(config, mask, c + args.steps + 16,
                                                              batch, kv_dtype=kvd) + 4 * 2**30
              < limit]
      for c in ctxs:
        if c not in fits:
          need = (w_alloc + kvc.kv_cache_bytes(config, mask, c, batch, kv_dtype=kvd)) / 1e9
          rows.append({"model": name, "impl": f"duojax-{backend}", "config": label,
                       "batch": batch, "ctx": c, "error": f"does not fit: needs {need:.0f} GB"})
          print("[jax]", json.dumps(rows[-1]), flush=True)
      if not fits:
        continue
      capacity = max(fits) + args.steps + 16
      cache = random_cache(config, batch, capacity, mask, kv_dtype=kvd)
      hidden = jax.random.normal(jax.random.PRNGKey(7), (batch, config.hidden_size),
                                 jnp.bfloat16)
      key = jax.random.PRNGKey(0)
      t0 = time.perf_counter()
      compiled = engine.decode.lower(params, config, cache, hidden, key, args.steps,
                                     engine.SamplingSettings(), (), backend).compile()
      compile_s = time.perf_counter() - t0
      try:
        temp = compiled.memory_analysis().temp_size_in_bytes
      except Exception:  # noqa: BLE001 - not every backend reports it
        temp = 0
      for ctx in fits:
        ts = []
        for rep in range(4):
          cache = kvc.KVCache(cache.layers, jnp.full((batch,), ctx, jnp.int32))
          jax.block_until_ready(cache)
          t0 = time.perf_counter()
          out, steps, cache = compiled(params, cache, hidden, key)
          jax.block_until_ready(out)
          if rep:  # the first call warms up
            ts.append((time.perf_counter() - t0) / int(steps))
        ms = statistics.median(ts) * 1e3
        wb = weight_bytes_read(config)
        kb = kv_bytes_read(config, mask, ctx, batch, kv_item(config, kvd))
        floor = (wb + kb) / (copy_GBps * 1e9) * 1e3
        row = {"model": name, "impl": f"duojax-{backend}", "config": label, "batch": batch,
               "ctx": ctx, "ms_per_token": ms, "tokens_per_s": batch / ms * 1e3,
               "floor_ms": floor, "x_floor": ms / floor, "weight_bytes": wb, "kv_bytes_read": kb,
               "kv_dtype": kvd,
               "kv_cache_GB": kvc.kv_cache_bytes(config, mask, ctx, batch, kv_dtype=kvd) / 1e9,
               "peak_GB": (w_alloc + kvc.kv_cache_bytes(config, mask, ctx, batch, kv_dtype=kvd)
                           + temp) / 1e9,
               "xla_temp_GB": temp / 1e9, "compile_s": compile_s, "capacity": capacity}
        rows.append(row)
        print("[jax]", json.dumps(row), flush=True)
        if args.partial:
          Path(args.partial).write_text(json.dumps(rows))
      del cache, compiled
    del params
  return rows


def unfused_backend(name: str) -> str:
  """A copy of the backend without its fused `duo_decode` op (dispatch then runs the
  retrieval and streaming decode ops separately), registered as NAME-unfused."""
  from duojax.attention import dispatch
  name = dispatch.resolve_backend(name)
  ops = {k: v for k, v in dispatch.backend_ops(name).items() if k != "duo_decode"}
  dispatch.register_backend(f"{name}-unfused", ops)
  return f"{name}-unfused"


def batches(args):
  return [int(b) for b in args.batches.split(",")]


def sparsities(args, model):
  """--sparsities "0.5,0.75" for every model, or "llama3-8b:0.5,0.75;llama2-7b:0.75"."""
  spec = args.sparsities
  if ":" not in spec:
    return spec.split(",")
  table = dict(part.split(":") for part in spec.split(";"))
  return table.get(model, next(iter(table.values()))).split(",")


# -- report ----------------------------------------------------------------------------------

def summarize(rows, hf_rows, meta):
  lines = [f"Device {meta['device']}, {meta['date']}; copy {meta['copy_GBps']:.0f} GB/s "
           f"(read + write); `{meta['command']}`", "",
           "| model | B | ctx | config | ms/token | floor ms | x floor | peak GB | HF ms/token "
           "| HF / ours | peer ms/token | peer / ours |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  hf = {(r["model"], r["batch"], r["ctx"]): r for r in hf_rows
        if r.get("impl", "").startswith("hf")}
  peer = {(r["model"], r["batch"], r["ctx"]): r for r in hf_rows
          if r.get("impl", "").startswith("torch")}

  def other(table, r):
    h = table.get((r["model"], r["batch"], r["ctx"]))
    hs = "-" if h is None else (f"{h['ms_per_token']:.2f}" if "ms_per_token" in h else "OOM")
    ratio = (f"{h['ms_per_token'] / r['ms_per_token']:.2f}x"
             if h and "ms_per_token" in h and "ms_per_token" in r else "-")
    return hs, ratio

  for r in rows:
    (hs, hr), (ps, pr) = other(hf, r), other(peer, r)
    if "ms_per_token" not in r:
      lines.append(f"| {r['model']} | {r['batch']} | {kfmt(r['ctx'])} | {r['config']} | "
                   f"{r.get('error', '-')} | | | | {hs} | | {ps} | |")
      continue
    lines.append(f"| {r['model']} | {r['batch']} | {kfmt(r['ctx'])} | {r['config']} | "
                 f"{r['ms_per_token']:.2f} | {r['floor_ms']:.2f} | {r['x_floor']:.2f} | "
                 f"{r['peak_GB']:.1f} | {hs} | {hr} | {ps} | {pr} |")
  # duo / full speed-ups at equal (model, batch, ctx)
  full = {(r["model"], r["batch"], r["ctx"]): r for r in rows
          if r.get("config") == "full" and "ms_per_token" in r}
  sp = []
  for r in rows:
    f = full.get((r["model"], r["batch"], r["ctx"]))
    if r.get("config", "").startswith("duo") and f and "ms_per_token" in r:
      sp.append(f"{r['model']} B={r['batch']} {kfmt(r['ctx'])} {r['config']}: "
                f"{f['ms_per_token'] / r['ms_per_token']:.2f}x faster than full")
  if sp:
    lines += ["", "Speed-up over own full attention:", ""] + [f"- {s}" for s in sp]
  return "\n".join(lines) + "\n"


def plot(rows, hf_rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = sorted({r["model"] for r in rows})
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
  for ax, m in zip(axes[0], models):
    groups = {}
    for r in rows:
      if r["model"] == m and r["batch"] == 1 and "ms_per_token" in r:
        groups.setdefault(r["config"], []).append((r["ctx"], r["ms_per_token"], r["floor_ms"]))
    for cfg, pts in sorted(groups.items()):
      pts.sort()
      line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"duojax {cfg}")
      ax.plot([p[0] for p in pts], [p[2] for p in pts], ":", color=line.get_color(),
              label=f"floor {cfg}")
    for impl, style, label in (("hf", "s--", "HF sdpa (eager)"),
                               ("torch", "^--", "torch sdpa + CUDA graph")):
      hp = sorted((r["ctx"], r["ms_per_token"]) for r in hf_rows
                  if r["model"] == m and r.get("batch", 1) == 1 and "ms_per_token" in r
                  and r.get("impl", "").startswith(impl))
      if hp:
        ax.plot([p[0] for p in hp], [p[1] for p in hp], style, color="gray", label=label,
                alpha=1.0 if impl == "torch" else 0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("ms / token (batch 1)")
    ax.set_title(m)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def rerender(args, out):
  """Re-renders a saved run's table and plot, optionally against another copy bandwidth
  (--copy-GBps, e.g. torch's copy measured on the same machine by bench_kernels)."""
  d = json.loads(Path(args.report_from).read_text())
  meta, rows, hf_rows = d["meta"], d["rows"], d.get("hf", [])
  if args.copy_GBps:
    meta["copy_GBps_measured_in_run"] = meta["copy_GBps"]
    meta["copy_GBps"] = args.copy_GBps
    for r in rows:
      if "ms_per_token" in r:
        r["floor_ms"] = (r["weight_bytes"] + r["kv_bytes_read"]) / (args.copy_GBps * 1e9) * 1e3
        r["x_floor"] = r["ms_per_token"] / r["floor_ms"]
  (out / "bench_decode.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                     "hf": hf_rows}, indent=1))
  table = summarize(rows, hf_rows, meta)
  (out / "bench_decode.md").write_text(table)
  plot(rows, hf_rows, out / "bench_decode.png")
  print(table)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--models", default="llama3-8b,llama2-7b")
  ap.add_argument("--contexts", default="8,32,128,256,512", help="in K tokens")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--max-batch-ctx", type=int, default=32, help="K tokens, for batch > 1")
  ap.add_argument("--sparsities", default="llama3-8b:0.5,0.75;llama2-7b:0.75",
                  help='"0.5,0.75" for all models, or per model "m1:0.5,0.75;m2:0.75"')
  ap.add_argument("--multi-batch-models", default="llama3-8b",
                  help="models also run at the batch sizes > 1 of --batches (full and the "
                       "first sparsity, contexts <= --max-batch-ctx)")
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--backend", default="auto")
  ap.add_argument("--kv-dtype", default="bf16", choices=("bf16", "int8", "int4"),
                  help="duojax's KV cache: bf16, or int8 / int4 codes + float32 scale and zero "
                       "per token per KV head (the floor counts those bytes)")
  ap.add_argument("--unfused", action="store_true",
                  help="also time duo without the fused duo_decode op (batch 1)")
  ap.add_argument("--no-hf", action="store_true", help="skip the PyTorch child (HF and peer)")
  ap.add_argument("--no-peer", dest="peer", action="store_false",
                  help="skip the CUDA-graph PyTorch peer (infer/torch_peer.py) in the child")
  ap.add_argument("--hf-models", default="llama3-8b,llama2-7b")
  ap.add_argument("--hf-contexts", default="8,32,128,256")
  ap.add_argument("--hf-contexts-mha", default="8,32,64",
                  help="HF contexts for the MHA model (its cache is 4x larger)")
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--report-from", help="re-render a saved bench_decode.json (no benchmark)")
  ap.add_argument("--copy-GBps", type=float, help="with --report-from: floor bandwidth")
  ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--hf-json", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.hf_worker:
    return hf_worker(args)

  if args.report_from:
    return rerender(args, out)
  hf_rows = []
  torch_copy = None
  if args.no_hf and not args.smoke:
    try:
      torch_copy = torch_copy_GBps()
    except Exception as e:  # noqa: BLE001 - torch is optional
      print("torch copy unavailable:", repr(e)[:200])
  if not args.no_hf:
    hf_json = out / "hf_rows.json"
    # the child runs from this process's folder, where `-m infer...` found this module
    cmd = [sys.executable, "-m", "infer.bench_decode", "--hf-worker", "--out", str(out),
           "--hf-json", str(hf_json),
           "--models", args.hf_models, "--contexts", args.hf_contexts, "--steps", "8",
           "--hf-contexts-mha", args.hf_contexts_mha, "--batches", args.batches,
           "--max-batch-ctx", str(args.max_batch_ctx)] + (["--no-peer"] if not args.peer else [])
    if args.smoke:
      cmd.append("--smoke")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=dict(os.environ))
    print(f"[hf] done in {time.perf_counter() - t0:.0f}s (rc {r.returncode})", flush=True)
    if hf_json.exists():
      hf = json.loads(hf_json.read_text())
      hf_rows, torch_copy = hf["rows"] + hf.get("peer", []), hf.get("torch_copy_GBps")

  import jax
  from duojax.attention import dispatch
  args.backend = dispatch.resolve_backend(args.backend)
  dev = jax.devices()[0]
  jax_copy = copy_bandwidth(2 * 2**30 if jax.default_backend() == "gpu" else 2**24)
  # The ceiling is the faster of the two copies (torch's clone is a plain cudaMemcpy;
  # XLA's copy of a jitted x.copy() measured ~20% slower on an H100).
  copy = max(jax_copy, torch_copy or 0.0)
  meta = {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__,
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "command": "python -m infer.bench_decode " + " ".join(argv or sys.argv[1:]),
          "copy_GBps": copy, "jax_copy_GBps": jax_copy, "torch_copy_GBps": torch_copy,
          "backend": args.backend, "steps": args.steps, "kv_dtype": args.kv_dtype}
  print(f"# {meta['device']} copy {copy:.0f} GB/s, backend {args.backend}", flush=True)
  args.partial = str(out / "bench_decode_partial.json")
  rows = run_jax(args, copy)
  (out / "bench_decode.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                     "hf": hf_rows}, indent=1))
  table = summarize(rows, hf_rows, meta)
  (out / "bench_decode.md").write_text(table)
  plot(rows, hf_rows, out / "bench_decode.png")
  print(table)


if __name__ == "__main__":
  main()
