"""Other methods' published head-pattern file formats, read into our HeadPattern.

- Retrieval-head scores (Wu et al. 2024): JSON `{"layer-head": [score per
  test, ...]}` over *query* heads; a head's score is the mean of its list and
  the paper's rule is "retrieval iff score > 0.1".
- MoA plans: JSON `{"alphas": [L][H], "betas": [L][H]}`; head (l, h) attends a
  window of `alpha + beta * N` tokens at context length N.

What the shipped MoA plans hold (`shared/data/moa_plans/`, both for models
with 32 query / 8 KV heads, and H = 32: the plans are per *query* head):
alphas lie in {-1024, 0, 1024, 2048, 3072, 8192}, betas in multiples of 1/8.
No head has beta = 1 with alpha >= 0, so no head covers the whole context at
every length, and many heads (e.g. `0 + N/8`) have a window strictly between
0 and N at every N. At N >= 16384 every one of the heads (1024 in the 8B plan,
512 in the 1B plan) has an intermediate window; at N = 1024 some windows clip
to 0. The query heads of one GQA group also disagree (only 120 of 256 groups
in the 8B plan have one window at N = 8192). Our inference serves exactly two
kinds of KV heads (full, or sink + recent), so `moa_to_pattern` converts a
plan only when every head is one of those two and raises otherwise, which is
the case for both real plans.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from duojax.config import TRAIN
from duojax.pattern import HeadPattern, PatternError

RETRIEVAL_SCORE_THRESHOLD = 0.1


# --- retrieval-head scores --------------------------------------------------

def _read_scores(path) -> tuple[np.ndarray, int]:
  """Mean score per query head, [L, Hq] float64, and the number of tests."""
  path = Path(path)
  try:
    raw = json.loads(path.read_text())
  except FileNotFoundError:
    raise PatternError(f"retrieval-score file {path} does not exist; check the path") from None
  except json.JSONDecodeError as e:
    raise PatternError(f"{path} is not valid JSON ({e}); fix the file") from None
  if not isinstance(raw, dict) or not raw:
    raise PatternError(f"{path} must hold a non-empty object {{\"layer-head\": [scores]}}")
  entries = {}
  for key, vals in raw.items():
    try:
      l, h = (int(x) for x in key.split("-"))
    except ValueError:
      raise PatternError(f"{path}: key {key!r} is not 'layer-head'; fix the file") from None
    if l < 0 or h < 0:
      raise PatternError(f"{path}: key {key!r} has a negative index; fix the file")
    if not isinstance(vals, list) or not vals:
      # An empty list gives no score at all; 0 would silently mean "streaming".
      raise PatternError(f"{path}: head {key} has no scores; re-run the scoring or drop the file")
    entries[(l, h)] = np.asarray(vals, dtype=np.float64)
  num_layers = 1 + max(l for l, _ in entries)
  num_heads = 1 + max(h for _, h in entries)
  missing = [f"{l}-{h}" for l in range(num_layers) for h in range(num_heads)
             if (l, h) not in entries]
  if missing:
    raise PatternError(
        f"{path} lacks {len(missing)} of {num_layers * num_heads} heads (e.g. "
        f"{', '.join(missing[:5])}); expected every layer-head key")
  scores = np.zeros((num_layers, num_heads), np.float64)
  for (l, h), v in entries.items():
    if not np.all(np.isfinite(v)):
      raise PatternError(f"{path}: head {l}-{h} has NaN or inf scores; fix the file")
    scores[l, h] = v.mean()
  n_tests = max(len(v) for v in entries.values())
  return scores, n_tests


def _check_groups(num_heads: int, num_kv_heads: int | None,
                  group_size: int | None) -> int:
  """The KV head count implied by the arguments (defaults to MHA)."""
  if num_kv_heads is None:
    num_kv_heads = num_heads if group_size is None else num_heads // max(group_size, 1)
  if group_size is None:
    group_size = num_heads // max(num_kv_heads, 1)
  if num_kv_heads < 1 or group_size < 1 or num_kv_heads * group_size != num_heads:
    raise PatternError(
        f"{num_heads} query heads do not split into num_kv_heads={num_kv_heads} "
        f"groups of group_size={group_size}; pass the model's KV head count")
  return num_kv_heads


def load_retrieval_scores(path, num_kv_heads: int | None = None,
                          group_size: int | None = None, *,
                          dtype=np.float32) -> np.ndarray:
  """Per-query-head retrieval scores, [L, Hq] (mean over tests).

  num_kv_heads / group_size, when given, are checked against Hq (Hq must be
  num_kv_heads * group_size); the scores stay per query head.
  """
  scores, _ = _read_scores(path)
  _check_groups(scores.shape[1], num_kv_heads, group_size)
  return scores.astype(dtype)


def max_over_groups(scores_q: np.ndarray, num_kv_heads: int) -> np.ndarray:
  """[L, Hq] -> [L, Hkv]: max over each GQA group.

  Query head h belongs to KV head h // (Hq // Hkv), as in Llama / Mistral.
  A KV head is kept whole if any query head it serves retrieves.
  """
  scores_q = np.asarray(scores_q)
  if scores_q.ndim != 2:
    raise PatternError(f"scores must be [L, Hq], got shape {scores_q.shape}")
  num_layers, num_heads = scores_q.shape
  _check_groups(num_heads, num_kv_heads, None)
  return scores_q.reshape(num_layers, num_kv_heads, num_heads // num_kv_heads).max(axis=-1)


def retrieval_score_pattern(path, num_kv_heads: int, *,
                            threshold: float | None = None,
                            sparsity: float | None = None,
                            sink: int = TRAIN.sink, recent: int = TRAIN.recent,
                            model_name: str | None = None) -> HeadPattern:
  """HeadPattern from a retrieval-score file; `pattern.mask()` applies the rule.

  gates [L, Hkv] = max score over each GQA group, clipped into [0, 1].
  Selection (recorded in `metadata["selection"]`): `threshold` (default 0.1)
  marks a head retrieval iff its score > threshold, strictly, as in the paper;
  this is `binarize(threshold=t, strict=True)`. Rounding a float64 score to
  the float32 gate could move it across t, so such a gate is nudged by one
  float32 ulp to the side the float64 score is on: `mask()` then gives exactly
  the float64 decision. Or `sparsity`: the global quantile rule of `binarize`.
  """
  if threshold is not None and sparsity is not None:
    raise PatternError("pass threshold= or sparsity=, not both")
  scores_q, n_tests = _read_scores(path)
  num_kv_heads = _check_groups(scores_q.shape[1], num_kv_heads, None)
  kv = np.clip(max_over_groups(scores_q, num_kv_heads), 0.0, 1.0)  # float64
  gates = kv.astype(np.float32)
  if sparsity is not None:
    selection = {"sparsity": float(sparsity)}
  else:
    t = RETRIEVAL_SCORE_THRESHOLD if threshold is None else float(threshold)
    want = kv > t
    flipped = (gates.astype(np.float64) > t) != want
    # One ulp suffices: the float32 rounding moved the value by at most half one.
    gates = np.where(flipped & want, np.nextafter(gates, np.float32(np.inf)), gates)
    gates = np.where(flipped & ~want, np.nextafter(gates, np.float32(-np.inf)), gates)
    selection = {"threshold": t, "strict": True}
  meta = {
      "method": "retrieval_score",
      "source": str(path),
      "model_name": model_name if model_name is not None else Path(path).stem,
      "num_query_heads": int(scores_q.shape[1]),
      "num_kv_heads": int(num_kv_heads),
      "kv_reduction": "max over GQA group",
      "n_tests": int(n_tests),
      "selection": selection,
      "scores_q": scores_q.tolist(),
  }
  pattern = HeadPattern(gates, sink, recent, meta)
  pattern.mask()  # validates the selection now rather than at first use
  return pattern


# --- MoA plans ---------------------------------------------------------------

def load_moa_plan(path) -> tuple[np.ndarray, np.ndarray]:
  """(alphas [L, H], betas [L, H]) float64; H is the plan's head count (query heads)."""
  path = Path(path)
  try:
    raw = json.loads(path.read_text())
  except FileNotFoundError:
    raise PatternError(f"MoA plan {path} does not exist; check the path") from None
  except json.JSONDecodeError as e:
    raise PatternError(f"{path} is not valid JSON ({e}); fix the file") from None
  if not isinstance(raw, dict) or "alphas" not in raw or "betas" not in raw:
    raise PatternError(f"{path} must hold {{\"alphas\": [L][H], \"betas\": [L][H]}}")
  try:
    alphas = np.asarray(raw["alphas"], dtype=np.float64)
    betas = np.asarray(raw["betas"], dtype=np.float64)
  except (TypeError, ValueError):
    raise PatternError(f"{path}: alphas and betas must be rectangular [L][H] numbers") from None
  if alphas.ndim != 2 or alphas.shape != betas.shape or alphas.size == 0:
    raise PatternError(
        f"{path}: alphas {alphas.shape} and betas {betas.shape} must be the same "
        "non-empty [L, H] shape")
  if not (np.all(np.isfinite(alphas)) and np.all(np.isfinite(betas))):
    raise PatternError(f"{path} holds NaN or inf; fix the file")
  return alphas, betas


