"""Where a decode step's time goes: a jax.profiler trace of the decode loop, broken down by
kernel kind, against the floor.

  python -m infer.profile_decode --out OUT                              # GPU: Llama-3-8B shape
  python -m infer.profile_decode --out OUT --contexts 32K,1M --configs full,duo-0.5 \\
      --kv-dtype int4 --weights-dtype int8
  python -m infer.profile_decode --out /tmp/pd --smoke                  # CPU check (tiny model)

Why: at 32K duo 0.5 decodes at ~1.4x its floor on an H200 and the rest was put down to
launch and dispatch (about 1.5 ms a token); a host sync per token was ruled out
(infer/results/h200-2026-12-02-late/sync-every/). This says which: the device's kernel
time per token (overlaps merged) against the wall time, so idle = wall - busy is what no
kernel ran (launch gaps, host work), and busy time per kind: `matmul` (cuBLAS / XLA GEMM
fusions, and any fusion the optimised HLO says was made from a dot: the weights),
`attention` (the Triton decode kernels), `other` (norms, RoPE, the cache writes,
sampling). The JSON's longest kernels list the JAX ops each fusion was made from. Weight
bytes / matmul time is the bandwidth the projections reach, against the copy bandwidth
measured in the same run.

The model, cache and decode loop are infer/bench_decode.py's (random weights of the real
shape, the cache filled with pseudo-random values, `cache.lengths` set to the context);
timing as there (median of 3 after a warm-up), then one more call under the profiler.
Writes profile_decode.json, profile_decode.md and profile_decode.png into --out.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from infer import bench_decode as bd  # noqa: E402

KINDS = ("matmul", "attention", "other", "copy")
# kernels kept in the JSON, longest first: enough to account for the small ones (~20 a
# layer), which are where the fixed cost of a step goes
TOP_KERNELS = 40


def kernel_key(name: str) -> str:
  """A name as the GPU trace spells an HLO instruction's kernel ('.' and '-' become '_')."""
  return re.sub(r"[.\-]", "_", name)


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# an instruction's opcode after its shape (a tuple shape holds no '=')
_OPCODE = re.compile(r"^(?:\([^=]*?\)|[^\s(]+)\s+([a-z][\w\-]*)\(")


def hlo_fusions(text: str) -> dict[str, dict]:
  """The fusions of an optimised HLO module (`compiled.as_text()`), by kernel_key: the JAX
  ops each was made from (the trailing parts of their op_name metadata, e.g.
  'bte,ehd->bthd/dot_general') and whether one of them is a dot. Why: XLA turns small
  matrix-vector dots into reductions, so a weight projection can run as an
  `input_reduce_fusion` that the kernel's name alone would count as 'other'. A fusion is
  a dot when it holds a dot (or convolution) or a reduce made from one; a reshape of a
  dot's output fused into a cache write is not."""
  bodies: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m:
        current = m.group(1)
        bodies[current] = []
      continue
    if line.strip() == "}":
      current = None
    else:
      bodies[current].append(line)

  def ops_of(comp: str, seen: set) -> tuple[set, bool]:
    if comp in seen or comp not in bodies:
      return set(), False
    seen.add(comp)
    ops, dot = set(), False
    for line in bodies[comp]:
      m = _OP_NAME.search(line)
      name = "/".join(m.group(1).split("/")[-2:]) if m else ""
      if name:
        ops.add(name)
      ins = _INSTRUCTION.match(line)
      code = _OPCODE.match(ins.group(2)) if ins else None
      code = code.group(1) if code else ""
      dot |= code in ("dot", "convolution") or (code == "reduce" and
                                                 name.endswith("dot_general"))
      for sub in _CALLS.findall(line):
        sub_ops, sub_dot = ops_of(sub, seen)
        ops |= sub_ops
        dot |= sub_dot
    return ops, dot

  out = {}
  for lines in bodies.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m or " fusion(" not in m.group(2):
        continue
      called = _CALLS.search(m.group(2))
      ops, dot = ops_of(called.group(1), set()) if called else (set(), False)
      out[kernel_key(m.group(1))] = {"ops": sorted(ops), "dot": dot}
  return out


def kind_of(name: str, fusions: dict | None = None) -> str:
  """A device kernel's kind from its name (XLA names its fusions, cuBLAS its GEMMs, Triton
  kernels carry their Python names) and, when given, the HLO's fusions (`hlo_fusions`):
  a fusion made from a dot is a matmul whatever XLA called it."""
  n = name.lower()
  if any(t in n for t in ("decode_kernel", "combine_kernel", "chunk_kernel")):
    return "attention"
  info = (fusions or {}).get(kernel_key(name))
  if info is not None and info["dot"]:
    return "matmul"
  if any(t in n for t in ("gemm", "cublas", "cutlass", "nvjet", "xmma", "matmul", "dot")):
    return "matmul"
  if "memcpy" in n or "memset" in n:
    return "copy"
  return "other"


def union_ns(intervals) -> int:
  """Total length covered by [start, end) intervals (overlaps counted once)."""
  total, end = 0, None
  for s, e in sorted(intervals):
    if end is None or s > end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total


