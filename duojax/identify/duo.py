"""DuoAttention gate training: one gate per (layer, KV head), all weights frozen.

The teacher is the model with full attention; the student mixes, per KV head,
alpha * full + (1 - alpha) * streaming attention before o_proj, so errors
compound through the layers. Loss = MSE of the final hidden states (after the
last RMSNorm) over the question/answer tail + reg * mean(|alpha|); `gate_loss`
computes it, and training steps on its gradient.

Two students (`GateTrainConfig.student`, `--student`): "deployed" computes both
branches from the student's own hidden states (the paper's equations, and the
model as served); "official" takes the full branch from the teacher's hidden
states of that layer without gradient (the official code's two-way forward).
On SmolLM2 the deployed student found the better heads (NIAH / passkey at
sparsity 0.5 and 0.75: infer/results/student-semantics-h200/), so it is the
default. The clamp to [0, 1] passes the gradient straight through on [0, 1]
(`clamp01`, as torch's clamp) and the regulariser's derivative is sign(alpha),
0 at 0 (`l1_mean`, as torch's abs).

The model is the NNX `Llama` with stacked layers and a `Gate` variable per layer
(`Llama(config, params, gates=...)`): `train_gates` splits it once into the Gate
state, which it differentiates, optimises with optax and checkpoints, and the
frozen rest; the step merges them inside its trace and scans the layers (the
stacked Block merged per step, remat on).

On a device mesh (duojax.sharding's four axes, `--mesh data=2,fsdp=2,tensor=2`):
the frozen weights are placed by the library's logical rules in "training" mode
(fsdp over embed, tensor over KV heads, the MLP and the vocabulary), the gates and
the optimizer state are replicated, the batch is split over data (and fsdp where it
divides), and with sequence > 1 every sample's tokens are split over `sequence`:
attention computes each device's query rows over K/V all-gathered over that axis
(duojax/identify/sequence_parallel.py says what that first form does and does not
do). `build_step` compiles one step so; `train_gates` loops it. The same code runs on
1 device, N CPU devices, several GPUs or a TPU slice (multi-host: `global_put`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from duojax import sharding
from duojax.attention import dispatch
from duojax.attention.training import dense_attention, gated_attention  # blocked when T is large
from duojax.config import TRAIN, ModelConfig, round_up
from duojax.identify import sequence_parallel as seqp
from duojax.model import llama
from duojax.model.modules import Gate, Llama


class TrainError(ValueError):
  """Bad training settings or state; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class GateTrainConfig:
  steps: int = 2000
  batch_size: int = 1
  min_len: int = 1000
  max_len: int = 32000
  len_intervals: int = 50
  num_passkeys: int = 10
  passkey_words: int = 32
  sink: int = TRAIN.sink
  recent: int = TRAIN.recent
  lr: float = 0.02
  reg: float = 0.05
  init_gate: float = 1.0
  warmup_frac: float = 0.2
  decay_frac: float = 0.2
  min_lr_frac: float = 0.1
  seed: int = 42
  save_every: int = 50
  pad_multiple: int = 1024  # sequences are padded to a multiple: fewer compiles
  remat: bool = True
  dtype: str = "bfloat16"  # activations / frozen weights; gates are fp32
  student: str = "deployed"  # which hidden states the full branch reads: see STUDENTS

  def __post_init__(self):
    if self.student not in STUDENTS:
      raise TrainError(f"--student must be one of {sorted(STUDENTS)}, got {self.student!r}")
    if self.steps < 1:
      raise TrainError(f"--steps must be >= 1, got {self.steps}")
    if self.min_len > self.max_len:
      raise TrainError(f"--min-len ({self.min_len}) is greater than --max-len ({self.max_len})")
    if self.sink < 0 or self.recent < 0 or self.sink + self.recent < 1:
      raise TrainError(f"need sink >= 0, recent >= 0 and sink + recent >= 1; got "
                       f"{self.sink}/{self.recent}")
    if not 0.0 < self.init_gate <= 1.0:
      raise TrainError(f"--init-gate must be in (0, 1] (the gates live in [0, 1]), got "
                       f"{self.init_gate}")
    if self.batch_size < 1 or self.save_every < 1:
      raise TrainError("--batch-size and --save-every must be >= 1")

  @classmethod
  def from_dict(cls, d: dict) -> "GateTrainConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise TrainError(f"unknown settings {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def lr_schedule(cfg: GateTrainConfig) -> Callable:
  """Linear warm-up, plateau, linear decay; never below min_lr_frac * lr."""
  warm = max(1, int(round(cfg.warmup_frac * cfg.steps)))
  decay = max(1, int(round(cfg.decay_frac * cfg.steps)))

  def f(step):
    step = jnp.asarray(step, jnp.float32)
    up = (step + 1) / warm
    down = (cfg.steps - step) / decay
    return cfg.lr * jnp.maximum(cfg.min_lr_frac, jnp.minimum(1.0, jnp.minimum(up, down)))
  return f


def make_optimizer(cfg: GateTrainConfig) -> optax.GradientTransformation:
  return optax.adamw(lr_schedule(cfg), b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


# -- the two-way forward and the loss ---------------------------------------------

# --student: which hidden states the student's full-attention branch reads.
STUDENTS = {
    "deployed": "both branches from the student's own hidden states (the paper's equations "
                "and the model as served)",
    "official": "full branch = the teacher's full attention of that layer (from the teacher's "
                "hidden states, no gradient), streaming branch from the student's (the "
                "official code's two-way forward)",
}


@jax.custom_vjp
def clamp01(x: jax.Array) -> jax.Array:
  """clip(x, 0, 1) whose gradient passes through on the closed interval [0, 1].

  This is torch's `clamp` backward, which the official code relies on: a gate
  sitting exactly at 0 or 1 (where every step leaves the clipped ones) gets its
  whole gradient, where `jnp.clip` would pass half of it.
  """
  return jnp.clip(x, 0.0, 1.0)


def _clamp01_fwd(x):
  return jnp.clip(x, 0.0, 1.0), x


def _clamp01_bwd(x, g):
  return (jnp.where((x >= 0.0) & (x <= 1.0), g, jnp.zeros_like(g)),)


clamp01.defvjp(_clamp01_fwd, _clamp01_bwd)


def l1_mean(x: jax.Array) -> jax.Array:
  """mean(|x|) with d|x|/dx = sign(x), i.e. 0 at x = 0 (torch's abs; jnp.abs gives 1)."""
  return jnp.mean(x * jax.lax.stop_gradient(jnp.sign(x)))


def student_teacher_hidden(gates: jax.Array, params, config: ModelConfig, tokens: jax.Array,
                           lengths: jax.Array, sink: int, recent: int,
                           student: str = "deployed", remat: bool = True,
                           backend: str = "xla", mesh: Mesh | None = None
                           ) -> tuple[jax.Array, jax.Array]:
  """Final hidden states (after the last RMSNorm) of teacher and student.

  gates [L, Hkv] (already clamped: the caller decides the clamp's gradient);
  params: the plain dict (per-layer list or `llama.stack_layers`); tokens [B, T];
  lengths [B]. Returns (teacher [B, T, E] with no gradient, student [B, T, E]).
  The student's layer output before o_proj is, per KV head and its G query heads,
  `a * full + (1 - a) * streaming`, with `full` as `student` says (see STUDENTS).
  """
  model = Llama(config, params, gates=gates)
  return two_way_hidden(model, tokens, lengths, sink, recent, student, remat, backend,
                        clamp=lambda a: a, mesh=mesh)


def two_way_hidden(model: Llama, tokens: jax.Array, lengths: jax.Array, sink: int, recent: int,
                   student: str = "deployed", remat: bool = True, backend: str = "xla",
                   clamp: Callable = None, mesh: Mesh | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """`student_teacher_hidden` on an NNX model built with `Gate`s: each layer's gate
  [Hkv] is read from its `Gate` and passed through `clamp` (default `clamp01`).

  mesh: the mesh the step runs on (inside its jit); with sequence > 1 attention runs
  sequence-sharded (`sequence_parallel`), elsewhere GSPMD partitions the jnp ops.
  """
  if student not in STUDENTS:
    raise TrainError(f"--student must be one of {sorted(STUDENTS)}, got {student!r}")
  check_backend(backend, mesh)
  clamp = clamp01 if clamp is None else clamp
  # A kernel backend's whole-sequence ops (TPU splash) when it has them; the XLA
  # reference computes the logits once for both masks (gated_attention) instead.
  ops = {} if backend == "xla" else dispatch.backend_ops(backend)
  fc, fs = ops.get("dense_causal"), ops.get("dense_streaming")
  # A backend may take only some inputs (GPU: cuDNN's bf16 / fp16): the others keep XLA.
  takes = ops.get("dense_supports", lambda q: True)
  t = tokens.shape[1]
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
  emb = model.embed(tokens)
  seq_mesh = mesh if seqp.sequence_size(mesh) > 1 else None
  if mesh is not None and mesh.size > 1:  # the residual stream: rows as the batch, split T
    emb = jax.lax.with_sharding_constraint(emb, NamedSharding(mesh, sharding.spec_for(
        ("batch", "length", None), emb.shape, mesh, "training", notes=[])))

  def full(q, k, v):
    if seq_mesh is not None:
      return seqp.causal_attention(q, k, v, lengths, mesh=seq_mesh)
    return fc(q, k, v, lengths) if fc and takes(q) else dense_attention(q, k, v, lengths)

  def stream(q, k, v):
    if seq_mesh is not None:
      return seqp.streaming_attention(q, k, v, lengths, sink, recent, mesh=seq_mesh)
    if fs and takes(q):
      return fs(q, k, v, lengths, sink, recent)
    return dense_attention(q, k, v, lengths, np.ones((q.shape[2],), bool), sink, recent)

  def mix(a, f, s):  # a [Hkv]; f, s [B, T, Hkv, G, D]
    ct = jnp.promote_types(f.dtype, jnp.float32)
    a = a.astype(ct)[None, None, :, None, None]
    return (a * f.astype(ct) + (1 - a) * s.astype(ct)).astype(f.dtype)

  def teacher_layer(blk, x, i, _):
    q, k, v = blk.attn.qkv(blk.norm_attn(x), pos)
    o = full(q, k, v)
    return blk.finish(x, o), (o if student == "official" else None)

  # The teacher never depends on the gates; computing it first (no remat, no
  # backward) keeps its per-layer attention outputs for the official student.
  xt, t_out = model.run_layers(teacher_layer, emb, None, remat=False)
  teacher = jax.lax.stop_gradient(model.final(xt))
  t_out = jax.lax.stop_gradient(t_out)  # [L, B, T, Hkv, G, D]

  def student_layer(blk, x, i, o_teacher):
    q, k, v = blk.attn.qkv(blk.norm_attn(x), pos)
    a = clamp(blk.attn.gate[...])
    if student == "official":
      o = mix(a, o_teacher, stream(q, k, v))
    elif fc and takes(q):  # kernel backends: two masked passes, mixed here (a backend
      # without its own streaming op takes the blocked XLA one, O(T x (sink + recent)))
      o = mix(a, full(q, k, v), stream(q, k, v))
    elif seq_mesh is not None:
      o = seqp.gated_attention(q, k, v, a, lengths, sink, recent, mesh=seq_mesh)
    else:
      o = gated_attention(q, k, v, a, lengths, sink, recent)
    return blk.finish(x, o), None

  xs, _ = model.run_layers(student_layer, emb, t_out if student == "official" else None,
                           remat=remat)
  return teacher, model.final(xs)


def gate_loss(gates: jax.Array, params, config: ModelConfig, tokens: jax.Array,
              lengths: jax.Array, loss_mask: jax.Array, *, sink: int, recent: int,
              reg: float, student: str = "deployed", remat: bool = True,
              backend: str = "xla", mesh: Mesh | None = None):
  """The gate-training loss; `jax.grad` of it w.r.t. `gates` is the training gradient.

  gates [L, Hkv] (raw: clamped here with `clamp01`); params: frozen weights
  (per-layer list or `llama.stack_layers`); tokens [B, T] int32; lengths [B];
  loss_mask [B, T] bool (the question/answer tail).
    distill = sum over masked (b, t) of mean_e (student - teacher)^2 / #masked
    reg     = mean |gates|   (gradient sign(gate), 0 at 0)
    total   = distill + reg_weight * reg
  Returns (total, {"distill", "reg", "total"}).
  """
  return model_gate_loss(Llama(config, params, gates=gates), tokens, lengths, loss_mask,
                         sink=sink, recent=recent, reg=reg, student=student, remat=remat,
                         backend=backend, mesh=mesh)


def model_gate_loss(model: Llama, tokens: jax.Array, lengths: jax.Array, loss_mask: jax.Array,
                    *, sink: int, recent: int, reg: float, student: str = "deployed",
                    remat: bool = True, backend: str = "xla", mesh: Mesh | None = None):
  """`gate_loss` on an NNX model built with `Gate`s (raw values, clamped here): what
  training differentiates with respect to `nnx.state(model, Gate)`."""
  gates = model.gate_values()
  if gates is None:
    raise TrainError("the model has no gates; build it with Llama(config, params, gates=...)")
  teacher, stud = two_way_hidden(model, tokens, lengths, sink, recent, student, remat, backend,
                                 mesh=mesh)
  ct = jnp.promote_types(stud.dtype, jnp.float32)
  sq = jnp.mean(jnp.square(stud.astype(ct) - teacher.astype(ct)), axis=-1)  # [B, T]
  m = loss_mask.astype(ct)
  d = jnp.sum(sq * m) / jnp.maximum(jnp.sum(m), 1.0)
  r = l1_mean(gates)
  total = d + reg * r
  return total, {"distill": d, "reg": r, "total": total}


def gate_state(gates: jax.Array) -> dict:
  """[L, Hkv] -> `nnx.state(model, Gate)` of the stacked training model, as a plain dict
  (train_gates checks that the model's tree is this one)."""
  return {"layers": {"attn": {"gate": gates}}}


@dataclasses.dataclass
class TrainState:
  gate_state: dict  # nnx.state(model, Gate) as a plain dict (`gate_state`): [L, Hkv] fp32
  opt_state: object  # optax state of gate_state
  step: int

  @property
  def gates(self) -> jax.Array:
    """[L, Hkv]."""
    return self.gate_state["layers"]["attn"]["gate"]


def _state_tree(s: TrainState) -> dict:
  return {"gates": s.gate_state, "opt_state": s.opt_state, "step": jnp.asarray(s.step, jnp.int32)}


def init_state(config: ModelConfig, cfg: GateTrainConfig, opt) -> TrainState:
  gs = gate_state(jnp.full((config.num_layers, config.num_kv_heads), cfg.init_gate, jnp.float32))
  return TrainState(gs, opt.init(gs), 0)


# -- sharding ----------------------------------------------------------------------

def make_mesh(spec: int | str | dict | None = None, devices=None) -> Mesh:
  """A training mesh with duojax.sharding's four axes (data, fsdp, sequence, tensor).

  spec: None (every device on `data`), an int N (`data=N`), or a spec such as
  "data=2,fsdp=2,tensor=2" / a dict of sizes. The sizes must multiply to a divisor of the
  device count; the mesh takes the first that many devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if spec is None:
    sizes = {"data": n}
  elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
    sizes = {"data": int(spec)}
  else:
    try:
      sizes = sharding.parse_mesh(spec)
    except sharding.ShardingError as e:
      raise TrainError(str(e)) from e
  if any(int(v) < 1 for v in sizes.values()):
    raise TrainError(f"--mesh sizes must be >= 1, got {sizes}")
  total = int(np.prod([int(v) for v in sizes.values()]))
  if total > n or n % total:
    ok = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
    shown = ",".join(f"{k}={v}" for k, v in sizes.items() if v != 1) or "data=1"
    raise TrainError(f"--mesh {shown} uses {total} devices, which does not divide the {n} "
                     f"available devices; the sizes must multiply to one of {ok} (e.g. "
                     f"data={n})")
  return sharding.make_mesh(dict(sizes), devices[:total])


def _sizes(mesh: Mesh) -> dict[str, int]:
  """Axis sizes of any mesh (also one built elsewhere with fewer axes, e.g. ("data",))."""
  unknown = set(mesh.shape) - set(sharding.MESH_AXES)
  if unknown:
    raise TrainError(f"the training mesh has axes {sorted(unknown)} that the sharding rules do "
                     f"not know; build it with duo.make_mesh (axes {', '.join(sharding.MESH_AXES)})")
  return sharding.mesh_sizes(mesh)


def check_backend(backend: str, mesh: Mesh | None) -> None:
  """A kernel backend's pallas_call inside a GSPMD-partitioned jit is rejected by Mosaic
  (it needs shard_map, not wired for training yet): say so before compiling."""
  if mesh is not None and mesh.size > 1 and backend not in ("xla", "auto"):
    raise TrainError(f"--backend {backend} does not run gate training on a mesh of {mesh.size} "
                     "devices yet (its kernels are not wired under shard_map); use --backend "
                     "xla with --mesh, or one device")


def frozen_shardings(state: dict, mesh: Mesh, config: ModelConfig | None = None):
  """NamedShardings of the frozen weights (the stacked model's plain state dict, layers
  [L, ...]) by the training rules; gates and optimizer state stay replicated."""
  try:
    return sharding.param_shardings(state, mesh, "training", config=config)
  except sharding.ShardingError as e:
    raise TrainError(str(e)) from e


def restore_shardings(config: ModelConfig, mesh: Mesh):
  """Where a checkpoint restore should put the plain params (per-layer list) for training
  on `mesh`: the training rules' shardings (None on one device: restore as usual). With
  them no device holds the whole model; `build_step` stacks the layers on the mesh."""
  if mesh.size == 1:
    return None
  try:
    return sharding.config_param_shardings(config, mesh, "training")
  except sharding.ShardingError as e:
    raise TrainError(str(e)) from e


def _stacked(params, dtype, mesh: Mesh):
  """Per-layer params -> cast to dtype and stacked [L, ...]. Params already spread over
  `mesh` (restored into `restore_shardings`) are stacked by one jit whose outputs carry
  the training shardings, so that no device ever holds the whole model either; others
  (host arrays, one device) are stacked where they are and placed afterwards."""
  fn = lambda p: llama.stack_layers(jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), p))
  leaves = jax.tree_util.tree_leaves(params)
  if mesh.size == 1 or not all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
                               and x.sharding.mesh == mesh for x in leaves):
    return fn(params)
  out = sharding.param_shardings(jax.eval_shape(fn, params), mesh, "training")
  return jax.jit(fn, out_shardings=out)(params)


def batch_shardings(mesh: Mesh, shape) -> tuple[NamedSharding, NamedSharding]:
  """(tokens and loss mask [B, T], lengths [B]): batch over data (and fsdp where it
  divides), tokens over sequence."""
  spec = sharding.spec_for(("batch", "length"), shape, mesh, "training", notes=[])
  return NamedSharding(mesh, spec), NamedSharding(mesh, P(spec[0]))


def global_put(tree, sharding):
  """`jax.device_put` that also works on a mesh spanning several processes (multi-host).

  device_put refuses shardings with devices of other processes; there every process holds
  the whole host value (the weights it loaded, the batch it drew with the shared seed), so
  each builds its own shards of the global array from it.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x, sh):
    if isinstance(x, jax.Array) and x.sharding == sh:  # already there (restored onto the mesh)
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])

  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x: one(x, sharding), tree)
  return jax.tree_util.tree_map(one, tree, sharding)


