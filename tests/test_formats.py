"""Importers: retrieval-head score files and MoA plans."""

import json
from pathlib import Path

import numpy as np
import pytest

from duojax.identify.formats import (load_moa_plan, load_retrieval_scores,
                                     max_over_groups, moa_to_pattern,
                                     moa_windows, retrieval_score_pattern)
from duojax.pattern import HeadPattern, PatternError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SCORES = DATA / "retrieval_head_scores"
MOA = DATA / "moa_plans"
# file name -> KV heads of the model it scores
SCORE_FILES = {"Mistral-7B-v0.2-hf.json": 8, "llama-2-7b-80k.json": 32}
MOA_FILES = {
    "gradientai--Llama-3-8B-Instruct-262k": (32, 32),
    "meta-llama--Llama-3.2-1B-Instruct": (16, 32),
}

needs_data = pytest.mark.skipif(
    not (SCORES.is_dir() and MOA.is_dir()),
    reason=f"shared data not found at {DATA} (CI keeps it beside the clone)")


@pytest.fixture(scope="module")
def raw_scores():
  return {name: json.loads((SCORES / name).read_text()) for name in SCORE_FILES}


def _write(tmp_path, obj, name="f.json"):
  p = tmp_path / name
  p.write_text(json.dumps(obj))
  return p


# --- retrieval-head scores ----------------------------------------------------------

@needs_data
@pytest.mark.parametrize("name", SCORE_FILES)
def test_scores_shape_and_count_above_threshold(name, raw_scores):
  scores = load_retrieval_scores(SCORES / name)
  assert scores.shape == (32, 32) and scores.dtype == np.float32
  raw = raw_scores[name]
  independent = sum(1 for v in raw.values() if sum(v) / len(v) > 0.1)
  assert int((scores > 0.1).sum()) == independent
  assert independent == {"Mistral-7B-v0.2-hf.json": 43, "llama-2-7b-80k.json": 33}[name]
  assert scores[3, 5] == np.float32(np.mean(raw["3-5"]))


