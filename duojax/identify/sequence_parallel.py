"""Gate training's whole-sequence attention with the queries split over `sequence`.

The first form of sequence sharding for a 32K-token training sample: device i of the
mesh's `sequence` axis (n devices) owns query rows [i*T/n, (i+1)*T/n) of every
sample (and so does every activation around attention: the projections, norms and the
MLP run on the device's slice), while K and V are all-gathered over `sequence`
(shard_map's in_specs ask for them whole; GSPMD inserts the gather, and its transpose,
a reduce-scatter of dK/dV, in the backward). Each device then computes its rows as
`duojax.attention.training` does on one device: query blocks under jax.checkpoint, the
hand-written backward of the gated block, so no [T, T] logits ever exist, only
[block, T] per step. Batch and KV heads keep the training rules' axes (data, fsdp,
tensor: duojax/sharding.py).

What this form does not do (yet): trim the key range per block (one device's causal
segments compute ~62.5% of the T x T square; here every block sees all T keys, the
mask hiding the future, so each device computes 1/n of the whole square), nor
balance the causal work over devices (the last slice has the most visible keys), nor
ring-pass K/V instead of gathering them (each device holds [B, T, Hkv, D] per layer,
which a 32K sample affords: 8 MB per layer for 8 KV heads of dim 128 in bf16).
Streaming-only attention (the official student's streaming branch) runs as the gated
block with gate 0, which is the streaming softmax exactly, over the whole key range.

Shapes as in duojax/attention/training.py: q [B, T, Hkv, G, D]; k, v [B, T, Hkv, D];
lengths [B]; gates [Hkv]; out [B, T, Hkv, G, D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from duojax import sharding
from duojax.attention import training

SEQ = "sequence"
Q_AXES = ("batch", "length", "kv_heads", "q_group", "head_dim")


def sequence_size(mesh: Mesh | None) -> int:
  return 1 if mesh is None else int(mesh.shape.get(SEQ, 1))


def _shard_map(f, mesh, in_specs, out_specs):
  sm = getattr(jax, "shard_map", None)
  if sm is None:  # older JAX
    from jax.experimental.shard_map import shard_map as sm
  return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _specs(mesh: Mesh, q_shape):
  """(q, k/v, rows, heads) PartitionSpecs: the training rules for q (length over
  `sequence`), k and v whole over `sequence`."""
  q = sharding.spec_for(Q_AXES, q_shape, mesh, "training", False, "queries", notes=[])
  q = P(*(tuple(q) + (None,) * (len(q_shape) - len(q))))
  if q[1] != SEQ:
    raise sharding.ShardingError(
        f"sequence={sequence_size(mesh)} does not divide the {q_shape[1]} padded tokens of "
        f"this batch; pad samples to a multiple of it (GateTrainConfig.pad_multiple)")
  return q, P(q[0], None, q[2], None), P(q[0]), P(q[2])


def local_block(batch: int, t: int, q_heads: int, t_local: int, block: int | None) -> int:
  """Query rows per step on one device: `training.pick_block` for [batch, t] keys (None
  there, all logits fit: the whole local slice), never more than the slice."""
  if block is None:
    block = training.pick_block(batch, t, q_heads) or t_local
  return int(min(block, t_local))


def _axes(spec) -> set:
  out = set()
  for p in spec:
    out |= set(p) if isinstance(p, tuple) else {p} if p else set()
  return out


def _varying(x, axes):
  """x, typed as differing over `axes` (it does not: every device there has the same). The
  block's custom backward gives each device its own partial dK, dV and d gates; typed
  so, shard_map's transpose sums them over those axes (the gather's transpose)."""
  axes = tuple(sorted(axes))
  if x is None or not axes:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axes, to="varying")
  if hasattr(jax.lax, "pvary"):  # JAX before pcast
    return jax.lax.pvary(x, axes)
  return x  # JAX without varying types: its shard_map sums the cotangents itself


def _local_rows(q, k, v, lengths, a, *, sink, recent, block, specs):
  """This device's query rows [B, Tl, ...] over all T keys (inside shard_map)."""
  qs, ks, _, hs = specs
  k, v = (_varying(x, _axes(qs) - _axes(ks)) for x in (k, v))
  a = _varying(a, _axes(qs) - _axes(hs))
  b, tl, hkv, g, _ = q.shape
  t = k.shape[1]
  off = jax.lax.axis_index(SEQ) * tl  # global position of the slice's first row
  blk = local_block(b, t, hkv * g, tl, block)
  nb = -(-tl // blk)
  qp = training._pad_time(q, nb * blk)  # rows past the slice: computed, then dropped
  k_valid = training._key_valid(jnp.arange(t, dtype=jnp.int32), lengths, t)

  def one(qb, start):
    return training._gated_block(qb, k, v, a, k_valid, start + off, sink, recent)
  return training._map_blocks(one, qp, 0, nb, blk)[:, :tl]


def _attend(q, k, v, lengths, a, sink, recent, mesh, block):
  qs, ks, rs, hs = specs = _specs(mesh, q.shape)
  lengths = lengths.astype(jnp.int32)
  kw = dict(sink=sink, recent=recent, block=block, specs=specs)
  if a is None:
    f = lambda q, k, v, l: _local_rows(q, k, v, l, None, **kw)
    return _shard_map(f, mesh, (qs, ks, ks, rs), qs)(q, k, v, lengths)
  f = lambda q, k, v, l, a: _local_rows(q, k, v, l, a, **kw)
  return _shard_map(f, mesh, (qs, ks, ks, rs, hs), qs)(q, k, v, lengths, a)


def causal_attention(q, k, v, lengths, *, mesh: Mesh, block: int | None = None):
  """`training.dense_attention(q, k, v, lengths)` (all heads causal), rows over `sequence`."""
  return _attend(q, k, v, lengths, None, 0, 0, mesh, block)


def streaming_attention(q, k, v, lengths, sink: int, recent: int, *, mesh: Mesh,
                        block: int | None = None):
  """`training.dense_attention` with every head streaming, rows over `sequence`."""
  zero = jnp.zeros((q.shape[2],), jnp.float32)  # gate 0: the streaming softmax alone
  return _attend(q, k, v, lengths, zero, sink, recent, mesh, block)


def gated_attention(q, k, v, gates, lengths, sink: int, recent: int, *, mesh: Mesh,
                    block: int | None = None):
  """`training.gated_attention` (gates [Hkv], used as given), rows over `sequence`;
  gradients w.r.t. q, k, v and the gates as the one-device function's."""
  return _attend(q, k, v, lengths, gates, sink, recent, mesh, block)
