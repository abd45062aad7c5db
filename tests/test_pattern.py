"""HeadPattern / HeadMask: binarisation, file formats, validation."""

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duojax.pattern import (HeadMask, HeadPattern, PatternError, load_any,
                            random_pattern, read_reference_tsv)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PATTERNS = DATA / "duo_attention_patterns"
REFERENCE_DIRS = sorted(p for p in PATTERNS.iterdir() if p.is_dir()) if PATTERNS.is_dir() else []

needs_data = pytest.mark.skipif(
    not REFERENCE_DIRS, reason=f"shared data not found at {PATTERNS} (CI keeps it beside the clone)")


def _ids(dirs):
  return [d.name for d in dirs]


# --- reference folders ---------------------------------------------------------

@needs_data
def test_six_reference_folders_present():
  assert len(REFERENCE_DIRS) == 6


@needs_data
@pytest.mark.parametrize("folder", REFERENCE_DIRS, ids=_ids(REFERENCE_DIRS))
def test_reference_import_shape_and_clip(folder):
  p = HeadPattern.from_reference(folder)
  want_heads = 32 if "Llama-2" in folder.name else 8
  assert p.shape == (32, want_heads)
  assert p.gates.dtype == np.float32
  assert (p.sink, p.recent) == (128, 256)
  raw = read_reference_tsv(folder / "full_attention_heads.tsv")
  assert raw.shape == p.shape
  np.testing.assert_array_equal(p.gates, np.clip(raw, 0, 1))
  assert p.gates.min() >= 0.0 and p.gates.max() <= 1.0
  assert p.metadata["n_clipped"] == int((raw < 0).sum() + (raw > 1).sum())
  assert p.metadata["method"] == "import"
  assert p.metadata["reference_config"]["sink_size"] == 128


@needs_data
def test_reference_files_have_negatives_that_get_clipped():
  # Trained gates end slightly below zero; all but Llama-3.1's file show it.
  with_neg = 0
  for folder in REFERENCE_DIRS:
    raw = read_reference_tsv(folder / "full_attention_heads.tsv")
    if raw.min() < 0:
      with_neg += 1
      assert HeadPattern.from_reference(folder).gates.min() == 0.0
  assert with_neg >= 5


@needs_data
@pytest.mark.parametrize("folder", REFERENCE_DIRS, ids=_ids(REFERENCE_DIRS))
@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_reference_binarize_counts(folder, sparsity):
  p = HeadPattern.from_reference(folder)
  m = p.binarize(sparsity=sparsity)
  keep = m.as_array()
  n = keep.size
  # the official rule: retrieval iff gate >= np.quantile(gates, sparsity)
  assert int((~keep).sum()) == math.ceil(sparsity * (n - 1))
  if len(np.unique(p.gates)) == n:
    np.testing.assert_array_equal(keep, p.gates >= np.quantile(p.gates, sparsity))
  # Every streaming gate is <= every retrieval gate.
  assert p.gates[~keep].max() <= p.gates[keep].min()
  m.check_fits(*p.shape)


@needs_data
@pytest.mark.parametrize("folder", REFERENCE_DIRS, ids=_ids(REFERENCE_DIRS))
def test_reference_export_reimport_identical(folder, tmp_path):
  p = HeadPattern.from_reference(folder)
  p.to_reference(tmp_path / "out")
  q = HeadPattern.from_reference(tmp_path / "out")
  assert q.gates.tobytes() == p.gates.tobytes()
  assert (q.sink, q.recent) == (p.sink, p.recent)
  cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert cfg["model_name"] == p.metadata["model_name"]
  assert cfg["num_steps"] == 2000  # the rest of the reference config survives


def test_export_keeps_arbitrary_float32_values(tmp_path):
  rng = np.random.default_rng(0)
  gates = rng.random((5, 7), dtype=np.float32)
  gates[0, :3] = [0.0, 1.0, np.nextafter(np.float32(0), np.float32(1))]
  HeadPattern(gates, 64, 256).to_reference(tmp_path)
  assert HeadPattern.from_reference(tmp_path).gates.tobytes() == gates.tobytes()


