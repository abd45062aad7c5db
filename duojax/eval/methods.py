"""Attention methods compared in one evaluation run, and their head masks.

A method is an attention kind, for pattern-based kinds a sparsity (the
fraction of KV heads that stream) and a pattern source, and whether streaming
heads keep RazorAttention's compensation token. A method token reads
`LABEL[@S][+comp]`:

  full, streaming      no pattern
  duo                  the run's own pattern (--pattern, the checkpoint's, the shipped one)
  random               a seeded random pattern
  razor, rscore, NAME  a pattern named with --patterns NAME=DIR (`retrieval-score`
                       is read as `rscore`), or a pattern folder given as LABEL
  @S                   pin a sparsity; without it duo/random/patterns expand
                       over every --sparsity value
  +comp                streaming heads keep the compensation token

`--attention full,duo,streaming,random --sparsity 0.25,0.5` expands to full,
duo@0.25, duo@0.5, streaming, random@0.25, random@0.5; `--attention
duo,razor,duo+comp --sparsity 0.5 --patterns razor=DIR` to duo@0.5, razor@0.5,
duo@0.5+comp. Every method of a run answers the same prompts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Mapping

from duojax.config import ModelConfig
from duojax.pattern import HeadMask, HeadPattern, PatternError, load_any
from duojax.serving import ATTENTION_KINDS, DEPLOY_RECENT, DEPLOY_SINK, make_mask

_SPARSE_KINDS = ("duo", "random")
COMP_SUFFIX = "+comp"
# Other spellings of a pattern source, and how to make the pattern when it is missing.
SOURCE_ALIASES = {"retrieval-score": "rscore", "retrieval_score": "rscore"}
SOURCE_HINTS = {
    "razor": "python -m duojax.identify razor --out DIR",
    "rscore": "python -m duojax.identify retrieval-score --haystack PATH --out DIR",
}


@dataclasses.dataclass(frozen=True)
class Method:
  kind: str  # one of serving.ATTENTION_KINDS
  sparsity: float | None = None  # duo/random only; None = the pattern's or model's default
  source: str | None = None  # kind duo only: a named pattern or folder; None = the run's own
  compensation: bool = False  # streaming heads keep the compensation token

  def __post_init__(self):
    if self.source is not None and self.kind != "duo":
      raise ValueError(f"a pattern source ({self.source!r}) goes with kind duo, not {self.kind!r}")

  @property
  def label(self) -> str:
    return self.source or self.kind

  @property
  def name(self) -> str:
    n = self.label
    if self.kind in _SPARSE_KINDS and self.sparsity is not None:
      n += f"@{self.sparsity:g}"
    return n + (COMP_SUFFIX if self.compensation else "")


def parse_sparsities(text: str | None) -> list[float | None]:
  """'0.25,0.5' -> [0.25, 0.5]; None -> [None] (the default sparsity)."""
  if text is None or not str(text).strip():
    return [None]
  out = []
  for tok in str(text).split(","):
    try:
      s = float(tok)
    except ValueError:
      raise ValueError(f"--sparsity takes numbers like 0.5 or 0.25,0.5,0.75; got {tok!r}") from None
    if not 0.0 <= s <= 1.0:
      raise ValueError(f"--sparsity values must lie in [0, 1], got {s}")
    out.append(s)
  return out


def parse_named_patterns(text: str | None) -> dict[str, str]:
  """'razor=DIR,rscore=DIR' -> {"razor": "DIR", "rscore": "DIR"} (names as methods use them)."""
  out: dict[str, str] = {}
  for tok in [t.strip() for t in str(text or "").split(",") if t.strip()]:
    name, eq, folder = tok.partition("=")
    name = SOURCE_ALIASES.get(name.strip(), name.strip())
    if not eq or not name or not folder.strip():
      raise ValueError(f"--patterns takes NAME=DIR pairs like razor=runs/razor; got {tok!r}")
    if name in ATTENTION_KINDS or "@" in name or "+" in name:
      raise ValueError(f"--patterns name {name!r} is reserved or holds '@'/'+'; pick another")
    out[name] = folder.strip()
  return out


def _source(label: str, sources: Iterable[str]) -> str:
  """A token's label as a pattern source, or an error naming the fix."""
  label = SOURCE_ALIASES.get(label, label)
  if label in set(sources) or Path(label).is_dir():
    return label
  if label in SOURCE_HINTS:
    raise ValueError(f"{label} names no pattern: pass --patterns {label}=DIR (make one with "
                     f"`{SOURCE_HINTS[label]}`)")
  raise ValueError(f"--attention kinds are {', '.join(ATTENTION_KINDS)}, or a pattern named with "
                   f"--patterns NAME=DIR, or a pattern folder; got {label!r}")


