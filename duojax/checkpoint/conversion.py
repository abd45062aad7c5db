"""GGUF files and HF safetensors folders -> duojax checkpoint folders (store.py's layout).

`python -m duojax.convert` is the command line over these; embedded.py converts the
embedded models with convert_gguf on first use.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import numpy as np

from duojax.checkpoint import store
from duojax.checkpoint.hf import CheckpointError, read_hf_folder

DTYPES = ("float32", "bfloat16")


def np_dtype(name: str):
  if name not in DTYPES:
    raise CheckpointError(f"dtype {name!r} is not one of {', '.join(DTYPES)}; pick one of those")
  if name == "bfloat16":
    import ml_dtypes
    return ml_dtypes.bfloat16
  return np.float32


def _progress(desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return lambda it: tqdm(it, desc=desc, unit="layer", file=sys.stderr)


_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|F16|F32|BF16|FP16|FP32)$", re.IGNORECASE)


def gguf_model_name(path: Path, fields: dict) -> str:
  """A readable model name: the file's stem without its quantisation suffix
  ("SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"), else general.name."""
  stem = _QUANT_SUFFIX.sub("", path.stem)
  return stem or str(fields.get("general.name") or "model")


def convert_gguf(path, out, dtype: str = "float32", progress: bool = True,
                 default_pattern_src: Path | None = None,
                 extra_patterns: dict[str, Path] | None = None,
                 default_pattern: str | None = None) -> Path:
  """A GGUF file -> a checkpoint at `out` (published whole; see store.save_checkpoint).

  default_pattern_src: a pattern folder copied in under its own name and made the default.
  extra_patterns: NAME -> folder, copied in as well; default_pattern: which one (of all the
  copied ones) is the default instead.
  """
  from duojax.checkpoint.gguf_file import read_gguf
  from duojax.checkpoint.tokenizer import gguf_tokenizer
  path = Path(path).absolute()
  out = store.check_out(out)  # before the minutes of work, not after
  config, params, fields = read_gguf(path, np_dtype(dtype), _progress("dequantising", progress))
  config = dataclasses.replace(config, name=gguf_model_name(path, fields))
  tok = gguf_tokenizer(path)
  pats = dict(extra_patterns or {})
  if default_pattern_src:
    pats[default_pattern_src.name] = default_pattern_src
  default = default_pattern if default_pattern in pats else (
      default_pattern_src.name if default_pattern_src else None)
  return store.save_checkpoint(out, config, params, tok, source=f"gguf:{path.name}",
                               default_pattern=default, patterns=pats or None,
                               source_path=str(path))


def convert_hf(folder, out, dtype: str = "float32", progress: bool = True) -> Path:
  """An HF folder (config.json + *.safetensors, tokenizer optional) -> a checkpoint at `out`."""
  folder = Path(folder).absolute()
  out = store.check_out(out)
  config, params = read_hf_folder(folder, np_dtype(dtype), _progress("converting", progress))
  tok = None
  if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                          "tokenizer_config.json", "vocab.json")):
    from transformers import AutoTokenizer
    try:
      tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
      raise CheckpointError(f"{folder}: the tokenizer files cannot be read ({type(e).__name__}: "
                            f"{e}); fix or remove them (weights-only folders convert without)") from e
  return store.save_checkpoint(out, config, params, tok, source=f"hf:{folder.name}",
                               source_path=str(folder))
