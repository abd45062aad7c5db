"""Gate training's mixed softmax with wide logit ranges (long contexts, Qwen-like logits).

The streaming softmax must be normalised by its own max: with the causal max, a query whose
largest logit lies outside its window underflows every windowed exp, the value is wrong and
the backward overflows to NaN (what turned Qwen2.5's gates NaN at 32K tokens).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax.attention import reference, training
from helpers import gated_oracle


@pytest.mark.parametrize("fn", ["reference", "blocked"])
def test_gated_attention_wide_logits_exact_and_finite(fn):
  b, t, h, g, d, sink, recent = 2, 96, 2, 2, 8, 4, 8
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  q = jax.random.normal(ks[0], (b, t, h, g, d)) * 12.0  # logits spread over hundreds
  k = jax.random.normal(ks[1], (b, t, h, d)) * 12.0
  v = jax.random.normal(ks[2], (b, t, h, d))
  lengths = jnp.array([t, 61])
  gates = jnp.array([0.7, 0.2])
  if fn == "reference":
    att = lambda q, k, v, a: reference.gated_attention(q, k, v, a, lengths, sink, recent)
  else:
    att = lambda q, k, v, a: training.gated_attention(q, k, v, a, lengths, sink, recent,
                                                      block=32)
  got = np.asarray(att(q, k, v, gates))
  want = gated_oracle(q, k, v, np.asarray(lengths), np.asarray(gates), sink, recent)
  valid = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=1e-4)
  grads = jax.grad(lambda *xs: jnp.sum(att(*xs) ** 2), argnums=(0, 1, 2, 3))(q, k, v, gates)
  for x in grads:
    assert bool(jnp.isfinite(x).all())
