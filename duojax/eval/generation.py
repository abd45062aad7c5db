"""Greedy generation for evaluation grids, compiled once per head mask.

`engine.generate` sizes the cache and batch to each call's prompts, so a grid
of lengths would compile a prefill and a decode program per length and method.
Here every batch of a run shares one shape: `batch_size` rows (a short batch is
filled with copies of its first prompt, then dropped), a cache of fixed
`capacity` and a fixed prefill chunk. Shorter prompts then run fewer chunks of
the same compiled step, and each method compiles exactly two programs.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from duojax import cache as kvc
from duojax.config import ModelConfig, round_up
from duojax.engine import InputError, SamplingSettings, decode, pad_batch, prefill


@dataclasses.dataclass(frozen=True)
class GenSettings:
  """Shapes shared by every batch of a run (static, so they key the compile cache)."""
  max_new_tokens: int = 32
  prefill_chunk: int = 1024
  batch_size: int = 10
  capacity: int = 8192  # KV slots per row: longest prompt + max_new_tokens, rounded up
  backend: str = "xla"
  # Streaming heads keep the compensation token: it changes the cache's structure,
  # so it keys the compile like the shapes do (run_grid sets it per method).
  compensation: bool = False

  @classmethod
  def for_lengths(cls, longest: int, config: ModelConfig, **kw) -> "GenSettings":
    s = cls(**kw)
    if s.max_new_tokens < 1:
      raise InputError(f"--max-new-tokens must be >= 1, got {s.max_new_tokens}")
    if s.batch_size < 1 or s.prefill_chunk < 1:
      raise InputError("--batch-size and --prefill-chunk must be >= 1")
    if longest + s.max_new_tokens > config.max_position_embeddings:
      raise InputError(
          f"prompts of {longest} tokens + {s.max_new_tokens} new tokens exceed the model's "
          f"context of {config.max_position_embeddings}; lower the largest --lengths value")
    chunk = min(s.prefill_chunk, round_up(longest, 16))
    # Slots for the padded prompt (a whole number of chunks) plus the answer.
    cap = round_up(round_up(longest, chunk) + s.max_new_tokens, 16)
    return dataclasses.replace(s, prefill_chunk=chunk, capacity=cap)


def greedy_generate(params, config: ModelConfig, prompts: list[list[int]], mask,
                    s: GenSettings, dtype=None) -> list[list[int]]:
  """Greedy continuations of up to batch_size prompts -> ids per prompt (EOS dropped).

  params must already be reordered for `mask` (model.apply_head_mask).
  """
  n = len(prompts)
  if not 1 <= n <= s.batch_size:
    raise InputError(f"need 1..{s.batch_size} prompts per batch, got {n}")
  rows = list(prompts) + [prompts[0]] * (s.batch_size - n)
  tokens, lengths = pad_batch(rows, s.prefill_chunk)
  if tokens.shape[1] + s.max_new_tokens > s.capacity:
    raise InputError(f"a prompt of {int(lengths.max())} tokens does not fit the cache of "
                     f"{s.capacity} slots set for this run")
  cache = kvc.init_cache(config, s.batch_size, s.capacity, mask, dtype or params["embed"].dtype,
                         s.compensation and mask is not None)
  last, cache, _ = prefill(params, config, tokens, lengths, cache, s.prefill_chunk, s.backend)
  eos = tuple(config.eos_token_ids)
  out, _, _ = decode(params, config, cache, last, jax.random.PRNGKey(0), s.max_new_tokens,
                     SamplingSettings(), eos, s.backend)
  out = np.asarray(out)[:n]
  return [[int(t) for t in row if t >= 0 and t not in eos] for row in out]
