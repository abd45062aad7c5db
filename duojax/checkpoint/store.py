"""The duojax checkpoint folder: params (orbax), config, tokenizer, head patterns.

  DIR/params/          orbax PyTree checkpoint of the params dict
  DIR/model.json       ModelConfig
  DIR/tokenizer.json … the tokenizer files (transformers' save_pretrained)
  DIR/patterns/NAME/   head patterns (duojax.pattern format)
  DIR/duojax.json      dtype, default pattern, source; its absence marks a folder
                       that is not (or not yet) a checkpoint.

The whole folder is written under a private name beside DIR and renamed into
place (save_checkpoint), so DIR is either absent or complete.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from duojax.checkpoint.hf import CheckpointError, read_json_object
from duojax.config import ModelConfig

MARKER = "duojax.json"
FORMAT_VERSION = 1


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer()


class CheckpointExists(CheckpointError):
  """Another process published a checkpoint at the same place first."""


def check_out(out: str | Path) -> Path:
  """Fails before any work if `out` cannot take a new checkpoint; returns it absolute."""
  out = Path(out).absolute()
  if out.exists() or out.is_symlink():
    if not out.is_dir():
      raise CheckpointError(f"--out {out} is a file; pass a folder path for the checkpoint")
    if (out / MARKER).exists() or (out / "params").exists():
      # CheckpointExists: a racing first run (no flock) that published first is then reused
      raise CheckpointExists(f"--out {out} already holds a checkpoint; pick another --out (or "
                            "delete that folder yourself if you mean to replace it)")
    if any(out.iterdir()):
      raise CheckpointError(f"--out {out} is a folder that is not empty; pass a new or empty folder")
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    probe = tempfile.TemporaryFile(dir=out.parent)
    probe.close()
  except OSError as e:
    raise CheckpointError(f"--out {out}: cannot write into {out.parent} ({e.strerror or e}); "
                          "pick a writable location") from e
  return out


# Private staging folders beside the target: .NAME.part-HOST-PID-RANDOM (and .trash- for
# folders being removed). Renaming one into place publishes a whole checkpoint at once.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:part|trash)-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]+$")
STALE_SECONDS = 24 * 3600


def staging_name(out: Path, kind: str = "part") -> Path:
  host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
  return out.parent / f".{out.name}.{kind}-{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def clean_stale_temporaries(parent: str | Path, name: str | None = None) -> list[Path]:
  """Removes staging folders of killed conversions (ours by name only) in `parent`.

  One is stale when its process (same host) is gone, or it is older than a day (another
  host, or a reused pid). name: only those for this target name.
  """
  parent, removed = Path(parent), []
  if not parent.is_dir():
    return removed
  host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
  for p in parent.iterdir():
    m = _TEMP.match(p.name)
    if not m or (name is not None and m["name"] != name) or not p.is_dir():
      continue
    try:
      age = time.time() - p.stat().st_mtime
    except OSError:
      continue
    dead = m["host"] == host and not _pid_alive(int(m["pid"]))
    if dead or age > STALE_SECONDS:
      shutil.rmtree(p, ignore_errors=True)
      removed.append(p)
  return removed


def save_checkpoint(out: str | Path, config: ModelConfig, params: dict, tokenizer=None,
                    source: str = "", default_pattern: str | None = None,
                    patterns: dict[str, Path] | None = None) -> Path:
  """Writes a whole checkpoint into a private folder beside `out`, then renames it into place.

  tokenizer: an HF tokenizer (save_pretrained) or None. patterns: NAME -> a pattern folder to
  copy in. A killed run leaves only a staging folder (cleaned by the next one), never a
  half-written `out`; a concurrent writer that published first wins (CheckpointExists).
  """
  out = check_out(out)
  clean_stale_temporaries(out.parent, out.name)
  tmp = staging_name(out)
  tmp.mkdir()
  try:
    dtype = str(np.asarray(jax.tree_util.tree_leaves(params)[0]).dtype)
    _checkpointer().save(tmp / "params", jax.tree_util.tree_map(np.asarray, params))
    (tmp / "model.json").write_text(config.to_json())
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    for name, src in (patterns or {}).items():
      shutil.copytree(src, pattern_dir(tmp, name))
    write_marker(tmp, {"format_version": FORMAT_VERSION, "dtype": dtype, "source": source,
                       "default_pattern": default_pattern})
    try:
      os.rename(tmp, out)  # atomic; replaces `out` only if it is an empty folder
    except OSError as e:
      if out.is_dir() and any(out.iterdir()):
        raise CheckpointExists(f"{out} was written by another process meanwhile") from e
      raise CheckpointError(f"cannot move the checkpoint into {out} ({e.strerror or e})") from e
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def write_marker(out: Path, meta: dict) -> None:
  tmp = out / f"{MARKER}.{os.getpid()}.tmp"
  tmp.write_text(json.dumps(meta, indent=2))
  tmp.replace(out / MARKER)


def _what_folder(folder: Path) -> str | None:
  """What a folder that is not a duojax checkpoint looks like, with the fix; None if unknown."""
  names = {p.name for p in folder.iterdir()}
  if "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names) or \
      "model.safetensors.index.json" in names:
    return (f"{folder} is a Hugging Face model folder, not a duojax checkpoint; convert it first: "
            f"`python -m duojax.convert --hf {folder} --out OUT`, then pass --ckpt OUT")
  ggufs = sorted(n for n in names if n.endswith(".gguf"))
  if ggufs:
    return (f"{folder} holds GGUF files, not a duojax checkpoint; convert one first: "
            f"`python -m duojax.convert --gguf {folder / ggufs[0]} --out OUT`, then --ckpt OUT")
  if "full_attention_heads.tsv" in names or ("pattern.json" in names and "params" not in names):
    return (f"{folder} is a head-pattern folder, not a model checkpoint; pass it as "
            "--pattern DIR (and --ckpt a checkpoint, or nothing for the embedded model)")
  if names & {".git", "pyproject.toml", "setup.py"}:
    return (f"{folder} looks like a source repository, not a duojax checkpoint; pass a folder "
            "written by `python -m duojax.convert --gguf FILE | --hf DIR --out OUT`")
  if "config.json" in names:
    return (f"{folder} has a config.json but no weights, and is not a duojax checkpoint; pass an HF "
            "folder with *.safetensors to `python -m duojax.convert --hf DIR --out OUT`")
  return None


def read_marker(folder: str | Path) -> dict:
  folder = Path(folder)
  if not folder.is_dir():
    if folder.is_file() and folder.suffix == ".gguf":
      raise CheckpointError(f"{folder} is a GGUF file, not a checkpoint folder; convert it first: "
                            f"`python -m duojax.convert --gguf {folder} --out OUT`, then --ckpt OUT")
    raise CheckpointError(f"no checkpoint folder at {folder}; make one with "
                          "`python -m duojax.convert --gguf FILE --out DIR` (or --hf DIR)")
  marker = folder / MARKER
  if not marker.is_file():
    names = {p.name for p in folder.iterdir()}
    if names & {"params", "model.json"}:  # our own layout: a conversion that did not finish
      raise CheckpointError(
          f"{folder} is a duojax checkpoint whose conversion was interrupted ({MARKER} missing); "
          "convert again into a new --out (this folder can then be deleted)")
    what = _what_folder(folder)
    if what:
      raise CheckpointError(what)
    raise CheckpointError(f"{folder} is not a duojax checkpoint (no {MARKER}); make one with "
                          "`python -m duojax.convert --gguf FILE | --hf DIR --out OUT`")
  return read_json_object(marker, "convert again into a new --out")


def load_config(folder: str | Path) -> ModelConfig:
  read_marker(folder)
  path = Path(folder) / "model.json"
  if not path.is_file():
    raise CheckpointError(f"{path} is missing; convert again into a new --out")
  d = read_json_object(path, "convert again into a new --out")
  try:
    return ModelConfig.from_dict(d)
  except (TypeError, KeyError, ValueError) as e:
    raise CheckpointError(f"{path} is not a valid model config ({e}); convert again") from e


def load_params(folder: str | Path, dtype=None) -> dict:
  """Params as device arrays; dtype (e.g. jnp.bfloat16) casts on load."""
  folder = Path(folder).absolute()
  read_marker(folder)
  if not (folder / "params").is_dir():
    raise CheckpointError(f"{folder}/params is missing; convert again into a new --out")
  try:
    tree = _checkpointer().restore(folder / "params")
  except Exception as e:
    _quiet_late_orbax_callbacks()
    why = (str(e).splitlines() or [""])[0].split(" [tensorstore_spec")[0][:300]
    raise CheckpointError(f"{folder}/params cannot be read ({type(e).__name__}: {why}); the "
                          "weights are damaged: convert again into a new --out") from e
  # orbax restores lists as lists or as {'0': ..} dicts depending on version.
  layers = tree["layers"]
  if isinstance(layers, dict):
    layers = [layers[str(i)] for i in range(len(layers))]
  tree = {**tree, "layers": list(layers)}
  cast = (lambda x: jnp.asarray(x, dtype)) if dtype is not None else jnp.asarray
  return jax.tree_util.tree_map(cast, tree)


def _quiet_late_orbax_callbacks() -> None:
  """After a failed restore, tensorstore reads still in flight finish on orbax's closed event
  loop and print "Event loop is closed" tracebacks through sys.unraisablehook; the error
  itself has been reported, so drop exactly those."""
  import sys
  prev = sys.unraisablehook

  def hook(u):
    if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
      return
    prev(u)
  sys.unraisablehook = hook


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
