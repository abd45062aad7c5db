"""Context-parallel attention (retrieval heads' cache split over `sequence`) equals one device.

Runs on 8 fake CPU devices: in a plain pytest process `test_on_8_fake_cpu_devices`
reruns this file in a subprocess with them (see test_sharding.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from duojax import cache as kvc
from duojax import sharding as sh
from duojax import context_parallel as cp
from duojax.attention import dispatch, reference
from duojax.pattern import HeadMask
from duojax.config import ModelConfig
from test_sharding import N_FAKE, need_devices, run_on_fake_devices


def test_on_8_fake_cpu_devices():
  if jax.device_count() >= N_FAKE:
    pytest.skip("this process has the devices: the tests ran here directly")
  run_on_fake_devices(__file__)


def _case(seed, b, s, h, g, d, t, start, n_valid, dtype=jnp.float32):
  """Random q over a random (already written) cache; slots past kv_len hold garbage that
  must stay invisible."""
  r = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(r.standard_normal(shape), dtype)
  start, n_valid = jnp.asarray(start, jnp.int32), jnp.asarray(n_valid, jnp.int32)
  q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  return f(b, t, h, g, d), f(b, s, h, d), f(b, s, h, d), q_pos, start + n_valid


_ref = jax.jit(reference.full_chunk_attention)


@functools.lru_cache(maxsize=None)
def _jitted(mesh):
  return jax.jit(functools.partial(cp.chunk_attention, mesh=mesh))


# (mesh, B, S, H, G, D, T, start, n_valid). sequence=8 x S=40: device i owns [5i, 5i+5);
# row 0 ends at 17, inside device 3's slice; a row of length 1; a row whose chunk
# straddles several slices; padding queries past n_valid.
CASES = {
    "seq8_gqa_chunk": ("sequence=8", 3, 40, 2, 3, 6, 7, [10, 0, 30], [7, 1, 4]),
    "seq8_gqa_decode": ("sequence=8", 3, 40, 2, 3, 6, 1, [16, 0, 39], [1, 1, 1]),
    "data2_seq4_mha_chunk": ("data=2,sequence=4", 4, 36, 3, 1, 5, 5, [0, 20, 3, 31], [1, 5, 2, 5]),
    "data2_seq4_mha_decode": ("data=2,sequence=4", 4, 36, 3, 1, 5, 1, [0, 8, 19, 35], [1, 1, 0, 1]),
    "tensor2_seq4_gqa_chunk": ("sequence=4,tensor=2", 2, 24, 4, 2, 8, 3, [5, 13], [3, 2]),
    # heads tensor does not divide (3 of tensor=4, 1 of tensor=4): the slots split over
    # sequence x tensor (8 slices of 4; device (s, t) holds slice 4s + t) or tensor alone
    "seq2_tensor4_h3_chunk": ("sequence=2,tensor=4", 2, 32, 3, 2, 6, 5, [5, 20], [5, 3]),
    "seq2_tensor4_h3_decode": ("sequence=2,tensor=4", 3, 32, 3, 2, 6, 1, [0, 13, 31],
                               [1, 1, 1]),
    "data2_tensor4_h1_decode": ("data=2,tensor=4", 4, 16, 1, 4, 8, 1, [0, 7, 12, 15],
                                [1, 1, 0, 1]),
}
# how each case's cache is split (the rules' SPILL where the heads do not divide tensor)
CASE_CACHE_SPECS = {"seq2_tensor4_h3_chunk": P(None, ("sequence", "tensor"), None, None),
                    "seq2_tensor4_h3_decode": P(None, ("sequence", "tensor"), None, None),
                    "data2_tensor4_h1_decode": P("data", "tensor", None, None),
                    "tensor2_seq4_gqa_chunk": P(None, "sequence", "tensor", None)}


@pytest.mark.parametrize("name", list(CASES))
def test_equals_single_device_reference_fp32(name):
  need_devices()
  spec, b, s, h, g, d, t, start, n_valid = CASES[name]
  mesh = sh.make_mesh(spec)
  q, k, v, q_pos, kv_len = _case(len(name), b, s, h, g, d, t, start, n_valid)
  out = _jitted(mesh)(q, k, v, q_pos, kv_len)
  want = _ref(q, k, v, q_pos, kv_len)
  assert out.shape == want.shape == (b, t, h, g, d)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out), _oracle(q, k, v, q_pos, kv_len), atol=1e-5,
                             rtol=1e-5)
  assert float(jnp.abs(want).max()) > 0.1  # the comparison is not of zeros
  if name in CASE_CACHE_SPECS:
    assert sh.spec_for(sh.CACHE_AXES, k.shape, mesh, notes=[]) == CASE_CACHE_SPECS[name]


def test_equals_reference_bf16():
  need_devices()
  mesh = sh.make_mesh("data=2,sequence=4")
  q, k, v, q_pos, kv_len = _case(5, 2, 32, 2, 2, 16, 4, [9, 0], [4, 3], jnp.bfloat16)
  out = _jitted(mesh)(q, k, v, q_pos, kv_len)
  want = _ref(q, k, v, q_pos, kv_len)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                             atol=2e-2, rtol=2e-2)


def _oracle(q, k, v, q_pos, kv_len):
  """float64 numpy softmax attention, written without the code under test."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, g, d = q.shape
  out = np.zeros(q.shape)
  for bi in range(b):
    for ti in range(t):
      n = min(int(q_pos[bi, ti]) + 1, int(kv_len[bi]))
      if n <= 0:
        continue
      logits = np.einsum("hgd,shd->hgs", q[bi, ti], k[bi, :n]) / np.sqrt(d)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      out[bi, ti] = np.einsum("hgs,shd->hgd", w / w.sum(-1, keepdims=True), v[bi, :n])
  return out


