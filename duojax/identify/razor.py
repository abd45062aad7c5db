"""RazorAttention: retrieval heads from echo and induction scores, without training.

  python -m duojax.identify razor --ckpt DIR --out DIR [--block 2500 --repeats 4
      --induction-top 0.14 --echo-top 0.01 --seed 0]

One forward pass over BOS + a block of `block` distinct random tokens repeated
`repeats` times. With tokens x[0..T) and attention probabilities p[t, j] of a
query head, a query t is *scored* when its token occurred before (some j < t
with x[j] == x[t]; in the repeated block: every position of copies 2..R) and
  echo(t)      = sum of p[t, j] over j < t with x[j] == x[t]
                 (the earlier copies of the same token),
  induction(t) = sum of p[t, j] over 1 <= j <= t with x[j - 1] == x[t]
                 (the tokens that followed an earlier copy).
A query head's score is the mean over its scored queries; a KV head's score
is the max over its GQA group (a KV head is kept whole if one of its query
heads needs it). The block is sampled without replacement from non-special
tokens, so "same token" is exactly "same offset in an earlier copy".

Selection (global over all L * Hkv KV heads): the top n_ind = ceil(f_ind * N)
heads by induction and the top n_echo = ceil(f_echo * N) by echo (defaults
14% and 1%) are retrieval heads. The gates record the same decision as one
number per head: with r_ind, r_echo the 0-based ranks (best first; ties to the
lower layer-major index),
  gate = 1 / (1 + min(r_ind / n_ind, r_echo / n_echo))
so a head is retrieval iff gate > 0.5 (`metadata["selection"]`), and
`binarize(sparsity=s)` keeps the heads closest to the top of either ranking,
i.e. grows or shrinks both top fractions in the same proportion. The raw
scores (per KV head and per query head) are in `metadata["scores"]`.

Memory: the attention probabilities of a whole layer would be [Hq, T, T]
(3.6 GB for 10K tokens and 9 heads in float32), so each layer runs its queries
in chunks of `chunk` rows and keeps only the per-head sums; one layer's chunk
is alive at a time. On CPU use small settings (e.g. --block 500).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from duojax.config import DEPLOY, ModelConfig, round_up
from duojax.model import handle as model_handle
from duojax.model.handle import ModelHandle
from duojax.pattern import HeadPattern

DEFAULTS = dict(block=2500, repeats=4, induction_top=0.14, echo_top=0.01, seed=0,
                sink=DEPLOY.sink, recent=DEPLOY.recent, chunk=512)


def default_block(config: ModelConfig, repeats: int = DEFAULTS["repeats"], exclude=()) -> int:
  """RazorAttention's 2500 tokens per copy, or fewer so that BOS + block x repeats fits the
  model's context (2047 for an 8K model at 4 copies) and the block's tokens stay distinct."""
  bos = 0 if config.bos_token_id is None else 1
  fit = (config.max_position_embeddings - bos) // max(repeats, 1)
  bad = set(int(i) for i in exclude) | set(config.eos_token_ids)
  if config.bos_token_id is not None:
    bad.add(int(config.bos_token_id))
  usable = config.vocab_size - len({i for i in bad if 0 <= i < config.vocab_size})
  return max(2, min(DEFAULTS["block"], fit, usable))


def check_fits(config: ModelConfig, block: int, repeats: int) -> None:
  bos = 0 if config.bos_token_id is None else 1
  total = bos + block * repeats
  if total > config.max_position_embeddings:
    most = (config.max_position_embeddings - bos) // max(repeats, 1)
    raise RazorError(f"{bos} + {block} x {repeats} = {total} tokens exceed the model's context of "
                     f"{config.max_position_embeddings}; lower --block to at most {most} for "
                     f"--repeats {repeats} (or lower --repeats)")


class RazorError(ValueError):
  """Settings razor cannot run with; the message names the fix."""


# -- scores from attention probabilities -------------------------------------------

def _masks(tok_q: jax.Array, q_pos: jax.Array, tok_k: jax.Array, prev_k: jax.Array,
           k_pos: jax.Array):
  """Echo and induction key masks, bool [B, C, S].

  tok_q [B, C] query tokens at positions q_pos [C]; tok_k [B, S] key tokens,
  prev_k [B, S] the token before each key (-1 for the first), k_pos [S].
  Padding tokens are -1 and match nothing (queries use -2).
  """
  same = tok_k[:, None, :] == tok_q[:, :, None]
  follows = prev_k[:, None, :] == tok_q[:, :, None]
  before = k_pos[None, None, :] < q_pos[None, :, None]
  upto = k_pos[None, None, :] <= q_pos[None, :, None]
  return same & before, follows & upto & (k_pos >= 1)[None, None, :]


def _prev(tokens: jax.Array) -> jax.Array:
  return jnp.pad(tokens, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]


def scores_from_probs(p: jax.Array, tokens: jax.Array, lengths: jax.Array):
  """Echo and induction sums from full attention probabilities (tests, small T).

  p [B, H, T, T] (query, key) for H query heads; tokens [B, T]; lengths [B].
  Returns (echo_sum [H], induction_sum [H], n_scored): the scores are
  echo_sum / n_scored and induction_sum / n_scored.
  """
  t = tokens.shape[1]
  pos = jnp.arange(t)
  tok = jnp.where(pos[None] < lengths[:, None], tokens, -1)
  echo, ind = _masks(jnp.where(tok >= 0, tok, -2), pos, tok, _prev(tok), pos)
  scored = jnp.any(echo, axis=-1)  # [B, T]
  e = jnp.einsum("bhts,bts->bht", p, echo.astype(p.dtype))
  i = jnp.einsum("bhts,bts->bht", p, ind.astype(p.dtype))
  w = scored.astype(p.dtype)[:, None]
  return (e * w).sum((0, 2)), (i * w).sum((0, 2)), scored.sum()


def attention_with_scores(q: jax.Array, k: jax.Array, v: jax.Array, tokens: jax.Array,
                          lengths: jax.Array, chunk: int):
  """Causal attention that also sums echo and induction mass per query head.

  q [B, T, Hkv, G, D]; k, v [B, T, Hkv, D]; tokens [B, T]; lengths [B]; T a
  multiple of chunk. Queries run `chunk` rows at a time, so memory holds
  [B, Hkv, G, chunk, T] probabilities, never [.., T, T].
  Returns (out [B, T, Hkv, G, D], echo_sum [Hkv, G], induction_sum [Hkv, G],
  n_scored) as in `scores_from_probs`.
  """
  b, t, h, g, d = q.shape
  n = t // chunk
  pos = jnp.arange(t)
  valid = pos[None] < lengths[:, None]  # [B, T]
  tok = jnp.where(valid, tokens, -1)
  prev = _prev(tok)
  scale = d ** -0.5

  def one(i):
    qc = jax.lax.dynamic_slice_in_dim(q, i * chunk, chunk, axis=1)
    q_pos = i * chunk + jnp.arange(chunk)
    tq = jax.lax.dynamic_slice_in_dim(tok, i * chunk, chunk, axis=1)
    s = jnp.einsum("bthgd,bshd->bhgts", qc, k, preferred_element_type=jnp.float32) * scale
    seen = (pos[None, :] <= q_pos[:, None])[None] & valid[:, None, :]  # [B, C, T]
    s = jnp.where(seen[:, None, None], s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0))
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)  # [B, H, G, C, T]
    out = jnp.einsum("bhgts,bshd->bthgd", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32).astype(q.dtype)
    echo, ind = _masks(jnp.where(tq >= 0, tq, -2), q_pos, tok, prev, pos)
    w = jnp.any(echo, axis=-1)  # [B, C] scored queries
    e = jnp.einsum("bhgts,bts,bt->hg", p, echo.astype(p.dtype), w.astype(p.dtype))
    f = jnp.einsum("bhgts,bts,bt->hg", p, ind.astype(p.dtype), w.astype(p.dtype))
    return out, e, f, w.sum()

  out, e, f, cnt = jax.lax.map(one, jnp.arange(n))
  out = jnp.moveaxis(out, 0, 1).reshape(b, t, h, g, d)
  return out, e.sum(0), f.sum(0), cnt.sum()


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def _layer_scores(params, config: ModelConfig, tokens: jax.Array, lengths: jax.Array, chunk: int):
  """Per-layer sums over one forward pass: (echo [L, Hkv, G], induction [L, Hkv, G], n)."""
  sums = []

  def attention(layer, q, k, v, lens):
    out, e, f, n = attention_with_scores(q, k, v, tokens, lens, chunk)
    sums.append((e, f, n))  # traced values, returned below from the same trace
    return out

  params.module().forward_sequence(tokens, lengths, attention)
  return (jnp.stack([s[0] for s in sums]), jnp.stack([s[1] for s in sums]), sums[0][2])


def razor_scores(params, config: ModelConfig, tokens: np.ndarray, chunk: int = 512):
  """Echo and induction score per query head over one sequence (params: the plain dict,
  per-layer or stacked, or a full-attention ModelHandle).

  tokens [T] (or [B, T] of one length). Returns (echo [L, Hq], induction [L, Hq]
  float64, n_scored queries); query head h of the model is KV head h // G, slot h % G.
  """
  tokens = np.atleast_2d(np.asarray(tokens, np.int32))
  b, t = tokens.shape
  chunk = max(1, min(chunk, t))
  padded = round_up(t, chunk)
  tk = np.zeros((b, padded), np.int32)
  tk[:, :t] = tokens
  if isinstance(params, ModelHandle):
    if params.mask is not None:  # its heads are reordered: scores would land on other heads
      raise RazorError("razor scores the model in its own head order; load it with "
                       "--attention full (no head mask)")
  else:
    layers = params["layers"]
    if isinstance(layers, dict):  # stacked layers: a list keeps `layer` a Python int
      layers = [jax.tree_util.tree_map(lambda x, i=i: x[i], layers)
                for i in range(config.num_layers)]
    params = model_handle.from_params(config, {**params, "layers": list(layers)})
  e, f, n = _layer_scores(params, config, jnp.asarray(tk), jnp.full((b,), t, jnp.int32), chunk)
  n = int(n)
  if n == 0:
    raise RazorError("no query position has an earlier copy of its token; repeat the block")
  shape = (config.num_layers, config.num_heads)
  return (np.asarray(e, np.float64).reshape(shape) / n,
          np.asarray(f, np.float64).reshape(shape) / n, n)


# -- selection ---------------------------------------------------------------------

def _ranks(scores: np.ndarray) -> np.ndarray:
  """0-based rank, best (highest) first; ties go to the lower flat index."""
  flat = scores.reshape(-1)
  order = np.argsort(-flat, kind="stable")
  rank = np.empty(flat.size, np.int64)
  rank[order] = np.arange(flat.size)
  return rank.reshape(scores.shape)


def top_count(fraction: float, n: int) -> int:
  """ceil(fraction * n): 'the top 14%' keeps at least 14% of the heads."""
  return int(math.ceil(fraction * n - 1e-9))


def razor_gates(induction: np.ndarray, echo: np.ndarray, induction_top: float,
                echo_top: float) -> tuple[np.ndarray, int, int]:
  """[L, Hkv] scores -> (gates [L, Hkv] float32, n_induction, n_echo); see the module doc."""
  n = induction.size
  n_ind, n_echo = top_count(induction_top, n), top_count(echo_top, n)
  z = np.full(induction.shape, np.inf)
  if n_ind:
    z = np.minimum(z, _ranks(induction) / n_ind)
  if n_echo:
    z = np.minimum(z, _ranks(echo) / n_echo)
  return (1.0 / (1.0 + z)).astype(np.float32), n_ind, n_echo


def sample_block(config: ModelConfig, block: int, seed: int, exclude=()) -> np.ndarray:
  """`block` distinct token ids, none of them special (bos/eos/exclude): int32 [block]."""
  bad = set(int(i) for i in exclude) | set(config.eos_token_ids)
  if config.bos_token_id is not None:
    bad.add(int(config.bos_token_id))
  allowed = np.setdiff1d(np.arange(config.vocab_size), np.fromiter(bad, np.int64, len(bad)))
  if block > allowed.size:
    raise RazorError(f"--block {block} exceeds the {allowed.size} usable distinct tokens; lower it")
  return np.random.default_rng(seed).choice(allowed, size=block, replace=False).astype(np.int32)


def razor_pattern(params, config: ModelConfig, *, block: int | None = None, repeats: int = 4,
                  induction_top: float = 0.14, echo_top: float = 0.01, seed: int = 0,
                  sink: int = DEPLOY.sink, recent: int = DEPLOY.recent, exclude_ids=(),
                  chunk: int = 512,
                  model_name: str | None = None) -> HeadPattern:
  """RazorAttention head pattern from one forward pass (see the module doc).

  block None: default_block(config, repeats), which fits the model's context."""
  block = default_block(config, repeats) if block is None else block
  if block < 2:
    raise RazorError(f"--block must be >= 2, got {block}")
  if repeats < 2:
    raise RazorError(f"--repeats must be >= 2 (echo/induction need an earlier copy), got {repeats}")
  for name, f in (("--induction-top", induction_top), ("--echo-top", echo_top)):
    if not 0.0 <= f <= 1.0:
      raise RazorError(f"{name} must be a fraction in [0, 1], got {f}")
  if chunk < 1:
    raise RazorError(f"--chunk must be >= 1, got {chunk}")
  bos = [] if config.bos_token_id is None else [int(config.bos_token_id)]
  check_fits(config, block, repeats)
  ids = sample_block(config, block, seed, exclude_ids)
  tokens = np.concatenate([np.asarray(bos, np.int32), np.tile(ids, repeats)])
  t0 = time.perf_counter()
  echo_q, ind_q, n_scored = razor_scores(params, config, tokens, chunk)
  g = config.group_size
  shape = (config.num_layers, config.num_kv_heads, g)
  echo, ind = echo_q.reshape(shape).max(-1), ind_q.reshape(shape).max(-1)
  gates, n_ind, n_echo = razor_gates(ind, echo, induction_top, echo_top)
  retrieval = [[int(l), int(h)] for l, h in np.argwhere(gates > 0.5)]
  meta = {
      "method": "razor",
      "model_name": model_name or config.name,
      "seed": int(seed),
      "data": f"bos + {block} distinct random tokens x {repeats}",
      "settings": {"block": block, "repeats": repeats, "induction_top": induction_top,
                   "echo_top": echo_top, "chunk": chunk},
      "n_tokens": int(tokens.size),
      "n_scored_queries": int(n_scored),
      "n_induction": n_ind,
      "n_echo": n_echo,
      "gate_rule": "1 / (1 + min(rank_induction / n_induction, rank_echo / n_echo)); "
                   "ranks 0-based, best first, over all (layer, KV head)",
      "kv_reduction": "max over GQA group",
      "scores": {"induction": ind, "echo": echo, "induction_q": ind_q, "echo_q": echo_q},
      "retrieval_heads": retrieval,
      "selection": {"threshold": 0.5, "strict": True},
      "seconds": round(time.perf_counter() - t0, 2),
  }
  pattern = HeadPattern(gates, sink, recent, meta)
  pattern.mask()  # the recorded selection must be usable
  return pattern


