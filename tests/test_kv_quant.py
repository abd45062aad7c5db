"""Quantised KV cache (duojax.kv_quant; init_cache(..., kv_dtype="int8" | "int4")).

The quantiser is checked against a float64 numpy oracle written out here (not the module's
own helpers), the cache writes against a plain fp32 cache quantised afterwards by that
oracle, the attention against a numpy loop oracle over the oracle's dequantised values, and
whole tiny models against the unquantised fp32 cache. The Pallas TPU kernels reading the
quantised cache are checked in tests/test_kernels_tpu.py (interpret mode on CPU).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax import cache as kvc
from duojax import kv_quant as kq
from duojax.attention import reference as ref
from duojax.config import tiny_config
from duojax.engine import SamplingSettings, forward_logits, generate
from duojax.model import llama
from duojax.pattern import HeadMask
from helpers import random_params

ROOT = Path(__file__).resolve().parents[1]


# -- the oracle (float64 numpy) -------------------------------------------------------------

def np_quantize(x, bits):
  """codes in [0, 2^bits - 1], scale, min per last-axis group: x ~ code * scale + min."""
  x = np.asarray(x, np.float64)
  levels = 2 ** bits - 1
  lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
  scale = (hi - lo) / levels
  safe = np.where(scale > 0, scale, 1.0)
  codes = np.clip(np.floor((x - lo) / safe + 0.5), 0, levels).astype(np.int64)
  return codes, scale, lo


def np_dequantize(codes, scale, lo):
  return codes * scale + lo


def np_pack_int4(codes):
  """Byte i of a group = code i + 16 * code (i + D/2), element by element."""
  *lead, d = codes.shape
  flat = codes.reshape(-1, d)
  out = np.zeros((flat.shape[0], d // 2), np.uint8)
  for r in range(flat.shape[0]):
    for i in range(d // 2):
      out[r, i] = int(flat[r, i]) + 16 * int(flat[r, i + d // 2])
  return out.reshape(*lead, d // 2)


def ours_codes(q: kq.QuantKV) -> np.ndarray:
  """Our codes on the oracle's 0..levels scale (int8 storage is shifted by 128)."""
  c = np.asarray(kq.codes_of(q), np.int64)
  return c + 128 if q.bits == 8 else c


def np_attention(q, k, v, visible):
  """q [T, G, D], k/v [S, D], visible [T, S] -> [T, G, D] (rows with no key: 0)."""
  out = np.zeros(q.shape)
  for t in range(q.shape[0]):
    idx = np.nonzero(visible[t])[0]
    if not len(idx):
      continue
    for g in range(q.shape[1]):
      s = k[idx] @ q[t, g] / np.sqrt(q.shape[-1])
      p = np.exp(s - s.max())
      out[t, g] = (p / p.sum()) @ v[idx]
  return out


# -- quantise / dequantise / pack -------------------------------------------------------------

@pytest.mark.parametrize("bits,shape", [(8, (3, 7, 2, 9)), (8, (2, 5, 3, 64)), (4, (3, 7, 2, 6)),
                                        (4, (2, 5, 3, 64))])
