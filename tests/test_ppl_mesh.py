"""Perplexity (duojax.eval.ppl) on a device mesh equals one device.

Runs on 8 fake CPU devices: in a plain pytest process `test_on_8_fake_cpu_devices`
reruns this file in a subprocess with them (see test_sharding.py). The oracle is the
one-device perplexity path (tests/test_eval.py checks it against the engine's logits and
log-softmax); here every per-token NLL of a mesh must equal it (fp32, 1e-5 relative), so a
mesh path that dropped a chunk, shifted the targets or ignored the head pattern fails.
A tiny model with SmolLM2's KV-head count (3, so tensor=3 splits them), windows of 45
tokens in chunks of 16 (the last chunk partial) and two DuoAttention patterns whose
layers keep different numbers of retrieval heads, next to full attention.
"""

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from duojax import context_parallel as cp
from duojax import sharding as sh
from duojax.config import tiny_config
from duojax.data.haystack import HaystackTokens
from duojax.eval import methods as M, ppl
from duojax.model import llama
from duojax.pattern import HeadMask, random_pattern
from helpers import random_params, tiny_hf_tokenizer
from test_sharding import N_FAKE, _CHILD, need_devices, run_on_fake_devices


def test_on_8_fake_cpu_devices():
  if jax.device_count() >= N_FAKE:
    pytest.skip("this process has the devices: the tests ran here directly")
  run_on_fake_devices(__file__, timeout=300)


# vocab 97 = tiny_hf_tokenizer's ids; 3 KV heads (tensor=3 divides them, tensor=2 does not)
CFG = tiny_config(num_kv_heads=3, num_heads=6, max_position_embeddings=256, name="tiny-ppl")
# layer 0 keeps 1 of 3 retrieval heads, layer 1 all 3 (a full cache), layer 2 none; the
# window (45) is far past sink + recent (6), so the streaming heads drop tokens
UNEVEN = HeadMask.from_array(np.array([[1, 0, 0], [1, 1, 1], [0, 0, 0]], bool), sink=2,
                             recent=4)
RANDOM = random_pattern(CFG.num_layers, CFG.num_kv_heads, seed=4, sink=2, recent=6).binarize(
    sparsity=0.5)
MASKS = {"uneven": UNEVEN, "random": RANDOM, "full": None}
T, CHUNK = 45, 16  # 3 chunks, the last one with 13 tokens
MESHES = ["tensor=3", "sequence=4", "data=2,sequence=2"]


def _mesh(spec):
  n = int(np.prod([int(p.split("=")[1]) for p in spec.split(",")]))
  return sh.make_mesh(spec, jax.devices()[:n])


@functools.lru_cache(maxsize=None)
def _params():
  return random_params(CFG, 11, 0.3)


