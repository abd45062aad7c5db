"""Registers, spills and shared memory of the Triton attention kernels, compiled offline.

  python -m infer.kernel_resources --out OUT                 # any machine with triton: no GPU
  python -m infer.kernel_resources --out OUT --arch 90 --kv-dtype int4,k8v4 \\
      --variants '[{}, {"nibble_halves": "kv"}, {"f16_codes": false}]'

Why: the quantised decode kernels ran at 1.4-2.4x their floor while the bf16 one reads at
~95% of the copy bandwidth, and making every code's int -> float convert a bit trick
(fp16 codes) bought only 0-7% (infer/results/h100-2026-12-07-eve/). Compiled for sm_90,
the int4 split-K kernel held 255 registers a thread and spilled 832-1264 bytes to local
memory: the limit is the register file, not the converts. Triton compiles for a GPU
target without one (its bundled ptxas), and cuobjdump reads the cubin's resource usage, so
each tuning choice can be checked here before it is timed on a device.

For each kernel (the split-K decode, the fused duo decode, that kernel as decode_write runs
it with the new token folded in, decode_write's combine, the prefill chunk), KV dtype
and variant (overrides of the kernel's config, as bench_quant_variants takes them) it
prints REG (registers a thread), STACK (bytes of local memory a thread: spills) and
SHARED, and writes kernel_resources.json / .md into --out. The figures are those of the
triton installed here; another triton version may allocate differently.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KINDS = ("full_decode", "duo_decode", "duo_decode_new", "combine_write", "full_chunk")
# Llama-3-8B's head shape: 8 KV heads of 128, G = 4; a duo layer half retrieval heads
SHAPE = dict(b=1, h=4, g=4, d=128, s=1 << 20, w=320, t=4096)


def _code_type(bits: int) -> str:
  return {0: "*bf16", 8: "*i8", 4: "*u8"}[bits]


def _buffer(prefix: str, bits: int, kb: int) -> dict:
  """Triton pointer types of one cache buffer's three arguments (codes, scale, zero)."""
  side = "*fp32" if kb else "*bf16"
  return {prefix: _code_type(bits), prefix + "S": side, prefix + "Z": side}


