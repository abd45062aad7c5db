"""Haystack text: loading, one-time tokenisation, sentence boundaries in token space.

A *tokenizer* here is anything with `encode(text, add_special_tokens=False) ->
list[int]` and `decode(ids) -> str`; a Hugging Face tokenizer qualifies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

# A sentence starts at the first non-space character after sentence punctuation
# (optionally closed by a quote or bracket) plus whitespace, or after a newline.
_AFTER_PUNCT = r"[.?!][\"')\]]*\s+"
_SENTENCE_START = re.compile(rf"(?:{_AFTER_PUNCT}|\n\s*)(?=\S)")
_PARAGRAPH_START = re.compile(rf"(?:{_AFTER_PUNCT}|\n[ \t]*\n\s*)(?=\S)")

# Boundary kinds: how the text before a sentence start ends.  A needle is
# encoded differently for each so that spacing stays natural (see
# `encode_needle`).
SPACE, NEWLINE = 0, 1


def load_haystack(path: str | Path, *, text_field: str = "text") -> str:
  """Reads haystack text.

  `path` may be a folder of `.txt` files (sorted by name, joined with blank
  lines), one `.txt` file, or a `.json`/`.jsonl` file holding strings or
  objects with a `text_field` field (read with `datasets` when installed,
  else with the stdlib json module).
  """
  p = Path(path).expanduser()
  if not p.exists():
    raise ValueError(f"haystack path {str(p)!r} does not exist; pass a folder of "
                     ".txt files, a .txt file, or a .json/.jsonl file")
  if p.is_dir():
    files = sorted(f for f in p.glob("*.txt") if f.is_file())
    if not files:
      raise ValueError(f"haystack folder {str(p)!r} holds no .txt files; add some "
                       "or pass a .txt/.json/.jsonl file instead")
    parts = [f.read_text(encoding="utf-8").strip() for f in files]
  elif p.suffix.lower() == ".txt":
    parts = [p.read_text(encoding="utf-8").strip()]
  elif p.suffix.lower() in (".json", ".jsonl"):
    parts = [t.strip() for t in _read_json_texts(p, text_field)]
  else:
    raise ValueError(f"haystack file {str(p)!r} has unsupported type "
                     f"{p.suffix!r}; use .txt, .json or .jsonl (or a folder of .txt)")
  text = "\n\n".join(t for t in parts if t)
  if not text:
    raise ValueError(f"haystack at {str(p)!r} is empty; it needs natural text")
  return text


def _read_json_texts(p: Path, field: str) -> list[str]:
  try:
    import datasets  # optional: only the data extra installs it
  except ImportError:
    datasets = None
  if datasets is not None:
    try:
      ds = datasets.load_dataset("json", data_files=str(p), split="train")
    except Exception:
      ds = None  # e.g. a plain list of strings, which `datasets` cannot type
    if ds is not None:
      if field not in ds.column_names:
        raise ValueError(f"{str(p)!r} has no {field!r} field (columns: "
                         f"{ds.column_names}); pass text_field=... naming the text column")
      return [str(t) for t in ds[field] if t]
  raw = p.read_text(encoding="utf-8")
  if p.suffix.lower() == ".jsonl":
    records = [json.loads(line) for line in raw.splitlines() if line.strip()]
  else:
    records = json.loads(raw)
    if isinstance(records, dict):
      records = [records]
    if not isinstance(records, list):
      raise ValueError(f"{str(p)!r} must hold a list of strings or of objects with "
                       f"a {field!r} field")
  texts = []
  for i, r in enumerate(records):
    if isinstance(r, str):
      texts.append(r)
    elif isinstance(r, dict) and field in r:
      texts.append(str(r[field]))
    else:
      raise ValueError(f"{str(p)!r} record {i} has no {field!r} field; records must "
                       f"be strings or objects with a {field!r} field (or pass text_field=...)")
  return texts


class Window(NamedTuple):
  """A run of haystack tokens and the sentence starts inside it.

  ids: int32 [n]; starts: int64 [k] sorted offsets into `ids` where a sentence
  begins; kinds: int8 [k], SPACE or NEWLINE per start.
  """
  ids: np.ndarray
  starts: np.ndarray
  kinds: np.ndarray


class HaystackTokens:
  """A haystack tokenised once, with sentence starts in token space.

  Attributes:
    ids: int32 [N] token ids of the whole text (read-only).
    starts: int64 [S] sorted token indices where a sentence begins; always
      holds 0.
    kinds: int8 [S] SPACE if the sentence follows punctuation + spaces,
      NEWLINE if it follows a line break (or is the start of the text).

  `line_breaks=False` counts only blank lines (plus sentence punctuation) as
  boundaries, which suits hard-wrapped text whose single newlines fall
  mid-sentence.
  """

  def __init__(self, text: str, tokenizer, *, line_breaks: bool = True):
    if not text:
      raise ValueError("haystack text is empty; load one with load_haystack()")
    pattern = _SENTENCE_START if line_breaks else _PARAGRAPH_START
    # Char index where each sentence starts, and whether a newline preceded it.
    bounds = [(m.end(), "\n" in m.group()) for m in pattern.finditer(text)]
    ids, tok_starts = _tokenize_with_starts(text, tokenizer, bounds)
    self.ids = np.asarray(ids, dtype=np.int32)
    self.ids.setflags(write=False)
    n = len(self.ids)
    if n == 0:
      raise ValueError("the tokenizer turned the haystack into no tokens")
    # Sentence-start kinds indexed by token; the text start counts as a
    # line start.  Later boundaries win when two map to the same token.
    kind = np.full(n, -1, np.int8)
    kind[0] = NEWLINE
    for t, (_, nl) in zip(tok_starts, bounds):
      if 0 < t < n:
        kind[t] = NEWLINE if nl else SPACE
    self._kind = kind
    self.starts = np.flatnonzero(kind >= 0).astype(np.int64)
    self.kinds = kind[self.starts]
    self.starts.setflags(write=False)
    self.kinds.setflags(write=False)

  @classmethod
  def from_path(cls, path, tokenizer, **kw) -> "HaystackTokens":
    return cls(load_haystack(path), tokenizer, **kw)

  def __len__(self) -> int:
    return len(self.ids)

  def __repr__(self) -> str:
    return f"HaystackTokens({len(self)} tokens, {len(self.starts)} sentences)"

  def _indices(self, n_tokens: int, offset: int, allow_repeat: bool) -> np.ndarray:
    n = len(self.ids)
    if n_tokens < 0 or offset < 0:
      raise ValueError(f"need n_tokens >= 0 and offset >= 0, got {n_tokens}, {offset}")
    if not allow_repeat and offset + n_tokens > n:
      raise ValueError(
          f"haystack is too short: it has {n} tokens but {n_tokens} tokens were "
          f"requested from offset {offset}; use a longer haystack (more text) "
          "or allow_repeat=True")
    # Wrapping repeats the text from its start, which is itself a sentence start.
    return (offset + np.arange(n_tokens)) % n

  def take(self, n_tokens: int, offset: int = 0, allow_repeat: bool = False) -> np.ndarray:
    """Exactly `n_tokens` ids starting at `offset` -> int32 [n_tokens]."""
    return self.ids[self._indices(n_tokens, offset, allow_repeat)]

  def window(self, n_tokens: int, offset: int = 0, allow_repeat: bool = False) -> Window:
    """Like `take`, plus the sentence starts that fall inside the window."""
    idx = self._indices(n_tokens, offset, allow_repeat)
    k = self._kind[idx]
    rel = np.flatnonzero(k >= 0).astype(np.int64)
    return Window(self.ids[idx], rel, k[rel])


def _tokenize_with_starts(text: str, tokenizer, bounds) -> tuple[list[int], list[int]]:
  """Token ids of `text` and, per char boundary, the token index it falls in."""
  chars = [c for c, _ in bounds]
  offsets = _offsets(text, tokenizer)
  if offsets is not None:
    ids, spans = offsets
    ends = np.asarray([e for _, e in spans], np.int64)
    # The token holding the sentence's first char: the first one ending after
    # it.  Byte-level BPE puts the leading space in that token too.
    return ids, np.searchsorted(ends, np.asarray(chars, np.int64), side="right").tolist()
  # Fallback for tokenizers without offsets: encode sentence by sentence, so
  # boundaries are exact by construction.  After punctuation the spaces go
  # with the next sentence (as BPE pre-tokenisers do); line breaks stay with
  # the previous one.
  cuts = []
  for c, nl in bounds:
    cut = c
    if not nl:
      while cut > 0 and text[cut - 1] in " \t":
        cut -= 1
    cuts.append(cut)
  ids: list[int] = []
  tok_starts = []
  prev = 0
  for cut in cuts:
    if cut > prev:
      ids.extend(tokenizer.encode(text[prev:cut], add_special_tokens=False))
      prev = cut
    tok_starts.append(len(ids))
  ids.extend(tokenizer.encode(text[prev:], add_special_tokens=False))
  return ids, tok_starts


def _offsets(text: str, tokenizer):
  """(ids, [(start, end)] char spans) from a fast HF tokenizer, else None."""
  if not getattr(tokenizer, "is_fast", False) or not callable(tokenizer):
    return None
  try:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = list(enc["input_ids"]), list(enc["offset_mapping"])
  except Exception:
    return None
  if len(ids) != len(spans):
    return None
  return ids, spans


# --- needle insertion shared by passkey.py and niah.py -------------------------

def encode_needle(tokenizer, sentence: str, kind: int) -> list[int]:
  """Token ids for `sentence` inserted before a sentence start of `kind`.

  After punctuation the following haystack token carries its own leading
  space, so the needle gets one in front; after a line break it goes at the
  line start and ends with its own newline.
  """
  text = " " + sentence if kind == SPACE else sentence + "\n"
  return tokenizer.encode(text, add_special_tokens=False)


def snap_at_or_after(starts: np.ndarray, target: float) -> int:
  """Index into `starts` of the first start >= target (else the last start)."""
  i = int(np.searchsorted(starts, target, side="left"))
  return min(i, len(starts) - 1)


def snap_nearest(starts: np.ndarray, target: float) -> int:
  """Index into `starts` of the start closest to target (ties: the earlier)."""
  return int(np.argmin(np.abs(starts.astype(np.float64) - target)))


def build_context(haystack: HaystackTokens, tokenizer, sentences: Sequence[str],
                  depths: Sequence[float], total_len: int, *, offset: int = 0,
                  snap: str = "after", allow_repeat: bool = False
                  ) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """Haystack with `sentences` inserted at sentence starts; exactly `total_len` tokens.

  depths: one float in [0, 1] per sentence, non-decreasing, as a fraction of
  the haystack tokens in the result; each is snapped to a sentence start
  (`snap`: "after" = first start at or after it, "nearest" = closest start).
  Returns (ids int32 [total_len], [(start, end)] token span of each sentence).
  """
  if len(sentences) != len(depths):
    raise ValueError("need one depth per needle sentence")
  if any(b < a for a, b in zip(depths, depths[1:])):
    raise ValueError(f"depths must be non-decreasing, got {list(depths)}")
  pick = {"after": snap_at_or_after, "nearest": snap_nearest}[snap]
  variants = [(encode_needle(tokenizer, s, SPACE), encode_needle(tokenizer, s, NEWLINE))
              for s in sentences]
  # Size the haystack as if every needle used its SPACE form, place the needles,
  # then correct the haystack length for the forms actually used.  The window
  # keeps its offset, so the chosen starts do not move.
  hay_len = total_len - sum(len(v[0]) for v in variants)
  if hay_len < 1:
    raise ValueError(
        f"context length {total_len} leaves no room for haystack: the needle "
        f"sentences alone take {total_len - hay_len} tokens; raise the length or "
        "use fewer/shorter needles")
  win = haystack.window(hay_len, offset, allow_repeat)
  chosen = [pick(win.starts, d * hay_len) for d in depths]
  pos = [int(win.starts[i]) for i in chosen]
  needles = [variants[j][int(win.kinds[i])] for j, i in enumerate(chosen)]
  final_len = total_len - sum(len(x) for x in needles)
  if final_len != hay_len:
    if final_len < 1:
      raise ValueError(f"context length {total_len} leaves no room for haystack")
    win = haystack.window(final_len, offset, allow_repeat)
    pos = [min(p, final_len) for p in pos]
  pieces, spans, prev, out_len = [], [], 0, 0
  for p, needle in zip(pos, needles):
    pieces.append(win.ids[prev:p])
    out_len += p - prev
    pieces.append(np.asarray(needle, np.int32))
    spans.append((out_len, out_len + len(needle)))
    out_len += len(needle)
    prev = p
  pieces.append(win.ids[prev:])
  ids = np.concatenate(pieces).astype(np.int32)
  assert len(ids) == total_len, (len(ids), total_len)
  return ids, spans
