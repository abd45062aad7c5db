"""infer/kv_quant_error.py: its attention and quantisation against numpy oracles written here,
the smoothing's exactness, and that an outlier key channel shows up where it should."""

import jax.numpy as jnp
import numpy as np
import pytest

from duojax.config import ModelConfig
from infer import kv_quant_error as kqe

import helpers


def np_attention(q, k, v):
  """Loop oracle: query t attends keys 0..t with a float64 softmax."""
  t, h, g, d = q.shape
  out = np.zeros((t, h, g, d))
  for i in range(t):
    for j in range(h):
      s = q[i, j] @ k[: i + 1, j].T / np.sqrt(d)  # [G, i+1]
      p = np.exp(s - s.max(-1, keepdims=True))
      out[i, j] = (p / p.sum(-1, keepdims=True)) @ v[: i + 1, j]
  return out


def np_roundtrip(x, bits):
  """Asymmetric, one range per row of D (token, head): what the cache stores and reads back."""
  lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
  scale = (hi - lo) / (2 ** bits - 1)
  return np.round((x - lo) / scale) * scale + lo


def qkv(seed, t=13, h=3, g=2, d=8):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((t, h, g, d)).astype(np.float32),
          rng.standard_normal((t, h, d)).astype(np.float32),
          rng.standard_normal((t, h, d)).astype(np.float32))


@pytest.mark.parametrize("g", [1, 3])  # MHA and GQA
def test_causal_attention_matches_loop_oracle(g):
  q, k, v = qkv(0, g=g)
  np.testing.assert_allclose(np.asarray(kqe.causal_attention(q, k, v)), np_attention(q, k, v),
                             rtol=1e-5, atol=1e-6)


def test_errors_match_numpy_quantisation():
  q, k, v = qkv(1, t=17)
  exact = np_attention(q, k, v)
  want = {"K8": np_attention(q, np_roundtrip(k, 8), v), "V4": np_attention(q, k, np_roundtrip(v, 4)),
          "int4 (K4 V4)": np_attention(q, np_roundtrip(k, 4), np_roundtrip(v, 4))}
  got = kqe.layer_errors(q, k, v, {n: kqe.VARIANTS[n] for n in want})
  for n, o in want.items():
    assert got[n] == pytest.approx(np.linalg.norm(o - exact) / np.linalg.norm(exact), rel=1e-3)
  assert 0 < got["K8"] < got["int4 (K4 V4)"] < 1


def test_channel_roundtrip_matches_numpy():
  k = np.random.default_rng(5).standard_normal((300, 2, 8)).astype(np.float32)
  k[:, :, 3] += 50.0  # a large constant channel costs the others nothing per channel
  want = np.concatenate([np.swapaxes(np_roundtrip(np.swapaxes(k[i:i + 128], 0, -1), 4), 0, -1)
                         for i in range(0, 300, 128)])  # 128, 128 and a last group of 44
  got = np.asarray(kqe.channel_roundtrip(jnp.asarray(k), 4))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  q, _, v = qkv(6, t=300, h=2, g=2)
  e = kqe.layer_errors(q, k, v, {n: kqe.VARIANTS[n] for n in ("K4", "K4 per-channel")})
  assert e["K4 per-channel"] < 0.5 * e["K4"]


def test_smoothing_scales_are_exact_for_unquantised_attention():
  q, k, v = qkv(2)
  k = k * np.array([1.0] * 3 + [40.0] + [1.0] * 3 + [40.0], np.float32)  # pair (3, 7) large
  s = np.asarray(kqe.smoothing_scales(jnp.asarray(q), jnp.asarray(k)))
  assert np.array_equal(s[:, :4], s[:, 4:])  # one scale per RoPE pair
  assert np.array_equal(np.exp2(np.round(np.log2(s))), s)  # powers of two
  assert (s[:, 3] >= 4).all() and (s[:, 3] > s[:, 0]).all()  # the large pair is divided down
  got = kqe.layer_errors(q, k, v, {"smoothed, no rounding": (None, None, "smoothed")})
  assert got["smoothed, no rounding"] < 1e-6


def test_run_finds_an_outlier_key_channel_and_smoothing_helps():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, max_position_embeddings=128,
                    attention_bias=True, name="tiny-bias")
  params = helpers.random_params(cfg, 3, 0.3)
  layers = [dict(lp) for lp in params["layers"]]
  bk = np.zeros((2, 16), np.float32)
  bk[:, 2] = bk[:, 10] = 60.0  # layer 1: a large key bias on RoPE pair (2, 10), as in Qwen2.5
  layers[1]["bk"] = jnp.asarray(bk)
  params = {**params, "layers": layers}
  tokens = np.random.default_rng(4).integers(0, 64, 40)
  rows = kqe.run(cfg, params, tokens, {n: kqe.VARIANTS[n] for n in ("K4", "K8", "K4 smoothed")})
  assert [r["layer"] for r in rows] == [0, 1]
  assert rows[1]["key_outliers"] > 10 * rows[0]["key_outliers"]
  e0, e1 = rows[0]["errors"], rows[1]["errors"]
  assert e1["K4"] > 2 * e0["K4"]  # the outlier takes the int4 range from the other channels
  assert e1["K4 smoothed"] < 0.5 * e1["K4"]
  s = kqe.summary(rows)
  assert s["K4"]["worst_layer"] == 1 and s["K4"]["max"] == pytest.approx(e1["K4"])


def test_table_and_plot(tmp_path):
  rows = [{"layer": i, "key_outliers": 2.0 + i, "errors": {"K4": 0.1 * (i + 1), "V4": 0.05}}
          for i in range(3)]
  doc = {"ckpt": "tiny", "tokens": 9, "layers": rows, "summary": kqe.summary(rows)}
  md = kqe.table(doc)
  assert "| K4 | 0.200 | 0.200 | 0.300 (2) |" in md and "max 4.0 (layer 2)" in md
  kqe.plot(doc, tmp_path / "p.png")
  assert (tmp_path / "p.png").stat().st_size > 1000
