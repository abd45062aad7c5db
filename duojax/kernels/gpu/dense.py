"""Whole-sequence causal attention with gradients on GPU, for gate training: cuDNN's fused
flash attention (forward and backward) through `jax.nn.dot_product_attention`.

  dense_causal(q, k, v, lengths)   q [B, T, Hkv, G, D]; k, v [B, T, Hkv, D]; lengths [B]
                                   -> [B, T, Hkv, G, D] in q's dtype

Why cuDNN and not Triton: jax-triton calls have no gradients, and gate training
differentiates through every layer's attention. The XLA path (attention/training.py)
materialises [block, T] fp32 logits per query block; on an H200 that made a 32K-token
Qwen2.5-0.5B step take 19 s, almost all of it attention. cuDNN never writes the logits.

Semantics as `reference.dense_attention(q, k, v, lengths)` on the rows that matter:
every query t < lengths[b] sees keys j <= t (all real, since j <= t < length). Rows past
a sequence's length (padding) are not defined here (cuDNN's padding mask gives them its
own values, the reference the causal mix of real keys); gate training's loss never reads
them, and they feed only later padding rows.

cuDNN takes bf16 / fp16 only: float32 inputs raise (gate training's GPU backend then
keeps the XLA path; see `supports`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DTYPES = (jnp.bfloat16, jnp.float16)
PAD = 128


def supports(q: jax.Array) -> bool:
  """Whether `dense_causal` takes q's dtype (cuDNN's fused attention: bf16 / fp16)."""
  return any(q.dtype == d for d in DTYPES)


def dense_causal(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
  """Causal attention over whole sequences through cuDNN (differentiable)."""
  if not supports(q):
    raise ValueError(f"dense_causal runs cuDNN's fused attention, which takes bfloat16 or "
                     f"float16, not {q.dtype}; train with --dtype bfloat16 or use --backend xla")
  b, t, hkv, g, d = q.shape
  # Rows padded to a multiple of PAD (cuDNN's tiles; padding rows come after every real
  # row, so causal rows never see them), dropped again below.
  tp = -(-t // PAD) * PAD
  pad = lambda x: x if tp == t else jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
  # Query heads kv-major (head hkv * G + g reads KV head hkv): cuDNN's native GQA grouping.
  lens = jnp.minimum(lengths.astype(jnp.int32), t)
  out = jax.nn.dot_product_attention(
      pad(q.reshape(b, t, hkv * g, d)), pad(k), pad(v), is_causal=True,
      query_seq_lengths=lens, key_value_seq_lengths=lens, implementation="cudnn")
  return out[:, :t].reshape(b, t, hkv, g, d)
