"""duojax.sharding: mesh specs, the logical-axis rules, params and KV-cache shardings.

Mesh tests need 8 devices. A plain pytest process has one CPU device, so
`test_on_8_fake_cpu_devices` reruns this file in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (setting the flag here would
change the device count of every other test in the session).
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from duojax import cache as kvc
from duojax import sharding as sh
from duojax.config import ModelConfig
from duojax.model import llama
from duojax.pattern import HeadMask
from helpers import AGREED_AXES, PACKED_AXES

N_FAKE = 8
_CHILD = "DUOJAX_FAKE_DEVICE_CHILD"

# SmolLM2-135M's shape (2 of its 30 layers: the rules do not depend on the count).
SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=2,
                      num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True,
                      name="smollm2-135m")

# The agreed logical names (tests/helpers.py), written out independently of sharding.py
AGREED = {**AGREED_AXES, **PACKED_AXES, "gates": ("kv_heads",)}


def run_on_fake_devices(test_file: str, n: int = N_FAKE, timeout: int = 600) -> None:
  """Runs `test_file` in a pytest subprocess that has n fake CPU devices."""
  flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu", **{_CHILD: str(n)})
  r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                      test_file], env=env, capture_output=True, text=True, timeout=timeout,
                     cwd=Path(__file__).resolve().parents[1])
  assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
  assert " passed" in r.stdout, r.stdout[-2000:]


def need_devices(n: int = N_FAKE):
  """Skips in the parent process (the subprocess runs it); fails in the child if the
  fake devices did not appear, so a child of skips cannot pass."""
  if jax.device_count() >= n:
    return
  if os.environ.get(_CHILD):
    pytest.fail(f"XLA_FLAGS gave {jax.device_count()} devices, not {n}")
  pytest.skip(f"needs {n} devices: test_on_8_fake_cpu_devices runs it in a subprocess")


def test_on_8_fake_cpu_devices():
  if jax.device_count() >= N_FAKE:
    pytest.skip("this process has the devices: the tests ran here directly")
  run_on_fake_devices(__file__)


# -- mesh specs (no devices needed) --------------------------------------------------------

def test_parse_mesh():
  assert sh.parse_mesh("data=2,tensor=4") == {"data": 2, "fsdp": 1, "sequence": 1, "tensor": 4}
  assert sh.parse_mesh(" sequence=8 ", 8)["sequence"] == 8
  assert sh.parse_mesh({"fsdp": 4, "tensor": 2}, 8)["fsdp"] == 4
  assert sh.parse_mesh(None) == dict.fromkeys(sh.MESH_AXES, 1)


@pytest.mark.parametrize("spec, n, match", [
    ("data=2,model=4", None, "unknown axis 'model'; the axes are data, fsdp, sequence, tensor"),
    ("data=two", None, "data='two' is not a size"),
    ("tensor=0", None, "tensor='0' is not a size"),
    ("tensor=-2", None, "is not a size"),
    ("data", None, "'data' is not AXIS=SIZE"),
    ("data=2,,tensor=2", None, "is not AXIS=SIZE"),
    ("data=2,data=4", None, "given twice"),
    ({"data": 2.0}, None, "is not a size"),
    ("tensor=3", 8, r"uses 3 devices but 8 are there.*divisor of it: 1, 2, 4, 8.*e\.g\. data=8"),
    ("tensor=2", 8, r"uses 2 devices but 8.*e\.g\. data=4,tensor=2"),
    ("data=4,sequence=4", 8, "uses 16 devices but 8"),
])
def test_parse_mesh_errors(spec, n, match):
  with pytest.raises(sh.ShardingError, match=match):
    sh.parse_mesh(spec, n)


def test_tables_match_agreed_names():
  tables = {**sh.PARAM_AXES, **sh.LAYER_AXES}
  assert tables == AGREED
  assert sh.CACHE_AXES == ("batch", "sequence", "kv_heads", "head_dim")
  assert sh.WINDOW_AXES == ("batch", "window", "kv_heads", "head_dim")
  names = {n for axes in tables.values() for n in axes} | set(sh.CACHE_AXES) | set(
      sh.WINDOW_AXES) | set(sh.ACTIVATION_AXES) | {"layers"}
  assert names == set(sh.RULES)
  for mode in sh.MODES:  # the flax form carries the same rules
    assert {k for k, _ in sh.flax_rules(mode)} == set(sh.RULES)
  with pytest.raises(sh.ShardingError, match="unknown logical axis 'heads'"):
    sh.mesh_axes_for("heads")
  with pytest.raises(sh.ShardingError, match="sharding mode 'train'"):
    sh.mesh_axes_for("embed", "train")


def test_logical_axes_of_plain_and_stacked_params():
  shapes = llama.param_shapes(SMOLLM2)
  axes = sh.param_logical_axes(shapes)
  assert axes["embed"] == ("vocab", "embed") and "lm_head" not in axes
  assert axes["layers"][1]["wo"] == ("kv_heads", "q_group", "head_dim", "embed")
  stacked = {"layers": {"wq": (2, 576, 3, 3, 64)}, "gates": (2, 3)}
  ax = sh.param_logical_axes(stacked)
  assert ax["layers"]["wq"] == ("layers", "embed", "kv_heads", "q_group", "head_dim")
  assert ax["gates"] == ("layers", "kv_heads")
  with pytest.raises(sh.ShardingError, match="add its name to LAYER_AXES"):
    sh.param_logical_axes({"layers": [{"w_extra": (4, 4)}]})
  with pytest.raises(sh.ShardingError, match="expected 3 dims"):
    sh.param_logical_axes({"layers": [{"wk": (4,)}]})


# -- meshes and shardings (8 fake devices) -----------------------------------------------------

def test_make_mesh():
  need_devices()
  m = sh.make_mesh("data=2,sequence=4")
  assert tuple(m.axis_names) == sh.MESH_AXES
  assert dict(m.shape) == {"data": 2, "fsdp": 1, "sequence": 4, "tensor": 1}
  assert sorted(d.id for d in m.devices.flat) == list(range(8))
  assert sh.make_mesh().devices.size == 1  # inference defaults to one device
  assert sh.make_mesh("tensor=3", jax.devices()[:3]).shape["tensor"] == 3
  with pytest.raises(sh.ShardingError, match="uses 3 devices but 8 are there"):
    sh.make_mesh("tensor=3")


def test_smollm2_tensor3_works_tensor2_errors():
  need_devices()
  shapes = llama.param_shapes(SMOLLM2)
  m3 = sh.make_mesh("tensor=3", jax.devices()[:3])
  specs = sh.param_specs(shapes, m3, config=SMOLLM2)
  lay = specs["layers"][0]
  assert lay["wq"] == P(None, "tensor", None, None)
  assert lay["wk"] == P(None, "tensor", None)
  assert lay["wo"] == P("tensor", None, None, None)
  assert lay["w_gate"] == P(None, "tensor") and lay["w_down"] == P("tensor", None)
  assert lay["attn_norm"] == P(None)
  assert specs["embed"] == P("tensor", None)  # 49152 = 3 * 16384
  shardings = sh.param_shardings(shapes, m3, config=SMOLLM2)
  assert shardings["layers"][1]["wv"].spec == P(None, "tensor", None)

  m2 = sh.make_mesh("tensor=2", jax.devices()[:2])
  with pytest.raises(sh.ShardingError,
                     match=r"tensor=2 does not divide the 3 KV heads of smollm2-135m.*"
                           r"tensor sizes that work for this model: 1, 3"):
    sh.param_specs(shapes, m2, config=SMOLLM2)
  m6 = sh.make_mesh("sequence=2,tensor=3", jax.devices()[:6])
  sh.check_fits(SMOLLM2, m6)


def test_config_param_shardings_are_the_restore_target():
  """From the config alone (nothing allocated): the tree a checkpoint restore fills, with
  the same specs as the rules give the params' shapes; a mesh that cannot fit raises."""
  need_devices()
  from duojax import layout
  m = sh.make_mesh("sequence=2,tensor=3", jax.devices()[:6])
  got = sh.config_param_shardings(SMOLLM2, m)
  assert got["layers"][1]["wq"].spec == P(None, "tensor", None, None)
  # the vocabulary (49152 = 6 * 8192) and the MLP (1536 = 6 * 256) over tensor x sequence
  assert got["embed"].spec == P(("tensor", "sequence"), None) and "lm_head" not in got
  target = layout.abstract_params(SMOLLM2, jnp.bfloat16, got)
  assert target["layers"][0]["w_up"].sharding.spec == P(None, ("tensor", "sequence"))
  train = sh.config_param_shardings(SMOLLM2, sh.make_mesh("fsdp=8"), "training")
  assert train["layers"][0]["wq"].spec == P("fsdp", None, None, None)  # embed 576 = 8 * 72
  with pytest.raises(sh.ShardingError, match="tensor sizes that work for this model: 1, 3"):
    sh.config_param_shardings(SMOLLM2, sh.make_mesh("fsdp=4,tensor=2"), "training")


