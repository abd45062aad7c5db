"""Long-context perplexity over haystack windows, chunk by chunk.

Each window of `length` tokens runs through the chunked prefill of the method's
cache (the same path serving uses, so streaming heads see exactly sink +
recent); per chunk only the next-token log-likelihoods are kept, never the
[T, V] logits. Perplexity is reported over the whole window and per position
band, since streaming heads can only hurt tokens past sink + recent.
"""

from __future__ import annotations

import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from duojax import cache as kvc
from duojax.config import ModelConfig, round_up
from duojax.data.haystack import HaystackTokens
from duojax.eval.grid import abstract_weights, check_haystack
from duojax.model.handle import prepare_params
from duojax.eval.methods import BuiltMethod
from duojax.model import llama


def window_offsets(hay: HaystackTokens, length: int, samples: int) -> list[int]:
  """`samples` non-overlapping windows, taken from the end of the haystack
  (its last documents), each starting at a sentence start."""
  if samples < 1:
    raise ValueError(f"--samples must be >= 1, got {samples}")
  check_haystack(hay, length * samples)
  out, end = [], len(hay)
  for _ in range(samples):
    starts = hay.starts[hay.starts <= end - length]
    if not len(starts):
      raise ValueError(f"the haystack ({len(hay)} tokens) holds no {samples} separate windows of "
                       f"{length} tokens; pass a longer --haystack or fewer --samples")
    start = int(starts[-1])
    out.append(start)
    end = start
  return sorted(out)