# -- data ---------------------------------------------------------------------------

def make_batch(hay, tokenizer, data_cfg, cfg: GateTrainConfig, step: int):
  """The samples of `step` (pure in (seed, step)), right-padded to a bucket.

  Returns tokens [B, T] int32, lengths [B] int32, loss_mask [B, T] bool.
  """
  from duojax.data.passkey import make_sample
  samples = [make_sample(hay, tokenizer, data_cfg, step * cfg.batch_size + i)
             for i in range(cfg.batch_size)]
  t = round_up(max(len(s.input_ids) for s in samples), cfg.pad_multiple)
  tokens = np.zeros((cfg.batch_size, t), np.int32)
  mask = np.zeros((cfg.batch_size, t), bool)
  for i, s in enumerate(samples):
    tokens[i, :len(s.input_ids)] = s.input_ids
    mask[i, :len(s.input_ids)] = s.loss_mask
  lengths = np.array([len(s.input_ids) for s in samples], np.int32)
  return tokens, lengths, mask


# -- checkpoints ----------------------------------------------------------------------

def _manager(directory: Path, cfg: GateTrainConfig):
  import orbax.checkpoint as ocp
  # The handler named up front (not inferred from the first save) lets a fresh manager read
  # a step's metadata, which restore_state checks against its target.
  return ocp.CheckpointManager(
      directory.absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=1),
      item_handlers=ocp.StandardCheckpointHandler())


