"""Gate training's whole-sequence causal attention on GPU (cuDNN, kernels/gpu/dense.py)
against the plain-jnp reference, values and gradients, and one gate-training loss and
gradient on the gpu backend against the XLA path.

GPU only (every test name holds `gpu`); skipped with the reason elsewhere. The reference
runs in float32 on the same bf16-rounded inputs; rows past a sequence's length are not
compared (the op leaves them undefined, and gate training never reads them): their
cotangent is zero, so the gradients compare whole.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from duojax.attention import reference
from duojax.config import tiny_config
from duojax.identify import duo
from duojax.model import init_params

SKIP = None if jax.default_backend() == "gpu" else (
    f"cuDNN attention: no GPU here (JAX runs on {jax.default_backend()})")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.isfinite(a).all()
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("b,t,hkv,g,d,lengths", [
    (2, 1000, 2, 7, 64, (1000, 613)),   # Qwen2.5-0.5B's heads, ragged, odd T
    (1, 4096, 8, 4, 128, (4096,)),      # Llama-3-8B's heads
    (2, 777, 4, 1, 128, (777, 1)),      # MHA, a one-token row
])
def test_cudnn_dense_causal_equals_reference_values_and_grads_gpu(b, t, hkv, g, d, lengths):
  from duojax.kernels.gpu import dense
  keys = jax.random.split(jax.random.PRNGKey(t + hkv), 4)
  q = jax.random.normal(keys[0], (b, t, hkv, g, d), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, t, hkv, d), jnp.float32).astype(jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, t, hkv, d), jnp.float32).astype(jnp.bfloat16)
  lens = jnp.asarray(lengths, jnp.int32)
  valid = (jnp.arange(t)[None, :] < lens[:, None])[:, :, None, None, None]
  w = jax.random.normal(keys[3], q.shape, jnp.float32) * valid  # cotangent on real rows

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, lens).astype(jnp.float32) * w)

  out = dense.dense_causal(q, k, v, lens)
  ref = reference.dense_attention(*(x.astype(jnp.float32) for x in (q, k, v)), lens)
  assert out.dtype == jnp.bfloat16
  assert _rel(out * valid, ref * valid) < 1e-2
  got = jax.grad(lambda *a: loss(dense.dense_causal, *a), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(lambda *a: loss(reference.dense_attention, *a), argnums=(0, 1, 2))(
      *(x.astype(jnp.float32) for x in (q, k, v)))
  for name, x, y in zip("qkv", got, want):
    assert _rel(x, y) < 2e-2, name


def test_cudnn_dense_causal_refuses_float32_naming_the_fix_gpu():
  from duojax.kernels.gpu import dense
  x = jnp.zeros((1, 8, 1, 1, 64), jnp.float32)
  with pytest.raises(ValueError, match="bfloat16"):
    dense.dense_causal(x, x[:, :, :, 0], x[:, :, :, 0], jnp.array([8]))


def test_gate_loss_on_gpu_backend_equals_xla_gpu():
  """The whole gate-training loss and gate gradient, bf16, T past the blocked path's
  threshold, on the gpu backend (cuDNN causal + blocked streaming) and on xla."""
  cfg = tiny_config(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, hidden_size=128,
                    intermediate_size=160)
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16),
                                  init_params(cfg, jax.random.PRNGKey(0), scale=0.4))
  t = 4500
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, t)), jnp.int32)
  lengths = jnp.array([t, 3100], jnp.int32)
  mask = (jnp.arange(t)[None] >= 2000) & (jnp.arange(t)[None] < lengths[:, None])
  gates = jnp.array([[0.3, 0.9], [0.6, 0.1]], jnp.float32)

  def run(backend):
    f = lambda gs: duo.gate_loss(gs, params, cfg, tokens, lengths, mask, sink=16, recent=64,
                                 reg=0.05, backend=backend)
    (val, aux), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(gates)
    return float(aux["distill"]), np.asarray(grad)

  d_gpu, g_gpu = run("gpu")
  d_xla, g_xla = run("xla")
  assert d_xla > 1e-4  # the gates matter
  assert d_gpu == pytest.approx(d_xla, rel=3e-2)
  assert _rel(g_gpu, g_xla) < 5e-2
