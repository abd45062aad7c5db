"""A length x depth grid of retrieval prompts, run under several attention methods.

Every method answers the very same prompts (built once, before any model work),
so the methods differ only in their head masks. Cells are batched by length so
that a batch's padding stays small; see generation.py for the compile story.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from duojax.data.haystack import HaystackTokens
from duojax.data.mkniah import exact_value_match
from duojax.data.niah import contains_answer, depth_grid, rouge1_recall
from duojax.eval.generation import GenSettings, Programs, compile_programs, greedy_generate
from duojax.eval.methods import BuiltMethod
from duojax.model.handle import prepare_params

_SPLIT = "\u2063DUOJAX_SPLIT\u2063"  # a sentinel no chat template contains


@dataclasses.dataclass
class Cell:
  """One prompt of the grid; `prompt` holds exactly `length` token ids."""
  length: int
  depth: float
  sample: int
  prompt: list[int]
  answer: str
  info: dict = dataclasses.field(default_factory=dict)  # needle span etc., kept in the JSON


# -- grid axes ------------------------------------------------------------------------

def parse_lengths(text: str) -> list[int]:
  """'1000,2000,4k' -> [1000, 2000, 4000] (sorted, unique)."""
  out = set()
  for tok in str(text).split(","):
    tok = tok.strip().lower()
    if not tok:
      continue
    try:
      n = int(float(tok[:-1]) * 1000) if tok.endswith("k") else int(tok)
    except ValueError:
      raise ValueError(f"--lengths takes token counts like 1000,2000,4k; got {tok!r}") from None
    if n < 1:
      raise ValueError(f"--lengths values must be >= 1 token, got {n}")
    out.add(n)
  if not out:
    raise ValueError("--lengths is empty; give e.g. 1000,2000,4000,8000")
  return sorted(out)


def parse_depths(text: str) -> list[float]:
  """'10' -> 10 evenly spaced depths in [0, 1]; '0,0.5,1' -> those depths."""
  text = str(text).strip()
  if "," in text or "." in text:
    try:
      ds = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
      raise ValueError(f"--depths takes a count (10) or fractions (0,0.5,1); got {text!r}") from None
    if not ds:
      raise ValueError("--depths is empty")
    if any(not 0.0 <= d <= 1.0 for d in ds):
      raise ValueError(f"--depths fractions must lie in [0, 1], got {ds}")
    return sorted(set(ds))
  try:
    n = int(text)
  except ValueError:
    raise ValueError(f"--depths takes a count (10) or fractions (0,0.5,1); got {text!r}") from None
  return depth_grid(n)  # raises for n < 1


def check_haystack(hay: HaystackTokens, longest: int, offset: int = 0) -> None:
  """Fail before any model work when the haystack cannot fill the longest prompt."""
  if offset + longest > len(hay):
    raise ValueError(
        f"the haystack has {len(hay)} tokens but the longest prompt needs {longest} (from "
        f"offset {offset}); pass a longer --haystack or lower the largest --lengths value")


# -- chat wrapping --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """Token ids around a prompt body: the chat template's head and tail, or nothing."""
  head: tuple[int, ...] = ()
  tail: tuple[int, ...] = ()
  chat: bool = False

  def overhead(self) -> int:
    return len(self.head) + len(self.tail)

  def wrap(self, body: Sequence[int]) -> list[int]:
    return [*self.head, *(int(t) for t in body), *self.tail]


def prompt_format(tokenizer, chat: bool) -> PromptFormat:
  """The chat template split around the user's text, so a body built to an exact
  token count keeps it (no re-tokenising of the haystack)."""
  if not chat:
    return PromptFormat()
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("this tokenizer has no chat template; drop --chat")
  text = tokenizer.apply_chat_template([{"role": "user", "content": _SPLIT}],
                                       add_generation_prompt=True, tokenize=False)
  head, tail = text.split(_SPLIT)
  enc = lambda s: tuple(tokenizer.encode(s, add_special_tokens=False)) if s else ()
  return PromptFormat(enc(head), enc(tail), True)


# -- scoring --------------------------------------------------------------------------

