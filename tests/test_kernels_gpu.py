"""The Triton kernels of `duojax.kernels.gpu` against the plain-jnp reference.

GPU only (every test name holds `gpu`; `pytest -k gpu` selects them); each test
skips without a GPU or without jax-triton, with the reason. Each check draws fresh random inputs,
compares with the reference computed in float32 from the same (rounded) inputs
by ||out - ref|| / ||ref||, and fails on any NaN.
"""

import importlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp


from duojax import cache as kvc  # noqa: E402
from duojax import engine  # noqa: E402
from duojax.attention import dispatch, reference  # noqa: E402
from duojax.config import tiny_config  # noqa: E402
from duojax.model import llama  # noqa: E402
from duojax.pattern import HeadMask  # noqa: E402



def _why_skip() -> str | None:
  """Why these tests cannot run here; None when they can."""
  if jax.default_backend() != "gpu":
    return f"GPU kernels: no GPU here (JAX runs on {jax.default_backend()})"
  try:
    import jax_triton  # noqa: F401
  except ImportError:
    return "GPU kernels: jax-triton is not installed (pip install 'duojax[gpu]')"
  return None


# Skip per test, not at import: `pytest -k gpu` on a CPU machine then lists every GPU test as
# skipped with the reason (and exits 0) instead of collecting nothing.
SKIP = _why_skip()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]
kg = importlib.import_module("duojax.kernels.gpu") if SKIP is None else None

TOL = {jnp.bfloat16: 1e-2, jnp.float16: 5e-3, jnp.float32: 1e-4}
_seed = iter(range(10_000))


def rnd(shape, dtype):
  key = jax.random.PRNGKey(1000 + next(_seed))
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def f32(*xs):
  return [x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in xs]


def kv(shape, bits, which=0, dtype=jnp.bfloat16):
  """A cache buffer: plain random values, or (bits 8 / 4) random values quantised. bits may
  be a (key, value) pair, k8v4's (8, 4): `which` 0 makes a key buffer, 1 a value one."""
  bits = bits if isinstance(bits, int) else bits[which]
  if not bits:
    return rnd(shape, dtype)
  from duojax import kv_quant
  return kv_quant.quantize(rnd(shape, jnp.float32), bits)


def ref(*xs):
  """Inputs as the float32 reference takes them: plain arrays in fp32; a quantised buffer as
  it is (the reference dequantises the same codes, so the comparison isolates the kernels'
  unpacking, scales and zeros)."""
  return [x if hasattr(x, "bits") else x.astype(jnp.float32) for x in xs]


def fresh_jit(f, **kw):
  """jax.jit of a new function object: JAX shares traces between jits of the same function,
  and `quant_path` changes what a trace builds without changing its arguments."""
  return jax.jit(lambda *a: f(*a), **kw)


class quant_path:
  """Inside the block the quantised kernels read their tiles one way, whatever the configs'
  defaults: "f16" codes made fp16 by bit pattern, scales folded around fp16 products
  (`decode._scan_codes`); "fold" codes converted to bf16, scales folded out; "dequant" each
  tile dequantised in fp32 then rounded (the last two: f16_codes off). None: the defaults.
  Prefill kernels have "f16" and "dequant" ("fold" is decode's). Trace with `fresh_jit`."""

  def __init__(self, mode):
    self.mode = mode

  def __enter__(self):
    from duojax.kernels.gpu import decode as kd, prefill as kp
    self.cfgs = [*kd.QUANT_DECODE_CONFIG.values(), kp.FULL_CHUNK_CONFIG, kp.STREAM_CHUNK_CONFIG]
    self.saved = [dict(c) for c in self.cfgs]
    if self.mode is not None:
      for c in self.cfgs:
        c["f16_codes"] = self.mode == "f16"
        c["fold_scales"] = self.mode == "fold"

  def __exit__(self, *exc):
    for c, old in zip(self.cfgs, self.saved):
      c.clear()
      c.update(old)


# (bits, path): plain, int8, int4 and k8v4 (int8 keys, int4 values) caches, the quantised
# ones read each way their tiles can be (`quant_path`)
K8V4 = (8, 4)
QUANT = [(0, None)] + [(b, m) for m in ("f16", "fold", "dequant") for b in (8, 4, K8V4)]
CHUNK_QUANT = [(0, None)] + [(b, m) for m in ("f16", "dequant") for b in (8, 4, K8V4)]


