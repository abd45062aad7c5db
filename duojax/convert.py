"""`python -m duojax.convert --gguf FILE --out DIR` or `--hf DIR --out DIR`."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import numpy as np

from duojax.checkpoint import store
from duojax.checkpoint.hf import CheckpointError, read_hf_folder
from duojax.config import ConfigError

DTYPES = ("float32", "bfloat16")


def _np_dtype(name: str):
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
                 default_pattern_src: Path | None = None) -> Path:
  """A GGUF file -> a checkpoint at `out` (published whole; see store.save_checkpoint)."""
  from duojax.checkpoint.gguf_file import read_gguf
  from duojax.checkpoint.tokenizer import gguf_tokenizer
  path = Path(path)
  out = store.check_out(out)  # before the minutes of work, not after
  config, params, fields = read_gguf(path, _np_dtype(dtype), _progress("dequantising", progress))
  config = dataclasses.replace(config, name=gguf_model_name(path, fields))
  tok = gguf_tokenizer(path)
  pats = {default_pattern_src.name: default_pattern_src} if default_pattern_src else None
  return store.save_checkpoint(out, config, params, tok, source=f"gguf:{path.name}",
                               default_pattern=default_pattern_src.name if pats else None,
                               patterns=pats)


def convert_hf(folder, out, dtype: str = "float32", progress: bool = True) -> Path:
  out = store.check_out(out)
  config, params = read_hf_folder(folder, _np_dtype(dtype), _progress("converting", progress))
  tok = None
  if any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                 "tokenizer_config.json", "vocab.json")):
    from transformers import AutoTokenizer
    try:
      tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
      raise CheckpointError(f"{folder}: the tokenizer files cannot be read ({type(e).__name__}: "
                            f"{e}); fix or remove them (weights-only folders convert without)") from e
  return store.save_checkpoint(out, config, params, tok, source=f"hf:{Path(folder).name}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m duojax.convert", description=__doc__)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--gguf", help="a llama-architecture .gguf file")
  src.add_argument("--hf", help="an HF folder: config.json + *.safetensors (+ tokenizer)")
  ap.add_argument("--out", required=True, help="the duojax checkpoint folder to write")
  ap.add_argument("--dtype", choices=DTYPES, default="float32")
  ap.add_argument("--no-progress", action="store_true")
  a = ap.parse_args(argv)
  try:
    if a.gguf:
      out = convert_gguf(a.gguf, a.out, a.dtype, not a.no_progress)
    else:
      out = convert_hf(a.hf, a.out, a.dtype, not a.no_progress)
  except (CheckpointError, ConfigError) as e:
    print(f"duojax.convert: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