def _near_minus_300_inputs():
  """Row 0: keys only in the first of 8 slices (length 3 of 64) and every logit near -300;
  row 1 sees nothing. Returns numpy (q, k, v, q_pos, kv_len)."""
  r = np.random.default_rng(3)
  b, s, h, g, d = 2, 64, 1, 2, 4
  u = np.ones(d) / np.sqrt(d)
  k = u + 0.05 * r.standard_normal((b, s, h, d))
  q = -300 * np.sqrt(d) * u + 0.5 * r.standard_normal((b, 1, h, g, d))
  v = r.standard_normal((b, s, h, d))
  return q, k, v, np.array([[40], [0]], np.int32), np.array([3, 0], np.int32)


def test_merge_exact_when_devices_hold_no_keys():
  """Row 0 has keys only on device 0 and every logit near -300: the empty devices' max
  must not stand in for a real one (exp(-300) is 0 in fp32). Row 1 sees nothing."""
  need_devices()
  mesh = sh.make_mesh("sequence=8")
  q, k, v, q_pos, kv_len = _near_minus_300_inputs()
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
  args += [jnp.asarray(q_pos), jnp.asarray(kv_len)]
  out = np.asarray(_jitted(mesh)(*args))
  want = _oracle(q, k, v, q_pos, kv_len)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  assert np.abs(want[0]).max() > 0.1 and np.all(out[1] == 0)

  # The same partials merged with 0 as the empty slices' max lose the row: the test
  # input tells an exact merge from the usual single-device shortcut.
  slices = jax.jit(lambda q, k, v, q_pos, kv_len: [cp.partial_chunk_attention(
      q, k[:, i * 8:(i + 1) * 8], v[:, i * 8:(i + 1) * 8], q_pos - 8 * i,
      jnp.clip(kv_len - 8 * i, 0, 8)) for i in range(8)])
  parts = slices(*args)
  # in fp32, as a device computes it
  m, l, acc = (np.stack([np.asarray(getattr(p, f), np.float32) for p in parts])
                for f in ("m", "l", "acc"))
  assert np.all(np.isneginf(m[1:, 0]))
  m0 = np.where(np.isfinite(m), m, 0.0)
  w = np.exp(m0 - m0.max(0))
  denom = (l * w).sum(0)
  naive = (acc * w[..., None]).sum(0) / np.where(denom == 0, 1, denom)[..., None]
  assert np.abs(naive[0] - want[0]).max() > 0.1
  # and the exact local merge agrees with the cross-device one
  local = np.asarray(cp.finalize(cp.merge_partials(parts), jnp.float32))
  np.testing.assert_allclose(local, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec, h, slots", [
    ("data=2,sequence=4", 2, "sequence"),
    # 3 heads tensor=4 does not divide: the slots split over both axes, 8 slices of 4
    ("sequence=2,tensor=4", 3, ("sequence", "tensor"))])
