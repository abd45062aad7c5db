"""The checkpoint handle, restore against an abstract target, format versions, and the
safetensors reader (compared with the safetensors library's own reading)."""

import json
import shutil
import struct

import numpy as np
import pytest

from duojax import layout
from duojax.checkpoint import store
from duojax.checkpoint.handle import Checkpoint
from duojax.checkpoint.hf import CheckpointError, SafetensorsFile
from duojax.config import tiny_config


def _params(cfg, seed=0, dtype=np.float32):
  """Random params of cfg's layout, built from the model's own init (the oracle for shapes)."""
  import jax
  from duojax.model import llama
  p = llama.init_params(cfg, jax.random.PRNGKey(seed))
  return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), p)


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True},
                                {"attention_bias": True, "num_kv_heads": 3, "num_layers": 1},
                                {"qk_norm": True, "num_kv_heads": 6}],
                         ids=["gqa", "tied", "bias-odd", "qknorm-mha"])
def test_layout_matches_model_init(kw):
  import jax
  cfg = tiny_config(**kw)
  params = _params(cfg)
  got = layout.param_shapes(cfg)
  want = jax.tree_util.tree_map(np.shape, params)
  assert got == want
  axes = layout.param_axes(cfg)
  flat_axes = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  flat_shapes = jax.tree_util.tree_leaves(want, is_leaf=lambda x: isinstance(x, tuple))
  assert [len(a) for a in flat_axes] == [len(s) for s in flat_shapes]
  assert axes["layers"][0]["wq"] == ("embed", "kv_heads", "q_group", "head_dim")


@pytest.fixture
def saved(tmp_path):
  cfg = tiny_config(num_layers=2)
  params = _params(cfg, seed=3)
  out = store.save_checkpoint(tmp_path / "ck", cfg, params, source="hf:tiny-src",
                              source_path=str(tmp_path / "tiny-src"))
  return out, cfg, params


def test_roundtrip_structure_dtype_values(saved):
  import jax.numpy as jnp
  out, cfg, params = saved
  ck = Checkpoint.open(out)
  assert ck.config == cfg and ck.dtype == "float32" and ck.embedded is None
  got = ck.params()
  assert isinstance(got["layers"], list) and len(got["layers"]) == 2  # not {'0': ...}
  for a, b in zip(_leaves(got), _leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), b)
  half = ck.params(dtype=jnp.bfloat16)
  assert {str(x.dtype) for x in _leaves(half)} == {"bfloat16"}
  np.testing.assert_allclose(np.asarray(half["embed"], np.float32), params["embed"], rtol=1e-2,
                             atol=1e-6)
  abstract = ck.abstract_params()
  assert [a.shape for a in _leaves(abstract)] == [np.shape(b) for b in _leaves(params)]


def _leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)


