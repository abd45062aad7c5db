"""The duojax checkpoint folder: params (orbax), config, tokenizer, head patterns.

  DIR/params/          orbax PyTree checkpoint of the params dict
  DIR/model.json       ModelConfig
  DIR/tokenizer.json … the tokenizer files (transformers' save_pretrained)
  DIR/patterns/NAME/   head patterns (duojax.pattern format)
  DIR/duojax.json      written last: dtype, default pattern, source. Its absence
                       marks a half-written folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from duojax.checkpoint.hf import CheckpointError
from duojax.config import ModelConfig

MARKER = "duojax.json"
FORMAT_VERSION = 1


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer()


def save_checkpoint(out: str | Path, config: ModelConfig, params: dict, tokenizer=None,
                    source: str = "", default_pattern: str | None = None) -> Path:
  out = Path(out).absolute()
  if (out / MARKER).exists() or (out / "params").exists():
    raise CheckpointError(f"{out} already holds a checkpoint; remove it or pick another --out")
  out.mkdir(parents=True, exist_ok=True)
  dtype = str(np.asarray(jax.tree_util.tree_leaves(params)[0]).dtype)
  _checkpointer().save(out / "params", jax.tree_util.tree_map(np.asarray, params))
  (out / "model.json").write_text(config.to_json())
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out))
  write_marker(out, {"format_version": FORMAT_VERSION, "dtype": dtype, "source": source,
                     "default_pattern": default_pattern})
  return out


def write_marker(out: Path, meta: dict) -> None:
  tmp = out / (MARKER + ".tmp")
  tmp.write_text(json.dumps(meta, indent=2))
  tmp.replace(out / MARKER)


def read_marker(folder: str | Path) -> dict:
  folder = Path(folder)
  if not folder.is_dir():
    raise CheckpointError(f"no checkpoint folder at {folder}; make one with "
                          "`python -m duojax.convert --gguf FILE --out DIR` (or --hf DIR)")
  if not (folder / MARKER).is_file():
    raise CheckpointError(f"{folder} is not a complete duojax checkpoint ({MARKER} missing: the "
                          "conversion was interrupted); delete it and run duojax.convert again")
  return json.loads((folder / MARKER).read_text())


def load_config(folder: str | Path) -> ModelConfig:
  read_marker(folder)
  return ModelConfig.from_dict(json.loads((Path(folder) / "model.json").read_text()))


def load_params(folder: str | Path, dtype=None) -> dict:
  """Params as device arrays; dtype (e.g. jnp.bfloat16) casts on load."""
  folder = Path(folder).absolute()
  read_marker(folder)
  if not (folder / "params").is_dir():
    raise CheckpointError(f"{folder}/params is missing; delete the folder and convert again")
  try:
    tree = _checkpointer().restore(folder / "params")
  except Exception as e:
    raise CheckpointError(f"{folder}/params cannot be read ({type(e).__name__}: {e}); delete the "
                          "folder and convert again") from e
  # orbax restores lists as lists or as {'0': ..} dicts depending on version.
  layers = tree["layers"]
  if isinstance(layers, dict):
    layers = [layers[str(i)] for i in range(len(layers))]
  tree = {**tree, "layers": list(layers)}
  cast = (lambda x: jnp.asarray(x, dtype)) if dtype is not None else jnp.asarray
  return jax.tree_util.tree_map(cast, tree)


def load_tokenizer(folder: str | Path):
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(str(folder))
  except Exception as e:
    raise CheckpointError(f"{folder} has no readable tokenizer ({e}); convert again") from e


def set_default_pattern(folder: str | Path, name: str | None) -> None:
  folder = Path(folder)
  meta = read_marker(folder)
  meta["default_pattern"] = name
  write_marker(folder, meta)


def pattern_dir(folder: str | Path, name: str) -> Path:
  return Path(folder) / "patterns" / name


def default_pattern_dir(folder: str | Path) -> Path | None:
  name = read_marker(folder).get("default_pattern")
  return pattern_dir(folder, name) if name else None


def remove_checkpoint(folder: str | Path) -> None:
  shutil.rmtree(folder, ignore_errors=True)
