"""Context-parallel attention: the retrieval heads' cache split over the `sequence` axis.

Device i of the `sequence` axis (n devices) holds cache slots [i*S/n, (i+1)*S/n) of
every row, i.e. those positions. A retrieval part whose heads `tensor` does not divide
has its slots split over ("sequence", "tensor") jointly instead (duojax.sharding's
SPILL): device (s, t) holds slice i = s * tensor + t, every device keeps all of that
part's heads and the queries of all of them, and the merge runs over both axes. For a chunk (prefill) or one token (decode) every
device attends its slice and returns partial softmax results

  m   [B, T, H, G]     max visible logit (-inf where the slice shows the query no key)
  l   [B, T, H, G]     sum of exp(logit - m)
  acc [B, T, H, G, D]  sum of exp(logit - m) * v

which are merged exactly across the axes the slots are split over: M = pmax(m), out = psum(acc * e^(m - M)) /
psum(l * e^(m - M)); the split-K merge of a flash-decoding kernel done across chips.
A slice with no visible key has m = -inf and contributes e^(-inf) = 0; giving it any
finite stand-in instead (the 0 a single-device kernel uses to avoid inf - inf) would
let M exceed every real logit and underflow the real terms.

The per-device op is pluggable: `partial_op(q, k, v, q_pos, kv_len) -> Partial` sees
only its slice, with q_pos and kv_len already shifted into slice coordinates (slot j
holds position j; q_pos may be negative: such a query sees no key of the slice), so
a kernel needs no offset argument, only to return its (m, l, acc) instead of
normalising them. The kernel backends do: their `full_chunk_partial` /
`full_decode_partial` ops (the TPU kernels' `return_partial`, whose `_finish` writes
the scratch as it stands; the Triton decode kernel's split-K partials merged in jnp
instead of by `_combine_kernel`; the Triton chunk kernel's unnormalised tile) give
(m, l, acc) in fp32, natural-log units, m = -inf for a row with no key of the slice.
`kernel_partial_op(backend)` picks them, and `ContextParallel(mesh, backend=...)` runs
them per device: inside shard_map each Pallas / Triton call sees plain local arrays,
which is what Mosaic needs (it rejects a pallas_call that GSPMD would partition).

Queries are replicated over `sequence` (each device needs all of them); batch and KV
heads follow `duojax.sharding`'s rules (data, tensor). The streaming heads' sink +
ring are replicated over `sequence` and attended with the single-device reference.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from duojax import cache as kvc
from duojax import kv_quant
from duojax import sharding
from duojax.attention import dispatch, reference

SEQ = "sequence"
Q_AXES = ("batch", "length", "kv_heads", "q_group", "head_dim")
CHUNK_KV_AXES = ("batch", "length", "kv_heads", "head_dim")


class Partial(NamedTuple):
  m: jax.Array  # [B, T, H, G] float32; -inf: no visible key
  l: jax.Array  # [B, T, H, G] float32
  acc: jax.Array  # [B, T, H, G, D] float32


PartialOp = Callable[..., Partial]


# -- the per-device op and the merge ---------------------------------------------------

def partial_chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                            kv_len: jax.Array) -> Partial:
  """The XLA reference per-device op: a chunk over one cache slice, unnormalised.

  q [B, T, H, G, D]; k, v [B, S, H, D] with slot j holding position j; q_pos [B, T]
  and kv_len [B] in the slice's coordinates. Key j is visible iff j <= q_pos and
  j < kv_len.
  """
  k, v = kv_quant.as_dense(k, q.dtype), kv_quant.as_dense(v, q.dtype)  # a quantised slice
  ct = jnp.promote_types(q.dtype, jnp.float32)
  s_len = k.shape[1]
  k_pos = jnp.arange(s_len, dtype=jnp.int32)
  vis = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < kv_len[:, None, None])
  s = jnp.einsum("bthgd,bshd->bthgs", q, k, preferred_element_type=ct) * (q.shape[-1] ** -0.5)
  vis = vis[:, :, None, None, :]  # [B, T, 1, 1, S]
  s = jnp.where(vis, s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  # exp(s - m) with m = -inf would be exp(nan): shift by 0 there, p is 0 anyway
  p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)[..., None]), 0.0)
  acc = jnp.einsum("bthgs,bshd->bthgd", p.astype(v.dtype), v, preferred_element_type=ct)
  return Partial(m.astype(ct), jnp.sum(p, axis=-1), acc)


# The backends whose kernels have partial ops, and which `ContextParallel` accepts.
KERNEL_BACKENDS = ("tpu", "tpu-interpret", "gpu")


def backend_name(backend: str = "xla", interpret: bool = False) -> str:
  """The dispatch name of the per-device backend: `tpu` with interpret=True is
  `tpu-interpret` (the Pallas TPU kernels interpreted on CPU); `auto` is resolved."""
  if backend == "auto":
    backend = dispatch.resolve_backend("auto")
  if interpret:
    if backend not in ("tpu", "tpu-interpret"):
      raise ValueError(f"interpret=True runs the Pallas TPU kernels on CPU; backend "
                       f"{backend!r} has no interpret mode (use backend='tpu')")
    return "tpu-interpret"
  if backend != "xla" and backend not in KERNEL_BACKENDS:
    raise ValueError(f"context-parallel attention runs backend 'xla' or "
                     f"{', '.join(map(repr, KERNEL_BACKENDS))} per device, not {backend!r}")
  return backend


def kernel_partial_op(backend: str = "xla", interpret: bool = False) -> PartialOp:
  """The per-device partial op of `backend`: the XLA reference (`partial_chunk_attention`)
  for xla, else the backend's `full_chunk_partial` for a chunk and `full_decode_partial`
  for one token (T = 1). Raises dispatch.BackendUnavailable (with the fix) when this
  machine cannot run the backend."""
  name = backend_name(backend, interpret)
  if name == "xla":
    return partial_chunk_attention
  ops = dispatch.backend_ops(name)
  chunk = ops.get("full_chunk_partial")
  if chunk is None:
    raise ValueError(f"attention backend {name!r} has no full_chunk_partial op, which "
                     "context-parallel attention runs per device; use backend='xla'")
  decode = ops.get("full_decode_partial", chunk)

  def op(q, k, v, q_pos, kv_len):
    return Partial(*(decode if q.shape[1] == 1 else chunk)(q, k, v, q_pos, kv_len))
  return op


def _rescale(p: Partial, m_all: jax.Array) -> tuple[jax.Array, jax.Array]:
  w = jnp.exp(p.m - jnp.where(jnp.isfinite(m_all), m_all, 0.0))  # exp(-inf) = 0: empty slice
  return p.l * w, p.acc * w[..., None]


def merge_partials(parts: Sequence[Partial]) -> Partial:
  """Exact merge of partials over disjoint key sets (on one device)."""
  m_all = parts[0].m
  for p in parts[1:]:
    m_all = jnp.maximum(m_all, p.m)
  ls, accs = zip(*(_rescale(p, m_all) for p in parts))
  return Partial(m_all, sum(ls), sum(accs))


def merge_across(p: Partial, axis_name: str | tuple[str, ...]) -> Partial:
  """Exact merge of each device's partial over a mesh axis or a tuple of them (inside
  shard_map); () is no merge (the slots are not split)."""
  if axis_name == ():
    return p
  m_all = jax.lax.pmax(p.m, axis_name)
  l, acc = _rescale(p, m_all)
  return Partial(m_all, jax.lax.psum(l, axis_name), jax.lax.psum(acc, axis_name))


def finalize(p: Partial, dtype) -> jax.Array:
  """acc / l; a query that saw no key anywhere gets zeros (padding rows), never NaN."""
  return (p.acc / jnp.where(p.l == 0, 1.0, p.l)[..., None]).astype(dtype)


# -- shard_map plumbing -------------------------------------------------------------------

def _shard_map(f, mesh, in_specs, out_specs):
  # The merge makes outputs invariant over `sequence` by construction; replication
  # checking is off so that kernels (pallas_call) without replication rules run too.
  sm = getattr(jax, "shard_map", None)
  if sm is None:
    from jax.experimental.shard_map import shard_map as sm
  params = inspect.signature(sm).parameters
  flag = {"check_vma": False} if "check_vma" in params else {"check_rep": False}
  return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **flag)


def _check_mesh(mesh: Mesh, k_shape) -> None:
  if SEQ not in mesh.shape:
    raise sharding.ShardingError(
        f"context-parallel attention needs a mesh with a {SEQ!r} axis (axes here: "
        f"{tuple(mesh.shape)}); build it with duojax.sharding.make_mesh")
  n = mesh.shape[SEQ]
  if k_shape[1] % n:
    raise sharding.ShardingError(
        f"KV cache capacity {k_shape[1]} is not a multiple of sequence={n}; allocate "
        f"{-(-k_shape[1] // n) * n} slots (capacity rounded up to a multiple of {n})")


def _specs(mesh, q_shape, k_shape, mode):
  """(q, cache, positions, rows) specs and the mesh axes the cache's slots split over.
  The same rules as sharding.cache_specs, so the shard_map sees the cache as placed."""
  notes: list = []
  cache = sharding.spec_for(sharding.CACHE_AXES, k_shape, mesh, mode, False, "kv cache", notes)
  q = sharding.spec_for(Q_AXES, q_shape, mesh, mode, False, "queries", notes)
  # the chunk is never split over sequence: every slice's owner needs all of it; where
  # the slots took `tensor` (the heads did not divide it) q is replicated over it too
  q = P(q[0], None, *q[2:])
  slots = sharding.dim_axes(cache, 1)
  if "tensor" in slots:  # replicated queries are the design there, not a fallback to note
    notes = [n for n in notes if not n.startswith("queries")]
  sharding._warn(notes)
  row = P(q[0])
  return q, cache, P(q[0], None), row, slots


def _slice_index(mesh, axes):
  """This device's slice of the slots split over `axes` (outermost first)."""
  i = 0
  for a in axes:
    i = i * mesh.shape[a] + jax.lax.axis_index(a)
  return i


