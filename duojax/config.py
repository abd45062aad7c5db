"""Frozen, hashable configs: the model's shape and the attention settings.

Both go through `jax.jit` as static arguments, so they are frozen dataclasses
holding only ints, floats, strings, bools and tuples.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                              "Qwen3ForCausalLM")
_HF_CLASS = dict(zip(SUPPORTED_ARCHITECTURES, SUPPORTED_HF_ARCHITECTURES))
# GGUF architectures duojax reads. llama.cpp's converter permutes q/k rows only for
# its LLaMA-style (adjacent-pair) RoPE archs; qwen2/qwen3 use NEOX-style (rotate-half)
# RoPE, so their rows are stored in HF order (see checkpoint/gguf_file.py).
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


class ConfigError(ValueError):
  """A config that duojax cannot serve; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1 style ("llama3") frequency scaling; `kind="default"` is none."""

  kind: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of a Llama-family decoder (Llama 2/3/3.1, Mistral, SmolLM2, Qwen2/2.5, Qwen3).

  attention_bias: q/k/v projections carry biases (Qwen2). qk_norm: per-head RMSNorm
  over head_dim on q and k before RoPE (Qwen3).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  qk_norm: bool = False
  bos_token_id: int | None = 1
  eos_token_ids: tuple[int, ...] = (2,)
  architecture: str = "llama"
  name: str = "llama"

  def __post_init__(self):
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ConfigError(
          f"architecture {self.architecture!r} is not supported; duojax serves "
          f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family decoders)")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.rope_scaling.kind not in ("default", "llama3"):
      raise ConfigError(
          f"rope scaling {self.rope_scaling.kind!r} is not supported; use 'default' or 'llama3'")

  @property
  def group_size(self) -> int:
    """G: query heads per KV head."""
    return self.num_heads // self.num_kv_heads

  # -- (de)serialisation --------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["eos_token_ids"] = list(self.eos_token_ids)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    d["rope_scaling"] = RopeScaling(**(d.get("rope_scaling") or {}))
    d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})

  @classmethod
  def from_hf(cls, hf: dict[str, Any], name: str | None = None) -> "ModelConfig":
    """Reads a Hugging Face `config.json` dict."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type", "")
    if model_type not in SUPPORTED_ARCHITECTURES and not set(archs) & set(SUPPORTED_HF_ARCHITECTURES):
      raise ConfigError(
          f"model_type {model_type!r} / architectures {archs} are not supported; duojax "
          f"serves {', '.join(SUPPORTED_HF_ARCHITECTURES)}")
    n_heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    # transformers 5 moved rope settings into `rope_parameters`.
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type == "llama3":
      scaling = RopeScaling(
          kind="llama3", factor=float(rope["factor"]),
          low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
          high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
          original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)))
    elif rope_type == "default":
      scaling = RopeScaling()
    else:
      raise ConfigError(f"rope scaling type {rope_type!r} is not supported; use 'default' or 'llama3'")
    eos = hf.get("eos_token_id", 2)
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    arch = model_type if model_type in SUPPORTED_ARCHITECTURES else "llama"
    for a, cls_name in _HF_CLASS.items():
      if model_type not in SUPPORTED_ARCHITECTURES and cls_name in archs:
        arch = a
    if hf.get("use_sliding_window") or (arch == "mistral" and hf.get("sliding_window")
                                        and hf["sliding_window"] < hf.get(
                                            "max_position_embeddings", 0)):
      raise ConfigError(
          f"this {arch} config uses sliding-window attention (sliding_window="
          f"{hf.get('sliding_window')}), which duojax does not serve; use a full-attention "
          "checkpoint or set use_sliding_window=false / sliding_window=null in config.json")
    # Qwen2's projections always carry q/k/v biases (its config has no switch for it).
    bias = arch == "qwen2"
    if arch != "qwen2" and hf.get("attention_bias"):
      # HF's Llama/Mistral/Qwen3 attention_bias also adds an o_proj bias, which
      # duojax's decoder does not carry: refuse rather than drop it silently.
      raise ConfigError(
          f"{arch} with attention_bias=true (q/k/v and o_proj biases) is not supported; "
          "duojax carries q/k/v biases only in the qwen2 architecture")
    return cls(
        vocab_size=hf["vocab_size"], hidden_size=hidden,
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=n_heads, num_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hidden // n_heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=float(theta),
        rope_scaling=scaling, max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bias, qk_norm=arch == "qwen3",
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos, architecture=arch,
        name=name or hf.get("_name_or_path") or model_type)

  def to_hf(self) -> dict[str, Any]:
    """A transformers `config.json` dict for the same shape (for parity tests)."""
    arch = self.architecture
    hf = {
        "architectures": [_HF_CLASS[arch]], "model_type": arch,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
        "bos_token_id": self.bos_token_id, "eos_token_id": list(self.eos_token_ids),
        "hidden_act": "silu", "mlp_bias": False,
    }
    if arch == "qwen2":
      if not self.attention_bias:
        raise ConfigError("a qwen2 config always has q/k/v biases (attention_bias=True)")
      del hf["attention_bias"], hf["mlp_bias"], hf["head_dim"]
      if self.head_dim * self.num_heads != self.hidden_size:
        raise ConfigError("HF Qwen2 needs head_dim * num_heads == hidden_size")
      hf["use_sliding_window"] = False
    elif arch == "qwen3":
      del hf["mlp_bias"]
      hf["use_sliding_window"] = False
    elif arch == "mistral":
      del hf["attention_bias"], hf["mlp_bias"]
      hf["sliding_window"] = None  # duojax serves full attention
    if arch != "qwen2" and self.attention_bias:
      raise ConfigError(f"HF {arch} has no q/k/v-only biases; use architecture='qwen2'")
    if arch != "qwen3" and self.qk_norm:
      raise ConfigError(f"qk_norm has no HF {arch} equivalent; use architecture='qwen3'")
    if self.rope_scaling.kind == "llama3":
      rs = self.rope_scaling
      hf["rope_scaling"] = {
          "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
          "high_freq_factor": rs.high_freq_factor,
          "original_max_position_embeddings": rs.original_max_position_embeddings}
    return hf

  @classmethod
  def from_gguf_fields(cls, fields: dict[str, Any], name: str | None = None) -> "ModelConfig":
    """Reads GGUF metadata already decoded to Python values (see checkpoint.gguf_file).

    `_tied`, `_bias` and `_qk_norm` are set by the reader from which tensors exist.
    """
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
      raise ConfigError(
          f"GGUF architecture {arch!r} is not supported; duojax reads "
          f"{', '.join(repr(a) for a in GGUF_ARCHITECTURES)} GGUF files "
          "(Llama 2/3, Mistral, SmolLM2, Qwen2/2.5, Qwen3)")
    p = arch + "."
    n_heads = int(fields[p + "attention.head_count"])
    hidden = int(fields[p + "embedding_length"])
    head_dim = int(fields.get(p + "attention.key_length") or fields.get(p + "rope.dimension_count")
                   or hidden // n_heads)
    scaling = RopeScaling()
    if fields.get(p + "rope.scaling.type") not in (None, "none"):
      raise ConfigError(
          f"GGUF rope scaling {fields.get(p + 'rope.scaling.type')!r} is not supported; "
          "convert from the HF folder instead (--hf)")
    if fields.get(p + "attention.sliding_window"):
      raise ConfigError("this GGUF uses sliding-window attention, which duojax does not serve; "
                        "convert a full-attention model")
    eos = fields.get("tokenizer.ggml.eos_token_id", 2)
    # Qwen GGUFs name <|endoftext|> as BOS but Qwen never prepends it (no add_bos_token).
    bos = fields.get("tokenizer.ggml.bos_token_id")
    if fields.get("tokenizer.ggml.add_bos_token") is False:
      bos = None
    return cls(
        vocab_size=int(fields.get(p + "vocab_size") or fields.get("_vocab_size")
                       or len(fields["tokenizer.ggml.tokens"])),
        hidden_size=hidden, intermediate_size=int(fields[p + "feed_forward_length"]),
        num_layers=int(fields[p + "block_count"]), num_heads=n_heads,
        num_kv_heads=int(fields.get(p + "attention.head_count_kv") or n_heads),
        head_dim=head_dim,
        rms_norm_eps=float(fields.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(fields.get(p + "rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(fields.get(p + "context_length", 4096)),
        tie_word_embeddings=bool(fields.get("_tied", False)),
        attention_bias=bool(fields.get("_bias", False)), qk_norm=bool(fields.get("_qk_norm", False)),
        bos_token_id=bos, eos_token_ids=(int(eos),),
        architecture="llama" if arch == "mistral" else arch,
        name=name or fields.get("general.name", arch))

  def param_count(self) -> int:
    e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
    attn = e * d * (self.num_heads * 2 + self.num_kv_heads * 2)
    attn += d * (self.num_heads + 2 * self.num_kv_heads) if self.attention_bias else 0
    attn += 2 * d if self.qk_norm else 0
    layer = attn + 3 * e * f + 2 * e
    head = 0 if self.tie_word_embeddings else self.vocab_size * e
    return self.num_layers * layer + self.vocab_size * e + head + e


@dataclasses.dataclass(frozen=True)
class StreamingDefaults:
  """A streaming head's attention-sink tokens and recent window."""

  sink: int
  recent: int


# The one source of the streaming defaults: DuoAttention serves with sink 64 / recent 256
# and trains its gates with sink 128 / recent 256 (the official recipe).
DEPLOY = StreamingDefaults(sink=64, recent=256)
TRAIN = StreamingDefaults(sink=128, recent=256)


@dataclasses.dataclass(frozen=True)
class DuoSettings:
  """How streaming heads are served: sink tokens, recent window, prefill chunk."""

  sink: int = DEPLOY.sink
  recent: int = DEPLOY.recent
  prefill_chunk: int = 4096

  def __post_init__(self):
    if self.sink < 0 or self.recent < 0 or self.sink + self.recent < 1:
      raise ConfigError(
          f"sink={self.sink}, recent={self.recent}: both must be >= 0 and sink + recent >= 1")
    if self.prefill_chunk < 1:
      raise ConfigError(f"--prefill-chunk must be >= 1, got {self.prefill_chunk}")


# Shapes used by speed/memory benchmarks (random weights; never downloaded).
LLAMA3_8B = ModelConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=1048576, name="llama-3-8b-shape")
LLAMA2_7B = ModelConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
    num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=1048576, name="llama-2-7b-shape")


def tiny_config(**overrides) -> ModelConfig:
  """A small random-weight config for tests."""
  base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=6,
              num_kv_heads=2, head_dim=8, rope_theta=10000.0, max_position_embeddings=2048,
              eos_token_ids=(2,), name="tiny")
  base.update(overrides)
  return ModelConfig(**base)


def ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  return ceil_div(a, b) * b

