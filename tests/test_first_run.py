"""A first run on a fresh machine: the tokenizer from the GGUF without torch, the conversion
into DUOJAX_HOME (atomic, safe when two runs start at once, cleaning up after killed ones)."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from duojax.checkpoint import store

REPO = Path(__file__).resolve().parents[1]

TEXTS = ["What is the capital of France?",
         "Héllo  wörld\n\n\ttabs, 12345 numbers, émigré 東京 🙂 <|im_start|> the <|endoftext|>x",
         "  leading spaces and trailing   "]


def _ref_tokenizer(gguf_path: Path):
  pytest.importorskip("torch")  # transformers' own GGUF reader needs it (ours does not)
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def _chat_ids(tok, text):
  ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                tokenize=True)
  return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _same_tokenizer(ours, ref, texts):
  for t in texts:
    a, b = ours(t).input_ids, ref(t).input_ids
    assert a == b, t
    assert ours.decode(a, skip_special_tokens=True) == ref.decode(b, skip_special_tokens=True)
    assert _chat_ids(ours, t) == _chat_ids(ref, t)
  for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
    assert getattr(ours, k) == getattr(ref, k), k
  assert sorted(ours.added_tokens_decoder) == sorted(ref.added_tokens_decoder)


def test_tiny_gguf_tokenizer_equals_transformers(tiny_gguf_pkg, tiny_ckpt):
  root, mod, name = tiny_gguf_pkg
  ours = store.load_tokenizer(tiny_ckpt)  # saved in HF format by the conversion
  _same_tokenizer(ours, _ref_tokenizer(root / mod / name), TEXTS + ["the cat in the hat re"])


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers(smollm2_dir):
  from duojax.checkpoint.embedded import embedded_gguf
  ours = store.load_tokenizer(smollm2_dir)
  text = (REPO / "README.md").read_text()[:6000]
  _same_tokenizer(ours, _ref_tokenizer(embedded_gguf("smollm2-135m")), TEXTS + [text])
  assert store.load_config(smollm2_dir).name == "SmolLM2-135M-Instruct"


def test_model_name_from_gguf_file():
  from duojax.convert import gguf_model_name
  assert gguf_model_name(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), {}) == "SmolLM2-135M-Instruct"
  assert gguf_model_name(Path("qwen2.5-0.5b-instruct-q4_k_m.gguf"), {}) == "qwen2.5-0.5b-instruct"
  assert gguf_model_name(Path("Model.BF16.gguf"), {}) == "Model"


# -- subprocesses: the tiny GGUF registered as an embedded model -----------------------------

def _script(tiny_gguf_pkg, *bodies: str) -> str:
  root, mod, name = tiny_gguf_pkg
  return textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(root)!r})
      from duojax.checkpoint import embedded
      embedded.EMBEDDED["tiny"] = ({mod!r}, {name!r}, "duojax-tiny-model")
      """) + "".join(textwrap.dedent(b) for b in bodies)


def _env(home: Path, **extra) -> dict:
  env = {**os.environ, "DUOJAX_HOME": str(home), "JAX_PLATFORMS": "cpu", **extra}
  env.pop("PYTEST_CURRENT_TEST", None)
  return env


INFER = """
    from duojax import infer
    sys.exit(infer.main(["--ckpt", "tiny", "--prompt", "the cat", "--max-new-tokens", "3",
                         "--attention", "full", "--json"]))
    """


NO_LOCK = """
    import contextlib
    embedded._home_lock = lambda home, what: contextlib.nullcontext()
    """


