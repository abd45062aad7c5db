"""Each attention kernel alone: time, GB/s (decode) or TFLOP/s (prefill), against a
device copy measured in the same run.

  python -m infer.bench_kernels --out out/bench_kernels            # GPU: the full set
  python -m infer.bench_kernels --out /tmp/bk --smoke              # CPU: tiny, xla only

Timing. An op is jitted as a chain of n dependent calls (each call's output is
the next call's query, so nothing can be hoisted or overlapped), cycling over
enough key/value buffers that the working set is >= 4x the L2 cache; the time per
call is the slope (t(n2) - t(n1)) / (n2 - n1) of wall-clock medians, which
removes the fixed dispatch cost. Decode bytes = the keys and values that must be
read (rows' lengths x heads x D x 2 tensors x 2 bytes) plus q and out.
Copy bandwidth = (bytes read + bytes written) / time of a 2 GiB device-to-device
copy (jitted `x.copy()`, and torch's `clone` when torch sees the GPU).
With --variants the split-K decode kernel's tuning grid and the [B, H, S, D]
cache layout are timed too (raw Triton launches through torch, CUDA graphs).
Writes bench_kernels.json and bench_kernels.png into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from duojax import cache as kvc  # noqa: E402
from duojax.attention import reference  # noqa: E402

L2_BYTES = 50 * 2**20
K = 1024


def kfmt(n: int) -> str:
  return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def wall(fn, *args, reps=5):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def chain_time(op, q, bufsets, n1=4, n2=24, reps=9):
  """Seconds per call of op(q, *bufset) -> q-shaped output, by the slope method."""
  def make(n):
    @jax.jit
    def f(q, sets):
      for i in range(n):
        q = op(q, *sets[i % len(sets)]).astype(q.dtype)
      return q
    return f
  t1 = wall(make(n1), q, bufsets, reps=reps)
  t2 = wall(make(n2), q, bufsets, reps=reps)
  return max((t2 - t1) / (n2 - n1), 1e-9)


def n_sets(nbytes):
  return int(max(1, min(16, np.ceil(4 * L2_BYTES / max(nbytes, 1)))))


def copy_bandwidth(nbytes=2 * 2**30):
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda x: x.copy())
  out = {"jax_copy_GBps": 2 * nbytes / wall(f, x, reps=10) / 1e9}
  del x
  try:
    import torch
    if torch.cuda.is_available():
      t = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
      for _ in range(3):
        t.clone()
      torch.cuda.synchronize()
      ts = []
      for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); u = t.clone(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
        del u
      out["torch_copy_GBps"] = 2 * nbytes / statistics.median(ts) / 1e9
      del t
      torch.cuda.empty_cache()
  except Exception as e:  # noqa: BLE001 - torch is optional here
    out["torch_error"] = repr(e)[:200]
  out["copy_GBps"] = out.get("torch_copy_GBps", out["jax_copy_GBps"])
  return out


def rand(key, shape, dtype=jnp.bfloat16):
  return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32).astype(dtype)


# -- decode -----------------------------------------------------------------------------

def time_decode_ops(row, ops, call, q, sets, copy):
  """Chain-times each op (call(op) -> fn(q, *bufset)) into row: us, GB/s of row["bytes"],
  fraction of the copy bandwidth, or the error (e.g. the XLA reference out of memory)."""
  for name, op in ops.items():
    try:
      s = chain_time(call(op), q, sets)
      row[f"{name}_us"] = s * 1e6
      row[f"{name}_GBps"] = row["bytes"] / s / 1e9
      row[f"{name}_frac_copy"] = row[f"{name}_GBps"] / copy
    except Exception as e:  # noqa: BLE001
      row[f"{name}_error"] = repr(e)[:300]
  return row


def bench_full_decode(ops, b, h, g, d, ctx, copy):
  kv_bytes = 2 * b * ctx * h * d * 2
  sets = [(rand(2 * i + 1, (b, ctx, h, d)), rand(2 * i + 2, (b, ctx, h, d)))
          for i in range(n_sets(kv_bytes))]
  q = rand(0, (b, 1, h, g, d))
  lens = jnp.full((b,), ctx, jnp.int32)
  qpos = (lens - 1)[:, None]
  row = {"kernel": "full_decode", "B": b, "H": h, "G": g, "D": d, "ctx": ctx,
         "bytes": kv_bytes + 2 * q.size * 2}
  time_decode_ops(row, ops, lambda op: lambda q, k, v: op(q, k, v, qpos, lens), q, sets, copy)
  del sets
  return row


def bench_stream_decode(ops, b, h, g, d, sink, recent, copy):
  w = sink + recent
  nbytes = 2 * b * w * h * d * 2
  sets = []
  for i in range(n_sets(nbytes)):
    sets.append((rand(4 * i + 1, (b, w, h, d)), rand(4 * i + 2, (b, w, h, d)),
                 rand(4 * i + 3, (b, 1, h, d)), rand(4 * i + 4, (b, 1, h, d))))
  q = rand(0, (b, 1, h, g, d))
  start = jnp.full((b,), 100_000, jnp.int32)
  pos, valid = kvc.stream_slot_positions(start, sink, recent)
  nv = jnp.ones((b,), jnp.int32)
  row = {"kernel": "streaming_decode", "B": b, "H": h, "G": g, "D": d, "ctx": w,
         "bytes": nbytes}
  return time_decode_ops(row, ops, lambda op: lambda q, sk, sv, k, v: op(
      q, sk, sv, pos, valid, k, v, start[:, None], nv, sink, recent), q, sets, copy)


def bench_duo_decode(ops, b, hr, hs, g, d, ctx, sink, recent, copy):
  """A DuoAttention layer's decode: hr retrieval heads over ctx keys + hs streaming heads."""
  w = sink + recent
  kv_bytes = 2 * b * ctx * hr * d * 2 + 2 * b * w * hs * d * 2
  sets = [(rand(6 * i + 1, (b, ctx, hr, d)), rand(6 * i + 2, (b, ctx, hr, d)),
           rand(6 * i + 3, (b, w, hs, d)), rand(6 * i + 4, (b, w, hs, d)),
           rand(6 * i + 5, (b, 1, hr + hs, d)), rand(6 * i + 6, (b, 1, hr + hs, d)))
          for i in range(n_sets(kv_bytes))]
  q = rand(0, (b, 1, hr + hs, g, d))
  lens = jnp.full((b,), ctx, jnp.int32)
  start = lens - 1
  pos, valid = kvc.stream_slot_positions(start, sink, recent)
  nv = jnp.ones((b,), jnp.int32)
  row = {"kernel": "duo_decode", "B": b, "H": hr, "HS": hs, "G": g, "D": d, "ctx": ctx,
         "bytes": kv_bytes + 2 * q.size * 2}
  time_decode_ops(row, ops, lambda op: lambda q, kc, vc, sk, sv, k, v: op(
      q, kc, vc, start[:, None], lens, sk, sv, pos, valid, k, v, nv, sink, recent), q, sets, copy)
  del sets
  return row


