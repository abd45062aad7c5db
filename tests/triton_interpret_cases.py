"""The Triton kernels of duojax.kernels.gpu run by Triton's CPU interpreter, against the
plain-jnp reference (duojax.attention.reference), plain and quantised caches.

Run as a script in a process of its own (`tests/test_triton_interpret.py` does): the
interpreter is chosen when the kernels are decorated, so TRITON_INTERPRET=1 must be set
before duojax.kernels.gpu.decode is imported, and no other test may share that import.
Prints one JSON object {case: relative error}. The kernels are launched on torch CPU
tensors through `Launch.torch`, with the same arguments the jax-triton ops pass
(`launch.kv_parts`); in fp32 (the interpreter has no bf16 products), so the tolerance is
fp32's. The GPU tests (tests/test_kernels_gpu.py) check the same kernels compiled, in bf16.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402


from duojax.kernels.gpu.launch import patch_interpreter_scalars  # noqa: E402

patch_interpreter_scalars()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from duojax import kv_quant  # noqa: E402
from duojax.attention import reference  # noqa: E402
from duojax.kernels.gpu import decode as kd  # noqa: E402
from duojax.kernels.gpu import prefill as kp  # noqa: E402
from duojax.kernels.gpu.launch import kv_bits, kv_parts  # noqa: E402

SINK, RECENT = 4, 8
_key = iter(range(10_000))


def rnd(shape):
  return jax.random.normal(jax.random.PRNGKey(next(_key)), shape, jnp.float32)


def store(x, bits, which=0):
  """x as a cache stores it: plain, or quantised with `bits` (one number, or the (key,
  value) pair of a mixed cache such as k8v4's (8, 4): `which` 0 keys, 1 values)."""
  b = bits if isinstance(bits, int) else bits[which]
  return kv_quant.quantize(x, b) if b else x


def pair(k, v):
  """The plans' bits argument: (key bits, value bits) as the buffers hold them."""
  return (kv_bits(k), kv_bits(v))


def tt(*xs):
  """jax arrays -> torch CPU tensors (int32 / uint8 / int8 / fp32 as they are)."""
  return [torch.from_numpy(np.array(x)) for x in xs]


def rel(out, want) -> float:
  out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
  if np.isnan(out).any():
    return float("nan")
  return float(np.linalg.norm(out - want) / max(np.linalg.norm(want), 1e-30))


def parts(x):
  return tt(*kv_parts(x, jnp.float32))


def case_full_decode(bits, h, g, d, dt=jnp.float32):
  b, s = 3, 150
  lens = jnp.asarray([150, 1, 77], jnp.int32)
  q = rnd((b, 1, h, g, d))
  k, v = store(rnd((b, s, h, d)), bits), store(rnd((b, s, h, d)), bits, 1)
  q_pos = (lens - 1)[:, None]
  split, comb = kd.full_decode_plans(q.shape, k.shape, dt, bits=pair(k, v))
  op, mp, lp = split.torch(*tt(q), *parts(k), *parts(v), *tt(q_pos, lens))
  (out,) = comb.torch(op, mp, lp)
  return rel(out.float().numpy(), reference.full_chunk_attention(q, k, v, q_pos, lens))


def _stream_inputs(bits, b, t, h, g, d, start):
  w = SINK + RECENT
  q = rnd((b, t, h, g, d))
  slot_k, slot_v = store(rnd((b, w, h, d)), bits), store(rnd((b, w, h, d)), bits, 1)
  from duojax.cache import stream_slot_positions  # the cache's own slot map (not the kernel's)
  pos, valid = stream_slot_positions(start, SINK, RECENT)
  k, v = store(rnd((b, t, h, d)), bits), store(rnd((b, t, h, d)), bits, 1)
  q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  return q, slot_k, slot_v, pos, valid, k, v, q_pos


def case_stream_decode(bits, h, g, d, dt=jnp.float32):
  start = jnp.asarray([0, 3, 40], jnp.int32)
  n_valid = jnp.asarray([1, 1, 0], jnp.int32)  # a row with no new token sees only its slots
  q, sk, sv, pos, valid, k, v, q_pos = _stream_inputs(bits, 3, 1, h, g, d, start)
  plan = kd.stream_decode_plan(q.shape, sk.shape, dt, SINK, RECENT, bits=pair(sk, sv))
  (out,) = plan.torch(*tt(q), *parts(sk), *parts(sv), *tt(kd.slot_positions(pos, valid)),
                      *parts(k), *parts(v), *tt(q_pos, n_valid))
  want = reference.streaming_chunk_attention(q, sk, sv, pos, valid, k, v, q_pos, n_valid, SINK,
                                             RECENT)
  keep = np.asarray(n_valid > 0) | np.asarray(valid.any(1))  # rows that see some key
  return rel(out.float().numpy()[keep], np.asarray(want)[keep])


def case_duo_decode(bits, hr, hs, g, d, dt=jnp.float32):
  b, s = 3, 130
  start = jnp.asarray([129, 0, 60], jnp.int32)
  n_valid = jnp.ones((b,), jnp.int32)
  h = hr + hs
  q, sk, sv, pos, valid, k, v, q_pos = _stream_inputs(bits, b, 1, hs, g, d, start)
  q = rnd((b, 1, h, g, d))
  k_new, v_new = rnd((b, 1, h, d)), rnd((b, 1, h, d))
  kc, vc = rnd((b, s, hr, d)), rnd((b, s, hr, d))
  rows = jnp.arange(b)
  kc = kc.at[rows, start].set(k_new[:, 0, :hr])  # the new token already in the cache
  vc = vc.at[rows, start].set(v_new[:, 0, :hr])
  kc, vc, kn, vn = (store(x, bits, i) for x, i in ((kc, 0), (vc, 1), (k_new, 0), (v_new, 1)))
  split, comb = kd.duo_decode_plans(q.shape, kc.shape, sk.shape, dt, SINK, RECENT,
                                    bits=pair(kc, vc))
  op, mp, lp = split.torch(*tt(q), *parts(kc), *parts(vc), *tt(q_pos, start + n_valid),
                           *parts(sk), *parts(sv), *tt(kd.slot_positions(pos, valid)),
                           *parts(kn), *parts(vn), *tt(n_valid))
  (out,) = comb.torch(op, mp, lp)
  sl = lambda x, a, z: jax.tree_util.tree_map(lambda y: y[:, :, a:z], x)
  want = jnp.concatenate([
      reference.full_chunk_attention(q[:, :, :hr], kc, vc, q_pos, start + n_valid),
      reference.streaming_chunk_attention(q[:, :, hr:], sk, sv, pos, valid, sl(kn, hr, h),
                                          sl(vn, hr, h), q_pos, n_valid, SINK, RECENT)], axis=2)
  return rel(out.float().numpy(), want)


def case_decode_write(bits, hr, hs, g, d, dt=jnp.float32):
  """`decode_write` (attention + the new token's cache write in the same launches) against
  the cache module's own writes (an XLA scatter and ring gather) and the reference
  attention over the written caches: the caches must come back equal, bit for bit, and the
  output within tolerance. Rows: the last full slot, a row with no new token, a sink slot,
  and (streaming) a ring slot after the ring has wrapped."""
  from duojax import cache as kvc
  b, s = 4, 70
  start = jnp.asarray([69, 12, 2, 45], jnp.int32)
  n_valid = jnp.asarray([1, 0, 1, 1], jnp.int32)
  h = hr + hs
  q = rnd((b, 1, h, g, d))
  kn, vn = store(rnd((b, 1, h, d)), bits), store(rnd((b, 1, h, d)), bits, 1)
  full = kvc.FullLayerCache(store(rnd((b, s, hr, d)), bits), store(rnd((b, s, hr, d)), bits, 1))
  sl = lambda x, a, z: jax.tree_util.tree_map(lambda y: y[:, :, a:z], x)
  want_full = kvc.write_full(full, sl(kn, 0, hr), sl(vn, 0, hr), start, n_valid)
  q_pos = start[:, None]
  want = [reference.full_chunk_attention(q[:, :, :hr], want_full.k, want_full.v, q_pos,
                                         start + n_valid)]
  args = (tt(q)[0], *parts(full.k), *parts(full.v), *tt(start, n_valid))
  if hs:
    _, sk, sv, pos, valid, _, _, _ = _stream_inputs(bits, b, 1, hs, g, d, start)
    ring = kvc.StreamLayerCache(sk, sv, SINK, RECENT)
    want_ring = kvc.write_stream(ring, sl(kn, hr, h), sl(vn, hr, h), start, n_valid)
    want.append(reference.streaming_chunk_attention(q[:, :, hr:], sk, sv, pos, valid,
                                                    sl(kn, hr, h), sl(vn, hr, h), q_pos,
                                                    n_valid, SINK, RECENT))
    split, _ = kd.duo_decode_plans(q.shape, full.k.shape, sk.shape, dt, SINK, RECENT,
                                   bits=pair(full.k, full.v), new=True)
    slots = (*parts(sk), *parts(sv), *tt(kd.slot_positions(pos, valid)))
    bufs = [full.k, full.v, sk, sv]
  else:
    split, _ = kd.duo_decode_plans(q.shape, full.k.shape, None, dt, 0, 0,
                                   bits=pair(full.k, full.v), new=True)
    slots = (*parts(kn), *parts(vn), *tt(q_pos))
    bufs = [full.k, full.v]
  op, mp, lp = split.torch(args[0], *args[1:-2], *tt(q_pos, start), *slots, *parts(kn),
                           *parts(vn), *tt(n_valid))
  arrays = [a for x in bufs for a in kd._buffers(x)]
  comb = kd.combine_write_plan(q.shape, jnp.float32, hr, op.shape[2],
                               [(a.shape, a.dtype) for a in arrays], SINK, RECENT,
                               pair(full.k, full.v))
  res = comb.torch(op, mp, lp, *tt(start, n_valid), *tt(*kd._buffers(kn)),
                   *tt(*kd._buffers(vn)), *tt(*arrays))
  got = [np.asarray(r) for r in res[1:]]
  expect = [want_full.k, want_full.v] + ([want_ring.k, want_ring.v] if hs else [])
  expect = [np.asarray(a) for x in expect for a in kd._buffers(x)]
  if any(not np.array_equal(x, y) for x, y in zip(got, expect)):
    return float("inf")  # a cache buffer differs from the cache module's write
  return rel(res[0].float().numpy(), jnp.concatenate(want, axis=2))


def case_full_chunk(bits, h, g, d, partial=False, dt=jnp.float32):
  b, t, s = 2, 5, 90
  start = jnp.asarray([37, 0], jnp.int32)
  n_valid = jnp.asarray([5, 3], jnp.int32)
  q = rnd((b, t, h, g, d))
  k, v = store(rnd((b, s, h, d)), bits), store(rnd((b, s, h, d)), bits, 1)
  q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  kv_len = start + n_valid
  plan = kp.full_chunk_plan(q.shape, k.shape, dt, partial=partial, bits=pair(k, v))
  res = plan.torch(*tt(q), *parts(k), *parts(v), *tt(q_pos, kv_len))
  want = np.asarray(reference.full_chunk_attention(q, k, v, q_pos, kv_len))
  if partial:  # acc / l is the output
    acc, _, l = (r.numpy() for r in res)
    out = acc / np.maximum(l, 1e-30)[..., None]
  else:
    out = res[0].float().numpy()
  valid = np.arange(t)[None, :] < np.asarray(n_valid)[:, None]
  return rel(out[valid], want[valid])


def case_stream_chunk(bits, h, g, d, dt=jnp.float32):
  b, t = 2, 20
  start = jnp.asarray([0, 31], jnp.int32)
  n_valid = jnp.asarray([20, 17], jnp.int32)
  q, sk, sv, pos, valid, k, v, q_pos = _stream_inputs(bits, b, t, h, g, d, start)
  plan = kp.stream_chunk_plan(q.shape, sk.shape, dt, SINK, RECENT, bits=pair(sk, sv))
  (out,) = plan.torch(*tt(q), *parts(sk), *parts(sv), *tt(kd.slot_positions(pos, valid)),
                      *parts(k), *parts(v), *tt(q_pos, n_valid))
  want = np.asarray(reference.streaming_chunk_attention(q, sk, sv, pos, valid, k, v, q_pos,
                                                        n_valid, SINK, RECENT))
  keep = np.arange(t)[None, :] < np.asarray(n_valid)[:, None]
  return rel(out.float().numpy()[keep], want[keep])


def cases():
  """name -> thunk. Shapes: GQA (2 x 4, D 64), MHA with D 48 (not a power of two: the
  int4 halves are 24 bytes, masked inside a 32-lane block), SmolLM2's G = 3."""
  out = {}
  for bits in (0, 8, 4):
    for h, g, d in ((2, 4, 64), (3, 1, 48)):
      out[f"full_decode-b{bits}-h{h}g{g}d{d}"] = lambda bits=bits, h=h, g=g, d=d: \
          case_full_decode(bits, h, g, d)
      out[f"full_chunk-b{bits}-h{h}g{g}d{d}"] = lambda bits=bits, h=h, g=g, d=d: \
          case_full_chunk(bits, h, g, d)
    out[f"stream_decode-b{bits}"] = lambda bits=bits: case_stream_decode(bits, 2, 3, 32)
    out[f"duo_decode-b{bits}"] = lambda bits=bits: case_duo_decode(bits, 2, 1, 3, 32)
    out[f"stream_chunk-b{bits}"] = lambda bits=bits: case_stream_chunk(bits, 2, 2, 32)
  out["full_chunk_partial-b8"] = lambda: case_full_chunk(8, 2, 4, 64, partial=True)
  # decode with the cache write in the combine launch: DuoAttention layers (GQA; MHA with
  # D 48) and layers of retrieval heads only, plain, int8, int4 and k8v4
  for bits in (0, 8, 4, (8, 4)):
    tag = "k8v4" if bits == (8, 4) else f"b{bits}"
    out[f"decode_write-duo-{tag}"] = lambda bits=bits: case_decode_write(bits, 2, 2, 3, 32)
    out[f"decode_write-full-{tag}"] = lambda bits=bits: case_decode_write(bits, 3, 0, 4, 64)
  out["decode_write-duo-b4-mha-d48"] = lambda: case_decode_write(4, 1, 2, 1, 48)
  out["f16c-decode_write-duo-b4"] = lambda: case_decode_write(4, 2, 2, 3, 32, jnp.float16)
  # k8v4: int8 keys beside int4 values (their own strides); GQA, MHA with D 48, streaming
  k8v4 = (8, 4)
  for h, g, d in ((2, 4, 64), (3, 1, 48)):
    out[f"full_decode-k8v4-h{h}g{g}d{d}"] = lambda h=h, g=g, d=d: case_full_decode(k8v4, h, g, d)
    out[f"full_chunk-k8v4-h{h}g{g}d{d}"] = lambda h=h, g=g, d=d: case_full_chunk(k8v4, h, g, d)
  out["stream_decode-k8v4"] = lambda: case_stream_decode(k8v4, 2, 3, 32)
  out["duo_decode-k8v4"] = lambda: case_duo_decode(k8v4, 2, 1, 3, 32)
  out["stream_chunk-k8v4"] = lambda: case_stream_chunk(k8v4, 2, 2, 32)
  out["full_chunk_partial-k8v4"] = lambda: case_full_chunk(k8v4, 2, 4, 64, partial=True)
  out["full_decode-fold-k8v4"] = lambda: with_fold(True, case_full_decode, k8v4, 2, 4, 64)
  # decode with the scales folded out of the products and without, whatever the default
  # (QUANT_DECODE_CONFIG) of each code width is (MHA with D 48 runs each width's default
  # above: int8 folds, int4 does not)
  for bits in (8, 4):
    for fold in (False, True):
      tag = "fold" if fold else "nofold"
      out[f"full_decode-{tag}-b{bits}"] = lambda bits=bits, fold=fold: with_fold(
          fold, case_full_decode, bits, 2, 4, 64)
      out[f"stream_decode-{tag}-b{bits}"] = lambda bits=bits, fold=fold: with_fold(
          fold, case_stream_decode, bits, 2, 3, 32)
      out[f"duo_decode-{tag}-b{bits}"] = lambda bits=bits, fold=fold: with_fold(
          fold, case_duo_decode, bits, 2, 1, 3, 32)
  # fp16 codes (`_scan_codes`, the default for a bf16 / fp16 q): fp16 products, so these
  # carry fp16's tolerance (the test's TOL_F16); GQA, MHA with D 48 (per-lane codes), int4
  # halves, k8v4, streaming and the fused duo launch, q large enough to need qshift
  f16 = jnp.float16
  for bits in (8, 4, k8v4):
    tag = "k8v4" if bits == k8v4 else f"b{bits}"
    for h, g, d in ((2, 4, 64), (3, 1, 48)):
      out[f"f16c-full_decode-{tag}-h{h}g{g}d{d}"] = lambda bits=bits, h=h, g=g, d=d: \
          case_full_decode(bits, h, g, d, f16)
    out[f"f16c-stream_decode-{tag}"] = lambda bits=bits: case_stream_decode(bits, 2, 3, 32, f16)
    out[f"f16c-duo_decode-{tag}"] = lambda bits=bits: case_duo_decode(bits, 2, 1, 3, 32, f16)
    for h, g, d in ((2, 4, 64), (3, 1, 48)):
      out[f"f16c-full_chunk-{tag}-h{h}g{g}d{d}"] = lambda bits=bits, h=h, g=g, d=d: \
          case_full_chunk(bits, h, g, d, dt=f16)
    out[f"f16c-stream_chunk-{tag}"] = lambda bits=bits: case_stream_chunk(bits, 2, 2, 32, f16)
  out["f16c-full_decode-b4-bigq"] = lambda: with_q_scale(3e4, case_full_decode, 4, 2, 4, 64, f16)
  # each choice of nibble halves (decode.NIBBLE_HALVES: keys, values, both, neither)
  for halves in ("k", "v", "kv", ""):
    out[f"f16c-full_decode-b4-halves{halves or '-none'}"] = lambda halves=halves: with_halves(
        halves, case_full_decode, 4, 2, 4, 64, f16)
    if halves in ("v", ""):  # k8v4's keys are int8: only the value halves matter ("kv" is
      # the default, f16c-duo_decode-k8v4)
      out[f"f16c-duo_decode-k8v4-halves{halves or '-none'}"] = lambda halves=halves: \
          with_halves(halves, case_duo_decode, k8v4, 2, 1, 3, 32, f16)
  out["f16c-full_chunk_partial-k8v4"] = lambda: case_full_chunk(k8v4, 2, 4, 64, True, f16)
  out["f16c-full_chunk-b8-bigq"] = lambda: with_q_scale(3e4, case_full_chunk, 8, 2, 4, 64,
                                                        False, f16)
  # the fp16-code path whatever each kernel's default (int8, k8v4 and the chunks have it off)
  return {k: (lambda f=f: f16_on(f)) if k.startswith("f16c-") else f for k, f in out.items()}


def f16_on(case):
  """`case()` with every quantised config's f16_codes on (decode and prefill kernels)."""
  cfgs = [*kd.QUANT_DECODE_CONFIG.values(), kp.FULL_CHUNK_CONFIG, kp.STREAM_CHUNK_CONFIG]
  saved = [dict(c) for c in cfgs]
  for c in cfgs:
    c["f16_codes"] = True
  try:
    return case()
  finally:
    for c, old in zip(cfgs, saved):
      c.clear()
      c.update(old)


def with_halves(halves, case, *args):
  """`case` with the fp16-code kernels reading int4 buffers as nibble halves for `halves`."""
  saved = kd.NIBBLE_HALVES
  kd.NIBBLE_HALVES = halves
  try:
    return case(*args)
  finally:
    kd.NIBBLE_HALVES = saved


def with_q_scale(scale, case, *args):
  """`case` with queries `scale` times larger (|q| past fp16's 2^14 guard: qshift > 1)."""
  global rnd
  plain = rnd
  rnd = lambda shape: plain(shape) * (scale if len(shape) == 5 else 1.0)
  try:
    return case(*args)
  finally:
    rnd = plain


def with_fold(fold, case, *args):
  """`case` with the quantised decode kernels' folded dequantisation on or off."""
  saved = {b: dict(c) for b, c in kd.QUANT_DECODE_CONFIG.items()}
  for c in kd.QUANT_DECODE_CONFIG.values():
    c["fold_scales"] = fold
  try:
    return case(*args)
  finally:
    kd.QUANT_DECODE_CONFIG.clear()
    kd.QUANT_DECODE_CONFIG.update(saved)


if __name__ == "__main__":
  want = set(sys.argv[1:])
  res = {}
  for name, f in cases().items():
    if want and name not in want:
      continue
    try:
      res[name] = f()
    except Exception as e:  # noqa: BLE001 - reported per case, the test names it
      res[name] = f"{type(e).__name__}: {e}"
  print(json.dumps(res))