def test_training_rules_fsdp_and_stacked_layers():
  need_devices()
  m = sh.make_mesh("fsdp=4,tensor=2")
  stacked = {"embed": (49152, 576), "final_norm": (576,),
             "layers": {"wq": (2, 576, 4, 2, 64), "w_down": (2, 1536, 576),
                        "attn_norm": (2, 576)}}
  specs = sh.param_specs(stacked, m, mode="training")
  assert specs["layers"]["wq"] == P(None, "fsdp", "tensor", None, None)
  assert specs["layers"]["w_down"] == P(None, "tensor", "fsdp")
  assert specs["layers"]["attn_norm"] == P(None, "fsdp")
  assert specs["embed"] == P("tensor", "fsdp")
  # inference keeps weights whole over fsdp
  assert sh.param_specs(stacked, m)["layers"]["wq"] == P(None, None, "tensor", None, None)
  # activations in training: batch over fsdp (data=1 drops out), length over sequence
  with pytest.warns(sh.ShardingWarning, match="fsdp already splits"):
    assert sh.spec_for(sh.ACTIVATION_AXES, (8, 64, 576), m, "training") == P("fsdp", None, None)


def test_batch_over_data_and_fsdp_in_training():
  need_devices()
  m = sh.make_mesh("data=2,fsdp=4")
  # batch takes both axes; embed would reuse fsdp, which is already taken: replicated
  with pytest.warns(sh.ShardingWarning, match="fsdp already splits another dimension"):
    s = sh.spec_for(sh.ACTIVATION_AXES, (8, 64, 576), m, "training")
  assert s == P(("data", "fsdp"), None, None)
  # batch 2: data divides it, data * fsdp does not
  with pytest.warns(sh.ShardingWarning, match="not divisible by fsdp=4"):
    assert sh.spec_for(("batch", "length"), (2, 64), m, "training") == P("data", None)


