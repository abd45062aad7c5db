"""infer/capacity_plan.py: per-device bytes from compiled executables equal a hand count.

The plan runs in a subprocess (it asks for 4 fake CPU devices before jax starts) on two
tiny shapes: GQA (4 KV heads, 8 query heads) compiled at full depth, and MHA compiled as
one layer. The oracle below counts every weight and cache array's bytes from the shapes
and divides by the mesh axes that split it, written out from the rules as agreed (tensor
splits whole KV heads; tensor and then sequence split the MLP width and the vocabulary,
each where it divides them; sequence splits the retrieval heads' slots, and tensor too
where it does not divide their head count but does divide the slots; data splits the
batch when it divides it), not read from duojax/sharding.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from infer import capacity_plan as cp  # noqa: E402  (no jax at import)

SINK, RECENT = 2, 6
# (layers, kv_heads, heads, head_dim, hidden, mlp, vocab)
GQA = (2, 4, 8, 8, 16, 24, 41)  # vocab 41: no tensor size divides it (replicated)
MHA = (3, 4, 4, 8, 16, 18, 40)  # mlp 18: tensor=2 splits it, tensor=4 would not
RUNS = {
    # name: (shape, batch, context, meshes, sparsities, compiled depth); batch 3 does not
    # divide data=2 (replicated), batch 2 does; duo 0.5 keeps 2 of 4 heads (tensor=4 does
    # not divide them), duo 0.75 keeps 1; tensor=3 does not divide the 4 KV heads
    "gqa": (GQA, 2, "64", "tensor=4;data=2,sequence=2;tensor=3", "0,0.5,0.75", "all"),
    "mha": (MHA, 3, "96", "data=2,tensor=2", "0,0.75", "1"),
}


def _shape_arg(shape):
  return ",".join(f"{k}={v}" for k, v in zip(cp.SHAPE_KEYS, shape))


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
  """Runs both plans in one child process (4 fake devices); returns {name: plan.json}."""
  out = tmp_path_factory.mktemp("plan")
  calls = []
  for name, (shape, batch, ctx, meshes, sps, layers) in RUNS.items():
    argv = ["--shape", _shape_arg(shape), "--batch", str(batch), "--contexts", ctx,
            "--meshes", meshes, "--sparsities", sps, "--sink", str(SINK), "--recent",
            str(RECENT), "--compile-layers", layers, "--devices", "4", "--out", str(out / name)]
    calls.append(f"assert capacity_plan.main({argv!r}) == 0")
  code = "from infer import capacity_plan\n" + "\n".join(calls)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
  return {name: (out / name, json.loads((out / name / "plan.json").read_text()))
          for name in RUNS}


# -- the oracle ----------------------------------------------------------------------------

def _mesh(spec):
  sizes = {"data": 1, "sequence": 1, "tensor": 1}
  for part in spec.split(","):
    k, v = part.split("=")
    sizes[k] = int(v)
  return sizes


def _split(dim, n):
  """How many ways a mesh axis of size n splits a dimension: n if it divides it, else 1."""
  return n if dim % n == 0 else 1


def _ways(dim, *ns):
  """How many ways mesh axes of sizes ns split a dimension, each taken (in order) only
  where the product so far times it divides the dimension."""
  k = 1
  for n in ns:
    if dim % (k * n) == 0:
      k *= n
  return k


def oracle_weights(shape, mesh, layers=None):
  """(per device, unsharded) bf16 bytes of every weight."""
  n_layers, hkv, hq, d, e, f, v = shape
  n_layers = layers or n_layers
  t, s = mesh["tensor"], mesh["sequence"]
  assert hkv % t == 0
  item, g = 2, hq // hkv
  attn = e * hkv * g * d * 2 + e * hkv * d * 2  # wq, wo; wk, wv
  mlp = 3 * e * f
  dev = (2 * v * e / _ways(v, t, s) + e
         + n_layers * (2 * e + attn / t + mlp / _ways(f, t, s)))
  total = 2 * v * e + e + n_layers * (2 * e + attn + mlp)
  return int(dev * item), total * item


def oracle_cache(shape, mesh, batch, ctx, n_r, layers=None):
  """(per device, unsharded) bytes of the KV cache: retrieval k, v [B, ctx, n_r, D],
  streaming k, v [B, sink + recent, Hkv - n_r, D], lengths [B] int32."""
  n_layers, hkv, _, d, _, _, _ = shape
  n_layers = layers or n_layers
  t, s, dd = mesh["tensor"], mesh["sequence"], _split(batch, mesh["data"])
  dev = tot = 0
  for _ in range(n_layers):
    if n_r:
      full = 2 * batch * ctx * n_r * d * 2
      tot += full
      # heads over tensor where it divides them, else the slots over sequence x tensor
      dev += full / (dd * (s * t if n_r % t == 0 or ctx % (s * t) == 0 else s))
    if n_r < hkv:
      stream = 2 * batch * (SINK + RECENT) * (hkv - n_r) * d * 2
      tot += stream
      dev += stream / (dd * _split(hkv - n_r, t))  # replicated over sequence
  return int(dev + batch * 4 / dd), tot + batch * 4


def _n_retrieval(hkv, sparsity):
  return hkv - int(round(sparsity * hkv))


def _rows(plan):
  return [r for r in plan["rows"] if "error" not in r]


# -- tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(RUNS))
def test_weights_and_cache_per_device_match_the_hand_count(plans, name):
  shape, batch, ctx, meshes, sps, _ = RUNS[name]
  rows = _rows(plans[name][1])
  want = {(m, float(s)) for m in meshes.split(";") if m != "tensor=3" for s in sps.split(",")}
  assert {(r["mesh"], float(r["attention"].split()[-1]) if r["attention"] != "full" else 0.0)
          for r in rows} == want
  for r in rows:
    mesh, n_r = _mesh(r["mesh"]), r["retrieval_heads_per_layer"]
    sp = 0.0 if r["attention"] == "full" else float(r["attention"].split()[1])
    assert n_r == _n_retrieval(shape[1], sp)
    w_dev, w_tot = oracle_weights(shape, mesh)
    c_dev, c_tot = oracle_cache(shape, mesh, batch, int(ctx), n_r)
    what = f"{name} {r['mesh']} {r['attention']}"
    assert r["weights_per_device"] == w_dev, what
    assert r["weights_total"] == w_tot, what
    assert r["cache_per_device"] == c_dev, what
    assert r["cache_total"] == c_tot, what
    # the unsharded cache is what the library's own byte count says
    from duojax import cache as kvc
    cfg = cp.model_config("custom", shape)
    assert c_tot == kvc.kv_cache_bytes(cfg, cp.duo_mask(cfg, sp, SINK, RECENT), int(ctx), batch,
                                       jnp.bfloat16), what
    assert r["total_per_device"] == (r["weights_per_device"] + r["cache_per_device"]
                                     + r["temp_per_device"] + r["other_per_device"])
    assert r["temp_per_device"] > 0
    assert r["verdict"] == "v5e, v5p, H200"  # a tiny model fits everywhere


@pytest.mark.parametrize("name", list(RUNS))
def test_compiled_argument_bytes_are_what_the_rules_place(plans, name):
  """memory_analysis of the executable: its arguments are exactly the weights + cache
  (+ last hidden state [B, E] bf16 and the PRNG key) counted by hand, for the compiled
  depth; the donated cache comes back aliased."""
  shape, batch, ctx, *_ , layers = RUNS[name]
  for r in _rows(plans[name][1]):
    mesh, c = _mesh(r["mesh"]), r["compiled"]
    depth = shape[0] if layers == "all" else int(layers)
    assert c["layers"] == depth
    w, _ = oracle_weights(shape, mesh, depth)
    kv, _ = oracle_cache(shape, mesh, batch, int(ctx), r["retrieval_heads_per_layer"], depth)
    hidden = batch * shape[4] * 2 // _split(batch, mesh["data"])
    what = f"{name} {r['mesh']} {r['attention']}"
    assert c["argument_bytes"] == w + kv + hidden + 8, what
    assert c["alias_bytes"] == kv, what
    assert c["args_check_bytes"] == 0, what


def test_uneven_retrieval_parts_split_their_slots(plans):
  """A duo layer whose 2 retrieval heads do not divide tensor=4 splits their slots over
  tensor instead of replicating them: half of full attention's per-device retrieval cache
  (2 of 4 heads, a quarter of the slots each); only the streaming part (2 heads) is noted
  as replicated."""
  rows = _rows(plans["gqa"][1])
  r = next(r for r in rows if r["mesh"] == "tensor=4" and r["attention"] == "duo 0.5")
  full = next(r for r in rows if r["mesh"] == "tensor=4" and r["attention"] == "full")
  batch, ctx, d = RUNS["gqa"][1], int(RUNS["gqa"][2]), GQA[3]
  retrieval = 2 * batch * ctx * 2 * d * 2 // 4
  stream = 2 * batch * (SINK + RECENT) * 2 * d * 2  # replicated over tensor
  assert r["cache_per_device_layer"] == retrieval + stream
  assert full["cache_per_device_layer"] == 2 * batch * ctx * 4 * d * 2 // 4
  assert not any("retrieval part" in n for n in r["notes"]), r["notes"]
  assert any("streaming part" in n and "replicated over tensor" in n for n in r["notes"])


def test_a_mesh_that_cannot_hold_the_model_is_an_error_row(plans):
  errs = [r for r in plans["gqa"][1]["rows"] if "error" in r]
  assert len(errs) == 3 and all(r["mesh"] == "tensor=3" for r in errs)
  assert "tensor sizes that work for this model: 1, 2, 4" in errs[0]["error"]


@pytest.mark.parametrize("name", list(RUNS))
def test_outputs_are_written(plans, name):
  out, plan = plans[name]
  for f in ("plan.json", "table.md", "README-snippet.md", "plan.png"):
    assert (out / f).stat().st_size > 0, f
  table = (out / "table.md").read_text()
  rows = _rows(plan)
  summary_rows = {(r["attention"], r["context"]) for r in rows}  # best mesh per device count
  assert table.count("| custom |") == len(plan["rows"]) + len(summary_rows)  # + error rows
  assert "--compile-layers" in (out / "README-snippet.md").read_text()
  assert plan["meta"]["backend"] == "cpu"


def test_verdict_thresholds():
  assert cp.fits(int(14.4e9)) == ["v5e", "v5p", "H200"]
  assert cp.fits(int(14.41e9)) == ["v5p", "H200"]
  assert cp.fits(int(85.5e9)) == ["v5p", "H200"]
  assert cp.fits(int(126.9e9)) == ["H200"]
  assert cp.fits(int(127e9)) == []
  assert cp.verdict(int(200e9)).startswith("none")