def split_duo_decode(full_decode, streaming_decode):
  """The unfused route: two decode ops and a concatenation (what dispatch did before
  `duo_decode`)."""
  def op(q, kc, vc, q_pos, kv_len, sk, sv, pos, valid, k, v, nv, sink, recent):
    hr = kc.shape[2]
    a = full_decode(q[:, :, :hr], kc, vc, q_pos, kv_len)
    b = streaming_decode(q[:, :, hr:], sk, sv, pos, valid, k[:, :, hr:], v[:, :, hr:], q_pos, nv,
                         sink, recent)
    return jnp.concatenate([a, b], axis=2)
  return op


# -- prefill ----------------------------------------------------------------------------

def attn_flops(t, keys_per_query, hq, d, b=1):
  return 4 * b * hq * d * t * keys_per_query


def bench_full_chunk(ops, b, h, g, d, t, prefix):
  s = prefix + t
  sets = [(rand(1, (b, s, h, d)), rand(2, (b, s, h, d)))]
  q = rand(0, (b, t, h, g, d))
  start = jnp.full((b,), prefix, jnp.int32)
  qpos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  kvl = start + t
  flops = attn_flops(t, prefix + (t + 1) / 2, h * g, d, b)
  row = {"kernel": "full_chunk", "B": b, "H": h, "G": g, "D": d, "T": t, "prefix": prefix,
         "flops": flops}
  base = None
  for name, op in ops.items():
    f = lambda q, k, v, op=op: op(q, k, v, qpos, kvl)
    try:
      out = jax.jit(f)(q, *sets[0]).astype(jnp.float32)
      if base is None:  # the first op (ours) is the yardstick of the others
        base = out
      row[f"{name}_rel_err"] = float(jnp.linalg.norm(out - base) / jnp.linalg.norm(base))
      sec = chain_time(f, q, sets, n1=1, n2=4, reps=3)
      row[f"{name}_ms"] = sec * 1e3
      row[f"{name}_TFLOPs"] = flops / sec / 1e12
    except Exception as e:  # noqa: BLE001
      row[f"{name}_error"] = repr(e)[:300]
  return row