def parse_methods(attention: str, sparsity: str | None = None,
                  sources: Iterable[str] = ()) -> list[Method]:
  """Comma-separated `LABEL[@S][+comp]` tokens x the --sparsity list, deduplicated.

  sources: the pattern names a label may use besides the kinds (--patterns).
  """
  sparsities = parse_sparsities(sparsity)
  sources = tuple(sources)
  methods: list[Method] = []
  for tok in [t.strip() for t in attention.split(",") if t.strip()]:
    body, comp = (tok[:-len(COMP_SUFFIX)], True) if tok.endswith(COMP_SUFFIX) else (tok, False)
    if "+" in body:
      raise ValueError(f"`{tok}`: the only suffix is {COMP_SUFFIX} (the compensation token)")
    label, _, pinned = body.partition("@")
    if label in ATTENTION_KINDS:
      kind, source = label, None
    else:
      kind, source = "duo", _source(label, sources)
    if pinned and kind not in _SPARSE_KINDS:
      raise ValueError(f"only duo and random (and pattern sources) take a sparsity (`{tok}`)")
    if comp and kind == "full":
      raise ValueError(f"`{tok}`: full attention streams no head, so {COMP_SUFFIX} means nothing")
    if kind not in _SPARSE_KINDS:
      new = [Method(kind, compensation=comp)]
    elif pinned:
      new = [Method(kind, parse_sparsities(pinned)[0], source, comp)]
    else:
      new = [Method(kind, s, source, comp) for s in sparsities]
    methods += [m for m in new if m not in methods]
  if not methods:
    raise ValueError("--attention names no method; e.g. --attention full,duo,streaming")
  return methods


def resolve_pattern(ckpt_folder: Path, ckpt_name: str | None,
                    pattern_dir: str | None) -> tuple[HeadPattern | None, str | None]:
  """(pattern, folder) duo uses: --pattern, else the checkpoint's default, else
  the pattern shipped for an embedded model (a checkpoint converted before the
  pattern shipped records none). (None, None) when there is none anywhere."""
  from duojax.checkpoint import store
  from duojax.checkpoint.embedded import EMBEDDED, shipped_pattern_dir
  candidates = [Path(pattern_dir)] if pattern_dir else [store.default_pattern_dir(ckpt_folder)]
  if not pattern_dir and (ckpt_name or "smollm2-135m") in EMBEDDED:
    candidates.append(shipped_pattern_dir(ckpt_name or "smollm2-135m"))
  for d in candidates:
    if d is not None and (pattern_dir or d.is_dir()):
      return load_any(d), str(d)
  return None, None


@dataclasses.dataclass(frozen=True)
class BuiltMethod:
  method: Method
  mask: HeadMask | None  # None = full attention

  @property
  def retrieval_fraction(self) -> float:
    return 1.0 if self.mask is None else self.mask.retrieval_fraction

  def describe(self) -> dict:
    m = self.mask
    return {"name": self.method.name, "kind": self.method.kind, "sparsity": self.method.sparsity,
            "source": self.method.source, "compensation": self.method.compensation,
            "retrieval_fraction": round(self.retrieval_fraction, 4),
            "sink": None if m is None else m.sink, "recent": None if m is None else m.recent}


def build_methods(methods: list[Method], config: ModelConfig, pattern: HeadPattern | None,
                  sink: int | None = None, recent: int | None = None, seed: int = 0,
                  patterns: Mapping[str, HeadPattern] | None = None) -> list[BuiltMethod]:
  """Masks for every method (all checked before any model work starts).

  pattern: what plain `duo` uses; patterns: the named sources (--patterns); a
  source that is neither is read as a pattern folder.
  """
  sink = DEPLOY_SINK if sink is None else sink
  recent = DEPLOY_RECENT if recent is None else recent
  if any(m.kind == "duo" and m.source is None for m in methods) and pattern is None:
    raise PatternError("duo needs a head pattern: pass --pattern DIR (ours or a reference "
                       "DuoAttention folder), or use a checkpoint with a default pattern")
  named = dict(patterns or {})
  out = []
  for m in methods:
    pat = pattern
    if m.source is not None:
      if m.source not in named:
        if not Path(m.source).is_dir():
          hint = SOURCE_HINTS.get(m.source, "identify or import one")
          raise PatternError(f"method {m.name} needs the pattern {m.source!r}: pass it as "
                             f"--patterns {m.source}=DIR ({hint})")
        named[m.source] = load_any(m.source)
      pat = named[m.source]
    mask = make_mask(config, m.kind, pat, m.sparsity, None, sink, recent, seed)
    if m.compensation and mask is None:
      raise ValueError(f"{m.name}: the compensation token needs streaming heads")
    out.append(BuiltMethod(m, mask))
  return out
