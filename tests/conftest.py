"""Shared fixtures: the real SmolLM2 checkpoint (converted once per session)."""

import os
from pathlib import Path

# `pytest -k gpu -n 8` runs 8 processes on one GPU: none may take 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Without a GPU the suite is bound by XLA:CPU compiles of tiny programs, and most of a
# compile is LLVM's optimiser. At -O1 test_eval.py took 51 s instead of 66 s at the
# default -O3, and the clean-clone CI suite 966 / 1047 s in two runs instead of 1096
# (2026-12-08; runs on that machine spread by ~8%). -O0 ran the suite in 821 s but
# changes the numerics: SmolLM2's logits moved to 1.07e-4 from HF's, over the 1e-4 parity
# bound (8.9e-5 at -O1), and a packed-vs-unpacked check failed. Subprocess tests inherit
# the flag (tests/helpers.py appends to XLA_FLAGS). A GPU or TPU machine keeps the
# default, so its tests compile their kernels as users get them.
_FLAGS = os.environ.get("XLA_FLAGS", "")
_ACCELERATOR = any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/accel0", "/dev/vfio"))
if not _ACCELERATOR and "xla_backend_optimization_level" not in _FLAGS:
  os.environ["XLA_FLAGS"] = (_FLAGS + " --xla_backend_optimization_level=1").strip()

import jax  # noqa: E402
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The slowest files first (CI's `--durations`, 2026-12-03, seconds per file roughly in this
# order: 200 down to 40). The README's test command runs `-n 2 --dist loadfile`, which hands
# whole files to the two workers in collection order; alphabetically the 200 s sharded-engine
# file came near the end, where one worker can end up running it alone while the other
# idles. Longest first lets the short files fill in behind them. Order within a file is kept.
SLOW_FIRST = ("test_sharded_engine.py", "test_identify_duo.py", "test_qwen_gguf.py",
              "test_compare_patterns.py", "test_notebook.py", "test_ppl_mesh.py",
              "test_context_parallel.py", "test_triton_interpret.py",
              "test_cli_eval_identify.py", "test_weight_quant_mesh.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda it: rank.get(Path(str(it.fspath)).name, len(SLOW_FIRST)))  # stable



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


# -- a tiny GGUF with a byte-level BPE tokenizer (first-run, CLI and concurrency tests) --------

def _byte_alphabet() -> list[str]:
  """GPT-2's printable stand-in for each of the 256 bytes (the byte-level BPE alphabet)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "r e"]
TINY_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path, layers: int = 2, context: int = 512, seed: int = 0):
  """A random-weight llama GGUF (F32) whose tokenizer is byte-level BPE, like SmolLM2's."""
  import gguf
  import numpy as np
  tokens = TINY_SPECIALS + _byte_alphabet() + [m.replace(" ", "") for m in TINY_MERGES]
  types = [3] * len(TINY_SPECIALS) + [1] * (len(tokens) - len(TINY_SPECIALS))
  e, ff, hq, hkv, d = 32, 64, 4, 2, 8
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_name("tiny test model")
  w.add_block_count(layers)
  w.add_context_length(context)
  w.add_embedding_length(e)
  w.add_feed_forward_length(ff)
  w.add_head_count(hq)
  w.add_head_count_kv(hkv)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_rope_freq_base(10000.0)
  w.add_vocab_size(len(tokens))
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(TINY_MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  w.add_pad_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template(TINY_CHAT)
  rng = np.random.default_rng(seed)
  r = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
  w.add_tensor("token_embd.weight", r(len(tokens), e))
  for i in range(layers):
    w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(e, np.float32))
    w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(e, np.float32))
    w.add_tensor(f"blk.{i}.attn_q.weight", r(hq * d, e))
    w.add_tensor(f"blk.{i}.attn_k.weight", r(hkv * d, e))
    w.add_tensor(f"blk.{i}.attn_v.weight", r(hkv * d, e))
    w.add_tensor(f"blk.{i}.attn_output.weight", r(e, hq * d))
    w.add_tensor(f"blk.{i}.ffn_gate.weight", r(ff, e))
    w.add_tensor(f"blk.{i}.ffn_up.weight", r(ff, e))
    w.add_tensor(f"blk.{i}.ffn_down.weight", r(e, ff))
  w.add_tensor("output_norm.weight", np.ones(e, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="session")
def tiny_gguf_pkg(tmp_path_factory):
  """(folder to put on sys.path, module name, GGUF file name): a fake model package holding
  a tiny GGUF, so subprocesses can register it as an embedded model."""
  root = tmp_path_factory.mktemp("tiny_pkg")
  pkg = root / "duojax_tiny_model"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  write_tiny_gguf(pkg / "Tiny-Test-Instruct.F32.gguf")
  return root, "duojax_tiny_model", "Tiny-Test-Instruct.F32.gguf"


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_gguf_pkg, tmp_path_factory):
  """The tiny GGUF converted by duojax.convert (weights, tokenizer from the GGUF, no pattern)."""
  from duojax.convert import convert_gguf
  root, mod, name = tiny_gguf_pkg
  return convert_gguf(root / mod / name, tmp_path_factory.mktemp("tiny") / "ckpt", progress=False)


@pytest.fixture
def no_model(monkeypatch):
  """Fails the test if a checkpoint is resolved or weights are loaded (argument checks
  must come first)."""
  from duojax.checkpoint import embedded, store

  def boom(*a, **k):
    raise AssertionError("the model was loaded before the arguments were checked")
  monkeypatch.setattr(embedded, "resolve_checkpoint", boom)
  monkeypatch.setattr(embedded, "resolve_with_marker", boom)  # what Checkpoint.open calls
  monkeypatch.setattr(store, "load_params", boom)