def check(out, want, dtype, valid_rows=None):
  out = np.asarray(out.astype(jnp.float32), np.float64)
  want = np.asarray(want, np.float64)
  if valid_rows is not None:  # [B, T] bool: compare these query rows only
    out, want = out[valid_rows], want[valid_rows]
  assert not np.isnan(out).any(), "NaN in kernel output"
  err = np.linalg.norm(out - want) / max(np.linalg.norm(want), 1e-30)
  assert err < TOL[dtype], f"relative error {err:.3e} >= {TOL[dtype]}"
  return err


SHAPES = [  # (H, G, D): MHA and GQA, D = 64 and 128, and an odd group (SmolLM2's G = 3)
    (4, 1, 64), (2, 4, 128), (3, 3, 64)]
DECODE_SHAPES = SHAPES + [(3, 1, 128), (2, 4, 64)]


@pytest.mark.parametrize("h,g,d", DECODE_SHAPES)
@pytest.mark.parametrize("bits,path", QUANT)
def test_full_decode_gpu(h, g, d, bits, path):
  b, s, dtype = 4, 1037, jnp.bfloat16
  lens = jnp.asarray([1037, 1, 517, 64], jnp.int32)
  q, k, v = rnd((b, 1, h, g, d), dtype), kv((b, s, h, d), bits), kv((b, s, h, d), bits, 1)
  q_pos = (lens - 1)[:, None]
  want = reference.full_chunk_attention(*ref(q, k, v), q_pos, lens)
  with quant_path(path):
    out = fresh_jit(kg.full_decode)(q, k, v, q_pos, lens)
    # the partial route (context parallel's per-device op) reads the same buffers
    m, l, acc = fresh_jit(kg.full_decode_partial)(q, k, v, q_pos, lens)
  check(out, want, dtype)
  check(acc / l[..., None], want, dtype)


def test_full_decode_long_gpu():
  """A long row and a short one in one batch: the split-K ranges follow each row."""
  b, s, h, g, d = 2, 70_001, 2, 4, 128
  lens = jnp.asarray([70_001, 3_001], jnp.int32)
  q, k, v = rnd((b, 1, h, g, d), jnp.bfloat16), rnd((b, s, h, d), jnp.bfloat16), rnd(
      (b, s, h, d), jnp.bfloat16)
  out = jax.jit(kg.full_decode)(q, k, v, (lens - 1)[:, None], lens)
  check(out, reference.full_chunk_attention(*f32(q, k, v), (lens - 1)[:, None], lens),
        jnp.bfloat16)


def test_full_decode_fp32_gpu():
  b, s, h, g, d = 2, 333, 2, 2, 64
  lens = jnp.asarray([333, 100], jnp.int32)
  q, k, v = rnd((b, 1, h, g, d), jnp.float32), rnd((b, s, h, d), jnp.float32), rnd(
      (b, s, h, d), jnp.float32)
  out = jax.jit(kg.full_decode)(q, k, v, (lens - 1)[:, None], lens)
  check(out, reference.full_chunk_attention(q, k, v, (lens - 1)[:, None], lens), jnp.float32)


@pytest.mark.parametrize("h,g,d", SHAPES)
@pytest.mark.parametrize("sink,recent", [(64, 256), (0, 19)])
@pytest.mark.parametrize("bits,path", QUANT)
def test_streaming_decode_gpu(h, g, d, sink, recent, bits, path):
  b, dtype = 5, jnp.bfloat16
  w = sink + recent
  start = jnp.asarray([0, 3, w - 1, w + 5, 10_007], jnp.int32)  # tokens already cached
  q = rnd((b, 1, h, g, d), dtype)
  sk, sv = kv((b, w, h, d), bits), kv((b, w, h, d), bits, 1)
  k, v = kv((b, 1, h, d), bits), kv((b, 1, h, d), bits, 1)
  pos, valid = kvc.stream_slot_positions(start, sink, recent)
  q_pos, n_valid = start[:, None], jnp.ones((b,), jnp.int32)
  args = (pos, valid)
  with quant_path(path):
    out = fresh_jit(kg.streaming_decode, static_argnums=(9, 10))(
        q, sk, sv, *args, k, v, q_pos, n_valid, sink, recent)
  want = reference.streaming_chunk_attention(*ref(q, sk, sv), *args, *ref(k, v), q_pos, n_valid,
                                             sink, recent)
  check(out, want, dtype)


