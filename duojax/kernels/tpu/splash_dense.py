"""Whole-sequence attention on TPU through JAX's splash attention (forward and backward).

Ops (shapes as `reference.dense_attention`):
  dense_causal(q, k, v, lengths)                   every head causal
  dense_streaming(q, k, v, lengths, sink, recent)  every head: j <= t and (j < sink or t - j < recent)
  q [B, T, Hkv, G, D]; k, v [B, T, Hkv, D]; lengths [B] (keys at positions >= length are padding)
  -> [B, T, Hkv, G, D] in q's dtype.

Gate training mixes the two (`alpha * causal + (1 - alpha) * streaming` per KV head), so both
need gradients: splash carries its own custom_vjp (dq and dkv Pallas kernels), and the
padding / scale handling around it is plain jnp, differentiated by JAX.

How it maps onto splash:
- splash takes one sequence [H, T, D]; we vmap over the batch. GQA is native (q heads
  [Hkv * G] kv-major, k/v [Hkv]), so no key is repeated.
- The mask is static (one per sequence length T padded to a multiple of 128), the same for
  every head: `CausalMask`, or `SinkWindowMask` below, a computable mask evaluated in-kernel
  from the q / kv indices. Splash turns it into a block table at trace time and never visits
  a (q block, kv block) pair that the mask leaves empty: for a streaming head, only the
  diagonal band of width `recent` and the first column of blocks (the sink) are computed.
- Per-row lengths are segment ids: every query is segment 1, keys at j < length segment 1
  and padding keys segment 2, so padding keys are never seen and padding queries see the
  same keys as in the reference (which masks keys only).
- A query that sees no key at all (length 0, or sink 0 with its window all padding) gets
  splash's arbitrary value; we zero those rows as the reference does.
- splash does not scale logits: q is multiplied by D**-0.5 first (in q's dtype).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

LANES = 128  # splash needs block_kv (and so the padded length) to be a multiple of this

# A mask splash can evaluate in-kernel (no mask blocks in HBM) subclasses this private
# base; it has kept its interface from jax 0.4.3x through 0.11. Without it we fall back to
# the public `Mask`, whose partial blocks splash then loads from memory.
_MaskBase = getattr(sm, "_ComputableMask", None)


def _sink_window(q_ids, kv_ids, sink: int, recent: int):
  """The streaming mask on index arrays (numpy at trace time, jnp inside the kernel)."""
  d = q_ids - kv_ids
  return (d >= 0) & ((kv_ids < sink) | (d < recent))


if _MaskBase is not None:

  class SinkWindowMask(_MaskBase):
    """Streaming (sink + recent window, causal) mask, computed inside the kernel."""

    def __init__(self, shape: tuple[int, int], sink: int, recent: int):
      self.sink, self.recent = int(sink), int(recent)
      super().__init__(shape=shape, mask_function=functools.partial(
          _sink_window, sink=self.sink, recent=self.recent))

    def __eq__(self, other):
      return (isinstance(other, SinkWindowMask) and self.shape == other.shape
              and (self.sink, self.recent) == (other.sink, other.recent))

    def __hash__(self):
      return hash((SinkWindowMask, self.shape, self.sink, self.recent))

else:  # pragma: no cover - only on a JAX without computable masks

  class SinkWindowMask(sm.Mask):
    """Streaming mask evaluated in numpy; splash stores its partial blocks."""

    def __init__(self, shape: tuple[int, int], sink: int, recent: int):
      self._shape, self.sink, self.recent = tuple(shape), int(sink), int(recent)

    @property
    def shape(self):
      return self._shape

    def __getitem__(self, idx):
      qs, ks = idx
      rows = np.arange(*qs.indices(self._shape[0]))[:, None]
      cols = np.arange(*ks.indices(self._shape[1]))[None, :]
      return _sink_window(rows, cols, self.sink, self.recent)

    def __eq__(self, other):
      return (isinstance(other, SinkWindowMask) and self.shape == other.shape
              and (self.sink, self.recent) == (other.sink, other.recent))

    def __hash__(self):
      return hash((SinkWindowMask, self.shape, self.sink, self.recent))


def default_block(padded_len: int) -> int:
  """Largest of 512 / 256 / 128 dividing the padded length (512 is MaxText's default)."""
  for b in (512, 256, LANES):
    if padded_len % b == 0:
      return b
  raise ValueError(f"padded length {padded_len} is not a multiple of {LANES}")


@functools.lru_cache(maxsize=64)
def make_kernel(kind: str, padded_len: int, num_heads: int, sink: int = 0, recent: int = 0,
                block: int | None = None, interpret: bool = False):
  """A splash MHA kernel for one (mask, length, heads) setting; cached, since turning the
  mask into block tables walks every block in numpy."""
  block = block or default_block(padded_len)
  if padded_len % block or block % LANES:
    raise ValueError(f"block {block} must be a multiple of {LANES} dividing {padded_len}")
  shape = (padded_len, padded_len)
  head = sm.CausalMask(shape) if kind == "causal" else SinkWindowMask(shape, sink, recent)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():  # mask tables are constants, even under a trace
    return sk.make_splash_mha(sm.MultiHeadMask([head] * num_heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)


def _has_key(t: int, lengths: jax.Array, sink: int | None, recent: int | None) -> jax.Array:
  """[B, T]: does query t see at least one key (reference rows without one are zero)."""
  lengths = lengths.astype(jnp.int32)
  pos = jnp.arange(t, dtype=jnp.int32)[None, :]
  any_key = lengths[:, None] >= 1  # key 0 is valid and causal for every t >= 0
  if sink is None:  # causal
    return jnp.broadcast_to(any_key, (lengths.shape[0], t))
  if sink >= 1:
    return jnp.broadcast_to(any_key, (lengths.shape[0], t))
  newest = jnp.minimum(pos, lengths[:, None] - 1)  # the latest key a query can see
  return any_key & (pos - newest < recent)


def _with_precision(fn, precision: str):
  """fn with its forward and its backward traced under one default matmul precision.

  splash's dots take the global `jax_default_matmul_precision`, and Mosaic rejects bf16
  operands at "highest" ("Bad lhs type"); a backward is traced when the gradient is taken,
  outside any `with` around the call, hence the custom_vjp holding the context for both.
  """
  @jax.custom_vjp
  def run(*args):
    with jax.default_matmul_precision(precision):
      return fn(*args)

  def fwd(*args):
    with jax.default_matmul_precision(precision):
      return jax.vjp(fn, *args)

  def bwd(vjp, g):
    with jax.default_matmul_precision(precision):
      return vjp(g)

  run.defvjp(fwd, bwd)
  return run


def _splash_dense(kind, q, k, v, lengths, sink=None, recent=None, *, interpret=False,
                  block=None):
  b, t, hkv, g, d = q.shape
  tp = -(-t // LANES) * LANES
  scale = jnp.asarray(d ** -0.5, q.dtype)
  pad = [(0, 0), (0, 0), (0, tp - t), (0, 0)]
  qh = jnp.pad((q * scale).transpose(0, 2, 3, 1, 4).reshape(b, hkv * g, t, d), pad)
  kh = jnp.pad(k.transpose(0, 2, 1, 3), pad)
  vh = jnp.pad(v.transpose(0, 2, 1, 3), pad)
  j = jnp.arange(tp, dtype=jnp.int32)[None, :]
  kv_seg = jnp.where((j < lengths[:, None].astype(jnp.int32)) & (j < t), 1, 2).astype(jnp.int32)
  seg = sk.SegmentIds(q=jnp.ones((b, tp), jnp.int32), kv=kv_seg)
  kernel = make_kernel(kind, tp, hkv * g, sink or 0, recent or 0, block, interpret)
  precision = "float32" if qh.dtype == jnp.float32 else "default"
  out = _with_precision(jax.vmap(kernel), precision)(qh, kh, vh, seg)  # [B, Hq, Tp, D]
  out = out[:, :, :t].reshape(b, hkv, g, t, d).transpose(0, 3, 1, 2, 4)
  has = _has_key(t, lengths, sink, recent)
  return jnp.where(has[:, :, None, None, None], out, 0).astype(q.dtype)


def dense_causal(q, k, v, lengths, *, interpret: bool = False, block: int | None = None):
  """Causal attention over whole sequences. q [B, T, Hkv, G, D]; k, v [B, T, Hkv, D];
  lengths [B]. Differentiable (splash's backward kernels)."""
  return _splash_dense("causal", q, k, v, lengths, interpret=interpret, block=block)


def dense_streaming(q, k, v, lengths, sink: int, recent: int, *, interpret: bool = False,
                    block: int | None = None):
  """Streaming attention (sink + recent window) over whole sequences; shapes as
  `dense_causal`. sink and recent are static ints. Differentiable."""
  return _splash_dense("streaming", q, k, v, lengths, int(sink), int(recent),
                       interpret=interpret, block=block)
