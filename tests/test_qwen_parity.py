"""Qwen2 / Qwen3 / Mistral equal HF transformers on the same weights, and DuoAttention
serving of a Qwen2 config (q/k/v biases through reordered heads) equals the dense
masked reference.

The HF models are built by transformers' own Qwen2/Qwen3/Mistral classes (the oracle);
our side reads their state dict through checkpoint.hf.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax
import jax.numpy as jnp
import transformers

from duojax.checkpoint.hf import hf_state_from_params, read_hf_folder
from duojax.config import ConfigError, ModelConfig, tiny_config
from helpers import params_from_torch
from duojax.engine import forward_logits, generate
from duojax.model import llama

CONFIGS = {
    "qwen2_untied": tiny_config(architecture="qwen2", attention_bias=True, rope_theta=1e6,
                                rms_norm_eps=1e-6),
    "qwen2_tied_mqa": tiny_config(architecture="qwen2", attention_bias=True, num_heads=7,
                                  num_kv_heads=1, head_dim=8, hidden_size=56,
                                  tie_word_embeddings=True),
    "qwen3_gqa": tiny_config(architecture="qwen3", qk_norm=True, head_dim=12, rope_theta=1e6),
    "qwen3_tied_mha": tiny_config(architecture="qwen3", qk_norm=True, tie_word_embeddings=True,
                                  num_heads=4, num_kv_heads=4),
    "mistral_gqa": tiny_config(architecture="mistral", num_heads=8, num_kv_heads=2, head_dim=6),
}


def _hf_model(cfg, seed=0):
  hf = cfg.to_hf()
  conf = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(conf).eval()
  with torch.no_grad():  # HF zero-inits biases and ones-inits norms: make them count
    for n, p in model.named_parameters():
      if n.endswith("bias") or "norm" in n:
        p.add_(0.3 * torch.randn_like(p))
  return model, params_from_torch(model, cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf_tiny(name):
  cfg = CONFIGS[name]
  model, params = _hf_model(cfg)
  assert type(model).__name__.lower().startswith(cfg.architecture)
  if cfg.attention_bias:
    assert "bq" in params["layers"][0]
  if cfg.qk_norm:
    assert "q_norm" in params["layers"][0]
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (45, 17, 30)]
  ours = forward_logits(params, cfg, prompts, chunk=16)  # 3 chunks, ragged batch
  for p, o in zip(prompts, ours):
    with torch.no_grad():
      ref = model(torch.tensor([p])).logits[0].numpy()
    assert np.abs(ref).max() > 0.05  # the check has something to compare
    np.testing.assert_allclose(o, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_untied", "qwen3_tied_mha"])
def test_hf_state_round_trip(name):
  cfg = CONFIGS[name]
  model, params = _hf_model(cfg)
  back = hf_state_from_params(params, cfg)
  sd = model.state_dict()
  for k, v in sd.items():
    if k == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
  assert set(back) <= set(sd)


def test_greedy_generation_matches_hf_qwen2():
  cfg = CONFIGS["qwen2_untied"]
  model, params = _hf_model(cfg, seed=3)
  prompt = [5, 17, 33, 8, 61, 12]
  r = generate(params, cfg, [prompt], max_new_tokens=20)
  with torch.no_grad():
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
  ours = r.tokens[0]
  assert len(ours) >= 5
  assert ours == ref[:len(ours)]  # ours stops at EOS (id 2)


@pytest.mark.parametrize("name", ["qwen2_untied", "qwen3_gqa"])
def test_hf_folder_reads_qwen(tmp_path, name):
  """read_hf_folder on a save_pretrained folder gives the same model (arch, flags, logits)."""
  cfg = CONFIGS[name]
  model, params = _hf_model(cfg, seed=5)
  model.save_pretrained(tmp_path)
  cfg2, params2 = read_hf_folder(tmp_path)
  assert (cfg2.architecture, cfg2.attention_bias, cfg2.qk_norm) == (
      cfg.architecture, cfg.attention_bias, cfg.qk_norm)
  assert cfg2.tie_word_embeddings == cfg.tie_word_embeddings
  ids = [3, 9, 27, 81, 50, 4]
  a = forward_logits(params, cfg, [ids], chunk=8)[0]
  b = forward_logits(jax.tree_util.tree_map(jnp.asarray, params2), cfg2, [ids], chunk=8)[0]
  np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_qwen2_hf_config_always_has_bias():
  """Qwen2's config.json has no attention_bias key: the biases are always there."""
  hf = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 10,
        "hidden_size": 16, "intermediate_size": 20, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
  c = ModelConfig.from_hf(hf)
  assert c.architecture == "qwen2" and c.attention_bias and not c.qk_norm
  c3 = ModelConfig.from_hf({**hf, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                            "head_dim": 8})
  assert c3.architecture == "qwen3" and c3.qk_norm and not c3.attention_bias and c3.head_dim == 8
  with pytest.raises(ConfigError, match="o_proj"):  # refused, not silently dropped
    ModelConfig.from_hf({**hf, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                         "attention_bias": True})
  with pytest.raises(ConfigError, match="sliding"):
    ModelConfig.from_hf({**hf, "use_sliding_window": True, "sliding_window": 4})


