"""The duojax checkpoint folder: params (orbax), config, tokenizer, head patterns.

  DIR/params/          orbax StandardCheckpointer checkpoint of the params dict
  DIR/model.json       ModelConfig
  DIR/tokenizer.json … the tokenizer files (transformers' save_pretrained)
  DIR/patterns/NAME/   head patterns (duojax.pattern format)
  DIR/duojax.json      format_version, dtype, default pattern, source; its absence marks
                       a folder that is not (or not yet) a checkpoint.

The whole folder is written under a private name beside DIR and renamed into
place (save_checkpoint), so DIR is either absent or complete. Params are restored against
an abstract target built from model.json (duojax/layout.py), so they come back in the
saved structure, dtype and (when given) sharding. checkpoint/handle.py's Checkpoint is the
way in: it reads and checks the folder once; the load_* functions here are what it calls.

Format versions: 1 = orbax's legacy PyTreeCheckpointer (restored without a target);
2 = StandardCheckpointer. A folder of another version is refused with the command that
re-converts it (the embedded models' cached folders are re-created automatically).
"""

from __future__ import annotations

import json
import logging
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
FORMAT_VERSION = 2


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer()


def _lean_saver():
  """Writes what StandardCheckpointer writes (its handler is this PyTreeCheckpointHandler, so
  the folder restores with _checkpointer), minus two copies that StandardCheckpointHandler
  does not let us turn off: the deepcopy of every host array before an async write (we wait
  for the write, so nothing can change the arrays meanwhile) and the compressed chunk buffers
  (bf16 weights compress little). With them a 2-layer Llama-3-8B-wide conversion peaked at
  8.5 GB of host memory for a 3.0 GB output; without them at 4.2 GB: the output plus the one
  tensor being converted (infer/bench_convert_memory.py).
  """
  import orbax.checkpoint as ocp
  # Both switches are newer than some orbax releases we support (the GPU box's orbax has no
  # `deepcopy_host_arrays`): without them the save is the same, it only costs more memory.
  try:
    numpy_handler = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
  except TypeError:
    numpy_handler = ocp.type_handlers.NumpyHandler()
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, numpy_handler), (jax.Array, ocp.type_handlers.ArrayHandler()))
  try:
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
  except TypeError:
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
  return ocp.Checkpointer(handler)


class CheckpointExists(CheckpointError):
  """Another process published a checkpoint at the same place first."""


class CheckpointVersionError(CheckpointError):
  """A checkpoint folder written in another format version; the message says how to redo it."""

  def __init__(self, message: str, version):
    super().__init__(message)
    self.version = version


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
                    patterns: dict[str, Path] | None = None,
                    source_path: str | None = None) -> Path:
  """Writes a whole checkpoint into a private folder beside `out`, then renames it into place.

  tokenizer: an HF tokenizer (save_pretrained) or None. patterns: NAME -> a pattern folder to
  copy in. source ("gguf:FILE" / "hf:DIR") and source_path (absolute) let a later format
  bump name the exact command that redoes this conversion. A killed run leaves only a
  staging folder (cleaned by the next one), never a half-written `out`; a concurrent writer
  that published first wins (CheckpointExists). params: numpy or jax arrays of one dtype.
  """
  out = check_out(out)
  clean_stale_temporaries(out.parent, out.name)
  tmp = staging_name(out)
  tmp.mkdir()
  try:
    dtypes = {str(np.asarray(x).dtype) for x in jax.tree_util.tree_leaves(params)}
    if len(dtypes) != 1:
      raise CheckpointError(f"params of mixed dtypes {sorted(dtypes)}; cast them to one first")
    dtype = dtypes.pop()
    _check_shapes(params, config, "the params to save", "they do not fit the config")
    import orbax.checkpoint as ocp
    with _lean_saver() as ckpt:  # np.asarray: numpy leaves are written without a copy
      ckpt.save(tmp / "params",
                args=ocp.args.PyTreeSave(jax.tree_util.tree_map(np.asarray, params)))
    (tmp / "model.json").write_text(config.to_json())
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    for name, src in (patterns or {}).items():
      shutil.copytree(src, pattern_dir(tmp, name))
    write_marker(tmp, {"format_version": FORMAT_VERSION, "dtype": dtype, "source": source,
                       "source_path": source_path, "default_pattern": default_pattern})
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
  """The folder's duojax.json (not checked for its format version: see check_version)."""
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


