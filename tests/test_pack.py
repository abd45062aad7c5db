"""Packed projection weights for serving (duojax/model/pack.py): wqkv [E, Hkv, G+2, D],
bqkv [Hkv, G+2, D], w_gate_up [E, 2, F]. Packing round-trips bit for bit, a packed model
computes what the unpacked one does (fp32 and int8, GQA and MHA, with q/k/v biases,
under a head mask), every
reader of the params dict still sees the unpacked layout, and a mix is refused. The mesh
test reruns itself with 2 fake CPU devices (see test_sharding.py)."""

import gc
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from duojax import cache as kvc
from duojax import engine
from duojax import sharding as sh
from duojax.config import tiny_config
from duojax.model import Llama, handle, llama, pack, quant
from duojax.model.modules import check_layer_weights
from duojax.pattern import HeadMask
from helpers import PACKED_AXES, random_params
from test_sharding import need_devices, run_on_fake_devices

GQA = tiny_config(num_layers=2)  # 6 query heads over 2 KV heads: G = 3, tied embeddings
MHA = tiny_config(num_layers=2, num_heads=4, num_kv_heads=4, hidden_size=32)  # G = 1
# Qwen2-like: q/k/v biases, an untied head; qk_norm too (Qwen3), untouched by packing
QWEN = tiny_config(num_layers=3, num_heads=6, num_kv_heads=3, head_dim=6, hidden_size=30,
                   intermediate_size=22, vocab_size=53, attention_bias=True, qk_norm=True,
                   tie_word_embeddings=False)
CONFIGS = {"gqa": GQA, "mha": MHA, "qwen": QWEN, "mha_bias": tiny_config(
    num_layers=2, num_heads=4, num_kv_heads=4, hidden_size=32, attention_bias=True)}
PROMPTS = [list(range(3, 16)), list(range(5, 12))]  # ragged: 13 and 7 tokens


def _equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _close(a, b, tol=1e-5):
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pack_round_trip_is_bit_exact(name):
  cfg = CONFIGS[name]
  params = random_params(cfg, 0, 0.3)
  packed = pack.pack_params(params)
  g, h, d = cfg.group_size, cfg.num_kv_heads, cfg.head_dim
  e, f = cfg.hidden_size, cfg.intermediate_size
  lp, src = packed["layers"][1], params["layers"][1]
  want = {"wqkv": (e, h, g + 2, d), "w_gate_up": (e, 2, f)}
  if cfg.attention_bias:
    want["bqkv"] = (h, g + 2, d)
  assert {k: lp[k].shape for k in want} == want
  assert set(lp) == set(want) | {"attn_norm", "mlp_norm", "wo", "w_down"} | (
      {"q_norm", "k_norm"} if cfg.qk_norm else set())
  # the order within a KV head's slots: its query heads, then k, then v; gate then up
  np.testing.assert_array_equal(lp["wqkv"][:, :, :g], src["wq"])
  np.testing.assert_array_equal(lp["wqkv"][:, :, g], src["wk"])
  np.testing.assert_array_equal(lp["wqkv"][:, :, g + 1], src["wv"])
  np.testing.assert_array_equal(lp["w_gate_up"][:, 1], src["w_up"])
  back = pack.unpack_params(packed)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  _equal(back, params)
  # packing packed weights (and unpacking unpacked ones) changes nothing
  again = pack.pack_params(packed)
  assert all(a is b for a, b in zip(again["layers"], packed["layers"]))
  assert all(a is b for a, b in zip(pack.unpack_params(params)["layers"], params["layers"]))
  # stacked [L, ...] layers (the scans' layout) pack along the same axes
  stacked = llama.stack_layers(params)
  sp = pack.pack_params(stacked)
  assert sp["layers"]["wqkv"].shape == (cfg.num_layers,) + want["wqkv"]
  _equal(pack.unpack_params(sp), stacked)


def test_a_mix_of_layouts_is_refused():
  params = random_params(QWEN, 1, 0.3)
  lp = pack.pack_layer(params["layers"][1])
  mixed = {**lp, "wq": params["layers"][1]["wq"]}
  with pytest.raises(ValueError, match=r"layer 1 holds both the packed 'wqkv' and \['wq'\]"):
    check_layer_weights(mixed, QWEN, "layer 1")
  bad = {**params, "layers": [params["layers"][0], mixed, params["layers"][2]]}
  with pytest.raises(ValueError, match="mix of the packed and unpacked layouts"):
    handle.from_params(QWEN, bad)
  with pytest.raises(ValueError, match="mix of the packed and unpacked layouts"):
    pack.pack_params(bad)
  # attention packed, the MLP not: one layout per layer
  half = {k: v for k, v in lp.items() if k != "w_gate_up"}
  half.update(w_gate=params["layers"][1]["w_gate"], w_up=params["layers"][1]["w_up"])
  with pytest.raises(ValueError, match=r"packs \['bqkv', 'wqkv'\] but not \['w_gate_up'\]"):
    check_layer_weights(half, QWEN, "layer 1")
  # a packed layer that lacks a weight still names what the config wants
  with pytest.raises(ValueError, match="packed"):
    check_layer_weights({k: v for k, v in lp.items() if k != "bqkv"}, QWEN, "layer 1")
  # layers packed unlike each other still build (the module makes its own graphdef)
  some = {**params, "layers": [params["layers"][0], lp, params["layers"][2]]}
  h = handle.from_params(QWEN, some)
  _close(engine.forward_logits(h, QWEN, PROMPTS),
         engine.forward_logits(handle.from_params(QWEN, params), QWEN, PROMPTS))


