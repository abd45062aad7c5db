"""Bad input gets one clear line that names the fix (no traceback wall)."""

import json

import numpy as np
import pytest

from duojax import convert, infer


def _run(main, argv, capsys):
  code = main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  return code, (err[-1] if err else "")


def test_missing_checkpoint_folder(tmp_path, capsys):
  code, err = _run(infer.main, ["--ckpt", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
  assert code == 2 and "duojax.convert" in err and "Traceback" not in err


def test_half_written_checkpoint(tmp_path, capsys):
  (tmp_path / "params").mkdir()
  (tmp_path / "model.json").write_text("{}")
  code, err = _run(infer.main, ["--ckpt", str(tmp_path), "--prompt", "hi"], capsys)
  assert code == 2 and "interrupted" in err and "convert again" in err


def test_unsupported_architecture(tmp_path, capsys):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
  code, err = _run(convert.main, ["--hf", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
  assert code == 2 and "not supported" in err and "LlamaForCausalLM" in err


def _write_gguf(path, arch="llama", qtype=None):
  import gguf
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(1)
  w.add_context_length(64)
  w.add_embedding_length(8)
  w.add_feed_forward_length(16)
  w.add_head_count(2)
  w.add_head_count_kv(1)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(4)
  qtype = qtype or gguf.GGMLQuantizationType.Q8_1
  block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
  w.add_tensor("token_embd.weight", np.zeros((4, nbytes), np.uint8), raw_dtype=qtype)
  for n in ("attn_norm", "ffn_norm"):
    w.add_tensor(f"blk.0.{n}.weight", np.ones(8, np.float32))
  w.add_tensor("output_norm.weight", np.ones(8, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_of_unknown_quantisation(tmp_path, capsys):
  pytest.importorskip("gguf")
  p = tmp_path / "m.gguf"
  _write_gguf(p)
  code, err = _run(convert.main, ["--gguf", str(p), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
  assert code == 2 and "Q8_1" in err and "quantisation" in err


def test_gguf_of_unsupported_architecture(tmp_path, capsys):
  pytest.importorskip("gguf")
  p = tmp_path / "m.gguf"
  _write_gguf(p, arch="gpt2")
  code, err = _run(convert.main, ["--gguf", str(p), "--out", str(tmp_path / "o")], capsys)
  assert code == 2 and "not supported" in err


def test_truncated_gguf(tmp_path, capsys):
  p = tmp_path / "m.gguf"
  p.write_bytes(b"GGUF\x03\x00")
  code, err = _run(convert.main, ["--gguf", str(p), "--out", str(tmp_path / "o")], capsys)
  assert code == 2 and "re-download" in err


@pytest.mark.slow
def test_prompt_longer_than_context(smollm2_dir, tmp_path, capsys):
  f = tmp_path / "long.txt"
  f.write_text("hello " * 9000)
  code, err = _run(infer.main, ["--ckpt", str(smollm2_dir), "--prompt-file", str(f),
                                "--attention", "full"], capsys)
  assert code == 2 and "exceeds the model's context of 8192" in err and "shorten" in err


@pytest.mark.slow
def test_pattern_not_fitting_the_model(smollm2_dir, tmp_path, capsys):
  from duojax.pattern import HeadPattern
  HeadPattern(np.ones((4, 2), np.float32), 64, 256).save(tmp_path / "p")
  code, err = _run(infer.main, ["--ckpt", str(smollm2_dir), "--prompt", "hi", "--pattern",
                                str(tmp_path / "p")], capsys)
  assert code == 2 and "30" in err and "4" in err
