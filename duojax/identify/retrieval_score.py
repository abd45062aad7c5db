"""Retrieval heads by the copy-paste retrieval score (Wu et al. 2024).

  python -m duojax.identify retrieval-score --ckpt DIR --haystack PATH --out DIR
      [--lengths 1000,2000,4000 --depths 5 --max-new-tokens 32 --threshold 0.1 | --sparsity S]

Needle-in-a-haystack tests (every length x depth; the needle is the sentence of
`NeedleTask`; the chat template around the prompt unless --no-chat) are decoded
greedily with full attention. Decoding step s is the
forward pass whose logits pick generated token y_s; the first step feeds the
last prompt token, so every generated token is scored. At step s a query head
*copies* when its top-1 attended key (argmax of its attention logits over all
cached keys, its own included) lies in the needle span [a, b) and the prompt
token there equals y_s; each copy adds 1 / (b - a) to the head's score for the
test. Steps stop at EOS (not scored) or after --max-new-tokens.

A test counts when its answer was right: ROUGE-1 recall of the answer's words in
the output > --min-recall (0.5, the paper's "> 50"). A query head's score is
the mean over the tests that count; a KV head's is the max over its GQA group;
retrieval iff score > 0.1 (strictly), or the top heads at a --sparsity.

How the attention is captured: the prompt minus its last token is prefilled by
the engine's chunked prefill into a full cache; then `_step` below runs one
token through the decoder's modules on that cache exactly like `Llama.__call__` and
also returns each query head's argmax key position. One forward per generated
token, as in ordinary decoding, so long contexts cost what generation costs.

Writes into --out: the pattern (our format + the reference TSV),
`retrieval_scores.json` in Wu et al.'s format (`{"layer-head": [score per
counted test]}`, query heads; `duojax.identify.formats` reads it back) and
`tests.json` (per test: length, depth, output, recall, whether it counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from duojax import cache as kvc
from duojax.attention.reference import full_chunk_attention
from duojax.config import DEPLOY, ModelConfig, round_up
from duojax.engine import pad_batch, prefill
from duojax.model import handle as model_handle
from duojax.model.handle import ModelHandle


class ScoreError(ValueError):
  """Settings or results the retrieval score cannot work with; says what to change."""


@dataclasses.dataclass
class NeedleResult:
  length: int
  depth: float
  needle_span: tuple[int, int]
  generated: list[int]  # up to (not including) EOS
  output: str
  recall: float
  counted: bool  # answered right
  scores: np.ndarray  # [L, Hq] copy score of this test


# -- decoding with top-1 capture -----------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _step(model: ModelHandle, config: ModelConfig, tok: jax.Array, cache: kvc.KVCache):
  """One token per row through the decoder on a full cache.

  tok [B] int32 at position cache.lengths. Returns (logits [B, V] fp32,
  top1 [B, L, Hkv, G] int32 key position each query head attends most, cache).
  """
  m = model.module()
  start = cache.lengths
  pos = start[:, None]
  one = jnp.ones_like(start)
  x = m.embed(tok[:, None])
  layers, tops = [], []
  for blk, lc in zip(m.layers, cache.layers):
    q, k, v = blk.attn.qkv(blk.norm_attn(x), pos)
    lc = kvc.write_full(lc, k, v, start, one)
    s = jnp.einsum("bhgd,bshd->bhgs", q[:, 0], lc.k, preferred_element_type=jnp.float32)
    seen = jnp.arange(lc.k.shape[1])[None, :] <= start[:, None]  # [B, S]
    tops.append(jnp.argmax(jnp.where(seen[:, None, None], s, -jnp.inf), axis=-1))
    x = blk.finish(x, full_chunk_attention(q, lc.k, lc.v, pos, start + 1))
    layers.append(lc)
  logits = m.logits(m.final(x)[:, 0])
  return logits, jnp.stack(tops, 1).astype(jnp.int32), kvc.KVCache(tuple(layers), start + 1)


def _full_model(params, config: ModelConfig) -> ModelHandle:
  if not isinstance(params, ModelHandle):
    return model_handle.from_params(config, params)
  if params.mask is not None:
    raise ScoreError("retrieval scoring reads full attention; load the model with "
                     "--attention full (no head mask)")
  return params


def decode_with_top1(params, config: ModelConfig, prompts: list[np.ndarray], max_new: int,
                     prefill_chunk: int = 1024, dtype=None):
  """Greedy decoding that records every query head's top-1 key per step.

  prompts: token ids per row (lengths may differ). Returns (generated [B, S]
  int32, top1 [B, S, L, Hq] int32) with S <= max_new steps; a row's steps
  after its first EOS are -1 in `generated`.
  """
  heads = [p[:-1] for p in prompts]
  if any(len(p) < 2 for p in prompts):
    raise ScoreError("every prompt needs at least two tokens")
  chunk = min(prefill_chunk, round_up(max(len(h) for h in heads), 16))
  tokens, lengths = pad_batch([list(h) for h in heads], chunk)
  params = _full_model(params, config)
  b = len(prompts)
  capacity = round_up(int(max(len(p) for p in prompts)) + max_new, 16)
  cache = kvc.init_cache(config, b, capacity, None, dtype or params.dtype)
  _, cache, _ = prefill(params, config, tokens, lengths, cache, chunk)
  tok = jnp.asarray([int(p[-1]) for p in prompts], jnp.int32)
  eos = np.asarray(config.eos_token_ids or [-2])
  done = np.zeros(b, bool)
  gen, tops = [], []
  for _ in range(max_new):
    logits, top, cache = _step(params, config, tok, cache)
    y = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
    gen.append(np.where(done, -1, y))
    tops.append(np.asarray(top).reshape(b, config.num_layers, config.num_heads))
    done |= np.isin(y, eos)
    if done.all():
      break
    tok = jnp.asarray(y)
  return np.stack(gen, 1), np.stack(tops, 1)


# -- scoring ----------------------------------------------------------------------------

def copy_scores(top1: np.ndarray, generated: np.ndarray, prompt: np.ndarray,
                span: tuple[int, int]) -> np.ndarray:
  """Retrieval score of one test per query head: [L, Hq] float64.

  top1 [S, L, Hq] key positions; generated [S] tokens (negative = no step);
  prompt [T] ids; span [a, b) of the needle in the prompt.
  """
  a, b = span
  if b <= a:
    raise ScoreError(f"empty needle span {span}")
  top1 = np.asarray(top1)
  live = np.asarray(generated) >= 0
  in_needle = (top1 >= a) & (top1 < b)
  at = np.asarray(prompt)[np.clip(top1, 0, len(prompt) - 1)]
  hit = in_needle & (at == np.asarray(generated)[:, None, None]) & live[:, None, None]
  return hit.sum(0) / (b - a)


def run_tests(params, config: ModelConfig, tokenizer, cases, answer: str, max_new: int,
              min_recall: float = 0.5, batch: int = 8, prefill_chunk: int = 1024,
              progress: bool = False) -> list[NeedleResult]:
  """cases: [(length, depth, prompt ids [T], needle span)] -> one NeedleResult each."""
  from duojax.data.niah import rouge1_recall
  results = []
  groups = range(0, len(cases), batch)
  if progress:
    from tqdm import tqdm
    groups = tqdm(groups, desc="retrieval-score", unit="batch", file=sys.stderr)
  for i in groups:
    part = cases[i:i + batch]
    gen, tops = decode_with_top1(params, config, [c[2] for c in part], max_new, prefill_chunk)
    for (length, depth, ids, span), g, t in zip(part, gen, tops):
      n = int(np.argmax(g < 0)) if (g < 0).any() else len(g)
      eos = set(config.eos_token_ids)
      n = next((j for j in range(n) if int(g[j]) in eos), n)  # EOS ends the answer
      text = tokenizer.decode([int(x) for x in g[:n]], skip_special_tokens=True)
      recall = rouge1_recall(text, answer)
      results.append(NeedleResult(length, depth, tuple(int(x) for x in span),
                                [int(x) for x in g[:n]], text, recall, recall > min_recall,
                                copy_scores(t[:n], g[:n], ids, span)))
  return results


def scores_json(results: list[NeedleResult], num_layers: int, num_heads: int) -> dict:
  """Wu et al.'s format over the counted tests: {"layer-head": [score, ...]}."""
  kept = [r.scores for r in results if r.counted]
  return {f"{l}-{h}": [float(s[l, h]) for s in kept]
          for l in range(num_layers) for h in range(num_heads)}


