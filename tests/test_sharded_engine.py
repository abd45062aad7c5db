"""Prefill + decode through the engine on a device mesh equal one device.

Runs on 8 fake CPU devices: in a plain pytest process `test_on_8_fake_cpu_devices`
reruns this file in a subprocess with them (see test_sharding.py). Tiny random
models with SmolLM2's head layout (3 KV heads, so tensor=3 splits them), a ragged
batch and a head pattern whose DuoAttention layers keep 1 or 2 of 3 heads (neither
divides tensor=3; capacity 32 is no multiple of 3, so those parts stay replicated over
tensor); and 4-KV-head models whose layers keep 1, 2, 3, 0, 4 heads on tensor=4, where
the parts tensor does not divide split their slots over sequence x tensor instead.
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
from jax.sharding import PartitionSpec as P
from helpers import random_params
from test_sharding import N_FAKE, need_devices, run_on_fake_devices


def test_on_8_fake_cpu_devices():
  if jax.device_count() >= N_FAKE:
    pytest.skip("this process has the devices: the tests ran here directly")
  run_on_fake_devices(__file__, timeout=900)  # ~14 mesh runs, compile-bound on CPU


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
# 4 KV heads, layers keeping 1, 2, 3, 0 and 4 of them: on tensor=4 only the last splits
# its heads; the others' retrieval slots split over sequence x tensor (sharding.SPILL).
# MLP width 40 splits over tensor=4 x sequence=2.
GQA4 = ModelConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_layers=5,
                   num_heads=8, num_kv_heads=4, head_dim=8, max_position_embeddings=256,
                   name="tiny-gqa4")
MHA4 = ModelConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_layers=5,
                   num_heads=4, num_kv_heads=4, head_dim=6, max_position_embeddings=256,
                   name="tiny-mha4")
SPILL_ROWS = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
UNEVEN4 = HeadMask.from_array(SPILL_ROWS, sink=2, recent=4)
MODELS = {"gqa": (GQA, UNEVEN), "mha": (MHA, UNEVEN2), "gqa_full": (GQA, None),
          "gqa4": (GQA4, UNEVEN4), "mha4": (MHA4, UNEVEN4), "gqa4_full": (GQA4, None)}
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
  if sizes["tensor"] > 1:  # the MLP width 36 splits over tensor x sequence where it divides
    both = sizes["sequence"] > 1 and cfg.intermediate_size % (sizes["tensor"] * sizes["sequence"]) == 0
    assert h.state["layers"][0]["mlp"]["w_up"].sharding.spec[1] == (
        ("tensor", "sequence") if both else "tensor")
    assert len(wq.addressable_shards[0].data.shape) == 4
    assert wq.addressable_shards[0].data.shape[1] == cfg.num_kv_heads // sizes["tensor"]


SPILL_CASES = {  # name: (mesh, model)
    "sequence2_tensor4_gqa4": ("sequence=2,tensor=4", "gqa4"),
    "tensor4_mha4": ("tensor=4", "mha4"),
}


@pytest.mark.parametrize("name", list(SPILL_CASES))
def test_retrieval_heads_tensor_does_not_divide_split_their_slots(name):
  """Layers keeping 1, 2, 3 of 4 KV heads on tensor=4: each device holds all of that
  part's heads and 1/(sequence x tensor) of its slots (not the whole part replicated over
  tensor), context-parallel attention merges over both axes, and prefill + decode equal
  one device. The MLP splits over tensor x sequence."""
  need_devices()
  spec, model = SPILL_CASES[name]
  cfg, mask, _ = _model(model)
  mesh, h, last, logits, out, cache = _on_mesh(spec, model)
  want_last, want_logits, want_out, want_cache = _single_device(model)
  sizes = sh.mesh_sizes(mesh)
  t, n_seq = sizes["tensor"], sizes["sequence"]

  valid = np.arange(want_logits.shape[1])[None, :] < np.asarray(LENGTHS)[:, None]
  np.testing.assert_allclose(np.asarray(logits)[valid], want_logits[valid], atol=1e-5, rtol=1e-5)
  assert np.abs(want_logits[valid]).max() > 0.5
  np.testing.assert_allclose(np.asarray(last), want_last, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out), want_out)
  assert len({tuple(r) for r in want_out}) > 1
  for a, e in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(want_cache)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-5, rtol=1e-5)

  # per device: retrieval slots / (sequence x tensor) where tensor does not divide the heads
  b, d = len(LENGTHS), cfg.head_dim
  for l, layer in enumerate(cache.layers):
    n_r = int(SPILL_ROWS[l].sum())
    full = layer.full if isinstance(layer, kvc.DuoLayerCache) else layer
    if n_r == 0:
      assert isinstance(layer, kvc.StreamLayerCache)
      continue
    shard = full.k.addressable_shards[0].data.shape
    if n_r % t:
      assert shard == (b, CAPACITY // (n_seq * t), n_r, d), (l, shard)
      assert full.k.sharding.spec[1] == (("sequence", "tensor") if n_seq > 1 else "tensor")
    else:
      assert shard == (b, CAPACITY // n_seq, n_r // t, d), (l, shard)
    # never more per device than full attention's part of one layer
    assert np.prod(shard) <= b * CAPACITY * cfg.num_kv_heads * d // (t * n_seq)
  assert isinstance(engine.mesh_backend(mesh, "xla", cache), cp.ContextParallel)

  # weights: attention over tensor (whole KV heads), the MLP over tensor x sequence
  lay = h.state["layers"][0]
  assert lay["attn"]["wk"].sharding.spec[1] == "tensor"
  mlp_axes = ("tensor", "sequence") if n_seq > 1 else "tensor"
  assert lay["mlp"]["w_up"].sharding.spec == P(None, mlp_axes)
  assert lay["mlp"]["w_down"].sharding.spec == P(mlp_axes, None)
  assert lay["mlp"]["w_gate"].addressable_shards[0].data.shape == (
      cfg.hidden_size, cfg.intermediate_size // (t * n_seq))
  assert h.state["embedding"]["embed"].sharding.spec[0] == mlp_axes  # vocab 64 = 8 x 8


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
  if n > 1:  # a kernel backend this machine lacks: say so before loading
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


# -- a real pattern, bf16, and weights restored straight into the mesh -------------------

PATTERN_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "duojax/patterns/smollm2-135m"
# SmolLM2-135M's head layout (9 query / 3 KV heads), tiny widths, and the first 10 of its 30
# layers (their pattern rows keep 0, 1, 2 and 3 heads; all 30 compiled 3x slower, same cases)
SMOL = ModelConfig(vocab_size=64, hidden_size=24, intermediate_size=36, num_layers=10,
                   num_heads=9, num_kv_heads=3, head_dim=8, max_position_embeddings=256,
                   tie_word_embeddings=True, name="tiny-smollm2-layout")


def _run(cfg, mask, h, mesh, dtype):
  """(logits [B, T, V], decoded tokens [B, MAX_NEW]) on `mesh` (None: one device)."""
  tokens, lengths = engine.pad_batch(_prompts(2), CHUNK)
  cache = kvc.init_cache(cfg, len(LENGTHS), CAPACITY, mask, dtype)
  step = None
  if mesh is not None:
    h, cache, pl = engine.place_on_mesh(mesh, h, cfg, cache)
    step = engine.mesh_prefill_step(mesh, pl, h, cfg, cache, CHUNK, "xla", all_logits=True)
  last, cache, logits = engine.prefill(h, cfg, tokens, lengths, cache, CHUNK, "xla",
                                       all_logits=True, step=step)
  if mesh is None:
    out, _, _ = engine.decode(h, cfg, cache, last, jax.random.PRNGKey(0), MAX_NEW,
                              engine.SamplingSettings(), (), "xla")
  else:
    dec = engine.mesh_decode(mesh, pl, h, cfg, cache, MAX_NEW, engine.SamplingSettings(), ())
    out, _, _ = dec(h, cache, last, jax.random.PRNGKey(0))
  valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  return np.asarray(logits, np.float32)[valid], np.asarray(out)


def test_shipped_smollm2_pattern_with_uneven_layers():
  """The shipped SmolLM2 pattern (binarised at 0.5, its first layers) on a model of its
  layout: layers keep 0, 1, 2 or 3 of 3 KV heads, 1 and 2 not divisible by tensor=3;
  tensor=3 x sequence=2."""
  need_devices()
  from duojax.pattern import load_any
  full = load_any(PATTERN_DIR).binarize(sparsity=0.5)
  mask = HeadMask.from_array(np.array(full.retrieval[:SMOL.num_layers], bool), sink=2, recent=4)
  kept = {sum(mask.retrieval[l]) for l in range(SMOL.num_layers)}
  assert {1, 2} <= kept and {0, 3} & kept  # uneven layers, also all-stream / all-full ones
  h = model_handle.from_params(SMOL, random_params(SMOL, 3, 0.3), mask)  # HF order -> reordered
  want_logits, want_out = _run(SMOL, mask, h, None, jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    logits, out = _run(SMOL, mask, h, _mesh("sequence=2,tensor=3"), jnp.float32)
  # fp32 rounding of other reduction orders over 10 layers (2.7e-5 at 30 layers)
  np.testing.assert_allclose(logits, want_logits, atol=2e-5, rtol=2e-5)
  assert np.abs(want_logits).max() > 0.5
  np.testing.assert_array_equal(out, want_out)
  assert len({tuple(r) for r in want_out}) > 1


def test_bf16_on_data2_sequence4():
  """bf16 weights and cache, a ragged batch over data=2 x sequence=4: logits within bf16
  rounding of one device's (1e-2 relative, as a whole), and no further from the fp32
  logits than one device's bf16 run is; the same first greedy token per row."""
  need_devices()
  cfg, mask = MODELS["gqa"]
  # weights of scale 0.2 (0.3 elsewhere): bf16 rounding then stays near 1% end to end
  h = model_handle.from_params(cfg, random_params(cfg, 7, 0.2), mask, reordered=True)
  fp32, _ = _run(cfg, mask, h, None, jnp.float32)
  h = model_handle.cast(h, jnp.bfloat16)
  want_logits, want_out = _run(cfg, mask, h, None, jnp.bfloat16)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    logits, out = _run(cfg, mask, h, _mesh("data=2,sequence=4"), jnp.bfloat16)
  rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  assert rel(logits, want_logits) < 1e-2
  # bf16 rounding (one device vs fp32: ~1.4%): other reduction orders land elsewhere in
  # that cloud, not outside it
  assert np.abs(logits - fp32).max() <= 1.5 * np.abs(want_logits - fp32).max()
  assert rel(logits, fp32) <= 1.5 * rel(want_logits, fp32)
  np.testing.assert_array_equal(out[:, 0], want_out[:, 0])


