"""infer/kernel_resources.py: the Triton kernels compiled for sm_90 on this machine (no GPU:
triton's bundled ptxas), their registers and spills read back from the cubin."""

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install triton)")


def test_resources_of_a_decode_kernel():
  from infer import kernel_resources as kr
  r = kr.resources("full_decode", 4, None, 90)
  assert 32 <= r["reg"] <= 255 and r["stack"] >= 0, r
  assert r["F16C"] == 1 | 2 | 4  # int4 defaults: fp16 codes, keys and values as nibble halves
  off = kr.resources("full_decode", 4, {"f16_codes": False}, 90)
  assert off["F16C"] == 0


def test_decode_write_kernels_compile():
  """decode_write's two launches (the split kernel with NEW, the combine that writes the
  token in place) compile for sm_90: the interpreter does not type-check a branch."""
  from infer import kernel_resources as kr
  for kind, bits in (("duo_decode_new", (8, 4)), ("combine_write", 4), ("combine_write", 0)):
    r = kr.resources(kind, bits, None, 90)
    assert 16 <= r["reg"] <= 255, (kind, bits, r)


def test_cli_writes_table_and_refuses_bad_input(tmp_path, capsys):
  from infer import kernel_resources as kr
  kr.main(["--out", str(tmp_path), "--kinds", "duo_decode", "--kv-dtype", "k8v4"])
  table = (tmp_path / "kernel_resources.md").read_text()
  assert "| duo_decode | k8v4 | default |" in table
  with pytest.raises(SystemExit, match="--kinds"):
    kr.main(["--out", str(tmp_path), "--kinds", "decode"])
  with pytest.raises(SystemExit, match="--kv-dtype"):
    kr.main(["--out", str(tmp_path), "--kv-dtype", "int3"])
  with pytest.raises(SystemExit, match="--variants"):
    kr.main(["--out", str(tmp_path), "--variants", "{}"])
