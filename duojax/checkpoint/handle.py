"""One checkpoint, opened and checked once: config, params, tokenizer and head patterns.

  ckpt = Checkpoint.open("smollm2-135m")      # an embedded name (converted on first use)
  ckpt = Checkpoint.open("path/to/ckpt")      # or a folder written by duojax.convert
  ckpt.config                                 # ModelConfig (model.json, read at open)
  params = ckpt.params(dtype=None)            # the plain params dict (see model/llama.py)
  tok = ckpt.tokenizer()                      # read once, then the same object
  ckpt.default_pattern_dir                    # Path | None
  ckpt.pattern_dir("razor"), ckpt.pattern_dirs  # by name; {name: Path} of all stored ones

Opening reads the marker (duojax.json) and model.json once and refuses a folder that is
not a checkpoint, is half-written or of another format version, each with the fix. Nothing
heavy is imported until params or the tokenizer are asked for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from duojax.checkpoint import store
from duojax.checkpoint.hf import CheckpointError
from duojax.config import ModelConfig


@dataclasses.dataclass
class Checkpoint:
  """A checked duojax checkpoint folder. Build it with Checkpoint.open."""

  path: Path
  config: ModelConfig
  meta: dict
  embedded: str | None = None  # the embedded model's name when opened by name
  _tokenizer: object = dataclasses.field(default=None, repr=False)

  @classmethod
  def open(cls, path_or_name: str | Path | None = None, progress: bool = True) -> "Checkpoint":
    """A folder, or an embedded model's name (None: the default embedded model).

    progress: say on stderr when an embedded model is converted (once per DUOJAX_HOME).
    """
    from duojax.checkpoint.embedded import EMBEDDED, resolve_with_marker
    name = None if path_or_name is None else str(path_or_name)
    folder, meta = resolve_with_marker(name, progress=progress)
    embedded = (name or "smollm2-135m") if (name is None or name in EMBEDDED) else None
    folder = Path(folder).absolute()
    if meta is None:
      meta = store.read_marker(folder)
    store.check_version(folder, meta)
    if not (folder / "params").is_dir():
      raise CheckpointError(f"{folder}/params is missing; convert again into a new --out")
    return cls(folder, store.read_config(folder), meta, embedded)

  @property
  def dtype(self) -> str:
    """The stored params' dtype ("float32", "bfloat16")."""
    return str(self.meta.get("dtype") or "float32")

  @property
  def source(self) -> str:
    return str(self.meta.get("source") or "")

  def abstract_params(self, dtype=None, shardings=None) -> dict:
    """The params as jax.ShapeDtypeStructs (what params() would return), reading nothing."""
    import jax.numpy as jnp
    from duojax.layout import abstract_params
    return abstract_params(self.config, jnp.dtype(dtype or self.dtype), shardings)

  def params(self, dtype=None, shardings=None) -> dict:
    """The params dict as jax arrays.

    dtype: cast while reading (None: the stored dtype). shardings: None (the default
    device), one jax Sharding for all, or a tree of the params' structure (duojax/layout.py).
    """
    return store.load_params(self.path, dtype, shardings, config=self.config, meta=self.meta)

  def tokenizer(self):
    """The tokenizer saved beside the weights (an HF tokenizer), loaded on first call."""
    if self._tokenizer is None:
      self._tokenizer = store.load_tokenizer(self.path)
    return self._tokenizer

  @property
  def default_pattern(self) -> str | None:
    return self.meta.get("default_pattern") or None

  @property
  def default_pattern_dir(self) -> Path | None:
    """The stored pattern the checkpoint serves with by default, if any."""
    name = self.default_pattern
    return store.pattern_dir(self.path, name) if name else None

  def pattern_dir(self, name: str) -> Path:
    """A stored pattern's folder by name; a clear error names those that exist."""
    p = store.pattern_dir(self.path, name)
    if not p.is_dir():
      have = ", ".join(sorted(self.pattern_dirs)) or "none"
      raise CheckpointError(f"{self.path} has no head pattern {name!r} (stored: {have}); pass a "
                            "pattern folder instead, or store one with `python -m duojax.identify`")
    return p

  @property
  def pattern_dirs(self) -> dict[str, Path]:
    """{name: folder} of every pattern stored in the checkpoint."""
    root = self.path / "patterns"
    if not root.is_dir():
      return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir()}

  def set_default_pattern(self, name: str | None) -> None:
    """Makes a stored pattern (or none) the default, on disk and in this handle."""
    if name is not None:
      self.pattern_dir(name)
    store.set_default_pattern(self.path, name)
    self.meta = {**self.meta, "default_pattern": name}