PLAIN_QUESTION = "\n\nBased on the content above, answer: {question}\nAnswer:"
CHAT_QUESTION = "\n\nBased on the content above, answer briefly: {question}"
_MARK = "\u2063QUESTION\u2063"  # text no chat template contains


def chat_frame(tokenizer) -> tuple[list[int], list[int]]:
  """Token ids the chat template puts before and after one user message."""
  if not getattr(tokenizer, "chat_template", None):
    raise ScoreError("this tokenizer has no chat template; pass --no-chat")
  text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}],
                                       add_generation_prompt=True, tokenize=False)
  before, after = text.split(_MARK)
  enc = lambda t: [int(i) for i in tokenizer.encode(t, add_special_tokens=False)]
  return enc(before), enc(after)


def build_cases(hay, tokenizer, task, lengths: list[int], depths: list[float], chat: bool = True,
                offset: int = 0):
  """[(length, depth, prompt ids [length], needle span)]; with chat the template
  wraps haystack + question (instruct models answer nothing otherwise). The
  haystack starts at token `offset` (keep it away from evaluation prompts)."""
  from duojax.data.niah import build_niah_prompt
  head, tail = chat_frame(tokenizer) if chat else ([], [])
  cases = []
  for length in lengths:
    for depth in depths:
      ids, (a, b) = build_niah_prompt(hay, tokenizer, task, length - len(head) - len(tail), depth,
                                      offset=offset,
                                      question_template=CHAT_QUESTION if chat else PLAIN_QUESTION)
      prompt = np.concatenate([np.asarray(head, np.int32), ids, np.asarray(tail, np.int32)])
      cases.append((length, depth, prompt, (a + len(head), b + len(head))))
  return cases


