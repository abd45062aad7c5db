"""infer/bench_train_step.py on CPU: the gate-training step on one device and on meshes of
2 fake devices (sequence, tensor) with the tiny smoke model (issue 17's training figure)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import fake_device_env
from infer import bench_train_step as bt

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_on_one_device_and_two_meshes(tmp_path):
  env = fake_device_env(2)
  cmd = [sys.executable, "-m", "infer.bench_train_step", "--out", str(tmp_path), "--smoke",
         "--steps", "1", "--mesh", "none", "--mesh", "sequence=2", "--mesh", "tensor=2"]
  r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  doc = json.loads((tmp_path / "bench_train_step.json").read_text())
  rows = {x["mesh"]: x for x in doc["rows"]}
  assert set(rows) == {"one device", "sequence=2", "tensor=2"}
  assert [rows[m]["devices"] for m in ("one device", "sequence=2", "tensor=2")] == [1, 2, 2]
  one = rows["one device"]
  for x in rows.values():
    assert x["tokens"] == 256 and x["step_s"] > 0 and len(x["step_s_all"]) == 1
    # the same weights, tokens and step: the same loss however the work is split
    assert x["loss"] == pytest.approx(one["loss"], rel=1e-4)
  # tensor parallel: each device holds part of the frozen weights; sequence: all of them,
  # but half the activations
  assert rows["tensor=2"]["args_GB_per_device"] < one["args_GB_per_device"]
  assert rows["sequence=2"]["xla_temp_GB_per_device"] < one["xla_temp_GB_per_device"]
  assert (tmp_path / "bench_train_step.png").stat().st_size > 0
  assert (tmp_path / "bench_train_step.md").read_text().count("| tensor=2 | 2 |") == 1


def test_bad_flags(tmp_path):
  with pytest.raises(SystemExit, match="--steps and --loss-tokens must be >= 1"):
    bt.main(["--out", str(tmp_path), "--smoke", "--steps", "0"])
  with pytest.raises(SystemExit, match="more than --tokens"):
    bt.main(["--out", str(tmp_path), "--smoke", "--loss-tokens", "300"])
  with pytest.raises(SystemExit, match="needs 64 devices"):
    bt.main(["--out", str(tmp_path), "--smoke", "--mesh", "sequence=64"])