# --- our format ----------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
  gates = np.random.default_rng(1).random((4, 3), dtype=np.float32)
  meta = {"model_name": "tiny", "method": "duo", "seed": 7,
          "data": {"haystack": "paul_graham", "steps": 10}, "sparsity": 0.5,
          "raw": np.arange(3, dtype=np.float32)}
  p = HeadPattern(gates, 64, 200, meta)
  p.save(tmp_path / "pat")
  q = HeadPattern.load(tmp_path / "pat")
  assert q.gates.tobytes() == gates.tobytes()
  assert (q.sink, q.recent) == (64, 200)
  assert q.metadata["data"] == meta["data"]
  assert q.metadata["raw"] == [0.0, 1.0, 2.0]  # numpy extras come back as lists
  assert {k: q.metadata[k] for k in ("model_name", "method", "seed", "sparsity")} == {
      "model_name": "tiny", "method": "duo", "seed": 7, "sparsity": 0.5}
  doc = json.loads((tmp_path / "pat" / "pattern.json").read_text())
  assert doc["format_version"] == 1 and doc["shape"] == [4, 3]
  # The same folder is a reference folder too.
  r = HeadPattern.from_reference(tmp_path / "pat")
  assert r.gates.tobytes() == gates.tobytes() and (r.sink, r.recent) == (64, 200)
  assert load_any(tmp_path / "pat").metadata["method"] == "duo"


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
  HeadPattern(np.zeros((2, 2)), 1, 1).save(tmp_path)
  with pytest.raises(PatternError, match="overwrite=True"):
    HeadPattern(np.ones((2, 2)), 1, 1).save(tmp_path)
  HeadPattern(np.ones((2, 2)), 1, 1).save(tmp_path, overwrite=True)
  assert HeadPattern.load(tmp_path).gates.min() == 1.0


@needs_data
def test_load_any_picks_the_format(tmp_path):
  assert load_any(REFERENCE_DIRS[0]).metadata["source_format"] == "duo_attention"
  with pytest.raises(PatternError, match="no head pattern"):
    load_any(tmp_path)


def test_half_written_folders(tmp_path):
  p = HeadPattern(np.full((2, 3), 0.5), 4, 8)
  a = p.save(tmp_path / "a")
  shutil.rmtree(a / "gates")
  with pytest.raises(PatternError, match="gates/ is missing"):
    HeadPattern.load(a)
  with pytest.raises(PatternError, match="gates/ is missing"):
    load_any(a)
  b = p.save(tmp_path / "b")
  (b / "pattern.json").unlink()
  # The reference TSV is still there, but an unfinished save must not pass as one.
  with pytest.raises(PatternError, match="pattern.json is missing"):
    load_any(b)
  with pytest.raises(PatternError, match="does not exist"):
    HeadPattern.load(tmp_path / "nowhere")
  c = p.save(tmp_path / "c")
  (c / "pattern.json").write_text("{not json")
  with pytest.raises(PatternError, match="JSON"):
    HeadPattern.load(c)


def test_reference_folder_missing_files(tmp_path):
  (tmp_path / "full_attention_heads.tsv").write_text("0.5\t0.5\n")
  with pytest.raises(PatternError, match="config.json"):
    HeadPattern.from_reference(tmp_path)
  (tmp_path / "config.json").write_text('{"sink_size": 64}')
  with pytest.raises(PatternError, match="recent_size"):
    HeadPattern.from_reference(tmp_path)
  (tmp_path / "full_attention_heads.tsv").write_text("0.5\tnan\n")
  (tmp_path / "config.json").write_text('{"sink_size": 64, "recent_size": 8}')
  with pytest.raises(PatternError, match="NaN"):
    HeadPattern.from_reference(tmp_path)
  (tmp_path / "full_attention_heads.tsv").write_text("0.5\t0.1\n0.3\n")
  with pytest.raises(PatternError, match="lengths"):
    HeadPattern.from_reference(tmp_path)


# --- binarisation ------------------------------------------------------------------

TIES = np.array([[0.5, 0.2, 0.5],
                 [0.2, 0.5, 0.9]], np.float32)