@needs_data
@pytest.mark.parametrize("name", SCORE_FILES)
def test_score_pattern_matches_paper_rule(name, raw_scores):
  hkv = SCORE_FILES[name]
  p = retrieval_score_pattern(SCORES / name, hkv)
  assert p.shape == (32, hkv)
  assert p.metadata["method"] == "retrieval_score"
  assert p.metadata["selection"] == {"threshold": 0.1, "strict": True}
  # Independently: a KV head retrieves if any query head of its group scores > 0.1.
  group = 32 // hkv
  want = np.zeros((32, hkv), bool)
  for key, v in raw_scores[name].items():
    layer, head = map(int, key.split("-"))
    if sum(v) / len(v) > 0.1:
      want[layer, head // group] = True
  np.testing.assert_array_equal(p.mask().as_array(), want)
  np.testing.assert_array_equal(p.binarize(threshold=0.1, strict=True).as_array(), want)
  assert p.gates.min() >= 0 and p.gates.max() <= 1


@needs_data
def test_score_pattern_sparsity_mode_and_save(tmp_path):
  p = retrieval_score_pattern(SCORES / "llama-2-7b-80k.json", 32, sparsity=0.75,
                              sink=64, recent=256)
  m = p.mask()
  assert int((~m.as_array()).sum()) == round(0.75 * 32 * 32)
  assert (m.sink, m.recent) == (64, 256)
  p.save(tmp_path)
  assert HeadPattern.load(tmp_path).mask() == m


def test_kv_reduction_by_max(tmp_path):
  scores_q = np.array([[0.0, 0.3, 0.2, 0.05],
                       [0.7, 0.1, 0.0, 0.0]])
  np.testing.assert_array_equal(max_over_groups(scores_q, 2), [[0.3, 0.2], [0.7, 0.0]])
  np.testing.assert_array_equal(max_over_groups(scores_q, 4), scores_q)
  np.testing.assert_array_equal(max_over_groups(scores_q, 1), [[0.3], [0.7]])
  # Through a file, with the mean over tests first: head 0-1 = mean(0.2, 0.4).
  f = _write(tmp_path, {"0-0": [0, 0], "0-1": [0.2, 0.4], "0-2": [0.1, 0.1], "0-3": [0.0, 0.1],
                        "1-0": [1, 0.4], "1-1": [0, 0], "1-2": [0, 0], "1-3": [0, 0.1]})
  p = retrieval_score_pattern(f, 2)
  np.testing.assert_allclose(p.gates, [[0.3, 0.1], [0.7, 0.05]], rtol=1e-6)
  # 0-2's group has max exactly 0.1: not > 0.1, so streaming.
  assert p.mask().as_array().tolist() == [[True, False], [True, False]]
  assert load_retrieval_scores(f, num_kv_heads=2).shape == (2, 4)


def test_strict_threshold_survives_float32_rounding(tmp_path):
  t32 = float(np.float32(0.1))  # 0.10000000149...
  # 0.1 is not > 0.1, but float32(0.1) is; t32 + 1e-12 is > t32 but rounds to it.
  f = _write(tmp_path, {"0-0": [0.1], "0-1": [0.5]})
  assert retrieval_score_pattern(f, 2, threshold=0.1).mask().as_array().tolist() == [[False, True]]
  f = _write(tmp_path, {"0-0": [t32 + 1e-12], "0-1": [t32]})
  p = retrieval_score_pattern(f, 2, threshold=t32)
  assert p.mask().as_array().tolist() == [[True, False]]
  assert abs(float(p.gates[0, 0]) - t32) < 1e-8  # nudged by one ulp only


def test_score_file_errors(tmp_path):
  with pytest.raises(PatternError, match="lacks"):
    load_retrieval_scores(_write(tmp_path, {"0-0": [0.1], "1-1": [0.2]}))
  with pytest.raises(PatternError, match="layer-head"):
    load_retrieval_scores(_write(tmp_path, {"zero": [0.1]}))
  with pytest.raises(PatternError, match="no scores"):
    load_retrieval_scores(_write(tmp_path, {"0-0": []}))
  with pytest.raises(PatternError, match="does not exist"):
    load_retrieval_scores(tmp_path / "missing.json")
  f = _write(tmp_path, {f"0-{h}": [0.2] for h in range(6)})
  with pytest.raises(PatternError, match="num_kv_heads"):
    load_retrieval_scores(f, num_kv_heads=4)
  with pytest.raises(PatternError, match="num_kv_heads"):
    load_retrieval_scores(f, num_kv_heads=2, group_size=2)
  with pytest.raises(PatternError, match="not both"):
    retrieval_score_pattern(f, 2, threshold=0.1, sparsity=0.5)
  with pytest.raises(PatternError, match="sparsity"):
    retrieval_score_pattern(f, 2, sparsity=1.5)


# --- MoA plans --------------------------------------------------------------------

@needs_data
@pytest.mark.parametrize("name", MOA_FILES)
def test_moa_plan_shapes_and_windows(name):
  path = MOA / name / "moa_alpha_beta.json"
  alphas, betas = load_moa_plan(path)
  assert alphas.shape == betas.shape == MOA_FILES[name]
  for n in (1024, 8192, 32768):
    w = moa_windows(path, n)
    assert w.dtype == np.int64 and w.shape == alphas.shape
    assert w.min() >= 0 and w.max() <= n
    np.testing.assert_array_equal(w, np.clip(np.floor(alphas + betas * n), 0, n))
  # What the files hold: no head covers the whole context at long lengths.
  assert (moa_windows(path, 16384) == 16384).sum() == 0


@needs_data
@pytest.mark.parametrize("name", MOA_FILES)
@pytest.mark.parametrize("n", [1024, 8192, 32768])
def test_real_moa_plans_cannot_be_served_faithfully(name, n):
  with pytest.raises(PatternError, match="per-head window sizes are not supported") as e:
    moa_to_pattern(MOA / name / "moa_alpha_beta.json", n, sink=64, recent=256,
                   num_kv_heads=8)
  assert "0-0 (" in str(e.value)  # names the offending heads


def test_moa_to_pattern_two_kinds(tmp_path):
  n, sink, recent = 4096, 64, 256
  # layer 0: heads 0-1 full (beta = 1), heads 2-3 streaming (fixed 320 window);
  # layer 1: all streaming; layer 2: full by a large constant alpha.
  plan = {"alphas": [[0, 0, 320, 320], [320] * 4, [8192] * 4],
          "betas": [[1, 1, 0, 0], [0] * 4, [0] * 4]}
  f = _write(tmp_path, plan)
  p = moa_to_pattern(f, n, sink=sink, recent=recent)
  assert p.shape == (3, 4) and (p.sink, p.recent) == (sink, recent)
  want = [[True, True, False, False], [False] * 4, [True] * 4]
  assert p.mask().as_array().tolist() == want
  # GQA: groups of two query heads agree, so 2 KV heads per layer.
  g = moa_to_pattern(f, n, sink=sink, recent=recent, num_kv_heads=2)
  assert g.mask().as_array().tolist() == [[True, False], [False, False], [True, True]]
  # Groups that mix full and streaming query heads cannot become one KV head.
  mixed = _write(tmp_path, {"alphas": [[0, 320, 0, 320]], "betas": [[1, 0, 1, 0]]}, "m.json")
  with pytest.raises(PatternError, match="GQA groups"):
    moa_to_pattern(mixed, n, sink=sink, recent=recent, num_kv_heads=2)
  # An intermediate window is refused and named.
  odd = _write(tmp_path, {"alphas": [[0, 320]], "betas": [[1, 0.5]]}, "o.json")
  with pytest.raises(PatternError, match=r"0-1 \(2368\)"):
    moa_to_pattern(odd, n, sink=sink, recent=recent)


def test_moa_plan_errors(tmp_path):
  with pytest.raises(PatternError, match="alphas"):
    load_moa_plan(_write(tmp_path, {"alphas": [[0, 1]]}))
  with pytest.raises(PatternError, match="same"):
    load_moa_plan(_write(tmp_path, {"alphas": [[0, 1]], "betas": [[0, 1, 2]]}))
  with pytest.raises(PatternError, match="context_len"):
    moa_windows(_write(tmp_path, {"alphas": [[0]], "betas": [[1]]}), 0)
