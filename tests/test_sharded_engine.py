"""Prefill + decode through the engine on a device mesh equal one device.

Runs on 8 fake CPU devices: in a plain pytest process `test_on_8_fake_cpu_devices`
reruns this file in a subprocess with them (see test_sharding.py). Tiny random
models with SmolLM2's head layout (3 KV heads, so tensor=3 splits them), a ragged
batch and a head pattern whose DuoAttention layers keep 1 or 2 of 3 heads (neither
divides tensor=3).
"""

import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax import cache as kvc
from duojax import engine
from duojax import sharding as sh
from duojax import context_parallel as cp
from duojax.config import ModelConfig
from duojax.model import handle as model_handle
from duojax.pattern import HeadMask
from helpers import random_params
from test_sharding import N_FAKE, need_devices, run_on_fake_devices


def test_on_8_fake_cpu_devices():
  if jax.device_count() >= N_FAKE:
    pytest.skip("this process has the devices: the tests ran here directly")
  run_on_fake_devices(__file__)


# vocab 64 does not divide tensor=3 (embed/lm_head fall back to replication), the MLP
# width 36 does (split over tensor).
GQA = ModelConfig(vocab_size=64, hidden_size=24, intermediate_size=36, num_layers=3, num_heads=6,
                  num_kv_heads=3, head_dim=8, max_position_embeddings=256, name="tiny-gqa")
MHA = ModelConfig(vocab_size=64, hidden_size=24, intermediate_size=36, num_layers=3, num_heads=3,
                  num_kv_heads=3, head_dim=8, max_position_embeddings=256, name="tiny-mha")
# layer 0: 1 of 3 heads retrieval; 1: all (a full cache); 2: none (streaming only)
UNEVEN = HeadMask.from_array(np.array([[1, 0, 0], [1, 1, 1], [0, 0, 0]], bool), sink=2, recent=4)
UNEVEN2 = HeadMask.from_array(np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]], bool), sink=1,
                              recent=3)
MODELS = {"gqa": (GQA, UNEVEN), "mha": (MHA, UNEVEN2), "gqa_full": (GQA, None)}
LENGTHS = [13, 5, 19, 1]  # ragged; chunk 8 -> 3 chunks, row 3 done after the first
CHUNK, MAX_NEW = 8, 5
CAPACITY = 32  # a multiple of every sequence size below
CASES = {  # name: (mesh, model)
    "sequence8_gqa": ("sequence=8", "gqa"),
    "tensor3_gqa": ("tensor=3", "gqa"),
    "tensor3_sequence2_mha": ("sequence=2,tensor=3", "mha"),
    "data2_sequence4_gqa": ("data=2,sequence=4", "gqa"),
    "data2_sequence4_gqa_full": ("data=2,sequence=4", "gqa_full"),
}


def _prompts(seed=0):
  r = np.random.default_rng(seed)
  return [list(map(int, r.integers(3, 64, n))) for n in LENGTHS]


def _mesh(spec):
  n = int(np.prod([int(p.split("=")[1]) for p in spec.split(",")]))
  return sh.make_mesh(spec, jax.devices()[:n])


@functools.lru_cache(maxsize=None)
def _model(name):
  cfg, mask = MODELS[name]
  h = model_handle.from_params(cfg, random_params(cfg, 7, 0.3), mask, reordered=True)
  return cfg, mask, h


@functools.lru_cache(maxsize=None)
def _single_device(name):
  """The reference: today's one-device engine. Returns (last_hidden, logits, tokens, cache)."""
  cfg, mask, h = _model(name)
  tokens, lengths = engine.pad_batch(_prompts(), CHUNK)
  cache = kvc.init_cache(cfg, len(LENGTHS), CAPACITY, mask, jnp.float32)
  last, cache, logits = engine.prefill(h, cfg, tokens, lengths, cache, CHUNK, "xla",
                                       all_logits=True)
  out, _, cache = engine.decode(h, cfg, cache, last, jax.random.PRNGKey(0), MAX_NEW,
                                engine.SamplingSettings(), (), "xla")
  return tuple(np.asarray(x) for x in (last, logits, out)) + (cache,)


