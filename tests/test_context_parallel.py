"""Context-parallel attention (retrieval heads' cache split over `sequence`) equals one device.

Runs on 8 fake CPU devices: in a plain pytest process `test_on_8_fake_cpu_devices`
reruns this file in a subprocess with them (see test_sharding.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
}


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
  assert float(jnp.abs(want).max()) > 0.1  # the comparison is not of zeros


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


def test_merge_exact_when_devices_hold_no_keys():
  """Row 0 has keys only on device 0 and every logit near -300: the empty devices' max
  must not stand in for a real one (exp(-300) is 0 in fp32). Row 1 sees nothing."""
  need_devices()
  mesh = sh.make_mesh("sequence=8")
  r = np.random.default_rng(3)
  b, s, h, g, d = 2, 64, 1, 2, 4
  u = np.ones(d) / np.sqrt(d)
  k = u + 0.05 * r.standard_normal((b, s, h, d))
  q = -300 * np.sqrt(d) * u + 0.5 * r.standard_normal((b, 1, h, g, d))
  v = r.standard_normal((b, s, h, d))
  q_pos = np.array([[40], [0]], np.int32)
  kv_len = np.array([3, 0], np.int32)
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


def test_write_full_each_device_writes_its_positions():
  need_devices()
  mesh = sh.make_mesh("data=2,sequence=4")
  b, s, h, d, t = 4, 32, 2, 3, 6
  r = np.random.default_rng(7)
  c = kvc.FullLayerCache(jnp.asarray(r.standard_normal((b, s, h, d)), jnp.float32),
                         jnp.asarray(r.standard_normal((b, s, h, d)), jnp.float32))
  k = jnp.asarray(r.standard_normal((b, t, h, d)), jnp.float32)
  v = jnp.asarray(r.standard_normal((b, t, h, d)), jnp.float32)
  # straddling slices 0|1; padding past n_valid; nothing; past capacity (dropped)
  start, n_valid = jnp.array([5, 14, 0, 29]), jnp.array([6, 3, 0, 6])
  got = jax.jit(lambda *a: cp.write_full(*a, mesh=mesh))(c, k, v, start, n_valid)
  want = kvc.write_full(c, k, v, start, n_valid)
  np.testing.assert_array_equal(np.asarray(got.k), np.asarray(want.k))
  np.testing.assert_array_equal(np.asarray(got.v), np.asarray(want.v))
  assert got.k.sharding.spec[1] == "sequence"
  np.testing.assert_array_equal(np.asarray(got.k[0, 5:11]), np.asarray(k[0]))  # not a no-op


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


def test_duo_layer_prefill_and_decode_equal_dispatch():
  """A DuoAttention layer (1 retrieval + 2 streaming heads), prefill in two ragged chunks
  then two decode steps: outputs and caches equal the single-device dispatcher's."""
  need_devices()
  mesh = sh.make_mesh("data=2,sequence=4")
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
  assert cp_c.full.k.sharding.spec[1] == "sequence"


def test_capacity_plan_row_matches_cache_shapes():
  """infer/capacity_plan.py's compiled per-device bytes equal the sharded cache's slices."""
  need_devices()
  import sys
  from pathlib import Path
  root = str(Path(__file__).resolve().parents[1])
  if root not in sys.path:
    sys.path.insert(0, root)
  from infer import capacity_plan
  r = capacity_plan.plan_row("llama3-8b", 8192, "sequence=4", 0.5, 1, 64, 256, N_FAKE)
  item, d = 2, 128
  retrieval = 2 * 8192 * 4 * d * item // 4  # k and v, 4 of 8 heads, a quarter of the slots
  stream = 2 * (64 + 256) * 4 * d * item  # replicated over sequence
  assert r["cache_per_device_layer"] == retrieval + stream
  assert 0 <= r["args_per_device"] - (retrieval + stream) < 1 << 16  # + q/k/v of one token
  assert r["alias_per_device"] == retrieval + stream  # the cache is updated in place
