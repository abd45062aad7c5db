"""`python -m duojax.convert --gguf FILE --out DIR` or `--hf DIR --out DIR`."""

from __future__ import annotations

import argparse
import shutil
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


def _install_pattern(out: Path, src: Path | None) -> str | None:
  if src is None:
    return None
  name = src.name
  shutil.copytree(src, store.pattern_dir(out, name))
  return name


def convert_gguf(path, out, dtype: str = "float32", progress: bool = True,
                 default_pattern_src: Path | None = None) -> Path:
  from transformers import AutoTokenizer
  from duojax.checkpoint.gguf_file import read_gguf
  path = Path(path)
  config, params, _ = read_gguf(path, _np_dtype(dtype), _progress("dequantising", progress))
  tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  out = store.save_checkpoint(out, config, params, tok, source=f"gguf:{path.name}")
  name = _install_pattern(out, default_pattern_src)
  if name:
    store.set_default_pattern(out, name)
  return out


def convert_hf(folder, out, dtype: str = "float32", progress: bool = True) -> Path:
  from transformers import AutoTokenizer
  config, params = read_hf_folder(folder, _np_dtype(dtype), _progress("converting", progress))
  try:
    tok = AutoTokenizer.from_pretrained(str(folder))
  except Exception:
    tok = None  # weights-only folders still convert; generation then needs token ids
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
