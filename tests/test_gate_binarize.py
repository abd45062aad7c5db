"""Binarisation equals the official DuoAttention rule; reference-file and threshold guards."""

import math

import numpy as np
import pytest

from duojax.pattern import (REFERENCE_TOLERANCE, HeadPattern, PatternError, n_streaming,
                            read_reference_tsv)

QS = (0.0, 0.1, 0.25, 0.3, 1 / 3, 0.5, 0.7, 0.75, 0.9, 0.95, 1.0)


def _official(gates: np.ndarray, q: float) -> np.ndarray:
  """The official rule as written there: retrieval iff gate >= np.quantile(gates, q)."""
  return gates >= np.quantile(gates, q)


def test_count_equals_np_quantile_for_distinct_gates_n_1_to_300():
  rng = np.random.default_rng(0)
  for n in range(1, 301):
    gates = rng.random(n).astype(np.float32)
    while len(np.unique(gates)) < n:  # distinct, as the official noise makes them
      gates = rng.random(n).astype(np.float32)
    for q in QS:
      want = _official(gates.astype(np.float64), q)
      got = HeadPattern(gates.reshape(1, n), 4, 8).binarize(sparsity=q).as_array()[0]
      np.testing.assert_array_equal(got, want, err_msg=f"N={n} q={q}")
      assert int((~got).sum()) == n_streaming(n, q) == math.ceil(q * (n - 1) - 1e-9)


def test_count_differs_from_round_where_the_issue_found_it():
  # N = 90 (SmolLM2: 30 layers x 3 KV heads): round(q * N) streamed 22 / 68 heads
  assert n_streaming(90, 0.25) == 23 and n_streaming(90, 0.75) == 67
  assert n_streaming(90, 0.5) == 45
  assert n_streaming(11, 0.7) == 7  # 0.7 * 10 = 7.000000000000001 in floats: no extra head


def test_ties_keep_the_count_and_break_by_flat_index():
  """With ties np.quantile's own mask can hold more heads; the official code's noise
  picks some of the tied ones at random. We stream exactly n_streaming, ranked by
  (gate, flat index), which is the official mask for one draw of its noise."""
  rng = np.random.default_rng(1)
  for n in (7, 16, 90, 301):
    gates = (rng.integers(0, 5, size=n) / 4).astype(np.float32)  # many ties
    for q in QS:
      m = HeadPattern(gates.reshape(1, n), 4, 8).binarize(sparsity=q).as_array()[0]
      k = n_streaming(n, q)
      assert int((~m).sum()) == k
      order = np.lexsort((np.arange(n), gates))  # by gate, then flat index
      np.testing.assert_array_equal(np.flatnonzero(~m), np.sort(order[:k]))
      # some draw of tiny noise gives this mask under the official rule
      noisy = gates.astype(np.float64) + 1e-9 * np.argsort(order)  # rank-ordered noise
      np.testing.assert_array_equal(m, _official(noisy, q))


def test_binarize_flat_index_is_layer_major():
  g = np.array([[0.5, 0.5], [0.5, 0.5]], np.float32)
  m = HeadPattern(g, 4, 8).binarize(sparsity=0.5).as_array()  # ceil(1.5) = 2 stream
  assert m.tolist() == [[False, False], [True, True]]


@pytest.mark.parametrize("t", [-0.1, 1.5, 5.0])
def test_threshold_outside_unit_interval_is_an_error(t):
  with pytest.raises(PatternError, match=r"threshold must lie in \[0, 1\]"):
    HeadPattern(np.full((2, 2), 0.5, np.float32), 4, 8).binarize(threshold=t)


def test_threshold_mode_bounds_are_allowed():
  g = np.array([[0.0, 0.4], [1.0, 0.6]], np.float32)
  p = HeadPattern(g, 4, 8)
  assert p.binarize(threshold=0.0).retrieval_fraction == 1.0
  assert p.binarize(threshold=1.0).as_array().tolist() == [[False, False], [True, False]]
  assert p.binarize(threshold=0.5).as_array().tolist() == [[False, False], [True, True]]


def _ref_folder(tmp_path, rows):
  (tmp_path / "full_attention_heads.tsv").write_text(
      "\n".join("\t".join(str(v) for v in r) for r in rows) + "\n")
  (tmp_path / "config.json").write_text('{"sink_size": 128, "recent_size": 256}')
  return tmp_path


@pytest.mark.parametrize("bad, where", [(5.0, "row 2 (layer 1), column 3 (KV head 2)"),
                                        (-3.0, "row 2 (layer 1), column 3 (KV head 2)"),
                                        (1.02, "row 2 (layer 1), column 3 (KV head 2)")])
def test_reference_tsv_far_outside_is_rejected_naming_the_cell(tmp_path, bad, where):
  d = _ref_folder(tmp_path, [[0.1, 0.2, 0.3], [0.4, 0.5, bad]])
  with pytest.raises(PatternError, match="full_attention_heads.tsv") as e:
    HeadPattern.from_reference(d)
  assert where in str(e.value) and f"gate {bad:.6g}," in str(e.value)
  with pytest.raises(PatternError, match="far outside"):
    read_reference_tsv(d / "full_attention_heads.tsv")


def test_reference_tsv_small_negatives_are_clipped(tmp_path):
  # the official files end as low as -0.0014 (Llama-2-7B-32K); 0.01 is the tolerance
  assert REFERENCE_TOLERANCE == 0.01
  d = _ref_folder(tmp_path, [[-0.0014, 0.2, 1.0], [0.4, 1.0 + 0.009, -0.0099]])
  p = HeadPattern.from_reference(d)
  assert p.gates.min() == 0.0 and p.gates.max() == 1.0
  assert p.metadata["n_clipped"] == 3
