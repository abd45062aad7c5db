"""Chunked prefill and jitted decoding over any cache kind.

The head pattern reaches jit through the cache's structure (its shapes and the
static sink/recent fields), so each pattern compiles once and runs with no gathers.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from duojax import cache as kvc
from duojax.config import ModelConfig, round_up
from duojax.model import llama


class InputError(ValueError):
  """Bad user input (prompt too long, empty batch, ...); the message names the fix."""


@functools.partial(jax.jit, static_argnames=("config", "backend", "all_logits"),
                   donate_argnames=("cache",))
def _prefill_step(params, config, tokens, cache, n_valid, last_idx, last_hidden, backend,
                  all_logits=False):
  hidden, cache = llama.forward_chunk(params, config, tokens, cache, n_valid, backend)
  in_chunk = (last_idx >= 0) & (last_idx < tokens.shape[1])
  pick = jnp.take_along_axis(hidden, jnp.clip(last_idx, 0, tokens.shape[1] - 1)[:, None, None],
                             axis=1)[:, 0]
  last_hidden = jnp.where(in_chunk[:, None], pick.astype(last_hidden.dtype), last_hidden)
  logits = llama.logits_from_hidden(params, hidden) if all_logits else None
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


def prefill(params, config: ModelConfig, tokens: np.ndarray, lengths: np.ndarray,
            cache: kvc.KVCache, chunk: int, backend: str = "xla", all_logits: bool = False,
            step=None):
  """Chunked prefill of a right-padded batch.

  tokens [B, T] (T a multiple of chunk), lengths [B]. Returns (last_hidden [B, E]
  at each row's last prompt token, cache, logits [B, T, V] or None).
  """
  b, t = tokens.shape
  if t % chunk:
    raise InputError(f"padded length {t} is not a multiple of the prefill chunk {chunk}")
  last = jnp.zeros((b, config.hidden_size), params["embed"].dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  outs = []
  if step is None:  # step: an AOT-compiled _prefill_step taking the dynamic args only
    step = lambda p, tk, c, n, li, lh: _prefill_step(p, config, tk, c, n, li, lh, backend,
                                                      all_logits)
  for c0 in range(0, t, chunk):
    n_valid = jnp.clip(lengths - c0, 0, chunk)
    last, cache, lg = step(params, jnp.asarray(tokens[:, c0:c0 + chunk]), cache, n_valid,
                           lengths - 1 - c0, last)
    outs.append(lg)
  return last, cache, (jnp.concatenate(outs, axis=1) if all_logits else None)


def forward_logits(params, config: ModelConfig, prompts: list[list[int]], mask=None,
                   chunk: int | None = None, backend: str = "xla", dtype=None,
                   compensation: bool = False) -> list[np.ndarray]:
  """Logits for every prompt position (tests, perplexity). Returns [T_i, V] per prompt.

  compensation: streaming heads keep RazorAttention's compensation token."""
  chunk = chunk or round_up(max(len(p) for p in prompts), 8)
  tokens, lengths = pad_batch(prompts, chunk)
  dtype = dtype or params["embed"].dtype
  cache = kvc.init_cache(config, len(prompts), tokens.shape[1], mask, dtype, compensation)
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


@functools.partial(jax.jit, static_argnames=("config", "backend", "max_new", "sampling", "eos"),
                   donate_argnames=("cache",))
def decode(params, config: ModelConfig, cache: kvc.KVCache, last_hidden: jax.Array,
           key: jax.Array, max_new: int, sampling: SamplingSettings, eos: tuple[int, ...],
           backend: str = "xla"):
  """Generates up to max_new tokens per row in one compiled loop.

  Returns (tokens [B, max_new] int32 (-1 after a row stopped), n_steps, cache).
  """
  b = last_hidden.shape[0]
  out = jnp.full((b, max_new), -1, jnp.int32)
  eos_arr = jnp.asarray(eos if eos else (-2,), jnp.int32)

  def cond(state):
    i, _, _, _, done, _ = state
    return (i < max_new) & ~jnp.all(done)

  def body(state):
    i, cache, hidden, out, done, key = state
    key, sub = jax.random.split(key)
    tok = sample(llama.logits_from_hidden(params, hidden), sub, sampling)
    out = out.at[:, i].set(jnp.where(done, -1, tok))
    done = done | jnp.isin(tok, eos_arr)
    h, cache = llama.forward_chunk(params, config, tok[:, None], cache,
                                   jnp.ones((b,), jnp.int32), backend)
    return i + 1, cache, h[:, 0].astype(hidden.dtype), out, done, key

  state = (jnp.int32(0), cache, last_hidden, out, jnp.zeros((b,), bool), key)
  i, cache, _, out, _, _ = jax.lax.while_loop(cond, body, state)
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


def generate(params, config: ModelConfig, prompts: list[list[int]], max_new_tokens: int = 64,
             mask=None, prefill_chunk: int = 4096, sampling: SamplingSettings = SamplingSettings(),
             seed: int = 0, backend: str = "xla", cache_dtype=None,
             compensation: bool = False) -> GenerationResult:
  """Prefill a batch of prompts of different lengths, then decode.

  mask: a HeadMask for DuoAttention (params must already be reordered with
  model.apply_head_mask), or None for full attention. compensation: streaming
  heads keep RazorAttention's compensation token (duojax.compensation; xla only).
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
  capacity = round_up(int(lengths.max()) + max_new_tokens, 16)
  dtype = cache_dtype or params["embed"].dtype
  cache = kvc.init_cache(config, len(prompts), capacity, mask, dtype, compensation)
  nbytes = kvc.cache_nbytes(cache)
  eos = tuple(config.eos_token_ids)

  t0 = time.perf_counter()
  # Compile both programs first so the timings below measure running, not tracing.
  lowered_cache = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), cache)
  hid = jax.ShapeDtypeStruct((len(prompts), config.hidden_size), params["embed"].dtype)
  key = jax.random.PRNGKey(seed)
  decode_c = _aot(decode, (params, config, lowered_cache, hid, key, max_new_tokens, sampling,
                            eos, backend))
  i32 = jax.ShapeDtypeStruct(lengths.shape, jnp.int32)
  prefill_c = _aot(_prefill_step, (params, config,
                                   jax.ShapeDtypeStruct((len(prompts), chunk), jnp.int32),
                                   lowered_cache, i32, i32, hid, backend))
  compile_s = time.perf_counter() - t0

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