def _owned_slots(start, n_valid, t, s_loc, off):
  """Local slot of chunk token i (i < n_valid, position start + i), or s_loc (dropped)
  when another device owns it. Negative slots must not reach `.at[]`: they wrap."""
  pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  own = (jnp.arange(t)[None, :] < n_valid[:, None]) & (pos >= off) & (pos < off + s_loc)
  return jnp.where(own, pos - off, s_loc)


def _write_local(k_cache, v_cache, k, v, start, n_valid, off):
  b, t = k.shape[:2]
  s_loc = k_cache.shape[1]
  slot = _owned_slots(start, n_valid, t, s_loc, off)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  put = lambda buf, new: buf.at[rows, slot].set(new, mode="drop")  # each leaf of a QuantKV too
  kk, vv = (jax.tree_util.tree_map(put, buf, kv_quant.encode_like(buf, x))
            for buf, x in ((k_cache, k), (v_cache, v)))
  return kk, vv


def _attend_local(q, k_cache, v_cache, q_pos, kv_len, partial_op, off, axes):
  s_loc = k_cache.shape[1]
  p = partial_op(q, k_cache, v_cache, q_pos - off, jnp.clip(kv_len - off, 0, s_loc))
  return finalize(merge_across(p, axes), q.dtype)


# -- public ops ---------------------------------------------------------------------------