def test_write_full_each_device_writes_its_positions(spec, h, slots):
  need_devices()
  mesh = sh.make_mesh(spec)
  b, s, d, t = 4, 32, 3, 6
  r = np.random.default_rng(7)
  c = kvc.FullLayerCache(jnp.asarray(r.standard_normal((b, s, h, d)), jnp.float32),
                         jnp.asarray(r.standard_normal((b, s, h, d)), jnp.float32))
  k = jnp.asarray(r.standard_normal((b, t, h, d)), jnp.float32)
  v = jnp.asarray(r.standard_normal((b, t, h, d)), jnp.float32)
  # straddling slices 0|1; padding past n_valid; nothing; past capacity (dropped)
  start, n_valid = jnp.array([5, 14, 0, 29]), jnp.array([6, 3, 0, 6])
  c = jax.device_put(c, sh.cache_shardings(c, mesh))
  got = jax.jit(lambda *a: cp.write_full(*a, mesh=mesh))(c, k, v, start, n_valid)
  want = kvc.write_full(c, k, v, start, n_valid)
  np.testing.assert_array_equal(np.asarray(got.k), np.asarray(want.k))
  np.testing.assert_array_equal(np.asarray(got.v), np.asarray(want.v))
  assert got.k.sharding.spec[1] == slots
  np.testing.assert_array_equal(np.asarray(got.k[0, 5:11]), np.asarray(k[0]))  # not a no-op
  # each device's shard is the slice of the slots the layout says: (s, t) -> 4s + t
  n_slices = int(np.prod([mesh.shape[a] for a in np.atleast_1d(slots)]))
  coords = {dev: idx for idx, dev in np.ndenumerate(mesh.devices)}
  for shard in got.k.addressable_shards:
    i, (_, _, si, ti) = shard.index[1], coords[shard.device]
    lin = si * mesh.shape["tensor"] + ti if slots != "sequence" else si
    assert (i.start, i.stop) == (lin * s // n_slices, (lin + 1) * s // n_slices)
    assert shard.data.shape[1:] == (s // n_slices, h, d)


def test_pluggable_op_sees_only_its_slice():
  need_devices()
  mesh = sh.make_mesh("sequence=8")
  seen = []

  def op(q, k, v, q_pos, kv_len):
    seen.append(k.shape)
    return cp.partial_chunk_attention(q, k, v, q_pos, kv_len)
  q, k, v, q_pos, kv_len = _case(1, 1, 40, 2, 2, 4, 3, [20], [3])
  # tracing is enough to see what each device's op is handed (no compile)
  jax.eval_shape(lambda *a: cp.chunk_attention(*a, mesh=mesh, partial_op=op), q, k, v, q_pos,
                 kv_len)
  assert seen and all(shape[1] == 5 for shape in seen)
  # an op's result is what comes out: a constant partial gives its values back
  const = lambda q, k, v, q_pos, kv_len: cp.Partial(
      jnp.zeros(q.shape[:-1]), jnp.ones(q.shape[:-1]), jnp.full(q.shape, 2.0))
  out = jax.jit(lambda *a: cp.chunk_attention(*a, mesh=mesh, partial_op=const))(
      q, k, v, q_pos, kv_len)
  np.testing.assert_allclose(np.asarray(out), 2.0)  # (8 * 2) / (8 * 1)


def test_capacity_not_multiple_of_sequence_is_a_clear_error():
  need_devices()
  mesh = sh.make_mesh("sequence=8")
  q, k, v, q_pos, kv_len = _case(0, 1, 36, 1, 1, 4, 1, [3], [1])
  with pytest.raises(sh.ShardingError, match="36 is not a multiple of sequence=8; allocate 40"):
    cp.chunk_attention(q, k, v, q_pos, kv_len, mesh=mesh)


@pytest.mark.parametrize("spec", ["data=2,sequence=4", "sequence=2,tensor=4"])
def test_duo_layer_prefill_and_decode_equal_dispatch(spec):
  """A DuoAttention layer (1 retrieval + 2 streaming heads), prefill in two ragged chunks
  then two decode steps: outputs and caches equal the single-device dispatcher's; on
  tensor=4 the one retrieval head's slots split over sequence x tensor."""
  need_devices()
  mesh = sh.make_mesh(spec)
  cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=6,
                    num_kv_heads=3, head_dim=4)
  mask = HeadMask.from_array(np.array([[1, 0, 0]]), sink=2, recent=4)
  b, s, g, d = 2, 32, 2, 4
  ref_c = kvc.init_cache(cfg, b, s, mask, jnp.float32).layers[0]
  cp_c = jax.device_put(ref_c, sh.cache_shardings(ref_c, mesh))
  r = np.random.default_rng(11)
  step_cp = jax.jit(lambda c, *a: cp.attend(c, *a, mesh=mesh))
  step_ref = jax.jit(lambda c, *a: dispatch.attend(c, *a, backend="xla"))
  lengths = np.zeros(b, np.int32)
  for t, n_valid in [(9, [9, 4]), (9, [5, 9]), (1, [1, 1]), (1, [1, 0])]:
    q = jnp.asarray(r.standard_normal((b, t, 3, g, d)), jnp.float32)
    k = jnp.asarray(r.standard_normal((b, t, 3, d)), jnp.float32)
    v = jnp.asarray(r.standard_normal((b, t, 3, d)), jnp.float32)
    start, nv = jnp.asarray(lengths), jnp.asarray(n_valid, jnp.int32)
    out_cp, cp_c = step_cp(cp_c, q, k, v, start, nv)
    out_ref, ref_c = step_ref(ref_c, q, k, v, start, nv)
    valid = np.arange(t)[None, :] < np.asarray(n_valid)[:, None]  # padding queries aside
    np.testing.assert_allclose(np.asarray(out_cp)[valid], np.asarray(out_ref)[valid],
                               atol=1e-5, rtol=1e-5)
    lengths = lengths + np.asarray(n_valid)
  for a, e in zip(jax.tree_util.tree_leaves(cp_c), jax.tree_util.tree_leaves(ref_c)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-6)
  assert cp_c.full.k.sharding.spec[1] == ("sequence" if "data" in spec
                                          else ("sequence", "tensor"))


def test_capacity_plan_row_matches_cache_shapes():
  """infer/capacity_plan.py's compiled per-device bytes equal the sharded cache's slices."""
  need_devices()
  import sys
  from pathlib import Path
  root = str(Path(__file__).resolve().parents[1])
  if root not in sys.path:
    sys.path.insert(0, root)
  from infer import capacity_plan
  r = capacity_plan.plan_row("llama3-8b", 8192, "sequence=4", 0.5, 1, 64, 256)
  item, d = 2, 128
  retrieval = 2 * 8192 * 4 * d * item // 4  # k and v, 4 of 8 heads, a quarter of the slots
  stream = 2 * (64 + 256) * 4 * d * item  # replicated over sequence
  assert r["cache_per_device_layer"] == retrieval + stream
  c = r["compiled"]  # a one-layer model: weights, that layer's cache + lengths, hidden, key
  assert c["cache_per_device"] == retrieval + stream + 4
  assert c["argument_bytes"] - c["weights_per_device"] - c["cache_per_device"] == 4096 * 2 + 8
  assert c["alias_bytes"] == c["cache_per_device"]  # the cache is updated in place


# -- the kernels per device under shard_map ---------------------------------------------------

@pytest.fixture
def fast_interpret_compiles():
  """Interpret-mode kernels are big XLA loops: compile them without heavy optimisation on
  CPU (as tests/test_kernels_tpu.py does; same arithmetic). Restored afterwards."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


@functools.lru_cache(maxsize=None)
def _jitted_kernel(mesh):
  op = cp.kernel_partial_op("tpu", interpret=True)
  return jax.jit(functools.partial(cp.chunk_attention, mesh=mesh, partial_op=op))


# (mesh, B, S, H, G, D, T, start, n_valid, dtype). Every case has a row shorter than one
# device's slice (so the other devices hold none of its keys) and odd head dims.
KERNEL_CASES = {
    # S=40 on 8 devices: slices of 5; row 1 has 1 key; row 0's chunk straddles slices 2-3
    "seq8_gqa_chunk_fp32": ("sequence=8", 3, 40, 2, 3, 5, 7, [10, 0, 30], [7, 1, 4],
                            jnp.float32),
    "seq8_mha_decode_fp32": ("sequence=8", 3, 48, 3, 1, 7, 1, [16, 0, 47], [1, 1, 1],
                             jnp.float32),
    # heads split over tensor too; bf16
    "tensor2_seq4_gqa_chunk_bf16": ("sequence=4,tensor=2", 2, 24, 4, 2, 6, 3, [5, 1], [3, 2],
                                    jnp.bfloat16),
    "tensor2_seq4_mha_decode_bf16": ("sequence=4,tensor=2", 3, 24, 2, 1, 9, 1, [2, 13, 23],
                                     [1, 1, 1], jnp.bfloat16),
    # rows over data; a padding row (n_valid 0) in the decode
    "data2_seq4_gqa_decode_fp32": ("data=2,sequence=4", 4, 36, 1, 3, 5, 1, [0, 8, 19, 35],
                                   [1, 1, 0, 1], jnp.float32),
    # 3 heads tensor=4 does not divide: slots over sequence x tensor, merged over both
    "seq2_tensor4_h3_decode_fp32": ("sequence=2,tensor=4", 2, 32, 3, 2, 5, 1, [3, 30],
                                    [1, 1], jnp.float32),
}


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_tpu_kernels_under_shard_map_equal_reference(name, fast_interpret_compiles):
  """The Pallas TPU kernels (interpret mode) as the per-device op: full_chunk_partial for a
  chunk, full_decode_partial for one token, merged over `sequence`."""
  need_devices()
  spec, b, s, h, g, d, t, start, n_valid, dtype = KERNEL_CASES[name]
  mesh = sh.make_mesh(spec)
  q, k, v, q_pos, kv_len = _case(len(name), b, s, h, g, d, t, start, n_valid, dtype)
  out = _jitted_kernel(mesh)(q, k, v, q_pos, kv_len)
  up = lambda x: x.astype(jnp.float32)
  want = np.asarray(_ref(up(q), up(k), up(v), q_pos, kv_len))  # fp32 softmax of the inputs
  assert out.shape == want.shape == (b, t, h, g, d) and out.dtype == dtype
  out = np.asarray(out, np.float32)
  assert np.isfinite(out).all()
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  err = np.abs(out - want).max() / np.abs(want).max()
  assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"
  assert np.abs(want).max() > 0.1


def test_kernel_partials_of_empty_slices_are_neg_inf(fast_interpret_compiles):
  """Inside shard_map, each device's kernel partial for a row whose keys all lie on device
  0 (length 3 of slices of 8) is m = -inf, l = 0, acc = 0 on the others, and the merged
  output equals the float64 oracle even with logits near -300 (a finite stand-in for the
  empty slices' max would underflow the real terms)."""
  need_devices()
  mesh = sh.make_mesh("sequence=8")
  q, k, v, q_pos, kv_len = _near_minus_300_inputs()
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)] + [jnp.asarray(q_pos),
                                                              jnp.asarray(kv_len)]
  op = cp.kernel_partial_op("tpu-interpret")
  qs = P(None, None, None, None, None)
  cs = P(None, "sequence", None, None)

  def local(q, k, v, q_pos, kv_len):  # what _attend_local hands the op, kept unmerged
    off = jax.lax.axis_index("sequence") * k.shape[1]
    p = op(q, k, v, q_pos - off, jnp.clip(kv_len - off, 0, k.shape[1]))
    return p.m[None], p.l[None], p.acc[None]
  stat = P("sequence")
  m, l, acc = jax.jit(cp._shard_map(local, mesh, (qs, cs, cs, P(), P()), (stat, stat, stat)))(
      *args)
  m, l, acc = np.asarray(m), np.asarray(l), np.asarray(acc)  # [8, B, 1, H, G, ...]
  assert np.isfinite(m[0, 0]).all() and np.isneginf(m[1:, 0]).all() and np.isneginf(m[:, 1]).all()
  assert not l[1:, 0].any() and not acc[1:, 0].any() and not np.isnan(acc).any()
  out = np.asarray(_jitted_kernel(mesh)(*args))
  want = _oracle(q, k, v, q_pos, kv_len)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  assert np.abs(want[0]).max() > 0.1 and np.all(out[1] == 0)