# -- CLI ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m duojax.identify razor",
                               description="RazorAttention echo/induction head scores "
                                           "(no training).")
  ap.add_argument("--ckpt", default=None, help="checkpoint folder or embedded name (smollm2-135m)")
  ap.add_argument("--out", required=True, help="pattern folder to write")
  ap.add_argument("--block", type=int, default=None,
                  help="random tokens per copy (default 2500, or less so that 1 + block x "
                       "repeats fits the model's context: 2047 on the 8K SmolLM2)")
  ap.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="copies of the block")
  ap.add_argument("--induction-top", type=float, default=DEFAULTS["induction_top"],
                  help="fraction of KV heads kept by induction score")
  ap.add_argument("--echo-top", type=float, default=DEFAULTS["echo_top"],
                  help="fraction of KV heads kept by echo score")
  ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
  ap.add_argument("--sink", type=int, default=DEFAULTS["sink"], help="recorded streaming sink")
  ap.add_argument("--recent", type=int, default=DEFAULTS["recent"], help="recorded recent window")
  ap.add_argument("--chunk", type=int, default=DEFAULTS["chunk"],
                  help="query rows per attention chunk (memory)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                  help="compute dtype (default: as stored)")
  return ap


def main(argv=None) -> int:
  a = build_parser().parse_args(argv)
  from duojax.checkpoint import store
  from duojax.checkpoint.embedded import resolve_checkpoint
  from duojax.checkpoint.hf import CheckpointError
  from duojax.pattern import PatternError
  try:
    folder = resolve_checkpoint(a.ckpt)
    config = store.load_config(folder)
    try:
      tok = store.load_tokenizer(folder)
      special = set(getattr(tok, "all_special_ids", []) or [])
      special |= set(int(i) for i in (getattr(tok, "added_tokens_decoder", None) or {}))
    except CheckpointError:
      special = set()
    # Checked before the weights load.
    block = default_block(config, a.repeats, special) if a.block is None else a.block
    if block < 2 or a.repeats < 2:
      raise RazorError(f"--block and --repeats must be >= 2, got {block} and {a.repeats}")
    check_fits(config, block, a.repeats)
    params = store.load_params(folder, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                                              None: None}[a.dtype])
    pat = razor_pattern(params, config, block=block, repeats=a.repeats,
                        induction_top=a.induction_top, echo_top=a.echo_top, seed=a.seed,
                        sink=a.sink, recent=a.recent, exclude_ids=sorted(special), chunk=a.chunk)
    out = pat.save(a.out, overwrite=True)
  except (RazorError, CheckpointError, PatternError, ValueError) as e:
    print(f"duojax.identify razor: error: {e}", file=sys.stderr)
    return 2
  m = pat.metadata
  print(json.dumps({"out": str(out), "retrieval_heads": m["retrieval_heads"],
                    "retrieval_fraction": round(pat.mask().retrieval_fraction, 4),
                    "n_induction": m["n_induction"], "n_echo": m["n_echo"],
                    "seconds": m["seconds"]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