def chunk_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, q_pos: jax.Array,
                    kv_len: jax.Array, *, mesh: Mesh, partial_op: PartialOp | None = None,
                    mode: str = "inference") -> jax.Array:
  """Retrieval heads: a chunk (or, T = 1, a decode step) over a sequence-sharded cache.

  Same contract as `reference.full_chunk_attention`: q [B, T, H, G, D]; k_cache,
  v_cache [B, S, H, D] (already holding the chunk), sharded over `sequence` on S;
  q_pos [B, T] absolute positions; kv_len [B] valid length after the chunk.
  Returns [B, T, H, G, D].
  """
  _check_mesh(mesh, k_cache.shape)
  qs, cs, ps, rs, axes = _specs(mesh, q.shape, k_cache.shape, mode)
  op = partial_op or partial_chunk_attention

  def f(q, kc, vc, q_pos, kv_len):
    off = _slice_index(mesh, axes) * kc.shape[1]
    return _attend_local(q, kc, vc, q_pos, kv_len, op, off, axes)
  return _shard_map(f, mesh, (qs, cs, cs, ps, rs), qs)(
      q, k_cache, v_cache, q_pos.astype(jnp.int32), kv_len.astype(jnp.int32))


decode_attention = chunk_attention  # decode is the T = 1 case; its own op can be passed in


def write_full(c: kvc.FullLayerCache, k: jax.Array, v: jax.Array, start: jax.Array,
               n_valid: jax.Array, *, mesh: Mesh, mode: str = "inference") -> kvc.FullLayerCache:
  """`cache.write_full` on a sequence-sharded cache: each device writes only the chunk
  tokens whose positions it owns. k, v [B, T, H, D]; start, n_valid [B]."""
  _check_mesh(mesh, c.k.shape)
  qs, cs, _, rs, axes = _specs(mesh, k.shape[:3] + (1,) + k.shape[3:], c.k.shape, mode)
  ks = P(*qs[:3], qs[4])

  def f(kc, vc, k, v, start, n_valid):
    return _write_local(kc, vc, k, v, start, n_valid, _slice_index(mesh, axes) * kc.shape[1])
  kk, vv = _shard_map(f, mesh, (cs, cs, ks, ks, rs, rs), (cs, cs))(
      c.k, c.v, k, v, start.astype(jnp.int32), n_valid.astype(jnp.int32))
  return kvc.FullLayerCache(kk, vv)


