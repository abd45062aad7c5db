"""int8 weights (qwix QArrays, duojax/model/quant.py) on a device mesh.

Runs on 6 fake CPU devices: in a plain pytest process `test_on_6_fake_cpu_devices` reruns
this file in a subprocess with them (see test_sharding.py). A tiny random model with 3 KV
heads on sequence=2 x tensor=3: the expected PartitionSpec of every quantised leaf is
written out here by hand (values as the bf16 weight, scales replicated where they are 1);
the weights restored onto the mesh and quantised there (engine.handle_on_mesh) equal the
one-device quantisation, each device holds its share of the int8 bytes only, and prefill +
decode equal the one-device int8 run under a duo pattern whose layers keep 1, 3 and 0 of
the 3 heads: the all-heads layer splits its cache's heads over tensor, the 1-head layer
(1 does not divide tensor=3) spills its retrieval slots over sequence x tensor. The CLI runs
the tiny checkpoint (full attention, 2 KV heads on tensor=2) with --weights-dtype int8
--mesh.
"""

import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from duojax import cache as kvc
from duojax import engine
from duojax import sharding as sh
from duojax.config import ModelConfig
from duojax.model import handle as model_handle
from duojax.model import quant
from duojax.pattern import HeadMask
from helpers import random_params
from test_sharding import need_devices, run_on_fake_devices

pytest.importorskip("qwix")

N = 6
MESH = "sequence=2,tensor=3"


def test_on_6_fake_cpu_devices():
  if jax.device_count() >= N:
    pytest.skip("this process has the devices: the tests ran here directly")
  run_on_fake_devices(__file__, n=N, timeout=300)


# 3 KV heads (tensor=3 splits them), an untied head with vocab 96 and MLP width 36 (both
# split over tensor x sequence = 6).
CFG = ModelConfig(vocab_size=96, hidden_size=24, intermediate_size=36, num_layers=3,
                  num_heads=6, num_kv_heads=3, head_dim=8, max_position_embeddings=256,
                  tie_word_embeddings=False, name="tiny-q-mesh")
# layer 0 keeps 1 of 3 heads (does not divide tensor=3: its slots split over
# sequence x tensor), layer 1 all (heads over tensor), layer 2 none
DUO = HeadMask.from_array(np.array([[1, 0, 0], [1, 1, 1], [0, 0, 0]], bool), sink=2, recent=4)
LENGTHS = [13, 5]
CHUNK, MAX_NEW = 8, 5
CAPACITY = 48  # a multiple of 16 and of sequence x tensor

T = ("tensor", "sequence")
# name: (value spec, scale spec, per-device share of the value's bytes), by hand
EXPECTED = {
    "wq": (P(None, "tensor", None, None), P(None, "tensor", None, None), 3),
    "wk": (P(None, "tensor", None), P(None, "tensor", None), 3),
    "wv": (P(None, "tensor", None), P(None, "tensor", None), 3),
    "wo": (P("tensor", None, None, None), P(None, None, None, None), 3),
    "w_gate": (P(None, T), P(None, T), 6),
    "w_up": (P(None, T), P(None, T), 6),
    "w_down": (P(T, None), P(None, None), 6),
    "lm_head": (P(None, T), P(None, T), 6),
}


def _mesh():
  return sh.make_mesh(MESH, jax.devices()[:N])


@functools.lru_cache(maxsize=None)
def _params():
  return random_params(CFG, 7, 0.3)


def _quantised(state):
  """(name, QArray) for every quantised weight of a handle's state."""
  for lp in state["layers"].values():
    for part in ("attn", "mlp"):
      for k, v in lp[part].items():
        if k in quant.CONTRACTED:
          yield k, v
  yield "lm_head", state["lm_head"]


def _same_spec(got, want, ndim):
  """Equal PartitionSpecs, padded with None (P() and P(None, None) say the same)."""
  pad = lambda s: tuple(s) + (None,) * (ndim - len(tuple(s)))
  return pad(got) == pad(want)


def test_rules_for_quantised_leaves():
  """From shapes alone (eval_shape of the quantisation): the specs written out above."""
  need_devices(N)
  mesh = _mesh()
  abstract = jax.eval_shape(lambda p: quant.quantize_params(p, "int8"), _params())
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    specs = sh.param_specs(abstract, mesh, config=CFG)
  seen = set()
  for lp, la in zip(specs["layers"], abstract["layers"]):
    for k, s in lp.items():
      if k not in quant.CONTRACTED:
        assert not quant.is_quantized(s), k
        continue
      v, sc, _ = EXPECTED[k]
      assert _same_spec(s.qvalue, v, la[k].qvalue.ndim), (k, s.qvalue)
      assert _same_spec(s.scale, sc, la[k].scale.ndim), (k, s.scale)
      seen.add(k)
  v, sc, _ = EXPECTED["lm_head"]
  assert _same_spec(specs["lm_head"].qvalue, v, 2) and _same_spec(specs["lm_head"].scale, sc, 2)
  assert seen == set(EXPECTED) - {"lm_head"}
  # the value's spec is the bf16 weight's, leaf for leaf
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    plain = sh.config_param_shardings(CFG, mesh)
  assert specs["layers"][0]["wo"].qvalue == plain["layers"][0]["wo"].spec
  assert specs["layers"][0]["w_down"].qvalue == plain["layers"][0]["w_down"].spec
  axes = sh.param_logical_axes(abstract)["layers"][0]["wo"]
  assert axes.qvalue == ("kv_heads", "q_group", "head_dim", "embed")
  assert axes.scale == (None, None, None, "embed")


