"""Each GGUF architecture's q/k row convention, checked against HF transformers reading the
same file: tiny random llama / qwen2 / qwen3 GGUFs written here with gguf.GGUFWriter.

llama.cpp's converter interleaves q/k rows for llama (adjacent-pair RoPE) and keeps HF's
order for qwen2/qwen3 (NEOX RoPE); the llama file below is written with that permutation,
the qwen files without, and duojax must match HF's logits on all three.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
import jax
import jax.numpy as jnp
import transformers

from duojax.checkpoint import gguf_file
from duojax.checkpoint.hf import hf_state_from_params
from duojax.config import tiny_config
from duojax.engine import forward_logits
from helpers import random_params

CONFIGS = {
    "llama": tiny_config(architecture="llama"),
    "qwen2": tiny_config(architecture="qwen2", attention_bias=True, rope_theta=1e6),
    # HF reads no head_dim from a qwen3 GGUF and takes Qwen3's 128 (as in every real Qwen3)
    "qwen3": tiny_config(architecture="qwen3", qk_norm=True, head_dim=128, num_heads=2,
                         num_kv_heads=1, tie_word_embeddings=True),
}
_NAMES = {"input_layernorm.weight": "attn_norm.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
          "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def _llama_cpp_permute(w, n_heads):
  """What llama.cpp's converter does to llama q/k rows (pairs the two rotary halves)."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _write_gguf(path, cfg, sd):
  arch = cfg.architecture
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name(f"tiny {arch}")
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_vocab_size(cfg.vocab_size)
  if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
  for k, v in sd.items():
    if k == "model.embed_tokens.weight":
      name = "token_embd.weight"
    elif k == "model.norm.weight":
      name = "output_norm.weight"
    elif k == "lm_head.weight":
      name = "output.weight"
    else:
      _, _, i, rest = k.split(".", 3)
      name = f"blk.{i}.{_NAMES[rest]}"
      if arch == "llama" and rest.startswith("self_attn.q_proj"):
        v = _llama_cpp_permute(v, cfg.num_heads)
      elif arch == "llama" and rest.startswith("self_attn.k_proj"):
        v = _llama_cpp_permute(v, cfg.num_kv_heads)
    w.add_tensor(name, np.ascontiguousarray(v, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny_gguf(request, tmp_path_factory):
  cfg = CONFIGS[request.param]
  params = random_params(cfg, 0, 0.3)
  d = tmp_path_factory.mktemp(request.param)
  _write_gguf(d / "m.gguf", cfg, hf_state_from_params(params, cfg))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), gguf_file="m.gguf",
                                                         dtype=torch.float32).eval()
  return cfg, d / "m.gguf", hf


IDS = [3, 9, 27, 81, 50, 4, 33, 60, 11, 90, 7, 45]


def _ours(path):
  cfg, params, _ = gguf_file.read_gguf(path)
  return cfg, forward_logits(jax.tree_util.tree_map(jnp.asarray, params), cfg, [IDS], chunk=8)[0]


def test_gguf_logits_match_hf_reading_the_same_file(tiny_gguf):
  cfg, path, hf = tiny_gguf
  got_cfg, ours = _ours(path)
  assert type(hf).__name__.lower().startswith(cfg.architecture)
  assert (got_cfg.architecture, got_cfg.attention_bias, got_cfg.qk_norm, got_cfg.head_dim,
          got_cfg.tie_word_embeddings) == (cfg.architecture, cfg.attention_bias, cfg.qk_norm,
                                           cfg.head_dim, cfg.tie_word_embeddings)
  with torch.no_grad():
    ref = hf(torch.tensor([IDS])).logits[0].numpy()
  assert np.abs(ref).max() > 1
  np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)


def test_the_other_row_convention_would_fail(tiny_gguf, monkeypatch):
  """Guards the test above: un-permuting a qwen file (or not un-permuting a llama one) breaks it."""
  cfg, path, hf = tiny_gguf
  flipped = () if cfg.architecture == "llama" else (cfg.architecture,)
  monkeypatch.setattr(gguf_file, "PERMUTED_ROPE_ARCHS", flipped)
  _, ours = _ours(path)
  with torch.no_grad():
    ref = hf(torch.tensor([IDS])).logits[0].numpy()
  assert np.abs(ours - ref).max() > 1e-3