@pytest.mark.parametrize("lock", [True, False], ids=["flock", "rename-only"])
def test_two_first_runs_at_once_both_answer(tiny_gguf_pkg, tmp_path, lock):
  """Two `duojax.infer` first runs on a fresh home: both answer, one intact checkpoint, no
  staging folders or locks left behind. rename-only: as on a file system without flock,
  both convert and the atomic rename picks one; the other discards its copy."""
  home = tmp_path / "home"
  code = _script(tiny_gguf_pkg, *([] if lock else [NO_LOCK]), INFER)
  procs = [subprocess.Popen([sys.executable, "-c", code], env=_env(home), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err
    assert "Traceback" not in err, err
    info = json.loads(out.strip().splitlines()[-1])
    assert info["model"] == "Tiny-Test-Instruct" and len(info["generated_ids"]) >= 1
  assert sorted(p.name for p in home.iterdir()) == ["tiny"]  # no .tiny.part-*, no lock file
  meta = store.read_marker(home / "tiny")
  assert meta["source"] == "gguf:Tiny-Test-Instruct.F32.gguf"
  assert store.load_config(home / "tiny").num_layers == 2
  store.load_params(home / "tiny")
  # The same answer from both (greedy, same weights).
  assert json.loads(outs[0][0].splitlines()[-1])["generated_ids"] == \
      json.loads(outs[1][0].splitlines()[-1])["generated_ids"]


def test_no_torch_needed(tiny_gguf_pkg, tmp_path):
  """Conversion (tokenizer included) and generation with `import torch` made to fail."""
  block = """
      sys.modules["torch"] = None  # `import torch` fails; find_spec says it is not installed
      """
  code = _script(tiny_gguf_pkg, block, INFER)
  r = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path / "home"), cwd=tmp_path,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout.splitlines()[-1])["generated_ids"]


def test_killed_conversion_is_cleaned_and_redone(tiny_gguf_pkg, tmp_path):
  """What a killed first run leaves: a staging folder of a dead process (removed) and,
  from older duojax releases, a half-written target (ours in DUOJAX_HOME: replaced). A live
  process's staging folder is left alone."""
  home = tmp_path / "home"
  home.mkdir()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  host = store.staging_name(home / "tiny").name.split("-")[1]
  stale = home / f".tiny.part-{host}-{dead.pid}-0badc0de"
  (stale / "params").mkdir(parents=True)
  live = home / f".other.part-{host}-{os.getpid()}-00c0ffee"
  live.mkdir()
  (home / "tiny").mkdir()
  (home / "tiny" / "model.json").write_text("{")  # an interrupted old-style conversion
  code = _script(tiny_gguf_pkg, """
      from duojax.checkpoint.embedded import resolve_checkpoint
      print(resolve_checkpoint("tiny", progress=False))
      """)
  r = subprocess.run([sys.executable, "-c", code], env=_env(home), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert not stale.exists() and live.exists()
  assert store.read_marker(home / "tiny")["format_version"] == store.FORMAT_VERSION
  assert sorted(p.name for p in home.iterdir()) == sorted([live.name, "tiny"])


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
  """Ctrl-C (or any error) in the middle of writing: no `out`, no staging folder."""
  import jax
  import numpy as np
  from duojax.layout import param_shapes
  from duojax.config import tiny_config
  cfg = tiny_config()
  params = jax.tree_util.tree_map(lambda s: np.zeros(s, np.float32), param_shapes(cfg),
                                  is_leaf=lambda x: isinstance(x, tuple))

  class Boom:
    def save_pretrained(self, d):
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    store.save_checkpoint(tmp_path / "ck", cfg, params, Boom())
  assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_by_age(tmp_path):
  """A staging folder from another host is removed only once it is a day old."""
  old = tmp_path / ".x.part-otherhost-123-abcd1234"
  new = tmp_path / ".x.part-otherhost-124-abcd1235"
  mine = tmp_path / "x.part-otherhost-1-ab"  # not our naming: never touched
  for p in (old, new, mine):
    p.mkdir()
  t = time.time() - 2 * store.STALE_SECONDS
  os.utime(old, (t, t))
  os.utime(mine, (t, t))
  assert store.clean_stale_temporaries(tmp_path) == [old]
  assert new.exists() and mine.exists()


def test_pytest_k_gpu_on_a_cpu_lists_skips():
  """`pytest -k gpu` without a GPU: every GPU test collected and skipped with the reason,
  exit 0 (not 5, "no tests collected")."""
  import jax
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present: the GPU tests run for real")
  r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "gpu", "-p", "no:cacheprovider",
                      "-o", "addopts=-ra", str(REPO / "tests" / "test_kernels_gpu.py")],
                     capture_output=True, text=True, timeout=300, cwd=REPO)
  assert r.returncode == 0, r.stdout + r.stderr
  last = r.stdout.strip().splitlines()[-1]
  assert "skipped" in last and "passed" not in last and int(last.split()[0]) >= 30, last
  assert "no GPU here" in r.stdout