def test_old_model_json_without_new_fields_still_reads():
  d = json.loads(tiny_config().to_json())
  del d["qk_norm"]
  c = ModelConfig.from_dict(d)
  assert not c.qk_norm and c == tiny_config()


def test_gguf_fields_qwen2_no_bos_and_flags():
  fields = {"general.architecture": "qwen2", "qwen2.attention.head_count": 2,
            "qwen2.attention.head_count_kv": 1, "qwen2.embedding_length": 16,
            "qwen2.feed_forward_length": 20, "qwen2.block_count": 1, "_vocab_size": 10,
            "_bias": True, "_tied": True, "tokenizer.ggml.bos_token_id": 7,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.eos_token_id": 8}
  c = ModelConfig.from_gguf_fields(fields)
  assert (c.architecture, c.attention_bias, c.qk_norm, c.head_dim) == ("qwen2", True, False, 8)
  assert c.bos_token_id is None and c.eos_token_ids == (8,) and c.vocab_size == 10
  with pytest.raises(ConfigError, match="not supported"):
    ModelConfig.from_gguf_fields({**fields, "general.architecture": "phi3"})


# -- DuoAttention serving of Qwen configs (biases + q/k norms through reordered heads) --

@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
@pytest.mark.parametrize("kind", ["random", "all_streaming"])
def test_duo_serving_qwen_equals_dense_reference(name, kind):
  """Chunked prefill + decode with heads reordered (q/k/v biases permuted along) equals
  full-length attention in the original head order with a per-head streaming mask."""
  from helpers import random_params
  from test_duo import RECENT, SINK, dense_logits, random_mask, served_logits
  from duojax.engine import pad_batch
  from duojax.pattern import HeadMask
  extra = ({"attention_bias": True} if name == "qwen2" else {"qk_norm": True})
  cfg = tiny_config(architecture=name, num_layers=3, num_kv_heads=3, num_heads=6, head_dim=8,
                    rope_theta=1e6, **extra)
  params = random_params(cfg, 0, 0.3)
  if name == "qwen2":  # large biases so a bias left in the original head order shows
    for lp in params["layers"]:
      for b in ("bq", "bk", "bv"):
        lp[b] = lp[b] * 5.0
  mask = (random_mask(cfg, 1) if kind == "random"
          else HeadMask.all_streaming(cfg.num_layers, cfg.num_kv_heads, SINK, RECENT))
  rng = np.random.default_rng(2)
  prompt_lens, n_dec = [19, 8], 24
  seqs = [list(rng.integers(0, cfg.vocab_size, n + n_dec)) for n in prompt_lens]
  got = served_logits(params, cfg, seqs, prompt_lens, mask, 7)
  tokens, lengths = pad_batch(seqs, 1)
  ref = dense_logits(params, cfg, tokens, lengths, mask)
  for b, g in enumerate(got):
    r = ref[b, :len(g)]
    assert np.abs(g - r).max() <= 2e-5 * np.abs(r).max(), np.abs(g - r).max()
  # the check can fail: biases left unpermuted break it
  if name == "qwen2" and kind == "random":
    bad = llama.apply_head_mask(params, mask)
    bad = {**bad, "layers": [{**bl, "bq": lp["bq"], "bk": lp["bk"], "bv": lp["bv"]}
                             for bl, lp in zip(bad["layers"], params["layers"])]}
    p2 = llama.undo_head_mask(bad, mask)
    wrong = served_logits(p2, cfg, seqs, prompt_lens, mask, 7)
    assert np.abs(wrong[0] - ref[0, :len(wrong[0])]).max() > 1e-3
