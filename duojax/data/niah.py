"""Needle-in-a-haystack prompts and answer scoring for evaluation."""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

from duojax.data.haystack import HaystackTokens, build_context

DEFAULT_QUESTION_TEMPLATE = "\n\nBased on the content above, answer: {question}\nAnswer:"

PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. "
                  "Find it and memorize them. I will quiz you about the important "
                  "information there.\n\n")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_TEMPLATE = "\n\n{question} The pass key is"


@dataclasses.dataclass(frozen=True)
class NeedleTask:
  """A fact to hide (`needle`), the question about it and the expected answer."""
  needle: str = ("The best thing to do in San Francisco is eat a sandwich and sit in "
                 "Dolores Park on a sunny day.")
  question: str = "What is the best thing to do in San Francisco?"
  answer: str = "eat a sandwich and sit in Dolores Park on a sunny day"

  def __post_init__(self):
    for name in ("needle", "question", "answer"):
      if not getattr(self, name).strip():
        raise ValueError(f"NeedleTask.{name} is empty; give it some text")


def depth_grid(n: int) -> list[float]:
  """`n` depths evenly spaced over [0, 1], ends included; n=1 gives [0.5]."""
  if n < 1:
    raise ValueError(f"depth_grid needs n >= 1 points, got {n}")
  if n == 1:
    return [0.5]  # one probe: the middle says more than either end
  return [float(x) for x in np.linspace(0.0, 1.0, n)]


def build_niah_prompt(haystack_tokens: HaystackTokens, tokenizer, task: NeedleTask,
                      context_len: int, depth: float, *, offset: int = 0,
                      question_template: str = DEFAULT_QUESTION_TEMPLATE,
                      prefix: str = "", allow_repeat: bool = False
                      ) -> tuple[np.ndarray, tuple[int, int]]:
  """A prompt of exactly `context_len` tokens with the needle at `depth`.

  Layout: prefix + haystack (from token `offset`) with the needle sentence
  inserted at the sentence start nearest to depth * haystack_tokens_used +
  question_template.format(question=task.question).  `prefix` (e.g. an
  instruction) and the question count towards context_len.

  Returns (prompt_ids int32 [context_len], needle_span): the needle occupies
  prompt_ids[start:end], and `start` is its insertion point.
  """
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}")
  if context_len < 1:
    raise ValueError(f"context_len must be >= 1, got {context_len}")
  pre = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
  suffix = tokenizer.encode(question_template.format(question=task.question),
                            add_special_tokens=False)
  body_len = context_len - len(pre) - len(suffix)
  if body_len < 1:
    raise ValueError(f"context_len {context_len} is too small: prefix and question "
                     f"alone take {len(pre) + len(suffix)} tokens")
  body, spans = build_context(haystack_tokens, tokenizer, [task.needle], [depth],
                              body_len, offset=offset, snap="nearest",
                              allow_repeat=allow_repeat)
  ids = np.concatenate([np.asarray(pre, np.int32), body,
                        np.asarray(suffix, np.int32)]).astype(np.int32)
  start, end = spans[0]
  return ids, (start + len(pre), end + len(pre))


def build_passkey_prompt(haystack_tokens: HaystackTokens, tokenizer, context_len: int,
                         depth: float, seed: int, *, offset: int = 0,
                         prefix: str = PASSKEY_PREFIX,
                         question_template: str = PASSKEY_TEMPLATE,
                         allow_repeat: bool = False) -> tuple[np.ndarray, str]:
  """The classic numeric pass-key prompt: a seeded 5-digit key hidden at `depth`.

  Returns (prompt_ids int32 [context_len], answer) where answer is the key.
  """
  key = str(int(np.random.default_rng(seed).integers(10_000, 100_000)))
  task = NeedleTask(needle=PASSKEY_NEEDLE.format(key=key), question=PASSKEY_QUESTION,
                    answer=key)
  ids, _ = build_niah_prompt(haystack_tokens, tokenizer, task, context_len, depth,
                             offset=offset, question_template=question_template,
                             prefix=prefix, allow_repeat=allow_repeat)
  return ids, key


def _normalise(s: str) -> str:
  return " ".join(s.lower().split())


def _words(s: str) -> list[str]:
  return re.findall(r"\w+", s.lower())


def contains_answer(output: str, answer: str) -> bool:
  """Whether `answer` occurs in `output`, ignoring case and whitespace runs."""
  if not answer.strip():
    raise ValueError("answer is empty; nothing to look for")
  return _normalise(answer) in _normalise(output)


def rouge1_recall(output: str, answer: str) -> float:
  """ROUGE-1 recall: share of the answer's words found in the output.

  Words are lowercased \\w+ runs; each output word matches at most as many
  answer words as it occurs (clipped counts).
  """
  ref = collections.Counter(_words(answer))
  if not ref:
    raise ValueError("answer has no words; ROUGE-1 recall is undefined")
  hyp = collections.Counter(_words(output))
  overlap = sum(min(c, hyp[w]) for w, c in ref.items())
  return overlap / sum(ref.values())
