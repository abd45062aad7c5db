"""`python -m duojax.convert` and damaged checkpoints: one line naming the file and the fix."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from duojax import convert, infer
from duojax.checkpoint import store


def _err(main, argv, capsys):
  code = main(argv)
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = [l for l in err.strip().splitlines() if ": error: " in l]
  return code, (lines[-1] if lines else err)


def _hf_folder(d, cfg=None):
  """A real (tiny) HF llama folder: config.json + model.safetensors."""
  from safetensors.numpy import save_file
  from duojax.checkpoint.hf import hf_state_from_params
  from duojax.config import tiny_config
  from duojax.model import llama
  import jax
  c = tiny_config()
  params = jax.tree_util.tree_map(np.asarray, llama.init_params(c, jax.random.PRNGKey(0)))
  d.mkdir()
  save_file(hf_state_from_params(params, c), str(d / "model.safetensors"))
  (d / "config.json").write_text(json.dumps(cfg or {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
      "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": 1e-5,
      "rope_theta": 10000.0, "tie_word_embeddings": "lm_head" not in params}))
  return d


def test_hf_folder_converts(tmp_path, capsys):
  src = _hf_folder(tmp_path / "hf")
  assert convert.main(["--hf", str(src), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
  assert store.load_config(tmp_path / "o").num_layers == 3
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "o"]  # no staging folder left


def test_malformed_config_json(tmp_path, capsys):
  src = _hf_folder(tmp_path / "hf")
  (src / "config.json").write_text('{"model_type": "llama", ')
  code, err = _err(convert.main, ["--hf", str(src), "--out", str(tmp_path / "o")], capsys)
  assert code == 2 and "config.json" in err and "not valid JSON" in err
  assert not (tmp_path / "o").exists()


def test_truncated_safetensors(tmp_path, capsys):
  src = _hf_folder(tmp_path / "hf")
  f = src / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])  # header intact, tensors cut short
  code, err = _err(convert.main, ["--hf", str(src), "--out", str(tmp_path / "o"),
                                  "--no-progress"], capsys)
  assert code == 2 and "model.safetensors" in err and "download it again" in err
  f.write_bytes(data[:5])  # not even a header
  code, err = _err(convert.main, ["--hf", str(src), "--out", str(tmp_path / "o2"),
                                  "--no-progress"], capsys)
  assert code == 2 and "model.safetensors" in err
  assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_out_refused_before_converting(tiny_ckpt, tmp_path, capsys, monkeypatch):
  """An existing checkpoint, a non-empty folder, a file: refused before any work."""
  from duojax.checkpoint import conversion, gguf_file
  monkeypatch.setattr(gguf_file, "read_gguf", lambda *a, **k: pytest.fail("converted anyway"))
  monkeypatch.setattr(conversion, "read_hf_folder", lambda *a, **k: pytest.fail("converted anyway"))
  (tmp_path / "x.gguf").write_bytes(b"GGUF")
  full = tmp_path / "full"
  full.mkdir()
  (full / "a.txt").write_text("mine")
  (tmp_path / "file").write_text("")
  for out, words in [(tiny_ckpt, ["already holds a checkpoint", "another --out"]),
                     (full, ["not empty"]), (tmp_path / "file", ["is a file"]),
                     (tmp_path / "file" / "sub", ["cannot write"])]:
    for src in (["--gguf", str(tmp_path / "x.gguf")], ["--hf", str(tmp_path)]):
      code, err = _err(convert.main, [*src, "--out", str(out)], capsys)
      assert code == 2, err
      for w in words:
        assert w in err, (w, err)
  assert (full / "a.txt").read_text() == "mine"


def test_out_empty_folder_is_fine(tiny_gguf_pkg, tmp_path):
  root, mod, name = tiny_gguf_pkg
  (tmp_path / "o").mkdir()
  assert convert.main(["--gguf", str(root / mod / name), "--out", str(tmp_path / "o"),
                       "--no-progress"]) == 0
  assert store.read_marker(tmp_path / "o")["source"].startswith("gguf:")


def _copy(tiny_ckpt, tmp_path):
  d = tmp_path / "ck"
  shutil.copytree(tiny_ckpt, d)
  return d


def test_truncated_model_json(tiny_ckpt, tmp_path, capsys):
  d = _copy(tiny_ckpt, tmp_path)
  (d / "model.json").write_text((d / "model.json").read_text()[:40])
  code, err = _err(infer.main, ["--ckpt", str(d), "--prompt", "hi"], capsys)
  assert code == 2 and "model.json" in err and "convert again" in err
  (d / "duojax.json").write_text("{")
  code, err = _err(infer.main, ["--ckpt", str(d), "--prompt", "hi"], capsys)
  assert code == 2 and "duojax.json" in err


def test_damaged_params_one_clear_line(tiny_ckpt, tmp_path):
  """Random bytes in the params files: one error line, exit 2, and none of the late
  "Event loop is closed" tracebacks of orbax's reads in flight (a real process: they are
  printed at exit)."""
  d = _copy(tiny_ckpt, tmp_path)
  rng = np.random.default_rng(0)
  for f in (d / "params").rglob("*"):
    if f.is_file() and "d" in f.parent.name:
      f.write_bytes(rng.integers(0, 256, f.stat().st_size, np.uint8).tobytes())
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "duojax.infer", "--ckpt", str(d), "--prompt", "hi",
                      "--attention", "full"], capture_output=True, text=True, timeout=300, env=env)
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr
  errors = [l for l in r.stderr.splitlines() if "error:" in l]
  assert len(errors) == 1 and "params cannot be read" in errors[0] and "convert again" in errors[0]


def test_unretrieved_read_errors_are_dropped_and_nothing_else():
  """The asyncio filter a failed restore installs drops the never-awaited sibling reads'
  "Task exception was never retrieved" records (a ValueError each), no other record."""
  import logging
  from duojax.checkpoint import store
  def record(msg, exc):
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, (),
                             (type(exc), exc, None) if exc else None)
  assert not store._unretrieved_read_errors(
      record("Task exception was never retrieved\nfuture: <Task ...>", ValueError("DATA_LOSS")))
  assert store._unretrieved_read_errors(
      record("Task exception was never retrieved", RuntimeError("other")))
  assert store._unretrieved_read_errors(record("Unclosed client session", None))