def _serve(h, cfg, mask):
  """The engine's path: chunked prefill (logits of every position), one T=1 step through
  the cache (what a decode step runs), and greedy generation's tokens."""
  tokens, lengths = engine.pad_batch(PROMPTS, 8)
  cache = kvc.init_cache(cfg, len(PROMPTS), 32, mask, jnp.float32)
  last, cache, lg = engine.prefill(h, cfg, tokens, lengths, cache, 8, all_logits=True)
  nxt = jnp.asarray([[7], [11]], jnp.int32)
  one = jnp.ones((2,), jnp.int32)
  _, _, step = engine.prefill_step(h, cfg, nxt, cache, one, 0 * one, last, "xla", True)
  r = engine.generate(h, cfg, PROMPTS, 4, mask, 8)
  return [lg, step], r.tokens


MASKS = {"none": None,
         # layer 0 keeps KV heads 1 and 3 (reordered first), layer 1 head 0
         "mha": HeadMask.from_array(np.array([[0, 1, 0, 1], [1, 0, 0, 0]], bool), sink=2,
                                    recent=3),
         "qwen": HeadMask.from_array(np.array([[0, 1, 1], [1, 1, 1], [0, 0, 1]], bool),
                                     sink=2, recent=3)}


@pytest.mark.parametrize("cfg_name,mask_name", [("gqa", "none"), ("mha", "mha"),
                                                ("qwen", "qwen")])
def test_packed_model_computes_what_the_unpacked_one_does(cfg_name, mask_name):
  cfg, mask = CONFIGS[cfg_name], MASKS[mask_name]
  params = random_params(cfg, 2, 0.3)  # HF head order: from_params reorders for the mask
  plain = handle.from_params(cfg, params, mask)
  packed = handle.from_params(cfg, params, mask, pack=True)
  assert packed.packed and not plain.packed
  assert set(packed.state["layers"][0]["attn"]) >= {"wqkv", "wo"}
  assert "wq" not in packed.state["layers"][0]["attn"]
  got, got_tokens = _serve(packed, cfg, mask)
  want, want_tokens = _serve(plain, cfg, mask)
  _close(got, want)
  assert got_tokens == want_tokens
  # every reader of the params dict sees the unpacked layout, in served or HF order
  _equal(packed.params, plain.params)
  _equal(llama.to_params(packed), params)
  # a second packed handle of the same pattern shares the cached graphdef
  assert handle.from_params(cfg, params, mask, pack=True).graph is packed.graph
  assert packed.graph != plain.graph


def test_nnx_module_packed_to_params_and_axes():
  cfg, mask = QWEN, MASKS["qwen"]
  params = random_params(cfg, 3, 0.3)
  m = Llama.from_params(cfg, params, mask, pack=True)
  assert m.layers[0].attn.wq is None and m.layers[0].mlp.w_gate is None
  for name, var in (("wqkv", m.layers[0].attn.wqkv), ("bqkv", m.layers[0].attn.bqkv),
                    ("w_gate_up", m.layers[0].mlp.w_gate_up)):
    assert tuple(var.get_metadata()["out_sharding"]) == PACKED_AXES[name]
  _equal(m.to_params(), params)
  _equal(m.to_params(reordered=True), llama.apply_head_mask(params, mask))
  # splitting the module gives the cheap builder's handle
  h = handle.split(m)
  assert h.graph == handle.from_params(cfg, params, mask, pack=True).graph
  # undo_head_mask / reorder_heads also take a packed dict (the KV-head axis stays put)
  served = pack.pack_params(llama.apply_head_mask(params, mask))
  _equal(pack.unpack_params(llama.undo_head_mask(served, mask)), params)


def test_int8_packed_equals_int8_unpacked():
  pytest.importorskip("qwix")
  cfg, mask = QWEN, MASKS["qwen"]
  params = random_params(cfg, 4, 0.3)
  plain = handle.from_params(cfg, params, mask, weights_dtype="int8")
  packed = handle.from_params(cfg, params, mask, weights_dtype="int8", pack=True)
  w = packed.state["layers"][0]["attn"]["wqkv"]
  assert quant.is_quantized(w) and w.scale.shape == (1, 3, cfg.group_size + 2, cfg.head_dim)
  assert packed.state["layers"][0]["mlp"]["w_gate_up"].scale.shape == (
      1, 2, cfg.intermediate_size)
  # per output channel, the packed weight's scales are the unpacked weights' (bit for bit),
  # whether packed before quantising (prepare_params) or after
  _equal(packed.params, plain.params)
  after = pack.pack_params(quant.quantize_params(llama.apply_head_mask(params, mask), "int8"))
  _equal(handle.from_params(cfg, after, mask, reordered=True).state, packed.state)
  got, got_tokens = _serve(packed, cfg, mask)
  want, want_tokens = _serve(plain, cfg, mask)
  _close(got, want)
  assert got_tokens == want_tokens


