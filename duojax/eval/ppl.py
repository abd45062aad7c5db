"""Long-context perplexity over haystack windows, chunk by chunk.

Each window of `length` tokens runs through the chunked prefill of the method's
cache (the same path serving uses, so streaming heads see exactly sink +
recent); per chunk only the next-token log-likelihoods are kept, never the
[T, V] logits. Perplexity is reported over the whole window and per position
band, since streaming heads can only hurt tokens past sink + recent.

On a device mesh (`mesh=`, axes data, tensor, sequence) the same step runs with the
weights and cache placed by duojax.sharding's inference rules, as the retrieval tasks
do (engine.place_on_mesh): windows split over `data`, heads and the MLP over `tensor`,
and with `sequence` > 1 the retrieval heads' cache split over it (context-parallel
attention). The cache then holds a multiple of sequence x tensor slots; the extra ones
stay empty (masked), so the NLL is the one-device NLL.
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
from duojax import engine, sharding
from duojax.config import ModelConfig, round_up
from duojax.data.haystack import HaystackTokens
from duojax.eval.grid import abstract_weights, check_haystack
from duojax.model.handle import prepare_params
from duojax.eval.methods import BuiltMethod
from duojax.model import handle as model_handle
from duojax.model import llama
from duojax.model.modules import splits_from_cache


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


def _nll(params, config, tokens, targets, cache, n_valid, backend):
  """tokens, targets [B, C] -> (nll [B, C] fp32 of targets, cache). params: a dict
  reordered for the cache's pattern, or a handle (on a mesh)."""
  hidden, cache = llama.forward_chunk(params, config, tokens, cache, n_valid, backend)
  logp = jax.nn.log_softmax(llama.logits_from_hidden(params, hidden), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return nll, cache


@functools.partial(jax.jit, static_argnames=("config", "backend"), donate_argnames=("cache",))
def _nll_step(params, config, tokens, targets, cache, n_valid, backend):
  """tokens, targets [B, C] -> (nll [B, C] fp32 of targets, cache)."""
  return _nll(params, config, tokens, targets, cache, n_valid, backend)


def _slots(t: int, chunk: int, mesh) -> tuple[int, int]:
  """(padded window, cache capacity): the window padded to whole chunks; on a mesh the
  capacity rounded up so every device holds an equal slice of the retrieval slots."""
  padded = round_up(t, chunk)
  return padded, round_up(padded, sharding.capacity_multiple(mesh))


def _lower_on_mesh(mesh, model, config: ModelConfig, cache, chunk: int, backend: str,
                   compensation: bool):
  """The NLL step jitted for `mesh` with explicit in/out shardings, lowered for `model` (a
  handle) and `cache` (arrays or ShapeDtypeStructs). Returns (lowered, MeshPlacement).
  Raises ShardingError (naming the tensor sizes that work) for a mesh that cannot hold
  the model, and ValueError for the compensation token under context parallelism."""
  pl = engine.mesh_placement(mesh, model, cache, config)
  be = engine.mesh_backend(mesh, backend, cache)
  if compensation and not isinstance(be, str):
    raise ValueError("the compensation token is not built for context-parallel attention "
                     "(--mesh sequence>1, or a tensor size that does not divide some layer's "
                     "retrieval heads); drop +comp, or use a mesh of data (and tensor where it "
                     "divides every layer's retrieval heads)")
  b = cache.lengths.shape[0]

  def nll_step_on_mesh(model, tokens, targets, cache, n_valid):
    return _nll(model, config, tokens, targets, cache, n_valid, be)
  # nll [B, C] is laid out like the tokens: rows over data, whole chunks per row
  step = jax.jit(nll_step_on_mesh,
                 in_shardings=(pl.model, pl.tokens, pl.tokens, pl.cache, pl.rows),
                 out_shardings=(pl.tokens, pl.cache), donate_argnums=(3,))
  tok = jax.ShapeDtypeStruct((b, chunk), jnp.int32, sharding=pl.tokens)
  rows = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=pl.rows)
  return step.lower(sharding.abstract(model, pl.model), tok, tok,
                    sharding.abstract(cache, pl.cache), rows), pl


def compile_steps(params, config: ModelConfig, shape: tuple[int, int], jobs, chunk: int,
                  backend: str = "xla", dtype=None, kv_dtype: str | None = None,
                  mesh=None) -> dict:
  """`_nll_step` compiled ahead of time for each (mask, compensation) in `jobs`,
  for windows of `shape` [B, T]: lowered one after another, XLA-compiled in a
  thread pool (a method each; compiles dominate a perplexity run on a GPU).
  params: the weights as the methods run them (their shapes only: `abstract_weights`);
  kv_dtype: the cache's storage (kvc.init_cache); mesh: a jax Mesh to compile for (the
  step with the shardings `token_nll(mesh=...)` places its arguments in), None: one device.
  Returns {(mask, compensation): executable} for `token_nll(compiled=...)`."""
  from concurrent.futures import ThreadPoolExecutor
  b, t = shape
  chunk = min(chunk, round_up(t, 16))
  _, capacity = _slots(t, chunk, mesh)
  dtype = dtype or params["embed"].dtype
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tok = jax.ShapeDtypeStruct((b, chunk), jnp.int32)
  lowered = {}
  for mask, comp in jobs:
    comp = bool(comp and mask is not None)
    if (mask, comp) in lowered:
      continue
    cache = jax.eval_shape(lambda m=mask, c=comp: kvc.init_cache(config, b, capacity, m, dtype,
                                                                 c, kv_dtype))
    if mesh is None:
      lowered[(mask, comp)] = _nll_step.lower(abstract, config, tok, tok, cache,
                                              jax.ShapeDtypeStruct((b,), jnp.int32), backend)
    else:  # the handle token_nll builds (engine.place_on_mesh), as shapes
      model = jax.eval_shape(lambda p, c=cache: model_handle.from_params(
          config, p, reordered=True, splits=splits_from_cache(config, c)), abstract)
      lowered[(mask, comp)] = _lower_on_mesh(mesh, model, config, cache, chunk, backend,
                                             comp)[0]
  if not lowered:
    return {}
  with ThreadPoolExecutor(min(len(lowered), os.cpu_count() or 1)) as ex:  # no GIL in XLA
    futures = {k: ex.submit(low.compile) for k, low in lowered.items()}
    return {k: f.result() for k, f in futures.items()}


