"""Shared fixtures: the real SmolLM2 checkpoint (converted once per session)."""

import os
from pathlib import Path

# `pytest -k gpu -n 8` runs 8 processes on one GPU: none may take 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"



@pytest.fixture(scope="session")
def duojax_home(tmp_path_factory):
  home = os.environ.get("DUOJAX_HOME") or str(tmp_path_factory.mktemp("duojax_home"))
  os.environ["DUOJAX_HOME"] = home
  return Path(home)


@pytest.fixture(scope="session")
def smollm2_dir(duojax_home):
  """The embedded SmolLM2-135M-Instruct, converted into DUOJAX_HOME."""
  from duojax.checkpoint.embedded import embedded_gguf, resolve_checkpoint
  from duojax.checkpoint.hf import CheckpointError
  try:
    embedded_gguf("smollm2-135m")
  except CheckpointError as e:
    pytest.skip(str(e))
  return resolve_checkpoint("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
  from duojax.checkpoint import store
  return (store.load_config(smollm2_dir), store.load_params(smollm2_dir),
          store.load_tokenizer(smollm2_dir))


@pytest.fixture(scope="session")
def essays_text():
  d = SHARED_DATA / "paul_graham_essays"
  if not d.is_dir():
    pytest.skip(f"{d} not found (CI keeps shared/ beside the clone)")
  return "\n\n".join(p.read_text() for p in sorted(d.glob("*.txt")))
