"""TPU attention kernels (duojax.kernels.tpu) equal the jnp reference.

In the style of JAX's own Pallas op tests: `TestTpuKernels` runs the compiled kernels and
is skipped off a TPU; `TestTpuKernelsInterpret` runs the same tests in Pallas' TPU interpret
mode, on CPU. Shapes are small (interpret mode compiles a loop over the grid per kernel),
but block sizes are forced small too, so every kernel runs several query and key blocks,
skips some and handles ragged last blocks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax import cache as kvc
from duojax.attention import dispatch
from duojax.attention import reference as ref
from duojax.config import tiny_config
from duojax.engine import pad_batch, prefill
from duojax.kernels import tpu as ktpu
from duojax.kernels.tpu import chunk_attention
from duojax.model import llama
from duojax.pattern import HeadMask

ON_TPU = jax.default_backend() == "tpu"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # max |out - ref| / max |ref|


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu_compiles():
  """Interpret-mode kernels are big XLA loops; on CPU, compile them without heavy
  optimisation (halves compile time, same arithmetic). Restored afterwards."""
  old = jax.config.read("jax_disable_most_optimizations")
  if not ON_TPU:
    jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def _close(out, want, dtype):
  out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
  assert out.shape == want.shape
  assert np.isfinite(out).all()
  err = np.abs(out - want).max() / max(np.abs(want).max(), 1e-6)
  assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"


def _randn(rng, shape, dtype):
  return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def _partial_oracle(q, k, v, q_pos=None, kv_len=None, vis=None):
  """float64 numpy (m, l, acc) of softmax attention over the visible keys, written apart
  from the code under test: m the max logit (-inf: nothing visible), l = sum exp(s - m),
  acc = sum exp(s - m) v. vis [B, T, S] (default: key j visible iff j <= q_pos, j < kv_len)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  if vis is None:
    j = np.arange(k.shape[1])
    vis = (j[None, None] <= np.asarray(q_pos)[:, :, None]) & (
        j[None, None] < np.asarray(kv_len)[:, None, None])
  s = np.einsum("bthgd,bshd->bthgs", q, k) / np.sqrt(q.shape[-1])
  s = np.where(vis[:, :, None, None], s, -np.inf)
  m = s.max(-1)
  p = np.where(np.isfinite(s), np.exp(s - np.where(np.isfinite(m), m, 0)[..., None]), 0.0)
  return m, p.sum(-1), np.einsum("bthgs,bshd->bthgd", p, v)


def _check_partial(got, want, dtype, some_empty=True):
  """Compares (m, l, acc) where a row sees keys (m to TOL in absolute logit units, l and acc
  relative to their largest value) and requires m = -inf, l = acc = 0 where it sees none."""
  m, l, acc = (np.asarray(x, np.float64) for x in got)
  wm, wl, wacc = want
  assert all(x.dtype == np.float64 for x in (m, l, acc)) and np.asarray(got[0]).dtype == np.float32
  empty = np.isneginf(wm)
  assert (~empty).any() and (empty.any() or not some_empty)  # both kinds of row are checked
  np.testing.assert_array_equal(np.isneginf(m), empty)
  assert not l[empty].any() and not acc[empty].any() and not np.isnan(acc).any()
  tol = TOL[dtype]
  assert np.abs(m[~empty] - wm[~empty]).max() <= tol * max(1.0, np.abs(wm[~empty]).max())
  for a, w in ((l, wl), (acc, wacc)):
    err = np.abs(a - w).max() / np.abs(w).max()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def _merge_oracle(parts):
  """The exact merge of partials over disjoint key sets, in numpy, then acc / l."""
  ms = np.stack([np.asarray(p[0], np.float64) for p in parts])
  big = ms.max(0)
  w = np.exp(ms - np.where(np.isfinite(big), big, 0))  # exp(-inf) = 0: an empty part
  l = sum(wi * np.asarray(p[1], np.float64) for wi, p in zip(w, parts))
  acc = sum(wi[..., None] * np.asarray(p[2], np.float64) for wi, p in zip(w, parts))
  return acc / np.where(l == 0, 1, l)[..., None]


