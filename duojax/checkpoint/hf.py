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
  # One copy at most (the transpose and the cast in one pass; none when neither is needed):
  # a real-size conversion holds the whole output, so transient copies are what tips it over.
  c = lambda x: np.ascontiguousarray(x, dtype=dtype)
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
  params = {"embed": np.ascontiguousarray(get("model.embed_tokens.weight"), dtype=dtype),
            "final_norm": np.ascontiguousarray(get("model.norm.weight"), dtype=dtype),
            "layers": layers}
  if not config.tie_word_embeddings:
    params["lm_head"] = np.ascontiguousarray(get("lm_head.weight").T, dtype=dtype)
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


def _safetensors_dtypes() -> dict:
  import ml_dtypes
  return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}


class SafetensorsFile:
  """One .safetensors file read straight into host numpy arrays, a tensor at a time.

  Not safetensors' safe_open: its flax framework routes every tensor through the device,
  and its numpy framework refuses BF16 (numpy has no bfloat16), the dtype of almost every
  real checkpoint. The format is an 8-byte little-endian header length, a JSON header
  {name: {dtype, shape, data_offsets: [begin, end]}} and the raw little-endian bytes, so
  each tensor is one read of exactly its bytes into its own buffer: host memory holds only
  the tensors being converted, never a whole shard.
  """

  def __init__(self, path: str | Path):
    self.path = Path(path)
    bad = (f"{self.path} is not a readable safetensors file ({{}}); the download may be "
           "incomplete: download it again")
    try:
      size = self.path.stat().st_size
      with open(self.path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
          raise CheckpointError(bad.format("no valid header"))
        header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
      raise CheckpointError(bad.format(e.strerror or e)) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(bad.format(f"header is not JSON: {e}")) from e
    if not isinstance(header, dict):
      raise CheckpointError(bad.format("header is not a JSON object"))
    header.pop("__metadata__", None)
    self._start, self._tensors = 8 + n, {}
    known = _safetensors_dtypes()
    for name, t in header.items():
      try:
        begin, end = (int(x) for x in t["data_offsets"])
        shape, dt = tuple(int(x) for x in t["shape"]), t["dtype"]
      except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(bad.format(f"entry {name} is malformed")) from e
      if dt not in known:
        raise CheckpointError(f"{self.path}: tensor {name} has dtype {dt}, which duojax does not "
                              "read; save the model in float32, float16 or bfloat16")
      want = int(np.prod(shape, dtype=np.int64)) * np.dtype(known[dt]).itemsize
      if end - begin != want or begin < 0:
        raise CheckpointError(bad.format(f"tensor {name}'s offsets do not fit its shape"))
      if self._start + end > size:
        raise CheckpointError(f"{self.path} is truncated: tensor {name} ends past the end of "
                              "the file; the download may be incomplete: download it again")
      self._tensors[name] = (known[dt], shape, begin)

  def keys(self):
    return self._tensors.keys()

  def get_tensor(self, name: str) -> np.ndarray:
    """The tensor as a fresh writable host array of its stored dtype and shape."""
    dt, shape, begin = self._tensors[name]
    count = int(np.prod(shape, dtype=np.int64))
    try:
      x = np.fromfile(self.path, dtype=dt, count=count, offset=self._start + begin)
    except OSError as e:
      raise CheckpointError(f"{self.path}: tensor {name} cannot be read ({e.strerror or e}); "
                            "download it again") from e
    if x.size != count:
      raise CheckpointError(f"{self.path}: tensor {name} is cut short; the file may be "
                            "truncated: download it again")
    return x.reshape(shape)


def read_hf_folder(folder: str | Path, dtype=np.float32, progress=None):
  """An HF folder (config.json + one or many *.safetensors) -> (config, params).

  Tensors are read one at a time into host numpy (SafetensorsFile), so the peak host
  memory is the output params plus about one tensor in flight.
  """
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
    handles[f] = SafetensorsFile(f)
    for name in handles[f].keys():
      index.setdefault(name, f)
  if config.tie_word_embeddings is False and "lm_head.weight" not in index:
    config = ModelConfig.from_dict({**config.to_dict(), "tie_word_embeddings": True})

  def get(name):
    if name not in index:
      raise CheckpointError(f"tensor {name} is missing from {folder}; the download may be incomplete")
    if index[name] not in handles or name not in handles[index[name]].keys():
      raise CheckpointError(f"{idx_path.name} puts {name} in {index[name].name}, which lacks it; "
                            "the download may be incomplete: download it again")
    return handles[index[name]].get_tensor(name)

  it = progress(range(config.num_layers)) if progress else None
  return config, params_from_hf_state(get, config, dtype, it)
