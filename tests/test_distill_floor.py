"""train/distill_floor.py's helpers: the gate settings it compares and the cosine of two
gradients (the model runs are on the device / by hand; see the script's docstring)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import distill_floor as dfl  # noqa: E402

PATTERN = Path(__file__).resolve().parents[1] / "duojax" / "patterns" / "smollm2-135m"


def test_settings_and_the_trained_gates():
  g = dfl.gate_settings((30, 3), str(PATTERN), ["0.998", "trained"])
  assert set(g) == {"0.998", "trained"}
  assert np.all(g["0.998"] == np.float32(0.998)) and g["0.998"].shape == (30, 3)
  want = np.clip(np.loadtxt(PATTERN / "full_attention_heads.tsv"), 0, 1)
  np.testing.assert_array_equal(g["trained"], want.astype(np.float32))
  with pytest.raises(SystemExit, match="shape"):
    dfl.gate_settings((24, 2), str(PATTERN), ["trained"])


def test_cosine():
  assert dfl.cosine([1, 0], [2, 0]) == pytest.approx(1.0)
  assert dfl.cosine([1, 0], [0, 3]) == pytest.approx(0.0)
  assert dfl.cosine([1, 2], [-1, -2]) == pytest.approx(-1.0)
  assert np.isnan(dfl.cosine([0, 0], [1, 0]))