# (H, G, D, KV heads per grid step): GQA with 2 KV heads of 3 query heads, both heads in
# one step; MHA with 4 heads, two per step (2 * 64 lanes)
LAYOUTS = {"gqa": (2, 3, 64, 2), "mha": (4, 1, 64, 2)}
CASES = [("gqa", jnp.float32), ("mha", jnp.bfloat16)]


class TpuKernelChecks:
  """The checks, run compiled (TestTpuKernels, marked `tpu`) or interpreted on CPU.
  Two subclasses of an uncollected base, because pytest hands a class's marks down to
  its subclasses."""
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _need_tpu(self):
    if not (self.INTERPRET or ON_TPU):
      pytest.skip("compiled TPU kernels need a TPU (the Interpret subclass runs on CPU)")

  def call(self, fn, *args, **kw):
    return jax.jit(functools.partial(fn, interpret=self.INTERPRET, **kw))(*args)

  # -- prefill chunks -------------------------------------------------------------------
  @pytest.mark.parametrize("layout,dtype", CASES)
  def test_full_chunk(self, layout, dtype):
    h, g, d, hb = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    b, t, s = 3, 37, 300  # S: two full key blocks of 128 and a ragged one
    q = _randn(rng, (b, t, h, g, d), dtype)
    kc, vc = _randn(rng, (b, s, h, d), dtype), _randn(rng, (b, s, h, d), dtype)
    start = jnp.array([0, 150, 263], jnp.int32)  # first chunk; middle; up to the capacity
    n_valid = jnp.array([37, 20, 37], jnp.int32)
    q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)
    kv_len = start + n_valid
    out = self.call(ktpu.full_chunk, q, kc, vc, q_pos, kv_len, block_q=24, block_k=128,
                    block_h=hb)
    _close(out, ref.full_chunk_attention(q, kc, vc, q_pos, kv_len), dtype)

  @pytest.mark.parametrize("layout,dtype", CASES)
  def test_streaming_chunk(self, layout, dtype):
    h, g, d, hb = LAYOUTS[layout]
    rng = np.random.default_rng(1)
    b, t, sink, recent = 3, 61, 4, 100
    w = sink + recent
    start = jnp.array([0, 30, 300], jnp.int32)  # empty ring; filling; wrapped
    n_valid = jnp.array([61, 50, 7], jnp.int32)
    slot_pos, slot_valid = kvc.stream_slot_positions(start, sink, recent)
    q = _randn(rng, (b, t, h, g, d), dtype)
    sk, sv = _randn(rng, (b, w, h, d), dtype), _randn(rng, (b, w, h, d), dtype)
    k, v = _randn(rng, (b, t, h, d), dtype), _randn(rng, (b, t, h, d), dtype)
    q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)
    args = (q, sk, sv, slot_pos, slot_valid, k, v, q_pos, n_valid)
    out = self.call(ktpu.streaming_chunk, *args, sink=sink, recent=recent, block_q=24,
                    block_k=128, block_h=hb)
    _close(out, ref.streaming_chunk_attention(*args, sink, recent), dtype)

  # -- decode ----------------------------------------------------------------------------
  @pytest.mark.parametrize("layout,dtype", CASES)
  def test_full_decode_ragged(self, layout, dtype):
    h, g, d, hb = LAYOUTS[layout]
    rng = np.random.default_rng(2)
    b, s = 4, 300
    q = _randn(rng, (b, 1, h, g, d), dtype)
    kc, vc = _randn(rng, (b, s, h, d), dtype), _randn(rng, (b, s, h, d), dtype)
    kv_len = jnp.array([1, 129, 300, 77], jnp.int32)  # one key; just past a block; full; odd
    q_pos = kv_len[:, None] - 1
    out = self.call(ktpu.full_decode, q, kc, vc, q_pos, kv_len, block_k=128)
    _close(out, ref.full_chunk_attention(q, kc, vc, q_pos, kv_len), dtype)

  @pytest.mark.parametrize("layout,dtype", [("gqa", jnp.bfloat16), ("mha", jnp.float32)])
  def test_streaming_decode(self, layout, dtype):
    h, g, d, hb = LAYOUTS[layout]
    rng = np.random.default_rng(3)
    b, sink, recent = 4, 3, 130  # W + 1 = 134 keys: a full block of 128 and a ragged one
    start = jnp.array([0, 2, 50, 1000], jnp.int32)
    slot_pos, slot_valid = kvc.stream_slot_positions(start, sink, recent)
    q = _randn(rng, (b, 1, h, g, d), dtype)
    sk, sv = (_randn(rng, (b, sink + recent, h, d), dtype) for _ in range(2))
    k, v = _randn(rng, (b, 1, h, d), dtype), _randn(rng, (b, 1, h, d), dtype)
    args = (q, sk, sv, slot_pos, slot_valid, k, v, start[:, None], jnp.ones((b,), jnp.int32))
    out = self.call(ktpu.streaming_decode, *args, sink=sink, recent=recent, block_k=128)
    _close(out, ref.streaming_chunk_attention(*args, sink, recent), dtype)

  # -- partial results (return_partial): what context-parallel attention merges ------------
  @pytest.mark.parametrize("layout,dtype", CASES)
  def test_full_chunk_partial(self, layout, dtype):
    """(m, l, acc) against a float64 oracle: rows before the cache (negative q_pos, as a
    later device's slice sees them), an empty row, ragged lengths; the two halves of a
    cache merged by the oracle's own rule equal the reference output."""
    h, g, d, hb = LAYOUTS[layout]
    rng = np.random.default_rng(8)
    b, t, s = 3, 5, 260  # two key blocks of 128 and a ragged one
    q = _randn(rng, (b, t, h, g, d), dtype)
    kc, vc = _randn(rng, (b, s, h, d), dtype), _randn(rng, (b, s, h, d), dtype)
    q_pos = jnp.array([-3, 129, 255], jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)
    kv_len = jnp.array([0, 134, 260], jnp.int32)  # row 0: q_pos -3..1, no key at all
    m, l, acc = self.call(ktpu.full_chunk, q, kc, vc, q_pos, kv_len, block_q=8, block_k=128,
                          block_h=hb, return_partial=True)
    want = _partial_oracle(q, kc, vc, q_pos, kv_len)
    _check_partial((m, l, acc), want, dtype)
    assert np.isneginf(np.asarray(m[0])).all() and not np.asarray(l[0]).any()
    # the halves [0, 130) and [130, 260) in slice coordinates, merged
    halves = [self.call(ktpu.full_chunk, q, kc[:, o:o + 130], vc[:, o:o + 130], q_pos - o,
                        jnp.clip(kv_len - o, 0, 130), block_k=128, block_h=hb,
                        return_partial=True) for o in (0, 130)]
    assert np.isneginf(np.asarray(halves[1][0][1, 0])).all()  # row 1, q_pos 129: none there
    _close(_merge_oracle(halves), ref.full_chunk_attention(q, kc, vc, q_pos, kv_len), dtype)

  @pytest.mark.parametrize("layout,dtype", [("gqa", jnp.bfloat16), ("mha", jnp.float32)])
  def test_full_decode_partial(self, layout, dtype):
    h, g, d, hb = LAYOUTS[layout]
    rng = np.random.default_rng(9)
    b, s = 4, 300
    q = _randn(rng, (b, 1, h, g, d), dtype)
    kc, vc = _randn(rng, (b, s, h, d), dtype), _randn(rng, (b, s, h, d), dtype)
    kv_len = jnp.array([1, 0, 300, 77], jnp.int32)
    q_pos = jnp.array([[0], [-40], [299], [76]], jnp.int32)  # row 1: before the slice
    got = self.call(ktpu.full_decode, q, kc, vc, q_pos, kv_len, block_k=128,
                    return_partial=True)
    _check_partial(got, _partial_oracle(q, kc, vc, q_pos, kv_len), dtype)
    out = self.call(ktpu.full_decode, q, kc, vc, q_pos, kv_len, block_k=128)  # unchanged
    _close(out, ref.full_chunk_attention(q, kc, vc, q_pos, kv_len), dtype)

  def test_streaming_chunk_partial(self):
    h, g, d, hb = LAYOUTS["gqa"]
    rng = np.random.default_rng(10)
    b, t, sink, recent = 2, 9, 3, 20
    start = jnp.array([0, 70], jnp.int32)
    n_valid = jnp.array([9, 4], jnp.int32)
    slot_pos, slot_valid = kvc.stream_slot_positions(start, sink, recent)
    q = _randn(rng, (b, t, h, g, d), jnp.float32)
    sk, sv = (_randn(rng, (b, sink + recent, h, d), jnp.float32) for _ in range(2))
    k, v = (_randn(rng, (b, t, h, d), jnp.float32) for _ in range(2))
    q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)
    args = (q, sk, sv, slot_pos, slot_valid, k, v, q_pos, n_valid)
    m, l, acc = self.call(ktpu.streaming_chunk, *args, sink=sink, recent=recent,
                          return_partial=True)
    keys = np.concatenate([np.asarray(sk), np.asarray(k)], 1)
    vals = np.concatenate([np.asarray(sv), np.asarray(v)], 1)
    kpos = np.concatenate([np.asarray(slot_pos), np.asarray(q_pos)], 1)
    kok = np.concatenate([np.asarray(slot_valid), np.arange(t)[None] < np.asarray(n_valid)[:, None]],
                         1)
    dist = np.asarray(q_pos)[:, :, None] - kpos[:, None, :]
    vis = kok[:, None, :] & (dist >= 0) & ((kpos[:, None, :] < sink) | (dist < recent))
    _check_partial((m, l, acc), _partial_oracle(q, keys, vals, vis=vis), jnp.float32,
                   some_empty=False)

  # -- whole sequences (splash), forward and backward --------------------------------------
  @pytest.mark.parametrize("kind", ["causal", "streaming"])
  def test_dense_forward_and_grad(self, kind):
    rng = np.random.default_rng(4)
    b, t, h, g, d = 2, 200, 2, 2, 64  # padded to 256: 2 x 2 blocks of 128
    lengths = jnp.array([200, 131], jnp.int32)
    q = _randn(rng, (b, t, h, g, d), jnp.float32)
    k, v = _randn(rng, (b, t, h, d), jnp.float32), _randn(rng, (b, t, h, d), jnp.float32)
    w = _randn(rng, (b, t, h, g, d), jnp.float32)  # loss weights: a generic cotangent
    if kind == "causal":
      ours = functools.partial(ktpu.dense_causal, lengths=lengths, interpret=self.INTERPRET,
                               block=128)
      want = functools.partial(ref.dense_attention, lengths=lengths)
    else:
      sink, recent = 5, 40
      ours = functools.partial(ktpu.dense_streaming, lengths=lengths, sink=sink, recent=recent,
                               interpret=self.INTERPRET, block=128)
      want = functools.partial(ref.dense_attention, lengths=lengths,
                               streaming=jnp.ones((h,), bool), sink=sink, recent=recent)

    def loss(fn, q, k, v):
      out = fn(q, k, v)
      return jnp.sum(out * w), out

    grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2),
                                       has_aux=True))
    (dq, dk, dv), out = grad(ours)(q, k, v)
    (rq, rk, rv), rout = grad(want)(q, k, v)
    _close(out, rout, jnp.float32)
    for a, r in ((dq, rq), (dk, rk), (dv, rv)):
      _close(a, r, jnp.float32)

  def test_dense_streaming_bf16_gqa_edge_rows(self):
    """bf16, and rows that see no key (length 0; sink 0 with the window past the end)."""
    rng = np.random.default_rng(5)
    b, t, h, g, d = 3, 150, 2, 3, 64
    lengths = jnp.array([150, 0, 20], jnp.int32)
    q = _randn(rng, (b, t, h, g, d), jnp.bfloat16)
    k, v = (_randn(rng, (b, t, h, d), jnp.bfloat16) for _ in range(2))
    out = self.call(ktpu.dense_streaming, q, k, v, lengths, sink=0, recent=64, block=128)
    want = ref.dense_attention(q, k, v, lengths, jnp.ones((h,), bool), 0, 64)
    _close(out, want, jnp.bfloat16)
    assert not np.asarray(out[1]).any()  # length 0: all zeros
    assert not np.asarray(out[2, 20 + 63:], np.float32).any()  # window entirely past the end

  # -- quantised caches: int8 / int4 codes + scales, dequantised inside the kernels ----------
  @pytest.mark.parametrize("bits,layout,dtype", [
      (8, "gqa", jnp.float32), (4, "mha", jnp.bfloat16), (4, "gqa", jnp.float32),
      (8, "mha", jnp.bfloat16), ((8, 4), "gqa", jnp.float32), ((8, 4), "mha", jnp.bfloat16)])
  def test_quantized_cache_ops(self, bits, layout, dtype):
    """Chunk and decode ops over kv_quant.QuantKV caches equal the dequantising reference:
    ragged lengths, ragged last key block, a wrapped ring, odd chunk length. bits (8, 4):
    k8v4's int8 keys beside int4 values."""
    from duojax import kv_quant as kq
    h, g, d, _ = LAYOUTS[layout]  # quantised: every step takes all KV heads (block_h None)
    kb, vb = (bits, bits) if isinstance(bits, int) else bits
    rng = np.random.default_rng(20 + kb + vb)
    quant = lambda shape, nb=kb: kq.quantize(_randn(rng, shape, jnp.float32), nb)
    b, t, s = 3, 9, 300
    q = _randn(rng, (b, t, h, g, d), dtype)
    kc, vc = quant((b, s, h, d)), quant((b, s, h, d), vb)
    kv_len = jnp.array([300, 17, 150], jnp.int32)
    q_pos = kv_len[:, None] - t + jnp.arange(t, dtype=jnp.int32)
    out = self.call(ktpu.full_chunk, q, kc, vc, q_pos, kv_len, block_q=8, block_k=128)
    _close(out, ref.full_chunk_attention(q, kc, vc, q_pos, kv_len), dtype)
    q1, pos1 = q[:, :1], kv_len[:, None] - 1
    out = self.call(ktpu.full_decode, q1, kc, vc, pos1, kv_len, block_k=128)
    _close(out, ref.full_chunk_attention(q1, kc, vc, pos1, kv_len), dtype)
    sink, recent = 3, 130  # W = 133: with the chunk, a full key block of 128 and more
    start = jnp.array([0, 50, 1000], jnp.int32)  # empty ring; filling; wrapped
    slot_pos, slot_valid = kvc.stream_slot_positions(start, sink, recent)
    sk, sv = quant((b, sink + recent, h, d)), quant((b, sink + recent, h, d), vb)
    k, v = quant((b, t, h, d)), quant((b, t, h, d), vb)
    n_valid = jnp.array([9, 4, 1], jnp.int32)
    args = (q, sk, sv, slot_pos, slot_valid, k, v, start[:, None] + jnp.arange(t), n_valid)
    out = self.call(ktpu.streaming_chunk, *args, sink=sink, recent=recent, block_q=8,
                    block_k=128)
    _close(out, ref.streaming_chunk_attention(*args, sink, recent), dtype)
    k1, v1 = (jax.tree_util.tree_map(lambda x: x[:, :1], x) for x in (k, v))
    args = (q1, sk, sv, slot_pos, slot_valid, k1, v1, start[:, None], jnp.ones((b,), jnp.int32))
    out = self.call(ktpu.streaming_decode, *args, sink=sink, recent=recent, block_k=128)
    _close(out, ref.streaming_chunk_attention(*args, sink, recent), dtype)
    with pytest.raises(ValueError, match=f"all {h} KV heads per step"):
      ktpu.full_chunk(q, kc, vc, q_pos, kv_len, interpret=True, block_h=1)

  # -- the whole model ---------------------------------------------------------------------
  @pytest.mark.parametrize("kv_dtype", [None, "int8", "int4", "k8v4"])
  def test_model_matches_xla(self, kv_dtype):
    """Chunked prefill (3 chunks, ragged batch) and decode of a tiny DuoAttention model:
    backend tpu(-interpret) gives the xla backend's logits (int8 / int4: both read the
    same quantised cache, the kernels dequantising inside)."""
    backend = "tpu-interpret" if self.INTERPRET else "tpu"
    cfg = tiny_config(num_layers=2)
    mask = HeadMask.from_array(np.array([[True, False], [False, False]]), 3, 5)  # duo; stream
    params = llama.apply_head_mask(llama.init_params(cfg, jax.random.PRNGKey(0), scale=0.3),
                                   mask)
    rng = np.random.default_rng(6)
    prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in (19, 11)]
    tokens, lengths = pad_batch(prompts, 8)
    steps = rng.integers(3, cfg.vocab_size, (3, 2)).astype(np.int32)

    @functools.partial(jax.jit, static_argnames=("backend",))
    def decode(tok, cache, backend):
      h, cache = llama.forward_chunk(params, cfg, tok[:, None], cache,
                                     jnp.ones(tok.shape, jnp.int32), backend)
      return llama.logits_from_hidden(params, h[:, 0]), cache

    def run(backend):
      cache = kvc.init_cache(cfg, 2, tokens.shape[1] + len(steps), mask, jnp.float32,
                             kv_dtype=kv_dtype)
      _, cache, logits = prefill(params, cfg, tokens, lengths, cache, 8, backend,
                                 all_logits=True)
      out = [np.asarray(logits)[i, :n] for i, n in enumerate(lengths)]
      for tok in steps:
        lg, cache = decode(jnp.asarray(tok), cache, backend)
        out.append(np.asarray(lg))
      return out

    for a, r in zip(run(backend), run("xla")):
      np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.tpu