def restore_state(directory: Path, template: TrainState, mesh: Mesh) -> TrainState:
  import orbax.checkpoint as ocp
  mgr = _manager(directory, None)
  step = mgr.latest_step()
  if step is None:
    raise TrainError(f"--resume: no checkpoint in {directory}; drop --resume to start fresh")
  repl = NamedSharding(mesh, P())
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=repl),
      _state_tree(template))
  try:
    # orbax fills a target of another shape without complaint: a resume with another model
    # must fail here, not train on.
    stored = mgr.item_metadata(step)
    stored = getattr(stored, "tree", stored)
    if stored is not None:
      have = [tuple(m.shape) for m in jax.tree_util.tree_leaves(stored) if hasattr(m, "shape")]
      want = [tuple(a.shape) for a in jax.tree_util.tree_leaves(abstract)]
      if have != want:
        raise TrainError(f"--resume: the checkpoint in {directory} holds state of shapes "
                         f"{have[:2]}..., this model and settings need {want[:2]}...; resume with "
                         "the same model and settings, or use a new --out")
    tree = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  except TrainError:
    raise
  except Exception as e:
    raise TrainError(f"--resume: the checkpoint at step {step} in {directory} cannot be read "
                     f"({type(e).__name__}); delete {directory / str(step)} to fall back to an "
                     "earlier one, or drop --resume to start fresh") from e
  finally:
    mgr.close()
  return TrainState(tree["gates"], tree["opt_state"], int(tree["step"]))