def _windows():
  return np.random.default_rng(1).integers(3, CFG.vocab_size, (2, T)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _one_device(name):
  """(params reordered for the pattern, mask, the one-device NLL [2, T - 1])."""
  mask = MASKS[name]
  p = _params() if mask is None else llama.apply_head_mask(_params(), mask)
  return p, mask, ppl.token_nll(p, CFG, _windows(), mask, CHUNK)


def test_patterns_are_uneven_and_matter():
  """The cases above test what they claim: per-layer retrieval counts differ, and each
  pattern's NLL differs from full attention's (a mesh path ignoring it would fail). In the
  fake-device process only, where the one-device NLLs are computed once for every test."""
  need_devices()
  for mask in (UNEVEN, RANDOM):
    assert len({int(np.sum(r)) for r in np.asarray(mask.retrieval)}) > 1
  full = _one_device("full")[2]
  for name in ("uneven", "random"):
    assert np.abs(_one_device(name)[2] - full).max() > 1e-2, name


@pytest.mark.parametrize("spec", MESHES)
def test_token_nll_on_a_mesh_equals_one_device(spec, monkeypatch):
  need_devices()
  seen = []
  real = cp.attend
  monkeypatch.setattr(cp, "attend", lambda *a, **k: seen.append(1) or real(*a, **k))
  mesh = _mesh(spec)
  for name in MASKS:
    p, mask, want = _one_device(name)
    seen.clear()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", sh.ShardingWarning)  # replicated fallbacks are expected
      got = ppl.token_nll(p, CFG, _windows(), mask, CHUNK, mesh=mesh)
    assert got.shape == want.shape == (2, T - 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{spec} {name}")
    # Context-parallel attention (retrieval slots split over devices) runs for sequence > 1,
    # and on tensor=3 for the patterns whose layers keep 1 or 2 of 3 heads (their slots
    # split over tensor: sharding.SPILL); full attention on tensor=3 splits the heads.
    assert bool(seen) == ("sequence" in spec or mask is not None), (spec, name, len(seen))


def test_compiled_steps_on_a_mesh_and_a_misaligned_step_is_caught():
  """compile_steps(mesh=...) (what evaluate runs) gives the same NLL; and the comparison
  can fail: the same windows shifted by one token are far off."""
  need_devices()
  mesh = _mesh("data=2,sequence=2")
  p, mask, want = _one_device("uneven")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    steps = ppl.compile_steps(p, CFG, (2, T), [(mask, False)], CHUNK, mesh=mesh)
    got = ppl.token_nll(p, CFG, _windows(), mask, CHUNK, compiled=steps[(mask, False)],
                        mesh=mesh)
    shifted = ppl.token_nll(p, CFG, np.roll(_windows(), 1, axis=1), mask, CHUNK,
                            compiled=steps[(mask, False)], mesh=mesh)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.abs(shifted[:, 1:] - want[:, :-1]).max() > 1e-2


def _hay():
  text = " ".join(f"Line {i} says {i % 7} things about {'abcdefg'[i % 5]}." for i in range(200))
  return HaystackTokens(text, tiny_hf_tokenizer(), line_breaks=False)


def test_evaluate_on_a_mesh_equals_one_device():
  """The whole document: every method's ppl, bands and per-window values on
  data=2,sequence=2 (the two windows split over data) equal one device."""
  need_devices()
  hay, params = _hay(), _params()
  pattern = random_pattern(CFG.num_layers, CFG.num_kv_heads, seed=4, sink=2, recent=6)
  built = M.build_methods(M.parse_methods("full,duo", "0.5"), CFG, pattern, 2, 6)
  kw = dict(length=60, samples=2, band_edges=[20], chunk=CHUNK, progress=False)
  want = ppl.evaluate(params, CFG, hay, built, **kw)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    got = ppl.evaluate(params, CFG, hay, built, **kw, mesh=_mesh("data=2,sequence=2"))
  assert got["windows"] == want["windows"] and set(got["results"]) == set(want["results"])
  for name, w in want["results"].items():
    g = got["results"][name]
    assert g["ppl"] == pytest.approx(w["ppl"], rel=1e-5), name
    assert g["per_window"] == pytest.approx(w["per_window"], rel=1e-5), name
    assert [b["ppl"] for b in g["bands"]] == pytest.approx([b["ppl"] for b in w["bands"]],
                                                           rel=1e-5), name
  assert want["results"]["full"]["ppl"] != pytest.approx(want["results"]["duo@0.5"]["ppl"])


def test_bad_meshes_are_clear_errors():
  need_devices()
  hay, params = _hay(), _params()
  built = M.build_methods(M.parse_methods("full"), CFG, None, 2, 6)
  with pytest.raises(sh.ShardingError, match="tensor sizes that work for this model: 1, 3"):
    ppl.evaluate(params, CFG, hay, built, 60, 1, chunk=CHUNK, progress=False,
                 mesh=_mesh("tensor=2"))
  # the compensation token has no context-parallel attention: say what runs instead
  p = llama.apply_head_mask(params, UNEVEN)
  with pytest.raises(ValueError, match="drop \\+comp"), warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    ppl.token_nll(p, CFG, _windows(), UNEVEN, CHUNK, compensation=True,
                  mesh=_mesh("sequence=2"))


def test_compensation_on_a_data_mesh_equals_one_device():
  need_devices()
  p = llama.apply_head_mask(_params(), UNEVEN)
  want = ppl.token_nll(p, CFG, _windows(), UNEVEN, CHUNK, compensation=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    got = ppl.token_nll(p, CFG, _windows(), UNEVEN, CHUNK, compensation=True,
                        mesh=_mesh("data=2"))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(want, _one_device("uneven")[2])  # the token changes the NLL


# -- the CLI -----------------------------------------------------------------------------

def test_cli_ppl_mesh_sequence2_equals_one_device(tmp_path):
  """`python -m duojax.eval ppl --mesh sequence=2` in a process of 2 fake devices: the
  weights restored onto the mesh, the same results as one device (run here), and the
  mesh in the settings. (The parent runs it: it makes its own 2-device process.)"""
  if os.environ.get(_CHILD):
    pytest.skip("the parent process runs this one (it starts its own 2-device process)")
  from duojax.checkpoint import store
  from duojax.eval.__main__ import main
  ck = store.save_checkpoint(tmp_path / "ck", CFG, _params(), tiny_hf_tokenizer())
  hay = tmp_path / "hay.txt"
  hay.write_text(" ".join(f"Line {i} says {i % 7} things." for i in range(200)))
  pat = tmp_path / "pat"
  random_pattern(CFG.num_layers, CFG.num_kv_heads, seed=4, sink=2, recent=6).save(pat)
  argv = ["ppl", "--ckpt", str(ck), "--haystack", str(hay), "--attention", "full,duo",
          "--pattern", str(pat), "--sparsity", "0.5", "--lengths", "20,60", "--samples", "2",
          "--dtype", "float32", "--prefill-chunk", str(CHUNK), "--sink", "2", "--recent", "6",
          "--no-progress"]
  assert main(argv + ["--out", str(tmp_path / "one.json")]) == 0
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
             " --xla_force_host_platform_device_count=2").strip())
  env.pop(_CHILD, None)
  r = subprocess.run([sys.executable, "-m", "duojax.eval", *argv, "--mesh", "sequence=2",
                      "--out", str(tmp_path / "mesh.json")], env=env, capture_output=True,
                     text=True, timeout=240, cwd=Path(__file__).resolve().parents[1])
  assert r.returncode == 0, r.stderr[-3000:]
  one, mesh = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "mesh"))
  assert mesh["settings"]["device"]["mesh"]["sequence"] == 2
  assert "mesh" not in one["settings"]["device"]
  assert set(mesh["results"]) == set(one["results"]) == {"full", "duo@0.5"}
  for name, w in one["results"].items():
    assert mesh["results"][name]["per_window"] == pytest.approx(w["per_window"], rel=1e-5)
    assert mesh["results"][name]["bands"] == [
        dict(b, ppl=pytest.approx(b["ppl"], rel=1e-5)) for b in w["bands"]]
  assert one["results"]["full"]["ppl"] != pytest.approx(one["results"]["duo@0.5"]["ppl"])


def test_cli_ppl_mesh_that_cannot_hold_the_model(tmp_path, capsys):
  """tensor=2 on 3 KV heads: refused at the restore, naming the sizes that work."""
  need_devices()
  from duojax.checkpoint import store
  from duojax.eval.__main__ import main
  ck = store.save_checkpoint(tmp_path / "ck", CFG, _params(), tiny_hf_tokenizer())
  hay = tmp_path / "hay.txt"
  hay.write_text(" ".join(f"Line {i} says {i % 7} things." for i in range(200)))
  rc = main(["ppl", "--ckpt", str(ck), "--haystack", str(hay), "--lengths", "60",
             "--mesh", "data=4,tensor=2", "--out", str(tmp_path / "r.json"), "--no-progress"])
  err = capsys.readouterr().err
  assert rc == 2 and "tensor sizes that work for this model: 1, 3" in err, err
