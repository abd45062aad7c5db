"""DuoAttention serving (split cache, chunked prefill, decode) equals a dense
full-length reference with a per-head mask (causal / streaming)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax import cache as kvc
from duojax.attention.reference import dense_attention
from duojax.config import tiny_config
from duojax.engine import pad_batch, prefill, prefill_step
from duojax.model import handle, llama
from duojax.pattern import HeadMask

SINK, RECENT = 3, 5


def dense_logits(params, cfg, tokens, lengths, mask):
  """Reference: whole sequences, original head order, streaming mask per head."""
  def attn(i, q, k, v, lens):
    stream = None if mask is None else jnp.asarray(~mask.as_array()[i])
    return dense_attention(q, k, v, lens, stream, SINK, RECENT)
  h = llama.forward_sequence(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths), attn)
  return np.asarray(llama.logits_from_hidden(params, h))


@jax.jit
def _decode_one(model, tok, cache):
  m = model.module()  # merged inside the trace: the graphdef is static
  h, cache = m(tok[:, None], cache, jnp.ones(tok.shape, jnp.int32))
  return m.logits(h[:, 0]), cache


def served_logits(params, cfg, seqs, prompt_lens, mask, chunk):
  """Prefill each row's prompt in chunks, then teacher-forced decode of the rest.

  Returns per row the logits at every position of its sequence [len, V].
  """
  p = handle.from_params(cfg, params, mask)  # the NNX model, reordered for the mask
  prompts = [s[:n] for s, n in zip(seqs, prompt_lens)]
  tokens, lengths = pad_batch(prompts, chunk)
  n_dec = max(len(s) - n for s, n in zip(seqs, prompt_lens))
  cache = kvc.init_cache(cfg, len(seqs), tokens.shape[1] + n_dec, mask, jnp.float32)
  _, cache, logits = prefill(p, cfg, tokens, lengths, cache, chunk, all_logits=True)
  logits = np.asarray(logits)
  out = [list(logits[b, :n]) for b, n in enumerate(prompt_lens)]
  for i in range(n_dec):
    tok = np.array([s[min(n + i, len(s) - 1)] for s, n in zip(seqs, prompt_lens)], np.int32)
    lg, cache = _decode_one(p, jnp.asarray(tok), cache)
    for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
      if n + i < len(s):
        out[b].append(np.asarray(lg[b]))
  return [np.stack(o) for o in out]


def random_mask(cfg, seed):
  rng = np.random.default_rng(seed)
  m = rng.random((cfg.num_layers, cfg.num_kv_heads)) < 0.5
  m[0, :] = True  # one all-retrieval layer
  m[1, :] = False  # one all-streaming layer; the rest uneven
  return HeadMask.from_array(m, SINK, RECENT)


CONFIGS = {"gqa": tiny_config(num_layers=4, num_kv_heads=3, num_heads=6, head_dim=8),
           "mha": tiny_config(num_layers=3, num_kv_heads=4, num_heads=4, hidden_size=32)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
  cfg = CONFIGS[request.param]
  return cfg, llama.init_params(cfg, jax.random.PRNGKey(0), scale=0.3)


@pytest.mark.parametrize("chunk", [7, 8])
@pytest.mark.parametrize("kind", ["random", "all_streaming", "all_retrieval"])
def test_duo_prefill_and_decode_equal_dense_reference(model, chunk, kind):
  cfg, params = model
  mask = {"random": random_mask(cfg, 1),
          "all_streaming": HeadMask.all_streaming(cfg.num_layers, cfg.num_kv_heads, SINK, RECENT),
          "all_retrieval": HeadMask.all_retrieval(cfg.num_layers, cfg.num_kv_heads, SINK, RECENT),
          }[kind]
  rng = np.random.default_rng(2)
  prompt_lens = [19, 8, 30]
  n_dec = 64
  seqs = [list(rng.integers(0, cfg.vocab_size, n + n_dec)) for n in prompt_lens]
  got = served_logits(params, cfg, seqs, prompt_lens, mask, chunk)
  tokens, lengths = pad_batch(seqs, 1)
  ref = dense_logits(params, cfg, tokens, lengths, mask)
  for b, g in enumerate(got):
    r = ref[b, :len(g)]
    # fp32 through 4 layers and 94 positions: relative to the logit scale
    assert np.abs(g - r).max() <= 2e-5 * np.abs(r).max(), np.abs(g - r).max()


def test_all_retrieval_duo_equals_full_model(model):
  cfg, params = model
  rng = np.random.default_rng(3)
  seqs = [list(rng.integers(0, cfg.vocab_size, n)) for n in (20, 9)]
  mask = HeadMask.all_retrieval(cfg.num_layers, cfg.num_kv_heads, SINK, RECENT)
  full = served_logits(params, cfg, seqs, [12, 5], None, 8)
  duo = served_logits(params, cfg, seqs, [12, 5], mask, 8)
  for a, b in zip(full, duo):
    np.testing.assert_array_equal(a, b)


def test_streaming_mask_really_changes_the_output(model):
  """Guards the tests above against a reference that ignores the mask."""
  cfg, params = model
  rng = np.random.default_rng(4)
  tokens, lengths = pad_batch([list(rng.integers(0, cfg.vocab_size, 30))], 1)
  mask = HeadMask.all_streaming(cfg.num_layers, cfg.num_kv_heads, SINK, RECENT)
  a = dense_logits(params, cfg, tokens, lengths, None)
  b = dense_logits(params, cfg, tokens, lengths, mask)
  assert np.allclose(a[0, :SINK + RECENT], b[0, :SINK + RECENT], atol=1e-5)
  assert np.abs(a[0, -1] - b[0, -1]).max() > 1e-3


@pytest.mark.parametrize("mask_kind", [None, "random", "streaming"])
def test_kv_cache_bytes_match_allocated_arrays(mask_kind):
  cfg = CONFIGS["gqa"]
  mask = {None: None, "random": random_mask(cfg, 5),
          "streaming": HeadMask.all_streaming(cfg.num_layers, cfg.num_kv_heads, SINK, RECENT)}[mask_kind]
  for length, batch, dtype in [(100, 1, jnp.bfloat16), (333, 3, jnp.float32)]:
    c = kvc.init_cache(cfg, batch, length, mask, dtype)
    assert kvc.kv_cache_bytes(cfg, mask, length, batch, dtype) == kvc.cache_nbytes(c)


def test_streaming_heads_hold_no_full_length_buffer_during_prefill():
  """No array in the compiled prefill step has the sequence capacity as a dim."""
  cfg = CONFIGS["gqa"]
  capacity = 1237  # a size no other dimension has
  mask = HeadMask.all_streaming(cfg.num_layers, cfg.num_kv_heads, SINK, RECENT)
  params = handle.init(cfg, jax.random.PRNGKey(0), mask=mask)
  cache = kvc.init_cache(cfg, 2, capacity, mask, jnp.float32)
  hid = jnp.zeros((2, cfg.hidden_size))
  n = jnp.array([16, 4], jnp.int32)
  jaxpr = jax.make_jaxpr(
      lambda p, t, c: prefill_step(p, cfg, t, c, n, n, hid, "xla"))(params, jnp.zeros((2, 16), jnp.int32), cache)
  shapes = {tuple(v.aval.shape) for eq in jaxpr.jaxpr.eqns for v in eq.outvars}
  shapes |= {tuple(x.shape) for x in jax.tree_util.tree_leaves(cache)}
  assert not [s for s in shapes if capacity in s]
  # and with a mixed mask the full-length buffers have only the retrieval heads
  mask = random_mask(cfg, 1)
  cache = kvc.init_cache(cfg, 2, capacity, mask, jnp.float32)
  for l, lc in enumerate(cache.layers):
    for leaf in jax.tree_util.tree_leaves(lc):
      if capacity in leaf.shape:
        assert leaf.shape[2] == mask.n_retrieval(l)


def test_fused_duo_decode_dispatch_equals_split_path(model):
  """A backend with a `duo_decode` op (here the plain reference, standing in for
  the GPU kernel) takes the fused route in decode; tokens equal the split route."""
  from duojax import engine
  from duojax.attention import dispatch, reference
  cfg, params = model
  dispatch.register_backend("fused-ref", {"duo_decode": reference.duo_decode_attention})
  calls = []
  real = reference.duo_decode_attention

  def counted(*a):
    calls.append(a[0].shape)
    return real(*a)

  dispatch.register_backend("fused-ref", {"duo_decode": counted})
  mask = random_mask(cfg, 3)
  p = llama.apply_head_mask(params, mask)
  rng = np.random.default_rng(5)
  prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in (19, 6, 11)]
  a = engine.generate(p, cfg, prompts, 9, mask=mask, prefill_chunk=8, backend="fused-ref")
  b = engine.generate(p, cfg, prompts, 9, mask=mask, prefill_chunk=8, backend="xla")
  assert a.tokens == b.tokens
  n_duo = sum(0 < sum(r) < len(r) for r in mask.as_array())  # layers with both kinds
  assert n_duo > 0 and len(calls) == n_duo  # traced once per mixed layer


# -- the streaming window, pinned by an independently written key set ---------------

def _window_oracle(q, k, v, t, sink, recent):
  """One query at position t over keys 0..t: the visible set written out as a list
  (sink tokens, then the `recent` newest tokens, the query's own included)."""
  keys = sorted(set(range(min(sink, t + 1))) | set(range(max(0, t - recent + 1), t + 1)))
  s = np.einsum("hgd,jhd->hgj", q, k[keys]) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("hgj,jhd->hgd", p, v[keys]), keys


@pytest.mark.parametrize("sink, recent, chunk", [(4, 8, 40), (3, 5, 7), (0, 6, 4), (2, 1, 9)])
def test_streaming_window_prefill_and_decode_against_written_out_key_set(sink, recent, chunk):
  """Semantics: the query at t sees j < sink and t - recent < j <= t (recent keys with
  itself), in prefill chunks and in every decode step alike. A window of recent + 1
  (the official decode) or recent - 1 fails here."""
  from duojax.attention import dispatch
  rng = np.random.default_rng(7)
  b, h, g, d, n_prompt, n_dec = 1, 2, 2, 8, 61, 20
  n = n_prompt + n_dec
  q = rng.standard_normal((n, h, g, d)).astype(np.float32) * 2
  k = rng.standard_normal((n, h, d)).astype(np.float32) * 2
  v = rng.standard_normal((n, h, d)).astype(np.float32)
  c = kvc.StreamLayerCache(jnp.zeros((b, sink + recent, h, d)), jnp.zeros((b, sink + recent, h, d)),
                           sink, recent)
  outs = []
  pos = 0
  while pos < n:  # chunks over the prompt, then one token at a time
    t = min(chunk, n_prompt - pos) if pos < n_prompt else 1
    o, c = dispatch.attend(c, jnp.asarray(q[None, pos:pos + t]), jnp.asarray(k[None, pos:pos + t]),
                           jnp.asarray(v[None, pos:pos + t]), jnp.array([pos], jnp.int32),
                           jnp.array([t], jnp.int32), "xla")
    outs.append(np.asarray(o[0]))
    pos += t
  got = np.concatenate(outs)
  sizes = set()
  for t in range(n):
    want, keys = _window_oracle(q[t], k, v, t, sink, recent)
    sizes.add(len(keys))
    np.testing.assert_allclose(got[t], want, rtol=2e-5, atol=2e-5, err_msg=f"t={t}")
  assert max(sizes) == sink + recent  # the full window was reached
  # an off-by-one window really gives other outputs (the oracle can tell)
  wide, _ = _window_oracle(q[n - 1], k, v, n - 1, sink, recent + 1)
  assert np.abs(wide - got[n - 1]).max() > 1e-3


@pytest.mark.parametrize("chunk", [40])
def test_duo_equivalence_chunk_much_longer_than_sink_plus_recent(model, chunk):
  """sink 4 + recent 8 = a ring of 8 that each 40-token chunk overruns five times."""
  cfg, params = model
  sink, recent = 4, 8
  m = random_mask(cfg, 6)
  mask = HeadMask(m.retrieval, sink, recent)
  rng = np.random.default_rng(8)
  prompt_lens = [90, 41, 17]
  seqs = [list(rng.integers(0, cfg.vocab_size, n + 24)) for n in prompt_lens]
  got = served_logits(params, cfg, seqs, prompt_lens, mask, chunk)
  tokens, lengths = pad_batch(seqs, 1)

  def attn(i, q, k, v, lens):
    return dense_attention(q, k, v, lens, jnp.asarray(~mask.as_array()[i]), sink, recent)
  h = llama.forward_sequence(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths), attn)
  ref = np.asarray(llama.logits_from_hidden(params, h))
  for b, g in enumerate(got):
    r = ref[b, :len(g)]
    assert np.abs(g - r).max() <= 2e-5 * np.abs(r).max(), np.abs(g - r).max()