def test_context_parallel_backend_selects_the_per_device_op():
  need_devices()
  mesh = sh.make_mesh("sequence=8")
  assert cp.ContextParallel(mesh).backend == "xla"
  assert cp.kernel_partial_op("xla") is cp.partial_chunk_attention
  assert cp.backend_name("tpu", interpret=True) == "tpu-interpret"
  assert hash(cp.ContextParallel(mesh, backend="tpu", interpret=True)) == hash(
      cp.ContextParallel(mesh, backend="tpu", interpret=True))  # static under jit
  with pytest.raises(ValueError, match="not 'triton'"):
    cp.ContextParallel(mesh, backend="triton")
  with pytest.raises(ValueError, match="use backend='tpu'"):
    cp.ContextParallel(mesh, backend="gpu", interpret=True)
  if jax.default_backend() != "gpu":
    with pytest.raises(dispatch.BackendUnavailable, match="xla runs everywhere"):
      cp.kernel_partial_op("gpu")
  # the object's backend is what runs: the interpreted kernel is a loop over its grid,
  # which the reference op's program has none of
  q, k, v, q_pos, kv_len = _case(2, 1, 40, 1, 1, 4, 3, [20], [3])
  lowered = lambda be: jax.jit(lambda *a: dispatch.attend(
      kvc.FullLayerCache(k, v), *a, backend=be)).lower(q, k[:, :3], v[:, :3], q_pos[:, 0],
                                                       jnp.array([3])).as_text()
  assert "while" in lowered(cp.ContextParallel(mesh, backend="tpu", interpret=True))
  assert "while" not in lowered(cp.ContextParallel(mesh))