class _NoTokenizer:
  pass


def test_load_model_restores_straight_into_the_mesh(tmp_path, monkeypatch):
  """serving.load_model(mesh=...): orbax reads every tensor into its inference sharding
  (the restore's target carries them), the head reorder keeps them, the values are the
  one-device load's, and generating from it equals one device."""
  need_devices()
  from duojax import serving
  from duojax.checkpoint import store
  cfg = GQA
  params = random_params(cfg, 11, 0.3)
  ck = store.save_checkpoint(tmp_path / "ck", cfg, params)
  mesh = _mesh("sequence=2,tensor=3")
  seen = []
  real = store.load_params

  def spy(folder, dtype=None, shardings=None, **kw):
    out = real(folder, dtype, shardings, **kw)
    seen.append((shardings, out))
    return out
  monkeypatch.setattr(store, "load_params", spy)
  kw = dict(attention="random", sparsity=0.5, sink=2, recent=4, tokenizer=_NoTokenizer(),
            progress=False)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    on_mesh = serving.load_model(str(ck), mesh=mesh, **kw)
    one = serving.load_model(str(ck), **kw)
  (target, restored), (none, _) = seen
  assert none is None
  # restored as read: each tensor already in its own sharding, KV heads split 3 ways
  for path, x in jax.tree_util.tree_leaves_with_path(restored):
    assert x.sharding == jax.tree_util.tree_reduce(
        lambda a, b: a, [s for p, s in jax.tree_util.tree_leaves_with_path(target) if p == path])
  wk = restored["layers"][0]["wk"]  # [E, Hkv, D]
  assert wk.sharding.spec[1] == "tensor" and wk.addressable_shards[0].data.shape == (24, 1, 8)
  assert restored["layers"][0]["w_up"].sharding.spec[1] == ("tensor", "sequence")  # 36 = 6 * 6
  # the served (reordered) handle keeps the placement's shardings and the one-device values
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    want_sh = sh.param_shardings(on_mesh.model.state, mesh, config=cfg)
  for a, b, s in zip(jax.tree_util.tree_leaves(on_mesh.model.state),
                     jax.tree_util.tree_leaves(one.model.state),
                     jax.tree_util.tree_leaves(want_sh)):
    assert a.sharding == s
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert on_mesh.mask == one.mask and on_mesh.mask is not None
  prompts = _prompts(3)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    got = engine.generate(on_mesh.model, cfg, prompts, 4, on_mesh.mask, 8, mesh=mesh)
  want = engine.generate(one.model, cfg, prompts, 4, one.mask, 8)
  assert got.tokens == want.tokens
  # a mesh that cannot hold the model fails before anything is read
  seen.clear()
  with pytest.raises(sh.ShardingError, match="tensor sizes that work for this model: 1, 3"):
    serving.load_model(str(ck), mesh=_mesh("tensor=2"), **kw)
  assert not seen


