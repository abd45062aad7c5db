"""Attention methods compared in one evaluation run, and their head masks.

A method is an attention kind plus, for `duo` and `random`, a sparsity (the
fraction of KV heads that stream). `--attention full,duo,streaming,random
--sparsity 0.25,0.5` expands to full, duo@0.25, duo@0.5, streaming,
random@0.25, random@0.5; a token may also pin its own sparsity (`duo@0.75`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from duojax.config import ModelConfig
from duojax.pattern import HeadMask, HeadPattern, PatternError, load_any
from duojax.serving import ATTENTION_KINDS, DEPLOY_RECENT, DEPLOY_SINK, make_mask

_SPARSE_KINDS = ("duo", "random")


@dataclasses.dataclass(frozen=True)
class Method:
  kind: str  # one of serving.ATTENTION_KINDS
  sparsity: float | None = None  # duo/random only; None = the pattern's or model's default

  @property
  def name(self) -> str:
    if self.kind in _SPARSE_KINDS and self.sparsity is not None:
      return f"{self.kind}@{self.sparsity:g}"
    return self.kind


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


def parse_methods(attention: str, sparsity: str | None = None) -> list[Method]:
  """Comma-separated kinds (optionally `kind@S`) x the --sparsity list, deduplicated."""
  sparsities = parse_sparsities(sparsity)
  methods: list[Method] = []
  for tok in [t.strip() for t in attention.split(",") if t.strip()]:
    kind, _, pinned = tok.partition("@")
    if kind not in ATTENTION_KINDS:
      raise ValueError(f"--attention kinds are {', '.join(ATTENTION_KINDS)}; got {kind!r}")
    if pinned and kind not in _SPARSE_KINDS:
      raise ValueError(f"only duo and random take a sparsity (`{tok}`)")
    if kind not in _SPARSE_KINDS:
      new = [Method(kind)]
    elif pinned:
      new = [Method(kind, parse_sparsities(pinned)[0])]
    else:
      new = [Method(kind, s) for s in sparsities]
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
            "retrieval_fraction": round(self.retrieval_fraction, 4),
            "sink": None if m is None else m.sink, "recent": None if m is None else m.recent}


def build_methods(methods: list[Method], config: ModelConfig, pattern: HeadPattern | None,
                  sink: int | None = None, recent: int | None = None,
                  seed: int = 0) -> list[BuiltMethod]:
  """Masks for every method (all checked before any model work starts)."""
  sink = DEPLOY_SINK if sink is None else sink
  recent = DEPLOY_RECENT if recent is None else recent
  if any(m.kind == "duo" for m in methods) and pattern is None:
    raise PatternError("duo needs a head pattern: pass --pattern DIR (ours or a reference "
                       "DuoAttention folder), or use a checkpoint with a default pattern")
  return [BuiltMethod(m, make_mask(config, m.kind, pattern, m.sparsity, None, sink, recent, seed))
          for m in methods]