# -- one step on a mesh -------------------------------------------------------------------

@dataclasses.dataclass
class GateStep:
  """One compiled gate-training step on a mesh, with the frozen weights placed there.

  step(gates, opt_state, tokens, lengths, loss_mask) -> (gates, opt_state, metrics,
  grads): gates and opt_state as `TrainState.gate_state` / `.opt_state`, replicated;
  host arrays tokens / loss_mask [B, T], lengths [B] are placed (and T padded to a
  multiple of the sequence axis) here. grads: d loss / d gates, before the optimizer.
  """
  mesh: Mesh
  graphdef: object
  frozen: dict  # the stacked model's frozen state, sharded by the training rules
  fn: Callable
  opt: optax.GradientTransformation

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def place_state(self, state: "TrainState") -> tuple:
    return global_put(state.gate_state, self.replicated), global_put(state.opt_state,
                                                                     self.replicated)

  def place_batch(self, tokens, lengths, loss_mask) -> tuple:
    n = _sizes(self.mesh)["sequence"]
    t = np.shape(tokens)[1]
    if t % n:  # padding past every row's length changes nothing (masked keys, no loss)
      pad = ((0, 0), (0, round_up(t, n) - t))
      tokens, loss_mask = np.pad(np.asarray(tokens), pad), np.pad(np.asarray(loss_mask), pad)
    rows, ones = batch_shardings(self.mesh, np.shape(tokens))
    return (global_put(np.asarray(tokens, np.int32), rows),
            global_put(np.asarray(lengths, np.int32), ones),
            global_put(np.asarray(loss_mask, bool), rows))

  def __call__(self, gates, opt_state, tokens, lengths, loss_mask):
    tokens, lengths, loss_mask = self.place_batch(tokens, lengths, loss_mask)
    return self.fn(gates, opt_state, self.frozen, tokens, lengths, loss_mask)