def test_eval_generation_on_a_mesh_equals_one_device():
  """duojax.eval's fixed-shape greedy generation (GenSettings(mesh=...), what `--mesh` on
  `python -m duojax.eval` runs): the same tokens as one device; capacity a multiple of
  sequence=2 whatever the lengths."""
  need_devices()
  from duojax.eval.generation import GenSettings, compile_programs, greedy_generate
  cfg, mask, h = _model("gqa")
  params = h.params  # reordered for mask, as run_grid hands them
  mesh = _mesh("sequence=2,tensor=3")
  prompts = _prompts(4)
  one = GenSettings.for_lengths(max(LENGTHS), cfg, max_new_tokens=5, prefill_chunk=8,
                                batch_size=4)
  meshed = GenSettings.for_lengths(max(LENGTHS), cfg, max_new_tokens=5, prefill_chunk=8,
                                   batch_size=4, mesh=mesh)
  assert meshed.capacity % 2 == 0 and compile_programs(params, cfg, [(mask, False)], meshed) == {}
  want = greedy_generate(params, cfg, prompts, mask, one)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    got = greedy_generate(params, cfg, prompts, mask, meshed)
    again = greedy_generate(params, cfg, prompts[:3], mask, meshed)  # a short batch, no recompile
  assert got == want and again == want[:3]
  assert len({tuple(r) for r in want}) > 1