@pytest.mark.parametrize("hr,hs,g,d", [(1, 3, 1, 64), (2, 2, 4, 128), (2, 1, 3, 64),
                                        (5, 3, 1, 128)])
@pytest.mark.parametrize("sink,recent", [(64, 256), (0, 19)])
@pytest.mark.parametrize("bits,path", QUANT)
def test_duo_decode_gpu(hr, hs, g, d, sink, recent, bits, path):
  """The fused launch equals full + streaming references, concatenated."""
  b, s, dtype = 4, 1500, jnp.bfloat16
  w = sink + recent
  lens = jnp.asarray([1500, 1, 333, w + 7], jnp.int32)  # after the new token
  start = lens - 1
  q = rnd((b, 1, hr + hs, g, d), dtype)
  kc, vc = kv((b, s, hr, d), bits), kv((b, s, hr, d), bits, 1)
  sk, sv = kv((b, w, hs, d), bits), kv((b, w, hs, d), bits, 1)
  k, v = kv((b, 1, hr + hs, d), bits), kv((b, 1, hr + hs, d), bits, 1)
  pos, valid = kvc.stream_slot_positions(start, sink, recent)
  args = (start[:, None], lens)
  n_valid = jnp.ones((b,), jnp.int32)
  with quant_path(path):
    out = fresh_jit(kg.duo_decode, static_argnums=(12, 13))(
        q, kc, vc, *args, sk, sv, pos, valid, k, v, n_valid, sink, recent)
  want = reference.duo_decode_attention(*ref(q, kc, vc), *args, *ref(sk, sv), pos, valid,
                                        *ref(k, v), n_valid, sink, recent)
  check(out, want, dtype)


@pytest.mark.parametrize("h,g,d", SHAPES)
@pytest.mark.parametrize("bits,path", CHUNK_QUANT)
def test_full_chunk_gpu(h, g, d, bits, path):
  """Quantised caches never take the tokamax route: the Triton kernel dequantises."""
  b, t, s, dtype = 3, 203, 1300, jnp.bfloat16
  start = jnp.asarray([0, 701, 333], jnp.int32)
  n_valid = jnp.asarray([203, 131, 7], jnp.int32)
  q = rnd((b, t, h, g, d), dtype)
  kc, vc = kv((b, s, h, d), bits), kv((b, s, h, d), bits, 1)
  q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  kv_len = start + n_valid
  with quant_path(path):
    out = fresh_jit(kg.full_chunk)(q, kc, vc, q_pos, kv_len)
  check(out, reference.full_chunk_attention(*ref(q, kc, vc), q_pos, kv_len), dtype)


@pytest.mark.parametrize("h,g,d", SHAPES)
@pytest.mark.parametrize("route", ["triton", "tokamax"])
def test_full_chunk_routes_gpu(h, g, d, route):
  """Both routes of the retrieval heads' chunk on a ragged batch: rows at different
  starts, one with no new token, a chunk over a prefix, bf16."""
  from duojax.kernels.gpu import prefill, tokamax_chunk
  if route == "tokamax" and not tokamax_chunk.available():
    pytest.skip("tokamax is not installed")
  b, t, s, dtype = 3, 256, 2000, jnp.bfloat16
  start = jnp.asarray([0, 1201, 640], jnp.int32)
  n_valid = jnp.asarray([256, 100, 0], jnp.int32)
  q = rnd((b, t, h, g, d), dtype)
  kc, vc = rnd((b, s, h, d), dtype), rnd((b, s, h, d), dtype)
  q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  kv_len = start + n_valid
  fn = prefill.triton_full_chunk if route == "triton" else tokamax_chunk.full_chunk
  out = jax.jit(fn)(q, kc, vc, q_pos, kv_len)
  assert out is not None, "tokamax declined the shape"
  want = reference.full_chunk_attention(*f32(q, kc, vc), q_pos, kv_len)
  live = (jnp.arange(t)[None] < n_valid[:, None])  # rows past n_valid are padding
  check(out, want, dtype, valid_rows=np.asarray(live))


