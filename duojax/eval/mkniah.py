"""Multi-key needle in a haystack over lengths x depths (duojax/data/mkniah.py).

Each cell hides `num_keys` same-kind needles ("The special magic number for
{city} is {number}.") and asks for one, placed at the cell's depth; the others
lie at seeded depths. Scored by exact match of the asked number (`exact`: the
first number of the answer), with containment and ROUGE-1 kept alongside.
"""

from __future__ import annotations

from duojax.data.haystack import HaystackTokens
from duojax.data.mkniah import build_multikey_prompt
from duojax.eval.grid import Cell, PromptFormat
from duojax.eval.niah import sample_offsets
from duojax.eval.passkey import cell_seed

PLAIN_QUESTION = "\n\n{question}\nAnswer: The special magic number is"
CHAT_QUESTION = "\n\n{question} Answer with the number only."


def build_cells(hay: HaystackTokens, tokenizer, lengths: list[int], depths: list[float],
                fmt: PromptFormat, samples: int = 1, seed: int = 0, offset: int = 0,
                num_keys: int = 4) -> list[Cell]:
  """Cells for every (sample, length, depth); each prompt is exactly `length` tokens.
  A cell's needles depend only on (seed, length, depth index, sample)."""
  if num_keys < 1:
    raise ValueError(f"--keys must be >= 1, got {num_keys}")
  offsets = sample_offsets(hay, max(lengths), samples, seed, offset)
  template = CHAT_QUESTION if fmt.chat else PLAIN_QUESTION
  head = len(fmt.head)
  cells = []
  for s, off in enumerate(offsets):
    for length in lengths:
      for j, depth in enumerate(depths):
        p = build_multikey_prompt(hay, tokenizer, length - fmt.overhead(), depth,
                                  cell_seed(seed, length, j, s), num_keys, offset=off,
                                  question_template=template)
        a, b = p.spans[p.asked]
        info = {"needle_span": [a + head, b + head], "offset": off, "asked": p.asked,
                "keys": list(p.keys), "values": list(p.values)}
        cells.append(Cell(length, depth, s, fmt.wrap(p.ids), p.answer, info))
  return cells
