"""The NNX model: logical axis names on every weight, Gate variables, the plain-dict
builders, and the functional handle through jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from duojax import cache as kvc
from duojax.config import tiny_config
from duojax.engine import pad_batch, prefill, prefill_step
from duojax.identify import duo
from duojax.model import Gate, Llama, handle, llama
from duojax.pattern import HeadMask
from helpers import AGREED_AXES

# The agreed names (tests/helpers.py), not read from the model, so a renamed axis fails.
WANT = AGREED_AXES
# Qwen2 biases + Qwen3 norms + untied head + odd sizes in one config; MHA for the mask tests.
FULL = tiny_config(num_layers=3, num_heads=6, num_kv_heads=3, head_dim=6, hidden_size=30,
                   intermediate_size=22, vocab_size=53, attention_bias=True, qk_norm=True,
                   tie_word_embeddings=False)
MHA = tiny_config(num_layers=2, num_heads=4, num_kv_heads=4, hidden_size=32)


def _rand_params(cfg, seed=0):
  return llama.init_params(cfg, jax.random.PRNGKey(seed), scale=0.3)


def _vars(state):
  """{(path...): Variable} of an nnx.State."""
  return dict(nnx.to_flat_state(state))


def test_every_param_carries_its_logical_axis_names():
  model = Llama.from_params(FULL, _rand_params(FULL))
  seen = set()
  for path, var in _vars(nnx.state(model, nnx.Param)).items():
    name = path[-1]
    seen.add(name)
    assert isinstance(var, nnx.Param)
    assert tuple(var.get_metadata()["out_sharding"]) == WANT[name], path
    assert len(WANT[name]) == var[...].ndim
  assert seen == set(WANT)
  # stacked layers (the gate-training scan) put "layers" in front
  stacked = Llama(FULL, llama.stack_layers(_rand_params(FULL)))
  for path, var in _vars(nnx.state(stacked, nnx.Param)).items():
    want = (("layers",) if path[0] == "layers" else ()) + WANT[path[-1]]
    assert tuple(var.get_metadata()["out_sharding"]) == want, path
  # sharding tools read them: logical names come out as the partition spec
  spec = nnx.get_partition_spec(nnx.state(model))
  assert tuple(spec["layers"][1]["attn"]["wq"].get_value()) == WANT["wq"]


@pytest.mark.parametrize("stacked", [False, True])
def test_gate_state_is_exactly_the_gates(stacked):
  params = _rand_params(FULL)
  params = llama.stack_layers(params) if stacked else params
  gates = jnp.asarray(np.random.default_rng(1).random((FULL.num_layers, FULL.num_kv_heads)),
                      jnp.float32)
  model = Llama(FULL, params, gates=gates)
  gs = _vars(nnx.state(model, Gate))
  assert all(isinstance(v, Gate) and not isinstance(v, nnx.Param) for v in gs.values())
  assert all(p[-1] == "gate" for p in gs)
  if stacked:
    (v,) = gs.values()
    np.testing.assert_array_equal(v[...], gates)
    assert tuple(v.get_metadata()["out_sharding"]) == ("layers", "kv_heads")
  else:
    assert sorted(p[1] for p in gs) == list(range(FULL.num_layers))
    for p, v in gs.items():
      np.testing.assert_array_equal(v[...], gates[p[1]])
      assert tuple(v.get_metadata()["out_sharding"]) == ("kv_heads",)
  # no gate among the params, and every leaf of the model is one or the other
  assert not any(p[-1] == "gate" for p in _vars(nnx.state(model, nnx.Param)))
  n_all = len(jax.tree_util.tree_leaves(nnx.state(model)))
  assert n_all == len(gs) + len(jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
  # the model without gates has none; the plain dict never holds them
  assert not _vars(nnx.state(Llama(FULL, params), Gate))
  back = model.to_params()
  assert all("gate" not in lp for lp in back["layers"]) if not stacked else "gate" not in back["layers"]


def test_gradient_wrt_gate_state_equals_gate_loss_gradient():
  """Training differentiates nnx.state(model, Gate); the public gate_loss takes an
  array: same values and gradients, both students."""
  cfg = MHA
  params = llama.stack_layers(_rand_params(cfg, 2))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
  lengths = jnp.asarray([24, 17], jnp.int32)
  mask = jnp.arange(24)[None] >= 6
  gates = jnp.asarray(rng.random((cfg.num_layers, cfg.num_kv_heads)) * 1.2 - 0.1, jnp.float32)
  kw = dict(sink=2, recent=4, reg=0.05, remat=True)
  for student in duo.STUDENTS:
    (v1, _), g1 = jax.value_and_grad(duo.gate_loss, has_aux=True)(
        gates, params, cfg, tokens, lengths, mask, student=student, **kw)
    gd, gstate, frozen = nnx.split(Llama(cfg, params, gates=gates), Gate, ...)
    gstate = nnx.to_pure_dict(gstate)
    assert jax.tree_util.tree_structure(gstate) == jax.tree_util.tree_structure(
        duo.gate_state(gates))
    f = lambda gs: duo.model_gate_loss(nnx.merge(gd, gs, frozen), tokens, lengths, mask,
                                       student=student, **kw)
    (v2, _), g2 = jax.value_and_grad(f, has_aux=True)(gstate)
    assert float(v1) == float(v2)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(duo.TrainState(g2, None, 0).gates))
    assert np.abs(np.asarray(g1)).max() > 0


def test_params_round_trip_through_the_model_with_a_mask():
  params = _rand_params(FULL, 3)
  mask = HeadMask.from_array(np.array([[True, False, True], [False, False, False],
                                       [False, True, True]]), 2, 3)
  m = Llama.from_params(FULL, params, mask)
  back = m.to_params()
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  served = m.to_params(reordered=True)
  # layer 2: KV heads (1, 2) first, then 0; wq's KV axis is 1
  np.testing.assert_array_equal(served["layers"][2]["wq"],
                                np.asarray(params["layers"][2]["wq"])[:, [1, 2, 0]])
  np.testing.assert_array_equal(served["layers"][2]["bk"],
                                np.asarray(params["layers"][2]["bk"])[[1, 2, 0]])
  # the cheap builder (cached graphdef, re-nested dict) equals splitting the module
  h1, h2 = handle.split(m), handle.from_params(FULL, params, mask)
  assert h1.graph == h2.graph and hash(h1.graph) == hash(h2.graph)
  jax.tree_util.tree_map(np.testing.assert_array_equal, h1.state, h2.state)
  jax.tree_util.tree_map(np.testing.assert_array_equal, h2.params, served)
  # the pattern is in the graphdef: another mask, another graphdef
  assert handle.from_params(FULL, params).graph != h2.graph


def test_bad_params_name_the_fix():
  params = _rand_params(FULL)
  del params["layers"][1]["bq"]
  with pytest.raises(ValueError, match="convert the checkpoint again"):
    Llama.from_params(FULL, params)
  with pytest.raises(ValueError, match="convert the checkpoint again"):
    handle.from_params(FULL, params)
  p2 = _rand_params(FULL)
  del p2["lm_head"]
  with pytest.raises(ValueError, match="tie_word_embeddings"):
    Llama.from_params(FULL, p2)


def test_handle_prefill_equals_dict_prefill_and_guards_the_pattern():
  """The handle (graphdef static, state a plain dict) through the jitted step gives the
  dict path's numbers, compiles once per pattern, and refuses a cache of another one."""
  cfg = FULL
  params = _rand_params(cfg, 4)
  mask = HeadMask.from_array(np.array([[True, False, False], [False, False, False],
                                       [True, True, True]]), 2, 3)
  prompts = [list(range(3, 16)), list(range(5, 12))]
  tokens, lengths = pad_batch(prompts, 8)
  h = handle.from_params(cfg, params, mask)
  out = []
  for model in (h, llama.apply_head_mask(params, mask)):
    cache = kvc.init_cache(cfg, 2, 32, mask, jnp.float32)
    last, cache, lg = prefill(model, cfg, tokens, lengths, cache, 8, all_logits=True)
    out.append((np.asarray(last), np.asarray(lg)))
  np.testing.assert_array_equal(out[0][0], out[1][0])
  np.testing.assert_array_equal(out[0][1], out[1][1])
  # a second handle of the same pattern hits the compiled step (no new trace)
  before = prefill_step._cache_size()
  cache = kvc.init_cache(cfg, 2, 32, mask, jnp.float32)
  prefill(handle.from_params(cfg, params, mask), cfg, tokens, lengths, cache, 8, all_logits=True)
  assert prefill_step._cache_size() == before
  # a cache built for another pattern than the model's: a clear error
  cache = kvc.init_cache(cfg, 2, 32, None, jnp.float32)
  with pytest.raises(ValueError, match="same HeadMask"):
    prefill(h, cfg, tokens, lengths, cache, 8)


def test_to_params_of_a_handle_gives_hf_order_back():
  params = _rand_params(MHA, 5)
  mask = HeadMask.from_array(np.array([[False, True, False, True], [True, False, False, False]]),
                             1, 2)
  h = handle.from_params(MHA, params, mask)
  jax.tree_util.tree_map(np.testing.assert_array_equal, llama.to_params(h), params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, llama.to_params(h, reordered=True),
                         llama.apply_head_mask(params, mask))
