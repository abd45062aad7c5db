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


def _manual_run(setup, tc, student="deployed"):
  """train_gates' recipe written out: gate_loss's gradient on the *original* weights,
  AdamW, clip to [0, 1]; returns the gates and per-step (loss, distill, reg)."""
  import optax
  from duojax.data.passkey import MultiPasskeyConfig
  from duojax.model import llama
  params, hay = setup
  dc = MultiPasskeyConfig(num_passkeys=tc.num_passkeys, passkey_words=tc.passkey_words,
                          min_len=tc.min_len, max_len=tc.max_len,
                          len_intervals=tc.len_intervals, seed=tc.seed)
  stacked = llama.stack_layers(params)
  opt = duo.make_optimizer(tc)
  gates = jnp.full((CFG.num_layers, CFG.num_kv_heads), tc.init_gate, jnp.float32)
  opt_state, recs = opt.init(gates), []
  vg = jax.jit(jax.value_and_grad(
      lambda g, p, t, l, m: duo.gate_loss(g, p, CFG, t, l, m, sink=tc.sink, recent=tc.recent,
                                          reg=tc.reg, student=student, remat=False),
      has_aux=True))
  for step in range(tc.steps):
    tokens, lengths, mask = duo.make_batch(hay, CharTok(), dc, tc, step)
    (loss, aux), g = vg(gates, stacked, tokens, lengths, mask)
    updates, opt_state = opt.update(g, opt_state, gates)
    gates = jnp.clip(optax.apply_updates(gates, updates), 0.0, 1.0)
    recs.append((float(loss), float(aux["distill"]), float(aux["reg"])))
  return np.asarray(gates), recs


@pytest.mark.parametrize("student", ["deployed", "official"])
def test_training_is_gate_loss_on_frozen_weights(setup, tmp_path, student):
  """Every step of train_gates equals a hand-written step of gate_loss's gradient on the
  original weights: a changed weight, another loss or gradient, or a different student
  moves the gates or the logged values. The optimizer holds state for the gates only."""
  import dataclasses
  tc = dataclasses.replace(TC, steps=3, student=student)
  state = _train(setup, tmp_path, tc)
  log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
  gates, recs = _manual_run(setup, tc, student)
  np.testing.assert_allclose(np.asarray(state.gates), gates, rtol=1e-5, atol=1e-6)
  for rec, (loss, distill, reg) in zip(log, recs):
    assert rec["loss"] == pytest.approx(loss, rel=1e-4)
    assert rec["distill"] == pytest.approx(distill, rel=1e-4, abs=1e-9)
    assert rec["reg"] == pytest.approx(reg, rel=1e-6)
  assert recs[-1][1] > 1e-6  # the distillation term is live, not just the regulariser
  g = np.asarray(state.gates)
  assert (g >= 0).all() and (g <= 1).all() and (g < 1).any()
  shapes = {np.shape(x) for x in jax.tree_util.tree_leaves(state.opt_state)}
  assert shapes <= {(), g.shape}


def test_the_two_students_train_differently(setup, tmp_path):
  """On 2 layers the official student (teacher's full branch) and the deployed one
  (student's own) give different distillation losses and gates after a few steps."""
  import dataclasses
  a = _manual_run(setup, dataclasses.replace(TC, steps=4), "deployed")
  b = _manual_run(setup, dataclasses.replace(TC, steps=4), "official")
  assert abs(a[1][-1][1] - b[1][-1][1]) > 0.01 * a[1][-1][1]
  assert np.abs(a[0] - b[0]).max() > 1e-4