def test_round_trip_matches_the_oracle_within_half_a_step(bits, shape):
  rng = np.random.default_rng(bits + shape[-1])
  x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.1, 10, shape[:-1] + (1,))
  q = kq.quantize(jnp.asarray(x), bits)
  codes, scale, lo = np_quantize(x, bits)
  assert q.codes.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
  assert q.codes.shape == shape[:-1] + ((shape[-1],) if bits == 8 else (shape[-1] // 2,))
  assert q.scale.shape == q.zero.shape == shape[:-1] + (1,) and q.scale.dtype == jnp.float32
  assert q.shape == shape
  np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
  got = np.asarray(kq.dequantize(q), np.float64)
  # the bound, with the stored (fp32) scale; a few ulps of x for fp32 arithmetic
  slack = 4e-7 * np.abs(x).max(-1, keepdims=True)
  assert (np.abs(x - got) <= np.asarray(q.scale) / 2 + slack).all()
  # the same codes as the oracle, but for ties that fp32 rounds the other way
  diff = np.abs(ours_codes(q) - codes)
  assert diff.max() <= 1 and (diff == 0).mean() > 0.999
  want = np_dequantize(ours_codes(q), scale, lo)
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(x).max())


def test_int4_packing_is_exact():
  rng = np.random.default_rng(1)
  codes = rng.integers(0, 16, (4, 3, 2, 10))
  packed = kq.pack_int4(jnp.asarray(codes))
  assert packed.dtype == jnp.uint8 and packed.shape == (4, 3, 2, 5)
  np.testing.assert_array_equal(np.asarray(packed), np_pack_int4(codes))
  np.testing.assert_array_equal(np.asarray(kq.unpack_int4(packed)), codes)


@pytest.mark.parametrize("bits", [8, 4])
def test_constant_groups_and_zeros_are_exact(bits):
  x = np.zeros((2, 3, 1, 8), np.float32)
  x[0, 1] = 3.25
  x[1, 2] = -7.0
  q = kq.quantize(jnp.asarray(x), bits)
  np.testing.assert_array_equal(np.asarray(kq.dequantize(q)), x)
  assert not np.asarray(q.scale).any()
  # an empty buffer dequantises to zeros
  np.testing.assert_array_equal(np.asarray(kq.dequantize(kq.empty((2, 3, 1, 8), bits))), 0)


def test_bad_kv_dtypes_get_clear_errors():
  with pytest.raises(ValueError, match="kv_dtype must be one of bf16, fp32, int8, int4, k8v4"):
    kvc.init_cache(tiny_config(), 1, 8, kv_dtype="int2")
  with pytest.raises(ValueError, match="head_dim=7 is odd: use kv_dtype int8"):
    kq.empty((1, 8, 2, 7), 4)  # (model configs have even head dims: RoPE)
  mask = HeadMask.from_array(np.array([[True, False]] * 3), 2, 3)
  import duojax.compensation  # noqa: F401
  with pytest.raises(ValueError, match="compensation token.*kv_dtype bf16"):
    kvc.init_cache(tiny_config(), 1, 8, mask, compensation=True, kv_dtype="int8")


# -- cache layout and bytes ----------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", [None, "bf16", "int8", "int4", "k8v4"])
@pytest.mark.parametrize("duo", [False, True])
def test_kv_cache_bytes_are_the_allocated_bytes(kv_dtype, duo):
  cfg = tiny_config(head_dim=16)  # 3 layers, 2 KV heads
  mask = HeadMask.from_array(np.array([[True, False], [False, False], [True, True]]), 3, 5) \
      if duo else None
  b, cap = 3, 40
  cache = kvc.init_cache(cfg, b, cap, mask, jnp.float32, kv_dtype=kv_dtype)
  nbytes = kvc.kv_cache_bytes(cfg, mask, cap, b, jnp.float32, kv_dtype=kv_dtype)
  assert nbytes == kvc.cache_nbytes(cache)
  # by hand: bytes per (token, KV head) of k or v
  d = cfg.head_dim
  per_k = {None: 4 * d, "bf16": 2 * d, "int8": d + 8, "int4": d // 2 + 8, "k8v4": d + 8}
  per_v = dict(per_k, k8v4=d // 2 + 8)  # k8v4: int8 keys, int4 values
  slots = cap * cfg.num_layers * cfg.num_kv_heads if not duo else (cap * 3 + 8 * 3)
  assert nbytes == b * 4 + b * slots * (per_k[kv_dtype] + per_v[kv_dtype])
  if kv_dtype in ("int8", "int4", "k8v4"):
    part = cache.layers[0].full if duo else cache.layers[0]
    assert isinstance(part.k, kq.QuantKV) and part.k.shape == (b, cap, 1 if duo else 2, d)
    assert (part.k.bits, part.v.bits) == {"int8": (8, 8), "int4": (4, 4), "k8v4": (8, 4)}[kv_dtype]
    assert part.v.shape == part.k.shape


# -- writes ------------------------------------------------------------------------------------

def _oracle_roundtrip(x, bits):
  return np_dequantize(*np_quantize(x, bits))


# (key bits, value bits): int8, int4, and k8v4's int8 keys beside int4 values
BIT_PAIRS = [(8, 8), (4, 4), (8, 4)]


@pytest.mark.parametrize("kb,vb", BIT_PAIRS)
def test_writes_quantise_each_token_ragged(kb, vb):
  """Two ragged chunks into a full cache and a streaming ring (chunk longer than the ring):
  the quantised cache holds what the fp32 cache holds, quantised slot by slot."""
  rng = np.random.default_rng(kb + vb)
  b, t, h, d, s = 3, 7, 2, 6, 20
  sink, recent = 2, 3
  full_q = kvc.FullLayerCache(kq.empty((b, s, h, d), kb), kq.empty((b, s, h, d), vb))
  full_f = kvc.FullLayerCache(jnp.zeros((b, s, h, d)), jnp.zeros((b, s, h, d)))
  w = (b, sink + recent, h, d)
  st_q = kvc.StreamLayerCache(kq.empty(w, kb), kq.empty(w, vb), sink, recent)
  st_f = kvc.StreamLayerCache(jnp.zeros(w), jnp.zeros(w), sink, recent)
  start = jnp.zeros((b,), jnp.int32)
  for n_valid in (jnp.array([7, 3, 0]), jnp.array([5, 7, 2])):
    k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(2))
    full_q, full_f = (kvc.write_full(c, k, v, start, n_valid) for c in (full_q, full_f))
    st_q, st_f = (kvc.write_stream(c, k, v, start, n_valid) for c in (st_q, st_f))
    start = start + n_valid
  for cq, cf in ((full_q, full_f), (st_q, st_f)):
    for xq, xf, bits in ((cq.k, cf.k, kb), (cq.v, cf.v, vb)):
      assert isinstance(xq, kq.QuantKV) and xq.bits == bits
      np.testing.assert_allclose(np.asarray(kq.dequantize(xq)),
                                 _oracle_roundtrip(np.asarray(xf), bits), atol=1e-5)
  assert np.asarray(full_f.k)[2, 2:].sum() == 0  # row 2 holds 2 tokens: the rest untouched


# -- attention over the quantised cache (the xla reference) -------------------------------------

@pytest.mark.parametrize("kb,vb", BIT_PAIRS)
@pytest.mark.parametrize("h,g", [(2, 3), (3, 1)])  # GQA, MHA
def test_reference_reads_the_dequantised_cache(kb, vb, h, g):
  rng = np.random.default_rng(10 * kb + vb + h)
  b, t, d, s = 3, 3, 8, 13
  q = rng.standard_normal((b, t, h, g, d)).astype(np.float32)
  kf, vf = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(2))
  kv_len = np.array([13, 5, 9])
  q_pos = kv_len[:, None] - t + np.arange(t)[None]
  out = ref.full_chunk_attention(jnp.asarray(q), kq.quantize(jnp.asarray(kf), kb),
                                 kq.quantize(jnp.asarray(vf), vb), jnp.asarray(q_pos),
                                 jnp.asarray(kv_len))
  kd, vd = _oracle_roundtrip(kf, kb), _oracle_roundtrip(vf, vb)
  want = np.zeros(q.shape)
  for bi in range(b):
    vis = (np.arange(s)[None] <= q_pos[bi][:, None]) & (np.arange(s)[None] < kv_len[bi])
    for hi in range(h):
      want[bi, :, hi] = np_attention(q[bi, :, hi], kd[bi, :, hi], vd[bi, :, hi], vis)
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-5)