def reconvert_command(folder: str | Path, meta: dict) -> str:
  """The command that writes `folder`'s checkpoint again, from the source its marker names."""
  folder = Path(folder)
  kind, _, name = str(meta.get("source") or "").partition(":")
  src = meta.get("source_path") or (name if kind else "")
  flag = {"gguf": "--gguf", "hf": "--hf"}.get(kind)
  dtype = " --dtype bfloat16" if meta.get("dtype") == "bfloat16" else ""
  out = folder.with_name(folder.name + f"-v{FORMAT_VERSION}")
  if not flag:
    return f"python -m duojax.convert --gguf FILE | --hf DIR --out {out}{dtype}"
  where = "" if Path(src).is_absolute() else " (the path of that source)"
  return f"python -m duojax.convert {flag} {src} --out {out}{dtype}" + where


def check_version(folder: str | Path, meta: dict) -> None:
  """Refuses a folder of another format version, naming the fix."""
  version = meta.get("format_version", 1)
  if version == FORMAT_VERSION:
    return
  folder = Path(folder)
  if isinstance(version, int) and version > FORMAT_VERSION:
    raise CheckpointVersionError(
        f"{folder} is a duojax checkpoint of format version {version}, newer than this duojax "
        f"reads ({FORMAT_VERSION}); upgrade duojax (pip install -U -e .)", version)
  from duojax.checkpoint.embedded import embedded_name_of
  name = embedded_name_of(folder)
  if name is not None:
    raise CheckpointVersionError(
        f"{folder} is the cached conversion of the embedded {name} in an older checkpoint format "
        f"(version {version}, this duojax reads {FORMAT_VERSION}); it is re-created "
        f"automatically: pass --ckpt {name} (or no --ckpt) instead of its folder", version)
  raise CheckpointVersionError(
      f"{folder} is a duojax checkpoint of an older format (version {version}; this duojax "
      f"reads version {FORMAT_VERSION}); convert it again: `{reconvert_command(folder, meta)}`",
      version)


def read_config(folder: str | Path) -> ModelConfig:
  """model.json of a folder whose marker was already read."""
  path = Path(folder) / "model.json"
  if not path.is_file():
    raise CheckpointError(f"{path} is missing; convert again into a new --out")
  d = read_json_object(path, "convert again into a new --out")
  try:
    return ModelConfig.from_dict(d)
  except (TypeError, KeyError, ValueError) as e:
    raise CheckpointError(f"{path} is not a valid model config ({e}); convert again") from e


def load_config(folder: str | Path) -> ModelConfig:
  check_version(folder, read_marker(folder))
  return read_config(folder)


def _shape_table(tree) -> dict[str, tuple]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(np.shape(x)) for p, x in flat}


def _check_shapes(tree, config: ModelConfig, what: str, fix: str) -> None:
  """tree's tensors must be exactly those of config's layout with its shapes (orbax restores
  a target of another shape without complaint, and saving them would write a broken folder)."""
  from duojax.layout import param_shapes
  want = _shape_table(_shapes_as_arrays(param_shapes(config)))
  have = _shape_table(tree)
  if have != want:
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    parts = ([f"missing {missing[:4]}"] if missing else []) + \
        ([f"unexpected {extra[:4]}"] if extra else []) + \
        [f"{k} is {have[k]}, the config says {want[k]}" for k in wrong[:3]]
    raise CheckpointError(f"{what} do not match the model config ({'; '.join(parts)}); {fix}")


