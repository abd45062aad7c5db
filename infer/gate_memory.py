"""Compiled peak memory of one gate-training gradient (student + teacher) at long T.

  python -m infer.gate_memory --t 32768 [--attention reference|blocked] [--student deployed]

Qwen2.5-0.5B's real shapes (24 layers, 14 query / 2 KV heads, D 64, E 896) with
bf16 weights given as abstract shapes: the program is lowered and compiled for
the machine's default backend and `memory_analysis()` read; nothing is run.
`reference` swaps the reference attention back in (what gate training used
before duojax/attention/training.py), to compare.
"""

from __future__ import annotations

import argparse
import json
from unittest import mock

import jax
import jax.numpy as jnp

from duojax.attention import reference, training
from duojax.config import ModelConfig
from duojax.identify import duo
from duojax.model import llama

QWEN05 = ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                     num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
                     rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True,
                     attention_bias=True, architecture="qwen2", name="qwen2.5-0.5b-shape")


def compiled_memory(t: int, attention: str = "blocked", student: str = "deployed",
                    batch: int = 1, config: ModelConfig = QWEN05) -> dict:
  shapes = llama.param_shapes(config)
  layers = shapes["layers"]
  # the stacked layout gate training uses (llama.stack_layers): [L, ...] per weight
  stacked = {k: (config.num_layers,) + s for k, s in layers[0].items()}
  tree = {**{k: v for k, v in shapes.items() if k != "layers"}, "layers": stacked}
  params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), tree,
                                  is_leaf=lambda x: isinstance(x, tuple))
  spec = jax.ShapeDtypeStruct
  args = (spec((config.num_layers, config.num_kv_heads), jnp.float32), params,
          spec((batch, t), jnp.int32), spec((batch,), jnp.int32), spec((batch, t), jnp.bool_))

  def grad(gates, params, tokens, lengths, mask):
    f = lambda g: duo.gate_loss(g, params, config, tokens, lengths, mask, sink=128, recent=256,
                                reg=0.05, student=student)[0]
    return jax.grad(f)(gates)

  patches = []
  if attention == "reference":
    patches = [mock.patch.object(duo, "dense_attention", reference.dense_attention),
               mock.patch.object(duo, "gated_attention", reference.gated_attention)]
  for p in patches:
    p.start()
  try:
    c = jax.jit(grad).lower(*args).compile()
  finally:
    for p in patches:
      p.stop()
  m = c.memory_analysis()
  gib = lambda x: round(x / 2**30, 2)
  out = {"t": t, "attention": attention, "student": student, "batch": batch,
         "block": training.pick_block(batch, t, config.num_heads) if attention == "blocked"
         else None, "backend": jax.default_backend()}
  for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes"):
    out[k.replace("_in_bytes", "_gib")] = gib(getattr(m, k))
  # XLA's CPU backend leaves peak_memory_in_bytes at the argument size; arguments +
  # temporaries + outputs is the bound a device would need (the figure we report).
  out["total_gib"] = gib(m.argument_size_in_bytes + m.temp_size_in_bytes
                         + m.output_size_in_bytes)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  ap.add_argument("--t", type=int, default=32768)
  ap.add_argument("--attention", default="blocked", choices=["blocked", "reference"])
  ap.add_argument("--student", default="deployed", choices=sorted(duo.STUDENTS))
  ap.add_argument("--batch", type=int, default=1)
  a = ap.parse_args(argv)
  print(json.dumps(compiled_memory(a.t, a.attention, a.student, a.batch)))


if __name__ == "__main__":
  main()