def identify(params, config: ModelConfig, tokenizer, hay, out, *, tasks=None,
             lengths=(1000, 2000, 4000), depths: int = 5, chat: bool = True, offset: int = 0,
             max_new_tokens: int = 32, min_recall: float = 0.5, threshold: float | None = None,
             sparsity: float | None = None, batch: int = 8, prefill_chunk: int = 1024,
             sink: int = DEPLOY.sink, recent: int = DEPLOY.recent, progress: bool = True,
             haystack_name=None):
  """Run the NIAH tests and build the pattern -> (HeadPattern, [NeedleResult]).

  tasks: NeedleTasks to hide (default the one of `NeedleTask()`); each runs
  every length x depth. Writes `tests.json` and `retrieval_scores.json` into
  `out` (the pattern itself is the caller's to save). Raises ScoreError when
  no test was answered right, since the scores are then undefined.
  """
  from duojax.data.niah import NeedleTask, depth_grid
  from duojax.identify.formats import retrieval_score_pattern
  tasks = list(tasks or [NeedleTask()])
  lengths = sorted({int(n) for n in lengths})
  if depths < 1 or max_new_tokens < 1 or batch < 1 or min(lengths) < 16:
    raise ScoreError("--depths, --max-new-tokens and --batch-size must be >= 1 and every "
                     "--lengths entry >= 16")
  if max(lengths) + max_new_tokens > config.max_position_embeddings:
    raise ScoreError(f"--lengths up to {max(lengths)} + {max_new_tokens} new tokens exceed "
                     f"the model's context of {config.max_position_embeddings}")
  if offset + max(lengths) > len(hay):
    raise ScoreError(f"the haystack has {len(hay)} tokens; prompts of {max(lengths)} from "
                     f"offset {offset} do not fit: lower the offset or the lengths")
  params = _full_model(params, config)  # once: every decode step then passes the handle
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  from tqdm.auto import tqdm
  bar = tqdm(total=len(tasks) * len(lengths) * depths, desc="retrieval-score", unit="test",
             disable=not progress, file=sys.stderr)
  results, log = [], []
  for i, task in enumerate(tasks):
    cases = build_cases(hay, tokenizer, task, lengths, depth_grid(depths), chat, offset)
    # One length per batch: a short prompt padded to a long one costs as much as the long one.
    for length in lengths:
      bar.set_postfix_str(f"needle {i + 1}/{len(tasks)}, {length} tok")
      group = [c for c in cases if c[0] == length]
      part = run_tests(params, config, tokenizer, group, task.answer, max_new_tokens,
                       min_recall, batch, prefill_chunk)
      results += part
      log += [{"needle": i, "length": r.length, "depth": round(r.depth, 4),
               "needle_span": list(r.needle_span), "output": r.output,
               "recall": round(r.recall, 4), "counted": r.counted} for r in part]
      bar.update(len(group))
  bar.close()
  (out / "tests.json").write_text(json.dumps(log, indent=1) + "\n")
  n_counted = sum(r.counted for r in results)
  if n_counted == 0:
    raise ScoreError(f"no test was answered right (0 of {len(results)}; see "
                     f"{out / 'tests.json'}), so the scores are undefined; use shorter "
                     "--lengths or another model")
  score_file = out / "retrieval_scores.json"
  score_file.write_text(json.dumps(scores_json(results, config.num_layers, config.num_heads)))
  pat = retrieval_score_pattern(score_file, config.num_kv_heads, threshold=threshold,
                                sparsity=sparsity, sink=sink, recent=recent,
                                model_name=config.name)
  pat.metadata.update({
      "identified_by": "duojax.identify.retrieval_score", "haystack": haystack_name,
      "needles": [t.needle for t in tasks], "chat": chat, "lengths": lengths, "depths": depths,
      "offset": offset, "max_new_tokens": max_new_tokens, "min_recall": min_recall,
      "n_tests": len(results), "n_counted": n_counted})
  if len(tasks) == 1:
    pat.metadata["needle"] = tasks[0].needle  # the key older patterns carry
  return pat, results


