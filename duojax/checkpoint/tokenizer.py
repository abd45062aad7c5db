"""A GGUF file's tokenizer as an HF fast tokenizer, without PyTorch.

transformers can build a tokenizer from a GGUF (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`), but its GGUF reader imports torch. The metadata is read here with
the `gguf` package instead and handed to transformers' own GGUF-to-`tokenizers`
converter (pure `tokenizers`), so the result is the same tokenizer; it is then
saved in HF format beside the converted weights. Works for the llama
(sentencepiece) and gpt2 (byte-level BPE) tokenizer models that converter knows,
whatever the architecture (llama, qwen2, ...).
"""

from __future__ import annotations

from pathlib import Path

from duojax.checkpoint.hf import CheckpointError

# GGUF key -> HF name, split into the backend's inputs and the tokenizer's settings
# (the same table as transformers' GGUF_TOKENIZER_MAPPING, used if it is importable).
_MAPPING = {
    "tokenizer": {
        "ggml.model": "tokenizer_type", "ggml.pre": "pre_tokenizer_type", "ggml.tokens": "tokens",
        "ggml.scores": "scores", "ggml.token_type": "token_type", "ggml.merges": "merges",
        "ggml.precompiled_charsmap": "precompiled_charsmap", "ggml.bos_token_id": "bos_token_id",
        "ggml.eos_token_id": "eos_token_id", "ggml.unknown_token_id": "unk_token_id",
        "ggml.padding_token_id": "pad_token_id", "ggml.add_space_prefix": "add_prefix_space"},
    "tokenizer_config": {
        "chat_template": "chat_template", "ggml.add_bos_token": "add_bos_token",
        "ggml.add_eos_token": "add_eos_token"},
}
_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
            "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _converter():
  """(mapping, convert_gguf_tokenizer) from whichever transformers layout is installed."""
  try:  # transformers >= 5.2x
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
    return GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
  except ImportError:
    pass
  try:  # older releases (4.4x - 5.1x): the same function in integrations/ggml.py, no torch;
    # their key table lacks add_bos_token / pre, so ours (a superset) is used with it
    from transformers.integrations.ggml import convert_gguf_tokenizer
    return _MAPPING, convert_gguf_tokenizer
  except ImportError as e:
    raise CheckpointError(f"this transformers release has no GGUF tokenizer converter ({e}); "
                          "upgrade it: pip install -U transformers") from e


def read_tokenizer_metadata(path: str | Path) -> tuple[str, dict]:
  """The architecture and every `tokenizer.*` key of a GGUF (values as Python objects)."""
  import gguf
  path = Path(path)
  try:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()
              if k.startswith("tokenizer.") or k == "general.architecture"}
  except Exception as e:
    raise CheckpointError(f"{path} is not a readable GGUF file ({e}); re-download it") from e
  if "tokenizer.ggml.tokens" not in fields:
    raise CheckpointError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens); convert it with "
                          "a tokenizer folder instead (python -m duojax.convert --hf DIR)")
  return str(fields.get("general.architecture", "llama")), fields


def gguf_tokenizer(path: str | Path):
  """A GGUF's tokenizer as a transformers fast tokenizer (no torch)."""
  from transformers import PreTrainedTokenizerFast
  arch, meta = read_tokenizer_metadata(path)
  mapping, convert = _converter()
  groups = {g: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                if f"tokenizer.{key}" in meta} for g, renames in mapping.items()}
  tok_dict, tok_config = groups["tokenizer"], groups["tokenizer_config"]
  if tok_dict.get("tokenizer_type") == "llama":  # llama.cpp's default for sentencepiece vocabs
    tok_config.setdefault("add_bos_token", True)
  tokens = tok_dict["tokens"]
  for name, key in _SPECIAL.items():
    i = meta.get(f"tokenizer.ggml.{key}")
    if i is not None and 0 <= int(i) < len(tokens):
      tok_config[name] = tokens[int(i)]
  try:
    backend, extra = convert(arch, tok_dict)
  except (ValueError, KeyError, NotImplementedError) as e:
    raise CheckpointError(f"{Path(path).name}: transformers cannot build its tokenizer ({e}); "
                          "convert the model's HF folder instead (python -m duojax.convert --hf "
                          "DIR --out OUT)") from e
  # The special tokens read from the file win over the converter's extras: transformers
  # 5.17's GPT2 converter swaps in bos for eos (SmolLM2 would stop at <|im_start|>).
  return PreTrainedTokenizerFast(tokenizer_object=backend, **{**(extra or {}), **tok_config})


def save_gguf_tokenizer(path: str | Path, out: str | Path) -> None:
  """Writes the GGUF's tokenizer into `out` in HF format (tokenizer.json, ...)."""
  gguf_tokenizer(path).save_pretrained(str(out))
