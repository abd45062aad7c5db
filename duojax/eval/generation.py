"""Greedy generation for evaluation grids, compiled once per head mask.

`engine.generate` sizes the cache and batch to each call's prompts, so a grid
of lengths would compile a prefill and a decode program per length and method.
Here every batch of a run shares one shape: `batch_size` rows (a short batch is
filled with copies of its first prompt, then dropped), a cache of fixed
`capacity` and a fixed prefill chunk. Shorter prompts then run fewer chunks of
the same compiled step, and each method compiles exactly two programs.

`compile_programs` builds those two programs for every method of a run before
any of them runs: lowering (Python) one after another, XLA compiling in a thread
pool, since a grid of ~14 methods x 2 programs at 10-20 s each would otherwise
spend minutes compiling one program at a time. A `Programs` dict keeps them for
the process, so later tasks of the same shapes (niah, mkniah, passkey in one
driver) compile nothing.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from duojax import cache as kvc
from duojax.config import ModelConfig, round_up
from duojax.engine import InputError, SamplingSettings, decode, pad_batch, prefill, prefill_step

# (mask, GenSettings, dtype) -> (prefill_step, decode) executables, compiled ahead of time.
Programs = dict


@dataclasses.dataclass(frozen=True)
class GenSettings:
  """Shapes shared by every batch of a run (static, so they key the compile cache)."""
  max_new_tokens: int = 32
  prefill_chunk: int = 1024
  batch_size: int = 10
  capacity: int = 8192  # KV slots per row: longest prompt + max_new_tokens, rounded up
  backend: str = "xla"
  # Streaming heads keep the compensation token: it changes the cache's structure,
  # so it keys the compile like the shapes do (run_grid sets it per method).
  compensation: bool = False
  kv_dtype: str | None = None  # the cache's storage (kvc.init_cache): None, bf16, int8, int4, k8v4
  # The weights each method runs (model.handle.prepare_params): bf16 (as loaded) or int8. It keys
  # the compiled programs too: int8 weights are QArrays, another argument structure.
  weights_dtype: str = "bf16"
  # A jax Mesh (duojax.sharding.make_mesh) to run on, None: one device. Its programs are the
  # engine's mesh steps, compiled on first use and kept by the engine per shape and mesh.
  mesh: object = None

  @classmethod
  def for_lengths(cls, longest: int, config: ModelConfig, **kw) -> "GenSettings":
    s = cls(**kw)
    if s.max_new_tokens < 1:
      raise InputError(f"--max-new-tokens must be >= 1, got {s.max_new_tokens}")
    if s.batch_size < 1 or s.prefill_chunk < 1:
      raise InputError("--batch-size and --prefill-chunk must be >= 1")
    if longest + s.max_new_tokens > config.max_position_embeddings:
      raise InputError(
          f"prompts of {longest} tokens + {s.max_new_tokens} new tokens exceed the model's "
          f"context of {config.max_position_embeddings}; lower the largest --lengths value")
    chunk = min(s.prefill_chunk, round_up(longest, 16))
    # Slots for the padded prompt (a whole number of chunks) plus the answer.
    cap = round_up(round_up(longest, chunk) + s.max_new_tokens, 16)
    if s.mesh is not None:  # every device holding a slice of the cache gets an equal one
      from duojax.sharding import capacity_multiple
      cap = round_up(cap, capacity_multiple(s.mesh))
    return dataclasses.replace(s, prefill_chunk=chunk, capacity=cap)


def _program_key(mask, s: GenSettings, dtype) -> tuple:
  return (mask, s, jnp.dtype(dtype).name)


def compile_programs(params, config: ModelConfig, jobs, s: GenSettings, dtype=None,
                     programs: Programs | None = None, workers: int | None = None) -> Programs:
  """The prefill and decode programs of every (mask, compensation) in `jobs`.

  params: the weights (any head order: only their shapes matter); jobs: iterable
  of (mask or None, compensation: bool). Returns `programs` (a new dict if None)
  with an entry per job that it lacked, for `greedy_generate(programs=...)`.
  """
  programs = {} if programs is None else programs
  dtype = dtype or params["embed"].dtype
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  b = s.batch_size
  i32 = jax.ShapeDtypeStruct((b,), jnp.int32)
  hid = jax.ShapeDtypeStruct((b, config.hidden_size), params["embed"].dtype)
  tok = jax.ShapeDtypeStruct((b, s.prefill_chunk), jnp.int32)
  eos = tuple(config.eos_token_ids)
  todo = {}
  if s.mesh is not None:  # greedy_generate compiles the engine's mesh steps (kept there)
    return programs
  for mask, comp in jobs:
    g = dataclasses.replace(s, compensation=bool(comp and mask is not None))
    key = _program_key(mask, g, dtype)
    if key in programs or key in todo:
      continue
    cache = jax.eval_shape(lambda m=mask, c=g.compensation: kvc.init_cache(
        config, b, g.capacity, m, dtype, c, g.kv_dtype))
    todo[key] = (
        prefill_step.lower(abstract, config, tok, cache, i32, i32, hid, g.backend),
        decode.lower(abstract, config, cache, hid, jax.random.PRNGKey(0), g.max_new_tokens,
                     SamplingSettings(), eos, g.backend))
  if todo:
    workers = workers or min(2 * len(todo), os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, workers)) as ex:  # XLA compiles without the GIL
      done = {k: (ex.submit(p.compile), ex.submit(d.compile)) for k, (p, d) in todo.items()}
      for k, (p, d) in done.items():
        programs[k] = (p.result(), d.result())
  return programs


def greedy_generate(params, config: ModelConfig, prompts: list[list[int]], mask,
                    s: GenSettings, dtype=None, programs: Programs | None = None
                    ) -> list[list[int]]:
  """Greedy continuations of up to batch_size prompts -> ids per prompt (EOS dropped).

  params must already be reordered for `mask` (model.apply_head_mask). programs:
  from `compile_programs`; without an entry for (mask, s, dtype) the jitted
  engine functions run (and compile on first use).
  """
  n = len(prompts)
  if not 1 <= n <= s.batch_size:
    raise InputError(f"need 1..{s.batch_size} prompts per batch, got {n}")
  rows = list(prompts) + [prompts[0]] * (s.batch_size - n)
  tokens, lengths = pad_batch(rows, s.prefill_chunk)
  if tokens.shape[1] + s.max_new_tokens > s.capacity:
    raise InputError(f"a prompt of {int(lengths.max())} tokens does not fit the cache of "
                     f"{s.capacity} slots set for this run")
  dtype = dtype or params["embed"].dtype
  cache = kvc.init_cache(config, s.batch_size, s.capacity, mask, dtype,
                         s.compensation and mask is not None, s.kv_dtype)
  eos = tuple(config.eos_token_ids)
  key = jax.random.PRNGKey(0)
  compiled = (programs or {}).get(_program_key(mask, s, dtype))
  if s.mesh is not None:
    out = _generate_on_mesh(params, config, tokens, lengths, cache, mask, s, eos, key)
  elif compiled is None:
    last, cache, _ = prefill(params, config, tokens, lengths, cache, s.prefill_chunk, s.backend)
    out, _, _ = decode(params, config, cache, last, key, s.max_new_tokens, SamplingSettings(),
                       eos, s.backend)
  else:
    pre, dec = compiled
    lens = jnp.asarray(lengths, jnp.int32)
    last = jnp.zeros((s.batch_size, config.hidden_size), params["embed"].dtype)
    for c0 in range(0, tokens.shape[1], s.prefill_chunk):
      last, cache, _ = pre(params, jnp.asarray(tokens[:, c0:c0 + s.prefill_chunk]), cache,
                           jnp.clip(lens - c0, 0, s.prefill_chunk), lens - 1 - c0, last)
    out, _, _ = dec(params, cache, last, key)
  out = np.asarray(out)[:n]
  return [[int(t) for t in row if t >= 0 and t not in eos] for row in out]


def _generate_on_mesh(params, config, tokens, lengths, cache, mask, s: GenSettings, eos, key):
  """greedy_generate's prefill + decode through the engine's mesh steps (the shapes are
  the run's, so each method compiles its pair once; the engine keeps them)."""
  from duojax import engine
  from duojax.model.handle import as_handle
  h, cache, pl = engine.place_on_mesh(s.mesh, as_handle(params, config, mask), config, cache)
  step = engine.mesh_prefill_step(s.mesh, pl, h, config, cache, s.prefill_chunk, s.backend)
  last, cache, _ = prefill(h, config, tokens, lengths, cache, s.prefill_chunk, s.backend,
                           step=step)
  dec = engine.mesh_decode(s.mesh, pl, h, config, cache, s.max_new_tokens, SamplingSettings(),
                           eos, s.backend)
  out, _, _ = dec(h, cache, last, key)
  return out
