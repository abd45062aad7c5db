"""RazorAttention's compensation token equals a slow per-position reference:
chunked prefill (chunks that do / don't divide, longer than the ring), decoding,
ragged batches, inside a DuoLayerCache, and through the whole model."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax import cache as kvc
from duojax import compensation
from duojax.attention import dispatch
from duojax.config import tiny_config
from duojax.engine import forward_logits, generate
from duojax.model import llama
from duojax.pattern import HeadMask
from helpers import random_params  # noqa: E402


def slow_reference(q, k, v, lengths, sink, recent, streaming=None):
  """float64 loops: query t of row b, KV head h, group slot g attends the streaming
  keys plus (when some exist) one key/value = mean over D(t) = {j: sink <= j <=
  t - recent}, logit + log|D(t)|. Heads with streaming[h] False are causal.

  q [B, T, H, G, D]; k, v [B, T, H, D] -> out [B, T, H, G, D] (zeros past length).
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t_, h_, g_, d = q.shape
  out = np.zeros(q.shape)
  for b, t, h in itertools.product(range(b_), range(t_), range(h_)):
    if t >= lengths[b]:
      continue
    js = np.arange(t + 1)
    if streaming is None or streaming[h]:
      seen = js[(js < sink) | (t - js < recent)]
      dropped = js[(js >= sink) & (js <= t - recent)]
    else:
      seen, dropped = js, js[:0]
    keys, vals, bias = k[b, seen, h], v[b, seen, h], np.zeros(len(seen))
    if len(dropped):
      keys = np.vstack([keys, k[b, dropped, h].mean(0)])
      vals = np.vstack([vals, v[b, dropped, h].mean(0)])
      bias = np.append(bias, np.log(len(dropped)))
    for g in range(g_):
      s = keys @ q[b, t, h, g] / np.sqrt(d) + bias
      p = np.exp(s - s.max())
      out[b, t, h, g] = (p / p.sum()) @ vals
  return out


@functools.partial(jax.jit, static_argnames=("sink", "recent"))
def dense_compensated(q, k, v, lengths, sink, recent, streaming=None):
  """The same in jnp, whole sequences at once (for forward_sequence)."""
  b, t = q.shape[:2]
  pos = jnp.arange(t)
  valid = pos[None, :] < lengths[:, None]  # [B, T]
  d = pos[:, None] - pos[None, :]
  stream = ((d >= 0) & ((pos[None, :] < sink) | (d < recent)))[None] & valid[:, None, :]
  causal = (d >= 0)[None] & valid[:, None, :]
  drop = ((pos[None, :] >= sink) & (d >= recent))[None] & valid[:, None, :]  # [B, T, T]
  n = drop.sum(-1)  # [B, T]
  inv_n = 1.0 / jnp.maximum(n, 1)[..., None, None]
  mk = jnp.einsum("bts,bshd->bthd", drop.astype(jnp.float32), k) * inv_n
  mv = jnp.einsum("bts,bshd->bthd", drop.astype(jnp.float32), v) * inv_n
  h = k.shape[2]
  flag = jnp.ones((h,), bool) if streaming is None else jnp.asarray(streaming)
  mask = jnp.where(flag[None, :, None, None], stream[:, None], causal[:, None])  # [B, H, T, T]
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("bthgd,bshd->bhgts", q, k) * scale
  c = jnp.einsum("bthgd,bthd->bhgt", q, mk) * scale + jnp.log(jnp.maximum(n, 1))[:, None, None]
  has_c = (flag[None, :, None] & (n > 0)[:, None, :])[:, :, None]  # [B, H, 1, T]
  s = jnp.where(mask[:, :, None], s, -jnp.inf)
  c = jnp.where(has_c, c, -jnp.inf)
  mx = jnp.maximum(s.max(-1), c)
  e, ec = jnp.exp(s - mx[..., None]), jnp.exp(c - mx)
  z = e.sum(-1) + ec
  out = (jnp.einsum("bhgts,bshd->bthgd", e, v)
         + jnp.einsum("bhgt,bthd->bthgd", ec, mv)) / jnp.transpose(z, (0, 3, 1, 2))[..., None]
  return jnp.where(valid[:, :, None, None, None], out, 0.0)


def _inputs(seed, b=2, t=30, h=2, g=2, d=8):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, h, g, d), np.float32)
  k = rng.standard_normal((b, t, h, d), np.float32) * 1.5
  v = rng.standard_normal((b, t, h, d), np.float32)
  return q, k, v


_step = jax.jit(dispatch.attend)


