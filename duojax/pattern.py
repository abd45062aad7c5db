"""Head patterns: which (layer, KV head) keeps the full KV cache.

Two objects:

- `HeadPattern` holds the continuous gate values `gates [L, Hkv]` in [0, 1]
  (DuoAttention's alpha, or any per-head score scaled into [0, 1]), the
  streaming settings and free-form metadata. It is what is stored on disk.
- `HeadMask` is the binary decision derived from it, `retrieval [L][Hkv]`.
  It is a frozen, hashable dataclass of tuples, so it can be a static argument
  of `jax.jit`: one compile per pattern, and the model slices contiguous head
  ranges instead of gathering.

File formats (a pattern is a folder):

- ours (source of truth): `gates/` (an orbax checkpoint of `{"gates": [L, Hkv]
  float32}`) and `pattern.json` (format version, shape, sink, recent,
  metadata). `pattern.json` is written last, so a folder without it is an
  unfinished save. `save` also writes the reference files below.
- the reference DuoAttention folder: `full_attention_heads.tsv` (one row per
  layer, tab-separated floats per KV head) and `config.json` (only
  `sink_size` / `recent_size` matter here; everything else is kept in
  `metadata["reference_config"]`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from duojax.config import TRAIN

FORMAT_VERSION = 1
PATTERN_JSON = "pattern.json"
GATES_DIR = "gates"
REFERENCE_TSV = "full_attention_heads.tsv"
REFERENCE_CONFIG = "config.json"
# The official gate files end slightly outside [0, 1] (AdamW steps after the last
# clamp): down to -0.0014 in the six folders in shared/data. Such values are
# clipped; anything further out is not a gate file and is rejected.
REFERENCE_TOLERANCE = 0.01


class PatternError(ValueError):
  """A head pattern, or a file holding one, is unusable as given."""


def _check_window(sink: Any, recent: Any) -> tuple[int, int]:
  for name, v in (("sink", sink), ("recent", recent)):
    # bool is an int subclass; True as a window size is certainly a mistake.
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise PatternError(f"{name} must be an int, got {v!r}; pass a token count")
    if v < 0:
      raise PatternError(f"{name} must be >= 0, got {v}; pass a non-negative token count")
  if sink + recent < 1:
    raise PatternError(
        f"sink + recent must be >= 1 (got sink={sink}, recent={recent}); a "
        "streaming head needs at least one cached token")
  return int(sink), int(recent)


@dataclasses.dataclass(frozen=True)
class HeadMask:
  """Binary head pattern; hashable, so it can be a static jit argument.

  retrieval: [L][Hkv] tuples; True = retrieval head (full KV cache), False =
    streaming head (`sink` first tokens + `recent` last tokens).
  """
  retrieval: tuple[tuple[bool, ...], ...]
  sink: int
  recent: int

  def __post_init__(self):
    rows = self.retrieval
    if isinstance(rows, np.ndarray) or not isinstance(rows, (tuple, list)):
      raise PatternError(
          "HeadMask.retrieval must be a tuple of tuples of bool; use "
          "HeadMask.from_array for arrays")
    if len(rows) == 0:
      raise PatternError("HeadMask needs at least one layer; pass a [L, Hkv] mask with L >= 1")
    width = None
    norm = []
    for l, row in enumerate(rows):
      row = tuple(row)
      if width is None:
        width = len(row)
      if len(row) != width or width == 0:
        raise PatternError(
            f"HeadMask rows must all have the same non-zero length; layer {l} "
            f"has {len(row)} heads, layer 0 has {width}")
      for v in row:
        if not isinstance(v, (bool, np.bool_)):
          raise PatternError(
              f"HeadMask entries must be bool, got {v!r} in layer {l}; use "
              "HeadMask.from_array to convert")
      norm.append(tuple(bool(v) for v in row))
    sink, recent = _check_window(self.sink, self.recent)
    # Normalise so that masks built from lists/np.bool_ compare and hash equal.
    object.__setattr__(self, "retrieval", tuple(norm))
    object.__setattr__(self, "sink", sink)
    object.__setattr__(self, "recent", recent)

  @property
  def num_layers(self) -> int:
    return len(self.retrieval)

  @property
  def num_kv_heads(self) -> int:
    return len(self.retrieval[0])

  def n_retrieval(self, layer: int) -> int:
    return sum(self.retrieval[layer])

  def order(self, layer: int) -> tuple[int, ...]:
    """Head permutation for `layer`: retrieval heads, then streaming, each ascending.

    new_heads = old_heads[order]; the model reorders its q/k/v/o weights by
    this so that retrieval heads are the leading `n_retrieval(layer)` slots.
    """
    row = self.retrieval[layer]
    return (tuple(h for h, r in enumerate(row) if r)
            + tuple(h for h, r in enumerate(row) if not r))

  def inverse_order(self, layer: int) -> tuple[int, ...]:
    """old_heads = new_heads[inverse_order]."""
    inv = [0] * self.num_kv_heads
    for new, old in enumerate(self.order(layer)):
      inv[old] = new
    return tuple(inv)

  @property
  def retrieval_fraction(self) -> float:
    """Fraction of all (layer, KV head) pairs that are retrieval heads."""
    n = sum(sum(row) for row in self.retrieval)
    return n / (self.num_layers * self.num_kv_heads)

  def as_array(self) -> np.ndarray:
    """[L, Hkv] np.bool_."""
    return np.array(self.retrieval, dtype=np.bool_)

  def check_fits(self, num_layers: int, num_kv_heads: int) -> None:
    if (self.num_layers, self.num_kv_heads) != (num_layers, num_kv_heads):
      raise PatternError(
          f"head pattern has shape [L={self.num_layers}, Hkv={self.num_kv_heads}] "
          f"but the model has [L={num_layers}, Hkv={num_kv_heads}]; identify or "
          "import a pattern for this model")

  @classmethod
  def from_array(cls, mask, sink: int, recent: int) -> "HeadMask":
    """mask: [L, Hkv] bool-like (bool, or 0/1 numbers)."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
      raise PatternError(f"mask must be 2-D [L, Hkv], got shape {arr.shape}")
    if arr.dtype != np.bool_:
      if not np.all(np.isin(arr, (0, 1))):
        raise PatternError("mask must hold only booleans or 0/1; binarize gates first")
      arr = arr.astype(np.bool_)
    return cls(tuple(tuple(bool(v) for v in row) for row in arr), sink, recent)

  @classmethod
  def all_retrieval(cls, num_layers: int, num_kv_heads: int, sink: int,
                    recent: int) -> "HeadMask":
    return cls.from_array(np.ones((num_layers, num_kv_heads), np.bool_), sink, recent)

  @classmethod
  def all_streaming(cls, num_layers: int, num_kv_heads: int, sink: int,
                    recent: int) -> "HeadMask":
    return cls.from_array(np.zeros((num_layers, num_kv_heads), np.bool_), sink, recent)


