"""`duojax.eval` and `duojax.identify`: outputs checked for writability and values for range
before any model loads; razor's defaults fit the model; Ctrl-C in gate training exits promptly."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from duojax.checkpoint import store

HAY = ("The quick brown fox jumps over the lazy dog. " * 8 + "\n\n") * 40




def _err(main, argv, capsys):
  code = main(argv)
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = [l for l in err.strip().splitlines() if "error:" in l]
  return code, (lines[-1] if lines else err)


@pytest.fixture
def blocked(tmp_path):
  """A path that cannot be written even by root: its parent is a file."""
  f = tmp_path / "a_file"
  f.write_text("")
  return f / "out"


@pytest.mark.parametrize("task", ["niah", "passkey", "ppl"])
def test_eval_unwritable_out_fails_first(task, blocked, no_model, capsys):
  from duojax.eval.__main__ import main
  code, err = _err(main, [task, "--out", str(blocked / "r.json")], capsys)
  assert code == 2 and "--out" in err and "cannot write" in err
  code, err = _err(main, [task, "--out", str(blocked.parent.parent / "ok.json"), "--plot",
                          str(blocked / "p.png")], capsys)
  assert code == 2 and "--plot" in err


@pytest.mark.parametrize("flags,words", [
    (["--sparsity", "1"], ["--sparsity", "[0, 1)"]),
    (["--sparsity", "0.5,1.5"], ["--sparsity"]),
    (["--recent", "0"], ["--recent", ">= 1"]),
    (["--samples", "0"], ["--samples"]),
    (["--backend", "gpu"], ["GPU"]),
])
def test_eval_bad_values_fail_first(flags, words, tmp_path, no_model, capsys):
  import jax
  if "gpu" in flags and jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  from duojax.eval.__main__ import main
  code, err = _err(main, ["niah", "--out", str(tmp_path / "r.json"), *flags], capsys)
  assert code == 2, err
  for w in words:
    assert w in err, (w, err)


def test_eval_results_rescued_when_out_fails_at_the_end(blocked, tmp_path):
  from duojax.eval import harness
  with pytest.raises(OSError) as e:
    harness.write_json({"task": "niah", "cells": [1, 2]}, blocked / "r.json")
  rescue = str(e.value).split("saved to ")[1].split(" instead")[0]
  assert json.loads(open(rescue).read())["cells"] == [1, 2]
  os.remove(rescue)


@pytest.mark.parametrize("cmd", [
    ["duo", "--haystack", "HAY"], ["razor"], ["retrieval-score", "--haystack", "HAY"]])
def test_identify_unwritable_out_fails_first(cmd, blocked, tmp_path, no_model, capsys):
  from duojax.identify.__main__ import main
  hay = tmp_path / "hay.txt"
  hay.write_text(HAY)
  argv = [str(hay) if c == "HAY" else c for c in cmd] + ["--out", str(blocked)]
  code, err = _err(main, argv, capsys)
  assert code == 2 and "--out" in err and "cannot write" in err
  if "--haystack" in cmd:
    argv = [str(tmp_path / "nope") if c == "HAY" else c for c in cmd]
    code, err = _err(main, argv + ["--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--haystack" in err and "not found" in err


def test_razor_defaults_fit_the_model():
  from duojax.config import ModelConfig
  from duojax.identify import razor
  smollm2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                        num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
                        bos_token_id=1, eos_token_ids=(2,))
  assert razor.default_block(smollm2) == 2047  # 1 + 2047 x 4 = 8189 <= 8192
  razor.check_fits(smollm2, 2047, 4)
  with pytest.raises(razor.RazorError, match="at most 2047"):
    razor.check_fits(smollm2, 2500, 4)
  long_ctx = dataclasses.replace(smollm2, max_position_embeddings=32768)
  assert razor.default_block(long_ctx) == 2500  # the paper's setting where it fits


def test_razor_cli_default_and_explicit(tiny_ckpt, tmp_path, capsys, monkeypatch):
  from duojax.identify.__main__ import main
  # explicit values that cannot fit: refused before the weights load
  real = store.load_params
  monkeypatch.setattr(store, "load_params", lambda *a, **k: pytest.fail("weights loaded"))
  code, err = _err(main, ["razor", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "p"),
                          "--block", "2500"], capsys)
  cfg = store.load_config(tiny_ckpt)
  most = (512 - (cfg.bos_token_id is not None)) // 4
  assert code == 2 and "exceed the model's context of 512" in err and f"at most {most}" in err
  monkeypatch.setattr(store, "load_params", real)
  # the defaults run on the model as it is (512 tokens of context)
  assert main(["razor", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "p"),
               "--chunk", "64"]) == 0
  from duojax.pattern import load_any
  meta = load_any(tmp_path / "p").metadata
  assert meta["settings"]["block"] == most and meta["n_tokens"] <= 512


def test_ctrl_c_during_gate_training(tiny_ckpt, tmp_path):
  """SIGINT while training: a short message naming --resume, exit 130 within seconds, no
  traceback; a second Ctrl-C would quit at once."""
  hay = tmp_path / "hay.txt"
  hay.write_text(HAY)
  out = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  p = subprocess.Popen(
      [sys.executable, "-m", "duojax.identify", "duo", "--ckpt", str(tiny_ckpt), "--haystack",
       str(hay), "--out", str(out), "--steps", "100000", "--min-len", "300", "--max-len", "380",
       "--len-intervals", "1", "--num-passkeys", "1", "--passkey-words", "2", "--sink", "4",
       "--recent", "8", "--pad-multiple", "128", "--dtype", "float32", "--save-every", "2"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  log = out / "log.jsonl"
  t0 = time.time()
  while not (log.is_file() and log.read_text().count("\n") >= 3):
    assert p.poll() is None, p.communicate()[1]
    assert time.time() - t0 < 240, "training did not start"
    time.sleep(0.2)
  p.send_signal(signal.SIGINT)
  t1 = time.time()
  _, err = p.communicate(timeout=60)
  assert p.returncode == 130, err
  assert time.time() - t1 < 20
  assert "Traceback" not in err, err
  assert "--resume" in err and "stopped at step" in err
  assert any((out / "checkpoints").iterdir())  # the saved checkpoints stay


def test_second_ctrl_c_quits_during_compile(tiny_ckpt, tmp_path):
  """Two SIGINTs while XLA compiles (Python's own handler cannot run then): out at once."""
  hay = tmp_path / "hay.txt"
  hay.write_text(HAY)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  p = subprocess.Popen(
      [sys.executable, "-m", "duojax.identify", "duo", "--ckpt", str(tiny_ckpt), "--haystack",
       str(hay), "--out", str(tmp_path / "run"), "--steps", "100000", "--min-len", "300",
       "--max-len", "380", "--len-intervals", "1", "--num-passkeys", "1", "--passkey-words", "2",
       "--pad-multiple", "128", "--dtype", "float32"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  t0 = time.time()
  while not (tmp_path / "run" / "log.jsonl").exists():  # opened just before the first step
    assert p.poll() is None, p.communicate()[1]
    assert time.time() - t0 < 240
    time.sleep(0.05)
  p.send_signal(signal.SIGINT)
  time.sleep(0.3)
  p.send_signal(signal.SIGINT)
  t1 = time.time()
  _, err = p.communicate(timeout=60)
  assert p.returncode in (130, -signal.SIGINT), err  # -2: the second one landed at exit
  assert time.time() - t1 < 5
  assert "Traceback" not in err, err