# -- whole models ---------------------------------------------------------------------------------

CFG = tiny_config(num_layers=2, head_dim=32)  # 6 query / 2 KV heads (GQA)
CFG_MHA = tiny_config(num_layers=2, num_heads=2, num_kv_heads=2, head_dim=32)
DUO = HeadMask.from_array(np.array([[True, False], [False, False]]), 3, 5)  # duo; streaming
PROMPTS = [23, 11, 17]  # ragged, odd; chunk 8 -> 3 chunks
# max |logits - fp32 cache's| / max |fp32 cache's|. Measured on these models: bf16 KV
# 0.3-0.5%, int8 0.9-1.0%, int4 16-20% (int4 at head dim 32 is coarse; random weights at
# scale 0.3 amplify every error ~4x, at 0.1 less so).
TOL = {"bf16": 1e-2, "int8": 3e-2, "int4": 0.4, "k8v4": 0.4}


def _model(cfg, mask, seed=0):
  p = random_params(cfg, seed, 0.1)
  return p if mask is None else llama.apply_head_mask(p, mask)


def _prompts(cfg, seed=1):
  rng = np.random.default_rng(seed)
  return [list(map(int, rng.integers(3, cfg.vocab_size, n))) for n in PROMPTS]


@pytest.mark.parametrize("cfg", [CFG, CFG_MHA], ids=["gqa", "mha"])
def test_duo_model_logits_close_to_the_fp32_cache(cfg):
  """Chunked prefill of a ragged batch through a split cache (layer 0: one retrieval and one
  streaming head; layer 1: streaming only) with every kv dtype."""
  params, prompts = _model(cfg, DUO), _prompts(cfg)
  base = forward_logits(params, cfg, prompts, DUO, chunk=8, dtype=jnp.float32)
  err = {}
  for kv in ("bf16", "int8", "int4", "k8v4"):
    got = forward_logits(params, cfg, prompts, DUO, chunk=8, dtype=jnp.float32, kv_dtype=kv)
    err[kv] = max(np.abs(a - w).max() / np.abs(w).max() for a, w in zip(got, base))
    assert err[kv] <= TOL[kv], (kv, err)
  assert err["int8"] < err["int4"]  # more bits, closer (and not a check of zeros)
  # int4 values cost k8v4 more than int8; on random weights (no outlier key channels) its
  # int8 keys need not beat int4's: that gain is measured on real models
  # (infer/kv_quant_error.py)
  assert err["int8"] < err["k8v4"], err
  assert err["int4"] > 0