def test_eval_cli_on_a_mesh_equals_one_device(tmp_path):
  """`python -m duojax.eval niah --mesh data=2,sequence=4`: weights restored onto the mesh,
  every method generated there; the same outputs as one device, the mesh in the settings."""
  need_devices()
  from duojax.checkpoint import store
  from duojax.eval.__main__ import main
  from helpers import tiny_hf_tokenizer
  cfg = ModelConfig(vocab_size=97, hidden_size=24, intermediate_size=36, num_layers=2,
                    num_heads=6, num_kv_heads=3, head_dim=8, max_position_embeddings=512,
                    eos_token_ids=(2,), name="tiny-eval")
  ck = store.save_checkpoint(tmp_path / "ck", cfg, random_params(cfg, 5, 0.3),
                             tiny_hf_tokenizer())
  hay = tmp_path / "hay.txt"
  hay.write_text(" ".join(f"Line {i} says {i % 9} things." for i in range(300)))
  argv = ["niah", "--ckpt", str(ck), "--haystack", str(hay), "--attention", "full,streaming",
          "--lengths", "300,420", "--depths", "0,1", "--no-chat", "--max-new-tokens", "4",
          "--batch-size", "2", "--dtype", "float32", "--sink", "4", "--recent", "16",
          "--prefill-chunk", "64", "--no-progress"]
  docs = {}
  for name, extra in (("mesh", ["--mesh", "data=2,sequence=4"]), ("one", [])):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", sh.ShardingWarning)
      assert main(argv + extra + ["--out", str(tmp_path / f"{name}.json")]) == 0
    docs[name] = json.loads((tmp_path / f"{name}.json").read_text())
  outs = {k: [(c["method"], c["length"], c["depth"], c["output"]) for c in d["cells"]]
          for k, d in docs.items()}
  assert outs["mesh"] == outs["one"] and len(outs["one"]) == 8
  assert len({o[-1] for o in outs["one"]}) > 1
  assert docs["mesh"]["settings"]["device"]["mesh"]["sequence"] == 4
  assert "mesh" not in docs["one"]["settings"]["device"]
