"""Glue shared by the CLI and infer/eval_table.py: load once, build, run, report."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from duojax.config import ModelConfig
from duojax.data.haystack import HaystackTokens, load_haystack
from duojax.data.niah import NeedleTask
from duojax.eval import grid, mkniah, niah, passkey
from duojax.eval.generation import GenSettings
from duojax.eval.methods import BuiltMethod
from duojax.pattern import HeadPattern

# Beside a developer's checkout (DESIGN.md section 4).
DEFAULT_HAYSTACK = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "paul_graham_essays"


@dataclasses.dataclass
class EvalModel:
  config: ModelConfig
  params: dict  # stored head order; each method reorders its own copy
  tokenizer: object
  ckpt: Path
  name: str | None  # the --ckpt argument (embedded name or folder)
  pattern: HeadPattern | None
  pattern_source: str | None
  dtype: str
  # bf16: `params` as loaded; int8: each method quantises its reordered copy
  # (model.handle.prepare_params), so `params` stay in the loaded dtype and stored head order
  weights_dtype: str = "bf16"


def resolve_dtype(name: str | None) -> str:
  """'auto': bfloat16 on accelerators (as DuoAttention evaluates), float32 on CPU."""
  if name in (None, "auto"):
    return "bfloat16" if jax.default_backend() in ("gpu", "cuda", "tpu") else "float32"
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {name!r}")
  return name


def load_eval_model(ckpt: str | None, pattern: str | None = None, dtype: str | None = "auto",
                    progress: bool = True, mesh=None, weights_dtype: str = "bf16") -> EvalModel:
  """mesh: a jax Mesh to evaluate on (the weights are restored straight into their
  shardings there; give the same mesh to GenSettings); None: one device.

  weights_dtype: bf16 or int8. The weights load unquantised either way: serving.load_model
  quantises after reordering the heads for one mask, but an evaluation loads once and
  every method reorders its own copy, which int8 QArrays (values and per-channel scales)
  cannot be put through; so int8 is applied per method after its reorder
  (model.handle.prepare_params), giving what load_model(attention=that method,
  weights_dtype="int8") serves."""
  from duojax.eval.methods import resolve_pattern
  from duojax.model.quant import WEIGHT_DTYPES
  from duojax.serving import load_model
  if weights_dtype not in WEIGHT_DTYPES:
    raise ValueError(f"--weights-dtype {weights_dtype!r}: choose one of "
                     f"{', '.join(WEIGHT_DTYPES)}")
  dt = resolve_dtype(dtype)
  # unpacked: the evaluation runs from the params dict (each method prepares its own copy),
  # and a packed model's `.params` would be an unpacked copy beside it
  m = load_model(ckpt, "full", dtype=getattr(jnp, dt), progress=progress, mesh=mesh,
                 pack=False)
  pat, src = resolve_pattern(m.ckpt, ckpt, pattern)
  return EvalModel(m.config, m.params, m.tokenizer, m.ckpt, ckpt, pat, src, dt, weights_dtype)


def default_haystack() -> str | None:
  env = os.environ.get("DUOJAX_HAYSTACK")
  if env:
    return env
  return str(DEFAULT_HAYSTACK) if DEFAULT_HAYSTACK.is_dir() else None


def load_haystack_tokens(path: str | None, tokenizer) -> tuple[HaystackTokens, str]:
  path = path or default_haystack()
  if not path:
    raise ValueError("no haystack found: pass --haystack DIR|FILE (e.g. the Paul Graham essays "
                     "folder) or set DUOJAX_HAYSTACK")
  # Paragraph boundaries only: the essays are hard-wrapped mid-sentence.
  return HaystackTokens(load_haystack(path), tokenizer, line_breaks=False), str(path)


def device_info(mesh=None) -> dict:
  d = jax.devices()[0]
  info = {"platform": d.platform, "device_kind": getattr(d, "device_kind", ""),
          "jax": jax.__version__}
  if mesh is not None:
    info["mesh"] = {k: int(v) for k, v in mesh.shape.items()}
  return info


def parse_eval_mesh(spec: str | None):
  """--mesh for evaluation: None or "" -> None (one device); else a Mesh of every device,
  the sizes multiplying to the device count (duojax.sharding.parse_mesh says which)."""
  if not spec:
    return None
  from duojax import sharding
  if sharding.parse_mesh(spec)["fsdp"] > 1:
    raise ValueError("--mesh fsdp=N shards weights for gate training; evaluation takes data, "
                     "tensor and sequence")
  sharding.parse_mesh(spec, jax.device_count())  # the sizes must multiply to the devices
  return sharding.make_mesh(spec)


def run_retrieval(task: str, model: EvalModel, hay: HaystackTokens, methods: list[BuiltMethod],
                  lengths: list[int], depths: list[float], chat: bool, gen_kw: dict,
                  samples: int = 1, seed: int = 0, offset: int = 0,
                  needle: NeedleTask | None = None, variant: str = "numeric",
                  num_keys: int = 4, key_words: int = 4, progress: bool = True,
                  extra_settings: dict | None = None, programs: dict | None = None) -> dict:
  """A niah, mkniah or passkey grid under every method -> the results document
  (JSON-ready). num_keys: passkeys per prompt (passkey multi) or needles per prompt
  (mkniah). programs: a dict kept across calls so that tasks of the same shapes
  share their compiled programs (generation.compile_programs)."""
  fmt = grid.prompt_format(model.tokenizer, chat)
  if lengths[0] <= fmt.overhead() + 16:
    raise ValueError(f"--lengths {lengths[0]} is too short: the prompt format alone takes "
                     f"{fmt.overhead()} tokens")
  if task == "niah":
    needle = needle or NeedleTask()
    cells = niah.build_cells(hay, model.tokenizer, needle, lengths, depths, fmt, samples, seed,
                             offset)
    metric = "rouge1_recall"
  elif task == "passkey":
    cells = passkey.build_cells(hay, model.tokenizer, lengths, depths, fmt, variant, samples,
                                seed, offset, num_keys, key_words)
    metric = "contains" if variant == "numeric" else "rouge1_recall"
  elif task == "mkniah":
    cells = mkniah.build_cells(hay, model.tokenizer, lengths, depths, fmt, samples, seed, offset,
                               num_keys)
    metric = "exact"
  else:
    raise ValueError(f"unknown task {task!r}")
  # No batch wider than one length's cells: filler rows would cost as much as real ones.
  per_length = max(sum(c.length == l for c in cells) for l in lengths)
  gen_kw = {**gen_kw, "batch_size": min(gen_kw.get("batch_size", 10), per_length)}
  gen = GenSettings.for_lengths(max(lengths), model.config, **gen_kw)
  t0 = time.perf_counter()
  rows, seconds = grid.run_grid(model.params, model.config, model.tokenizer, cells, methods, gen,
                                progress=progress, programs=programs)
  compile_s = seconds.pop("compile", None)
  settings = {
      "task": task, "ckpt": model.name or str(model.ckpt), "model": model.config.name,
      "chat": chat, "lengths": lengths, "depths": [round(d, 4) for d in depths],
      "samples": samples, "seed": seed, "offset": offset, "dtype": model.dtype,
      "max_new_tokens": gen.max_new_tokens, "prefill_chunk": gen.prefill_chunk,
      "batch_size": gen.batch_size, "backend": gen.backend, "pattern": model.pattern_source,
      "pattern_metadata": model.pattern.metadata if model.pattern is not None else None,
      "device": device_info(gen.mesh), **(extra_settings or {}),
  }
  if task == "niah":
    settings.update(needle=needle.needle, question=needle.question, answer=needle.answer)
  elif task == "mkniah":
    settings.update(num_keys=num_keys)
  else:
    settings.update(variant=variant, num_keys=num_keys, key_words=key_words)
  return {
      "task": task, "settings": settings, "methods": [bm.describe() for bm in methods],
      "plot_metric": metric,
      "summary": {m: grid.summarize(rows, m) for m in ("contains", "rouge1_recall", "exact")
                  if all(m in r["scores"] for r in rows)},
      "seconds": {"total": round(time.perf_counter() - t0, 2), "compile": compile_s,
                  "per_method": seconds},
      "cells": rows,
  }


def write_json(doc: dict, path: str | Path) -> Path:
  """Atomically (a temporary file renamed into place). If the path cannot be written after
  all (a disk filled during the run), the results go to a file in the temp folder instead,
  named in the error, rather than being lost."""
  path = Path(path)
  text = json.dumps(doc, indent=1, default=_jsonable)
  tmp = path.with_suffix(path.suffix + ".tmp")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    tmp.replace(path)
  except OSError as e:
    import tempfile
    fd, rescue = tempfile.mkstemp(prefix="duojax-results-", suffix=".json")
    with os.fdopen(fd, "w") as f:
      f.write(text)
    raise OSError(f"cannot write {path} ({e.strerror or e}); the results were saved to "
                  f"{rescue} instead") from e
  return path


def _jsonable(o):
  try:
    import numpy as np
    if isinstance(o, np.generic):
      return o.item()
    if isinstance(o, np.ndarray):
      return o.tolist()
  except ImportError:
    pass
  if isinstance(o, Path):
    return str(o)
  raise TypeError(f"{type(o).__name__} is not JSON serialisable")