def test_greedy_decode_int8_gives_the_fp32_tokens():
  """Prefill + greedy decode with full attention (retrieval caches only): int8 KV gives the
  fp32 cache's tokens on this tiny model (held here; it need not for every model), its
  logits within TOL, and reports the real bytes."""
  prompts = _prompts(CFG, 3)
  params = _model(CFG, None, 2)
  want = generate(params, CFG, prompts, 6, None, 8, SamplingSettings(), cache_dtype=jnp.float32)
  got = generate(params, CFG, prompts, 6, None, 8, SamplingSettings(), cache_dtype=jnp.float32,
                 kv_dtype="int8")
  assert got.tokens == want.tokens
  assert len({tuple(t) for t in got.tokens}) > 1  # rows decode different tokens
  assert got.kv_cache_bytes == kvc.kv_cache_bytes(CFG, None, 32, 3, kv_dtype="int8")
  assert got.kv_cache_bytes < want.kv_cache_bytes / 3  # 32 + 8 bytes vs 4 * 32 per value row
  lg = forward_logits(params, CFG, prompts, None, chunk=8, dtype=jnp.float32, kv_dtype="int8")
  base = forward_logits(params, CFG, prompts, None, chunk=8, dtype=jnp.float32)
  assert max(np.abs(a - w).max() / np.abs(w).max() for a, w in zip(lg, base)) <= TOL["int8"]


