"""Helpers several test files share (tests/ is on sys.path under pytest's default import mode)."""

import jax
import jax.numpy as jnp
import numpy as np

from duojax.model import llama


def fake_device_env(n: int) -> dict:
  """os.environ for a child process of JAX on n fake CPU devices."""
  import os
  flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())


def random_params(cfg, seed, scale):
  """Like llama.init_params but drawn with numpy: eager jax.random compiles per shape (slow)."""
  rng = np.random.default_rng(seed)

  def draw(shape):  # norms near 1, weights scale * N(0, 1)
    x = rng.standard_normal(shape)
    return jnp.asarray(1 + 0.1 * x if len(shape) == 1 else scale * x, jnp.float32)
  return jax.tree_util.tree_map(draw, llama.param_shapes(cfg),
                                is_leaf=lambda x: isinstance(x, tuple))


def tiny_hf_tokenizer():
  """A character-level HF tokenizer (no download): printable ASCII plus <unk>, <s>, </s>."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {chr(i): i for i in range(32, 97)}
  vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
  t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>")


def params_from_torch(model, cfg):
  """Our params from an HF torch model's state dict (weights only, no files)."""
  from duojax.checkpoint.hf import params_from_hf_state
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return jax.tree_util.tree_map(jnp.asarray, params_from_hf_state(sd.__getitem__, cfg))


# The agreed logical axis names of each weight, written out here rather than read from
# duojax/layout.py, so that a renamed axis fails the tests that compare against it.
AGREED_AXES = {
    "embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"), "final_norm": ("embed",),
    "attn_norm": ("embed",), "mlp_norm": ("embed",),
    "wq": ("embed", "kv_heads", "q_group", "head_dim"), "wk": ("embed", "kv_heads", "head_dim"),
    "wv": ("embed", "kv_heads", "head_dim"), "wo": ("kv_heads", "q_group", "head_dim", "embed"),
    "bq": ("kv_heads", "q_group", "head_dim"), "bk": ("kv_heads", "head_dim"),
    "bv": ("kv_heads", "head_dim"), "q_norm": ("head_dim",), "k_norm": ("head_dim",),
    "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed"),
}
# The names of the weights a model serves packed (duojax/model/pack.py), likewise written out.
PACKED_AXES = {
    "wqkv": ("embed", "kv_heads", "qkv_group", "head_dim"),
    "bqkv": ("kv_heads", "qkv_group", "head_dim"), "w_gate_up": ("embed", "gate_up", "mlp"),
}


def gated_oracle(q, k, v, lengths, gates, sink, recent):
  """The gate-training attention, written out in float64 numpy, loops over (t, j): a * softmax_causal + (1 - a) * softmax_streaming per KV head."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, hkv, g, d = q.shape
  out = np.zeros_like(q)
  for bi in range(b):
    for h in range(hkv):
      for gi in range(g):
        for i in range(t):
          logits = k[bi, :, h] @ q[bi, i, h, gi] / np.sqrt(d)
          full = np.array([j <= i and j < lengths[bi] for j in range(t)])
          strm = full & np.array([j < sink or i - j < recent for j in range(t)])
          res = np.zeros(d)
          for m, w in ((full, gates[h]), (strm, 1 - gates[h])):
            if m.any():
              p = np.exp(logits[m] - logits[m].max())
              res += w * (p / p.sum()) @ v[bi, m, h]
          out[bi, i, h, gi] = res
  return out