def plan(kind: str, bits, cfg: dict | None):
  """(Launch, {pointer argument: triton type}) of one kernel at SHAPE."""
  import jax.numpy as jnp
  from duojax.kernels.gpu import decode as kd, prefill as kp
  kb, vb = kd.bit_pair(bits)
  b, h, g, d, s, w, t = (SHAPE[k] for k in "bhgdswt")
  bf = jnp.bfloat16
  if kind == "full_decode":
    cfg = None if cfg is None else {**kd.decode_config(bits), **cfg}
    launch, _ = kd.full_decode_plans((b, 1, h, g, d), (b, s, h, d), bf, cfg, bits)
    ptr = {"Q": "*bf16", **_buffer("K", kb, kb), **_buffer("V", vb, kb), "QPOS": "*i32",
           "KVLEN": "*i32", "OP": "*fp32", "MP": "*fp32", "LP": "*fp32"}
  elif kind in ("duo_decode", "duo_decode_new"):
    # duo_decode_new: the split kernel of decode_write (NEW: the new token folded in by split 0)
    cfg = None if cfg is None else {**kd.decode_config(bits), **cfg}
    launch, _ = kd.duo_decode_plans((b, 1, 2 * h, g, d), (b, s, h, d), (b, w, h, d), bf, 64,
                                    256, cfg, bits=bits, new=kind == "duo_decode_new")
    ptr = {"Q": "*bf16", **_buffer("K", kb, kb), **_buffer("V", vb, kb), "QPOS": "*i32",
           "KVLEN": "*i32", "SPOS": "*i32", "NVALID": "*i32", "OP": "*fp32", "MP": "*fp32",
           "LP": "*fp32"}
    side = "*fp32" if kb else "*bf16"
    ptr.update(SK=_code_type(kb), SKS_=side, SKZ=side, SV=_code_type(vb), SVS_=side, SVZ=side,
               KN=_code_type(kb), KNS=side, KNZ=side, VN=_code_type(vb), VNS=side, VNZ=side)
  elif kind == "combine_write":
    # decode_write's combine for a duo layer: merges the splits, writes the token in place
    def parts(n, x):  # (shape, dtype, triton type) of a buffer's codes[, scale, zero]
      codes = ((b, n, h, d // 2 if x == 4 else d), {0: bf, 8: jnp.int8, 4: jnp.uint8}[x],
               _code_type(x))
      return [codes] + ([((b, n, h, 1), jnp.float32, "*fp32")] * 2 if kb else [])
    new = parts(1, kb) + parts(1, vb)
    bufs = parts(s, kb) + parts(s, vb) + parts(w, kb) + parts(w, vb)
    ns = kd.n_splits(b, h, s, kd.decode_config(bits))
    launch = kd.combine_write_plan((b, 1, 2 * h, g, d), bf, h, ns,
                                   [(shape, dt) for shape, dt, _ in bufs], 64, 256, bits)
    types = (["*fp32"] * 3 + ["*i32"] * 2 + [t for *_, t in new + bufs] + ["*bf16"]
             + [t for *_, t in bufs])
    ptr = dict(zip([n for n in launch.kernel.arg_names if n not in launch.consts], types))
  elif kind == "full_chunk":
    cfg = None if cfg is None else {**kp.FULL_CHUNK_CONFIG, **cfg}
    launch = kp.full_chunk_plan((b, t, h, g, d), (b, s, h, d), bf, cfg, bits=bits)
    ptr = {"Q": "*bf16", **_buffer("K", kb, kb), **_buffer("V", vb, kb), "QPOS": "*i32",
           "KVLEN": "*i32", "OUT": "*bf16"}
  else:
    raise ValueError(f"kind {kind!r}: one of {', '.join(KINDS)}")
  return launch, ptr


def _tools() -> Path:
  import triton
  return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def resources(kind: str, bits, cfg: dict | None, arch: int) -> dict:
  """Compile one kernel for sm_<arch> and read its resource usage from the cubin."""
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource
  launch, ptr = plan(kind, bits, cfg)
  names = launch.kernel.arg_names
  missing = [n for n in names if n not in ptr and n not in launch.consts]
  if missing:
    raise RuntimeError(f"{kind}: no type for kernel arguments {missing}")
  src = ASTSource(launch.kernel, {n: ptr.get(n, "constexpr") for n in names},
                  constexprs={n: launch.consts[n] for n in names if n not in ptr})
  k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                     options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
  with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(k.asm["cubin"])
    f.flush()
    out = subprocess.run([str(_tools() / "cuobjdump"), "-res-usage", f.name],
                         capture_output=True, text=True, check=True).stdout
  use = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", out))
  return {k.lower(): int(v) for k, v in use.items()} | {
      "num_warps": launch.num_warps, "num_stages": launch.num_stages,
      "F16C": launch.consts.get("F16C")}


def parse_bits(name: str):
  from duojax import kv_quant
  if name == "bf16":
    return 0
  if name not in kv_quant.BITS:
    raise SystemExit(f"--kv-dtype: {name!r} is not one of bf16, {', '.join(kv_quant.BITS)}")
  kb, vb = kv_quant.BITS[name]
  return kb if kb == vb else (kb, vb)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
  ap.add_argument("--kinds", default=",".join(KINDS))
  ap.add_argument("--kv-dtype", default="bf16,int8,int4,k8v4")
  ap.add_argument("--variants", default="[{}]",
                  help="JSON list of config overrides per kernel ({}: the defaults)")
  args = ap.parse_args(argv)
  try:
    import triton  # noqa: F401
  except ImportError:
    raise SystemExit("kernel_resources needs triton (pip install triton)") from None
  variants = json.loads(args.variants)
  if not (isinstance(variants, list) and all(isinstance(v, dict) for v in variants)):
    raise SystemExit("--variants: a JSON list of objects, e.g. '[{}, {\"block_n\": 64}]'")
  kinds = args.kinds.split(",")
  bad = sorted(set(kinds) - set(KINDS))
  if bad:
    raise SystemExit(f"--kinds: unknown {bad}; choose from {', '.join(KINDS)}")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  import triton
  rows = []
  for kind in kinds:
    for name in args.kv_dtype.split(","):
      bits = parse_bits(name)
      for ov in variants:
        if not bits and ov:
          continue  # the overrides tune the quantised paths
        row = {"kernel": kind, "kv_dtype": name, "variant": ov}
        try:
          row.update(resources(kind, bits, ov or None, args.arch))
        except Exception as e:  # noqa: BLE001 - a variant that does not compile: reported
          row["error"] = repr(e)[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
  meta = {"arch": args.arch, "triton": triton.__version__, "shape": SHAPE,
          "command": " ".join(["python -m infer.kernel_resources"] + (argv or sys.argv[1:]))}
  (out / "kernel_resources.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  lines = [f"sm_{args.arch}, triton {triton.__version__}; registers a thread (255 is the "
           "most), stack = bytes of local memory a thread (spills)", "",
           "| kernel | KV | variant | warps / stages | REG | STACK | SHARED |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    var = json.dumps(r["variant"]) if r["variant"] else "default"
    if "error" in r:
      lines.append(f"| {r['kernel']} | {r['kv_dtype']} | {var} | - | error | | |")
      continue
    lines.append(f"| {r['kernel']} | {r['kv_dtype']} | {var} | {r['num_warps']} / "
                 f"{r['num_stages']} | {r['reg']} | {r['stack']} | {r['shared']} |")
  (out / "kernel_resources.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