class TestTpuKernels(TpuKernelChecks):
  INTERPRET = False


class TestTpuKernelsInterpret(TpuKernelChecks):
  INTERPRET = True


# -- plain checks (no kernel runs) --------------------------------------------------------

def test_backend_registration():
  assert "tpu-interpret" in dispatch.available_backends()
  assert ("tpu" in dispatch.available_backends()) == ON_TPU
  assert (dispatch.resolve_backend("auto") == "tpu") == ON_TPU
  ops = dispatch.backend_ops("tpu-interpret")
  ops = {k for k, fn in ops.items() if callable(fn)}  # tables also hold lists ("kv_quant")
  assert ops == {"full_chunk", "streaming_chunk", "full_decode", "streaming_decode",
                 "dense_causal", "dense_streaming", "full_chunk_partial",
                 "streaming_chunk_partial", "full_decode_partial", "streaming_decode_partial"}


def test_importing_kernels_queries_no_device():
  """Importing a kernel package must not initialise a JAX backend: a fresh interpreter
  that imports them (and dispatch) still has no backend up."""
  import subprocess
  import sys
  code = ("import jax\n"
          "def boom(*a, **k): raise AssertionError('device queried at import')\n"
          "jax.default_backend = jax.devices = jax.local_devices = boom\n"
          "import duojax.attention.dispatch, duojax.cache, duojax.kernels.tpu, duojax.kernels.gpu\n"
          "from jax._src import xla_bridge as xb\n"
          "assert not getattr(xb, '_backends', None), sorted(xb._backends)\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr


def test_unsupported_chips_and_unavailable_backends_get_clear_errors():
  from duojax.kernels.tpu import chip_supported
  assert not chip_supported("TPU v2") and not chip_supported("TPU v3")
  assert all(chip_supported(k) for k in ("TPU v4", "TPU v5 lite", "TPU v5p", "TPU v6 lite"))
  if not ON_TPU:
    with pytest.raises(dispatch.BackendUnavailable, match="not a TPU.*--backend auto"):
      dispatch.resolve_backend("tpu")
  assert dispatch.resolve_backend("tpu-interpret") == "tpu-interpret"


def test_xla_dense_ops_are_the_reference():
  rng = np.random.default_rng(7)
  q = _randn(rng, (2, 9, 2, 2, 8), jnp.float32)
  k, v = (_randn(rng, (2, 9, 2, 8), jnp.float32) for _ in range(2))
  lengths = jnp.array([9, 5])
  xla = dispatch.backend_ops("xla")
  np.testing.assert_array_equal(xla["dense_causal"](q, k, v, lengths),
                                ref.dense_attention(q, k, v, lengths))
  np.testing.assert_array_equal(
      xla["dense_streaming"](q, k, v, lengths, 2, 3),
      ref.dense_attention(q, k, v, lengths, jnp.array([True, True]), 2, 3))


def test_ragged_decode_reads_only_each_rows_blocks():
  """Key blocks a row's decode computes (and copies): ceil(kv_len / block_k)."""
  kv_len = jnp.array([1, 128, 129, 5000, 0])
  limit = chunk_attention.full_block_limits(kv_len[:, None] - 1, kv_len, 2, 8192)
  blocks = -(-np.asarray(limit[:, 0]) // 512)
  np.testing.assert_array_equal(blocks, [1, 1, 1, 10, 0])


def test_prefill_chunk_skips_blocks_outside_the_mask():
  """Causal chunk: query block i reads key blocks up to its own last position. Streaming
  chunk (sink 64, recent 256, chunk of 2048 after 10000 tokens, blocks of 256 rows x 128
  keys): each query block needs only the sink block and those overlapping its window."""
  g, t, bq, bk = 1, 2048, 256, 128
  start = 10000
  q_pos = (start + jnp.arange(t))[None]
  limit = chunk_attention.full_block_limits(jnp.repeat(q_pos, g, 1), jnp.array([start + t]),
                                            bq, 16384)
  np.testing.assert_array_equal(limit[0], start + bq * np.arange(1, t // bq + 1))

  sink, recent = 64, 256
  slot_pos, slot_valid = kvc.stream_slot_positions(jnp.array([start]), sink, recent)
  kpos = jnp.concatenate([slot_pos, q_pos], 1)
  kvalid = jnp.concatenate([slot_valid, jnp.ones((1, t), bool)], 1)
  n = kpos.shape[1]
  pad = -n % bk
  kpos, kvalid = jnp.pad(kpos, ((0, 0), (0, pad))), jnp.pad(kvalid, ((0, 0), (0, pad)))
  needed, fetch = chunk_attention.stream_block_tables(q_pos, kpos, kvalid, bq, bk, sink, recent)
  per_q_block = np.asarray(needed[0].sum(-1))
  # dense would be (320 + 2048) / 128 = 19 blocks; the window of a 256-row query block spans
  # 511 positions: at most 5 blocks of 128, plus the sink block
  assert per_q_block.max() <= 6, per_q_block
  f = np.asarray(fetch[0])
  assert (np.diff(f, axis=-1) >= 0).all()  # skipped steps re-use the block held
  assert np.asarray(needed[0])[np.arange(f.shape[0])[:, None], f].all()  # fetch a needed block


def test_kernels_compile_for_tpu_ahead_of_time():
  """Mosaic (libtpu's compiler) accepts every kernel at serving shapes: SmolLM2-135M (3 KV
  heads of 3, D=64) and Llama-3-8B-like (8 KV heads of 4, D=128), prefill chunk, decode and
  whole-sequence forward + backward, compiled ahead of time for a v5e on a machine with no
  TPU. Needs the `libtpu` wheel (e.g. in a venv); skipped without it."""
  pytest.importorskip("libtpu")
  from jax.experimental import topologies
  try:
    dev = topologies.get_topology_desc("v5e:2x2", "tpu").devices[0]
  except Exception as e:  # pragma: no cover - depends on the libtpu build
    pytest.skip(f"no compile-only TPU topology: {e}")
  shd = jax.sharding.SingleDeviceSharding(dev)
  a = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=shd)
  i32 = jnp.int32
  for b, h, g, d, s in ((3, 3, 3, 64, 5000), (2, 4, 4, 128, 32768)):
    for t in (1, 512):
      q, kc = a((b, t, h, g, d)), a((b, s, h, d))
      full = ktpu.full_decode if t == 1 else ktpu.full_chunk
      jax.jit(full).lower(q, kc, kc, a((b, t), i32), a((b,), i32)).compile()
      # the partial variant (context parallel: an eighth of the cache per device)
      kc8 = a((b, s // 8 // 8 * 8, h, d))
      jax.jit(functools.partial(full, return_partial=True)).lower(
          q, kc8, kc8, a((b, t), i32), a((b,), i32)).compile()
      w = 64 + 256
      stream = ktpu.streaming_decode if t == 1 else ktpu.streaming_chunk
      jax.jit(functools.partial(stream, sink=64, recent=256)).lower(
          q, a((b, w, h, d)), a((b, w, h, d)), a((b, w), i32), a((b, w), bool),
          a((b, t, h, d)), a((b, t, h, d)), a((b, t), i32), a((b,), i32)).compile()
  b, t, h, g, d = 1, 2000, 3, 3, 64
  args = (a((b, t, h, g, d)), a((b, t, h, d)), a((b, t, h, d)), a((b,), i32))
  for fn in (ktpu.dense_causal, functools.partial(ktpu.dense_streaming, sink=128, recent=256)):
    loss = lambda q, k, v, n, fn=fn: jnp.sum(fn(q, k, v, n).astype(jnp.float32))
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
