"""infer/bench_prefill.py on CPU with the tiny smoke model (issue 18): a quantised cache's
bytes as counted by hand, and the probe that tells whether the chunk step holds anything
the size of the context besides the cache."""

import json

import pytest

from infer import bench_decode as bd
from infer import bench_prefill as bp

TINY = bd.model_configs(True)["tiny-gqa"]  # 2 layers, 8 heads / 4 KV heads, D 16


def _int4_cache_bytes(ctx: int) -> int:
  """Hand count, full attention: per layer, K and V each hold D/2 bytes of packed codes
  and a float32 scale and zero per token per KV head; plus the int32 lengths."""
  L, hkv, d = TINY.num_layers, TINY.num_kv_heads, TINY.head_dim
  per_tensor = hkv * ctx * (d // 2) + 2 * 4 * hkv * ctx
  return L * 2 * per_tensor + 4


@pytest.fixture(scope="module")
def int4_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bp")
  bp.main(["--out", str(out), "--smoke", "--kv-dtype", "int4", "--configs", "full"])
  return json.loads((out / "bench_prefill.json").read_text()), out


def test_int4_cache_bytes_and_rows(int4_run):
  doc, out = int4_run
  assert (TINY.num_layers, TINY.num_kv_heads, TINY.head_dim) == (2, 4, 16)
  rows = {r["ctx"]: r for r in doc["rows"]}
  assert set(rows) == {256, 512} and doc["meta"]["kv_dtype"] == "int4"
  for ctx, r in rows.items():
    assert r["kv_cache_GB"] * 1e9 == pytest.approx(_int4_cache_bytes(ctx), abs=1)
    assert r["seconds"] > 0 and r["capacity"] == 512
  assert (out / "bench_prefill.md").read_text().count("| full |") == 2


def test_the_probe_sees_the_reference_grow_with_the_cache(int4_run):
  """The XLA reference scores a chunk against the whole cache, so its temporaries at a
  512-token cache exceed those at the 256-token probe (4 chunks of 64): the probe compiles
  at its own capacity, or the two would be equal."""
  doc, _ = int4_run
  r = doc["rows"][0]
  assert r["probe_capacity"] == 256
  assert r["xla_temp_GB"] > r["xla_temp_probe_GB"] > 0


def test_bad_configs_flag(tmp_path):
  with pytest.raises(SystemExit, match="--configs takes full and duo"):
    bp.main(["--out", str(tmp_path), "--smoke", "--configs", "streaming"])


# -- on a mesh (fake CPU devices, in a subprocess) ---------------------------------------------

def test_prefill_on_a_mesh_of_fake_devices(tmp_path):
  """--mesh: the pass runs on sequence=2 (context parallel) and tensor=2 meshes, and the
  peak is per device: below the one-device run's, which holds everything."""
  import subprocess
  import sys
  from pathlib import Path
  from helpers import fake_device_env
  root = Path(__file__).resolve().parents[1]
  env = fake_device_env(2)
  docs = {}
  for spec in ("sequence=2", "tensor=2", None):
    out = tmp_path / str(spec)
    cmd = [sys.executable, "-m", "infer.bench_prefill", "--out", str(out), "--smoke",
           "--configs", "full,duo", "--probe-chunks", "0"] + (["--mesh", spec] if spec else [])
    r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    docs[spec] = json.loads((out / "bench_prefill.json").read_text())
  one = {(r["config"], r["ctx"]): r for r in docs[None]["rows"]}
  for spec in ("sequence=2", "tensor=2"):
    doc = docs[spec]
    assert doc["meta"]["mesh"] == spec and doc["meta"]["device_count"] == 2
    rows = {(r["config"], r["ctx"]): r for r in doc["rows"]}
    assert set(rows) == set(one) == {(c, n) for c in ("full", "duo-0.5") for n in (256, 512)}
    for key, r in rows.items():
      assert r["per_device"] and r["seconds"] > 0
      assert r["kv_cache_GB"] == one[key]["kv_cache_GB"]  # the whole cache, counted once
      # a device holds part of the cache (sequence) or of the weights and cache (tensor)
      assert r["peak_GB"] - r["xla_temp_GB"] < one[key]["peak_GB"] - one[key]["xla_temp_GB"]
  with pytest.raises(SystemExit, match="needs 64 devices"):
    bp.main(["--out", str(tmp_path / "x"), "--smoke", "--mesh", "sequence=64"])
