"""Multi-passkey retrieval samples for gate training (DESIGN.md section 1).

Each sample: a haystack window with `num_passkeys` sentences "Remember this
sequence of words, it's the {ordinal} passkey to the vault: {passkey}."
inserted at sorted random depths, followed by a question/answer tail that asks
for every passkey in order.  The loss mask covers the whole tail.

Length accounting: the drawn length is the length of the *whole sample*
(special prefix + haystack + inserted passkey sentences + question/answer
tail), hit exactly, so `len(input_ids) <= max_len` always: a sample never
outgrows the model's context when `max_len` does not (the official code keeps
its samples within its maximum length too).

Special prefix: a sample starts with the tokens the tokenizer puts in front of
a text at deployment (`special_prefix`: BOS for Llama / Mistral tokenizers,
nothing for SmolLM2's), so the attention sink at position 0 is the same token
in training and serving (the official code encodes its prompt with special
tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from duojax.data.haystack import HaystackTokens, build_context

NATO = (
    "alfa", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliett", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
    "x-ray", "yankee", "zulu",
)

_ORDINAL_WORDS = ("first", "second", "third", "fourth", "fifth", "sixth",
                  "seventh", "eighth", "ninth", "tenth")

NEEDLE_TEMPLATE = ("Remember this sequence of words, it's the {ordinal} passkey to the "
                   "vault: {passkey}.")
QUESTION_TEMPLATE = ("Based on the content of the book, what is the {ordinal} passkey "
                     "to the vault?\nPasskey: {passkey}")


def ordinal(i: int) -> str:
  """1-based ordinal: 1 -> "first" ... 10 -> "tenth", then "11th", "21st", "22nd"..."""
  if i < 1:
    raise ValueError(f"ordinal() counts from 1, got {i}")
  if i <= len(_ORDINAL_WORDS):
    return _ORDINAL_WORDS[i - 1]
  if i % 100 in (11, 12, 13):
    return f"{i}th"
  suffix = {1: "st", 2: "nd", 3: "rd"}.get(i % 10, "th")
  return f"{i}{suffix}"


@dataclasses.dataclass(frozen=True)
class MultiPasskeyConfig:
  """Settings of the passkey sample generator.

  Sample lengths (everything, tail and BOS included) are drawn uniformly from
  `len_intervals` evenly spaced grid points over [min_len, max_len] (both ends
  included, rounded to ints; with len_intervals=1 the only length is max_len),
  as the reference DuoAttention data set does.  Depths are uniform in
  [min_depth, max_depth], then sorted.
  """
  num_passkeys: int = 10
  passkey_words: int = 32
  min_depth: float = 0.05
  max_depth: float = 0.95
  min_len: int = 1000
  max_len: int = 32000
  len_intervals: int = 20
  seed: int = 0

  def __post_init__(self):
    if self.num_passkeys < 1:
      raise ValueError(f"num_passkeys must be >= 1, got {self.num_passkeys}")
    if self.passkey_words < 1:
      raise ValueError(f"passkey_words must be >= 1, got {self.passkey_words}")
    if not 0.0 <= self.min_depth <= self.max_depth <= 1.0:
      raise ValueError("depths need 0 <= min_depth <= max_depth <= 1, got "
                       f"min_depth={self.min_depth}, max_depth={self.max_depth}")
    if self.min_len < 1:
      raise ValueError(f"min_len must be >= 1, got {self.min_len}")
    if self.min_len > self.max_len:
      raise ValueError(f"min_len ({self.min_len}) is greater than max_len ({self.max_len})")
    if self.len_intervals < 1:
      raise ValueError(f"len_intervals must be >= 1, got {self.len_intervals}")
    if self.seed < 0:
      raise ValueError(f"seed must be >= 0, got {self.seed}")

  def length_grid(self) -> tuple[int, ...]:
    """The context lengths samples are drawn from (sorted, unique)."""
    if self.len_intervals == 1:
      return (self.max_len,)
    grid = np.linspace(self.min_len, self.max_len, self.len_intervals)
    return tuple(sorted({int(round(x)) for x in grid}))


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
  """One training sample.

  input_ids: int32 [T], T = the drawn length (<= max_len); loss_mask: bool
  [T], True exactly on the tail (positions >= context_len); passkeys/depths:
  per passkey, in insertion order (depths sorted, as fractions of the haystack
  tokens); needle_spans: token [start, end) of each inserted passkey sentence
  (in input_ids); context_len: tokens before the tail (special prefix
  included); prefix_len: the special prefix's tokens (BOS: 1, else 0).
  """
  input_ids: np.ndarray
  loss_mask: np.ndarray
  passkeys: list[str]
  depths: list[float]
  context_len: int
  needle_spans: list[tuple[int, int]]
  step: int
  prefix_len: int = 0


def special_prefix(tokenizer) -> list[int]:
  """Ids the tokenizer puts in front of a text at deployment (`tok(text)`).

  BOS for Llama / Mistral tokenizers, [] for SmolLM2's (no BOS) or for plain
  tokenizers whose `encode` ignores `add_special_tokens`. Found by encoding a
  probe with and without special tokens, as `serving.encode_prompt` does.
  """
  probe = "Remember this"
  plain = [int(i) for i in tokenizer.encode(probe, add_special_tokens=False)]
  if callable(tokenizer) and hasattr(tokenizer, "convert_ids_to_tokens"):  # HF: as deployed
    full = [int(i) for i in tokenizer(probe).input_ids]
  else:
    full = [int(i) for i in tokenizer.encode(probe, add_special_tokens=True)]
  for k in range(len(full) - len(plain) + 1):
    if full[k:k + len(plain)] == plain:
      return full[:k]
  raise ValueError("the tokenizer's special tokens wrap a text in a way duojax cannot split "
                   f"(with: {full}, without: {plain}); use a tokenizer whose special tokens "
                   "only prefix or suffix the text")


def make_sample(haystack_tokens: HaystackTokens, tokenizer, cfg: MultiPasskeyConfig,
                step: int, prefix: list[int] | None = None) -> Sample:
  """The sample for `step`: a pure function of (cfg, step) and the haystack.

  prefix: the special prefix (default `special_prefix(tokenizer)`; pass it to
  skip the probe). The sample is exactly the drawn length, <= cfg.max_len.
  """
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  n_hay = len(haystack_tokens)
  if n_hay < cfg.max_len:
    raise ValueError(
        f"haystack has {n_hay} tokens, shorter than max_len={cfg.max_len}; use a "
        "bigger haystack (more text) or a smaller max_len")
  prefix = special_prefix(tokenizer) if prefix is None else [int(i) for i in prefix]
  rng = np.random.default_rng([cfg.seed, step])
  grid = cfg.length_grid()
  total_len = grid[int(rng.integers(len(grid)))]
  depths = np.sort(rng.uniform(cfg.min_depth, cfg.max_depth, cfg.num_passkeys))
  words = rng.integers(len(NATO), size=(cfg.num_passkeys, cfg.passkey_words))
  passkeys = [" ".join(NATO[w] for w in row) for row in words]
  tail_text = "\n\n" + "\n".join(
      QUESTION_TEMPLATE.format(ordinal=ordinal(i + 1), passkey=p)
      for i, p in enumerate(passkeys))
  tail = np.asarray(tokenizer.encode(tail_text, add_special_tokens=False), np.int32)
  # The haystack + needles get what the prefix and the tail leave of the length.
  context_len = total_len - len(prefix) - len(tail)
  if context_len < 1:
    raise ValueError(
        f"a sample of {total_len} tokens has no room for haystack: the question/answer "
        f"tail alone takes {len(tail)} tokens (+{len(prefix)} special); raise min_len "
        f"(={cfg.min_len}) or use fewer/shorter passkeys")
  # Start at a sentence so the context opens cleanly; any start leaving
  # room for the whole context will do.
  starts = haystack_tokens.starts
  room = starts[starts <= n_hay - context_len]
  offset = int(room[int(rng.integers(len(room)))])
  needles = [NEEDLE_TEMPLATE.format(ordinal=ordinal(i + 1), passkey=p)
             for i, p in enumerate(passkeys)]
  try:
    context, spans = build_context(haystack_tokens, tokenizer, needles, depths.tolist(),
                                   context_len, offset=offset, snap="after")
  except ValueError as e:
    raise ValueError(f"{e} (min_len={cfg.min_len} is too small for "
                     f"{cfg.num_passkeys} passkeys of {cfg.passkey_words} words)") from e
  input_ids = np.concatenate([np.asarray(prefix, np.int32), context, tail]).astype(np.int32)
  assert len(input_ids) == total_len, (len(input_ids), total_len)
  n_pre = len(prefix)
  loss_mask = np.zeros(len(input_ids), np.bool_)
  loss_mask[n_pre + context_len:] = True
  return Sample(input_ids=input_ids, loss_mask=loss_mask, passkeys=passkeys,
                depths=depths.tolist(), context_len=int(n_pre + context_len),
                needle_spans=[(a + n_pre, b + n_pre) for a, b in spans], step=int(step),
                prefix_len=n_pre)


def iter_samples(haystack_tokens: HaystackTokens, tokenizer, cfg: MultiPasskeyConfig,
                 start_step: int = 0, num_steps: int | None = None) -> Iterator[Sample]:
  """Samples for steps start_step, start_step + 1, ... (forever if num_steps is None).

  Resuming at `start_step` reproduces the same stream as an unbroken run.
  """
  step = start_step
  while num_steps is None or step < start_step + num_steps:
    yield make_sample(haystack_tokens, tokenizer, cfg, step)
    step += 1