@pytest.mark.parametrize("student", ["deployed", "official"])
def test_all_gates_one_student_equals_teacher(setup, student):
  params, hay = setup
  from duojax.data.passkey import MultiPasskeyConfig
  dc = MultiPasskeyConfig(num_passkeys=1, passkey_words=2, min_len=250, max_len=330,
                          len_intervals=2, seed=0)
  tokens, lengths, mask = duo.make_batch(hay, CharTok(), dc, TC, 0)
  ones = jnp.ones((CFG.num_layers, CFG.num_kv_heads))
  kw = dict(sink=4, recent=8, reg=0.05, student=student)
  loss, aux = duo.gate_loss(ones, params, CFG, tokens, lengths, mask, **kw)
  assert float(aux["distill"]) < 1e-12
  assert float(loss) == pytest.approx(0.05)  # reg * mean|1|
  _, aux = duo.gate_loss(ones * 0.5, params, CFG, tokens, lengths, mask, **kw)
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
    s = duo.train_gates(params, CFG, CharTok(), hay, tc, sys.argv[1], sys.argv[2], progress=False)
    print(json.dumps(np.asarray(s.gates).tolist()))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  outs = []
  for n, spec in ((4, "data=2,fsdp=2"), (1, "data=1")):  # the whole loop, FSDP-sharded weights
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"m{n}"), spec], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    outs.append(np.array(json.loads(r.stdout.strip().splitlines()[-1])))
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


# One gate-training step on a mesh (loss, d loss / d gates, the updated gates) equals one
# device, and the plain gate_loss gradient; 8 fake CPU devices in one subprocess.
_MESH_STEP = textwrap.dedent("""
  import sys, json, dataclasses, warnings, numpy as np, jax, jax.numpy as jnp
  from pathlib import Path
  from jax.sharding import PartitionSpec as P
  from duojax.identify import duo, sequence_parallel as seqp
  from duojax.config import tiny_config
  from duojax.model import init_params, llama
  warnings.simplefilter("ignore")  # replicated fallbacks (vocab 97 over tensor) are expected
  assert len(jax.devices()) == 8
  cfg = tiny_config(num_layers=2, num_heads=6, num_kv_heads=2, max_position_embeddings=512)
  params = init_params(cfg, jax.random.PRNGKey(1), scale=0.3)
  tc = duo.GateTrainConfig(steps=10, batch_size=4, min_len=40, max_len=200, sink=3, recent=7,
                           dtype="float32", lr=0.05, remat=True)
  r = np.random.default_rng(0)
  lengths = np.array([150, 61, 117, 94], np.int32)  # ragged; T = 150 pads to 152 for sequence=4
  t = 150
  tokens = np.where(np.arange(t)[None] < lengths[:, None], r.integers(3, 97, (4, t)), 0)
  mask = (np.arange(t)[None] < lengths[:, None]) & (np.arange(t)[None] >= lengths[:, None] - 25)
  gates0 = r.uniform(0.1, 0.9, (cfg.num_layers, cfg.num_kv_heads)).astype(np.float32)
  calls = []
  orig = seqp._local_rows
  seqp._local_rows = lambda *a, **k: calls.append(1) or orig(*a, **k)

  def one(spec, student):
    c = dataclasses.replace(tc, student=student)
    mesh = duo.make_mesh(spec.removesuffix("+restored"))
    p = params
    if spec.endswith("+restored"):  # read straight into the training shards (the CLI's path)
      from duojax.checkpoint import store
      import tempfile
      ck = store.save_checkpoint(Path(tempfile.mkdtemp()) / "ck", cfg, params)
      target = duo.restore_shardings(cfg, mesh)
      p = store.load_params(ck, shardings=target)
      assert p["layers"][1]["wq"].sharding == target["layers"][1]["wq"]
      assert p["layers"][1]["wq"].sharding.spec == P("fsdp", "tensor", None, None)
    step, _ = duo.build_step(p, cfg, c, mesh)
    gs = duo.gate_state(gates0)  # numpy: placed as fresh arrays (the step donates its inputs)
    g, o = step.place_state(duo.TrainState(gs, step.opt.init(gs), 0))
    g, o, m, gr = step(g, o, tokens, lengths, mask)
    wq = step.frozen["layers"]["attn"]["wq"].sharding.spec
    return dict(loss=float(m["loss"]), distill=float(m["distill"]),
                grad=np.asarray(gr["layers"]["attn"]["gate"]).tolist(),
                gates=np.asarray(g["layers"]["attn"]["gate"]).tolist(), wq=str(wq))

  out = {}
  for student in ("deployed", "official"):
    vg = jax.value_and_grad(lambda g: duo.gate_loss(
        g, llama.stack_layers(params), cfg, jnp.asarray(tokens, jnp.int32),
        jnp.asarray(lengths), jnp.asarray(mask), sink=3, recent=7, reg=tc.reg,
        student=student, remat=False)[0])
    loss, grad = vg(jnp.asarray(gates0))
    out[student] = {"plain": dict(loss=float(loss), grad=np.asarray(grad).tolist())}
  for spec, student in [("data=1", "deployed"), ("fsdp=4", "deployed"),
                        ("fsdp=2,tensor=2", "deployed"), ("fsdp=2,tensor=2+restored", "deployed"),
                        ("data=2,sequence=2", "deployed"),
                        ("data=1", "official"), ("sequence=4,tensor=2", "official")]:
    n = len(calls)
    out[student][spec] = one(spec, student)
    out[student][spec]["sequence_sharded"] = len(calls) > n
  print(json.dumps(out))
""")