@pytest.mark.parametrize("h,g,d", SHAPES)
@pytest.mark.parametrize("sink,recent", [(64, 256), (16, 37)])
@pytest.mark.parametrize("bits,path", CHUNK_QUANT)
def test_streaming_chunk_gpu(h, g, d, sink, recent, bits, path):
  b, t, dtype = 4, 517, jnp.bfloat16
  w = sink + recent
  start = jnp.asarray([0, 20, 1000, 50_000], jnp.int32)
  n_valid = jnp.asarray([517, 300, 1, 517], jnp.int32)
  q = rnd((b, t, h, g, d), dtype)
  sk, sv = kv((b, w, h, d), bits), kv((b, w, h, d), bits, 1)
  k, v = kv((b, t, h, d), bits), kv((b, t, h, d), bits, 1)
  pos, valid = kvc.stream_slot_positions(start, sink, recent)
  q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  with quant_path(path):
    out = fresh_jit(kg.streaming_chunk, static_argnums=(9, 10))(
        q, sk, sv, pos, valid, k, v, q_pos, n_valid, sink, recent)
  want = reference.streaming_chunk_attention(*ref(q, sk, sv), pos, valid, *ref(k, v), q_pos,
                                             n_valid, sink, recent)
  check(out, want, dtype)


def test_backend_auto_is_gpu():
  assert dispatch.resolve_backend("auto") == "gpu"
  assert "gpu" in dispatch.available_backends()


def _model(dtype, d=16):
  config = tiny_config(head_dim=d, num_heads=8, num_kv_heads=4, hidden_size=64, num_layers=3)
  params = llama.init_params(config, jax.random.PRNGKey(0), dtype)
  mask = HeadMask.from_array(np.array([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], bool),
                             sink=4, recent=16)
  return config, llama.apply_head_mask(params, mask), mask


@pytest.mark.parametrize("use_mask", [False, True])
def test_model_logits_gpu_vs_xla(use_mask):
  """Chunked prefill (several chunks, ragged batch) through the whole model."""
  config, params, mask = _model(jnp.float32)
  mask = mask if use_mask else None
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, config.vocab_size, n)) for n in (75, 23, 50)]
  got = engine.forward_logits(params, config, prompts, mask, chunk=24, backend="gpu")
  want = engine.forward_logits(params, config, prompts, mask, chunk=24, backend="xla")
  for a, b in zip(got, want):
    assert not np.isnan(a).any()
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)


def test_generate_gpu_vs_xla():
  """Prefill + the jitted decode loop: same greedy tokens on both backends."""
  config, params, mask = _model(jnp.float32)
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(3, config.vocab_size, n)) for n in (40, 9)]
  a = engine.generate(params, config, prompts, 12, mask=mask, prefill_chunk=16, backend="gpu")
  b = engine.generate(params, config, prompts, 12, mask=mask, prefill_chunk=16, backend="xla")
  assert a.tokens == b.tokens


@pytest.mark.parametrize("t,dtype", [(1, jnp.bfloat16), (1, jnp.float32), (37, jnp.bfloat16),
                                     (37, jnp.float32)])
def test_triton_partial_route_under_shard_map_gpu(t, dtype):
  """The Triton partial ops (full_decode's split-K partials merged in jnp for t = 1, the
  chunk kernel's unnormalised tile otherwise) as context-parallel's per-device op: under
  shard_map on a 1-device mesh, and on the two halves of the cache merged exactly (the
  later half holds no key of rows 0 and 1: m = -inf there), against the reference."""
  from duojax import context_parallel as cp
  from duojax import sharding
  b, s, h, g, d = 3, 640, 2, 3, 64
  start = jnp.asarray([0, 200, 600], jnp.int32)
  n_valid = jnp.asarray([t, min(t, 5), t], jnp.int32)  # row 0: fewer keys than a half
  q = rnd((b, t, h, g, d), dtype)
  kc, vc = rnd((b, s, h, d), dtype), rnd((b, s, h, d), dtype)
  q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  kv_len = start + n_valid
  want = reference.full_chunk_attention(*f32(q, kc, vc), q_pos, kv_len)
  live = np.asarray(jnp.arange(t)[None] < n_valid[:, None])
  mesh = sharding.make_mesh("sequence=1", jax.devices()[:1])
  op = cp.kernel_partial_op("gpu")
  out = jax.jit(lambda *a: cp.chunk_attention(*a, mesh=mesh, partial_op=op))(
      q, kc, vc, q_pos, kv_len)
  check(out, want, dtype, valid_rows=live)
  half = s // 2
  parts = jax.jit(lambda q, k, v, p, n: [op(q, k[:, o:o + half], v[:, o:o + half], p - o,
                                             jnp.clip(n - o, 0, half)) for o in (0, half)])(
      q, kc, vc, q_pos, kv_len)
  assert np.isneginf(np.asarray(parts[1].m[:2])).all()  # rows 0, 1: nothing in the later half
  assert not np.asarray(parts[1].l[:2]).any()
  merged = cp.finalize(cp.merge_partials(parts), jnp.float32)
  check(merged, want, dtype, valid_rows=live)