def build_step(params, config: ModelConfig, cfg: GateTrainConfig, mesh: Mesh | None = None,
               backend: str = "xla") -> tuple[GateStep, "TrainState"]:
  """The frozen model split, placed on `mesh` by the training rules, and its step jitted.

  params: the plain params dict (per-layer list; any dtype: cast to cfg.dtype), on the host,
  one device, or already on `mesh` (restored into `restore_shardings(config, mesh)`: then
  no device holds the whole model at any point). Returns (step, the initial TrainState).
  """
  mesh = make_mesh(1) if mesh is None else mesh
  sizes = _sizes(mesh)
  check_backend(backend, mesh)
  if cfg.batch_size % sizes["data"]:
    ok = ", ".join(str(d) for d in range(1, cfg.batch_size + 1) if cfg.batch_size % d == 0)
    raise TrainError(f"--batch-size {cfg.batch_size} is not divisible by the data axis "
                     f"({sizes['data']}); data sizes that divide it: {ok} (or raise "
                     "--batch-size)")
  dtype = jnp.dtype(cfg.dtype)
  opt = make_optimizer(cfg)
  state = init_state(config, cfg, opt)
  # The frozen model with stacked layers (one scanned Block) and Gate variables: split
  # once; the step differentiates the Gate state and merges both inside its trace.
  params = _stacked(params, dtype, mesh)
  graphdef, gate_vars, frozen = nnx.split(Llama(config, params, gates=state.gates), Gate, ...)
  del params
  if jax.tree_util.tree_structure(nnx.to_pure_dict(gate_vars)) != jax.tree_util.tree_structure(
      state.gate_state):
    raise TrainError("the model's Gate state does not have the layout of duo.gate_state")
  frozen = nnx.to_pure_dict(frozen)
  frozen = global_put(frozen, frozen_shardings(frozen, mesh, config))
  on_mesh = mesh if mesh.size > 1 else None  # one device: today's program exactly

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step_fn(gates, opt_state, frozen, tokens, lengths, loss_mask):
    def loss_fn(gs):
      return model_gate_loss(nnx.merge(graphdef, gs, frozen), tokens, lengths, loss_mask,
                             sink=cfg.sink, recent=cfg.recent, reg=cfg.reg, student=cfg.student,
                             remat=cfg.remat, backend=backend, mesh=on_mesh)
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(gates)
    aux = {"distill": aux["distill"], "reg": aux["reg"]}
    updates, opt_state = opt.update(g, opt_state, gates)
    gates = jax.tree_util.tree_map(lambda x: jnp.clip(x, 0.0, 1.0),
                                   optax.apply_updates(gates, updates))
    return gates, opt_state, {"loss": loss, **aux}, g

  return GateStep(mesh, graphdef, frozen, step_fn, opt), state