def bench_stream_chunk(ops, b, h, g, d, t, prefix, sink, recent):
  w = sink + recent
  sets = [(rand(1, (b, w, h, d)), rand(2, (b, w, h, d)), rand(3, (b, t, h, d)),
           rand(4, (b, t, h, d)))]
  q = rand(0, (b, t, h, g, d))
  start = jnp.full((b,), prefix, jnp.int32)
  pos, valid = kvc.stream_slot_positions(start, sink, recent)
  qpos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  nv = jnp.full((b,), t, jnp.int32)
  flops = attn_flops(t, min(recent, prefix + t) + sink, h * g, d, b)  # visible keys only
  row = {"kernel": "streaming_chunk", "B": b, "H": h, "G": g, "D": d, "T": t, "prefix": prefix,
         "sink": sink, "recent": recent, "flops_visible": flops}
  for name, op in ops.items():
    f = lambda q, sk, sv, k, v, op=op: op(q, sk, sv, pos, valid, k, v, qpos, nv, sink, recent)
    sec = chain_time(f, q, sets, n1=1, n2=6, reps=3)
    row[f"{name}_ms"] = sec * 1e3
    row[f"{name}_TFLOPs_visible"] = flops / sec / 1e12
  return row


def other_chunk_ops(prefix: int):
  """Causal prefill-chunk attention through other libraries: cuDNN via
  jax.nn.dot_product_attention (its causal mask is top-left aligned, so only the
  first chunk, prefix 0) and tokamax's implementations. tokamax's causal mask
  takes one offset for the whole batch (`local_window_size=(S, prefix)`: key k
  visible from query q iff k <= q + prefix), so it serves chunks whose rows all
  start at the same position, not a ragged batch."""
  ops = {}
  if prefix == 0:
    def cudnn(q, k, v, qpos, kvl):
      b, t, h, g, d = q.shape
      out = jax.nn.dot_product_attention(q.reshape(b, t, h * g, d), k, v, is_causal=True,
                                         implementation="cudnn")
      return out.reshape(q.shape)
    ops["cudnn"] = cudnn
  try:
    import tokamax
  except Exception as e:  # noqa: BLE001 - tokamax is optional
    print("tokamax unavailable:", repr(e)[:300])
    return ops
  for impl in ("mosaic", "triton"):
    def tk(q, k, v, qpos, kvl, impl=impl):
      b, t, h, g, d = q.shape
      kw = dict(is_causal=True) if prefix == 0 else dict(local_window_size=(k.shape[1], prefix))
      out = tokamax.dot_product_attention(q.reshape(b, t, h * g, d), k, v, implementation=impl,
                                          **kw)
      return out.reshape(q.shape)
    ops[f"tokamax_{impl}"] = tk
  return ops


# -- raw kernel variants (torch launches, CUDA graphs) ------------------------------------