def token_nll(params, config: ModelConfig, windows: np.ndarray, mask, chunk: int,
              backend: str = "xla", dtype=None, compensation: bool = False,
              compiled=None, kv_dtype: str | None = None, mesh=None) -> np.ndarray:
  """windows int32 [B, T] -> nll [B, T - 1]: -log p(x[t+1] | x[:t+1]).

  params must be reordered for `mask` (and may be int8: model.handle.prepare_params);
  compensation: streaming heads keep the compensation token; compiled: this method's
  entry of `compile_steps` (None: the jitted step, or on a mesh one compiled here);
  kv_dtype: the cache's storage (None: `dtype`; int8 / int4: quantised per token per KV
  head, as serving stores it); mesh: a jax Mesh to run on (weights and cache placed by
  duojax.sharding's rules), None: one device.
  """
  b, t = windows.shape
  chunk = min(chunk, round_up(t, 16))
  padded, capacity = _slots(t, chunk, mesh)
  tokens = np.zeros((b, padded), np.int32)
  tokens[:, :t] = windows
  targets = np.zeros_like(tokens)
  targets[:, :t - 1] = windows[:, 1:]
  comp = bool(compensation and mask is not None)
  cache = kvc.init_cache(config, b, capacity, mask, dtype or params["embed"].dtype, comp,
                         kv_dtype)
  if mesh is None:
    if compiled is None:
      step = lambda tk, tg, c, n: _nll_step(params, config, tk, tg, c, n, backend)
    else:
      step = lambda tk, tg, c, n: compiled(params, tk, tg, c, n)
  else:
    h, cache, pl = engine.place_on_mesh(mesh, params, config, cache)
    if compiled is None:
      compiled = _lower_on_mesh(mesh, h, config, cache, chunk, backend, comp)[0].compile()
    put = jax.device_put
    step = lambda tk, tg, c, n: compiled(h, put(tk, pl.tokens), put(tg, pl.tokens), c,
                                         put(n, pl.rows))
  out = []
  for c0 in range(0, padded, chunk):
    n_valid = jnp.full((b,), max(0, min(chunk, t - c0)), jnp.int32)
    tk, tg = jnp.asarray(tokens[:, c0:c0 + chunk]), jnp.asarray(targets[:, c0:c0 + chunk])
    nll, cache = step(tk, tg, cache, n_valid)
    out.append(np.asarray(nll))
  return np.concatenate(out, axis=1)[:, :t - 1]


def bands(length: int, edges: list[int]) -> list[tuple[int, int]]:
  """Position bands [a, b) of predicted tokens: 0..e1, e1..e2, ..., ..length-1."""
  cuts = sorted({0, *[e for e in edges if 0 < e < length - 1], length - 1})
  return list(zip(cuts[:-1], cuts[1:]))


def evaluate(params, config: ModelConfig, hay: HaystackTokens, methods: list[BuiltMethod],
             length: int, samples: int = 2, band_edges: list[int] | None = None,
             chunk: int = 1024, backend: str = "xla", dtype=None, progress: bool = True,
             kv_dtype: str | None = None, weights_dtype: str = "bf16", mesh=None) -> dict:
  """Perplexity of each method on the same windows -> JSON-ready dict.

  params: stored head order (each method reorders its own copy); kv_dtype: the cache's
  storage (None: the compute dtype; int8 / int4 quantised); weights_dtype: bf16, or int8
  (each method's reordered weights quantised, model.handle.prepare_params); mesh: a jax
  Mesh to run on (harness.parse_eval_mesh; the windows split over its data axis), None:
  one device."""
  from tqdm.auto import tqdm
  if length < 2:
    raise ValueError(f"perplexity needs windows of >= 2 tokens, got {length}")
  if length > config.max_position_embeddings:
    raise ValueError(f"--lengths {length} exceeds the model's context of "
                     f"{config.max_position_embeddings}")
  if mesh is not None:  # before any window is cut or step compiled
    sharding.check_fits(config, mesh)
  offs = window_offsets(hay, length, samples)
  windows = np.stack([hay.take(length, o) for o in offs])
  spans = bands(length, band_edges or [])
  rows, seconds = {}, {}
  t0 = time.perf_counter()
  compiled = compile_steps(abstract_weights(params, weights_dtype), config, windows.shape,
                           [(bm.mask, bm.method.compensation) for bm in methods], chunk, backend,
                           dtype, kv_dtype, mesh)
  seconds["compile"] = round(time.perf_counter() - t0, 2)
  for bm in tqdm(methods, desc="ppl", unit="method", disable=not progress):
    t0 = time.perf_counter()
    p = prepare_params(params, bm.mask, weights_dtype)
    comp = bool(bm.method.compensation and bm.mask is not None)
    nll = token_nll(p, config, windows, bm.mask, chunk, backend, dtype, bm.method.compensation,
                    compiled[(bm.mask, comp)], kv_dtype, mesh).astype(np.float64)
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
