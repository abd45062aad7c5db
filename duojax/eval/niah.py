"""Needle in a haystack: one fact hidden at each depth of each context length.

The needle goes in at the sentence start nearest the asked depth; the prompt
is the haystack, then the question (the chat template around both with
--chat), and the answer is greedy. Scored by containment of the answer string
and by ROUGE-1 recall of its words (the usual NIAH measure, and the heatmap's).
"""

from __future__ import annotations

import numpy as np

from duojax.data.haystack import HaystackTokens
from duojax.data.niah import NeedleTask, build_niah_prompt
from duojax.eval.grid import Cell, PromptFormat, check_haystack

PLAIN_QUESTION = "\n\nBased on the content above, answer: {question}\nAnswer:"
CHAT_QUESTION = "\n\nBased on the content above, answer briefly: {question}"


def sample_offsets(hay: HaystackTokens, longest: int, samples: int, seed: int,
                   offset: int = 0) -> list[int]:
  """Haystack start per sample: `offset` for the first, then seeded sentence
  starts that leave room for the longest prompt."""
  if samples < 1:
    raise ValueError(f"--samples must be >= 1, got {samples}")
  check_haystack(hay, longest, offset)
  room = hay.starts[hay.starts <= len(hay) - longest]
  rng = np.random.default_rng([seed, 7])
  return [offset] + [int(room[int(rng.integers(len(room)))]) for _ in range(samples - 1)]


def build_cells(hay: HaystackTokens, tokenizer, task: NeedleTask, lengths: list[int],
                depths: list[float], fmt: PromptFormat, samples: int = 1, seed: int = 0,
                offset: int = 0) -> list[Cell]:
  """Cells for every (sample, length, depth); each prompt is exactly `length` tokens."""
  offsets = sample_offsets(hay, max(lengths), samples, seed, offset)
  template = CHAT_QUESTION if fmt.chat else PLAIN_QUESTION
  cells = []
  for s, off in enumerate(offsets):
    for length in lengths:
      body_len = length - fmt.overhead()
      for depth in depths:
        ids, (start, end) = build_niah_prompt(hay, tokenizer, task, body_len, depth,
                                              offset=off, question_template=template)
        head = len(fmt.head)
        cells.append(Cell(length, depth, s, fmt.wrap(ids), task.answer,
                          {"needle_span": [start + head, end + head], "offset": off}))
  return cells