@functools.partial(jax.jit, static_argnames=("config", "backend"), donate_argnames=("cache",))
def _nll_step(params, config, tokens, targets, cache, n_valid, backend):
  """tokens, targets [B, C] -> (nll [B, C] fp32 of targets, cache)."""
  hidden, cache = llama.forward_chunk(params, config, tokens, cache, n_valid, backend)
  logp = jax.nn.log_softmax(llama.logits_from_hidden(params, hidden), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return nll, cache


def compile_steps(params, config: ModelConfig, shape: tuple[int, int], jobs, chunk: int,
                  backend: str = "xla", dtype=None, kv_dtype: str | None = None) -> dict:
  """`_nll_step` compiled ahead of time for each (mask, compensation) in `jobs`,
  for windows of `shape` [B, T]: lowered one after another, XLA-compiled in a
  thread pool (a method each; compiles dominate a perplexity run on a GPU).
  params: the weights as the methods run them (their shapes only: `abstract_weights`);
  kv_dtype: the cache's storage (kvc.init_cache).
  Returns {(mask, compensation): executable} for `token_nll(compiled=...)`."""
  from concurrent.futures import ThreadPoolExecutor
  b, t = shape
  chunk = min(chunk, round_up(t, 16))
  padded = round_up(t, chunk)
  dtype = dtype or params["embed"].dtype
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tok = jax.ShapeDtypeStruct((b, chunk), jnp.int32)
  lowered = {}
  for mask, comp in jobs:
    comp = bool(comp and mask is not None)
    if (mask, comp) in lowered:
      continue
    cache = jax.eval_shape(lambda m=mask, c=comp: kvc.init_cache(config, b, padded, m, dtype, c,
                                                                 kv_dtype))
    lowered[(mask, comp)] = _nll_step.lower(abstract, config, tok, tok, cache,
                                            jax.ShapeDtypeStruct((b,), jnp.int32), backend)
  if not lowered:
    return {}
  with ThreadPoolExecutor(min(len(lowered), os.cpu_count() or 1)) as ex:  # no GIL in XLA
    futures = {k: ex.submit(low.compile) for k, low in lowered.items()}
    return {k: f.result() for k, f in futures.items()}


def token_nll(params, config: ModelConfig, windows: np.ndarray, mask, chunk: int,
              backend: str = "xla", dtype=None, compensation: bool = False,
              compiled=None, kv_dtype: str | None = None) -> np.ndarray:
  """windows int32 [B, T] -> nll [B, T - 1]: -log p(x[t+1] | x[:t+1]).

  params must be reordered for `mask` (and may be int8: model.handle.prepare_params);
  compensation: streaming heads keep the compensation token; compiled: this method's
  entry of `compile_steps` (None: the jitted step); kv_dtype: the cache's storage (None:
  `dtype`; int8 / int4: quantised per token per KV head, as serving stores it).
  """
  b, t = windows.shape
  chunk = min(chunk, round_up(t, 16))
  padded = round_up(t, chunk)
  tokens = np.zeros((b, padded), np.int32)
  tokens[:, :t] = windows
  targets = np.zeros_like(tokens)
  targets[:, :t - 1] = windows[:, 1:]
  cache = kvc.init_cache(config, b, padded, mask, dtype or params["embed"].dtype,
                         compensation and mask is not None, kv_dtype)
  out = []
  for c0 in range(0, padded, chunk):
    n_valid = jnp.full((b,), max(0, min(chunk, t - c0)), jnp.int32)
    tk, tg = jnp.asarray(tokens[:, c0:c0 + chunk]), jnp.asarray(targets[:, c0:c0 + chunk])
    if compiled is None:
      nll, cache = _nll_step(params, config, tk, tg, cache, n_valid, backend)
    else:
      nll, cache = compiled(params, tk, tg, cache, n_valid)
    out.append(np.asarray(nll))
  return np.concatenate(out, axis=1)[:, :t - 1]


def bands(length: int, edges: list[int]) -> list[tuple[int, int]]:
  """Position bands [a, b) of predicted tokens: 0..e1, e1..e2, ..., ..length-1."""
  cuts = sorted({0, *[e for e in edges if 0 < e < length - 1], length - 1})
  return list(zip(cuts[:-1], cuts[1:]))


def evaluate(params, config: ModelConfig, hay: HaystackTokens, methods: list[BuiltMethod],
             length: int, samples: int = 2, band_edges: list[int] | None = None,
             chunk: int = 1024, backend: str = "xla", dtype=None, progress: bool = True,
             kv_dtype: str | None = None, weights_dtype: str = "bf16") -> dict:
  """Perplexity of each method on the same windows -> JSON-ready dict.

  params: stored head order (each method reorders its own copy); kv_dtype: the cache's
  storage (None: the compute dtype; int8 / int4 quantised); weights_dtype: bf16, or int8
  (each method's reordered weights quantised, model.handle.prepare_params)."""
  from tqdm.auto import tqdm
  if length < 2:
    raise ValueError(f"perplexity needs windows of >= 2 tokens, got {length}")
  if length > config.max_position_embeddings:
    raise ValueError(f"--lengths {length} exceeds the model's context of "
                     f"{config.max_position_embeddings}")
  offs = window_offsets(hay, length, samples)
  windows = np.stack([hay.take(length, o) for o in offs])
  spans = bands(length, band_edges or [])
  rows, seconds = {}, {}
  t0 = time.perf_counter()
  compiled = compile_steps(abstract_weights(params, weights_dtype), config, windows.shape,
                           [(bm.mask, bm.method.compensation) for bm in methods], chunk, backend,
                           dtype, kv_dtype)
  seconds["compile"] = round(time.perf_counter() - t0, 2)
  for bm in tqdm(methods, desc="ppl", unit="method", disable=not progress):
    t0 = time.perf_counter()
    p = prepare_params(params, bm.mask, weights_dtype)
    comp = bool(bm.method.compensation and bm.mask is not None)
    nll = token_nll(p, config, windows, bm.mask, chunk, backend, dtype, bm.method.compensation,
                    compiled[(bm.mask, comp)], kv_dtype).astype(np.float64)
    del p
    seconds[bm.method.name] = round(time.perf_counter() - t0, 2)
    rows[bm.method.name] = {
        "ppl": math.exp(nll.mean()),
        "bands": [{"from": a, "to": b, "ppl": math.exp(nll[:, a:b].mean())} for a, b in spans],
        "per_window": [math.exp(x) for x in nll.mean(axis=1)],
    }
  return {"task": "ppl", "length": length, "windows": offs, "results": rows, "seconds": seconds,
          "methods": [bm.describe() for bm in methods], "kv_dtype": kv_dtype,
          "weights_dtype": weights_dtype}
