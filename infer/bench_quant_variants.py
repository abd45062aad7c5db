"""The quantised split-K decode kernel alone, over its tuning grid and scale layouts.

  python -m infer.bench_quant_variants --out OUT                    # GPU
  python -m infer.bench_quant_variants --out OUT --shapes 1024,4,4,1 --bits 4
  python -m infer.bench_quant_variants --out OUT --bits 4,8,k8v4 --small-grid --no-layouts
  TRITON_INTERPRET=1 python -m infer.bench_quant_variants --out /tmp/qv --smoke   # CPU check

Why: the int8 / int4 caches decode slower than bf16 although they move 2-3.5x fewer bytes
(infer/results/h200-2026-12-02/README.md). The tuning in DECODE_CONFIG was chosen for bf16
on an H100; the scales are fp32, one per token per KV head, strided by the head count.
This times the raw Triton launch (torch tensors, CUDA graphs, kernel + merge only), so
nothing but the kernel is in the figure:

  stage 1  block_n x num_warps x num_stages x programs, the layout as stored;
  stage 2  the best --top (3) of stage 1 with the scales folded out of the products, and with
           the scales laid out otherwise (--no-layouts: skipped).
  fp16 codes (`decode.f16_codes`, the default for a bf16 q): every stage-1 point is timed
           with the codes made fp16 by bit pattern and with the old int -> float convert
           (--f16-codes on / off / both). The kernel takes every stride as a constant, so
           other layouts need no kernel change: BSH (as stored: [B, S, H] scale and zero
           apart), BHS (head-major: a block's scales contiguous), BSH2 / BHS2 (scale and
           zero side by side), BHS2-f16 (the same in fp16, the paper's choice).

bytes = codes + fp32 scales and zeros of the rows read (what the cache holds for them);
the floor is bytes / the copy bandwidth measured in the same run (torch clone of 2 GiB).
Writes quant_variants.json, quant_variants.md and quant_variants.png into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

K = 1024
LAYOUTS = ("BSH", "BHS", "BSH2", "BHS2", "BHS2-f16")


DEV = "cuda"
TOP = 3  # stage-1 variants taken into stage 2 (--top)


def copy_GBps(torch, nbytes=2 * 2**30):
  import triton.testing as tt
  if DEV == "cpu":
    return 1.0
  x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEV)
  ms = tt.do_bench(lambda: x.clone(), rep=200)
  return 2 * nbytes / (ms / 1e3) / 1e9


def scale_views(torch, layout, scale, zero):
  """scale, zero [B, S, H] fp32 -> (scale view, zero view, (SCB, SCS, SCH)) in `layout`."""
  b, s, h = scale.shape
  if layout == "BSH":
    return scale, zero, (s * h, h, 1)
  if layout == "BHS":
    return (scale.permute(0, 2, 1).contiguous(), zero.permute(0, 2, 1).contiguous(),
            (h * s, 1, s))
  both = torch.stack([scale, zero], -1)  # [B, S, H, 2]
  if layout == "BSH2":
    return both[..., 0], both[..., 1], (2 * s * h, 2 * h, 2)
  both = both.permute(0, 2, 1, 3).contiguous()  # [B, H, S, 2]
  if layout == "BHS2-f16":
    both = both.half()
  return both[..., 0], both[..., 1], (2 * h * s, 2, 2 * s)


def time_variant(torch, kd, shape, bits, cfg, layout, bufs):
  import jax.numpy as jnp
  import triton.testing as tt
  ctx, h, g, b = shape
  d = 128
  dt = jnp.float32 if DEV == "cpu" else jnp.bfloat16  # the interpreter has no bf16 products
  split, comb = kd.full_decode_plans((b, 1, h, g, d), (b, ctx, h, d), dt, cfg, bit_pair(bits))
  q, kc, vc, ks, kz, vs, vz, qpos, lens = bufs
  ks, kz, (cb, cs, ch) = scale_views(torch, layout, ks, kz)
  vs, vz, _ = scale_views(torch, layout, vs, vz)
  consts = dict(split.consts, SCB=cb, SCS=cs, SCH=ch)
  split = dataclasses.replace(split, consts=consts)
  outs = [torch.empty(s, dtype=torch.float32, device=DEV) for s, _ in split.out_shapes]
  out = torch.empty(q.shape, dtype=q.dtype, device=DEV)

  def run():
    split.torch(q, kc, ks, kz, vc, vs, vz, qpos, lens, outs=outs)
    comb.torch(*outs, outs=[out])
  run()
  if DEV == "cpu":  # the interpreter: a check of the script and the layouts, not a time
    return 1.0, out.float()
  torch.cuda.synchronize()
  ms = tt.do_bench_cudagraph(run, rep=40)
  return ms * 1e3, out.float()


def bit_pair(bits):
  """8, 4 or "k8v4" -> (key bits, value bits)."""
  return (8, 4) if bits == "k8v4" else (int(bits), int(bits))


def buffers(torch, shape, bits):
  ctx, h, g, b = shape
  d = 128
  gen = torch.Generator(device=DEV).manual_seed(0)

  def codes_of(nb):
    lo, hi = (0, 256) if nb == 4 else (-128, 128)
    return torch.randint(lo, hi, (b, ctx, h, d // 2 if nb == 4 else d), generator=gen,
                         device=DEV, dtype=torch.int32).to(torch.uint8 if nb == 4 else torch.int8)
  codes = [codes_of(nb) for nb in bit_pair(bits)]
  side = [torch.rand(b, ctx, h, generator=gen, device=DEV) * 0.02 + 0.001 for _ in range(4)]
  q = torch.randn(b, 1, h, g, d, generator=gen, device=DEV)
  q = q if DEV == "cpu" else q.to(torch.bfloat16)
  lens = torch.full((b,), ctx, device=DEV, dtype=torch.int32)
  qpos = (lens - 1)[:, None].contiguous()
  nbytes = codes[0].numel() + codes[1].numel() + 4 * 4 * b * ctx * h  # codes + fp32 scale, zero
  return (q, codes[0], codes[1], side[0], side[1], side[2], side[3], qpos, lens), nbytes


def run_shape(torch, kd, shape, bits, cbw, grid, f16=(True, False), layouts=True,
              variants=None):
  bufs, nbytes = buffers(torch, shape, bits)
  floor_us = nbytes / cbw * 1e6
  rows, ref = [], None
  default = {k: kd.DECODE_CONFIG[k] for k in ("block_n", "num_warps", "num_stages", "programs")}

  def one(cfg, layout, stage):
    nonlocal ref
    row = {"ctx": shape[0], "H": shape[1], "G": shape[2], "B": shape[3], "bits": bits,
           "stage": stage, "layout": layout,
           **{k: cfg[k] for k in (*default, "fold_scales", "f16_codes")},
           "nibble_halves": cfg.get("nibble_halves", kd.NIBBLE_HALVES), "floor_us": floor_us,
           "default": stage == 0}
    try:
      us, out = time_variant(torch, kd, shape, bits, cfg, layout, bufs)
      if ref is None:
        ref = out
      row["rel_err"] = float((out - ref).norm() / ref.norm())
      row.update(us=us, x_floor=us / floor_us, GBps=nbytes / (us / 1e6) / 1e9)
    except Exception as e:  # noqa: BLE001 - a config that does not compile or fit
      row["error"] = repr(e)[:200]
    rows.append(row)
    print(json.dumps(row), flush=True)

  today = kd.decode_config(bit_pair(bits))  # what the model runs: DECODE_CONFIG + overrides
  one(dict(today, f16_codes=today.get("f16_codes", kd.F16_CODES_DEFAULT)), "BSH", 0)
  if variants is not None:  # --variants: these overrides of today's config, nothing else
    for ov in variants:
      one({**today, "f16_codes": today.get("f16_codes", kd.F16_CODES_DEFAULT), **ov}, "BSH", 1)
    return rows
  base = dict(kd.DECODE_CONFIG, max_splits=256, fold_scales=False)
  for f16_on in f16:
    for bn, w, st, p in grid:
      one(dict(base, block_n=bn, num_warps=w, num_stages=st, programs=p, f16_codes=f16_on),
          "BSH", 1)
  top = sorted([r for r in rows if "us" in r and r["stage"] == 1 and not r["f16_codes"]],
               key=lambda r: r["us"])[:1 if DEV == "cpu" else TOP]
  for r in top if layouts else ():  # fold and layouts apply to the converting path
    cfg = dict(base, block_n=r["block_n"], num_warps=r["num_warps"],
               num_stages=r["num_stages"], programs=r["programs"], f16_codes=False)
    for fold in (False, True):
      for layout in LAYOUTS:
        if not fold and layout == "BSH":
          continue  # stage 1 timed it
        one(dict(cfg, fold_scales=fold), layout, 2)
  return rows


def format_table(rows, meta):
  lines = [f"{meta['device']}, {meta['date']}, copy {meta['copy_GBps']:.0f} GB/s; "
           "kernel + merge in a CUDA graph", "",
           "| ctx x H x G, B | bits | variant | us | x floor | GB/s |", "|---|---|---|---|---|---|"]
  groups = {}
  for r in rows:
    groups.setdefault((r["ctx"], r["H"], r["G"], r["B"], r["bits"]), []).append(r)
  for (ctx, h, g, b, bits), rs in groups.items():
    ok = [r for r in rs if "us" in r]
    pick = [r for r in ok if r["default"]][:1] + sorted(ok, key=lambda r: r["us"])[:8]
    for r in pick:
      name = (f"bn {r['block_n']} w {r['num_warps']} st {r['num_stages']} p {r['programs']} "
              f"{r['layout']}{' fold' if r['fold_scales'] else ''}"
              f"{' f16 codes, halves ' + repr(r['nibble_halves']) if r['f16_codes'] else ''}"
              f"{' (default)' if r['default'] else ''}")
      lines.append(f"| {ctx // K}K x {h} x {g}, {b} | {bits} | {name} | {r['us']:.1f} | "
                   f"{r['x_floor']:.2f} | {r['GBps']:.0f} |")
  return "\n".join(lines) + "\n"


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = {}
  for r in rows:
    if "us" in r:
      groups.setdefault((r["ctx"], r["H"], r["G"], r["B"], r["bits"]), []).append(r)
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
  for ax, (key, rs) in zip(axes[0], groups.items()):
    xs = sorted(rs, key=lambda r: r["x_floor"])
    colors = ["tab:red" if r["default"] else "tab:orange" if r["f16_codes"]
              else "tab:blue" if r["stage"] < 2 else "tab:green" for r in xs]
    ax.bar(range(len(xs)), [r["x_floor"] for r in xs], color=colors)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_title(f"{key[4] if key[4] == 'k8v4' else f'int{key[4]}'}, {key[0] // K}K x {key[1]} "
                 f"heads x G {key[2]}, B {key[3]}")
    ax.set_ylabel("time / floor")
    ax.set_xlabel("variants, fastest first (red: default, orange: fp16 codes, "
                  "green: layouts / fold)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--shapes", default="1024,4,4,1",
                  help="ctx in K tokens, KV heads, G, batch; ';' between shapes")
  ap.add_argument("--bits", default="8,4", help="code widths: 8, 4, k8v4 (int8 keys, int4 "
                  "values)")
  ap.add_argument("--f16-codes", choices=("both", "on", "off"), default="both",
                  help="time the stage-1 grid with fp16 codes, the int -> float convert, or both")
  ap.add_argument("--no-layouts", action="store_true", help="skip stage 2 (fold x layouts)")
  ap.add_argument("--variants", default=None,
                  help='instead of the grid: a JSON list of overrides of the default config, '
                  'e.g. \'[{"nibble_halves": "kv"}, {"f16_codes": false, "block_n": 64}]\'')
  ap.add_argument("--small-grid", action="store_true", help="12 stage-1 variants, not 36")
  ap.add_argument("--top", type=int, default=3, help="stage-1 variants taken into stage 2")
  ap.add_argument("--smoke", action="store_true",
                  help="CPU, through Triton's interpreter (TRITON_INTERPRET=1): a tiny shape, "
                       "two variants; checks the script and that every layout gives the same "
                       "output, times nothing")
  args = ap.parse_args(argv)
  import torch
  global DEV, TOP
  TOP = args.top
  if args.smoke:
    if os.environ.get("TRITON_INTERPRET") != "1":
      raise SystemExit("--smoke runs on Triton's interpreter: set TRITON_INTERPRET=1")
    DEV = "cpu"
    from duojax.kernels.gpu.launch import patch_interpreter_scalars
    patch_interpreter_scalars()
  os.environ["TRITON_CACHE_DIR"] = "/tmp/triton_cache"
  from duojax.kernels.gpu import decode as kd
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  meta = {"device": "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name(), "date":
          datetime.datetime.now().isoformat(timespec="seconds"),
          "command": " ".join(["python -m infer.bench_quant_variants"] + (argv or sys.argv[1:]))}
  meta["copy_GBps"] = copy_GBps(torch)
  print(json.dumps(meta), flush=True)
  grid = [(bn, w, st, p) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)
          for p in (264, 528, 1056)]
  if args.small_grid:
    grid = [(bn, w, 2, p) for bn in (64, 128) for w in (4, 8) for p in (264, 528, 1056)]
  if args.smoke:
    grid, args.shapes = [(64, 4, 2, 264), (32, 4, 2, 528)], "1,2,2,2"
  variants = json.loads(args.variants) if args.variants else None
  if variants is not None and not (isinstance(variants, list)
                                   and all(isinstance(v, dict) for v in variants)):
    raise SystemExit("--variants: a JSON list of objects, e.g. '[{\"block_n\": 64}]'")
  rows = []
  for spec in args.shapes.split(";"):
    ctx, h, g, b = (int(x) for x in spec.split(","))
    for bits in args.bits.split(","):
      bits = bits if bits == "k8v4" else int(bits)
      f16 = {"both": (True, False), "on": (True,), "off": (False,)}[args.f16_codes]
      rows += run_shape(torch, kd, (ctx * K, h, g, b), bits, meta["copy_GBps"] * 1e9, grid, f16,
                        not args.no_layouts, variants)
      if DEV == "cuda":
        torch.cuda.empty_cache()
  (out / "quant_variants.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  table = format_table(rows, meta)
  (out / "quant_variants.md").write_text(table)
  plot(rows, out / "quant_variants.png")
  print(table)


if __name__ == "__main__":
  main()