def serve(layer_cache, q, k, v, lengths, prompt_lens, chunk):
  """Chunked prefill of each row's prompt, then one token per step up to its length."""
  b, t = q.shape[:2]
  start = jnp.zeros((b,), jnp.int32)
  out = np.zeros(q.shape)
  prompt_lens = np.asarray(prompt_lens)
  c, step = layer_cache, _step
  for c0 in range(0, int(prompt_lens.max()), chunk):
    n = np.clip(prompt_lens - c0, 0, chunk)
    sl = slice(c0, c0 + chunk)
    pad = chunk - q[:, sl].shape[1]
    qc, kc, vc = (np.pad(x[:, sl], [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (q, k, v))
    o, c = step(c, qc, kc, vc, start, jnp.asarray(n, jnp.int32))
    for r in range(b):
      out[r, c0:c0 + n[r]] = np.asarray(o[r, :n[r]])
    start = start + jnp.asarray(n, jnp.int32)
  for i in range(int((lengths - prompt_lens).max())):
    pos = prompt_lens + i
    live = pos < lengths
    idx = np.minimum(pos, t - 1)
    take = lambda x: x[np.arange(b), idx][:, None]
    o, c = step(c, take(q), take(k), take(v), start, jnp.asarray(live, jnp.int32))
    for r in range(b):
      if live[r]:
        out[r, pos[r]] = np.asarray(o[r, 0])
    start = start + jnp.asarray(live, jnp.int32)
  return out, c, start


@pytest.mark.parametrize("sink,recent,chunk", [(3, 5, 4), (3, 5, 5), (3, 5, 16), (0, 4, 6),
                                               (2, 0, 5)])
def test_stream_cache_matches_slow_reference(sink, recent, chunk):
  q, k, v = _inputs(sink * 7 + recent + chunk)
  lengths, prompts = np.array([30, 21]), np.array([23, 9])
  want = slow_reference(q, k, v, lengths, sink, recent)
  c0 = compensation.init_comp_cache((2, sink + recent, 2, 8), jnp.float32, sink, recent)
  got, c, end = serve(c0, q, k, v, lengths, prompts, chunk)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(end), lengths)
  # the cache holds the mean of exactly the tokens that left the window
  n = np.maximum(lengths - recent - sink, 0)
  np.testing.assert_array_equal(np.asarray(c.n_dropped), n)
  for r in range(2):
    if n[r]:
      gone = slice(sink, sink + n[r])
      np.testing.assert_allclose(np.asarray(c.comp_k[r]), k[r, gone].mean(0), atol=1e-5)
      np.testing.assert_allclose(np.asarray(c.comp_v[r]), v[r, gone].mean(0), atol=1e-5)


def test_dense_jnp_reference_agrees_with_loops():
  q, k, v = _inputs(1)
  lengths = np.array([30, 13])
  want = slow_reference(q, k, v, lengths, 3, 5, streaming=[True, False])
  got = dense_compensated(q, k, v, jnp.asarray(lengths), 3, 5, streaming=np.array([True, False]))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_duo_layer_with_compensated_streaming_part():
  q, k, v = _inputs(3, h=3)
  lengths, prompts = np.array([30, 26]), np.array([11, 26])
  cfg = tiny_config(num_layers=1, num_heads=6, num_kv_heads=3, head_dim=8)
  mask = HeadMask.from_array([[True, False, False]], 3, 5)
  c0 = kvc.init_cache(cfg, 2, 32, mask, jnp.float32, compensation=True).layers[0]
  assert isinstance(c0, kvc.DuoLayerCache) and isinstance(c0.stream, compensation.CompLayerCache)
  got, _, _ = serve(c0, q, k, v, lengths, prompts, 8)
  want = slow_reference(q, k, v, lengths, 3, 5, streaming=[False, True, True])
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_cache_bytes_count_compensation():
  cfg = tiny_config()
  mask = HeadMask.from_array([[True, False], [False, False], [True, True]], 4, 8)
  for comp in (False, True):
    c = kvc.init_cache(cfg, 3, 40, mask, jnp.bfloat16, compensation=comp)
    want = kvc.kv_cache_bytes(cfg, mask, 40, 3, jnp.bfloat16, compensation=comp)
    assert want == kvc.cache_nbytes(c)


def test_model_logits_and_generate_with_compensation():
  """Through the whole model: chunked prefill logits equal a forward_sequence with
  the dense compensated attention, and greedy generation on the compensated cache
  picks the dense reference's argmax at every step."""
  cfg = tiny_config(num_layers=2)
  params = random_params(cfg, 0, 0.2)
  mask = HeadMask.from_array([[False, True], [False, False]], 3, 5)  # a duo and a streaming layer
  served_params = llama.apply_head_mask(params, mask)
  rng = np.random.default_rng(0)
  prompts = [[int(x) for x in rng.integers(3, cfg.vocab_size, n)] for n in (29, 18)]

  @jax.jit
  def dense(tokens, lengths):  # original head order, per-layer streaming flags
    def attn(i, q, k, v, lens):
      return dense_compensated(q, k, v, lens, 3, 5, streaming=~mask.as_array()[i])
    h = llama.forward_sequence(params, cfg, tokens, lengths, attn)
    return llama.logits_from_hidden(params, h)

  def dense_rows(seqs):
    tokens = np.zeros((2, 40), np.int32)
    for r, s in enumerate(seqs):
      tokens[r, :len(s)] = s
    return np.asarray(dense(jnp.asarray(tokens), jnp.asarray([len(s) for s in seqs], jnp.int32)))

  served = forward_logits(served_params, cfg, prompts, mask, chunk=7, compensation=True)
  want = dense_rows(prompts)
  for r, p in enumerate(prompts):
    np.testing.assert_allclose(served[r], want[r, :len(p)], atol=2e-4, rtol=2e-4)

  out = generate(served_params, cfg, prompts, 5, mask, prefill_chunk=8, cache_dtype=jnp.float32,
                 compensation=True)
  want = dense_rows([p + t for p, t in zip(prompts, out.tokens)])
  for r, (p, t) in enumerate(zip(prompts, out.tokens)):
    assert len(t) == 5
    np.testing.assert_array_equal(want[r, len(p) - 1:len(p) + 4].argmax(-1), t)