# -- CLI ----------------------------------------------------------------------------------

def _int_list(s: str) -> list[int]:
  try:
    out = [int(x) for x in s.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
  if not out:
    raise argparse.ArgumentTypeError("give at least one length")
  return out


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m duojax.identify retrieval-score",
                               description="Copy-paste retrieval scores over NIAH decoding.")
  ap.add_argument("--ckpt", default=None, help="checkpoint folder or embedded name (smollm2-135m)")
  ap.add_argument("--haystack", required=True, help="folder of .txt files, a .txt, or .json/.jsonl")
  ap.add_argument("--out", required=True, help="folder for the pattern and score files")
  ap.add_argument("--lengths", type=_int_list, default=[1000, 2000, 4000],
                  help="prompt lengths in tokens, comma-separated")
  ap.add_argument("--depths", type=int, default=5, help="needle depths per length (evenly spaced)")
  ap.add_argument("--max-new-tokens", type=int, default=32)
  ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                  help="wrap prompts in the chat template (default; --no-chat for raw text)")
  ap.add_argument("--min-recall", type=float, default=0.5,
                  help="a test counts iff ROUGE-1 recall of the answer > this")
  sel = ap.add_mutually_exclusive_group()
  sel.add_argument("--threshold", type=float, default=None,
                   help="retrieval iff KV-head score > threshold (default 0.1)")
  sel.add_argument("--sparsity", type=float, default=None, help="fraction of KV heads that stream")
  ap.add_argument("--batch-size", type=int, default=8, help="tests decoded together")
  ap.add_argument("--offset", type=int, default=0,
                  help="haystack token where prompts start (keep away from evaluation prompts)")
  ap.add_argument("--prefill-chunk", type=int, default=1024)
  ap.add_argument("--sink", type=int, default=DEPLOY.sink, help="recorded streaming sink")
  ap.add_argument("--recent", type=int, default=DEPLOY.recent, help="recorded recent window")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  ap.add_argument("--no-progress", action="store_true")
  return ap


def main(argv=None) -> int:
  a = build_parser().parse_args(argv)
  from duojax.checkpoint import store
  from duojax.checkpoint.embedded import resolve_checkpoint
  from duojax.checkpoint.hf import CheckpointError
  from duojax.data.haystack import HaystackTokens, load_haystack
  from duojax.pattern import PatternError
  prog = "duojax.identify retrieval-score"
  try:
    if a.depths < 1 or a.max_new_tokens < 1 or a.batch_size < 1 or min(a.lengths) < 16:
      raise ScoreError("--depths, --max-new-tokens and --batch-size must be >= 1 and every "
                       "--lengths entry >= 16")
    folder = resolve_checkpoint(a.ckpt, progress=not a.no_progress)
    config = store.load_config(folder)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[a.dtype]
    params = store.load_params(folder, dtype=dtype)
    tok = store.load_tokenizer(folder)
    hay = HaystackTokens(load_haystack(a.haystack), tok, line_breaks=False)
    out = Path(a.out)
    pat, results = identify(
        params, config, tok, hay, out, lengths=a.lengths, depths=a.depths, chat=a.chat,
        offset=a.offset, max_new_tokens=a.max_new_tokens, min_recall=a.min_recall,
        threshold=a.threshold, sparsity=a.sparsity, batch=a.batch_size,
        prefill_chunk=a.prefill_chunk, sink=a.sink, recent=a.recent,
        progress=not a.no_progress, haystack_name=str(a.haystack))
    n_counted = pat.metadata["n_counted"]
    pat.save(out, overwrite=True)
  except (ScoreError, CheckpointError, PatternError, ValueError) as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  mask = pat.mask()
  print(json.dumps({"out": str(out), "n_tests": len(results), "n_counted": n_counted,
                    "retrieval_heads": [[int(l), int(h)] for l, h in np.argwhere(mask.as_array())],
                    "retrieval_fraction": round(mask.retrieval_fraction, 4)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
