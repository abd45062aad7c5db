"""AttentionInfluence: masked losses equal the same ablation done on the weights
(zeroed o_proj slices; zeroed query weights give uniform attention), batching does
not change scores, and the CLI writes one line per document in input order."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax.attention.reference import dense_attention
from duojax.config import tiny_config
from duojax.eval import influence
from duojax.model import llama
from duojax.pattern import HeadPattern
from helpers import random_params, tiny_hf_tokenizer  # noqa: E402

CFG = tiny_config(num_layers=2, max_position_embeddings=256)
RETRIEVAL = ((True, False), (False, True))


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, 0, 0.3)


def _edit(params, name):
  """Zero `name` (wo: the head's output; wq: its queries) for the retrieval heads."""
  layers = []
  for lp, row in zip(params["layers"], RETRIEVAL):
    w = np.array(lp[name])
    for h, r in enumerate(row):
      if r:
        if name == "wo":
          w[h] = 0
        else:
          w[:, h] = 0
    layers.append({**lp, name: jnp.asarray(w)})
  return {**params, "layers": layers}


@jax.jit
def _logits(params, tokens, lengths):
  h = llama.forward_sequence(params, CFG, tokens, lengths,
                             lambda i, q, k, v, n: dense_attention(q, k, v, n))
  return llama.logits_from_hidden(params, h)


def _loss(params, doc):
  """Mean next-token NLL of one document, plain causal model (numpy log-softmax)."""
  lg = np.asarray(_logits(params, jnp.asarray([doc]), jnp.asarray([len(doc)]))[0], np.float64)
  mx = lg.max(-1, keepdims=True)
  lp = lg - mx - np.log(np.exp(lg - mx).sum(-1, keepdims=True))
  return -np.mean([lp[i - 1, doc[i]] for i in range(1, len(doc))])


DOCS = [list(np.random.default_rng(i).integers(3, 97, n)) for i, n in enumerate((40, 9, 1, 23))]


@pytest.mark.parametrize("ablation,weight", [("zero", "wo"), ("uniform", "wq")])
def test_masked_loss_equals_weight_ablation(params, ablation, weight):
  got = influence.score_documents(params, CFG, DOCS, RETRIEVAL, ablation, batch_size=3,
                                  pad_multiple=16, progress=False)
  edited = _edit(params, weight)
  for d, r in zip(DOCS, got):
    assert r["n_tokens"] == len(d)
    if len(d) < 2:
      assert r["influence"] is None and r["loss"] is None
      continue
    base, masked = _loss(params, d), _loss(edited, d)
    np.testing.assert_allclose([r["loss"], r["masked_loss"]], [base, masked], rtol=1e-4)
    np.testing.assert_allclose(r["influence"], (masked - base) / base, rtol=1e-3, atol=1e-6)


def test_batching_does_not_change_scores(params):
  one = influence.score_documents(params, CFG, DOCS, RETRIEVAL, batch_size=1, pad_multiple=16,
                                  progress=False)
  many = influence.score_documents(params, CFG, DOCS, RETRIEVAL, batch_size=4, pad_multiple=16,
                                   progress=False)
  for a, b in zip(one, many):
    if a["loss"] is not None:
      np.testing.assert_allclose([a["loss"], a["masked_loss"]], [b["loss"], b["masked_loss"]],
                                 rtol=1e-5)


def test_cli(params, tmp_path, capsys):
  from duojax.checkpoint import store
  ck = store.save_checkpoint(tmp_path / "ck", CFG, params, tiny_hf_tokenizer())
  pat = HeadPattern(np.array([[0.9, 0.1], [0.2, 0.8]]), 4, 8,
                    {"selection": {"threshold": 0.5}}).save(tmp_path / "pat")
  data = tmp_path / "docs.jsonl"
  texts = ["The cat sat on the mat. The cat sat on the mat again.", "Hi", "Short one here."]
  data.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(texts)))
  out = tmp_path / "o" / "scores.jsonl"
  rc = influence.main(["--ckpt", str(ck), "--pattern", str(pat), "--data", str(data), "--out",
                       str(out), "--no-progress", "--batch-size", "2"])
  assert rc == 0
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert [r["id"] for r in rows] == ["d0", "d1", "d2"] and [r["index"] for r in rows] == [0, 1, 2]
  assert all(r["influence"] is not None for r in rows)
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["masked_heads"] == 2 and summary["scored"] == 3
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"txt": "no text field"}\n')
  assert influence.main(["--ckpt", str(ck), "--pattern", str(pat), "--data", str(bad), "--out",
                         str(out), "--no-progress"]) == 2
  assert "has no string 'text' field" in capsys.readouterr().err
  assert influence.main(["--ckpt", str(ck), "--pattern", str(pat), "--data", str(data), "--out",
                         str(out), "--no-progress", "--threshold", "0.95"]) == 2


