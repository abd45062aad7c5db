"""Gate training on a tiny random model: the recipe's invariants, sharding, resume."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax.config import tiny_config
from duojax.data.haystack import HaystackTokens
from duojax.identify import duo
from duojax.model import init_params
from helpers import tiny_hf_tokenizer  # noqa: E402

TEXT = " ".join(f"Sentence number {i} tells of the {i % 7}th thing." for i in range(400))


class CharTok:
  def encode(self, text, add_special_tokens=False):
    return [min(ord(c), 96) for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


CFG = tiny_config(num_layers=2, max_position_embeddings=1024)
TC = duo.GateTrainConfig(steps=8, batch_size=1, min_len=250, max_len=330, len_intervals=2,
                         num_passkeys=1, passkey_words=2, sink=4, recent=8, pad_multiple=128,
                         save_every=3, dtype="float32", lr=0.05)


@pytest.fixture(scope="module")
def setup():
  params = init_params(CFG, jax.random.PRNGKey(0), scale=0.3)
  return params, HaystackTokens(TEXT, CharTok(), line_breaks=False)


def _train(setup, out, tc=TC, **kw):
  params, hay = setup
  return duo.train_gates(params, CFG, CharTok(), hay, tc, out, progress=False, **kw)


def test_loss_falls_gates_stay_in_range_only_gates_train(setup, tmp_path):
  params, _ = setup
  before = jax.tree_util.tree_map(np.asarray, params)
  state = _train(setup, tmp_path)
  log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
  assert len(log) == TC.steps
  assert log[-1]["loss"] < log[0]["loss"]
  g = np.asarray(state.gates)
  assert g.shape == (CFG.num_layers, CFG.num_kv_heads)
  assert (g >= 0).all() and (g <= 1).all() and (g < 1).any()
  # frozen weights untouched, and the optimizer holds state for the gates only
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  shapes = {np.shape(x) for x in jax.tree_util.tree_leaves(state.opt_state)}
  assert shapes <= {(), g.shape}


def test_all_gates_one_student_equals_teacher(setup):
  params, hay = setup
  from duojax.data.passkey import MultiPasskeyConfig
  dc = MultiPasskeyConfig(num_passkeys=1, passkey_words=2, min_len=250, max_len=330,
                          len_intervals=2, seed=0)
  tokens, lengths, mask = duo.make_batch(hay, CharTok(), dc, TC, 0)
  ones = jnp.ones((CFG.num_layers, CFG.num_kv_heads))
  loss, aux = duo.distill_loss(ones, params, CFG, tokens, lengths, mask, 4, 8, 0.05)
  assert float(aux["distill"]) < 1e-12
  half = ones * 0.5
  _, aux = duo.distill_loss(half, params, CFG, tokens, lengths, mask, 4, 8, 0.05)
  assert float(aux["distill"]) > 1e-6  # the streaming branch really differs


def test_schedule_warmup_plateau_decay_floor():
  tc = duo.GateTrainConfig(steps=100, lr=0.02)
  f = duo.lr_schedule(tc)
  lrs = np.array([float(f(s)) for s in range(100)])
  assert lrs[0] == pytest.approx(0.002)  # 1/20 of the way up, clipped to the 0.1x floor
  assert lrs[19] == pytest.approx(0.02) and lrs[50] == pytest.approx(0.02)
  assert lrs[99] == pytest.approx(0.002) and lrs.min() >= 0.002 - 1e-9
  assert np.all(np.diff(lrs[:20]) >= 0) and np.all(np.diff(lrs[80:]) <= 0)


def test_kill_and_resume_equals_uninterrupted(setup, tmp_path):
  full = _train(setup, tmp_path / "a")
  _train(setup, tmp_path / "b", stop_after=4)  # "killed" after step 4 (checkpoint at 3)
  # steps after the last checkpoint are redone on resume
  resumed = _train(setup, tmp_path / "b", resume=True)
  assert resumed.step == TC.steps
  np.testing.assert_array_equal(np.asarray(full.gates), np.asarray(resumed.gates))


def test_four_cpu_devices_equal_one(setup, tmp_path):
  script = textwrap.dedent(f"""
    import sys, json, numpy as np, jax
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    from test_identify_duo import _train, CFG, TC, CharTok, TEXT
    from duojax.identify import duo
    from duojax.model import init_params
    from duojax.data.haystack import HaystackTokens
    import dataclasses
    assert len(jax.devices()) == 4
    params = init_params(CFG, jax.random.PRNGKey(0), scale=0.3)
    hay = HaystackTokens(TEXT, CharTok(), line_breaks=False)
    tc = dataclasses.replace(TC, batch_size=4, steps=3)
    s = duo.train_gates(params, CFG, CharTok(), hay, tc, sys.argv[1], duo.make_mesh(int(sys.argv[2])), progress=False)
    print(json.dumps(np.asarray(s.gates).tolist()))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  outs = []
  for n in (4, 1):
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"m{n}"), str(n)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    outs.append(np.array(json.loads(r.stdout.strip().splitlines()[-1])))
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_bad_input(setup, tmp_path):
  params, hay = setup
  with pytest.raises(duo.TrainError, match="greater than"):
    duo.GateTrainConfig(min_len=500, max_len=100)
  short = HaystackTokens(TEXT[:300], CharTok(), line_breaks=False)
  with pytest.raises(duo.TrainError, match="longer haystack"):
    duo.train_gates(params, CFG, CharTok(), short, TC, tmp_path / "s", progress=False)
  with pytest.raises(duo.TrainError, match="does not divide"):
    duo.make_mesh(3 if len(jax.devices()) % 3 else 7)
  with pytest.raises(duo.TrainError, match="no checkpoint"):
    _train(setup, tmp_path / "empty", resume=True)


def test_corrupt_checkpoint_on_resume(setup, tmp_path):
  _train(setup, tmp_path, stop_after=3)
  step_dir = tmp_path / "checkpoints" / "3"
  for f in step_dir.rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "manifest" not in f.name:
      f.write_bytes(b"garbage")
  with pytest.raises(duo.TrainError, match="cannot be read"):
    _train(setup, tmp_path, resume=True)


def test_cli_end_to_end(setup, tmp_path, monkeypatch):
  """`python -m duojax.identify duo` on a tiny checkpoint writes pattern, log and heatmap."""
  from duojax.checkpoint import store
  from duojax.identify.__main__ import main
  from duojax.pattern import load_any
  params, _ = setup
  tok = tiny_hf_tokenizer()
  ck = store.save_checkpoint(tmp_path / "ck", CFG, params, tok)
  hay = tmp_path / "hay.txt"
  hay.write_text(TEXT)
  yml = tmp_path / "c.yaml"
  yml.write_text("steps: 2\nmin_len: 250\nmax_len: 330\nlen_intervals: 2\nnum_passkeys: 1\npasskey_words: 2\n"
                 "sink: 4\nrecent: 8\npad_multiple: 128\ndtype: float32\n")
  out = tmp_path / "out"
  rc = main(["duo", "--config", str(yml), "--ckpt", str(ck), "--haystack", str(hay), "--out",
             str(out), "--set-default"])
  assert rc == 0
  assert (out / "gates.png").stat().st_size > 1000
  pat = load_any(out / "pattern")
  assert pat.shape == (2, 2) and pat.metadata["method"] == "duo"
  assert (out / "pattern" / "full_attention_heads.tsv").is_file()
  assert store.default_pattern_dir(ck) is not None
  rc = main(["duo", "--ckpt", str(ck), "--haystack", str(hay), "--out", str(tmp_path / "o2"),
             "--min-len", "400", "--max-len", "300"])
  assert rc == 2


