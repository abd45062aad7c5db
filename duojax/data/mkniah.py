"""Multi-key needle in a haystack: several same-kind needles, one asked.

Each prompt hides `num_keys` sentences "The special magic number for {city} is
{number}." with distinct cities and distinct 7-digit numbers; the question asks
for one city's number. The asked needle sits at the stated depth, the others at
seeded depths in [0.05, 0.95], so a model must tell same-looking facts apart by
their key, not just find the one odd sentence (single-needle NIAH). This is the
shape of RULER's multi-key task (distractor needles of the same template),
written here from that description.

Scored by exact match: the first number in the answer must be the asked value
(naming a distractor's number, or the right digits inside a longer run, fails).

Nothing here needs JAX; every prompt is a pure function of its seed.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from duojax.data.haystack import HaystackTokens, build_context

# Short, single-word city names: each is a different key of the same kind.
CITIES = (
    "Amsterdam", "Athens", "Bangkok", "Berlin", "Bogota", "Boston", "Brussels", "Budapest",
    "Cairo", "Chicago", "Dakar", "Delhi", "Denver", "Dublin", "Geneva", "Hanoi", "Havana",
    "Helsinki", "Istanbul", "Jakarta", "Kyoto", "Lagos", "Lima", "Lisbon", "London", "Madrid",
    "Manila", "Melbourne", "Miami", "Montreal", "Moscow", "Mumbai", "Munich", "Nairobi", "Oslo",
    "Paris", "Prague", "Quito", "Riga", "Rome", "Santiago", "Seattle", "Seoul", "Shanghai",
    "Sydney", "Taipei", "Tokyo", "Toronto", "Vienna", "Warsaw", "Zurich",
)
NEEDLE = "The special magic number for {key} is {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
VALUE_DIGITS = 7
OTHER_DEPTHS = (0.05, 0.95)


@dataclasses.dataclass(frozen=True)
class MultiKeyPrompt:
  """ids: int32 [context_len]; keys / values per needle in prompt order; `asked`
  indexes them; spans[i] is needle i's token span in ids."""
  ids: np.ndarray
  keys: tuple[str, ...]
  values: tuple[str, ...]
  asked: int
  spans: tuple[tuple[int, int], ...]
  depths: tuple[float, ...]

  @property
  def answer(self) -> str:
    return self.values[self.asked]


def draw_needles(seed: int, num_keys: int) -> tuple[list[str], list[str]]:
  """num_keys distinct cities and distinct 7-digit values (no leading zero)."""
  if not 1 <= num_keys <= len(CITIES):
    raise ValueError(f"--keys must be in [1, {len(CITIES)}], got {num_keys}")
  rng = np.random.default_rng([seed, 11])
  keys = [CITIES[i] for i in rng.choice(len(CITIES), num_keys, replace=False)]
  lo = 10 ** (VALUE_DIGITS - 1)
  values = [str(lo + int(v)) for v in rng.choice(9 * lo, num_keys, replace=False)]
  return keys, values


def build_multikey_prompt(hay: HaystackTokens, tokenizer, context_len: int, depth: float,
                          seed: int, num_keys: int = 4, *, offset: int = 0,
                          question_template: str = "\n\n{question}",
                          allow_repeat: bool = False) -> MultiKeyPrompt:
  """A prompt of exactly `context_len` tokens: haystack from token `offset` with
  `num_keys` needles, the asked one (needle 0 of the draw) at `depth` (a fraction
  of the haystack tokens, snapped to the nearest sentence start), then the question.
  """
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}")
  keys, values = draw_needles(seed, num_keys)
  rng = np.random.default_rng([seed, 13])
  depths = [float(depth)] + [float(d) for d in rng.uniform(*OTHER_DEPTHS, num_keys - 1)]
  # Stable sort: the asked needle goes first among equal depths.
  order = sorted(range(num_keys), key=lambda i: (depths[i], i))
  asked = order.index(0)
  keys, values, depths = ([xs[i] for i in order] for xs in (keys, values, depths))
  question = question_template.format(question=QUESTION.format(key=keys[asked]))
  tail = tokenizer.encode(question, add_special_tokens=False)
  ctx_len = context_len - len(tail)
  if ctx_len < 1:
    raise ValueError(f"context length {context_len} is too small for the multi-key question "
                     f"({len(tail)} tokens)")
  needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
  ctx, spans = build_context(hay, tokenizer, needles, depths, ctx_len, offset=offset,
                             snap="nearest", allow_repeat=allow_repeat)
  ids = np.concatenate([ctx, np.asarray(tail, np.int32)]).astype(np.int32)
  return MultiKeyPrompt(ids, tuple(keys), tuple(values), asked,
                        tuple((int(a), int(b)) for a, b in spans), tuple(depths))


_NUMBER = re.compile(r"\d+")


def first_number(output: str) -> str | None:
  """The first run of digits in `output` (thousands separators removed), or None."""
  m = _NUMBER.search(re.sub(r"(?<=\d)[,_](?=\d{3}\b)", "", output))
  return m.group(0) if m else None


def exact_value_match(output: str, answer: str) -> bool:
  """Whether the first number in `output` is exactly `answer` (a digit string)."""
  if not answer.isdigit():
    raise ValueError(f"exact_value_match scores digit answers; got {answer!r}")
  return first_number(output) == answer