def test_restore_with_shardings(saved):
  """Each tensor is read straight into its sharding (8 fake CPU devices when available)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  out, cfg, params = saved
  n = min(len(jax.devices()), 2)
  mesh = jax.make_mesh((n,), ("model",), devices=jax.devices()[:n])
  shard = lambda axes: NamedSharding(mesh, P(*["model" if a == "kv_heads" else None for a in axes]))
  tree = layout._map_axes(shard, layout.param_axes(cfg))
  got = Checkpoint.open(out).params(shardings=tree)
  assert got["layers"][1]["wk"].sharding == tree["layers"][1]["wk"]
  np.testing.assert_array_equal(np.asarray(got["layers"][1]["wk"]), params["layers"][1]["wk"])
  one = Checkpoint.open(out).params(shardings=NamedSharding(mesh, P()))
  np.testing.assert_array_equal(np.asarray(one["embed"]), params["embed"])
  with pytest.raises(ValueError, match="structure"):
    Checkpoint.open(out).params(shardings={"embed": None})


def test_shapes_checked_against_model_json(saved):
  out, cfg, _ = saved
  (out / "model.json").write_text(tiny_config(num_layers=2, hidden_size=40).to_json())
  with pytest.raises(CheckpointError, match="do not match the model config.*convert again"):
    Checkpoint.open(out).params()
  with pytest.raises(CheckpointError, match="do not fit the config"):
    store.save_checkpoint(out.parent / "bad", tiny_config(num_layers=3), _params(cfg))


def test_patterns_by_name(saved, tmp_path):
  out, cfg, _ = saved
  ck = Checkpoint.open(out)
  assert ck.default_pattern_dir is None and ck.pattern_dirs == {}
  (out / "patterns" / "razor").mkdir(parents=True)
  assert ck.pattern_dirs == {"razor": out / "patterns" / "razor"}
  ck.set_default_pattern("razor")
  assert Checkpoint.open(out).default_pattern_dir == out / "patterns" / "razor"
  with pytest.raises(CheckpointError, match="no head pattern 'duo'.*razor"):
    ck.pattern_dir("duo")


def test_old_format_names_the_reconvert_command(saved):
  out, cfg, _ = saved
  meta = json.loads((out / "duojax.json").read_text())
  (out / "duojax.json").write_text(json.dumps({**meta, "format_version": 1}))
  want = f"python -m duojax.convert --hf {out.parent / 'tiny-src'} --out {out}-v2"
  for fn in (lambda: Checkpoint.open(out), lambda: store.load_params(out),
             lambda: store.load_config(out)):
    with pytest.raises(store.CheckpointVersionError) as e:
      fn()
    assert want in str(e.value) and "older format (version 1" in str(e.value)
  del meta["format_version"], meta["source_path"]  # as version 1 wrote it
  (out / "duojax.json").write_text(json.dumps({**meta, "source": "gguf:M.Q4.gguf",
                                               "dtype": "bfloat16"}))
  with pytest.raises(CheckpointError, match=r"--gguf M\.Q4\.gguf --out .*-v2 --dtype bfloat16"):
    Checkpoint.open(out)
  (out / "duojax.json").write_text(json.dumps({**meta, "format_version": 9}))
  with pytest.raises(CheckpointError, match="newer than this duojax.*upgrade"):
    Checkpoint.open(out)


def test_embedded_old_version_is_rebuilt_keeping_user_patterns(tiny_gguf_pkg, tmp_path,
                                                                monkeypatch):
  from duojax.checkpoint import embedded
  root, mod, name = tiny_gguf_pkg
  monkeypatch.syspath_prepend(str(root))
  monkeypatch.setitem(embedded.EMBEDDED, "tiny", (mod, name, "duojax-tiny-model"))
  monkeypatch.setenv("DUOJAX_HOME", str(tmp_path / "home"))
  ck = Checkpoint.open("tiny", progress=False)
  assert ck.embedded == "tiny" and ck.meta["format_version"] == store.FORMAT_VERSION
  folder = ck.path
  (folder / "patterns" / "mine").mkdir(parents=True)
  (folder / "patterns" / "mine" / "pattern.json").write_text("{}")
  meta = json.loads((folder / "duojax.json").read_text())
  (folder / "duojax.json").write_text(json.dumps(
      {**meta, "format_version": 1, "default_pattern": "mine"}))
  with pytest.raises(CheckpointError, match="re-created automatically: pass --ckpt tiny"):
    Checkpoint.open(folder)  # by its folder: not ours to replace behind the caller's back
  again = Checkpoint.open("tiny", progress=False)  # by name: converted again
  assert again.meta["format_version"] == store.FORMAT_VERSION
  assert again.default_pattern == "mine"
  assert (again.path / "patterns" / "mine" / "pattern.json").read_text() == "{}"
  assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["tiny"]  # no trash left
  np.testing.assert_array_equal(np.asarray(again.params()["embed"]), np.asarray(ck.params()["embed"]))


def _write_safetensors(path, tensors, header_extra=None):
  """An independent writer of the format (8-byte length, JSON header, raw bytes)."""
  names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64"}
  header, blobs, off = {}, [], 0
  for k, (dt, a) in tensors.items():
    b = a.tobytes()
    header[k] = {"dtype": dt or names[a.dtype], "shape": list(a.shape),
                 "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
  header.update(header_extra or {})
  h = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_safetensors_reader_against_the_library(tmp_path):
  import ml_dtypes
  from safetensors.numpy import load_file
  rng = np.random.default_rng(0)
  f32 = rng.standard_normal((5, 7)).astype(np.float32)
  f16 = rng.standard_normal((3,)).astype(np.float16)
  i64 = rng.integers(-9, 9, (2, 3, 1))
  bf = rng.standard_normal((4, 3)).astype(ml_dtypes.bfloat16)
  _write_safetensors(tmp_path / "a.safetensors", {"x": (None, f32), "y": (None, f16),
                                                  "z": (None, i64)},
                     {"__metadata__": {"format": "pt"}})
  ref = load_file(str(tmp_path / "a.safetensors"))
  ours = SafetensorsFile(tmp_path / "a.safetensors")
  assert sorted(ours.keys()) == ["x", "y", "z"]
  for k in ref:
    got = ours.get_tensor(k)
    assert got.dtype == ref[k].dtype and got.flags.writeable
    np.testing.assert_array_equal(got, ref[k])
  # BF16, which safetensors' numpy framework cannot return: compare with torch's reading.
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file
  t = torch.from_numpy(bf.astype(np.float32)).to(torch.bfloat16)
  save_file({"w": t, "v": torch.arange(6, dtype=torch.float32)}, str(tmp_path / "b.safetensors"))
  b = SafetensorsFile(tmp_path / "b.safetensors")
  got = b.get_tensor("w")
  assert got.dtype == ml_dtypes.bfloat16 and got.shape == (4, 3)
  np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())
  np.testing.assert_array_equal(b.get_tensor("v"), np.arange(6, dtype=np.float32))


def test_safetensors_reader_errors(tmp_path):
  f = tmp_path / "m.safetensors"
  a = np.ones((4, 4), np.float32)
  _write_safetensors(f, {"x": (None, a)})
  data = f.read_bytes()
  f.write_bytes(data[:-8])
  with pytest.raises(CheckpointError, match="truncated.*download it again"):
    SafetensorsFile(f)
  f.write_bytes(data[:5])
  with pytest.raises(CheckpointError, match="not a readable safetensors.*download it again"):
    SafetensorsFile(f)
  _write_safetensors(f, {"x": ("F8_E4M3", np.ones(4, np.uint8))})
  with pytest.raises(CheckpointError, match="dtype F8_E4M3.*float32, float16 or bfloat16"):
    SafetensorsFile(f)
  _write_safetensors(f, {"x": ("F32", np.ones(4, np.float16))})  # 8 bytes for 4 float32s
  with pytest.raises(CheckpointError, match="offsets do not fit"):
    SafetensorsFile(f)


def test_hf_sharded_folder_bf16_converts_like_the_oracle(tmp_path):
  """Two shards + index, bf16 on disk: the converted params equal HF -> duojax done by hand."""
  import ml_dtypes
  from duojax.checkpoint.conversion import convert_hf
  from duojax.checkpoint.hf import hf_state_from_params
  cfg = tiny_config(num_layers=2, attention_bias=True, architecture="qwen2")
  params = _params(cfg, seed=5)
  state = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_state_from_params(params, cfg).items()}
  names = sorted(state)
  src = tmp_path / "hf"
  src.mkdir()
  halves = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for fname, keys in halves.items():
    _write_safetensors(src / fname, {k: ("BF16", state[k]) for k in keys})
  (src / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: fname for fname, keys in halves.items() for k in keys}}))
  hf_cfg = cfg.to_hf()
  (src / "config.json").write_text(json.dumps(hf_cfg))
  out = convert_hf(src, tmp_path / "o", dtype="bfloat16", progress=False)
  got = Checkpoint.open(out).params()
  # the oracle: HF [out, in] weights transposed/reshaped into the einsum layouts by hand
  e, h, g, d = cfg.hidden_size, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
  w = lambda k: state[k].astype(np.float32)
  lp = got["layers"][1]
  np.testing.assert_array_equal(
      np.asarray(lp["wq"], np.float32),
      w("model.layers.1.self_attn.q_proj.weight").T.reshape(e, h, g, d))
  np.testing.assert_array_equal(np.asarray(lp["wo"], np.float32),
                                w("model.layers.1.self_attn.o_proj.weight").T.reshape(h, g, d, e))
  np.testing.assert_array_equal(np.asarray(lp["bk"], np.float32),
                                w("model.layers.1.self_attn.k_proj.bias").reshape(h, d))
  np.testing.assert_array_equal(np.asarray(got["lm_head"], np.float32), w("lm_head.weight").T)
  assert str(got["embed"].dtype) == "bfloat16"
  shutil.rmtree(out)


def test_gate_resume_refuses_state_of_another_model(tmp_path):
  """Gate-training state is restored against an abstract target; orbax would fill a target
  of other shapes silently, so a resume with another model is refused by name."""
  import orbax.checkpoint as ocp
  from duojax.identify import duo
  tc = duo.GateTrainConfig(steps=4, min_len=100, max_len=200, dtype="float32")
  opt = duo.make_optimizer(tc)
  saved = duo.init_state(tiny_config(num_layers=2), tc, opt)
  mgr = duo._manager(tmp_path, tc)
  mgr.save(2, args=ocp.args.StandardSave(
      duo._state_tree(duo.TrainState(saved.gate_state, saved.opt_state, 2))))
  mgr.wait_until_finished()
  mgr.close()
  mesh = duo.make_mesh(1)
  back = duo.restore_state(tmp_path, duo.init_state(tiny_config(num_layers=2), tc, opt), mesh)
  assert back.step == 2
  import jax
  for a, b in zip(jax.tree_util.tree_leaves(back.gate_state),
                  jax.tree_util.tree_leaves(saved.gate_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(duo.TrainError, match="same model and settings"):
    duo.restore_state(tmp_path, duo.init_state(tiny_config(num_layers=3), tc, opt), mesh)
