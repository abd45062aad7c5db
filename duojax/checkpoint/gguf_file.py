"""GGUF (llama.cpp) files -> duojax params, dequantised with the `gguf` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from duojax.checkpoint.hf import CheckpointError, convert_layer
from duojax.config import ModelConfig

_LAYER = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "wq": "attn_q", "wk": "attn_k",
          "wv": "attn_v", "wo": "attn_output", "w_gate": "ffn_gate", "w_up": "ffn_up",
          "w_down": "ffn_down", "bq": "attn_q", "bk": "attn_k", "bv": "attn_v",
          "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
# llama.cpp's converter (LlamaModel.modify_tensors) interleaves q/k rows for GGML's
# adjacent-pair RoPE only in these archs; qwen2/qwen3 run NEOX (rotate-half) RoPE
# and keep HF's row order. Checked by parity against HF on the real Qwen2.5 GGUF.
PERMUTED_ROPE_ARCHS = ("llama", "mistral")


def _field(f):
  try:
    return f.contents()
  except Exception:  # older gguf releases lack contents(); arrays are not needed here
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation.

  Its converter interleaves each head's two rotary halves (for GGML's
  adjacent-pair RoPE); HF and duojax rotate halves, so put them back.
  w [n_heads * D, ...] -> same shape.
  """
  d = w.shape[0] // n_heads
  return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_quant_types(gguf, types, path: Path) -> None:
  """Fails before any work if a tensor type cannot be dequantised here."""
  for qt in sorted(types, key=lambda q: q.value):
    block, nbytes = gguf.GGML_QUANT_SIZES[qt]
    try:
      gguf.quants.dequantize(np.zeros((1, nbytes), np.uint8), qt)
    except NotImplementedError:
      raise CheckpointError(
          f"{path.name} uses quantisation {qt.name}, which the gguf package cannot dequantise; "
          "upgrade it (pip install -U gguf) or use an F16/BF16/Q8_0/Q4_K file") from None


def read_gguf(path: str | Path, dtype=np.float32, progress=None):
  """A llama / mistral / qwen2 / qwen3 GGUF -> (config, params, fields)."""
  import gguf
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"no GGUF file at {path}")
  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:  # truncated or not a GGUF at all
    raise CheckpointError(f"{path} is not a readable GGUF file ({e}); re-download it") from e
  fields = {k: _field(f) for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.") or k.endswith("_id")
            or k == "tokenizer.ggml.add_bos_token"}
  tensors = {t.name: t for t in reader.tensors}
  fields["_tied"] = "output.weight" not in tensors
  fields["_bias"] = "blk.0.attn_q.bias" in tensors
  fields["_qk_norm"] = "blk.0.attn_q_norm.weight" in tensors
  if "token_embd.weight" in tensors:  # GGUF shapes are [in, out]: [E, V]
    fields["_vocab_size"] = int(tensors["token_embd.weight"].shape[-1])
  config = ModelConfig.from_gguf_fields(fields, name=fields.get("general.name"))
  permuted = fields.get("general.architecture") in PERMUTED_ROPE_ARCHS
  _check_quant_types(gguf, {t.tensor_type for t in reader.tensors}, path)

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise CheckpointError(f"tensor {name} is missing from {path}")
    t = tensors[name]
    try:
      return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    except NotImplementedError as e:
      raise CheckpointError(
          f"{path.name}: tensor {name} uses quantisation {t.tensor_type.name}, which this gguf "
          f"package cannot dequantise; upgrade it (pip install -U gguf) or convert a "
          f"F16/Q8_0/Q4_K file instead") from e

  def get_layer(i):
    def g(key):
      suffix = "bias" if key in ("bq", "bk", "bv") else "weight"
      w = get(f"blk.{i}.{_LAYER[key]}.{suffix}")
      if not permuted:
        return w
      if key in ("wq", "bq"):
        w = unpermute_rope_rows(w, config.num_heads)
      elif key in ("wk", "bk"):
        w = unpermute_rope_rows(w, config.num_kv_heads)
      return w
    return g

  layers = range(config.num_layers)
  layers = progress(layers) if progress else layers
  params = {"layers": [convert_layer(get_layer(i), {k: k for k in _LAYER}, config, dtype)
                       for i in layers],
            "embed": get("token_embd.weight").astype(dtype),
            "final_norm": get("output_norm.weight").astype(dtype)}
  if not config.tie_word_embeddings:
    params["lm_head"] = np.ascontiguousarray(get("output.weight").T).astype(dtype)
  return config, params, fields
