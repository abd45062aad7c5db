"""AttentionInfluence: score documents by how much masking the retrieval heads hurts.

  python -m duojax.eval influence --ckpt DIR --pattern DIR --data FILE.jsonl --out scores.jsonl
      [--sparsity S | --threshold T] [--max-len N --batch-size 8 --ablation zero]

For a document with tokens x_0 .. x_{n-1} (its first --max-len tokens):
  loss         = mean over i = 1 .. n-1 of -log p(x_i | x_<i), full model
  masked_loss  = the same with the pattern's retrieval heads masked
  influence    = (masked_loss - loss) / loss
(Hua et al. 2025, "AttentionInfluence"; high influence = text whose modelling
leans on the retrieval heads.)

Masking is per KV head, as our patterns are: every query head of a retrieval
KV head is masked in every position. `--ablation zero` (the default) replaces
the head's attention output by zeros before o_proj, i.e. its attention weights
are all 0, which is how the AttentionInfluence paper pictures masking a head
(its attention map zeroed) and the usual zero ablation. `--ablation uniform`
gives the head uniform weights over the causal keys instead (the mean of the
earlier values): the head stays "on" at its usual scale but retrieves nothing.

The pattern is binarised as `duojax.infer` does: --sparsity / --threshold, else
the rule recorded in the pattern, else 0.5 (GQA) / 0.75 (MHA).

Documents (one JSON object per line with a --text-field, default "text"; an
"id" field is copied) are tokenised without special tokens added, sorted by
length and run in padded batches; the output keeps the input order, one JSON
object per line: index, id, n_tokens, loss, masked_loss, influence (null for
documents under two tokens).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from duojax.attention.reference import causal_mask, dense_attention, masked_attention
from duojax.config import ModelConfig, round_up
from duojax.model import handle as model_handle
from duojax.model.handle import ModelHandle

ABLATIONS = ("zero", "uniform")


class InfluenceError(ValueError):
  """Input the influence scorer cannot use; the message says what to fix."""


def _ablated_attention(retrieval: tuple[tuple[bool, ...], ...] | None, ablation: str):
  """attention(layer, q, k, v, lengths) for forward_sequence; retrieval [L][Hkv]
  marks the KV heads to mask (None = plain causal attention)."""

  def attention(layer, q, k, v, lengths):
    out = dense_attention(q, k, v, lengths)  # [B, T, Hkv, G, D]
    if retrieval is None or not any(retrieval[layer]):
      return out
    masked = jnp.asarray(retrieval[layer])[None, None, :, None, None]
    if ablation == "zero":
      repl = jnp.zeros_like(out)
    else:  # equal logits: softmax is uniform over the causal, valid keys
      t = q.shape[1]
      pos = jnp.arange(t)
      mask = causal_mask(pos, pos)[None] & (pos[None, :] < lengths[:, None])[:, None, :]
      repl = masked_attention(jnp.zeros_like(q), k, v, mask[:, None])
    return jnp.where(masked, repl, out)

  return attention


def _mean_nll(model, hidden: jax.Array, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
  """Mean next-token NLL per row over positions 1..n-1: [B] float32.

  hidden [B, T, E]; one row's [T, V] logits at a time (a batch of them would
  be B * T * V floats).
  """
  t = tokens.shape[1]

  def row(args):
    h, tk, n = args
    logp = jax.nn.log_softmax(model.logits(h[:-1]), axis=-1)  # [T-1, V]
    nll = -jnp.take_along_axis(logp, tk[1:, None], axis=-1)[:, 0]
    keep = jnp.arange(1, t) < n
    return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.maximum(n - 1, 1)

  return jax.lax.map(row, (hidden, tokens, lengths))


@functools.partial(jax.jit, static_argnames=("config", "retrieval", "ablation"))
def losses(params, config: ModelConfig, tokens: jax.Array, lengths: jax.Array,
           retrieval: tuple[tuple[bool, ...], ...], ablation: str = "zero"):
  """(loss [B], masked_loss [B]) for right-padded tokens [B, T], lengths [B].

  params: a full-attention ModelHandle (or the plain params dict); retrieval: the
  HeadMask's [L][Hkv] tuple (static: one compile per pattern)."""
  m = _full_model(params, config).module()
  out = []
  for r in (None, retrieval):
    h = m.forward_sequence(tokens, lengths, _ablated_attention(r, ablation))
    out.append(_mean_nll(m, h, tokens, lengths))
  return tuple(out)


def _full_model(params, config: ModelConfig) -> ModelHandle:
  """The model in its own head order: the ablation masks heads by their HF index."""
  if not isinstance(params, ModelHandle):
    return model_handle.from_params(config, params)
  if params.mask is not None:
    raise InfluenceError("influence masks heads in the model's own order; load it with "
                         "--attention full (no head mask)")
  return params