def decode_variants(ctx=128 * K, h=4, g=4, d=128, b=1, grid=None):
  """The split-K decode kernel's (block_n, warps, stages, programs) `grid` (default: the
  54-point tuning grid), each launch timed raw in a CUDA graph, and the default config on
  the [B, S, H, D] and [B, H, S, D] layouts -> (rows, layout)."""
  import torch
  import triton.testing as tt
  from duojax.kernels.gpu import decode as kd
  os.environ["TRITON_CACHE_DIR"] = "/tmp/triton_cache"  # jax_triton blanks it on import
  dev = "cuda"
  kb = torch.randn(b, ctx, h, d, device=dev, dtype=torch.bfloat16)
  vb = torch.randn(b, ctx, h, d, device=dev, dtype=torch.bfloat16)
  q = torch.randn(b, 1, h, g, d, device=dev, dtype=torch.bfloat16)
  lens = torch.full((b,), ctx, device=dev, dtype=torch.int32)
  qpos = (lens - 1)[:, None].contiguous()
  nbytes = 2 * kb.numel() * 2
  rows = []
  grid = grid or [(bn, w, st, p) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)
                  for p in (264, 528, 1056)]
  for bn, w, st, p in grid:
    cfg = {"block_n": bn, "num_warps": w, "num_stages": st, "programs": p, "max_splits": 256}
    try:
      split, comb = kd.full_decode_plans((b, 1, h, g, d), (b, ctx, h, d), jnp.bfloat16, cfg)
      outs = [torch.empty(s, dtype=torch.float32, device=dev) for s, _ in split.out_shapes]
      out = torch.empty(q.shape, dtype=torch.bfloat16, device=dev)

      def run():
        # plain caches: each buffer stands in for its own scale and zero (kv_parts)
        split.torch(q, kb, kb, kb, vb, vb, vb, qpos, lens, outs=outs)
        comb.torch(*outs, outs=[out])
      run()
      ms = tt.do_bench_cudagraph(run, rep=50)
      rows.append({"block_n": bn, "num_warps": w, "num_stages": st, "programs": p,
                   "splits": split.grid[0], "us": ms * 1e3, "GBps": nbytes / (ms / 1e3) / 1e9})
    except Exception as e:  # noqa: BLE001 - a config that does not compile / fit
      rows.append({"block_n": bn, "num_warps": w, "num_stages": st, "programs": p,
                   "error": repr(e)[:200]})
  # layout: [B, H, S, D] (each head's keys contiguous) with the default config
  split, comb = kd.full_decode_plans((b, 1, h, g, d), (b, ctx, h, d), jnp.bfloat16)
  c = dict(split.consts)
  c.update(SKB=h * ctx * d, SKS=d, SKH=ctx * d)  # K and V share the strides
  split_hsd = dataclasses.replace(split, consts=c)
  kt, vt = kb.permute(0, 2, 1, 3).contiguous(), vb.permute(0, 2, 1, 3).contiguous()
  outs = [torch.empty(s, dtype=torch.float32, device=dev) for s, _ in split.out_shapes]
  out = torch.empty(q.shape, dtype=torch.bfloat16, device=dev)
  layout = {}
  for name, (sp, kk, vv) in {"BSHD": (split, kb, vb), "BHSD": (split_hsd, kt, vt)}.items():
    def run(sp=sp, kk=kk, vv=vv):
      sp.torch(q, kk, kk, kk, vv, vv, vv, qpos, lens, outs=outs)
      comb.torch(*outs, outs=[out])
    run()
    ms = tt.do_bench_cudagraph(run, rep=50)
    layout[name] = {"us": ms * 1e3, "GBps": nbytes / (ms / 1e3) / 1e9}
  return rows, layout


# -- main ---------------------------------------------------------------------------------