def _on_mesh(spec, name):
  cfg, mask, h = _model(name)
  mesh = _mesh(spec)
  tokens, lengths = engine.pad_batch(_prompts(), CHUNK)
  cache = kvc.init_cache(cfg, len(LENGTHS), CAPACITY, mask, jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)  # replicated fallbacks are expected
    h, cache, pl = engine.place_on_mesh(mesh, h, cfg, cache)
    step = engine.mesh_prefill_step(mesh, pl, h, cfg, cache, CHUNK, "xla", all_logits=True)
    last, cache, logits = engine.prefill(h, cfg, tokens, lengths, cache, CHUNK, "xla",
                                         all_logits=True, step=step)
    dec = engine.mesh_decode(mesh, pl, h, cfg, cache, MAX_NEW, engine.SamplingSettings(), ())
    out, _, cache = dec(h, cache, last, jax.random.PRNGKey(0))
  return mesh, h, last, logits, out, cache


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_and_decode_equal_one_device(name):
  need_devices()
  spec, model = CASES[name]
  cfg, mask, _ = _model(model)
  mesh, h, last, logits, out, cache = _on_mesh(spec, model)
  want_last, want_logits, want_out, want_cache = _single_device(model)
  sizes = sh.mesh_sizes(mesh)

  valid = np.arange(want_logits.shape[1])[None, :] < np.asarray(LENGTHS)[:, None]
  np.testing.assert_allclose(np.asarray(logits)[valid], want_logits[valid], atol=1e-5, rtol=1e-5)
  assert np.abs(want_logits[valid]).max() > 0.5  # not a comparison of near-zeros
  np.testing.assert_allclose(np.asarray(last), want_last, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out), want_out)
  assert len({tuple(r) for r in want_out}) > 1  # rows decode different tokens
  for a, e in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(want_cache)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-5, rtol=1e-5)

  # the work really was split as the rules say
  layer0 = cache.layers[0]
  full0 = layer0.full if isinstance(layer0, kvc.DuoLayerCache) else layer0
  spec0 = full0.k.sharding.spec
  assert (spec0[1] == "sequence") == (sizes["sequence"] > 1)
  assert (spec0[0] == "data") == (sizes["data"] > 1)
  wq = h.state["layers"][0]["attn"]["wq"]
  assert (wq.sharding.spec[1] == "tensor") == (sizes["tensor"] > 1)
  assert isinstance(engine.mesh_backend(mesh), cp.ContextParallel) == (sizes["sequence"] > 1)
  if sizes["tensor"] > 1:
    assert h.state["layers"][0]["mlp"]["w_up"].sharding.spec[1] == "tensor"
    assert len(wq.addressable_shards[0].data.shape) == 4
    assert wq.addressable_shards[0].data.shape[1] == cfg.num_kv_heads // sizes["tensor"]


def test_generate_on_mesh_equals_one_device():
  """The public path: `generate(..., mesh=...)` (what `--mesh` runs)."""
  need_devices()
  cfg, mask, h = _model("gqa")
  prompts = _prompts(1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    got = engine.generate(h, cfg, prompts, 4, mask, 8, mesh=_mesh("sequence=2,tensor=3"))
  want = engine.generate(h, cfg, prompts, 4, mask, 8)
  assert got.tokens == want.tokens and got.prompt_lengths == want.prompt_lengths


def test_mesh_that_cannot_hold_the_model_is_a_clear_error():
  need_devices()
  cfg, mask, h = _model("gqa")
  cache = kvc.init_cache(cfg, 2, CAPACITY, mask, jnp.float32)
  with pytest.raises(sh.ShardingError, match="tensor"):
    engine.place_on_mesh(_mesh("tensor=2"), h, cfg, cache)
  with pytest.raises(engine.InputError, match="--backend xla"):
    engine.mesh_backend(_mesh("sequence=2"), "gpu")


def test_infer_mesh_flag_checks_the_device_count(capsys):
  """Runs in the parent (1 device) too: the error comes before anything is loaded."""
  from duojax import infer
  n = jax.device_count()
  rc = infer.main(["--prompt", "hi", "--mesh", f"data={n + 1}", "--ckpt", "/nonexistent"])
  err = capsys.readouterr().err
  assert rc == 2
  assert f"uses {n + 1} devices but {n} are there" in err, err
  rc = infer.main(["--prompt", "hi", "--mesh", "model=2", "--ckpt", "/nonexistent"])
  assert rc == 2 and "unknown axis 'model'" in capsys.readouterr().err
  if n > 1:  # kernels are not wired under shard_map: say so before loading
    rc = infer.main(["--prompt", "hi", "--mesh", f"data={n}", "--backend", "gpu", "--ckpt",
                     "/nonexistent"])
    assert rc == 2 and "use --backend xla with --mesh" in capsys.readouterr().err


def test_infer_mesh_of_one_device_runs_the_sharded_path(tiny_ckpt, capsys):
  """`--mesh data=1` goes through generate(mesh=...) and says so; the text is today's."""
  if jax.device_count() != 1:
    pytest.skip("--mesh data=1 is for one device; the parent process runs this")
  from duojax import infer
  argv = ["--ckpt", str(tiny_ckpt), "--prompt", "the", "--max-new-tokens", "3", "--json"]
  assert infer.main(argv) == 0
  plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert infer.main(argv + ["--mesh", "data=1"]) == 0
  meshed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert plain["mesh"] is None and meshed["mesh"] == dict.fromkeys(sh.MESH_AXES, 1)
  assert meshed["generated_ids"] == plain["generated_ids"]