def _shapes_as_arrays(shapes):
  """A shapes tree (tuples as leaves) -> the same tree of zero-stride stand-ins with .shape."""
  if isinstance(shapes, tuple):
    return np.broadcast_to(np.zeros((), np.int8), shapes)
  if isinstance(shapes, list):
    return [_shapes_as_arrays(s) for s in shapes]
  return {k: _shapes_as_arrays(v) for k, v in shapes.items()}


def load_params(folder: str | Path, dtype=None, shardings=None, *,
                config: ModelConfig | None = None, meta: dict | None = None) -> dict:
  """Params (the plain dict) restored against the abstract target of model.json.

  dtype (e.g. jnp.bfloat16): cast as they are read; None keeps the stored dtype.
  shardings: None (every tensor on the default device), one Sharding, or a tree of the
  params' structure (see duojax/layout.py); orbax reads each tensor into its place.
  config, meta: the folder's, when the caller (the Checkpoint handle) has read them already.
  """
  from duojax.layout import abstract_params
  folder = Path(folder).absolute()
  if meta is None:
    meta = read_marker(folder)
    check_version(folder, meta)
  config = config or read_config(folder)
  if not (folder / "params").is_dir():
    raise CheckpointError(f"{folder}/params is missing; convert again into a new --out")
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = abstract_params(config, jnp.dtype(dtype or meta.get("dtype") or "float32"), shardings)
  _quiet_late_orbax_callbacks()  # before the reads: a failing one can close the loop early
  try:
    with _checkpointer() as ckpt:
      stored = ckpt.metadata(folder / "params")
      stored = getattr(getattr(stored, "item_metadata", stored), "tree", stored)
      _check_shapes(_shapes_as_arrays(_metadata_shapes(stored)), config,
                    f"the tensors in {folder}/params", "the folder is damaged or mixed up: "
                    "convert again into a new --out")
      return ckpt.restore(folder / "params", target)
  except CheckpointError:
    raise
  except Exception as e:
    why = (str(e).splitlines() or [""])[0].split(" [tensorstore_spec")[0][:300]
    raise CheckpointError(f"{folder}/params cannot be read ({type(e).__name__}: {why}); the "
                          "weights are damaged: convert again into a new --out") from e


def _metadata_shapes(tree):
  if isinstance(tree, dict):
    return {k: _metadata_shapes(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
    return [_metadata_shapes(v) for v in tree]
  return tuple(tree.shape)


def _quiet_late_orbax_callbacks() -> None:
  """After a failed read, tensorstore reads still in flight finish on orbax's closed event
  loop and print "Event loop is closed" tracebacks, through sys.unraisablehook, or through
  sys.excepthook / threading.excepthook when the callback runs on a tensorstore thread (seen
  in CI, interleaved with our one error line). The error itself is reported, so drop
  exactly those; installed once, before the reads, as the loop can close before we see the
  failure."""
  import sys
  import threading
  if getattr(sys.unraisablehook, "_duojax_quiet", False):
    return

  def closed_loop(exc) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

  prev_u, prev_e, prev_t = sys.unraisablehook, sys.excepthook, threading.excepthook

  def unraisable(u):
    if not closed_loop(u.exc_value):
      prev_u(u)

  def excepthook(typ, value, tb):
    if not closed_loop(value):
      prev_e(typ, value, tb)

  def thread_hook(args):
    if not closed_loop(args.exc_value):
      prev_t(args)

  unraisable._duojax_quiet = True
  sys.unraisablehook, sys.excepthook, threading.excepthook = unraisable, excepthook, thread_hook
  logging.getLogger("asyncio").addFilter(_unretrieved_read_errors)


def _unretrieved_read_errors(record) -> bool:
  """A logging filter for asyncio: the sibling reads of a failed restore fail alike and, never
  awaited once the first error is raised, are logged as "Task exception was never
  retrieved" with their tensorstore ValueError (seen in CI, a page of it after our one
  error line). The first of them is the error we report; drop those records, keep the rest."""
  exc = record.exc_info[1] if record.exc_info else None
  return not (str(record.msg).startswith("Task exception was never retrieved")
              and isinstance(exc, ValueError))


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