def test_one_step_on_meshes_equals_one_device(tmp_path):
  """fsdp=4, tensor=2 x fsdp=2, data=2 x sequence=2 (deployed student) and sequence=4 x
  tensor=2 (official student), batch 4 of ragged lengths, T not a multiple of sequence=4."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _MESH_STEP], env=env, capture_output=True,
                     text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  for student, runs in out.items():
    plain, one = runs.pop("plain"), runs.pop("data=1")
    # the one-device step is gate_loss's value and gradient (an independent path)
    assert one["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    np.testing.assert_allclose(one["grad"], plain["grad"], rtol=1e-4, atol=1e-6)
    assert one["distill"] > 1e-4 and np.abs(one["grad"]).max() > 1e-3  # a live gradient
    assert not one["sequence_sharded"]
    for spec, got in runs.items():
      assert got["loss"] == pytest.approx(one["loss"], rel=1e-5), spec
      assert got["distill"] == pytest.approx(one["distill"], rel=1e-5), spec
      np.testing.assert_allclose(got["grad"], one["grad"], rtol=1e-5, atol=1e-6, err_msg=spec)
      np.testing.assert_allclose(got["gates"], one["gates"], atol=1e-6, err_msg=spec)
      assert got["sequence_sharded"] == ("sequence" in spec), spec
      # frozen wq [L, E, Hkv, G, D]: embed over fsdp, KV heads over tensor
      assert ("'fsdp'" in got["wq"]) == ("fsdp" in spec), (spec, got["wq"])
      if spec.endswith("+restored"):
        assert got == runs[spec.removesuffix("+restored")]  # bit for bit the same step
      assert ("'tensor'" in got["wq"]) == ("tensor" in spec), (spec, got["wq"])


def test_training_mesh_specs_and_errors():
  m = duo.make_mesh(1)
  assert dict(m.shape) == {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1}
  n = len(jax.devices())
  with pytest.raises(duo.TrainError, match=f"does not divide the {n} available devices.*"
                                           f"multiply to one of 1"):
    duo.make_mesh(f"data={n},tensor=2")
  with pytest.raises(duo.TrainError, match="unknown axis 'model'"):
    duo.make_mesh("model=2")
  with pytest.raises(duo.TrainError, match="not AXIS=SIZE"):
    duo.make_mesh("data")
  with pytest.raises(duo.TrainError, match="--backend xla"):
    duo.check_backend("tpu", jax.sharding.Mesh(np.array(jax.devices() * 2)[:2], ("data",)))


def test_bad_input(setup, tmp_path):
  params, hay = setup
  with pytest.raises(duo.TrainError, match="greater than"):
    duo.GateTrainConfig(min_len=500, max_len=100)
  with pytest.raises(duo.TrainError, match="--student must be one of"):
    duo.GateTrainConfig(student="teacher")
  for g in (0.0, 1.5):
    with pytest.raises(duo.TrainError, match="--init-gate must be in"):
      duo.GateTrainConfig(init_gate=g)
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
             str(out), "--set-default", "--student", "official"])
  assert rc == 0
  assert (out / "gates.png").stat().st_size > 1000
  pat = load_any(out / "pattern")
  assert pat.shape == (2, 2) and pat.metadata["method"] == "duo"
  assert pat.metadata["train_settings"]["student"] == "official"
  assert (out / "pattern" / "full_attention_heads.tsv").is_file()
  assert store.default_pattern_dir(ck) is not None
  rc = main(["duo", "--ckpt", str(ck), "--haystack", str(hay), "--out", str(tmp_path / "o2"),
             "--min-len", "400", "--max-len", "300"])
  assert rc == 2


