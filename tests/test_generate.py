"""Generation: ragged batches, sampling, EOS, the full-cache write path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax import cache as kvc
from duojax.config import tiny_config
from duojax.engine import InputError, SamplingSettings, generate, sample
from duojax.model import init_params


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config(eos_token_ids=(96,))
  return cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.3)


def test_batch_rows_equal_running_alone(tiny):
  cfg, params = tiny
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, 90, n)) for n in (23, 5, 40)]
  batch = generate(params, cfg, prompts, max_new_tokens=12, prefill_chunk=16)
  for p, row in zip(prompts, batch.tokens):
    alone = generate(params, cfg, [p], max_new_tokens=12, prefill_chunk=16)
    assert row == alone.tokens[0]


def test_sampling_is_seeded(tiny):
  cfg, params = tiny
  s = SamplingSettings(temperature=1.0, top_p=0.9)
  a = generate(params, cfg, [[4, 5, 6]], 16, sampling=s, seed=7).tokens
  b = generate(params, cfg, [[4, 5, 6]], 16, sampling=s, seed=7).tokens
  c = generate(params, cfg, [[4, 5, 6]], 16, sampling=s, seed=8).tokens
  assert a == b and a != c


def test_top_p_keeps_only_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  toks = {int(sample(logits, k, SamplingSettings(1.0, 0.7))[0]) for k in keys}
  assert toks == {0, 1}


def test_stops_at_eos(tiny):
  cfg, params = tiny
  free = generate(params, cfg, [[3, 4, 5]], max_new_tokens=10).tokens[0]
  eos = free[2]
  assert eos not in free[:2]
  cfg2 = tiny_config(eos_token_ids=(eos,))
  r = generate(params, cfg2, [[3, 4, 5], [6, 7]], max_new_tokens=10)
  assert r.tokens[0] == free[:3]  # stops at (and keeps) the EOS token


@pytest.mark.parametrize("max_new", [8, 12, 13])  # runs of 8, of 6, and the plain loop
def test_decode_in_runs_equals_reprefilling_each_token(tiny, max_new):
  """engine.decode steps in runs of up to SYNC_EVERY (no host sync inside a run); rows
  that stop mid-run must still end at their EOS, the others run on to max_new. The oracle
  re-prefills prompt + tokens so far for every token (no decode loop at all)."""
  cfg, params = tiny
  prompts = [[3, 4, 5], [6, 7, 8, 9, 10]]
  free = [generate(params, cfg, [p], max_new_tokens=max_new).tokens[0] for p in prompts]
  eos = free[0][4]  # row 0 stops at its 5th token, inside the first run
  cfg2 = tiny_config(eos_token_ids=(eos,))

  def oracle(p):
    out = []
    while len(out) < max_new and (not out or out[-1] != eos):
      out.append(generate(params, cfg2, [p + out], max_new_tokens=1).tokens[0][0])
    return out

  r = generate(params, cfg2, prompts, max_new_tokens=max_new)
  want = [oracle(p) for p in prompts]
  assert r.tokens == want
  assert len(want[0]) == 5 and want[0][-1] == eos
  assert r.decode_steps >= max(len(w) for w in want)


def test_write_full_drops_padding_and_overflow():
  c = kvc.FullLayerCache(jnp.zeros((2, 6, 1, 1)), jnp.zeros((2, 6, 1, 1)))
  k = jnp.arange(1, 9, dtype=jnp.float32).reshape(2, 4, 1, 1)
  out = kvc.write_full(c, k, k, jnp.array([0, 4]), jnp.array([3, 4]))
  np.testing.assert_array_equal(out.k[0, :, 0, 0], [1, 2, 3, 0, 0, 0])
  np.testing.assert_array_equal(out.k[1, :, 0, 0], [0, 0, 0, 0, 5, 6])  # 7, 8 past capacity


def test_prompt_longer_than_context_is_refused(tiny):
  cfg, params = tiny
  with pytest.raises(InputError, match="exceeds the model's context"):
    generate(params, cfg, [[1] * 2040], max_new_tokens=16)


def test_bad_sampling_settings():
  with pytest.raises(InputError, match="top-p"):
    SamplingSettings(top_p=0.0)
  with pytest.raises(InputError, match="temperature"):
    SamplingSettings(temperature=-1)
