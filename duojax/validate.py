"""Argument checks shared by the command lines, run before any model is loaded.

Each raises ArgumentError (a ValueError) whose message names the flag and the fix.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path


class ArgumentError(ValueError):
  """A command-line value that cannot work; the message names the flag and the fix."""


def finite(flag: str, v: float | None) -> None:
  if v is not None and not math.isfinite(v):
    raise ArgumentError(f"{flag} must be a finite number, got {v}")


def in_range(flag: str, v: float | None, lo: float, hi: float, lo_open: bool = False,
             hi_open: bool = False, hint: str = "") -> None:
  """lo <= v <= hi (open ends exclusive); None passes."""
  if v is None:
    return
  finite(flag, v)
  ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  if not ok:
    iv = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    raise ArgumentError(f"{flag} must be in {iv}, got {v:g}" + (f"; {hint}" if hint else ""))


def at_least(flag: str, v: int | None, lo: int, hint: str = "") -> None:
  if v is not None and v < lo:
    raise ArgumentError(f"{flag} must be >= {lo}, got {v}" + (f"; {hint}" if hint else ""))


def sampling(temperature: float, top_p: float) -> None:
  finite("--temperature", temperature)
  if temperature < 0:
    raise ArgumentError(f"--temperature must be >= 0 (0 = greedy), got {temperature:g}")
  in_range("--top-p", top_p, 0.0, 1.0, lo_open=True, hint="1 keeps every token")


def selection(sparsity: float | None, threshold: float | None) -> None:
  """--sparsity is the fraction of KV heads that stream, --threshold a gate value."""
  in_range("--sparsity", sparsity, 0.0, 1.0, hi_open=True,
           hint="it is the fraction of KV heads that stream (1 would leave none retrieval; "
                "use --attention streaming for that)")
  in_range("--threshold", threshold, 0.0, 1.0,
           hint="gates lie in [0, 1]; a head is retrieval iff its gate >= the threshold")


def window(sink: int | None, recent: int | None) -> None:
  at_least("--sink", sink, 0, "the attention-sink tokens every streaming head keeps")
  at_least("--recent", recent, 1, "the window of recent tokens a streaming head keeps")


def capped_window(sink: int, recent: int, capacity: int) -> tuple[int, int]:
  """(sink, recent) no larger than `capacity` tokens in all.

  A streaming head with sink + recent >= the tokens a run can hold sees every earlier token,
  exactly like a retrieval head, so a larger buffer only wastes memory (it would exceed full
  attention's cache). The result keeps that exact behaviour with sink + recent == capacity.
  """
  if sink + recent <= capacity:
    return sink, recent
  sink = min(sink, capacity - 1)
  return sink, capacity - sink


def readable_text(flag: str, path: str) -> str:
  """The whole UTF-8 text of a file given on the command line."""
  p = Path(path)
  if not p.is_file():
    what = "a folder" if p.is_dir() else "not found"
    raise ArgumentError(f"{flag} {path}: {what}; pass a text file")
  try:
    data = p.read_bytes()
  except OSError as e:
    raise ArgumentError(f"{flag} {path}: cannot read it ({e.strerror or e})") from e
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ArgumentError(f"{flag} {path} is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at "
                        f"offset {e.start}); pass a text file, or convert it to UTF-8") from e
  if "\x00" in text:
    raise ArgumentError(f"{flag} {path} holds NUL bytes: it is a binary file, not text; pass a "
                        "text file")
  if not text.strip():
    raise ArgumentError(f"{flag} {path} is empty; pass a file with the prompt text")
  return text


def writable_file(flag: str, path: str | Path | None) -> None:
  """Fails now, not after hours of work, if `path` cannot be written (creates its folder)."""
  if path is None:
    return
  p = Path(path)
  if p.is_dir():
    raise ArgumentError(f"{flag} {path} is a folder; pass a file path")
  _probe(flag, path, p.parent)
  if p.exists() and not os.access(p, os.W_OK):
    raise ArgumentError(f"{flag} {path} exists and is not writable; pick another path")


def writable_dir(flag: str, path: str | Path | None) -> None:
  """Fails now if the output folder `path` cannot be created or written."""
  if path is None:
    return
  p = Path(path)
  if p.exists() and not p.is_dir():
    raise ArgumentError(f"{flag} {path} is a file; pass a folder path")
  _probe(flag, path, p)


def _probe(flag: str, path, folder: Path) -> None:
  try:
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()
  except OSError as e:
    raise ArgumentError(f"{flag} {path}: cannot write there ({e.strerror or e}); pick a writable "
                        "path") from e
