"""`python -m duojax.infer` with bad input: one clear line naming the fix, before any model
loads; and windows larger than a run can use are capped (same result, smaller cache)."""

import json

import numpy as np
import pytest

from duojax import infer
from duojax.checkpoint import store




def _err(argv, capsys):
  code = infer.main(argv)
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = [l for l in err.strip().splitlines() if l.startswith("duojax.infer: error")]
  return code, (lines[-1] if lines else err)


@pytest.mark.parametrize("flags,words", [
    (["--temperature", "nan"], ["--temperature", "finite"]),
    (["--temperature", "-0.5"], ["--temperature", ">= 0"]),
    (["--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    (["--top-p", "nan"], ["--top-p", "finite"]),
    (["--threshold", "2"], ["--threshold", "[0, 1]"]),
    (["--threshold", "-0.1"], ["--threshold", "[0, 1]"]),
    (["--sparsity", "1"], ["--sparsity", "[0, 1)", "--attention streaming"]),
    (["--sparsity", "-0.5"], ["--sparsity", "[0, 1)"]),
    (["--sink", "-1"], ["--sink", ">= 0"]),
    (["--recent", "0"], ["--recent", ">= 1"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    (["--prefill-chunk", "0"], ["--prefill-chunk", ">= 1"]),
    (["--attention", "full", "--compensation"], ["--compensation", "streaming"]),
    (["--attention", "full", "--sparsity", "0.5"], ["--attention full", "takes neither"]),
])
def test_bad_values_fail_before_loading(flags, words, no_model, capsys):
  code, err = _err(["--prompt", "hi", *flags], capsys)
  assert code == 2, err
  for w in words:
    assert w in err, (w, err)


def test_prompt_file_missing_binary_or_empty(tmp_path, no_model, capsys):
  code, err = _err(["--prompt-file", str(tmp_path / "nope.txt")], capsys)
  assert code == 2 and "--prompt-file" in err and "nope.txt" in err and "not found" in err
  b = tmp_path / "blob.bin"
  b.write_bytes(bytes(range(256)) * 4)
  code, err = _err(["--prompt-file", str(b)], capsys)
  assert code == 2 and "--prompt-file" in err and "blob.bin" in err and "UTF-8" in err
  z = tmp_path / "zeros.txt"
  z.write_bytes(b"abc\x00\x00def")
  code, err = _err(["--prompt-file", str(z)], capsys)
  assert code == 2 and "zeros.txt" in err and "binary" in err
  e = tmp_path / "empty.txt"
  e.write_text("  \n")
  code, err = _err(["--prompt-file", str(e)], capsys)
  assert code == 2 and "empty" in err
  code, err = _err(["--prompt-file", str(tmp_path)], capsys)
  assert code == 2 and "folder" in err


def test_backend_gpu_without_gpu(no_model, capsys):
  import jax
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  code, err = _err(["--prompt", "hi", "--backend", "gpu"], capsys)
  assert code == 2 and "needs an NVIDIA GPU" in err and "--backend auto" in err
  assert err.index("GPU") < (err.find("triton") if "triton" in err else len(err))
  code, err = _err(["--prompt", "hi", "--backend", "cuda"], capsys)
  assert code == 2 and "unknown attention backend" in err


# -- folders that are not checkpoints ---------------------------------------------------------

def _hf_folder(d):
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
  (d / "model.safetensors").write_bytes(b"\0" * 16)
  return d


@pytest.mark.parametrize("kind", ["hf", "pattern", "repo", "gguf-folder", "gguf-file", "other"])
def test_ckpt_that_is_not_a_checkpoint(kind, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(store, "load_params", lambda *a, **k: pytest.fail("loaded"))
  d = tmp_path / "thing"
  if kind == "hf":
    _hf_folder(d)
  elif kind == "pattern":
    d.mkdir()
    (d / "full_attention_heads.tsv").write_text("1\t0\n")
    (d / "config.json").write_text("{}")
  elif kind == "repo":
    d.mkdir()
    (d / ".git").mkdir()
    (d / "pyproject.toml").write_text("")
  elif kind == "gguf-folder":
    d.mkdir()
    (d / "m.Q4_0.gguf").write_bytes(b"GGUF")
  elif kind == "gguf-file":
    d = tmp_path / "m.gguf"
    d.write_bytes(b"GGUF")
  else:
    d.mkdir()
    (d / "notes.txt").write_text("x")
  code, err = _err(["--ckpt", str(d), "--prompt", "hi"], capsys)
  assert code == 2
  assert "delete" not in err and "interrupted" not in err, err  # never: remove the user's folder
  want = {"hf": ["Hugging Face model folder", "duojax.convert --hf"],
          "pattern": ["head-pattern folder", "--pattern"],
          "repo": ["source repository", "duojax.convert"],
          "gguf-folder": ["GGUF", "duojax.convert --gguf"],
          "gguf-file": ["GGUF file", "duojax.convert --gguf"],
          "other": ["not a duojax checkpoint", "duojax.convert"]}[kind]
  for w in want:
    assert w in err, (w, err)


def test_our_own_interrupted_conversion(tmp_path, capsys):
  (tmp_path / "params").mkdir()
  (tmp_path / "model.json").write_text("{}")
  code, err = _err(["--ckpt", str(tmp_path), "--prompt", "hi"], capsys)
  assert code == 2 and "interrupted" in err and "convert again" in err


# -- the tiny model: generation, capped windows -----------------------------------------------

def _run_json(argv, capsys):
  code = infer.main([*argv, "--json"])
  out, err = capsys.readouterr()
  assert code == 0, err
  return json.loads(out.strip().splitlines()[-1]), err


def test_window_capped_to_what_the_run_holds(tiny_ckpt, capsys):
  """sink 5000 + recent 5000 on a 2-token prompt: the streaming cache is no bigger than full
  attention's, stderr says so, and the tokens are those of full attention (a window that
  covers everything is full attention)."""
  base = ["--ckpt", str(tiny_ckpt), "--prompt", "the", "--max-new-tokens", "6"]
  full, _ = _run_json(base + ["--attention", "full"], capsys)
  stream, err = _run_json(base + ["--attention", "streaming", "--sink", "5000", "--recent",
                                  "5000"], capsys)
  assert "note" in err and "5000" in err and "smaller cache" in err
  assert stream["kv_cache_bytes"] <= full["kv_cache_bytes"]
  assert stream["sink"] + stream["recent"] <= 16 * ((full["prompt_tokens"] + 6 + 15) // 16)
  assert stream["generated_ids"] == full["generated_ids"]
  huge, _ = _run_json(base + ["--attention", "streaming", "--recent", "100000000"], capsys)
  assert huge["kv_cache_bytes"] <= full["kv_cache_bytes"]
  assert huge["generated_ids"] == full["generated_ids"]


def test_capped_window_is_the_same_attention():
  """The cap keeps every mask entry: j <= t and (j < sink or t - j < recent) over t < capacity."""
  from duojax.validate import capped_window
  for sink, recent, cap in [(5000, 5000, 32), (3, 100, 16), (0, 40, 16), (20, 1, 16), (4, 8, 32)]:
    s2, r2 = capped_window(sink, recent, cap)
    assert s2 + r2 <= cap and r2 >= 1 and s2 >= 0
    t = np.arange(cap)[:, None]
    j = np.arange(cap)[None, :]
    before = (j <= t) & ((j < sink) | (t - j < recent))
    after = (j <= t) & ((j < s2) | (t - j < r2))
    assert (before == after).all(), (sink, recent, cap)


def test_prompt_too_long_before_weights(tiny_ckpt, capsys, monkeypatch):
  monkeypatch.setattr(store, "load_params", lambda *a, **k: pytest.fail("weights loaded"))
  code, err = _err(["--ckpt", str(tiny_ckpt), "--prompt", "the " * 600], capsys)
  assert code == 2 and "exceeds the model's context of 512" in err


def test_json_model_name(tiny_ckpt, capsys):
  info, _ = _run_json(["--ckpt", str(tiny_ckpt), "--prompt", "the", "--max-new-tokens", "2",
                       "--attention", "full"], capsys)
  assert info["model"] == "Tiny-Test-Instruct"


def test_compile_progress_line(tiny_ckpt, capsys):
  assert infer.main(["--ckpt", str(tiny_ckpt), "--prompt", "the", "--max-new-tokens", "2",
                     "--attention", "full"]) == 0
  err = capsys.readouterr().err
  assert "compiling prefill and decode" in err and "30 s" in err