def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check of the script)")
  ap.add_argument("--contexts", default="8,32,128,512", help="decode contexts in K tokens")
  ap.add_argument("--variants", action="store_true", help="also time decode tuning variants")
  ap.add_argument("--variants-shape", default="128,4,4",
                  help="context in K tokens, KV heads, G of the --variants grid")
  ap.add_argument("--skip-prefill", action="store_true")
  ap.add_argument("--skip-decode", action="store_true")
  args = ap.parse_args(argv)
  out_dir = Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)

  on_gpu = jax.default_backend() == "gpu"
  ops_d = {"xla": reference.full_chunk_attention}
  ops_sd = {"xla": reference.streaming_chunk_attention}
  ops_fc = {"xla": reference.full_chunk_attention}
  ops_sc = {"xla": reference.streaming_chunk_attention}
  if on_gpu:
    from duojax.kernels import gpu as kg
    ops_d = {"triton": kg.full_decode, **ops_d}
    ops_sd = {"triton": kg.streaming_decode, **ops_sd}
    ops_fc = {"triton": kg.prefill.triton_full_chunk}
    if kg.tokamax_chunk.available():  # the backend's route: tokamax with a per-row k_end mask
      ops_fc["tokamax_route"] = kg.tokamax_chunk.full_chunk
    ops_sc = {"triton": kg.streaming_chunk, **ops_sc}

  dev = jax.devices()[0]
  meta = {"device": getattr(dev, "device_kind", str(dev)), "platform": jax.default_backend(),
          "jax": jax.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
          "host": platform.node()}
  copy = copy_bandwidth(2 * 2**30 if on_gpu else 2**24)
  meta.update(copy)
  print(f"# {meta['device']}  {meta['date']}  copy {copy['copy_GBps']:.0f} GB/s "
        f"(jax {copy['jax_copy_GBps']:.0f})", flush=True)
  cbw = copy["copy_GBps"]

  rows = []
  if args.smoke:
    shapes = [(1, 2, 2, 64, None)]
    ctxs = [1000]
  else:
    shapes = [(1, 8, 4, 128, None), (1, 4, 4, 128, None), (1, 32, 1, 128, None),
              (1, 8, 1, 128, None), (8, 8, 4, 128, 32)]
    ctxs = [int(c) * K for c in args.contexts.split(",")]
  for b, h, g, d, only in ([] if args.skip_decode else shapes):
    for ctx in ([only * K] if only else ctxs):
      if 2 * b * ctx * h * d * 2 > 12 * 2**30:
        continue
      ops = dict(ops_d)
      if ctx > 128 * K or b * ctx * h * g > 2**22:  # the reference's fp32 logits get large
        ops.pop("xla", None)
      r = bench_full_decode(ops, b, h, g, d, ctx, cbw)
      rows.append(r)
      print(json.dumps(r), flush=True)
  for b, h, g, d in ([] if args.skip_decode else [(1, 2, 2, 64)] if args.smoke else
                     [(1, 4, 4, 128), (1, 24, 1, 128), (8, 4, 4, 128)]):
    r = bench_stream_decode(ops_sd, b, h, g, d, 64, 256, cbw)
    rows.append(r)
    print(json.dumps(r), flush=True)
  # a whole DuoAttention layer: fused launch vs the two ops + concatenation
  ops_duo = {"xla": reference.duo_decode_attention}
  if on_gpu:
    ops_duo = {"triton": kg.duo_decode,
               "triton_split": split_duo_decode(kg.full_decode, kg.streaming_decode), **ops_duo}
  for b, hr, hs, g, d in ([] if args.skip_decode else [(1, 1, 1, 2, 64)] if args.smoke else
                          [(1, 4, 4, 4, 128), (1, 8, 24, 1, 128)]):
    for ctx in ([1000] if args.smoke else ctxs):
      ops = dict(ops_duo)
      if ctx > 128 * K:
        ops.pop("xla", None)
      r = bench_duo_decode(ops, b, hr, hs, g, d, ctx, 64, 256, cbw)
      rows.append(r)
      print(json.dumps(r), flush=True)

  if not args.skip_prefill:
    t = 256 if args.smoke else 4096
    for prefix in ([0, 512] if args.smoke else [0, 32 * K, 128 * K]):
      ops = dict(ops_fc) if not args.smoke else {"xla": reference.full_chunk_attention}
      if on_gpu:
        ops.update(other_chunk_ops(prefix))
      r = bench_full_chunk(ops, 1, 2 if args.smoke else 8, 4, 64 if args.smoke else 128, t,
                           prefix)
      rows.append(r)
      print(json.dumps(r), flush=True)
    for prefix in ([0, 512] if args.smoke else [0, 128 * K]):
      ops = dict(ops_sc)
      r = bench_stream_chunk(ops, 1, 2 if args.smoke else 4, 4, 64 if args.smoke else 128, t,
                             prefix, 64, 256)
      rows.append(r)
      print(json.dumps(r), flush=True)

  variants = layout = None
  if args.variants and on_gpu:
    vctx, vh, vg = (int(x) for x in args.variants_shape.split(","))
    variants, layout = decode_variants(vctx * K, vh, vg)
    from duojax.kernels.gpu.decode import DECODE_CONFIG
    default = {k: DECODE_CONFIG[k] for k in ("block_n", "num_warps", "num_stages", "programs")}
    for v in variants:
      v["default"] = all(v.get(k) == x for k, x in default.items())
    best = sorted([v for v in variants if "us" in v], key=lambda v: v["us"])[:5]
    print(f"decode variants ({vctx}K, {vh} KV heads, G={vg}; CUDA graph, kernel + merge only), "
          "best 5:", json.dumps(best), flush=True)
    print("default config:", json.dumps([v for v in variants if v["default"]]), flush=True)
    print("layout:", json.dumps(layout), flush=True)

  res = {"meta": meta, "rows": rows, "decode_variants": variants, "layout": layout}
  (out_dir / "bench_kernels.json").write_text(json.dumps(res, indent=1))
  table = format_table(rows, meta)
  (out_dir / "bench_kernels.md").write_text(table)
  plot(rows, cbw, out_dir / "bench_kernels.png", meta)
  print(table)


