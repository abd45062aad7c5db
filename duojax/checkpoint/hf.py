"""Hugging Face layout <-> duojax params (safetensors folders and state dicts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from duojax.config import ModelConfig


class CheckpointError(ValueError):
  """A checkpoint that cannot be read; the message names the fix."""


def _layer_names(i: int) -> dict[str, str]:
  p = f"model.layers.{i}."
  return {
      "attn_norm": p + "input_layernorm.weight", "mlp_norm": p + "post_attention_layernorm.weight",
      "wq": p + "self_attn.q_proj.weight", "wk": p + "self_attn.k_proj.weight",
      "wv": p + "self_attn.v_proj.weight", "wo": p + "self_attn.o_proj.weight",
      "bq": p + "self_attn.q_proj.bias", "bk": p + "self_attn.k_proj.bias",
      "bv": p + "self_attn.v_proj.bias", "q_norm": p + "self_attn.q_norm.weight",
      "k_norm": p + "self_attn.k_norm.weight", "w_gate": p + "mlp.gate_proj.weight",
      "w_up": p + "mlp.up_proj.weight", "w_down": p + "mlp.down_proj.weight"}


def convert_layer(get: Callable[[str], np.ndarray], names: dict[str, str], config: ModelConfig,
                  dtype) -> dict:
  """HF [out, in] matrices -> our einsum layouts (see model/llama.py)."""
  e, d = config.hidden_size, config.head_dim
  h, g = config.num_kv_heads, config.group_size
  c = lambda x: np.ascontiguousarray(x).astype(dtype)
  lp = {
      "attn_norm": c(get(names["attn_norm"])), "mlp_norm": c(get(names["mlp_norm"])),
      "wq": c(get(names["wq"]).reshape(h, g, d, e).transpose(3, 0, 1, 2)),
      "wk": c(get(names["wk"]).reshape(h, d, e).transpose(2, 0, 1)),
      "wv": c(get(names["wv"]).reshape(h, d, e).transpose(2, 0, 1)),
      "wo": c(get(names["wo"]).reshape(e, h, g, d).transpose(1, 2, 3, 0)),
      "w_gate": c(get(names["w_gate"]).T), "w_up": c(get(names["w_up"]).T),
      "w_down": c(get(names["w_down"]).T)}
  if config.attention_bias:
    lp["bq"] = c(get(names["bq"]).reshape(h, g, d))
    lp["bk"] = c(get(names["bk"]).reshape(h, d))
    lp["bv"] = c(get(names["bv"]).reshape(h, d))
  if config.qk_norm:  # Qwen3: one [D] RMSNorm weight shared by all heads
    lp["q_norm"], lp["k_norm"] = c(get(names["q_norm"])), c(get(names["k_norm"]))
  return lp


def params_from_hf_state(get: Callable[[str], np.ndarray], config: ModelConfig, dtype=np.float32,
                         progress: Iterable[int] | None = None) -> dict:
  """get(name) -> np.ndarray for HF tensor names. progress: an iterable over layers (tqdm)."""
  layers = [convert_layer(get, _layer_names(i), config, dtype)
            for i in (progress if progress is not None else range(config.num_layers))]
  params = {"embed": np.asarray(get("model.embed_tokens.weight")).astype(dtype),
            "final_norm": np.asarray(get("model.norm.weight")).astype(dtype), "layers": layers}
  if not config.tie_word_embeddings:
    params["lm_head"] = np.ascontiguousarray(np.asarray(get("lm_head.weight")).T).astype(dtype)
  return params


def hf_state_from_params(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
  """The inverse of params_from_hf_state (HF names, float32 numpy)."""
  e, d = config.hidden_size, config.head_dim
  h, g = config.num_kv_heads, config.group_size
  f32 = lambda x: np.asarray(x, np.float32)
  out = {"model.embed_tokens.weight": f32(params["embed"]), "model.norm.weight": f32(params["final_norm"])}
  if "lm_head" in params:
    out["lm_head.weight"] = f32(params["lm_head"]).T
  for i, lp in enumerate(params["layers"]):
    n = _layer_names(i)
    out[n["attn_norm"]], out[n["mlp_norm"]] = f32(lp["attn_norm"]), f32(lp["mlp_norm"])
    out[n["wq"]] = f32(lp["wq"]).transpose(1, 2, 3, 0).reshape(h * g * d, e)
    out[n["wk"]] = f32(lp["wk"]).transpose(1, 2, 0).reshape(h * d, e)
    out[n["wv"]] = f32(lp["wv"]).transpose(1, 2, 0).reshape(h * d, e)
    out[n["wo"]] = f32(lp["wo"]).transpose(3, 0, 1, 2).reshape(e, h * g * d)
    out[n["w_gate"]], out[n["w_up"]] = f32(lp["w_gate"]).T, f32(lp["w_up"]).T
    out[n["w_down"]] = f32(lp["w_down"]).T
    if "bq" in lp:
      out[n["bq"]], out[n["bk"]], out[n["bv"]] = (f32(lp[b]).reshape(-1) for b in ("bq", "bk", "bv"))
    if "q_norm" in lp:
      out[n["q_norm"]], out[n["k_norm"]] = f32(lp["q_norm"]), f32(lp["k_norm"])
  return out


def read_json_object(path: Path, fix: str = "download or write it again") -> dict:
  """A JSON object from a file; anything else is a CheckpointError naming the file and `fix`."""
  try:
    d = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({type(e).__name__}: {e}); {fix}") from e
  if not isinstance(d, dict):
    raise CheckpointError(f"{path} does not hold a JSON object; {fix}")
  return d


def read_hf_folder(folder: str | Path, dtype=np.float32, progress=None):
  """An HF folder (config.json + one or many *.safetensors) -> (config, params)."""
  from safetensors import safe_open
  folder = Path(folder)
  cfg_path = folder / "config.json"
  if not cfg_path.is_file():
    raise CheckpointError(f"{folder} has no config.json; pass the folder of an HF model "
                          "(config.json + *.safetensors)")
  hf = read_json_object(cfg_path)
  config = ModelConfig.from_hf(hf, name=folder.name)
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    raise CheckpointError(f"{folder} has no *.safetensors files; only safetensors weights are read "
                          "(convert .bin files with transformers' save_pretrained first)")
  index = {}
  idx_path = folder / "model.safetensors.index.json"
  if idx_path.is_file():
    for name, shard in read_json_object(idx_path).get("weight_map", {}).items():
      index[name] = folder / shard
  handles = {}
  for f in files:
    try:
      handles[f] = safe_open(str(f), framework="flax")
    except Exception as e:  # SafetensorError: truncated or not safetensors
      raise CheckpointError(f"{f} is not a readable safetensors file ({e}); the download may be "
                            "incomplete: download it again") from e
    for name in handles[f].keys():
      index.setdefault(name, f)
  if config.tie_word_embeddings is False and "lm_head.weight" not in index:
    config = ModelConfig.from_dict({**config.to_dict(), "tie_word_embeddings": True})

  def get(name):
    if name not in index:
      raise CheckpointError(f"tensor {name} is missing from {folder}; the download may be incomplete")
    try:
      return handles[index[name]].get_tensor(name)
    except Exception as e:  # data cut short after a valid header
      raise CheckpointError(f"{index[name]}: tensor {name} cannot be read ({e}); the file may be "
                            "truncated: download it again") from e

  it = progress(range(config.num_layers)) if progress else None
  return config, params_from_hf_state(get, config, dtype, it)
