"""Load a checkpoint ready to serve: the model built for a head mask, tokenizer.

attention kinds:
  full       every head keeps the whole KV cache
  duo        retrieval heads (from a pattern) full, the rest sink + recent
  streaming  every head sink + recent (the StreamingLLM-style baseline)
  random     duo with a seeded random pattern at the same sparsity (a baseline)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from duojax.checkpoint.handle import Checkpoint
from duojax.config import DEPLOY, ModelConfig
from duojax.model import handle as model_handle
from duojax.model.handle import ModelHandle
from duojax.model.pack import pack_params
from duojax.pattern import HeadMask, HeadPattern, PatternError, load_any, random_pattern

ATTENTION_KINDS = ("full", "duo", "streaming", "random")
DEPLOY_SINK, DEPLOY_RECENT = DEPLOY.sink, DEPLOY.recent


@dataclasses.dataclass
class LoadedModel:
  config: ModelConfig
  model: ModelHandle  # built for `mask`: KV heads reordered, retrieval heads first
  tokenizer: object
  mask: HeadMask | None  # None = full attention
  pattern: HeadPattern | None
  attention: str
  ckpt: Path
  compensation: bool = False  # streaming heads keep RazorAttention's compensation token

  def encode_prompt(self, text: str, chat: bool = False) -> list[int]:
    return encode_prompt(self.tokenizer, text, chat)

  @property
  def params(self) -> dict:
    """The weights as the plain params dict, reordered by `mask` like the model, in the
    unpacked layout (a copy of q/k/v and gate/up where the model serves them packed)."""
    return self.model.params


def encode_prompt(tok, text: str, chat: bool = False) -> list[int]:
  """Token ids of a prompt as deployment feeds it (the chat template, or the tokenizer's own
  special tokens, e.g. a BOS where it adds one)."""
  if chat:
    if not getattr(tok, "chat_template", None):
      raise ValueError("this tokenizer has no chat template; drop --chat")
    ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                  add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return [int(i) for i in ids]
  return [int(i) for i in tok(text).input_ids]


def default_sparsity(config: ModelConfig) -> float:
  """DuoAttention's usual choice: 0.5 for GQA models, 0.75 for MHA."""
  return 0.5 if config.group_size > 1 else 0.75


def make_mask(config: ModelConfig, attention: str, pattern: HeadPattern | None,
              sparsity: float | None = None, threshold: float | None = None,
              sink: int | None = None, recent: int | None = None,
              seed: int = 0) -> HeadMask | None:
  """The static head mask for an attention kind (None for full attention)."""
  if attention not in ATTENTION_KINDS:
    raise ValueError(f"--attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
  if sparsity is not None and threshold is not None:
    raise PatternError("give --sparsity or --threshold, not both")
  sink = DEPLOY_SINK if sink is None else sink
  recent = DEPLOY_RECENT if recent is None else recent
  if attention == "full":
    return None
  if attention == "streaming":
    return HeadMask.all_streaming(config.num_layers, config.num_kv_heads, sink, recent)
  if attention == "random":
    pattern = random_pattern(config.num_layers, config.num_kv_heads, seed, sink, recent)
    return pattern.binarize(sparsity=default_sparsity(config) if sparsity is None else sparsity)
  if pattern is None:
    raise PatternError("--attention duo needs a head pattern: pass --pattern DIR (ours or a "
                       "reference DuoAttention folder) or a checkpoint with a default pattern")
  if pattern.shape != (config.num_layers, config.num_kv_heads):
    raise PatternError(
        f"the pattern is {pattern.shape[0]} layers x {pattern.shape[1]} KV heads but the model has "
        f"{config.num_layers} x {config.num_kv_heads}; use a pattern made for this model")
  pattern = pattern.with_settings(sink=sink, recent=recent)
  if threshold is not None:
    return pattern.binarize(threshold=threshold)
  if sparsity is None and "selection" in pattern.metadata:
    return pattern.mask()
  return pattern.binarize(sparsity=default_sparsity(config) if sparsity is None else sparsity)


def load_model(ckpt: str | None = None, attention: str | None = None, pattern: str | None = None,
               sparsity: float | None = None, threshold: float | None = None,
               sink: int | None = None, recent: int | None = None, dtype=None,
               seed: int = 0, progress: bool = True, compensation: bool = False,
               tokenizer=None, weights_dtype: str = "bf16", mesh=None,
               pack: bool = True) -> LoadedModel:
  """ckpt: a checkpoint folder or an embedded name (default `smollm2-135m`).

  attention None picks `duo` when a pattern is given or the checkpoint has a
  default one, else `full`. compensation: serve streaming heads with
  RazorAttention's compensation token (pass `m.compensation` on to `generate`).
  tokenizer: one already loaded from this checkpoint (else it is loaded here).
  weights_dtype: "bf16" (the checkpoint's weights as loaded) or "int8" (weight-only, through
  qwix: duojax/model/quant.py).
  mesh: a jax Mesh (duojax.sharding.make_mesh) to serve on: every tensor is restored
  straight into its inference sharding there (no whole copy on one device first), and int8
  weights are quantised there, shard by shard (engine.handle_on_mesh); pass the same mesh
  to `generate`.
  pack: serve q/k/v and gate/up packed (duojax/model/pack.py: one product each instead of
  three and two, faster at decode), on one device and on a mesh alike; `m.params` still
  gives the unpacked layout (a copy of those weights: pass pack=False where the params
  dict, not the model, is what is used).
  """
  ck = Checkpoint.open(ckpt, progress=progress)  # resolved and validated once
  config = ck.config
  pat = None
  pdir = Path(pattern) if pattern else ck.default_pattern_dir
  if pdir is not None and (pattern or attention in (None, "duo")):
    pat = load_any(pdir)
  if attention is None:
    attention = "duo" if pat is not None else "full"
  mask = make_mask(config, attention, pat, sparsity, threshold, sink, recent, seed)
  if compensation and mask is None:
    raise ValueError("--compensation applies to streaming heads; use it with --attention duo, "
                     "streaming or random")
  # split once here: the jitted steps merge the handle inside their trace
  if mesh is None:
    params = ck.params(dtype=dtype)
    if pack:  # layer by layer, before anything else holds the unpacked weights
      pack_params(params, in_place=True)
    model = model_handle.from_params(config, params, mask, weights_dtype=weights_dtype,
                                     pack=pack)
    del params
  else:
    from duojax import engine
    shardings = engine.param_shardings_for(mesh, config)  # a mesh that cannot fit: before reading
    model = engine.handle_on_mesh(mesh, config, ck.params(dtype=dtype, shardings=shardings),
                                  mask, weights_dtype, pack)
  tok = tokenizer if tokenizer is not None else ck.tokenizer()
  return LoadedModel(config, model, tok, mask, pat, attention, ck.path, compensation)


def parse_dtype(name: str | None):
  return {None: None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
