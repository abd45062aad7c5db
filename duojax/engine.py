"""Chunked prefill and jitted decoding over any cache kind.

The model comes in as a `ModelHandle` (duojax.model.handle): the NNX graphdef,
built for the head pattern, rides in its pytree structure, the state is a plain
dict of arrays, and the steps merge the two inside their trace. The pattern also
shapes the cache (its shapes and static sink/recent fields), so each pattern
compiles once and runs with no gathers.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from duojax import cache as kvc
from duojax import compensation  # noqa: F401  defines what init_cache(compensation=True) builds
from duojax.config import ModelConfig, round_up
from duojax.model import handle as model_handle
from duojax.model.handle import ModelHandle
from duojax.model.modules import Llama, splits_from_cache


class InputError(ValueError):
  """Bad user input (prompt too long, empty batch, ...); the message names the fix."""


def _handle(model, config: ModelConfig, mask=None, cache: kvc.KVCache | None = None
            ) -> ModelHandle:
  """The model as a handle: as it is, or from a plain params dict already reordered for
  `mask` (or, without one, for the head split the cache was built with)."""
  if isinstance(model, ModelHandle):
    return model
  if isinstance(model, Llama):
    raise InputError("pass a ModelHandle (duojax.model.split(model) once at load), not the "
                     "NNX module: splitting per call would walk its graph every time")
  splits = None if cache is None or mask is not None else splits_from_cache(config, cache)
  return model_handle.from_params(config, model, mask, reordered=True, splits=splits)


@functools.partial(jax.jit, static_argnames=("config", "backend", "all_logits"),
                   donate_argnames=("cache",))
def prefill_step(model: ModelHandle, config, tokens, cache, n_valid, last_idx, last_hidden,
                 backend, all_logits=False):
  """One prefill chunk: tokens [B, C] through the model, the cache extended in place.

  model: a ModelHandle (its graphdef is static: it rides in the pytree structure), or a
  params dict reordered for the cache's pattern (turned into one inside the trace);
  n_valid [B] real tokens of the chunk per row; last_idx [B] each row's last prompt
  token's index in this chunk (outside [0, C): not here); last_hidden [B, E] carried.
  Returns (last_hidden, cache, logits [B, C, V] fp32 or None).
  """
  m = _handle(model, config, cache=cache).module()
  hidden, cache = m(tokens, cache, n_valid, backend)
  in_chunk = (last_idx >= 0) & (last_idx < tokens.shape[1])
  pick = jnp.take_along_axis(hidden, jnp.clip(last_idx, 0, tokens.shape[1] - 1)[:, None, None],
                             axis=1)[:, 0]
  last_hidden = jnp.where(in_chunk[:, None], pick.astype(last_hidden.dtype), last_hidden)
  logits = m.logits(hidden) if all_logits else None
  return last_hidden, cache, logits


def pad_batch(prompts: list[list[int]], multiple: int, pad_id: int = 0):
  """Right-pads prompts to a common length (a multiple of `multiple`).

  Returns tokens [B, T] int32 and lengths [B] int32.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise InputError("every prompt needs at least one token")
  lengths = np.array([len(p) for p in prompts], np.int32)
  t = round_up(int(lengths.max()), multiple)
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  return tokens, lengths


