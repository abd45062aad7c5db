"""`python -m duojax.convert --gguf FILE --out DIR` or `--hf DIR --out DIR`."""

from __future__ import annotations

import argparse
import sys

from duojax.checkpoint.conversion import DTYPES, convert_gguf, convert_hf, gguf_model_name
from duojax.checkpoint.hf import CheckpointError
from duojax.config import ConfigError

__all__ = ["main", "convert_gguf", "convert_hf", "gguf_model_name"]


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
