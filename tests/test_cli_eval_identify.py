"""`duojax.eval` and `duojax.identify`: outputs checked for writability and values for range
before any model loads; razor's defaults fit the model; Ctrl-C in gate training exits promptly."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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
  # no finished step is lost: the step the run stopped at is the newest checkpoint
  last = json.loads(log.read_text().splitlines()[-1])["step"]
  steps = [int(d.name) for d in (out / "checkpoints").iterdir() if d.name.isdigit()]
  assert max(steps) == last, (steps, last)
  assert f"stopped at step {last}" in err


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


# -- train/train_gates.py: the gate-training job -------------------------------------------

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train" / "train_gates.py"


def test_train_gates_job_runs_a_tiny_recipe(tiny_ckpt, tmp_path):
  """The job script on a tiny recipe for 2 steps, as a user runs it: the library's loop
  trains (2 log lines, a checkpoint, a pattern of the model's shape), flags override the
  YAML, and the job records its recipe; --distributed on one host is a no-op."""
  import yaml
  hay = tmp_path / "hay.txt"
  hay.write_text(HAY)
  out = tmp_path / "run"
  recipe = {"ckpt": str(tiny_ckpt), "haystack": str(hay), "out": str(out), "steps": 50,
            "batch_size": 1, "min_len": 300, "max_len": 380, "len_intervals": 1,
            "num_passkeys": 1, "passkey_words": 2, "sink": 4, "recent": 8, "lr": 0.02,
            "reg": 0.05, "seed": 3, "save_every": 1, "pad_multiple": 128, "dtype": "float32",
            "mesh": "data=1"}
  cfg = tmp_path / "tiny.yaml"
  cfg.write_text(yaml.safe_dump(recipe))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  r = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--config", str(cfg), "--steps", "2",
                      "--distributed"], env=env, cwd=tmp_path, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 2
  log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
  assert [x["step"] for x in log] == [1, 2] and all(np.isfinite(x["loss"]) for x in log)
  from duojax.checkpoint import store
  from duojax.pattern import load_any
  config = store.load_config(tiny_ckpt)
  pat = load_any(out / "pattern")
  assert pat.gates.shape == (config.num_layers, config.num_kv_heads)
  assert (pat.sink, pat.recent) == (4, 8) and pat.metadata["steps"] == 2  # the flag won
  assert yaml.safe_load((out / "recipe.yaml").read_text()) == recipe
  (job,) = json.loads((out / "job.json").read_text())["runs"]
  assert job["processes"] == 1 and "--steps 2" in job["command"] and not job["resume"]
  assert any((out / "checkpoints").iterdir())


def test_train_gates_job_on_two_processes_equals_one(tiny_ckpt, tmp_path):
  """Multi-host for real: train/launch_multihost.sh starts 2 local processes (one CPU device
  each, joined by jax.distributed) on a data=2 mesh spanning both. They train, checkpoint
  (orbax, all processes) and write one log and one pattern, and the gates equal a
  single-process run on 2 devices of the same recipe."""
  import socket
  import yaml
  from duojax.pattern import load_any
  hay = tmp_path / "hay.txt"
  hay.write_text(HAY)
  recipe = {"ckpt": str(tiny_ckpt), "haystack": str(hay), "steps": 2, "batch_size": 2,
            "min_len": 300, "max_len": 380, "len_intervals": 1, "num_passkeys": 1,
            "passkey_words": 2, "sink": 4, "recent": 8, "seed": 3, "save_every": 1,
            "pad_multiple": 128, "dtype": "float32", "mesh": "data=2"}
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS"):
    env.pop(k, None)
  with socket.socket() as sock:  # a free port for the coordinator
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  runs = {}
  for name, extra in (("two", {"LOCAL_PROCESSES": "2", "PORT": str(port)}),
                      ("one", {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**recipe, "out": str(tmp_path / name)}))
    cmd = (["bash", str(TRAIN_SCRIPT.parent / "launch_multihost.sh")] if name == "two"
           else [sys.executable, str(TRAIN_SCRIPT)]) + ["--config", str(cfg)]
    r = subprocess.run(cmd, env={**env, **extra}, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs[name] = tmp_path / name
  two, one = runs["two"], runs["one"]
  log = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
  assert [x["step"] for x in log] == [1, 2]  # one writer, not one line per process
  assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
  np.testing.assert_allclose(load_any(two / "pattern").gates, load_any(one / "pattern").gates,
                             rtol=1e-6, atol=1e-7)


def test_train_gates_job_errors_name_the_fix(tmp_path):
  r = subprocess.run([sys.executable, str(TRAIN_SCRIPT)], capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 2 and "--config is required" in r.stderr
  r = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--config", str(tmp_path / "no.yaml")],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "not found" in r.stderr and "configs/" in r.stderr


def test_init_distributed_on_one_host_is_a_no_op(monkeypatch):
  """One process (a flag, or the env), or nothing to join: no jax.distributed call. A
  partial multi-host spec is refused with what is missing."""
  import jax
  from duojax.identify.__main__ import init_distributed
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(a))
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(k, raising=False)
  assert init_distributed(num_processes=1) == 1
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  assert init_distributed("host0:1234") == 1
  assert calls == []
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  with pytest.raises(ValueError, match="--process-id and --coordinator"):
    init_distributed()
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
  init_distributed()  # the env is the whole spec: handed to JAX as is
  assert calls == [("host0:1234", 4, 2)]

  def no_cluster(*a, **k):
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(k)
  assert init_distributed() == 1  # nothing set, no cluster detected: this host alone


def test_eval_mesh_flag_errors_before_loading(tmp_path, no_model, capsys):
  """--mesh on duojax.eval: the product must match the devices, known axes only, no fsdp
  (ppl included); each a clear error before any model is loaded."""
  import jax
  from duojax.eval.__main__ import main
  n = jax.device_count()
  out = ["--out", str(tmp_path / "r.json")]
  code, err = _err(main, ["niah", *out, "--mesh", f"data={n + 1}"], capsys)
  assert code == 2 and f"uses {n + 1} devices but {n} are there" in err, err
  assert "each a divisor of it" in err
  code, err = _err(main, ["passkey", *out, "--mesh", "model=2"], capsys)
  assert code == 2 and "unknown axis 'model'" in err, err
  code, err = _err(main, ["niah", *out, "--mesh", "fsdp=2"], capsys)
  assert code == 2 and "gate training" in err, err
  code, err = _err(main, ["ppl", *out, "--mesh", f"sequence={n + 1}"], capsys)
  assert code == 2 and f"uses {n + 1} devices but {n} are there" in err, err


def test_identify_duo_mesh_flag_errors_name_valid_sizes(tmp_path, no_model, capsys):
  import jax
  from duojax.identify.__main__ import main
  hay = tmp_path / "hay.txt"
  hay.write_text(HAY)
  n = jax.device_count()
  base = ["duo", "--haystack", str(hay), "--out", str(tmp_path / "o")]
  code, err = _err(main, base + ["--mesh", f"data={n},fsdp=2,tensor=3"], capsys)
  assert code == 2 and f"does not divide the {n} available devices" in err, err
  assert "multiply to one of 1" in err
  code, err = _err(main, base + ["--mesh", "data=x"], capsys)
  assert code == 2 and "data='x' is not a size" in err, err
  code, err = _err(main, base + ["--mesh", "pipeline=2"], capsys)
  assert code == 2 and "unknown axis 'pipeline'" in err, err


def test_eval_ppl_kv_and_weights_dtypes(tiny_ckpt, tmp_path, capsys):
  """`ppl --kv-dtype int8/int4` and `--weights-dtype int8` on the tiny checkpoint: each runs
  the same windows and lands near the unquantised perplexity (int8 KV within 1%, int4 KV
  and int8 weights within 5%), without being equal to it (the quantisation was applied),
  and int4 KV lands further away than int8 KV does."""
  from duojax.eval.__main__ import main
  hay = tmp_path / "hay.txt"
  hay.write_text(HAY)
  base = ["ppl", "--ckpt", str(tiny_ckpt), "--haystack", str(hay), "--attention",
          "full,random@0.5", "--sink", "4", "--recent", "16", "--lengths", "96,192",
          "--samples", "2", "--prefill-chunk", "64", "--no-progress"]
  docs = {}
  for name, extra in (("ref", []), ("kv8", ["--kv-dtype", "int8"]),
                      ("kv4", ["--kv-dtype", "int4"]), ("w8", ["--weights-dtype", "int8"])):
    out = tmp_path / f"{name}.json"
    assert main([*base, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
    docs[name] = json.loads(out.read_text())
  capsys.readouterr()
  assert docs["kv8"]["settings"]["kv_dtype"] == "int8"
  assert docs["w8"]["settings"]["weights_dtype"] == "int8"
  assert docs["ref"]["windows"] == docs["kv8"]["windows"] == docs["w8"]["windows"]
  for method in ("full", "random@0.5"):
    ref = docs["ref"]["results"][method]["ppl"]
    dev = {n: abs(docs[n]["results"][method]["ppl"] / ref - 1) for n in ("kv8", "kv4", "w8")}
    assert np.isfinite(ref) and ref > 1
    assert 1e-7 < dev["kv8"] < 0.01, (method, dev)
    assert dev["kv8"] < dev["kv4"] < 0.05, (method, dev)
    assert 1e-7 < dev["w8"] < 0.05, (method, dev)


def test_eval_dtype_flag_errors_before_loading(tmp_path, no_model, capsys):
  from duojax.eval.__main__ import main
  out = ["--out", str(tmp_path / "r.json")]
  code, err = _err(main, ["ppl", *out, "--kv-dtype", "int4", "--attention", "duo+comp"],
                   capsys)
  assert code == 2 and "unquantised caches only" in err, err
  with pytest.raises(SystemExit):
    main(["ppl", *out, "--weights-dtype", "int4"])
  assert "invalid choice" in capsys.readouterr().err


def test_eval_retrieval_int8_weights_per_method(tiny_ckpt, tmp_path, capsys, monkeypatch):
  """`passkey --weights-dtype int8`: every method runs on its own reordered weights
  quantised once (the programs compiled up front against the int8 shapes), and the
  results record the weights' dtype."""
  from duojax.eval.__main__ import main
  from duojax.model import quant
  hay = tmp_path / "hay.txt"
  hay.write_text(HAY)
  calls = []
  real = quant.quantize_params

  def counting(params, dtype="int8"):
    calls.append((dtype, type(params["embed"]).__name__))
    return real(params, dtype)
  monkeypatch.setattr(quant, "quantize_params", counting)
  out = tmp_path / "pk.json"
  assert main(["passkey", "--ckpt", str(tiny_ckpt), "--haystack", str(hay), "--attention",
               "full,random@0.5", "--sink", "4", "--recent", "16", "--lengths", "300",
               "--depths", "0,1", "--no-chat", "--max-new-tokens", "4", "--prefill-chunk",
               "64", "--no-progress", "--weights-dtype", "int8", "--out", str(out)]) == 0
  capsys.readouterr()
  doc = json.loads(out.read_text())
  assert doc["settings"]["weights_dtype"] == "int8" and len(doc["cells"]) == 4
  assert all(c["output"] for c in doc["cells"])
  int8 = [kind for d, kind in calls if d == "int8"]
  # one quantisation of real arrays per method, and the traced one the compiles lowered
  assert int8.count("ArrayImpl") == 2 and len(int8) == 3, calls