def format_table(rows, meta):
  lines = [f"Device {meta['device']}, {meta['date']}, copy {meta['copy_GBps']:.0f} GB/s", "",
           "| kernel | B | H x G | D | ctx / T (prefix) | triton | xla | others |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["kernel"].endswith("decode"):
      def f(n):
        if f"{n}_us" not in r:
          return "-" if f"{n}_error" not in r else "error"
        return f"{r[f'{n}_us']:.1f} us, {r[f'{n}_GBps']:.0f} GB/s ({100 * r[f'{n}_frac_copy']:.0f}%)"
      size = f"{kfmt(r['ctx'])}" if r["ctx"] >= K else str(r["ctx"])
      others = f"unfused (2 ops + concat) {f('triton_split')}" if "HS" in r else ""
    else:
      def f(n):
        if f"{n}_ms" not in r:
          return "-" if f"{n}_error" not in r else "error"
        tf = r.get(f"{n}_TFLOPs", r.get(f"{n}_TFLOPs_visible"))
        return f"{r[f'{n}_ms']:.2f} ms, {tf:.0f} TFLOP/s"
      size = f"{r['T']} ({kfmt(r['prefix'])})"
      names = sorted({k.rsplit("_", 1)[0] for k in r if k.endswith(("_ms", "_error"))}
                     - {"triton", "xla"})
      others = "; ".join(f"{n} {f(n)}" + (f" (rel. err. {r[f'{n}_rel_err']:.1e})"
                                          if f"{n}_rel_err" in r else "") for n in names)
    heads = f"{r['H']}+{r['HS']}s" if "HS" in r else str(r["H"])
    lines.append(f"| {r['kernel']} | {r['B']} | {heads}x{r['G']} | {r['D']} | {size} | "
                 f"{f('triton')} | {f('xla')} | {others} |")
  return "\n".join(lines) + "\n"


def plot(rows, cbw, path, meta):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  groups = {}
  for r in rows:
    if r["kernel"] != "full_decode":
      continue
    for n in ("triton", "xla"):
      if f"{n}_GBps" in r:
        groups.setdefault(f"{n} B={r['B']} H={r['H']} G={r['G']}", []).append(
            (r["ctx"], r[f"{n}_GBps"]))
  for name, pts in groups.items():
    pts.sort()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
  ax.axhline(cbw, color="k", ls="--", label=f"device copy {cbw:.0f} GB/s")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context (tokens)")
  ax.set_ylabel("GB/s (K+V read)")
  ax.set_title(f"decode attention, one layer: {meta['device']}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