def _context_len(context_len) -> int:
  if isinstance(context_len, bool) or not isinstance(context_len, (int, np.integer)) or context_len < 1:
    raise PatternError(f"context_len must be a positive int, got {context_len!r}")
  return int(context_len)


def moa_windows(path, context_len: int) -> np.ndarray:
  """Window per head at context length N: floor(alpha + beta * N) clipped to [0, N]; int64 [L, H]."""
  n = _context_len(context_len)
  alphas, betas = load_moa_plan(path)
  return np.clip(np.floor(alphas + betas * n), 0, n).astype(np.int64)


def moa_to_pattern(path, context_len: int, *, sink: int, recent: int,
                   num_kv_heads: int | None = None,
                   model_name: str | None = None) -> HeadPattern:
  """Two-kind HeadPattern from a MoA plan, only where that is faithful.

  At context length N a head with window N is a retrieval head, and a head
  with window exactly `sink + recent` is a streaming head (it attends as many
  keys; the plan does not say how MoA splits them between initial tokens and
  the window, so this is the closest match we can certify). Any other window
  raises PatternError: per-head window sizes are not supported by the
  inference path yet. With `num_kv_heads` < H the plan is per query head and
  all query heads of a GQA group must agree. gates are 1.0 / 0.0 and
  `mask()` recovers the split.
  """
  n = _context_len(context_len)
  windows = moa_windows(path, n)  # [L, H]
  num_layers, num_heads = windows.shape
  full = windows >= n
  stream = (windows == sink + recent) & ~full
  odd = np.argwhere(~full & ~stream)
  if odd.size:
    shown = ", ".join(f"{l}-{h} ({windows[l, h]})" for l, h in odd[:12])
    more = f" and {len(odd) - 12} more" if len(odd) > 12 else ""
    raise PatternError(
        f"MoA plan {path} at context_len={n}: per-head window sizes are not "
        f"supported yet by the inference path (only full = {n} or sink+recent = "
        f"{sink + recent}); {len(odd)} of {windows.size} heads have other windows, "
        f"layer-head (window): {shown}{more}")
  kv_heads = _check_groups(num_heads, num_kv_heads, None)
  group = num_heads // kv_heads
  full_g = full.reshape(num_layers, kv_heads, group)
  mixed = np.argwhere(full_g.any(-1) & ~full_g.all(-1))
  if mixed.size:
    shown = ", ".join(f"{l}-{g}" for l, g in mixed[:12])
    raise PatternError(
        f"MoA plan {path} at context_len={n}: {len(mixed)} GQA groups mix full "
        f"and streaming query heads (layer-kv_head: {shown}); a KV head serves "
        "its whole group one way, so this plan cannot be converted")
  gates = full_g.all(-1).astype(np.float32)
  meta = {
      "method": "moa",
      "source": str(path),
      "model_name": model_name if model_name is not None else Path(path).parent.name,
      "context_len": n,
      "selection": {"threshold": 0.5},
      "windows": windows.tolist(),
  }
  return HeadPattern(gates, sink, recent, meta)