def test_indivisible_axis_is_dropped_with_warning_or_raises_when_strict():
  need_devices()
  m = sh.make_mesh("tensor=2", jax.devices()[:2])
  with pytest.warns(sh.ShardingWarning, match=r"embed: vocab dimension of size 1001 is not "
                                              r"divisible by tensor=2; replicated over tensor"):
    specs = sh.param_specs({"embed": (1001, 64), "final_norm": (64,)}, m)
  assert specs["embed"] == P(None, None)
  with pytest.raises(sh.ShardingError, match="sizes of tensor that divide it: 1, 7, 11, 13"):
    sh.param_specs({"embed": (1001, 64)}, m, strict=True)
  with pytest.raises(sh.ShardingError, match="vocab"):
    sh.param_specs({"embed": (1001, 64)}, m, strict={"vocab"})


def _uneven_mask():
  # 4 KV heads; layers with 2, 1, 0 and 4 retrieval heads (1 does not divide tensor=2)
  return HeadMask.from_array(np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]),
                             sink=2, recent=6)


TINY4 = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4,
                    num_heads=8, num_kv_heads=4, head_dim=8, name="tiny4")


def test_cache_specs_uneven_pattern():
  need_devices()
  m = sh.make_mesh("data=2,sequence=2,tensor=2")
  cache = jax.eval_shape(lambda: kvc.init_cache(TINY4, 4, 32, _uneven_mask(), jnp.float32))
  with pytest.warns(sh.ShardingWarning, match=r"kv cache \(streaming part\): kv_heads "
                                              r"dimension of size 3 is not divisible"):
    specs = sh.cache_specs(cache, m)
  l0, l1, l2, l3 = specs.layers
  assert isinstance(l0, kvc.DuoLayerCache) and isinstance(l2, kvc.StreamLayerCache)
  assert l0.full.k == P("data", "sequence", "tensor", None)
  assert l0.stream.k == P("data", None, "tensor", None)  # sink + ring: not over sequence
  # 1 retrieval head: tensor cannot split it, so it splits the slots with sequence
  assert l1.full.v == P("data", ("sequence", "tensor"), None, None)
  assert l1.stream.k == P("data", None, None, None)  # 3 streaming heads: replicated
  assert l2.k == P("data", None, "tensor", None)
  assert l3.k == P("data", "sequence", "tensor", None)
  assert specs.lengths == P("data")
  assert (l0.stream.sink, l0.stream.recent) == (2, 6)