def test_tie_break_lower_flat_index_streams_first():
  p = HeadPattern(TIES, 4, 8)
  # Ascending by (gate, flat index): (0,1) (1,0) (0,0) (0,2) (1,1) (1,2).
  assert p.binarize(sparsity=0.5).as_array().tolist() == [[False, False, True],
                                                          [False, True, True]]
  assert p.binarize(sparsity=4 / 6).as_array().tolist() == [[False, False, False],
                                                            [False, True, True]]
  assert p.binarize(sparsity=1 / 6).as_array().tolist() == [[True, False, True],
                                                            [True, True, True]]


def test_streaming_count_is_the_official_quantile_count():
  p = HeadPattern(np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3), 4, 8)
  assert (~p.binarize(sparsity=0.25).as_array()).sum() == 2  # ceil(0.25 * 5) = 2
  assert (~p.binarize(sparsity=0.75).as_array()).sum() == 4  # ceil(3.75) = 4
  assert (~p.binarize(sparsity=0.5).as_array()).sum() == 3  # ceil(2.5) = 3
  assert p.binarize(sparsity=0.0).retrieval_fraction == 1.0
  # gate >= quantile(gates, 1) = max keeps the top head, as the official rule does
  assert p.binarize(sparsity=1.0).retrieval_fraction == 1 / 6


def test_binarize_is_deterministic():
  rng = np.random.default_rng(3)
  gates = rng.integers(0, 4, size=(16, 8)).astype(np.float32) / 4  # many ties
  p = HeadPattern(gates, 4, 8)
  masks = {p.binarize(sparsity=0.4) for _ in range(5)}
  assert len(masks) == 1
  again = HeadPattern(gates.copy(), 4, 8).binarize(sparsity=0.4)
  assert again == next(iter(masks))


def test_threshold_mode():
  p = HeadPattern(TIES, 4, 8)
  assert p.binarize(threshold=0.5).as_array().tolist() == [[True, False, True],
                                                           [False, True, True]]
  assert p.binarize(threshold=0.5, strict=True).as_array().tolist() == [
      [False, False, False], [False, False, True]]


def test_mask_uses_recorded_selection():
  assert HeadPattern(TIES, 4, 8, {"selection": {"sparsity": 0.5}}).mask() == \
      HeadPattern(TIES, 4, 8).binarize(sparsity=0.5)
  with pytest.raises(PatternError, match="selection"):
    HeadPattern(TIES, 4, 8).mask()


@pytest.mark.parametrize("kwargs, word", [
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=1.1), "sparsity"),
    (dict(sparsity=float("nan")), "finite"),
    (dict(), "exactly one"),
    (dict(sparsity=0.5, threshold=0.5), "exactly one"),
    (dict(threshold=float("inf")), "finite"),
])
def test_binarize_bad_arguments(kwargs, word):
  with pytest.raises(PatternError, match=word):
    HeadPattern(TIES, 4, 8).binarize(**kwargs)


# --- HeadMask --------------------------------------------------------------------

def test_head_mask_hashable_and_equal():
  a = HeadMask.from_array(TIES >= 0.5, 4, 8)
  b = HeadMask(((True, False, True), (False, True, True)), 4, 8)
  c = HeadMask([[np.True_, False, True], [False, True, True]], 4, 8)
  assert a == b == c and hash(a) == hash(b) == hash(c)
  assert len({a, b, c}) == 1
  assert a != HeadMask.from_array(TIES >= 0.5, 4, 9)

  calls = []

  def f(x, mask):
    calls.append(mask)
    return x * mask.n_retrieval(0)

  g = jax.jit(f, static_argnums=1)
  assert float(g(jnp.float32(1), a)) == 2.0
  g(jnp.float32(1), b)
  assert len(calls) == 1  # equal masks reuse the compiled function


