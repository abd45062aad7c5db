"""int8 weight-only quantisation (duojax/model/quant.py, through qwix).

Two oracles written here in numpy: the integer values and scales of symmetric absmax
quantisation per output channel; and the model run in fp32 on plain weights multiplied out
from the quantised model's own integers and scales, which the QArrays inside nnx.Params
(through qwix's einsum) must equal. Against the unquantised model it must stay close.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from duojax import engine
from duojax.config import ModelConfig
from duojax.layout import LAYER_AXES, TOP_AXES
from duojax.model import quant
from duojax.pattern import HeadMask
from helpers import random_params

pytest.importorskip("qwix")

# GQA with an untied head (lm_head quantised too); MHA tied; odd MLP widths.
GQA = ModelConfig(vocab_size=96, hidden_size=256, intermediate_size=200, num_layers=2,
                  num_heads=6, num_kv_heads=3, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=False, name="q-gqa")
MHA = ModelConfig(vocab_size=80, hidden_size=96, intermediate_size=136, num_layers=2,
                  num_heads=4, num_kv_heads=4, head_dim=24, max_position_embeddings=256,
                  tie_word_embeddings=True, name="q-mha")
PROMPTS = [[5, 9, 2, 17, 33, 4, 8, 1, 60, 3, 7], [11, 12, 13], [40, 2, 9, 9, 30, 21, 1]]


def _np_quant(w: np.ndarray, contracted: tuple[int, ...]):
  """Symmetric absmax int8 in numpy -> (integer values, scales broadcast to w, edge).
  The bound is 127.5 (qwix's choice), so a channel's extreme value lands in the middle of
  the top bucket; values round to nearest and clip to +-127. `edge`: values within float32
  rounding of a bucket edge (the extreme value sits exactly on one), which may go either way."""
  w = np.asarray(w, np.float64)
  amax = np.max(np.abs(w), axis=contracted, keepdims=True)
  scale = np.where(amax > 0, amax / 127.5, 1.0)
  x = w / scale
  edge = np.abs(np.abs(x - np.floor(x)) - 0.5) < 1e-4
  return np.clip(np.round(x), -127, 127), np.broadcast_to(scale, w.shape), edge


def _contracted(name, axes):
  return tuple(i for i, a in enumerate(axes) if a in quant.CONTRACTED[name])


def _weights(params):
  for i, lp in enumerate(params["layers"]):
    for k, v in lp.items():
      if k in quant.CONTRACTED:
        yield ("layers", i, k), k, LAYER_AXES[k], v
  if params.get("lm_head") is not None:
    yield ("lm_head",), "lm_head", TOP_AXES["lm_head"], params["lm_head"]


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def test_quantised_values_match_numpy():
  params = random_params(GQA, seed=3, scale=0.05)
  qp = quant.quantize_params(params, "int8")
  for path, name, axes, w in _weights(params):
    qa = _get(qp, path)
    q_np, s_np, edge = _np_quant(np.asarray(w), _contracted(name, axes))
    assert qa.qvalue.dtype == np.int8 and qa.qvalue.shape == w.shape
    qv = np.asarray(qa.qvalue).astype(np.int64)
    np.testing.assert_allclose(np.broadcast_to(_scales(qa, w.shape), w.shape), s_np,
                               rtol=1e-6, err_msg=str(path))
    # the allowance covers about each channel's extreme value, not the test
    assert edge.sum() <= 2 * np.prod(qa.scale.shape) + 1e-3 * w.size
    off = qv != q_np
    assert not (off & ~edge).any(), (path, int((off & ~edge).sum()))
    assert (np.abs(qv - q_np) <= 1).all()


def _scales(qa, shape):
  """The QArray's scales (1 on the contracted axes) broadcast to the weight's shape."""
  return np.broadcast_to(np.asarray(qa.scale, np.float64), shape)


def _dequantised_in_numpy(qp, params):
  """The quantised model's own integers times scales, multiplied out in numpy: the plain
  weights the qwix einsums must be equivalent to."""
  out = dict(params)
  out["layers"] = [dict(lp) for lp in params["layers"]]
  for path, name, axes, w in _weights(params):
    qa = _get(qp, path)
    deq = jnp.asarray(np.asarray(qa.qvalue, np.float64) * _scales(qa, w.shape), jnp.float32)
    if path[0] == "layers":
      out["layers"][path[1]][path[2]] = deq
    else:
      out["lm_head"] = deq
  return out


@pytest.mark.parametrize("cfg", [GQA, MHA], ids=["gqa", "mha"])
def test_quantised_model_equals_plain_model_on_its_weights(cfg):
  params = random_params(cfg, seed=3, scale=0.05)
  qp = quant.quantize_params(params, "int8")
  got = engine.forward_logits(qp, cfg, PROMPTS)
  want = engine.forward_logits(_dequantised_in_numpy(qp, params), cfg, PROMPTS)
  exact = engine.forward_logits(params, cfg, PROMPTS)
  for g, w, e in zip(got, want, exact):
    scale = np.abs(w).max()
    np.testing.assert_allclose(g, w, atol=2e-5 * scale, rtol=1e-5)
    # and quantisation did something, of the size its bits allow
    err = np.abs(g - e).max() / scale
    assert 1e-5 < err < 0.05, err


def test_int8_weights_keep_greedy_tokens_and_duo_split():
  """A duo pattern (retrieval heads first by reordering) over int8 weights decodes the same
  greedy tokens as over the fp32 weights on this tiny model, batch 2 of different lengths."""
  mask = HeadMask.from_array(np.array([[1, 0, 0], [0, 1, 1]], bool), sink=2, recent=4)
  from duojax.model.llama import apply_head_mask
  params = apply_head_mask(random_params(GQA, seed=4, scale=0.05), mask)
  prompts = PROMPTS[:2]
  ref = engine.generate(params, GQA, prompts, max_new_tokens=6, mask=mask)
  q = engine.generate(quant.quantize_params(params, "int8"), GQA, prompts, max_new_tokens=6,
                      mask=mask)
  assert [list(t) for t in q.tokens] == [list(t) for t in ref.tokens]


def test_bytes_and_errors():
  params = random_params(GQA, seed=5, scale=0.05)
  full = quant.weight_bytes(params)
  q8 = quant.quantize_params(params, "int8")
  proj = sum(np.asarray(v).size for lp in params["layers"] for k, v in lp.items()
             if k in quant.CONTRACTED) + params["lm_head"].size
  rest = full - 4 * proj
  # 1 byte a value plus a few fp32 scales a channel, against 4 bytes a value in fp32
  assert proj < quant.weight_bytes(q8) - rest < 1.1 * proj
  with pytest.raises(ValueError, match="choose one of"):
    quant.quantize_params(params, "int4")
  with pytest.raises(ValueError, match="quantised already"):
    quant.quantize_params(q8, "int8")
  assert quant.quantize_params(params, "bf16") is params


def test_infer_cli_int8_weights(tiny_ckpt, capsys):
  """`--weights-dtype int8` end to end: the real checkpoint path quantises after the heads
  are reordered; it decodes every token asked for, and its first greedy tokens equal the
  unquantised run's (the tiny GGUF's weights are deterministic)."""
  import json
  from duojax import infer
  base = ["--ckpt", str(tiny_ckpt), "--prompt", "the", "--max-new-tokens", "6", "--json"]
  outs = {}
  for wd in ("bf16", "int8"):
    assert infer.main(base + ["--weights-dtype", wd]) == 0
    outs[wd] = json.loads(capsys.readouterr().out)
  assert outs["int8"]["weights_dtype"] == "int8"
  assert len(outs["int8"]["generated_ids"]) == len(outs["bf16"]["generated_ids"]) == 6
  assert outs["int8"]["generated_ids"][:2] == outs["bf16"]["generated_ids"][:2]


@pytest.mark.parametrize("spec,x_shape,w_shape,channels", [
    ("bte,ehgd->bthgd", (2, 3, 32), (32, 2, 3, 8), (1, 2, 3)),   # wq
    ("bte,ehd->bthd", (1, 5, 32), (32, 2, 8), (1, 2)),            # wk / wv
    ("bthgd,hgde->bte", (2, 3, 2, 3, 8), (2, 3, 8, 32), (3,)),   # wo: three contracted axes
    ("btf,fe->bte", (2, 1, 48), (48, 32), (1,)),                   # w_down
    ("...e,ev->...v", (2, 3, 32), (32, 37), (1,))])                # lm_head, odd vocabulary
def test_int8_einsum_scales_the_output_like_the_dequantised_weight(spec, x_shape, w_shape,
                                                                   channels):
  """quant.einsum puts the int8 codes into the product and scales its output; the oracle is
  numpy in float64 on the dequantised weight (codes x scales written out here)."""
  import qwix
  kx, kw = jax.random.split(jax.random.PRNGKey(3))
  x = jax.random.normal(kx, x_shape, jnp.float32)
  w = jax.random.normal(kw, w_shape, jnp.float32)
  q = qwix.quantize(w, jnp.int8, channelwise_axes=channels)
  deq = np.asarray(q.qvalue, np.float64) * np.asarray(q.scale, np.float64)
  want = np.einsum(spec, np.asarray(x, np.float64), deq)
  got = quant.einsum(spec, x, q)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # the lm_head asks for fp32 logits from bf16 activations
  got16 = quant.einsum(spec, x.astype(jnp.bfloat16), q, preferred_element_type=jnp.float32)
  assert got16.dtype == jnp.float32
