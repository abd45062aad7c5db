"""Blocked whole-sequence attention (duojax/attention/training.py) against the
reference and an independent numpy oracle: values, gradients w.r.t. q, k, v and
the gates, ragged lengths, GQA / MHA, T not a multiple of the block, sink /
recent edge cases, and the memory it was written to save.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax.attention import reference, training
from helpers import gated_oracle


def _inputs(seed, b, t, hkv, g, d, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, hkv, g, d)), dtype)
  k = jnp.asarray(rng.standard_normal((b, t, hkv, d)), dtype)
  v = jnp.asarray(rng.standard_normal((b, t, hkv, d)), dtype)
  return q, k, v


# (B, T, Hkv, G, D, lengths, sink, recent, block)
CASES = [
    (2, 37, 2, 3, 8, (37, 23), 3, 5, 8),    # GQA, ragged, odd T, 5 blocks over 4 segments
    (1, 29, 3, 1, 4, (29,), 0, 4, 7),       # MHA, no sink
    (2, 20, 1, 2, 8, (20, 1), 4, 1, 6),     # recent 1: only the token itself past the sink
    (1, 19, 2, 2, 8, (19,), 25, 3, 4),      # sink longer than the sequence
    (2, 21, 2, 1, 8, (0, 21), 2, 40, 5),    # recent longer than the sequence; an empty row
    (1, 16, 2, 2, 8, (16,), 2, 3, 16),      # one block
    (1, 13, 2, 2, 8, (13,), 5, 0, 4),       # recent 0: sink keys only
]


@pytest.mark.parametrize("b,t,hkv,g,d,lengths,sink,recent,block", CASES)
def test_blocked_matches_oracle_and_reference(b, t, hkv, g, d, lengths, sink, recent, block):
  q, k, v = _inputs(t * 7 + b, b, t, hkv, g, d)
  lens = jnp.asarray(lengths, jnp.int32)
  gates = np.linspace(0.15, 0.9, hkv)
  variants = {"causal": None, "streaming": np.ones(hkv, bool)}

  @jax.jit  # one compile per case: eager lax.map would dispatch op by op
  def run(q, k, v, a):
    outs = {"gated": training.gated_attention(q, k, v, a, lens, sink, recent, block=block)}
    for name, heads in variants.items():
      outs[name] = training.dense_attention(q, k, v, lens, heads, sink, recent, block=block)
    return outs

  outs = run(q, k, v, jnp.asarray(gates, jnp.float32))
  np.testing.assert_allclose(outs["gated"], gated_oracle(q, k, v, lengths, gates, sink, recent),
                             atol=2e-5)
  ones = np.ones(hkv)
  np.testing.assert_allclose(outs["causal"], gated_oracle(q, k, v, lengths, ones, sink, recent),
                             atol=2e-5)
  np.testing.assert_allclose(outs["streaming"], gated_oracle(q, k, v, lengths, 0 * ones, sink, recent),
                             atol=2e-5)


@pytest.mark.parametrize("b,t,hkv,g,d,lengths,sink,recent,block",
                         [CASES[0], CASES[4]])
def test_blocked_gradients_equal_reference(b, t, hkv, g, d, lengths, sink, recent, block):
  q, k, v = _inputs(t + 100 * b, b, t, hkv, g, d)
  lens = jnp.asarray(lengths, jnp.int32)
  gates = jnp.asarray(np.linspace(0.2, 0.8, hkv), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  stream_heads = jnp.arange(hkv) % 2 == 1  # traced inside jit: the mixed one-pass path

  def losses(mod, **kw):
    def gated(q, k, v, a):
      return jnp.sum(w * mod.gated_attention(q, k, v, a, lens, sink, recent, **kw))

    def dense(q, k, v, a, heads):
      c = mod.dense_attention(q, k, v, lens, **kw)
      s = mod.dense_attention(q, k, v, lens, np.ones(hkv, bool), sink, recent, **kw)
      m = mod.dense_attention(q, k, v, lens, heads, sink, recent, **kw)
      return jnp.sum(w * (c + 0.5 * s + 0.25 * m))
    return (jax.jit(jax.grad(gated, argnums=(0, 1, 2, 3))),
            jax.jit(jax.grad(dense, argnums=(0, 1, 2))))

  (rg, rd), (bg, bd) = losses(reference), losses(training, block=block)
  for want, have in zip(rg(q, k, v, gates), bg(q, k, v, gates)):
    np.testing.assert_allclose(have, want, atol=1e-5, rtol=1e-5)
  for want, have in zip(rd(q, k, v, gates, stream_heads), bd(q, k, v, gates, stream_heads)):
    np.testing.assert_allclose(have, want, atol=1e-5, rtol=1e-5)
  if sink < t and recent < t:  # else streaming == causal and the gate gradient is 0
    assert float(jnp.abs(rg(q, k, v, gates)[3]).max()) > 1e-3


def test_blocked_bf16_close_to_reference():
  q, k, v = _inputs(5, 2, 24, 2, 3, 16, jnp.bfloat16)
  lens = jnp.asarray([24, 17], jnp.int32)
  a = jnp.asarray([0.3, 0.9])
  want = reference.gated_attention(q, k, v, a, lens, 4, 8).astype(jnp.float32)
  have = jax.jit(lambda *x: training.gated_attention(*x, lens, 4, 8, block=7))(q, k, v, a)
  assert have.dtype == jnp.bfloat16
  np.testing.assert_allclose(have.astype(jnp.float32), want, atol=2e-2)


def test_pick_block():
  assert training.pick_block(1, 2048, 14) is None  # small: the reference path
  assert training.pick_block(1, 32768, 14) == 256  # Qwen2.5-0.5B: 14 query heads
  assert training.pick_block(1, 16384, 14) == 512
  assert training.pick_block(1, 4096, 14) == 2048
  assert training.pick_block(4, 32768, 32) == 64  # clipped up: never slivers of rows
  q = jnp.zeros((1, 4, 1, 1, 2))
  with pytest.raises(ValueError, match="block must be a positive int"):
    training.dense_attention(q, q[..., 0, :], q[..., 0, :], jnp.ones(1, jnp.int32), block=0)


def test_blocked_grad_memory_is_o_block_t():
  """The reason the module exists: compiled temp memory of a gated-attention
  gradient at T = 1024 drops by a large factor against the reference."""
  t, hkv, g, d = 1024, 1, 2, 16
  spec = jax.ShapeDtypeStruct
  args = (spec((1, t, hkv, g, d), jnp.float32), spec((1, t, hkv, d), jnp.float32),
          spec((1, t, hkv, d), jnp.float32), spec((hkv,), jnp.float32))
  lens = jnp.asarray([t], jnp.int32)

  def temp(fn):
    loss = lambda q, k, v, a: jnp.sum(fn(q, k, v, a, lens, 16, 64))
    c = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
    return c.memory_analysis().temp_size_in_bytes

  ref = temp(reference.gated_attention)
  blk = temp(lambda *a: training.gated_attention(*a, block=32))
  square = hkv * g * t * t * 4  # one fp32 logits buffer of the reference
  assert ref >= square, (ref, square)
  assert blk < square / 2 and 8 * blk < ref, (blk, ref)


def test_gate_loss_grad_blocked_equals_reference(monkeypatch):
  """Gate training (identify/duo.py) through this module: forcing the blocked
  path at a tiny T leaves the loss and its gate gradient unchanged (the deployed
  student: gated blocks; the streaming-only path of the official student is
  pinned by the attention-level gradient test above)."""
  from duojax.config import tiny_config
  from duojax.identify import duo
  from helpers import random_params
  cfg = tiny_config(num_layers=2)
  params = random_params(cfg, 3, 0.3)
  rng = np.random.default_rng(0)
  t = 21
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, t)), jnp.int32)
  lengths = jnp.asarray([t, 15], jnp.int32)
  loss_mask = jnp.asarray(np.arange(t)[None, :] >= np.array([[9], [6]]))
  gates = jnp.asarray([[0.3, 1.0], [0.0, 0.6]], jnp.float32)

  def grad():
    f = lambda g: duo.gate_loss(g, params, cfg, tokens, lengths, loss_mask, sink=2, recent=4,
                                reg=0.05)[0]
    return jax.jit(jax.value_and_grad(f))(gates)

  want_loss, want = grad()  # tiny T: the reference path
  calls = []
  monkeypatch.setattr(training, "pick_block", lambda *a: calls.append(a) or 4)
  got_loss, got = grad()
  assert calls, "gate training did not go through duojax.attention.training"
  assert float(want_loss) > 1e-4
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
  assert float(jnp.abs(want).max()) > 1e-5