def breakdown(events, steps: int, fusions: dict | None = None) -> dict:
  """events: (name, start_ns, duration_ns) of device kernels over `steps` decode steps ->
  per-step figures: busy_ms (union), span_ms (first start to last end), per kind ms, kernel
  launches, and the TOP_KERNELS kernels that took longest (us and launches per step, and
  the JAX ops of each fusion found in `fusions`)."""
  if not events:
    return {"busy_ms": 0.0, "span_ms": 0.0, "launches": 0.0, "top": [],
            **{f"{k}_ms": 0.0 for k in KINDS}}
  busy = union_ns((s, s + d) for _, s, d in events)
  span = max(s + d for _, s, d in events) - min(s for _, s, _ in events)
  per_kind = {k: 0 for k in KINDS}
  by_name: dict[str, list] = {}
  for name, _, d in events:
    per_kind[kind_of(name, fusions)] += d
    t = by_name.setdefault(name, [0, 0])
    t[0] += d
    t[1] += 1
  top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
  return {"busy_ms": busy / steps / 1e6, "span_ms": span / steps / 1e6,
          "launches": len(events) / steps,
          **{f"{k}_ms": v / steps / 1e6 for k, v in per_kind.items()},
          "top": [{"name": n[:90], "kind": kind_of(n, fusions), "us": t / steps / 1e3,
                   "launches": c / steps,
                   **({"ops": fusions[kernel_key(n)]["ops"][:8]}
                      if kernel_key(n) in (fusions or {}) else {})}
                  for n, (t, c) in top]}


def device_events(trace_dir: str):
  """(name, start_ns, duration_ns) of every kernel on the first GPU's streams; without a
  GPU, the XLA CPU client's op events (a smoke check of the path, not a device profile)."""
  from jax.profiler import ProfileData
  files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  if not files:
    raise SystemExit(f"no profile written under {trace_dir}")
  pd = ProfileData.from_file(files[-1])
  planes = [p for p in pd.planes if p.name.startswith("/device:GPU:0")]
  out = []
  if planes:
    for line in planes[0].lines:
      if line.name.startswith("Stream"):
        out += [(ev.name, ev.start_ns, ev.duration_ns) for ev in line.events]
  else:
    cpu = pd.find_plane_with_name("/host:CPU")
    for line in (cpu.lines if cpu else []):
      if line.name.startswith("tf_XLA"):
        out += [(ev.name, ev.start_ns, ev.duration_ns) for ev in line.events]
  return out, bool(planes)


def profile_one(prep, ctx: int, steps: int, trace_dir: str, fusions: dict | None = None):
  import jax
  ms, _ = prep.run(ctx)
  with jax.profiler.trace(trace_dir):
    prep.run(ctx, reps=1)  # a warm-up call and a timed one: 2 x steps tokens
  events, on_gpu = device_events(trace_dir)
  return ms, breakdown(events, 2 * steps, fusions), on_gpu