def test_spill_needs_a_capacity_that_both_axes_divide():
  """Capacity 34 splits over sequence=2 but not over sequence x tensor = 4: the 1-head
  part stays replicated over tensor, and the note says why; no spill in training mode."""
  need_devices()
  m = sh.make_mesh("sequence=2,tensor=2", jax.devices()[:4])
  cache = jax.eval_shape(lambda: kvc.init_cache(TINY4, 1, 34, _uneven_mask(), jnp.float32))
  notes: list = []
  got = sh.spec_for(sh.CACHE_AXES, cache.layers[1].full.k.shape, m, notes=notes)
  assert got == P(None, "sequence", None, None)
  assert any("sequence dimension 34 is not divisible by sequence=2 x tensor=2 either: a "
             "multiple of 4 would split it" in n for n in notes), notes
  assert sh.spec_for(sh.CACHE_AXES, (1, 32, 1, 8), m, notes=[]) == P(
      None, ("sequence", "tensor"), None, None)
  assert sh.spec_for(sh.CACHE_AXES, (1, 32, 1, 8), m, "training", notes=[]) == P(
      None, "sequence", None, None)
  assert sh.capacity_multiple(m) == 4 and sh.capacity_multiple(None) == 1
  # whether attention must run context-parallel on a tensor-only mesh
  t2 = sh.make_mesh("tensor=2", jax.devices()[:2])
  init = lambda cap, mask: jax.eval_shape(lambda: kvc.init_cache(TINY4, 1, cap, mask,
                                                                 jnp.float32))
  assert sh.splits_sequence(init(32, _uneven_mask()), t2)  # the 1-head layer's slots
  assert not sh.splits_sequence(init(33, _uneven_mask()), t2)  # 33 slots: replicated
  assert not sh.splits_sequence(init(32, None), t2)  # full attention: heads over tensor


def test_inference_splits_the_mlp_and_vocab_over_tensor_and_sequence():
  """A 70B-like layer on sequence=8 x tensor=8: the MLP and the vocabulary split 64 ways
  (the 8 KV heads only 8), so the weights per device shrink with `sequence` too. Where
  tensor x sequence does not divide a width, tensor alone (or sequence alone) does."""
  need_devices()
  m = sh.make_mesh("sequence=2,tensor=4")
  shapes = {"embed": (128256, 64), "lm_head": (64, 128256), "final_norm": (64,),
            "layers": [{"wq": (64, 8, 8, 16), "w_gate": (64, 28672), "w_up": (64, 28672),
                        "w_down": (28672, 64)}]}
  specs = sh.param_specs(shapes, m)
  lay = specs["layers"][0]
  both = ("tensor", "sequence")
  assert lay["wq"] == P(None, "tensor", None, None)
  assert lay["w_gate"] == lay["w_up"] == P(None, both) and lay["w_down"] == P(both, None)
  assert specs["embed"] == P(both, None) and specs["lm_head"] == P(None, both)
  with pytest.warns(sh.ShardingWarning, match="not divisible by sequence=2"):
    assert sh.param_specs({"embed": (12, 64), "final_norm": (64,)}, m)["embed"] == P(
        "tensor", None)  # 12 = 4 * 3
  with pytest.warns(sh.ShardingWarning, match="not divisible by tensor=4"):
    assert sh.param_specs({"embed": (6, 64), "final_norm": (64,)}, m)["embed"] == P(
        "sequence", None)
  # training keeps them on tensor (sequence splits the activations there)
  assert sh.param_specs(shapes, m, "training")["layers"][0]["w_up"] == P(None, "tensor")


def test_cache_capacity_must_split_over_sequence():
  need_devices()
  m = sh.make_mesh("sequence=8")
  cache = jax.eval_shape(lambda: kvc.init_cache(TINY4, 1, 100, None, jnp.float32))
  with pytest.raises(sh.ShardingError, match="capacity 100 is not a multiple of sequence=8; "
                                             "allocate 104 slots"):
    sh.cache_specs(cache, m)


def test_device_put_cache_shards_hold_their_slices():
  need_devices()
  m = sh.make_mesh("data=2,sequence=4")
  cache = kvc.init_cache(TINY4, 2, 16, _uneven_mask(), jnp.float32)
  x = jnp.arange(2 * 16 * 2 * 8, dtype=jnp.float32).reshape(2, 16, 2, 8)
  cache.layers[0].full.k = x
  placed = jax.device_put(cache, sh.cache_shardings(cache, m))
  k = placed.layers[0].full.k
  for shard in k.addressable_shards:
    b, s = shard.index[0], shard.index[1]
    assert shard.data.shape == (1, 4, 2, 8)
    np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(x[b, s]))
  # streaming part: every sequence device holds the whole sink + ring of its rows
  st = placed.layers[2].k
  assert all(sd.data.shape == (1, 8, 4, 8) for sd in st.addressable_shards)


def test_abstract_for_aot():
  need_devices()
  m = sh.make_mesh("sequence=8")
  cache = jax.eval_shape(lambda: kvc.init_cache(TINY4, 1, 64, None, jnp.bfloat16))
  ab = sh.abstract(cache, sh.cache_shardings(cache, m))
  leaf = ab.layers[0].k
  assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding.spec[1] == "sequence"
  assert leaf.sharding.shard_shape(leaf.shape) == (1, 8, 4, 8)