def _this_process_only(ocp) -> dict:
  """orbax options for a save by this process alone. In a multi-host run one process
  writes the pattern; orbax would otherwise wait at barriers for the others (which have
  nothing to write, and have exited) and hang."""
  import jax
  if jax.process_count() == 1:
    return {}
  me = jax.process_index()
  return {"multiprocessing_options": ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me})}


class HeadPattern:
  """Gate values `gates [L, Hkv]` float32 in [0, 1], plus sink/recent and metadata.

  metadata is a JSON-serialisable dict: `model_name`, `method` ("duo",
  "razor", "retrieval_score", "import", "random", ...), data, seed, and
  free-form extras. `metadata["selection"]`, when present, records how the
  pattern is meant to be binarised (`{"sparsity": s}` or
  `{"threshold": t, "strict": bool}`); `mask()` applies it.

  Values outside [0, 1] are rejected unless `clip=True` (the reference TSV
  reader clips, since trained gates end slightly below 0; it rejects values
  more than REFERENCE_TOLERANCE outside).
  """

  def __init__(self, gates, sink: int, recent: int,
               metadata: Mapping[str, Any] | None = None, *, clip: bool = False):
    try:
      arr = np.array(gates, dtype=np.float32)  # a private copy
    except (TypeError, ValueError) as e:
      raise PatternError(f"gates must be a numeric [L, Hkv] array ({e})") from None
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
      raise PatternError(f"gates must be a non-empty 2-D [L, Hkv] array, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
      l, h = np.argwhere(bad)[0]
      raise PatternError(
          f"gates hold {int(bad.sum())} non-finite value(s) (first at layer {l}, "
          f"head {h}: {arr[l, h]}); fix or re-run identification")
    if clip:
      arr = np.clip(arr, 0.0, 1.0)
    elif arr.min() < 0.0 or arr.max() > 1.0:
      raise PatternError(
          f"gates must lie in [0, 1], got range [{arr.min()}, {arr.max()}]; pass "
          "clip=True to clip them")
    arr.setflags(write=False)
    self._gates = arr
    self.sink, self.recent = _check_window(sink, recent)
    self.metadata = dict(metadata or {})

  @property
  def gates(self) -> np.ndarray:
    """[L, Hkv] float32, read-only."""
    return self._gates

  @property
  def shape(self) -> tuple[int, int]:
    return self._gates.shape

  @property
  def num_layers(self) -> int:
    return self._gates.shape[0]

  @property
  def num_kv_heads(self) -> int:
    return self._gates.shape[1]

  def __repr__(self) -> str:
    return (f"HeadPattern(shape={self.shape}, sink={self.sink}, recent={self.recent}, "
            f"method={self.metadata.get('method')!r}, "
            f"model_name={self.metadata.get('model_name')!r})")

  def with_settings(self, sink: int | None = None,
                    recent: int | None = None) -> "HeadPattern":
    """A copy with other streaming sizes (e.g. deploy with sink 64 after training with 128)."""
    return HeadPattern(self._gates,
                       self.sink if sink is None else sink,
                       self.recent if recent is None else recent,
                       copy.deepcopy(self.metadata))

  # --- binarisation -------------------------------------------------------

  def binarize(self, sparsity: float | None = None, threshold: float | None = None,
               *, strict: bool = False) -> HeadMask:
    """Binary mask from the gates; pass exactly one of `sparsity` / `threshold`.

    sparsity: the official DuoAttention rule over all N = L * Hkv (layer, KV
      head) gates: `threshold = np.quantile(gates, sparsity)` (linear
      interpolation), retrieval iff gate >= threshold. The official code adds
      tiny random noise to the gates first, which makes them distinct; with
      distinct gates exactly `n_streaming(N, sparsity) = ceil(sparsity * (N -
      1))` of them fall below the quantile (so sparsity 1 still keeps one
      head). We reproduce that count deterministically, without noise: heads
      are ranked by gate ascending, ties broken by flat index (layer-major:
      layer, then head; the lower index streams first), and the first
      `n_streaming` stream. With distinct gates this is exactly the official
      mask; with ties it is the official mask for one draw of its noise.
    threshold: retrieval iff gate >= threshold (gate > threshold with
      `strict=True`, the retrieval-score rule); the threshold must lie in [0, 1].
      Compared in float64 against the exact float32 gate values.
    """
    if (sparsity is None) == (threshold is None):
      raise PatternError(
          "binarize needs exactly one of sparsity= or threshold=; got "
          f"sparsity={sparsity!r}, threshold={threshold!r}")
    g = self._gates.astype(np.float64)
    if threshold is not None:
      t = _finite_float("threshold", threshold)
      if not 0.0 <= t <= 1.0:
        raise PatternError(f"threshold must lie in [0, 1] (gates do), got {t}; pass a gate "
                           "value, or use sparsity= for a fraction of streaming heads")
      keep = g > t if strict else g >= t
    else:
      s = _finite_float("sparsity", sparsity)
      if not 0.0 <= s <= 1.0:
        raise PatternError(f"sparsity must lie in [0, 1], got {s}; pass a fraction of streaming heads")
      if strict:
        raise PatternError("strict= applies only to threshold=; drop it for sparsity=")
      flat = g.reshape(-1)
      n_stream = n_streaming(flat.size, s)
      # A stable sort keeps equal gates in flat-index order, which is the tie rule.
      rank = np.argsort(flat, kind="stable")
      keep = np.ones(flat.size, np.bool_)
      keep[rank[:n_stream]] = False
      keep = keep.reshape(g.shape)
    return HeadMask.from_array(keep, self.sink, self.recent)

  def mask(self) -> HeadMask:
    """binarize() with the rule recorded in `metadata["selection"]`."""
    sel = self.metadata.get("selection")
    if not isinstance(sel, Mapping):
      raise PatternError(
          "this pattern records no selection rule (metadata['selection']); call "
          "binarize(sparsity=...) or binarize(threshold=...) instead")
    if "sparsity" in sel and sel["sparsity"] is not None:
      return self.binarize(sparsity=sel["sparsity"])
    if "threshold" in sel and sel["threshold"] is not None:
      return self.binarize(threshold=sel["threshold"], strict=bool(sel.get("strict", False)))
    raise PatternError(
        f"metadata['selection'] = {dict(sel)!r} names neither sparsity nor threshold; fix the metadata")

  # --- our format ---------------------------------------------------------

  def save(self, directory, *, overwrite: bool = False) -> Path:
    """Write our format (`gates/`, `pattern.json`) plus the reference files."""
    import orbax.checkpoint as ocp  # keeps `import duojax.pattern` light
    d = Path(directory).resolve()
    meta_json = _dump_metadata(self.metadata)
    pj, gd = d / PATTERN_JSON, d / GATES_DIR
    if pj.exists() or gd.exists():
      if not overwrite:
        raise PatternError(f"{d} already holds a pattern; pass overwrite=True to replace it")
      # Drop pattern.json first: an interrupted overwrite then reads as half-written.
      pj.unlink(missing_ok=True)
      if gd.exists():
        shutil.rmtree(gd)
    d.mkdir(parents=True, exist_ok=True)
    ckpt = ocp.StandardCheckpointer(**_this_process_only(ocp))
    try:
      ckpt.save(gd, {"gates": np.array(self._gates)})
      ckpt.wait_until_finished()
    finally:
      ckpt.close()
    self.to_reference(d)
    doc = {
        "format": "duojax.pattern",
        "format_version": FORMAT_VERSION,
        "shape": list(self.shape),
        "sink": self.sink,
        "recent": self.recent,
        "metadata": json.loads(meta_json),
    }
    _write_atomic(pj, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return d

  @classmethod
  def load(cls, directory) -> "HeadPattern":
    import orbax.checkpoint as ocp
    d = Path(directory).resolve()
    if not d.is_dir():
      raise PatternError(f"pattern folder {d} does not exist; check the path")
    pj, gd = d / PATTERN_JSON, d / GATES_DIR
    if not pj.is_file():
      what = "gates/ is there but pattern.json is missing" if gd.exists() else "pattern.json is missing"
      raise PatternError(
          f"{d} is not a finished duojax pattern: {what}; re-run save() (or use "
          "load_any for a reference folder)")
    if not gd.is_dir():
      raise PatternError(
          f"{d} is half-written: pattern.json is there but gates/ is missing; re-run save()")
    try:
      doc = json.loads(pj.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise PatternError(f"{pj} is not valid JSON ({e}); re-run save()") from None
    for key in ("format_version", "shape", "sink", "recent", "metadata"):
      if key not in doc:
        raise PatternError(f"{pj} lacks '{key}'; re-run save()")
    if doc["format_version"] > FORMAT_VERSION:
      raise PatternError(
          f"{pj} has format_version {doc['format_version']}, newer than this duojax "
          f"reads ({FORMAT_VERSION}); upgrade duojax")
    ckpt = ocp.StandardCheckpointer()
    try:
      restored = ckpt.restore(gd)
    except Exception as e:  # orbax raises many types for a broken folder
      raise PatternError(f"cannot read gates from {gd} ({type(e).__name__}: {e}); re-run save()") from None
    finally:
      ckpt.close()
    if not isinstance(restored, Mapping) or "gates" not in restored:
      raise PatternError(f"{gd} holds no 'gates' array; re-run save()")
    gates = np.asarray(restored["gates"], dtype=np.float32)
    if list(gates.shape) != list(doc["shape"]):
      raise PatternError(
          f"{gd} holds gates of shape {list(gates.shape)} but pattern.json says "
          f"{doc['shape']}; the folder is mixed up, re-run save()")
    return cls(gates, doc["sink"], doc["recent"], doc["metadata"])

  # --- reference DuoAttention format ---------------------------------------

  def to_reference(self, directory) -> Path:
    """Write `full_attention_heads.tsv` and `config.json`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # 19 significant digits print the float64 of each float32 gate exactly
    # enough to read back the same float32 (and match the reference style).
    lines = ["\t".join(f"{float(v):.18e}" for v in row) for row in self._gates]
    _write_atomic(d / REFERENCE_TSV, "\n".join(lines) + "\n")
    cfg = dict(self.metadata.get("reference_config") or {})
    if "model_name" not in cfg and self.metadata.get("model_name") is not None:
      cfg["model_name"] = self.metadata["model_name"]
    cfg["sink_size"] = self.sink
    cfg["recent_size"] = self.recent
    _write_atomic(d / REFERENCE_CONFIG, _dump_metadata(cfg) + "\n")
    return d

  @classmethod
  def from_reference(cls, directory) -> "HeadPattern":
    """Read a reference DuoAttention folder; gates are clipped into [0, 1]."""
    d = Path(directory)
    tsv, cfgp = d / REFERENCE_TSV, d / REFERENCE_CONFIG
    for p in (tsv, cfgp):
      if not p.is_file():
        raise PatternError(f"{p} is missing; a reference pattern folder needs "
                           f"{REFERENCE_TSV} and {REFERENCE_CONFIG}")
    raw = read_reference_tsv(tsv)
    try:
      cfg = json.loads(cfgp.read_text())
    except json.JSONDecodeError as e:
      raise PatternError(f"{cfgp} is not valid JSON ({e}); fix the file") from None
    if not isinstance(cfg, dict):
      raise PatternError(f"{cfgp} must hold a JSON object; fix the file")
    for key in ("sink_size", "recent_size"):
      if key not in cfg:
        raise PatternError(f"{cfgp} lacks '{key}'; add it (DuoAttention trains with "
                           f"{TRAIN.sink} / {TRAIN.recent})")
    n_clipped = int(np.count_nonzero((raw < 0) | (raw > 1)))
    meta = {
        "method": "import",
        "source_format": "duo_attention",
        "source": str(d),
        "model_name": cfg.get("model_name"),
        "n_clipped": n_clipped,
        "reference_config": cfg,
    }
    return cls(raw, cfg["sink_size"], cfg["recent_size"], meta, clip=True)


def read_reference_tsv(path) -> np.ndarray:
  """Raw (unclipped) gates [L, Hkv] float32 from a `full_attention_heads.tsv`."""
  path = Path(path)
  rows = []
  for i, line in enumerate(path.read_text().splitlines()):
    if not line.strip():
      continue
    try:
      rows.append([float(x) for x in line.strip().split("\t")])
    except ValueError:
      raise PatternError(f"{path} line {i + 1} is not tab-separated floats; fix the file") from None
  if not rows:
    raise PatternError(f"{path} is empty; expected one row of gates per layer")
  widths = {len(r) for r in rows}
  if len(widths) != 1:
    raise PatternError(f"{path} rows have different lengths {sorted(widths)}; expected one column per KV head")
  arr = np.asarray(rows, dtype=np.float32)
  if not np.all(np.isfinite(arr)):
    raise PatternError(f"{path} holds NaN or inf gates; fix or re-run identification")
  far = (arr < -REFERENCE_TOLERANCE) | (arr > 1 + REFERENCE_TOLERANCE)
  if far.any():
    r, c = (int(x) for x in np.argwhere(far)[0])
    raise PatternError(
        f"{path} row {r + 1} (layer {r}), column {c + 1} (KV head {c}) holds gate "
        f"{float(arr[r, c]):.6g}, far outside [0, 1] ({int(far.sum())} such value(s)); trained "
        f"gates lie in [0, 1] up to +-{REFERENCE_TOLERANCE} (those are clipped); this file "
        "holds something else (scores? logits?): rescale it into [0, 1] or re-export it")
  return arr


def load_any(directory) -> HeadPattern:
  """Our format if the folder has `pattern.json` (or `gates/`), else the reference format."""
  d = Path(directory)
  if (d / PATTERN_JSON).exists() or (d / GATES_DIR).exists():
    # gates/ without pattern.json is an unfinished save of ours: say so rather
    # than silently reading the reference TSV beside it.
    return HeadPattern.load(d)
  if (d / REFERENCE_TSV).exists():
    return HeadPattern.from_reference(d)
  raise PatternError(
      f"{d} holds no head pattern: expected {PATTERN_JSON} (duojax) or "
      f"{REFERENCE_TSV} (DuoAttention); check the path")


def random_pattern(num_layers: int, num_kv_heads: int, seed: int,
                   sink: int = TRAIN.sink, recent: int = TRAIN.recent) -> HeadPattern:
  """Uniform random gates [L, Hkv] (the "random heads" baseline); seeded."""
  rng = np.random.default_rng(seed)
  gates = rng.random((num_layers, num_kv_heads), dtype=np.float32)
  return HeadPattern(gates, sink, recent, {"method": "random", "seed": int(seed)})


# --- helpers ---------------------------------------------------------------

def n_streaming(n: int, sparsity: float) -> int:
  """Streaming heads of N under the official quantile rule: ceil(sparsity * (N - 1)).

  The number of distinct values strictly below `np.quantile(values, sparsity)`
  (linear). Computed from the exact rational position so float noise in
  `sparsity * (N - 1)` (0.7 * 10 = 7.000000000000001) cannot add a head.
  """
  from fractions import Fraction
  if n < 1:
    return 0
  return int(math.ceil(Fraction(float(sparsity)).limit_denominator(10**9) * (n - 1)))


def _finite_float(name: str, v: Any) -> float:
  try:
    f = float(v)
  except (TypeError, ValueError):
    raise PatternError(f"{name} must be a number, got {v!r}") from None
  if not math.isfinite(f):
    raise PatternError(f"{name} must be a finite number, got {v!r}")
  return f


def _json_default(o: Any):
  # numpy extras (e.g. raw scores) are stored as plain lists / numbers.
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, Path):
    return str(o)
  raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def _dump_metadata(meta: Mapping[str, Any]) -> str:
  try:
    return json.dumps(meta, default=_json_default, sort_keys=True, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise PatternError(
        f"metadata must be JSON-serialisable ({e}); store plain numbers, strings, "
        "lists or numpy arrays") from None


def _write_atomic(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