def prefill(model, config: ModelConfig, tokens: np.ndarray, lengths: np.ndarray,
            cache: kvc.KVCache, chunk: int, backend: str = "xla", all_logits: bool = False,
            step=None):
  """Chunked prefill of a right-padded batch.

  model: a ModelHandle (or a params dict reordered for the cache's pattern).
  tokens [B, T] (T a multiple of chunk), lengths [B]. Returns (last_hidden [B, E]
  at each row's last prompt token, cache, logits [B, T, V] or None).
  """
  b, t = tokens.shape
  if t % chunk:
    raise InputError(f"padded length {t} is not a multiple of the prefill chunk {chunk}")
  params = _handle(model, config, cache=cache)
  last = jnp.zeros((b, config.hidden_size), params.dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  outs = []
  if step is None:  # step: an AOT-compiled prefill_step taking the dynamic args only
    step = lambda p, tk, c, n, li, lh: prefill_step(p, config, tk, c, n, li, lh, backend,
                                                     all_logits)
  for c0 in range(0, t, chunk):
    n_valid = jnp.clip(lengths - c0, 0, chunk)
    last, cache, lg = step(params, jnp.asarray(tokens[:, c0:c0 + chunk]), cache, n_valid,
                           lengths - 1 - c0, last)
    outs.append(lg)
  return last, cache, (jnp.concatenate(outs, axis=1) if all_logits else None)


def forward_logits(model, config: ModelConfig, prompts: list[list[int]], mask=None,
                   chunk: int | None = None, backend: str = "xla", dtype=None,
                   compensation: bool = False, kv_dtype: str | None = None) -> list[np.ndarray]:
  """Logits for every prompt position (tests, perplexity). Returns [T_i, V] per prompt.

  compensation: streaming heads keep RazorAttention's compensation token.
  kv_dtype: the cache's storage (kvc.init_cache): None as `dtype`, bf16, fp32, int8, int4, k8v4."""
  chunk = chunk or round_up(max(len(p) for p in prompts), 8)
  tokens, lengths = pad_batch(prompts, chunk)
  params = _handle(model, config, mask)
  dtype = dtype or params.dtype
  cache = kvc.init_cache(config, len(prompts), tokens.shape[1], mask, dtype, compensation,
                         kv_dtype)
  _, _, logits = prefill(params, config, tokens, lengths, cache, chunk, backend, all_logits=True)
  logits = np.asarray(logits)
  return [logits[i, :n] for i, n in enumerate(lengths)]


# -- sampling and decoding ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise InputError(f"--temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise InputError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample(logits: jax.Array, key: jax.Array, s: SamplingSettings) -> jax.Array:
  """logits [B, V] fp32 -> token ids [B] int32."""
  if s.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / s.temperature
  if s.top_p < 1:
    srt = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    cutoff_idx = jnp.sum(cum < s.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(srt, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


SYNC_EVERY = 8  # decode steps between checks that every row stopped (see `decode`)


@functools.partial(jax.jit, static_argnames=("config", "backend", "max_new", "sampling", "eos"),
                   donate_argnames=("cache",))
def decode(model: ModelHandle, config: ModelConfig, cache: kvc.KVCache, last_hidden: jax.Array,
           key: jax.Array, max_new: int, sampling: SamplingSettings, eos: tuple[int, ...],
           backend: str = "xla"):
  """Generates up to max_new tokens per row in one compiled loop.

  model: a ModelHandle (merged here, inside the trace). Returns (tokens [B, max_new]
  int32 (-1 after a row stopped), n_steps, cache). n_steps counts the steps run: up to a
  run of SYNC_EVERY past the one where the last row stopped (those tokens are -1).
  """
  m = _handle(model, config, cache=cache).module()
  b = last_hidden.shape[0]
  out = jnp.full((b, max_new), -1, jnp.int32)
  eos_arr = jnp.asarray(eos if eos else (-2,), jnp.int32)

  def cond(state):
    i, _, _, _, done, _ = state
    return (i < max_new) & ~jnp.all(done)

  def body(state):
    i, cache, hidden, out, done, key = state
    key, sub = jax.random.split(key)
    tok = sample(m.logits(hidden), sub, sampling)
    out = out.at[:, i].set(jnp.where(done, -1, tok))
    done = done | jnp.isin(tok, eos_arr)
    h, cache = m(tok[:, None], cache, jnp.ones((b,), jnp.int32), backend)
    return i + 1, cache, h[:, 0].astype(hidden.dtype), out, done, key

  state = (jnp.int32(0), cache, last_hidden, out, jnp.zeros((b,), bool), key)
  # On GPU a while loop whose condition depends on data copies that condition to the host
  # and waits for it every iteration: the host cannot enqueue token i + 1's ~10 launches a
  # layer while the device runs token i, so every launch gap lands in the step (the 1.3 ms
  # fixed cost per token of issue 18). Steps therefore go in runs of SYNC_EVERY inside a
  # loop of static trip count, which never syncs; "has every row stopped" is asked once a
  # run (a row that stops mid-run decodes on, its tokens masked to -1, as it already did
  # while other rows were running). A run divides max_new (so no run overshoots the cache's
  # capacity, and the step is traced once); a max_new with no divisor in 2..SYNC_EVERY
  # (a prime above it) keeps the plain loop.
  run = max(d for d in range(1, min(SYNC_EVERY, max(max_new, 1)) + 1) if max_new % d == 0)
  step = body if run == 1 else lambda s: jax.lax.fori_loop(0, run, lambda _, x: body(x), s)
  i, cache, _, out, _, _ = jax.lax.while_loop(cond, step, state)
  return out, i, cache


_COMPILED: dict = {}


def _signature(x):
  if isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
    return ("array", tuple(x.shape), str(x.dtype))
  return x


def _aot(fn, args):
  """Compiles fn for these argument shapes once per process (AOT executables are
  not in jit's own cache), so repeated `generate` calls with the same shapes and
  pattern (an evaluation grid) reuse the executable."""
  leaves, tree = jax.tree_util.tree_flatten(args)
  key = (fn, tree, tuple(_signature(l) for l in leaves))
  if key not in _COMPILED:
    if len(_COMPILED) > 64:
      _COMPILED.clear()
    _COMPILED[key] = fn.lower(*args).compile()
  return _COMPILED[key]


@dataclasses.dataclass
class GenerationResult:
  tokens: list[list[int]]  # generated ids per row, EOS included when reached
  prompt_lengths: list[int]
  prefill_seconds: float
  decode_seconds: float
  decode_steps: int
  compile_seconds: float
  kv_cache_bytes: int

  @property
  def decode_tokens_per_second(self) -> float:
    n = sum(len(t) for t in self.tokens)
    return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


# -- running on a device mesh ------------------------------------------------------------
# The jitted steps above stay as they are; on a mesh the weights and the cache are
# placed with duojax.sharding's rules, the steps are jitted again with those shardings
# as explicit in/out shardings, and a mesh with sequence > 1 swaps the backend name
# for a `ContextParallel` object (static, like the name), which routes every layer's
# attention through context_parallel.attend. GSPMD partitions the rest (projections
# over heads, the MLP, batch over data) from the input shardings.

def mesh_backend(mesh, backend: str = "xla", cache: kvc.KVCache | None = None):
  """The static `backend` the steps take on `mesh`: the name itself on one device, the
  xla reference partitioned by GSPMD on several, ContextParallel when sequence > 1, when
  a retrieval part of `cache` has its slots split over `tensor` (its heads do not divide
  it: sharding.SPILL; GSPMD would gather the slices back) or when `backend` names
  kernels (tpu, tpu-interpret, gpu): a pallas_call inside a GSPMD-partitioned jit is
  rejected, so the retrieval heads' kernels run per device under shard_map there (their
  partial ops, merged over the axes the slots are split over)."""
  from duojax import sharding
  from duojax import context_parallel
  if mesh is None or mesh.size == 1:
    return backend
  if backend not in ("xla", "auto"):
    try:
      context_parallel.kernel_partial_op(backend)  # can this machine run it? (no compile)
    except (ValueError, RuntimeError) as e:  # BackendUnavailable is both
      raise InputError(f"attention backend {backend!r} cannot run on this mesh of "
                       f"{mesh.size} devices: {e}; use --backend xla with --mesh, or drop "
                       "--mesh") from e
    return context_parallel.ContextParallel(mesh, backend=backend)
  if sharding.mesh_sizes(mesh)["sequence"] > 1 or (
      cache is not None and sharding.splits_sequence(cache, mesh)):
    return context_parallel.ContextParallel(mesh)
  return "xla"


@dataclasses.dataclass(frozen=True)
class MeshPlacement:
  """Where everything a generation touches lives on one mesh (NamedShardings)."""
  model: ModelHandle  # the handle with a NamedSharding per state array
  cache: kvc.KVCache  # a NamedSharding per cache array
  rows: object  # [B] per-row ints (lengths, n_valid)
  tokens: object  # [B, T] token ids, generated tokens
  hidden: object  # [B, E] the carried last hidden state
  logits: object  # [B, T, V]
  replicated: object  # scalars, PRNG keys


def mesh_placement(mesh, model: ModelHandle, cache: kvc.KVCache,
                   config: ModelConfig) -> MeshPlacement:
  """Shardings per duojax.sharding's inference rules. Raises ShardingError (naming the
  sizes that work) when the tensor axis cannot split the model's KV heads."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from duojax import sharding
  b = cache.lengths.shape[0]
  spec = lambda names, shape: NamedSharding(
      mesh, sharding.spec_for(names, shape, mesh, notes=[]))
  return MeshPlacement(
      model=model.replace(sharding.param_shardings(model.state, mesh, config=config)),
      cache=sharding.cache_shardings(cache, mesh),
      rows=spec(("batch",), (b,)),
      tokens=spec(("batch", "length"), (b, 1)),
      hidden=spec(("batch", "embed"), (b, config.hidden_size)),
      logits=spec(("batch", "length", "vocab"), (b, 1, config.vocab_size)),
      replicated=NamedSharding(mesh, P()))


def param_shardings_for(mesh, config: ModelConfig):
  """NamedShardings of the plain params dict (per-layer list, stored head order) by the
  inference rules: the target a checkpoint restore reads each tensor straight into, so
  no device holds the whole model first (serving.load_model(mesh=...)). Raises
  ShardingError (naming the sizes that work) when tensor cannot split the KV heads."""
  from duojax import sharding
  return sharding.config_param_shardings(config, mesh)


def handle_on_mesh(mesh, config: ModelConfig, params: dict, mask=None,
                   weights_dtype: str = "bf16", pack: bool = False) -> ModelHandle:
  """A handle from params already on `mesh` (a restore into `param_shardings_for`): the
  head reorder for `mask` runs as one jit whose outputs keep those shardings (it moves KV
  heads between tensor shards; an eager jnp.take could leave whole copies per device).
  weights_dtype "int8": the same jit quantises the projections after the reorder (the
  scales are per output channel, so they follow the reordered heads), its outputs sharded
  by the rules for quantised weights (duojax.sharding: values as the bf16 weight, scales
  replicated on their size-1 contracted axes): each device quantises its own shard (GSPMD
  all-reduces the absmax where a contracted axis is split: wo, w_down), none the model.
  pack: the same jit packs q/k/v and gate/up (model/pack.py) between the two; the packed
  weights keep the kv_heads and mlp splits (their packing axes are never split), so each
  device packs its own shards."""
  from duojax import sharding
  from duojax.model import quant
  if weights_dtype not in quant.WEIGHT_DTYPES:  # before compiling anything
    quant.quantize_params(params, weights_dtype)  # raises, naming the choices
  if mask is not None or weights_dtype != "bf16" or pack:
    def prepare(p):
      return model_handle.prepare_params(p, mask, weights_dtype, pack)
    out = sharding.param_shardings(jax.eval_shape(prepare, params), mesh, config=config)
    params = jax.jit(prepare, out_shardings=out)(params)
  # quantised above (from_params would quantise again, on whichever device holds it)
  return model_handle.from_params(config, params, mask, reordered=True)


def place_on_mesh(mesh, model, config: ModelConfig, cache: kvc.KVCache):
  """Puts the weights and the cache on `mesh`. Returns (handle, cache, MeshPlacement)."""
  h = _handle(model, config, cache=cache)
  pl = mesh_placement(mesh, h, cache, config)
  return jax.device_put(h, pl.model), jax.device_put(cache, pl.cache), pl


_MESH_STEPS: dict = {}


def _mesh_compiled(name, build, args, statics):
  """One executable per (step, statics, argument shapes and shardings), like `_aot`."""
  leaves, tree = jax.tree_util.tree_flatten(args)
  key = (name, statics, tree, tuple((_signature(l), getattr(l, "sharding", None))
                                    for l in leaves))
  if key not in _MESH_STEPS:
    if len(_MESH_STEPS) > 64:
      _MESH_STEPS.clear()
    _MESH_STEPS[key] = build().lower(*args).compile()
  return _MESH_STEPS[key]


def mesh_prefill_step(mesh, pl: MeshPlacement, model: ModelHandle, config: ModelConfig,
                      cache: kvc.KVCache, chunk: int, backend: str = "xla",
                      all_logits: bool = False):
  """prefill_step compiled for `mesh` with explicit in/out shardings; a `step` for
  `prefill` (it moves host-made row and token arrays onto the mesh itself)."""
  be = mesh_backend(mesh, backend, cache)
  b = cache.lengths.shape[0]

  def build():
    def step(model, tokens, cache, n_valid, last_idx, last_hidden):
      return prefill_step(model, config, tokens, cache, n_valid, last_idx, last_hidden, be,
                          all_logits)
    return jax.jit(step, in_shardings=(pl.model, pl.tokens, pl.cache, pl.rows, pl.rows,
                                       pl.hidden),
                   out_shardings=(pl.hidden, pl.cache, pl.logits if all_logits else None),
                   donate_argnums=(2,))
  sds = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
  i32 = sds((b,), jnp.int32, pl.rows)
  args = (_abstract_on(model, pl.model), sds((b, chunk), jnp.int32, pl.tokens),
          _abstract_on(cache, pl.cache), i32, i32,
          sds((b, config.hidden_size), model.dtype, pl.hidden))
  compiled = _mesh_compiled("prefill", build, args, (mesh, config, be, all_logits))

  def run(p, tk, c, n, li, lh):
    put = jax.device_put
    return compiled(p, put(tk, pl.tokens), c, put(n, pl.rows), put(li, pl.rows),
                    put(lh, pl.hidden))
  run.compiled = compiled  # the executable itself (its memory_analysis, for benchmarks)
  return run


def mesh_decode(mesh, pl: MeshPlacement, model: ModelHandle, config: ModelConfig,
                cache: kvc.KVCache, max_new: int, sampling: SamplingSettings,
                eos: tuple[int, ...], backend: str = "xla"):
  """decode compiled for `mesh` with explicit in/out shardings:
  run(model, cache, last_hidden, key) -> (tokens [B, max_new], n_steps, cache)."""
  be = mesh_backend(mesh, backend, cache)
  b = cache.lengths.shape[0]

  def build():
    def dec(model, cache, last_hidden, key):
      return decode(model, config, cache, last_hidden, key, max_new, sampling, eos, be)
    return jax.jit(dec, in_shardings=(pl.model, pl.cache, pl.hidden, pl.replicated),
                   out_shardings=(pl.tokens, pl.replicated, pl.cache), donate_argnums=(1,))
  key = jax.random.PRNGKey(0)
  args = (_abstract_on(model, pl.model), _abstract_on(cache, pl.cache),
          jax.ShapeDtypeStruct((b, config.hidden_size), model.dtype, sharding=pl.hidden),
          jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=pl.replicated))
  compiled = _mesh_compiled("decode", build, args, (mesh, config, be, max_new, sampling, eos))

  def run(p, c, lh, k):
    return compiled(p, c, jax.device_put(lh, pl.hidden), jax.device_put(k, pl.replicated))
  return run


def _abstract_on(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def generate(model, config: ModelConfig, prompts: list[list[int]], max_new_tokens: int = 64,
             mask=None, prefill_chunk: int = 4096, sampling: SamplingSettings = SamplingSettings(),
             seed: int = 0, backend: str = "xla", cache_dtype=None,
             compensation: bool = False, mesh=None,
             kv_dtype: str | None = None) -> GenerationResult:
  """Prefill a batch of prompts of different lengths, then decode.

  model: a ModelHandle built for `mask` (serving.load_model's `m.model`), or a params
  dict already reordered with model.apply_head_mask. mask: a HeadMask for
  DuoAttention, or None for full attention. compensation: streaming
  heads keep RazorAttention's compensation token (duojax.compensation; xla only).
  mesh: a jax Mesh (duojax.sharding.make_mesh) to run on; None: one device, today's path.
  kv_dtype: the cache's storage: None (cache_dtype, else the weights'), bf16, fp32, or
  int8 / int4 (quantised per token per KV head, duojax.kv_quant).
  """
  if max_new_tokens < 1:
    raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
  longest = max((len(p) for p in prompts), default=0)
  if longest + max_new_tokens > config.max_position_embeddings:
    raise InputError(
        f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context "
        f"of {config.max_position_embeddings}; shorten the prompt or lower --max-new-tokens")
  chunk = min(prefill_chunk, round_up(longest, 16))
  tokens, lengths = pad_batch(prompts, chunk)
  # a multiple of 16 and of sequence x tensor (each device holds an equal slice, also of
  # a retrieval part whose heads do not divide tensor: duojax.sharding.SPILL)
  from duojax import sharding
  n_seq = sharding.capacity_multiple(mesh)
  capacity = round_up(round_up(int(lengths.max()) + max_new_tokens, 16), n_seq)
  params = _handle(model, config, mask)
  dtype = cache_dtype or params.dtype
  cache = kvc.init_cache(config, len(prompts), capacity, mask, dtype, compensation, kv_dtype)
  nbytes = kvc.cache_nbytes(cache)
  eos = tuple(config.eos_token_ids)
  if mesh is not None:
    return _generate_on_mesh(mesh, params, config, tokens, lengths, cache, chunk,
                             max_new_tokens, sampling, seed, backend, eos, nbytes)

  t0 = time.perf_counter()
  # Compile both programs first so the timings below measure running, not tracing.
  lowered_cache = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), cache)
  hid = jax.ShapeDtypeStruct((len(prompts), config.hidden_size), params.dtype)
  key = jax.random.PRNGKey(seed)
  decode_c = _aot(decode, (params, config, lowered_cache, hid, key, max_new_tokens, sampling,
                            eos, backend))
  i32 = jax.ShapeDtypeStruct(lengths.shape, jnp.int32)
  prefill_c = _aot(prefill_step, (params, config,
                                   jax.ShapeDtypeStruct((len(prompts), chunk), jnp.int32),
                                   lowered_cache, i32, i32, hid, backend))
  compile_s = time.perf_counter() - t0

  return _timed_run(params, config, tokens, lengths, cache, chunk, backend, prefill_c, decode_c,
                    key, compile_s, nbytes)


def _timed_run(params, config, tokens, lengths, cache, chunk, backend, prefill_c, decode_c,
               key, compile_s, nbytes) -> GenerationResult:
  """Prefill and decode with programs already compiled, timing each."""
  t0 = time.perf_counter()
  last, cache, _ = prefill(params, config, tokens, lengths, cache, chunk, backend, step=prefill_c)
  last.block_until_ready()
  t1 = time.perf_counter()
  out, steps, cache = decode_c(params, cache, last, key)
  out = np.asarray(out)
  t2 = time.perf_counter()
  rows = [[int(x) for x in row if x >= 0] for row in out]
  return GenerationResult(rows, [int(n) for n in lengths], t1 - t0, t2 - t1, int(steps), compile_s,
                          nbytes)


def _generate_on_mesh(mesh, params, config, tokens, lengths, cache, chunk, max_new_tokens,
                      sampling, seed, backend, eos, nbytes) -> GenerationResult:
  t0 = time.perf_counter()
  params, cache, pl = place_on_mesh(mesh, params, config, cache)
  key = jax.random.PRNGKey(seed)
  decode_c = mesh_decode(mesh, pl, params, config, cache, max_new_tokens, sampling, eos, backend)
  prefill_c = mesh_prefill_step(mesh, pl, params, config, cache, chunk, backend)
  compile_s = time.perf_counter() - t0

  return _timed_run(params, config, tokens, lengths, cache, chunk, backend, prefill_c, decode_c,
                    key, compile_s, nbytes)