def _one_device(mask):
  """The reference: the one-device int8 handle and its run (logits, tokens)."""
  h = model_handle.from_params(CFG, _params(), mask, weights_dtype="int8")
  tokens, lengths = engine.pad_batch(_prompts(), CHUNK)
  cache = kvc.init_cache(CFG, len(LENGTHS), CAPACITY, mask, jnp.float32)
  last, cache, logits = engine.prefill(h, CFG, tokens, lengths, cache, CHUNK, "xla",
                                       all_logits=True)
  out, _, _ = engine.decode(h, CFG, cache, last, jax.random.PRNGKey(0), MAX_NEW,
                            engine.SamplingSettings(), (), "xla")
  return h, np.asarray(logits), np.asarray(out)


def _prompts():
  r = np.random.default_rng(0)
  return [list(map(int, r.integers(3, CFG.vocab_size, n))) for n in LENGTHS]


def test_int8_on_mesh_equals_one_device():
  need_devices(N)
  mesh, mask = _mesh(), DUO
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)  # norms/embed replicated: expected
    # what serving.load_model(mesh=...) does: restore into the bf16 shardings, then quantise
    restored = jax.device_put(_params(), engine.param_shardings_for(mesh, CFG))
    h = engine.handle_on_mesh(mesh, CFG, restored, mask, weights_dtype="int8")
  ref_h, ref_logits, ref_out = _one_device(mask)

  # the same integers and scales as the one-device quantisation, split as written above
  total, per_device = 0, {d: 0 for d in mesh.devices.flat}
  for (k, q), (_, rq) in zip(_quantised(h.state), _quantised(ref_h.state)):
    assert q.qvalue.dtype == jnp.int8, k
    np.testing.assert_array_equal(np.asarray(q.qvalue), np.asarray(rq.qvalue), err_msg=k)
    np.testing.assert_allclose(np.asarray(q.scale), np.asarray(rq.scale), rtol=1e-6, err_msg=k)
    v, sc, share = EXPECTED[k]
    assert _same_spec(q.qvalue.sharding.spec, v, q.qvalue.ndim), (k, q.qvalue.sharding.spec)
    assert _same_spec(q.scale.sharding.spec, sc, q.scale.ndim), (k, q.scale.sharding.spec)
    assert "tensor" in jax.tree.leaves(tuple(q.qvalue.sharding.spec)), k
    n = q.qvalue.size  # int8: one byte a value
    for s in q.qvalue.addressable_shards:
      assert s.data.nbytes == n // share, (k, s.device, s.data.shape)
      per_device[s.device] += s.data.nbytes
    total += n
  # no device holds the whole int8 model: each a third (attention) to a sixth (MLP, head)
  assert all(total / 6 <= b <= total / 3 for b in per_device.values()), (total, per_device)

  tokens, lengths = engine.pad_batch(_prompts(), CHUNK)
  cache = kvc.init_cache(CFG, len(LENGTHS), CAPACITY, mask, jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    h, cache, pl = engine.place_on_mesh(mesh, h, CFG, cache)
    step = engine.mesh_prefill_step(mesh, pl, h, CFG, cache, CHUNK, "xla", all_logits=True)
    last, cache, logits = engine.prefill(h, CFG, tokens, lengths, cache, CHUNK, "xla",
                                         all_logits=True, step=step)
    dec = engine.mesh_decode(mesh, pl, h, CFG, cache, MAX_NEW, engine.SamplingSettings(), ())
    out, _, cache = dec(h, cache, last, jax.random.PRNGKey(0))
  # placing the handle kept the quantised leaves where handle_on_mesh put them
  assert _same_spec(h.state["layers"][0]["attn"]["wq"].qvalue.sharding.spec,
                    EXPECTED["wq"][0], 4)

  valid = np.arange(ref_logits.shape[1])[None, :] < np.asarray(LENGTHS)[:, None]
  scale = np.abs(ref_logits[valid]).max()
  assert scale > 0.5  # not a comparison of near-zeros
  np.testing.assert_allclose(np.asarray(logits)[valid], ref_logits[valid], atol=1e-5 * scale,
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out), ref_out)
  assert len({tuple(r) for r in ref_out}) > 1  # rows decode different tokens
  spill = cache.layers[0].full.k.sharding.spec  # 1 of 3 heads: slots over both axes
  assert tuple(spill)[1:3] == (("sequence", "tensor"), None), spill
  heads = cache.layers[1].k.sharding.spec  # all 3 heads: a full cache, heads over tensor
  assert tuple(heads)[1:3] == ("sequence", "tensor"), heads


def test_infer_cli_int8_weights_on_mesh(tiny_ckpt, capsys):
  """`--weights-dtype int8 --mesh` end to end (2 KV heads on tensor=2): the same greedy
  tokens as the one-device int8 run."""
  need_devices(N)
  from duojax import infer
  base = ["--ckpt", str(tiny_ckpt), "--prompt", "the", "--max-new-tokens", "6", "--json",
          "--weights-dtype", "int8"]
  outs = {}
  for mesh in (None, "sequence=3,tensor=2"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", sh.ShardingWarning)
      assert infer.main(base + (["--mesh", mesh] if mesh else [])) == 0
    outs[mesh] = json.loads(capsys.readouterr().out)
  assert outs["sequence=3,tensor=2"]["mesh"]["tensor"] == 2
  assert outs["sequence=3,tensor=2"]["weights_dtype"] == "int8"
  assert len(outs[None]["generated_ids"]) == 6
  assert outs["sequence=3,tensor=2"]["generated_ids"] == outs[None]["generated_ids"]