def format_table(rows, meta) -> str:
  lines = [f"{meta['device']}, {meta['date']}, copy {meta['copy_GBps']:.0f} GB/s, "
           f"{meta['steps']} steps a call", "",
           "| model | ctx | config | KV / weights | ms/token | floor | kernels busy | idle | "
           "matmul (GB/s) | attention (GB/s) | other | launches |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['model']} | {bd.kfmt(r['ctx'])} | {r['config']} | "
                   f"{r['kv_dtype']} / {r['weights_dtype']} | {r['error']} |" + " |" * 8)
      continue
    lines.append(
        f"| {r['model']} | {bd.kfmt(r['ctx'])} | {r['config']} | {r['kv_dtype']} / "
        f"{r['weights_dtype']} | {r['ms_per_token']:.2f} | {r['floor_ms']:.2f} | "
        f"{r['busy_ms']:.2f} | {r['idle_ms']:.2f} | {r['matmul_ms']:.2f} "
        f"({r['matmul_GBps']:.0f}) | {r['attention_ms']:.2f} ({r['attention_GBps']:.0f}) | "
        f"{r['other_ms']:.2f} | {r['launches']:.0f} |")
  lines += ["", "busy: the union of kernel intervals per token; idle = ms/token - busy. "
            "matmul GB/s: the weight bytes read / matmul time; attention GB/s: the KV bytes "
            "read / attention time.", ""]
  for r in rows:
    if r.get("top"):
      lines.append(f"Longest kernels, {r['model']} {bd.kfmt(r['ctx'])} {r['config']} "
                   f"{r['kv_dtype']}/{r['weights_dtype']} (us per token, launches per token): "
                   + "; ".join(f"{t['name']} [{t['kind']}] {t['us']:.0f} us x{t['launches']:.0f}"
                               for t in r["top"][:6]))
  return "\n".join(lines) + "\n"


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ok = [r for r in rows if "error" not in r]
  if not ok:
    return
  fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(ok)), 4.5))
  labels = [f"{bd.kfmt(r['ctx'])}\n{r['config']}\n{r['kv_dtype']}/{r['weights_dtype']}"
            for r in ok]
  bottom = [0.0] * len(ok)
  for kind, color in (("matmul", "tab:blue"), ("attention", "tab:orange"),
                      ("other", "tab:gray"), ("idle", "tab:red")):
    vals = [max(0.0, r[f"{kind}_ms"]) for r in ok]
    ax.bar(range(len(ok)), vals, bottom=bottom, color=color, label=kind)
    bottom = [b + v for b, v in zip(bottom, vals)]
  ax.scatter(range(len(ok)), [r["floor_ms"] for r in ok], color="k", marker="_", s=600,
             label="floor", zorder=3)
  ax.set_xticks(range(len(ok)), labels, fontsize=8)
  ax.set_ylabel("ms per token")
  ax.set_title("decode step: kernel time by kind, idle = wall - busy")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--model", default="llama3-8b")
  ap.add_argument("--contexts", default="32K,128K", help="as bench_decode's --contexts")
  ap.add_argument("--configs", default="full,duo-0.5", help="full and/or duo-S")
  ap.add_argument("--kv-dtype", default="bf16", choices=bd.KV_DTYPES)
  ap.add_argument("--weights-dtype", default="bf16", choices=bd.WEIGHT_DTYPES)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--backend", default="auto")
  ap.add_argument("--hlo", action="store_true",
                  help="also write each decode loop's optimised HLO (hlo-CONFIG.txt): the "
                       "fusions named in the JSON's kernel list are defined there")
  ap.add_argument("--smoke", action="store_true", help="tiny model on CPU")
  args = ap.parse_args(argv)
  import jax
  from duojax.attention import dispatch
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  backend = dispatch.resolve_backend(args.backend)
  models = bd.model_configs(args.smoke)
  name = "tiny-gqa" if args.smoke else args.model
  if name not in models:
    raise SystemExit(f"--model {name}: one of {', '.join(models)}")
  config = models[name]
  ctxs = [200, 500] if args.smoke else bd.parse_contexts(args.contexts)
  copy = bd.copy_bandwidth(2 * bd.GiB if jax.default_backend() == "gpu" else 2**24)
  try:
    copy = max(copy, bd.torch_copy_GBps() if jax.default_backend() == "gpu" else 0.0)
  except Exception:  # noqa: BLE001 - torch is optional: the jax copy stands
    pass
  meta = {"device": getattr(jax.devices()[0], "device_kind", str(jax.devices()[0])),
          "date": datetime.datetime.now().isoformat(timespec="seconds"), "copy_GBps": copy,
          "steps": args.steps, "backend": backend, "jax": jax.__version__,
          "packed_weights": True,  # build_params packs q/k/v and gate/up, as serving does
          "command": " ".join(["python -m infer.profile_decode"] + (argv or sys.argv[1:]))}
  print(json.dumps(meta), flush=True)
  params = bd.build_params(config, args.weights_dtype)
  wb = bd.weight_bytes_read(config, params, args.batch)
  rows = []
  for label in args.configs.split(","):
    if label == "full":
      mask = None
    elif label.startswith("duo-"):
      mask = bd.random_mask(config, float(label[4:]))
    else:
      raise SystemExit(f"--configs: full or duo-S (e.g. duo-0.5), got {label!r}")
    capacity = -(-(max(ctxs) + args.steps + 16) // 16) * 16
    base = {"model": name, "config": label, "kv_dtype": args.kv_dtype,
            "weights_dtype": args.weights_dtype, "batch": args.batch}
    try:
      prep = bd.prepare("plain", config, params, mask, args.batch, capacity, args.kv_dtype,
                        args.steps, backend)
    except Exception as e:  # noqa: BLE001 - e.g. does not fit: the next config
      rows += [{**base, "ctx": c, "error": f"{type(e).__name__}: {str(e)[:150]}"} for c in ctxs]
      continue
    hlo = prep.compiled.as_text()
    if args.hlo:
      (out / f"hlo-{label}.txt").write_text(hlo)
    fusions = hlo_fusions(hlo)
    for ctx in ctxs:
      ms, br, on_gpu = profile_one(prep, ctx, args.steps,
                                   str(out / f"trace-{label}-{ctx}"), fusions)
      kb = bd.kv_bytes_read(config, mask, ctx, args.batch, bd.kv_item(config, args.kv_dtype))
      floor = (wb + kb) / (copy * 1e9) * 1e3
      row = {**base, "ctx": ctx, "ms_per_token": ms, "floor_ms": floor, "x_floor": ms / floor,
             "weight_bytes": wb, "kv_bytes_read": kb, "device_profile": on_gpu, **br,
             "idle_ms": ms - br["busy_ms"],
             "matmul_GBps": wb / (br["matmul_ms"] / 1e3) / 1e9 if br["matmul_ms"] else 0.0,
             "attention_GBps": kb / (br["attention_ms"] / 1e3) / 1e9
             if br["attention_ms"] else 0.0}
      rows.append(row)
      print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
    del prep
  (out / "profile_decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  table = format_table(rows, meta)
  (out / "profile_decode.md").write_text(table)
  plot(rows, out / "profile_decode.png")
  print(table)


if __name__ == "__main__":
  main()