def score_documents(params, config: ModelConfig, docs: list[list[int]], retrieval,
                    ablation: str = "zero", batch_size: int = 8, pad_multiple: int = 64,
                    progress: bool = True) -> list[dict]:
  """Influence per document (input order): n_tokens, loss, masked_loss, influence."""
  if ablation not in ABLATIONS:
    raise InfluenceError(f"--ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
  retrieval = tuple(tuple(bool(x) for x in row) for row in retrieval)
  params = _full_model(params, config)  # once, not per batch
  results: list[dict] = [{"n_tokens": len(d), "loss": None, "masked_loss": None,
                          "influence": None} for d in docs]
  order = [i for i in sorted(range(len(docs)), key=lambda i: -len(docs[i])) if len(docs[i]) >= 2]
  batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
  if progress:
    from tqdm import tqdm
    batches = tqdm(batches, desc="influence", unit="batch", file=sys.stderr)
  for idx in batches:
    # longest first, so each padded shape is reused by the batches after it
    t = round_up(len(docs[idx[0]]), pad_multiple)
    tokens = np.zeros((len(idx), t), np.int32)
    for r, i in enumerate(idx):
      tokens[r, :len(docs[i])] = docs[i]
    lengths = np.asarray([len(docs[i]) for i in idx], np.int32)
    base, masked = losses(params, config, jnp.asarray(tokens), jnp.asarray(lengths), retrieval,
                          ablation)
    for r, i in enumerate(idx):
      lo, lm = float(base[r]), float(masked[r])
      results[i].update(loss=lo, masked_loss=lm, influence=(lm - lo) / lo if lo > 0 else None)
  return results


def read_documents(path, text_field: str = "text") -> list[dict]:
  """JSON lines -> [{"text": ..., "id": ...}] (id None when absent)."""
  p = Path(path)
  if not p.is_file():
    raise InfluenceError(f"--data {p} does not exist; pass a .jsonl file")
  docs = []
  for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise InfluenceError(f"{p} line {n} is not JSON ({e}); one object per line") from None
    if isinstance(rec, str):
      rec = {text_field: rec}
    if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
      raise InfluenceError(f"{p} line {n} has no string {text_field!r} field; pass --text-field")
    docs.append({"text": rec[text_field], "id": rec.get("id")})
  if not docs:
    raise InfluenceError(f"{p} holds no documents")
  return docs


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m duojax.eval influence",
                               description="AttentionInfluence document scores.")
  ap.add_argument("--ckpt", default=None, help="checkpoint folder or embedded name (smollm2-135m)")
  ap.add_argument("--pattern", required=True, help="head-pattern folder (ours or reference)")
  ap.add_argument("--data", required=True, help="a .jsonl of documents")
  ap.add_argument("--out", required=True, help="output .jsonl, one score per document")
  sel = ap.add_mutually_exclusive_group()
  sel.add_argument("--sparsity", type=float, help="fraction of KV heads that are not masked")
  sel.add_argument("--threshold", type=float, help="retrieval (masked) iff gate >= threshold")
  ap.add_argument("--text-field", default="text")
  ap.add_argument("--max-len", type=int, default=None,
                  help="tokens scored per document (default: 1024 or the model's context)")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--ablation", choices=ABLATIONS, default="zero")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  ap.add_argument("--no-progress", action="store_true")
  return ap


def main(argv=None) -> int:
  a = build_parser().parse_args(argv)
  from duojax.checkpoint import store
  from duojax.checkpoint.embedded import resolve_checkpoint
  from duojax.checkpoint.hf import CheckpointError
  from duojax.pattern import PatternError, load_any
  from duojax.serving import make_mask
  prog = "duojax.eval influence"
  try:
    if (a.max_len is not None and a.max_len < 2) or a.batch_size < 1:
      raise InfluenceError("--max-len must be >= 2 and --batch-size >= 1")
    docs = read_documents(a.data, a.text_field)
    folder = resolve_checkpoint(a.ckpt, progress=not a.no_progress)
    config = store.load_config(folder)
    max_len = min(1024, config.max_position_embeddings) if a.max_len is None else a.max_len
    if max_len > config.max_position_embeddings:
      raise InfluenceError(f"--max-len {a.max_len} exceeds the model's context of "
                           f"{config.max_position_embeddings}")
    mask = make_mask(config, "duo", load_any(a.pattern), a.sparsity, a.threshold)
    if not mask.as_array().any():
      raise InfluenceError("the pattern selects no retrieval heads at this setting, so nothing "
                           "is masked; lower --sparsity or --threshold")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[a.dtype]
    params = store.load_params(folder, dtype=dtype)
    tok = store.load_tokenizer(folder)
    ids = [[int(x) for x in tok.encode(d["text"], add_special_tokens=False)][:max_len]
           for d in docs]
    scores = score_documents(params, config, ids, mask.retrieval, a.ablation, a.batch_size,
                             progress=not a.no_progress)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
      for i, (d, s) in enumerate(zip(docs, scores)):
        f.write(json.dumps({"index": i, "id": d["id"], **s}) + "\n")
  except (InfluenceError, CheckpointError, PatternError, ValueError) as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  vals = [s["influence"] for s in scores if s["influence"] is not None]
  print(json.dumps({"out": str(out), "documents": len(docs), "scored": len(vals),
                    "masked_heads": int(mask.as_array().sum()), "ablation": a.ablation,
                    "mean_influence": float(np.mean(vals)) if vals else None}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
