"""Copy-paste retrieval score: the per-step rule on hand-built steps, the cache
decode's top-1 capture against a dense forward, and the CLI's files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax.attention.reference import dense_attention
from duojax.config import tiny_config
from duojax.identify import retrieval_score as rs
from duojax.identify.formats import load_retrieval_scores
from duojax.model import llama
from helpers import random_params, tiny_hf_tokenizer  # noqa: E402

CFG = tiny_config(num_layers=2, max_position_embeddings=512)


def test_copy_scores_hand_built():
  prompt = np.array([9, 9, 5, 6, 7, 8, 9, 9])  # needle = positions [2, 6): 5 6 7 8
  gen = np.array([5, 6, 7, 3, -1])  # the last step did not happen (row stopped)
  top1 = np.zeros((5, 1, 4), int)
  top1[:, 0, 0] = [2, 3, 4, 5, 2]  # copies 5, 6, 7; step 3 points at 8 but 3 was generated
  top1[:, 0, 1] = [3, 3, 3, 3, 3]  # right place only when 6 was generated
  top1[:, 0, 2] = [0, 1, 6, 7, 0]  # outside the needle, even where the token matches
  top1[:, 0, 3] = [2, 3, 4, 2, 2]  # copies the first three
  got = rs.copy_scores(top1, gen, prompt, (2, 6))
  np.testing.assert_allclose(got, [[3 / 4, 1 / 4, 0, 3 / 4]])


def test_scores_json_keeps_only_right_answers():
  res = [rs.NeedleResult(100, 0.5, (1, 3), [], "", 1.0, True, np.full((2, 6), 0.5)),
         rs.NeedleResult(100, 0.0, (1, 3), [], "", 0.0, False, np.full((2, 6), 0.9)),
         rs.NeedleResult(200, 1.0, (1, 3), [], "", 1.0, True, np.arange(12.0).reshape(2, 6) / 12)]
  js = rs.scores_json(res, 2, 6)
  assert js["1-4"] == [0.5, 10 / 12] and len(js) == 12


@jax.jit
def _dense(params, tokens, lengths):
  """Logits [B, T, V] and each query head's argmax key [B, L, Hkv, G, T], causal."""
  tops = []

  def attn(i, q, k, v, lens):
    t = q.shape[1]
    pos = jnp.arange(t)
    seen = (pos[None, :] <= pos[:, None])[None] & (pos[None, :] < lens[:, None])[:, None, :]
    s = jnp.einsum("bthgd,bshd->bhgts", q, k)
    tops.append(jnp.argmax(jnp.where(seen[:, None, None], s, -jnp.inf), -1))
    return dense_attention(q, k, v, lens)

  h = llama.forward_sequence(params, CFG, tokens, lengths, attn)
  return llama.logits_from_hidden(params, h), jnp.stack(tops, 1)


def test_decode_capture_matches_dense_forward():
  params = random_params(CFG, 0, 0.3)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, CFG.vocab_size, n).astype(np.int32) for n in (37, 20)]
  gen, top1 = rs.decode_with_top1(params, CFG, prompts, 6, prefill_chunk=16)
  assert top1.shape[2:] == (2, 6) and gen.shape[0] == 2
  seqs = []
  for p, g in zip(prompts, gen):
    n = int(np.argmax(g < 0)) if (g < 0).any() else len(g)
    seqs.append(np.r_[p, g[:n]])
  tokens = np.zeros((2, 48), np.int32)
  for r, s in enumerate(seqs):
    tokens[r, :len(s)] = s
  logits, tops = _dense(params, jnp.asarray(tokens), jnp.asarray([len(s) for s in seqs]))
  logits, tops = np.asarray(logits), np.asarray(tops)
  for r, (p, s) in enumerate(zip(prompts, seqs)):
    for step in range(len(s) - len(p)):
      at = len(p) - 1 + step  # the query whose logits chose generated token `step`
      assert gen[r, step] == logits[r, at].argmax()
      np.testing.assert_array_equal(top1[r, step], tops[r, :, :, :, at].reshape(2, 6))


def test_cli_writes_pattern_and_wu_format(tmp_path, capsys):
  from duojax.checkpoint import store
  from duojax.pattern import load_any
  params = random_params(CFG, 1, 0.3)
  ck = store.save_checkpoint(tmp_path / "ck", CFG, params, tiny_hf_tokenizer())
  hay = tmp_path / "hay.txt"
  hay.write_text(" ".join(f"SENTENCE {i} IS ABOUT THE {i % 7} THING." for i in range(300)))
  out = tmp_path / "out"
  args = ["--ckpt", str(ck), "--haystack", str(hay), "--out", str(out), "--lengths", "300,400",
          "--depths", "2", "--max-new-tokens", "4", "--no-chat", "--no-progress"]
  # a random model answers nothing right: a clear error, and the log says why
  assert rs.main(args) == 2
  assert "no test was answered right (0 of 4" in capsys.readouterr().err
  assert len(json.loads((out / "tests.json").read_text())) == 4
  # count every test (recall > -1) to exercise the files
  assert rs.main(args + ["--min-recall", "-1", "--sparsity", "0.5"]) == 0
  scores = load_retrieval_scores(out / "retrieval_scores.json", num_kv_heads=2)
  assert scores.shape == (2, 6)
  pat = load_any(out)
  assert pat.shape == (2, 2) and pat.metadata["n_counted"] == 4
  assert pat.mask().as_array().sum() == 2  # sparsity 0.5 of 4 KV heads
  np.testing.assert_allclose(pat.gates, scores.reshape(2, 2, 3).max(-1), atol=1e-7)
  assert rs.main(args + ["--lengths", "510"]) == 2  # beyond the context with new tokens


def test_identify_several_needles_from_an_offset(tmp_path):
  """The library entry point: every needle x length x depth, batches of one length,
  prompts cut from the haystack at `offset`, the log and metadata saying which is which."""
  from duojax.data.haystack import HaystackTokens
  from duojax.data.niah import NeedleTask
  tok = tiny_hf_tokenizer()
  hay = HaystackTokens(" ".join(f"SENTENCE {i} IS ABOUT THE {i % 7} THING." for i in range(300)),
                       tok, line_breaks=False)
  tasks = [NeedleTask("THE KEY IS RED.", "WHAT IS THE KEY?", "RED"),
           NeedleTask("THE DOOR IS BLUE.", "WHAT IS THE DOOR?", "BLUE")]
  cases = rs.build_cases(hay, tok, tasks[0], [200], [1.0], chat=False, offset=500)
  np.testing.assert_array_equal(cases[0][2][:100], hay.take(100, 500))
  pat, results = rs.identify(random_params(CFG, 1, 0.3), CFG, tok, hay, tmp_path, tasks=tasks,
                             lengths=[300, 200, 300], depths=2, chat=False, offset=500,
                             max_new_tokens=3, min_recall=-1, sparsity=0.5, progress=False)
  log = json.loads((tmp_path / "tests.json").read_text())
  assert [(r["needle"], r["length"]) for r in log] == [(0, 200)] * 2 + [(0, 300)] * 2 + [
      (1, 200)] * 2 + [(1, 300)] * 2
  assert len(results) == 8 and pat.metadata["n_counted"] == 8
  assert pat.metadata["offset"] == 500 and len(pat.metadata["needles"]) == 2
  assert pat.shape == (2, 2) and (tmp_path / "retrieval_scores.json").is_file()
  with pytest.raises(rs.ScoreError, match="do not fit"):
    rs.identify(None, CFG, tok, hay, tmp_path, lengths=[300], offset=len(hay) - 100)