def test_engine_mesh_path_runs_the_tpu_kernels(fast_interpret_compiles):
  """engine.mesh_backend(mesh, "tpu-interpret") runs the retrieval heads through the
  kernels per device: a tiny DuoAttention model's prefill logits (ragged batch, 2 chunks)
  and greedy decode on data=2 x sequence=4 equal one device's xla run."""
  need_devices()
  from duojax import engine
  from duojax.model import handle as model_handle
  from helpers import random_params
  cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
                    num_heads=6, num_kv_heads=3, head_dim=6, max_position_embeddings=64,
                    name="tiny-cp")
  mask = HeadMask.from_array(np.array([[1, 0, 0], [1, 1, 1]], bool), sink=2, recent=3)
  h = model_handle.from_params(cfg, random_params(cfg, 5, 0.3), mask, reordered=True)
  r = np.random.default_rng(4)
  prompts = [list(map(int, r.integers(3, 32, n))) for n in (11, 2)]
  chunk, capacity, max_new = 8, 24, 3
  tokens, lengths = engine.pad_batch(prompts, chunk)

  def run(mesh, backend):
    cache = kvc.init_cache(cfg, len(prompts), capacity, mask, jnp.float32)
    if mesh is None:
      last, cache, logits = engine.prefill(h, cfg, tokens, lengths, cache, chunk, backend,
                                           all_logits=True)
      out, _, _ = engine.decode(h, cfg, cache, last, jax.random.PRNGKey(0), max_new,
                                engine.SamplingSettings(), (), backend)
      return np.asarray(logits), np.asarray(out)
    hm, cache, pl = engine.place_on_mesh(mesh, h, cfg, cache)
    step = engine.mesh_prefill_step(mesh, pl, hm, cfg, cache, chunk, backend, all_logits=True)
    last, cache, logits = engine.prefill(hm, cfg, tokens, lengths, cache, chunk, backend,
                                         all_logits=True, step=step)
    dec = engine.mesh_decode(mesh, pl, hm, cfg, cache, max_new, engine.SamplingSettings(), (),
                             backend)
    out, _, _ = dec(hm, cache, last, jax.random.PRNGKey(0))
    return np.asarray(logits), np.asarray(out)

  mesh = sh.make_mesh("data=2,sequence=4")
  be = engine.mesh_backend(mesh, "tpu-interpret")
  assert isinstance(be, cp.ContextParallel) and be.backend == "tpu-interpret"
  with pytest.raises(engine.InputError, match="--backend xla"):
    engine.mesh_backend(mesh, "gpu" if jax.default_backend() != "gpu" else "tpu")
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sh.ShardingWarning)
    got_logits, got_out = run(mesh, "tpu-interpret")
  want_logits, want_out = run(None, "xla")
  valid = np.arange(want_logits.shape[1])[None, :] < lengths[:, None]
  np.testing.assert_allclose(got_logits[valid], want_logits[valid], atol=1e-5, rtol=1e-5)
  assert np.abs(want_logits[valid]).max() > 0.1
  np.testing.assert_array_equal(got_out, want_out)