# -- quantised caches through the whole model ---------------------------------------------
# (the kernels on int8 / int4 buffers: the `bits` cases of the tests above)

@pytest.mark.parametrize("kv_dtype", ["int8", "int4", "k8v4"])
def test_quant_generate_gpu_vs_xla(kv_dtype):
  """The whole model on a quantised cache: chunked prefill + the decode loop through the
  kernels (the fused duo_decode included) give the reference's greedy tokens."""
  config, params, mask = _model(jnp.float32)
  rng = np.random.default_rng(2)
  prompts = [list(rng.integers(3, config.vocab_size, n)) for n in (40, 9)]
  a = engine.generate(params, config, prompts, 12, mask=mask, prefill_chunk=16, backend="gpu",
                      kv_dtype=kv_dtype)
  b = engine.generate(params, config, prompts, 12, mask=mask, prefill_chunk=16, backend="xla",
                      kv_dtype=kv_dtype)
  assert a.tokens == b.tokens


@pytest.mark.parametrize("kv_dtype", ["int8", "int4", "k8v4"])
def test_quant_logits_bf16_gpu_vs_xla(kv_dtype):
  """A bf16 model on a quantised cache: chunked prefill through the Triton chunk kernels as
  configured (the bf16 compute path, not the fp32 one test_quant_generate_gpu_vs_xla takes)
  matches the XLA reference, which dequantises the same codes, within bf16's tolerance.

  That tolerance depends on the cache: a 4-bit code turns a rounding difference in one
  layer's keys or values into a whole quantisation step in the next layer's, so the same
  XLA model in bf16 and in fp32 differ by 0.5% (bf16 cache), 0.8% (int8) but 3.9-4.7%
  (int4, k8v4) here (measured on CPU). The GPU path may differ from the XLA one by 2%, or by
  as much as bf16 rounding alone moves the XLA model, whichever is larger; a wrong scale,
  zero or nibble moves the logits by far more."""
  config, params, mask = _model(jnp.bfloat16, d=32)
  rng = np.random.default_rng(3)
  prompts = [list(rng.integers(3, config.vocab_size, n)) for n in (75, 23)]
  run = lambda p, backend: engine.forward_logits(p, config, prompts, mask, chunk=24,
                                                 backend=backend, kv_dtype=kv_dtype)
  got, want = run(params, "gpu"), run(params, "xla")
  fp32 = run(jax.tree_util.tree_map(
      lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, params), "xla")
  rel = lambda a, b: np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / (
      np.linalg.norm(np.asarray(b, np.float64)))
  for a, b, c in zip(got, want, fp32):
    assert not np.isnan(np.asarray(a, np.float64)).any()
    assert rel(a, b) < max(2e-2, rel(b, c)), (rel(a, b), rel(b, c))


# -- decode with the cache write in the same launches (decode.decode_write) ---------------

@pytest.mark.parametrize("hr,hs,g,d", [(2, 2, 4, 128), (3, 0, 3, 64), (1, 3, 1, 64)])
@pytest.mark.parametrize("bits,path", [(0, None), (8, None), (4, None), (K8V4, None),
                                       (4, "dequant")])