def test_order_and_inverse_order():
  m = HeadMask.from_array(np.array([[0, 1, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]), 4, 8)
  assert m.order(0) == (1, 3, 4, 0, 2)
  assert m.order(1) == (0, 1, 2, 3, 4) and m.order(2) == (0, 1, 2, 3, 4)
  for layer in range(m.num_layers):
    order, inv = np.array(m.order(layer)), np.array(m.inverse_order(layer))
    assert sorted(order.tolist()) == list(range(5))
    np.testing.assert_array_equal(order[inv], np.arange(5))
    np.testing.assert_array_equal(inv[order], np.arange(5))
    k = m.n_retrieval(layer)
    assert all(m.retrieval[layer][h] for h in order[:k])
    assert not any(m.retrieval[layer][h] for h in order[k:])
  heads = np.arange(5) * 10
  np.testing.assert_array_equal(heads[np.array(m.order(0))][np.array(m.inverse_order(0))], heads)


def test_head_mask_properties_and_constructors():
  m = HeadMask.all_retrieval(3, 4, 64, 256)
  assert (m.num_layers, m.num_kv_heads, m.retrieval_fraction) == (3, 4, 1.0)
  assert m.as_array().dtype == np.bool_ and m.as_array().all()
  s = HeadMask.all_streaming(3, 4, 64, 256)
  assert s.retrieval_fraction == 0.0 and s.n_retrieval(2) == 0
  assert HeadMask.from_array([[1, 0], [0, 0]], 1, 1).retrieval_fraction == 0.25


def test_check_fits_names_both_shapes():
  m = HeadMask.all_retrieval(32, 8, 64, 256)
  m.check_fits(32, 8)
  with pytest.raises(PatternError, match=r"L=32, Hkv=8.*L=30, Hkv=3"):
    m.check_fits(30, 3)


@pytest.mark.parametrize("sink, recent, word", [
    (0, 0, "sink \\+ recent"), (-1, 5, "sink"), (4, -2, "recent"), (1.5, 4, "int")])
def test_bad_window(sink, recent, word):
  with pytest.raises(PatternError, match=word):
    HeadMask.all_streaming(2, 2, sink, recent)
  with pytest.raises(PatternError, match=word):
    HeadPattern(np.zeros((2, 2)), sink, recent)


def test_head_mask_bad_shapes():
  with pytest.raises(PatternError, match="same non-zero length"):
    HeadMask(((True,), (True, False)), 1, 1)
  with pytest.raises(PatternError, match="bool"):
    HeadMask(((1, 0),), 1, 1)
  with pytest.raises(PatternError, match="0/1"):
    HeadMask.from_array([[0.5, 1]], 1, 1)


# --- HeadPattern validation ----------------------------------------------------------

def test_gates_validation():
  bad = np.full((2, 2), 0.5, np.float32)
  bad[1, 0] = np.nan
  with pytest.raises(PatternError, match="non-finite"):
    HeadPattern(bad, 4, 8)
  with pytest.raises(PatternError, match="2-D"):
    HeadPattern(np.zeros(4), 4, 8)
  with pytest.raises(PatternError, match="clip=True"):
    HeadPattern(np.array([[-0.01, 0.5]]), 4, 8)
  p = HeadPattern(np.array([[-0.01, 1.5]]), 4, 8, clip=True)
  np.testing.assert_array_equal(p.gates, [[0.0, 1.0]])
  with pytest.raises(ValueError):
    p.gates[0, 0] = 0.3  # read-only: a HeadPattern does not change under you


def test_with_settings_copies():
  p = HeadPattern(TIES, 128, 256, {"model_name": "m", "data": {"a": 1}})
  q = p.with_settings(sink=64)
  assert (q.sink, q.recent) == (64, 256) and (p.sink, p.recent) == (128, 256)
  q.metadata["data"]["a"] = 2
  assert p.metadata["data"]["a"] == 1
  np.testing.assert_array_equal(q.gates, p.gates)
  assert q.binarize(sparsity=0.5).sink == 64


def test_random_pattern_seeded():
  a, b = random_pattern(4, 3, seed=0), random_pattern(4, 3, seed=0)
  assert a.gates.tobytes() == b.gates.tobytes()
  assert a.gates.tobytes() != random_pattern(4, 3, seed=1).gates.tobytes()
  assert a.shape == (4, 3) and a.gates.min() >= 0 and a.gates.max() < 1
  assert a.metadata == {"method": "random", "seed": 0}