def attend_full(c: kvc.FullLayerCache, q: jax.Array, k: jax.Array, v: jax.Array,
                start: jax.Array, n_valid: jax.Array, *, mesh: Mesh,
                partial_op: PartialOp | None = None, mode: str = "inference"):
  """Write the chunk into the sharded cache and attend it, in one shard_map (what the
  dispatcher does per retrieval part). q [B, T, H, G, D]; k, v [B, T, H, D].
  Returns (out [B, T, H, G, D], the updated cache)."""
  _check_mesh(mesh, c.k.shape)
  qs, cs, ps, rs, axes = _specs(mesh, q.shape, c.k.shape, mode)
  ks = P(*qs[:3], qs[4])
  op = partial_op or partial_chunk_attention
  t = q.shape[1]

  def body(q, kc, vc, k, v, start, n_valid):
    off = _slice_index(mesh, axes) * kc.shape[1]
    kc, vc = _write_local(kc, vc, k, v, start, n_valid, off)
    q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    return _attend_local(q, kc, vc, q_pos, start + n_valid, op, off, axes), kc, vc

  out, kk, vv = _shard_map(body, mesh, (qs, cs, cs, ks, ks, rs, rs), (qs, cs, cs))(
      q, c.k, c.v, k, v, start.astype(jnp.int32), n_valid.astype(jnp.int32))
  return out, kvc.FullLayerCache(kk, vv)


def _attend_stream(c: kvc.StreamLayerCache, q, k, v, start, n_valid):
  # Replicated over sequence: every device computes the same small result, no traffic.
  t = q.shape[1]
  q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  slot_pos, slot_valid = kvc.stream_slot_positions(start, c.sink, c.recent)
  if kv_quant.is_quantized(c.k):  # the chunk attended as the cache holds it (cache.attend_stream)
    k, v = kv_quant.quantize(k, c.k.bits), kv_quant.quantize(v, c.v.bits)
  out = reference.streaming_chunk_attention(q, c.k, c.v, slot_pos, slot_valid, k, v, q_pos,
                                            n_valid, c.sink, c.recent)
  return out, kvc.write_stream(c, k, v, start, n_valid)


def attend(layer_cache: kvc.LayerCache, q: jax.Array, k: jax.Array, v: jax.Array,
           start: jax.Array, n_valid: jax.Array, *, mesh: Mesh,
           partial_op: PartialOp | None = None, mode: str = "inference"):
  """`dispatch.attend` with the retrieval parts context-parallel over `sequence`.

  q [B, T, Hkv, G, D], k/v [B, T, Hkv, D] (after RoPE, retrieval heads first);
  start, n_valid [B]. Returns (out [B, T, Hkv, G, D], updated layer cache).
  """
  if isinstance(layer_cache, kvc.FullLayerCache):
    return attend_full(layer_cache, q, k, v, start, n_valid, mesh=mesh, partial_op=partial_op,
                       mode=mode)
  if isinstance(layer_cache, kvc.StreamLayerCache):
    return _attend_stream(layer_cache, q, k, v, start, n_valid)
  if not isinstance(layer_cache, kvc.DuoLayerCache) or not isinstance(layer_cache.stream,
                                                                      kvc.StreamLayerCache):
    raise NotImplementedError(f"context-parallel attention over {type(layer_cache).__name__} "
                              "(e.g. the compensation token) is not built; use mesh sequence=1")
  n_r = layer_cache.n_retrieval
  (qr, qs), (kr, ks), (vr, vs) = (kvc.split_heads(x, n_r, 2) for x in (q, k, v))
  out_r, fc = attend_full(layer_cache.full, qr, kr, vr, start, n_valid, mesh=mesh,
                          partial_op=partial_op, mode=mode)
  out_s, sc = _attend_stream(layer_cache.stream, qs, ks, vs, start, n_valid)
  return jnp.concatenate([out_r, out_s], axis=2), kvc.DuoLayerCache(fc, sc)


# -- the engine's backend on a mesh -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """An attention backend for `dispatch.attend` on a mesh (sequence > 1, a retrieval
  part whose slots split over `tensor`, or any mesh when the per-device op is a kernel).

  Hashable (a Mesh is), so it goes through jit as the static `backend` argument in
  place of a backend name: the model passes it down untouched and `dispatch.attend`
  hands it the whole layer. A static object rather than a registered name because
  the mesh is part of what is compiled; a global "current mesh" would be state.

  backend: the per-device op of the retrieval heads, "xla" (the reference), "tpu" (the
  Pallas TPU kernels; interpret=True runs them on CPU, as does "tpu-interpret") or
  "gpu" (the Triton kernels). An explicit partial_op overrides it.
  """
  mesh: Mesh
  partial_op: PartialOp | None = None  # None: the op of `backend`
  mode: str = "inference"
  backend: str = "xla"
  interpret: bool = False

  def __post_init__(self):
    backend_name(self.backend, self.interpret)  # a bad name fails here, not when traced

  def attend(self, layer_cache, q, k, v, start, n_valid):
    op = self.partial_op or kernel_partial_op(self.backend, self.interpret)
    return attend(layer_cache, q, k, v, start, n_valid, mesh=self.mesh, partial_op=op,
                  mode=self.mode)