def score(output: str, answer: str) -> dict:
  """contains and rouge1_recall for every answer; `exact` (the first number of the
  output is the answer) too when the answer is a number (passkey, multi-key NIAH)."""
  out = {"contains": bool(contains_answer(output, answer)),
         "rouge1_recall": round(float(rouge1_recall(output, answer)), 4)}
  if answer.isdigit():
    out["exact"] = bool(exact_value_match(output, answer))
  return out


def summarize(cells: list[dict], metric: str) -> dict:
  """Per method: mean `metric` overall, per length, and the [depth][length] grid."""
  out = {}
  for name in dict.fromkeys(c["method"] for c in cells):
    mine = [c for c in cells if c["method"] == name]
    lengths = sorted({c["length"] for c in mine})
    depths = sorted({c["depth"] for c in mine})
    val = lambda cs: float(np.mean([float(c["scores"][metric]) for c in cs])) if cs else None
    out[name] = {
        "mean": val(mine),
        "by_length": {str(l): val([c for c in mine if c["length"] == l]) for l in lengths},
        "lengths": lengths, "depths": depths,
        "grid": [[val([c for c in mine if c["length"] == l and c["depth"] == d]) for l in lengths]
                 for d in depths],
    }
  return out


# -- running --------------------------------------------------------------------------

def abstract_weights(params, weights_dtype: str = "bf16"):
  """The shapes (ShapeDtypeStructs, QArrays for int8) of `prepare_params`' result, for
  compiling ahead of time without quantising anything."""
  if weights_dtype == "bf16":
    return params
  import jax
  from duojax.model import quant
  return jax.eval_shape(lambda p: quant.quantize_params(p, weights_dtype), params)


def run_grid(params, config, tokenizer, cells: list[Cell], methods: list[BuiltMethod],
             gen: GenSettings, dtype=None, progress: bool = True,
             on_batch: Callable[[str, list[dict]], None] | None = None,
             programs: Programs | None = None) -> tuple[list[dict], dict]:
  """Generates every cell under every method.

  params: the model's weights in their stored head order (each method reorders
  its own copy). programs: a dict to keep the compiled programs in across calls
  (None: compiled for this call; every method's pair is compiled up front, in
  parallel: see generation.compile_programs). gen.weights_dtype "int8" runs each method
  on its reordered weights quantised (model.handle.prepare_params). Returns (one dict per (method,
  cell), seconds per method, with "compile" the up-front compile time).
  """
  from tqdm.auto import tqdm
  t0 = time.perf_counter()
  # Tests swap greedy_generate for a stand-in model: that one compiles nothing.
  real = greedy_generate is _GREEDY and params is not None
  if real:
    programs = compile_programs(abstract_weights(params, gen.weights_dtype), config,
                                [(bm.mask, bm.method.compensation) for bm in methods], gen,
                                dtype, programs)
  kw = {"programs": programs} if real else {}
  compile_s = round(time.perf_counter() - t0, 2)
  order = sorted(range(len(cells)), key=lambda i: (cells[i].length, i))
  batches = [order[i:i + gen.batch_size] for i in range(0, len(order), gen.batch_size)]
  results, seconds = [], {}
  bar = tqdm(total=len(cells) * len(methods), desc="cells", unit="cell", disable=not progress)
  for bm in methods:
    t0 = time.perf_counter()
    p = params if params is None else prepare_params(params, bm.mask, gen.weights_dtype)
    g = dataclasses.replace(gen, compensation=bm.method.compensation)
    for batch in batches:
      bar.set_postfix_str(f"{bm.method.name} {cells[batch[0]].length} tok")
      outs = greedy_generate(p, config, [cells[i].prompt for i in batch], bm.mask, g, dtype,
                             **kw)
      rows = []
      for i, ids in zip(batch, outs):
        c = cells[i]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        rows.append({"method": bm.method.name, "length": c.length, "depth": round(c.depth, 4),
                     "sample": c.sample, "answer": c.answer, "output": text,
                     "scores": score(text, c.answer), **c.info})
      results += rows
      if on_batch:
        on_batch(bm.method.name, rows)
      bar.update(len(batch))
    seconds[bm.method.name] = round(time.perf_counter() - t0, 2)
    del p
  bar.close()
  seconds["compile"] = compile_s
  return results, seconds


_GREEDY = greedy_generate
