"""Passkey retrieval grids.

numeric  the classic task: a seeded 5-digit key ("The pass key is 12345.
         Remember it.") hidden at each depth; the answer is the key.
multi    the gate-training format: `num_keys` passkeys of `key_words` NATO
         words each; the one asked for sits at the grid depth, the others at
         seeded depths in [0.05, 0.95]; the answer is its word sequence.
"""

from __future__ import annotations

import numpy as np

from duojax.data.haystack import HaystackTokens, build_context
from duojax.data.niah import build_passkey_prompt
from duojax.data.passkey import NATO, NEEDLE_TEMPLATE, ordinal
from duojax.eval.grid import Cell, PromptFormat
from duojax.eval.niah import sample_offsets

NUMERIC_PLAIN = "\n\n{question} The pass key is"
NUMERIC_CHAT = "\n\n{question} Answer with the number only."
MULTI_QUESTION = "\n\nBased on the content of the book, what is the {ordinal} passkey to the vault?"
VARIANTS = ("numeric", "multi")


def cell_seed(seed: int, length: int, depth_idx: int, sample: int) -> int:
  """A per-cell seed: the same key for a cell whatever else is in the grid."""
  return int(np.random.SeedSequence([seed, length, depth_idx, sample]).generate_state(1)[0])


def build_cells(hay: HaystackTokens, tokenizer, lengths: list[int], depths: list[float],
                fmt: PromptFormat, variant: str = "numeric", samples: int = 1, seed: int = 0,
                offset: int = 0, num_keys: int = 4, key_words: int = 4) -> list[Cell]:
  if variant not in VARIANTS:
    raise ValueError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
  offsets = sample_offsets(hay, max(lengths), samples, seed, offset)
  cells = []
  for s, off in enumerate(offsets):
    for length in lengths:
      body_len = length - fmt.overhead()
      for j, depth in enumerate(depths):
        cs = cell_seed(seed, length, j, s)
        if variant == "numeric":
          template = NUMERIC_CHAT if fmt.chat else NUMERIC_PLAIN
          ids, key = build_passkey_prompt(hay, tokenizer, body_len, depth, cs, offset=off,
                                          question_template=template)
          info = {"offset": off}
        else:
          ids, key, info = _multi_prompt(hay, tokenizer, body_len, depth, cs, off, num_keys,
                                         key_words, fmt.chat)
          span = info["needle_span"]
          info.update(offset=off, needle_span=[span[0] + len(fmt.head), span[1] + len(fmt.head)])
        cells.append(Cell(length, depth, s, fmt.wrap(ids), key, info))
  return cells


def _multi_prompt(hay, tokenizer, body_len: int, depth: float, seed: int, offset: int,
                  num_keys: int, key_words: int, chat: bool):
  """(ids [body_len], answer, info) with the asked passkey at `depth`."""
  if num_keys < 1 or key_words < 1:
    raise ValueError(f"--num-keys and --key-words must be >= 1, got {num_keys}, {key_words}")
  rng = np.random.default_rng(seed)
  others = rng.uniform(0.05, 0.95, num_keys - 1).tolist()
  depths = sorted(others + [depth])
  # The asked key is the first one at its depth (others may tie only by chance).
  asked = depths.index(depth)
  words = rng.integers(len(NATO), size=(num_keys, key_words))
  keys = [" ".join(NATO[w] for w in row) for row in words]
  needles = [NEEDLE_TEMPLATE.format(ordinal=ordinal(i + 1), passkey=k) for i, k in enumerate(keys)]
  question = MULTI_QUESTION.format(ordinal=ordinal(asked + 1)) + ("" if chat else "\nPasskey:")
  tail = tokenizer.encode(question, add_special_tokens=False)
  ctx_len = body_len - len(tail)
  if ctx_len < 1:
    raise ValueError(f"context length {body_len} is too small for the passkey question")
  ctx, spans = build_context(hay, tokenizer, needles, depths, ctx_len, offset=offset,
                             snap="nearest")
  ids = np.concatenate([ctx, np.asarray(tail, np.int32)]).astype(np.int32)
  return ids, keys[asked], {"needle_span": list(spans[asked]), "asked": asked + 1}

