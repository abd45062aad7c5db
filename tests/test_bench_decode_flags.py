"""infer/bench_decode.py's flags for issues #16 and #18, on CPU with the tiny smoke models:
context suffixes, int8 weights (bytes counted from the shapes here), the mesh and forced
context-parallel paths (greedy tokens equal the plain path's), and the capacity search
(backs off under a small --mem-limit-GiB; the sequence of tries checked against the rule)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infer import bench_decode as bd

REPO = Path(__file__).resolve().parents[1]
TINY = bd.model_configs(True)["tiny-gqa"]  # 2 layers, 8 heads / 4 KV heads, D 16, E 64


@pytest.mark.parametrize("text,tokens", [
    ("128", 131072), ("32", 32768), ("128K", 131072), ("512k", 524288), ("1M", 1048576),
    ("2.5M", 2621440), ("3.3M", 3460301), ("1.5K", 1536), ("0.5", 512), (" 64K ", 65536),
    ("3300000t", 3300000), ("200T", 200), ("1m", 1048576)])
def test_parse_context_exact(text, tokens):
  assert bd.parse_context(text) == tokens


@pytest.mark.parametrize("text", ["1G", "abc", "1.5t", "0", "0.0001", "-1", "", "1M2"])
def test_parse_context_rejects(text):
  with pytest.raises(ValueError, match="context"):
    bd.parse_context(text)


def test_parse_contexts_and_labels():
  assert bd.parse_contexts("32,128K,1M,3.3M") == [32768, 131072, 1048576, 3460301]
  assert [bd.kfmt(n) for n in (1048576, 3 * 1048576, 131072, 3460301, 200)] == [
      "1M", "3M", "128K", "3460301", "200"]


def test_bad_flags_exit_with_the_fix(tmp_path):
  for flags, words in ((["--contexts", "1G"], "--contexts"), (["--kv-dtype", "int2"], "int4"),
                       (["--weights-dtype", "int4"], "bf16, int8"),
                       (["--paths", "plain,tp"], "plain, mesh, cp"),
                       (["--mesh", "seq=2"], "unknown axis")):
    with pytest.raises(SystemExit) as e:
      bd.main(["--out", str(tmp_path), "--smoke", "--no-hf", *flags])
    assert words in str(e.value), (flags, e.value)


def _kv_bytes(mask, ctx, batch=1, item=2):
  """K + V bytes up to ctx: retrieval heads every token, streaming heads sink + recent."""
  d, hkv = TINY.head_dim, TINY.num_kv_heads
  n_r = [hkv if mask is None else int(mask.n_retrieval(l)) for l in range(TINY.num_layers)]
  return sum(2 * item * batch * d * (r * ctx + (hkv - r) * min(ctx, 64 + 256)) for r in n_r)


def _weight_bytes(wd, batch=1):
  """Bytes a decode step reads from the weights, from the shapes: int8 projections are one
  byte a value plus a bf16 scale per output channel; norms and one embedding row bf16."""
  e, f, h, hkv, d, v = (TINY.hidden_size, TINY.intermediate_size, TINY.num_heads,
                        TINY.num_kv_heads, TINY.head_dim, TINY.vocab_size)
  proj = e * h * d + 2 * e * hkv * d + h * d * e + 3 * e * f  # wq, wk, wv, wo, MLP
  scales = h * d + 2 * hkv * d + e + 2 * f + e  # wq, wk, wv per head channel; wo, MLP out
  layer = (proj + 2 * scales if wd == "int8" else 2 * proj) + 2 * 2 * e  # + two norms
  head = e * v + 2 * v if wd == "int8" else 2 * e * v  # untied lm_head
  return TINY.num_layers * layer + 2 * e + head + 2 * batch * e  # final norm, embed rows


def _run(tmp_path, *flags):
  bd.main(["--out", str(tmp_path), "--smoke", "--no-hf", "--models", "tiny-gqa", "--batches",
           "1", "--sparsities", "0.5", "--copy-GBps", "10", *flags])
  return json.loads((tmp_path / "bench_decode.json").read_text())


def test_paths_of_one_device_decode_the_same(tmp_path):
  """plain, mesh sequence=1 and forced context parallelism on it: every row ran, and the
  paths decode the same 16 greedy tokens as the plain path (one device: the mesh path is
  the same program; the cp path's merge of one slice is exact)."""
  doc = _run(tmp_path, "--configs", "duo-0.5", "--paths", "plain,mesh,cp", "--mesh",
             "sequence=1")
  ok = {(r["impl"], r["ctx"]): r for r in doc["rows"] if "ms_per_token" in r}
  impls = ["duojax-xla", "duojax-xla mesh sequence=1", "duojax-xla cp sequence=1"]
  assert set(ok) == {(i, c) for i in impls for c in (64, 200)} and len(doc["rows"]) == 6
  mask = bd.random_mask(TINY, 0.5)
  for (impl, ctx), r in ok.items():
    assert r["ms_per_token"] > 0 and r["config"] == "duo-0.5" and r["kv_dtype"] == "bf16"
    assert r["weight_bytes"] == _weight_bytes("bf16") and r["weights_dtype"] == "bf16"
    assert r["kv_bytes_read"] == _kv_bytes(mask, ctx)
    assert r["floor_ms"] == pytest.approx((r["weight_bytes"] + r["kv_bytes_read"]) / 10e9 * 1e3)
    assert len(r["tokens"]) == 16
  for ctx in (64, 200):
    for impl in impls[1:]:
      assert ok[impl, ctx]["tokens"] == ok["duojax-xla", ctx]["tokens"], (impl, ctx)
  assert ok[impls[2], 64]["attention_backend"] == "ContextParallel(xla)"
  assert ok[impls[1], 64]["attention_backend"] == "xla"  # one device: the name itself
  # the tokens depend on the cache: the two contexts decode differently
  assert ok["duojax-xla", 64]["tokens"] != ok["duojax-xla", 200]["tokens"]
  md = (tmp_path / "bench_decode.md").read_text()
  assert "| duojax-xla cp sequence=1 |" in md and "same greedy tokens" in md


def test_int8_weights_count_int8_bytes(tmp_path):
  """--weights-dtype bf16,int8: both ran (bf16 first, then the int8 build), the int8 rows
  read one byte a projection value plus its scales, and the table compares the two."""
  doc = _run(tmp_path, "--configs", "full", "--weights-dtype", "int8,bf16")
  ok = {(r["weights_dtype"], r["ctx"]): r for r in doc["rows"] if "ms_per_token" in r}
  assert set(ok) == {(w, c) for w in ("bf16", "int8") for c in (64, 200)}
  assert [r["weights_dtype"] for r in doc["rows"]] == ["bf16"] * 2 + ["int8"] * 2
  for (wd, ctx), r in ok.items():
    assert r["weight_bytes"] == _weight_bytes(wd), (wd, r["weight_bytes"])
    assert r["kv_bytes_read"] == _kv_bytes(None, ctx) and r["ms_per_token"] > 0
  assert _weight_bytes("int8") < 0.6 * _weight_bytes("bf16")
  assert "int8 weights against bf16 weights" in (tmp_path / "bench_decode.md").read_text()


def test_mesh_of_four_devices_equals_one(tmp_path):
  """--mesh sequence=4 on 4 fake CPU devices (a child process: the device count is fixed
  when JAX starts): the cache split over sequence runs context parallel and decodes what
  the plain path decodes (int8 KV, so the quantised cache's slices are merged too). The
  first 8 of 16 greedy tokens are compared: the split softmax sums in another order, and in
  bf16 a near-tie late in a random model's run may go either way (on 8 devices with int4
  KV one does at step 12)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  cmd = [sys.executable, "-m", "infer.bench_decode", "--out", str(tmp_path), "--smoke",
         "--no-hf", "--models", "tiny-gqa", "--batches", "1", "--sparsities", "0.5",
         "--configs", "duo-0.5", "--paths", "plain,mesh", "--mesh", "sequence=4",
         "--copy-GBps", "10", "--kv-dtype", "int8"]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  doc = json.loads((tmp_path / "bench_decode.json").read_text())
  assert doc["meta"]["device_count"] == 4
  rows = {(r["impl"], r["ctx"]): r for r in doc["rows"]}
  assert set(rows) == {(i, c) for i in ("duojax-xla", "duojax-xla mesh sequence=4")
                       for c in (64, 200)}
  for ctx in (64, 200):
    plain, mesh = rows["duojax-xla", ctx], rows["duojax-xla mesh sequence=4", ctx]
    assert plain["ms_per_token"] > 0 and mesh["ms_per_token"] > 0
    assert mesh["tokens"][:8] == plain["tokens"][:8], ctx
    assert "ContextParallel" in mesh["attention_backend"] and mesh["capacity"] % 4 == 0
    assert mesh["kv_dtype"] == "int8"


def _capacity_bytes(mask, capacity):
  """init_cache's bytes: bf16 K and V, retrieval parts `capacity` slots, streaming parts
  sink + recent slots, plus the int32 lengths."""
  d, hkv = TINY.head_dim, TINY.num_kv_heads
  total = 4
  for l in range(TINY.num_layers):
    r = int(mask.n_retrieval(l))
    total += 2 * 2 * d * (r * capacity + (hkv - r) * (64 + 256))
  return total


def test_estimate_capacity_against_the_byte_count():
  mask = bd.random_mask(TINY, 0.5)
  limit, base, temp = 3_000_000, 200_000, 100_000
  cap = bd.estimate_capacity(TINY, mask, 1, "bf16", base, temp, limit, 16)
  budget = limit * (1 - bd.HEADROOM) - base - temp
  assert cap % 16 == 0 and _capacity_bytes(mask, cap) <= budget < _capacity_bytes(mask, cap + 16)
  grows = lambda c: temp + 50 * c  # temp as a function of the capacity
  cap2 = bd.estimate_capacity(TINY, mask, 1, "bf16", base, grows, limit, 16)
  assert _capacity_bytes(mask, cap2) + grows(cap2) <= budget + temp
  assert _capacity_bytes(mask, cap2 + 16) + grows(cap2 + 16) > budget + temp
  assert bd.estimate_capacity(TINY, mask, 1, "bf16", limit, temp, limit, 16) == 0


def test_capacity_search_backs_off_under_a_cap(tmp_path, monkeypatch):
  """--capacity with --mem-limit-GiB 0.004 and a start well above what fits: the first try
  fails (estimate over the cap), each next one is --capacity-backoff smaller, until one
  fits and decodes (10% steps here to keep the compiles few; the default is 3%)."""
  monkeypatch.chdir(REPO)  # the search's child runs `python -m infer.bench_decode`
  bd.main(["--out", str(tmp_path), "--capacity", "--smoke", "--models", "tiny-gqa",
           "--batches", "1", "--sparsities", "0.5", "--configs", "duo-0.5", "--steps", "4",
           "--mem-limit-GiB", "0.004", "--capacity-start", "9000t", "--capacity-tries", "8",
           "--capacity-backoff", "0.1", "--copy-GBps", "10"])
  doc = json.loads((tmp_path / "bench_capacity.json").read_text())
  (r,) = doc["rows"]
  cap = int(0.004 * 2**30)
  assert r["limit_bytes"] == cap and r["config"] == "duo-0.5" and "error" not in r, r
  tries = r["tries"]
  assert len(tries) >= 2 and all("over --mem-limit-GiB" in t["error"] for t in tries[:-1])
  want = -(-(9000 + 4 + 16) // 16) * 16
  mask = bd.random_mask(TINY, 0.5)
  for t in tries:
    assert t["capacity"] == want and t["ctx"] == want - 20
    assert t["cache_bytes"] == _capacity_bytes(mask, want)
    assert t["estimate_bytes"] == r["resident_before_bytes"] + t["cache_bytes"] + t["temp_bytes"]
    assert (t["estimate_bytes"] > cap) == ("error" in t)
    want = int(want * 0.9) // 16 * 16
  assert r["ctx"] == tries[-1]["ctx"] and r["ms_per_token"] > 0 and len(r["tokens"]) == 4
  wb, kb = _weight_bytes("bf16"), _kv_bytes(mask, r["ctx"])
  assert r["weight_bytes"] == wb and r["kv_bytes_read"] == kb
  assert r["floor_ms"] == pytest.approx((wb + kb) / 10e9 * 1e3)
  md = (tmp_path / "bench_capacity.md").read_text()
  assert f"| {r['ctx']} |" in md and "duo-0.5" in md


def test_quant_decode_config_overrides_only_its_code_width(monkeypatch):
  """--quant-decode-config: JSON per code width, checked keys; the plans of that width take
  the override, the other width keeps its own QUANT_DECODE_CONFIG and bf16 DECODE_CONFIG."""
  pytest.importorskip("triton")
  import jax.numpy as jnp
  from duojax.kernels.gpu import decode as kd
  cfg = bd.parse_quant_decode_config('{"4": {"block_n": 128, "num_warps": 8}}')
  assert cfg == {4: {"block_n": 128, "num_warps": 8}}
  monkeypatch.setitem(kd.QUANT_DECODE_CONFIG, 4, cfg[4])
  shape_q, shape_k = (1, 1, 4, 4, 128), (1, 8192, 4, 128)
  split4, _ = kd.full_decode_plans(shape_q, shape_k, jnp.bfloat16, bits=4)
  split8, _ = kd.full_decode_plans(shape_q, shape_k, jnp.bfloat16, bits=8)
  split0, _ = kd.full_decode_plans(shape_q, shape_k, jnp.bfloat16)
  assert (split4.consts["BLOCK_N"], split4.num_warps) == (128, 8)
  for s, cfg in ((split8, {**kd.DECODE_CONFIG, **kd.QUANT_DECODE_CONFIG[8]}),
                 (split0, kd.DECODE_CONFIG)):
    assert (s.consts["BLOCK_N"], s.num_warps, s.consts["FOLD"]) == (
        cfg["block_n"], cfg["num_warps"], bool(cfg["fold_scales"]) and s is split8)
  # splits follow the override's block size: 8192 keys / 128 = 64 blocks at most
  assert split4.grid[0] == min(kd.cdiv(kd.DECODE_CONFIG["programs"], 4), 64)
  for bad, msg in [('{"2": {}}', "code widths 8 or 4"), ('{"4": {"blockn": 1}}', "unknown keys"),
                   ("[1]", "JSON object"), ("{4:", "not JSON")]:
    with pytest.raises(SystemExit, match=msg):
      bd.parse_quant_decode_config(bad)


def test_fp16_codes_per_cache_as_measured(monkeypatch):
  """The decode kernels read int4 through fp16 codes (both buffers as nibble halves) and
  int8 / k8v4 through the convert (decode.QUANT_DECODE_CONFIG); fp32 q never; k8v4's own
  entry is what `--quant-decode-config '{"k8v4": ...}'` replaces, and --no-f16-codes turns
  the path off wherever a config does not name it."""
  pytest.importorskip("triton")
  import jax.numpy as jnp
  from duojax.kernels.gpu import decode as kd
  shape_q, shape_k = (1, 1, 4, 4, 128), (1, 8192, 4, 128)
  f16c = lambda bits, dt=jnp.bfloat16: kd.full_decode_plans(shape_q, shape_k, dt,
                                                            bits=bits)[0].consts["F16C"]
  assert (f16c(4), f16c(8), f16c((8, 4)), f16c(4, jnp.float32)) == (1 | 2 | 4, 0, 0, 0)
  cfg = bd.parse_quant_decode_config('{"k8v4": {"block_n": 64, "f16_codes": true}}')
  assert cfg == {(8, 4): {"block_n": 64, "f16_codes": True}}
  monkeypatch.setitem(kd.QUANT_DECODE_CONFIG, (8, 4), cfg[(8, 4)])
  assert f16c((8, 4)) == 7 and f16c(4) == 7  # (the key halves bit: int4 keys only)
  monkeypatch.setitem(kd.QUANT_DECODE_CONFIG, 4, {"block_n": 128})
  monkeypatch.setattr(kd, "F16_CODES_DEFAULT", False)
  assert f16c(4) == 0


def test_plot_has_a_panel_per_batch_size(tmp_path):
  """Batch 16 rows get their own panel beside batch 1 (issue 18 asks for both in the plot):
  two panels make the PNG twice as wide as one."""
  import matplotlib.image as mpimg
  def row(b, ctx, ms):
    return {"model": "llama3-8b", "batch": b, "ctx": ctx, "config": "full", "kv_dtype": "bf16",
            "weights_dtype": "bf16", "impl": "duojax-gpu", "ms_per_token": ms, "floor_ms": ms / 2}
  peer = [{"model": "llama3-8b", "batch": 16, "ctx": 32768, "impl": "torch-sdpa-cudagraph",
           "ms_per_token": 24.0}]
  one, two = tmp_path / "one.png", tmp_path / "two.png"
  bd.plot([row(1, 32768, 5.0), row(1, 131072, 8.0)], peer, one)
  bd.plot([row(1, 32768, 5.0), row(1, 131072, 8.0), row(16, 32768, 20.0)], peer, two)
  w1, w2 = mpimg.imread(one).shape[1], mpimg.imread(two).shape[1]
  assert w2 == 2 * w1, (w1, w2)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("triton"),
                    reason="triton is not installed")
def test_fused_write_is_in_the_gpu_table_unless_turned_off(monkeypatch):
  """The gpu backend's table holds the in-launch cache-write ops by default (measured
  faster), DUOJAX_FUSED_WRITE=0 takes them out, and bench_decode's --no-fused-write
  backend drops them and nothing else."""
  from duojax.attention import dispatch
  from duojax.kernels import gpu as kg
  write = {"full_decode_write", "duo_decode_write"}
  monkeypatch.delenv("DUOJAX_FUSED_WRITE", raising=False)
  on = kg._ops()
  assert write <= set(on) and write <= set(on["kv_quant"])
  monkeypatch.setenv("DUOJAX_FUSED_WRITE", "0")
  assert not write & set(kg._ops())
  monkeypatch.setattr(dispatch, "backend_ops", lambda name: on)
  monkeypatch.setattr(dispatch, "resolve_backend", lambda name: name)
  got = {}
  monkeypatch.setattr(dispatch, "register_backend", lambda name, ops: got.update({name: ops}))
  assert bd.backend_without("gpu", tuple(write), "nowrite") == "gpu-nowrite"
  assert set(got["gpu-nowrite"]) == set(on) - write