def test_decode_write_gpu(hr, hs, g, d, bits, path):
  """Compiled, in bf16: the caches come back as the cache module's XLA writes leave them,
  bit for bit, and the output equals the reference over those written caches."""
  b, s, sink, recent, dtype = 4, 700, 16, 64, jnp.bfloat16
  start = jnp.asarray([699, 5, 300, 100], jnp.int32)
  n_valid = jnp.asarray([1, 1, 0, 1], jnp.int32)
  h = hr + hs
  q = rnd((b, 1, h, g, d), dtype)
  k, v = kv((b, 1, h, d), bits), kv((b, 1, h, d), bits, 1)
  full = kvc.FullLayerCache(kv((b, s, hr, d), bits), kv((b, s, hr, d), bits, 1))
  sl = lambda x, a, z: jax.tree_util.tree_map(lambda y: y[:, :, a:z], x)
  want_full = kvc.write_full(full, sl(k, 0, hr), sl(v, 0, hr), start, n_valid)
  want = [reference.full_chunk_attention(*ref(q[:, :, :hr], want_full.k, want_full.v),
                                         start[:, None], start + n_valid)]
  with quant_path(path):
    if hs:
      w = sink + recent
      ring = kvc.StreamLayerCache(kv((b, w, hs, d), bits), kv((b, w, hs, d), bits, 1), sink,
                                  recent)
      pos, valid = kvc.stream_slot_positions(start, sink, recent)
      want_ring = kvc.write_stream(ring, sl(k, hr, h), sl(v, hr, h), start, n_valid)
      want.append(reference.streaming_chunk_attention(
          *ref(q[:, :, hr:], ring.k, ring.v), pos, valid, *ref(sl(k, hr, h), sl(v, hr, h)),
          start[:, None], n_valid, sink, recent))
      got = fresh_jit(kg.duo_decode_write, static_argnums=(11, 12))(
          q, full.k, full.v, start, n_valid, ring.k, ring.v, pos, valid, k, v, sink, recent)
      expect = (want_full.k, want_full.v, want_ring.k, want_ring.v)
    else:
      got = fresh_jit(kg.full_decode_write)(q, full.k, full.v, start, n_valid, k, v)
      expect = (want_full.k, want_full.v)
  for x, y in zip(got[1:], expect):
    for a, e in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
  check(got[0], jnp.concatenate(want, axis=2), dtype)


def test_decode_write_in_place_in_a_loop_gpu():
  """In a jitted loop carrying the caches (as engine.decode does) the aliased write stays in
  place: the compiled program copies no cache-sized buffer, and the tokens land."""
  b, s, hr, hs, g, d, sink, recent, steps = 2, 4096, 2, 2, 4, 128, 16, 64, 5
  dtype = jnp.bfloat16
  q = rnd((b, 1, hr + hs, g, d), dtype)
  kc, vc = jnp.zeros((b, s, hr, d), dtype), jnp.zeros((b, s, hr, d), dtype)
  sk, sv = jnp.zeros((b, sink + recent, hs, d), dtype), jnp.zeros((b, sink + recent, hs, d), dtype)

  def run(kc, vc, sk, sv):
    def step(i, c):
      kc, vc, sk, sv = c
      start = jnp.full((b,), i, jnp.int32)
      pos, valid = kvc.stream_slot_positions(start, sink, recent)
      new = jnp.full((b, 1, hr + hs, d), i + 1, dtype)
      _, kc, vc, sk, sv = kg.duo_decode_write(q, kc, vc, start, jnp.ones((b,), jnp.int32), sk,
                                              sv, pos, valid, new, new, sink, recent)
      return kc, vc, sk, sv
    return jax.lax.fori_loop(0, steps, step, (kc, vc, sk, sv))

  f = jax.jit(run, donate_argnums=(0, 1, 2, 3))
  hlo = f.lower(kc, vc, sk, sv).compile().as_text()
  big = f"bf16[{b},{s},{hr},{d}]"
  copies = [ln for ln in hlo.splitlines() if " copy(" in ln and big in ln]
  assert not copies, copies[:3]
  kc, vc, sk, sv = f(kc, vc, sk, sv)
  np.testing.assert_array_equal(np.asarray(kc[:, :steps, 0, 0], np.float32),
                                np.broadcast_to(np.arange(1, steps + 1), (b, steps)))
  assert not np.asarray(kc[:, steps:].astype(jnp.float32)).any()
  np.testing.assert_array_equal(np.asarray(sk[:, :steps, 0, 0], np.float32),
                                np.broadcast_to(np.arange(1, steps + 1), (b, steps)))
