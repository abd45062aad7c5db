"""RazorAttention: echo/induction scores on attention whose answer is known, the
chunked scorer against full probabilities, the selection rule, and the CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax.attention.reference import dense_attention
from duojax.config import tiny_config
from duojax.identify import razor
from duojax.pattern import HeadPattern
from helpers import random_params, tiny_hf_tokenizer  # noqa: E402

BLOCK = [5, 6, 7, 8]
TOKENS = [0] + BLOCK * 3  # BOS + 3 copies: T = 13, queries 5..12 are scored


def uniform_expectation(tokens):
  """Echo and induction score of a head attending uniformly over keys 0..t (loops)."""
  e, f, n = 0.0, 0.0, 0
  for t, x in enumerate(tokens):
    if x not in tokens[:t]:
      continue
    n += 1
    e += sum(tokens[j] == x for j in range(t)) / (t + 1)
    f += sum(tokens[j - 1] == x for j in range(1, t + 1)) / (t + 1)
  return e / n, f / n


def test_scores_on_hand_built_attention():
  t = len(TOKENS)
  p = np.zeros((1, 5, t, t), np.float32)
  for q in range(t):
    scored = q >= 1 + len(BLOCK)
    p[0, 0, q, q - 4 if scored else 0] = 1  # echo head: the previous copy of the token
    p[0, 1, q, q - 3 if scored else 0] = 1  # induction head: the token after that copy
    p[0, 2, q, 0] = 1  # sink head: everything on BOS
    p[0, 3, q, :q + 1] = 1 / (q + 1)  # uniform
    if scored:  # half on each
      p[0, 4, q, q - 4] = p[0, 4, q, q - 3] = 0.5
    else:
      p[0, 4, q, q] = 1
  e, f, n = razor.scores_from_probs(jnp.asarray(p), jnp.asarray([TOKENS]), jnp.asarray([t]))
  assert int(n) == 8
  ue, uf = uniform_expectation(TOKENS)
  np.testing.assert_allclose(np.asarray(e) / 8, [1, 0, 0, ue, 0.5], atol=1e-6)
  np.testing.assert_allclose(np.asarray(f) / 8, [0, 1, 0, uf, 0.5], atol=1e-6)


def test_chunked_scorer_equals_full_probabilities():
  """Queries in chunks (not dividing T), ragged lengths: same output and sums."""
  b, t, h, g, d = 2, 37, 2, 3, 8
  rng = np.random.default_rng(0)
  q = rng.standard_normal((b, t, h, g, d), np.float32)
  k = rng.standard_normal((b, t, h, d), np.float32)
  v = rng.standard_normal((b, t, h, d), np.float32)
  blk = np.random.default_rng(0).permutation(50)[:9]
  tokens = np.stack([np.r_[1, np.tile(blk, 4)], np.r_[1, np.tile(blk[:6], 6)]]).astype(np.int32)
  lengths = jnp.asarray([37, 30])
  pad = lambda x: np.pad(x, [(0, 0), (0, 3)] + [(0, 0)] * (x.ndim - 2))
  out, e, f, n = jax.jit(razor.attention_with_scores, static_argnames="chunk")(
      pad(q), pad(k), pad(v), pad(tokens), lengths, chunk=8)
  np.testing.assert_allclose(np.asarray(out[:, :t]),
                             np.asarray(jax.jit(dense_attention)(q, k, v, lengths)), atol=1e-5)
  pos = np.arange(t)
  s = np.einsum("bthgd,bshd->bhgts", q, k) / np.sqrt(d)
  seen = (pos[None, :] <= pos[:, None])[None] & (pos < np.asarray(lengths)[:, None])[:, None, :]
  s = np.where(seen[:, None, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = np.nan_to_num(p / p.sum(-1, keepdims=True)).reshape(b, h * g, t, t)
  e2, f2, n2 = jax.jit(razor.scores_from_probs)(jnp.asarray(p), jnp.asarray(tokens), lengths)
  assert int(n) == int(n2) == 27 + 23
  np.testing.assert_allclose(np.asarray(e).reshape(-1), np.asarray(e2), atol=1e-5)
  np.testing.assert_allclose(np.asarray(f).reshape(-1), np.asarray(f2), atol=1e-5)


def test_model_with_uniform_attention():
  """wq = 0 makes every head attend uniformly: the scores of the whole model are known."""
  cfg = tiny_config(num_layers=2)
  params = random_params(cfg, 0, 0.02)
  params["layers"] = [{**lp, "wq": jnp.zeros_like(lp["wq"])} for lp in params["layers"]]
  tokens = [1] + [9, 4, 30, 17, 60] * 3
  echo, ind, n = razor.razor_scores(params, cfg, np.asarray(tokens), chunk=4)
  ue, uf = uniform_expectation(tokens)
  assert n == 10 and echo.shape == ind.shape == (2, 6)
  np.testing.assert_allclose(echo, ue, rtol=1e-5)
  np.testing.assert_allclose(ind, uf, rtol=1e-5)


def test_selection_rule_and_gates():
  rng = np.random.default_rng(1)
  ind, echo = rng.random((5, 4)), rng.random((5, 4))
  echo[0, 0] = ind[0, 0] = 0.0
  gates, n_ind, n_echo = razor.razor_gates(ind, echo, 0.14, 0.01)
  assert (n_ind, n_echo) == (3, 1)  # ceil(0.14 * 20), ceil(0.01 * 20)
  top = set(np.argsort(-ind.ravel())[:3]) | {int(np.argmax(echo))}
  assert set(np.flatnonzero(gates.ravel() > 0.5)) == top
  pat = HeadPattern(gates, 4, 8, {"selection": {"threshold": 0.5, "strict": True}})
  assert set(np.flatnonzero(pat.mask().as_array().ravel())) == top
  # a sparsity keeps the heads nearest the top of either ranking, scaled together
  keep = pat.binarize(sparsity=0.5).as_array().ravel()
  r_i, r_e = razor._ranks(ind).ravel(), razor._ranks(echo).ravel()
  assert keep.sum() == 10 and keep[np.argmin(r_i)] and keep[np.argmin(r_e)]
  assert not keep[0]  # worst in both
  # ties go to the lower (layer-major) index; fraction 0 disables a criterion
  g, _, _ = razor.razor_gates(np.ones((2, 2)), np.zeros((2, 2)), 0.5, 0.0)
  np.testing.assert_array_equal(g > 0.5, [[True, True], [False, False]])


def test_razor_pattern_on_tiny_model(tmp_path):
  cfg = tiny_config(num_layers=3, max_position_embeddings=256)
  params = random_params(cfg, 0, 0.3)
  pat = razor.razor_pattern(params, cfg, block=20, repeats=3, seed=3, chunk=16, sink=4, recent=8,
                            exclude_ids=[0, 3])
  m = pat.metadata
  assert pat.shape == (3, 2) and m["method"] == "razor" and m["n_scored_queries"] == 40
  q = np.asarray(m["scores"]["induction_q"]).reshape(3, 2, 3)
  np.testing.assert_allclose(np.asarray(m["scores"]["induction"]), q.max(-1))
  assert (m["n_induction"], m["n_echo"]) == (1, 1)
  assert [list(x) for x in np.argwhere(pat.mask().as_array())] == m["retrieval_heads"]
  loaded = HeadPattern.load(pat.save(tmp_path / "p"))
  assert loaded.mask() == pat.mask() and loaded.metadata["scores"]["echo"] == np.asarray(
      m["scores"]["echo"]).tolist()
  ids = razor.sample_block(cfg, 20, 3, [0, 3])
  assert len(set(ids.tolist())) == 20 and not set(ids.tolist()) & {0, 1, 2, 3}
  with pytest.raises(razor.RazorError, match="context"):
    razor.razor_pattern(params, cfg, block=100, repeats=3)
  with pytest.raises(razor.RazorError, match="repeats"):
    razor.razor_pattern(params, cfg, block=10, repeats=1)


def test_cli(tmp_path, capsys):
  from duojax.checkpoint import store
  from duojax.pattern import load_any
  cfg = tiny_config(num_layers=2, max_position_embeddings=256)
  ck = store.save_checkpoint(tmp_path / "ck", cfg, random_params(cfg, 0, 0.02),
                             tiny_hf_tokenizer())
  rc = razor.main(["--ckpt", str(ck), "--out", str(tmp_path / "p"), "--block", "30", "--repeats",
                   "3", "--chunk", "32", "--induction-top", "0.25"])
  assert rc == 0
  pat = load_any(tmp_path / "p")
  assert pat.metadata["n_induction"] == 1 and pat.metadata["settings"]["block"] == 30
  assert razor.main(["--ckpt", str(ck), "--out", str(tmp_path / "q"), "--block", "1"]) == 2
  assert razor.main(["--ckpt", str(ck), "--out", str(tmp_path / "q"), "--echo-top", "2"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("duojax.identify razor: error: --echo-top")