def test_serving_packs_by_default(tmp_path):
  from duojax import serving
  from duojax.checkpoint import store
  cfg = GQA
  params = random_params(cfg, 5, 0.3)
  ck = store.save_checkpoint(tmp_path / "ck", cfg, params)
  kw = dict(attention="random", sparsity=0.5, sink=2, recent=3, tokenizer=object(),
            progress=False)
  m = serving.load_model(str(ck), **kw)
  off = serving.load_model(str(ck), pack=False, **kw)
  assert m.model.packed and not off.model.packed
  _equal(m.params, off.params)  # the documented layout either way
  got = engine.generate(m.model, cfg, PROMPTS, 4, m.mask, 8)
  assert got.tokens == engine.generate(off.model, cfg, PROMPTS, 4, off.mask, 8).tokens


# -- on a mesh (2 fake CPU devices) ------------------------------------------------------------

N = 2
# 4 KV heads over tensor=2; every layer keeps 0, 2 or 4 of them, so each part splits its heads
# over tensor (no context parallelism needed); MLP width 40 and vocab 64 split too
MESH_CFG = tiny_config(num_layers=3, num_heads=8, num_kv_heads=4, hidden_size=32,
                       intermediate_size=40, vocab_size=64, attention_bias=True,
                       tie_word_embeddings=False)
MESH_MASK = HeadMask.from_array(np.array([[0, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]], bool),
                                sink=2, recent=3)


def test_on_2_fake_cpu_devices():
  if jax.device_count() >= N:
    pytest.skip("this process has the devices: the tests ran here directly")
  run_on_fake_devices(f"{__file__}::test_packed_weights_on_a_mesh", n=N, timeout=300)


def test_packed_weights_on_a_mesh():
  """engine.handle_on_mesh(pack=True), what serving.load_model(mesh=...) runs: the packed
  weights split over kv_heads and mlp as the unpacked ones do, and generation equals the
  one-device unpacked model's."""
  need_devices(N)
  cfg, mask = MESH_CFG, MESH_MASK
  mesh = sh.make_mesh("tensor=2")
  params = random_params(cfg, 6, 0.3)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    placed = jax.device_put(params, engine.param_shardings_for(mesh, cfg))
    h = engine.handle_on_mesh(mesh, cfg, placed, mask, pack=True)
    lay = h.state["layers"][0]
    assert lay["attn"]["wqkv"].sharding.spec == P(None, "tensor", None, None)
    assert lay["attn"]["bqkv"].sharding.spec == P("tensor", None, None)
    assert lay["mlp"]["w_gate_up"].sharding.spec == P(None, None, "tensor")
    assert lay["attn"]["wqkv"].addressable_shards[0].data.shape == (
        32, 2, cfg.group_size + 2, cfg.head_dim)
    got = engine.generate(h, cfg, PROMPTS, 4, mask, 8, mesh=mesh)
    # int8 packed: values split like the weight, scales with them (size 1 on embed)
    q = jax.eval_shape(lambda p: handle.prepare_params(p, mask, "int8", pack=True), params)
    specs = sh.param_specs(q, mesh, config=cfg)["layers"][0]
  assert specs["wqkv"].qvalue == P(None, "tensor", None, None)
  assert tuple(specs["wqkv"].scale)[:2] == (None, "tensor")
  assert tuple(specs["w_gate_up"].scale) == (None, None, "tensor")
  want = engine.generate(handle.from_params(cfg, params, mask), cfg, PROMPTS, 4, mask, 8)
  assert got.tokens == want.tokens
  _equal(jax.device_get(h.params), llama.apply_head_mask(params, mask))


def _live_bytes() -> int:
  gc.collect()
  return sum(a.nbytes for a in jax.live_arrays())


def test_in_place_packing_never_holds_both_layouts():
  """pack_params(in_place=True) (what load_model does to the weights it read) lets each
  layer's unpacked q/k/v and gate/up go as its packed copy is made: the live device bytes
  stay those of one layout, where packing a copy holds both."""
  cfg = tiny_config(num_layers=4, hidden_size=64, intermediate_size=256)
  params = random_params(cfg, 7, 0.3)
  params = jax.tree.map(jnp.asarray, params)
  before = _live_bytes()
  kept = pack.pack_params(params)  # a copy: the unpacked arrays live on in `params`
  both = _live_bytes()
  del kept
  packed = pack.pack_params(params, in_place=True)
  assert packed is params and pack.is_packed(params["layers"][0])
  after = _live_bytes()
  moved = sum(params["layers"][0][n].nbytes for n in ("wqkv", "w_gate_up")) * cfg.num_layers
  assert both >= before + moved  # the copy held both layouts
  assert after <= before + 1024, (before, after)  # in place: one layout (+ rounding)
  with pytest.raises(ValueError, match="per-layer params"):
    pack.pack_params({"layers": {"wq": params["layers"][0]["wqkv"]}}, in_place=True)