# -- the loop ----------------------------------------------------------------------------

def train_gates(params, config: ModelConfig, tokenizer, hay, cfg: GateTrainConfig,
                out: Path, mesh: Mesh | str | int | None = None, resume: bool = False,
                backend: str = "xla", stop_after: int | None = None,
                progress: bool = True, log: Callable[[dict], None] | None = None,
                stop: threading.Event | None = None):
  """Trains gates; checkpoints into out/checkpoints, logs into out/log.jsonl.

  params: frozen weights (any dtype; cast to cfg.dtype). mesh: a Mesh (make_mesh), a
  spec for make_mesh ("data=2,fsdp=2,tensor=2", or an int for data), or None (one
  device). stop_after: return
  after that many steps in total (tests use it to simulate a kill). stop: once set (a Ctrl-C
  handler sets it), training ends after the step in flight and saves that step first, so an
  interrupt never lands inside orbax's writer threads and no finished step is lost.
  Returns the final TrainState.
  """
  from duojax.data.passkey import MultiPasskeyConfig
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  mesh = mesh if isinstance(mesh, Mesh) else make_mesh(1 if mesh is None else mesh)
  if len(hay) < cfg.max_len:
    raise TrainError(f"the haystack has {len(hay)} tokens, fewer than --max-len {cfg.max_len}; "
                     "give a longer haystack or lower --max-len")
  if cfg.max_len > config.max_position_embeddings:
    raise TrainError(f"--max-len {cfg.max_len} exceeds the model's context "
                     f"{config.max_position_embeddings}")
  data_cfg = MultiPasskeyConfig(
      num_passkeys=cfg.num_passkeys, passkey_words=cfg.passkey_words, min_len=cfg.min_len,
      max_len=cfg.max_len, len_intervals=cfg.len_intervals, seed=cfg.seed)
  step_fn, state = build_step(params, config, cfg, mesh, backend)
  del params
  ckpt_dir = out / "checkpoints"
  if resume:
    state = restore_state(ckpt_dir, state, mesh)
  elif ckpt_dir.exists() and any(ckpt_dir.iterdir()):
    raise TrainError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue or use a "
                     "new --out")
  repl = step_fn.replicated

  gates, opt_state = step_fn.place_state(state)
  mgr = _manager(ckpt_dir, cfg)
  # one writer: every process of a multi-host run computes the same record
  log_f = open(out / "log.jsonl", "a") if jax.process_index() == 0 else None
  end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=state.step, desc="gates", file=sys.stderr)
  t0 = time.perf_counter()
  step = state.step
  try:
    while step < end and not (stop is not None and stop.is_set()):
      tokens, lengths, loss_mask = make_batch(hay, tokenizer, data_cfg, cfg, step)
      gates, opt_state, m, _ = step_fn(gates, opt_state, tokens, lengths, loss_mask)
      step += 1
      rec = {"step": step, **{k: float(v) for k, v in m.items()},
             "lr": float(lr_schedule(cfg)(step - 1)), "tokens": int(tokens.shape[1]),
             "seconds": round(time.perf_counter() - t0, 3)}
      if log_f:
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()
      if log:
        log(rec)
      if bar:
        bar.set_postfix(loss=f"{rec['loss']:.4f}", distill=f"{rec['distill']:.4f}",
                        reg=f"{rec['reg']:.3f}")
        bar.update(1)
      stopping = stop is not None and stop.is_set()
      if step % cfg.save_every == 0 or step == cfg.steps or stopping:
        import orbax.checkpoint as ocp
        tree = _state_tree(TrainState(gates, opt_state, step))
        # a global array, as the gates are: a multi-host save refuses process-local ones
        tree["step"] = global_put(np.asarray(step, np.int32), repl)
        mgr.save(step, args=ocp.args.StandardSave(tree))
  finally:
    mgr.wait_until_finished()
    mgr.close()
    if log_f:
      log_f.close()
    if bar:
      bar.close()
  return TrainState(gates, opt_state, step)


def plot_gates(gates: np.ndarray, path: Path, title: str = "DuoAttention gates") -> None:
  """A layers x KV heads heatmap of the gate values."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  g = np.asarray(gates)
  fig, ax = plt.subplots(figsize=(max(3.6, 1.6 + 0.45 * g.shape[1]), 1.2 + 0.16 * g.shape[0]))
  im = ax.imshow(g, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
  ax.set_xlabel("KV head")
  ax.set_ylabel("layer")
  ax.set_xticks(range(g.shape[1]))
  ax.set_title("\n".join(textwrap.wrap(title, 28)), fontsize=8)
  fig.colorbar(im, ax=ax, fraction=0.08, label="gate (1 = retrieval)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