def test_quantised_cache_on_a_sequence_sharded_mesh():
  """8 fake CPU devices: an int8 cache split over data=2, sequence=2, tensor=2 (the
  context-parallel writes and attention) gives the one-device int8 tokens and logits;
  the scales are sharded like the values."""
  code = r'''
import json, warnings
import jax, jax.numpy as jnp, numpy as np
from duojax import cache as kvc, engine, sharding as sh
from duojax.config import tiny_config
from duojax.model import handle as model_handle, llama
from duojax.pattern import HeadMask
import sys; sys.path.insert(0, "tests")
from helpers import random_params
cfg = tiny_config(num_layers=2, head_dim=16)
mask = HeadMask.from_array(np.array([[True, False], [True, True]]), 2, 4)
h = model_handle.from_params(cfg, random_params(cfg, 5, 0.3), mask)
r = np.random.default_rng(0)
prompts = [list(map(int, r.integers(3, 90, n))) for n in (13, 5, 19, 2)]
tokens, lengths = engine.pad_batch(prompts, 8)
out = {}
for name in ("one", "mesh"):
  cache = kvc.init_cache(cfg, 4, 32, mask, jnp.float32, kv_dtype="int8")
  if name == "one":
    last, cache, logits = engine.prefill(h, cfg, tokens, lengths, cache, 8, "xla", all_logits=True)
    toks, _, cache = engine.decode(h, cfg, cache, last, jax.random.PRNGKey(0), 4,
                                   engine.SamplingSettings(), (), "xla")
  else:
    mesh = sh.make_mesh("data=2,sequence=2,tensor=2")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", sh.ShardingWarning)
      hm, cache, pl = engine.place_on_mesh(mesh, h, cfg, cache)
      step = engine.mesh_prefill_step(mesh, pl, hm, cfg, cache, 8, "xla", all_logits=True)
      last, cache, logits = engine.prefill(hm, cfg, tokens, lengths, cache, 8, "xla",
                                           all_logits=True, step=step)
      dec = engine.mesh_decode(mesh, pl, hm, cfg, cache, 4, engine.SamplingSettings(), ())
      toks, _, cache = dec(hm, cache, last, jax.random.PRNGKey(0))
    k = cache.layers[1].k
    out["spec"] = [str(x.sharding.spec) for x in (k.codes, k.scale, k.zero)]
  valid = np.arange(logits.shape[1])[None] < lengths[:, None]
  out[name] = (np.asarray(logits)[valid].tolist(), np.asarray(toks).tolist())
print(json.dumps({"spec": out["spec"], "logit_err": float(np.abs(np.array(out["one"][0]) -
      np.array(out["mesh"][0])).max()), "same_tokens": out["one"][1] == out["mesh"][1]}))
'''
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
  r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  res = json.loads(r.stdout.strip().splitlines()[-1])
  assert res["same_tokens"] and res["logit_err"] < 1e-4, res
  assert len(set(res["spec"])) == 1 and "sequence" in res["spec"][0], res


# -- command lines ------------------------------------------------------------------------------

def test_infer_cli_kv_dtype(tiny_ckpt, capsys):
  """--kv-dtype reaches the cache: the JSON reports it and the real (smaller) bytes."""
  from duojax import infer
  base = ["--ckpt", str(tiny_ckpt), "--prompt", "the", "--max-new-tokens", "3", "--json"]
  sizes = {}
  for kv in ("bf16", "int8", "int4", "k8v4"):
    assert infer.main(base + ["--attention", "full", "--kv-dtype", kv]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["kv_dtype"] == kv and len(info["generated_ids"]) >= 1
    sizes[kv] = info["kv_cache_bytes"]
  # head dim 8 here: int8 codes + fp32 scale and zero (8 + 8 bytes) = bf16's 16 bytes
  assert sizes["int4"] < sizes["k8v4"] < sizes["int8"] <= sizes["bf16"], sizes
  assert infer.main(base + ["--attention", "streaming", "--compensation", "--kv-dtype",
                            "int4"]) == 2
  assert "--kv-dtype bf16" in capsys.readouterr().err
