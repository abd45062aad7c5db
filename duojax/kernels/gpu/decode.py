"""Decode attention (one query token per row) as Triton kernels.

full_decode  the retrieval heads over their whole cache: flash-decoding. The
             sequence is split into NS parts; program (split, h, b) streams its
             part of row b's keys/values of KV head h once and serves all G query
             heads of that KV head with it (GQA packed: a [GP, D] x [D, BLOCK_N]
             product per key block, GP = G padded to the 16 rows a tensor-core
             product needs). Each split covers ceil(len / BLOCK_N / NS) blocks of
             the row's *actual* length (read at run time from kv_len / q_pos), so
             nothing past a row's length is read and the work is balanced for any
             length; NS is chosen from the batch and head count so the grid fills
             the GPU about once. A second small kernel merges the NS partial
             results (max / sum / unnormalised output, fp32).
streaming_decode  the streaming heads over sink + ring slots and the new token:
             W = sink + recent keys, one program per (h, b).

`decode_write` (ops `full_decode_write`, `duo_decode_write`): the same launches for a
             full or DuoAttention layer when the new token is not yet in the cache: split
             0 of each retrieval head folds the token in from its own k / v, no split reads
             its slot, and the combine kernel writes it there and into the streaming ring
             (the buffers aliased to its outputs), so no XLA write runs before them.

`full_decode(..., return_partial=True)` skips the combine kernel and merges the NS
split partials in jnp into one softmax state (m, l, acc) in natural-log units
(`merge_splits`): the per-device op of context-parallel attention, whose merge across
devices is the same split-K merge one level up (duojax/context_parallel.py).

Plain-jnp references: `duojax.attention.reference.full_chunk_attention` and
`streaming_chunk_attention` (same signatures, T == 1).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from duojax.kernels.gpu.launch import (Launch, cdiv, dtype_name, kv_bits, kv_parts, kv_strides,
                                       next_pow2, strides)

# Tuning: the best of 36 (block_n, warps, stages, programs) variants at 128K tokens, 4 KV
# heads, G = 4 on an H100 (infer/bench_kernels.py --variants; the top five were within 2%).
# 264 programs = two per SM of the H100's 132. On the H200 three stages beat two: 67.6 vs
# 73.3 us at 128K, 23.1 vs 25.1 us at 32K (infer/results/h200-2026-12-04/variants/).
DECODE_CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 3, "programs": 264,
                 "max_splits": 128,
                 # quantised caches: scales and zeros folded out of the products (`_scan`)
                 # instead of dequantising each tile; off until timed on a GPU
                 "fold_scales": False}
# Quantised caches (bits 8 / 4): what differs from DECODE_CONFIG, timed apart because a
# quantised tile is converted and scaled before its products. The best of a 12-point grid
# (block_n, warps, programs) then the layouts and folding, 1M tokens x 4 KV heads x G 4 on
# an H200 (python -m infer.bench_quant_variants; infer/results/h200-2026-12-03/): int8
# 593 -> 490 us (1.8x its floor). int4 was 824 -> 714 us (528 programs) when each lane
# picked its nibble; with `_scan_nibbles` (each byte loaded once) its default is 529 us
# and block_n 128 is 482 us, 3.4x its floor (infer/results/h200-2026-12-03-late/).
# fp16 codes ("f16_codes", `_scan_codes`): a tile's codes become fp16 integers by their bit
# pattern, with no int -> float convert, and go into fp16 products with the scales and
# zeros folded around them. Built on the guess that the converts (a quarter of the FMA
# rate on Hopper) bound the int4 tile; timed on an H100 (infer/results/h100-2026-12-07-eve/)
# they bind it less than that: in the model (duo 0.5, Llama-3-8B shape, 32K) int4 at batch
# 16 went 17.14 -> 14.98 ms/token, at batch 1 7.41 -> 7.64; k8v4 got slower (17.87 ->
# 18.45, 7.57 -> 7.65) and so did int8 in the kernel (498 -> 585 us at 1M). So it is on for
# int4 only. NIBBLE_HALVES: which int4 buffers it reads as nibble halves (keys and values:
# 449 us at 1M, 240 us at batch 16 x 32K; values only 638 / 429). A mixed cache (k8v4, its
# (key, value) pair) has an entry of its own; otherwise the narrower width's applies.
QUANT_DECODE_CONFIG: dict[int | tuple[int, int], dict] = {
    8: {"block_n": 128, "fold_scales": True, "f16_codes": False},
    4: {"block_n": 128, "f16_codes": True},
    (8, 4): {"block_n": 128, "f16_codes": False}}
F16_CODES_DEFAULT = True  # for a config without the key (bench flags switch it off)
NIBBLE_HALVES = "kv"
STREAM_DECODE_CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 3}

LOG2E = 1.4426950408889634
_FAR = 1 << 30  # position given to an empty streaming slot: never visible


@triton.jit
def load_codes(p, n, nmask, SROW: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
               BITS: tl.constexpr):
  """Rows n [N] of quantised codes at p as [N, BD] int32 (0 where masked): int8 codes, or
  uint8 bytes holding element i in the low nibble of byte i and element i + D/2 in the
  high one (duojax/kv_quant.py). An int4 byte is loaded by the two lanes that use it: the
  same DRAM traffic as loading it once, with no interleave to undo."""
  offs_d = tl.arange(0, BD)
  mask = nmask[:, None] & (offs_d < D)[None, :]
  if BITS == 4:
    low = offs_d < D // 2
    byte = tl.where(low, offs_d, offs_d - D // 2)
    raw = tl.load(p + n[:, None] * SROW + byte[None, :], mask=mask, other=0).to(tl.int32)
    code = tl.where(low[None, :], raw & 15, raw >> 4)
  else:
    code = tl.load(p + n[:, None] * SROW + offs_d[None, :], mask=mask, other=0).to(tl.int32)
  return code


@triton.jit
def load_kv(p, sp, zp, n, nmask, SROW: tl.constexpr, SSROW: tl.constexpr, D: tl.constexpr,
            BD: tl.constexpr, BITS: tl.constexpr):
  """Rows n [N] of a key or value buffer as [N, BD] values (0 where masked).

  BITS 0: a plain buffer at p (row stride SROW), returned in its own dtype; sp / zp are
  not read. BITS 8 / 4: codes at p (`load_codes`), one fp32 scale and zero per row at sp /
  zp (row stride SSROW), returned dequantised in fp32 (code * scale + zero).
  """
  if BITS == 0:
    offs_d = tl.arange(0, BD)
    x = tl.load(p + n[:, None] * SROW + offs_d[None, :],
                mask=nmask[:, None] & (offs_d < D)[None, :], other=0.0)
  else:
    code = load_codes(p, n, nmask, SROW, D, BD, BITS)
    sc = tl.load(sp + n * SSROW, mask=nmask, other=0.0)
    zr = tl.load(zp + n * SSROW, mask=nmask, other=0.0)
    x = code.to(tl.float32) * sc[:, None] + zr[:, None]
  return x


@triton.jit
def _load_row(p, sp, zp, D: tl.constexpr, BD: tl.constexpr, BITS: tl.constexpr):
  """One row [BD] of a key or value buffer, as `load_kv` reads rows (fp32 if quantised)."""
  offs_d = tl.arange(0, BD)
  dmask = offs_d < D
  if BITS == 0:
    x = tl.load(p + offs_d, mask=dmask, other=0.0)
  else:
    if BITS == 4:
      low = offs_d < D // 2
      raw = tl.load(p + tl.where(low, offs_d, offs_d - D // 2), mask=dmask, other=0).to(tl.int32)
      code = tl.where(low, raw & 15, raw >> 4)
    else:
      code = tl.load(p + offs_d, mask=dmask, other=0).to(tl.int32)
    x = code.to(tl.float32) * tl.load(sp) + tl.load(zp)
  return x


@triton.jit
def _visible(n, hi, pos_ptr, qpos, STREAM: tl.constexpr, SINK: tl.constexpr,
             RECENT: tl.constexpr):
  """Which keys n [N] of a block count: those before hi, and with STREAM those that key
  position pos_ptr[n] puts inside the streaming mask (sink, or within recent of qpos)."""
  vis = n < hi
  if STREAM:
    kpos = tl.load(pos_ptr + n, mask=vis, other=1 << 30)
    dist = qpos - kpos
    vis = vis & (dist >= 0) & ((kpos < SINK) | (dist < RECENT))
  return vis


@triton.jit
def _online_softmax(s, vis, m_i, l_i, QK_SCALE: tl.constexpr):
  """One block's logits s [GP, N] into the running (m, l), base 2 -> (m_new, alpha, p,
  l_new): alpha rescales the old accumulator, p [GP, N] weighs this block's values."""
  s = tl.where(vis[None, :], s * QK_SCALE, float("-inf"))
  m_new = tl.maximum(m_i, tl.max(s, 1))
  m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no visible key
  alpha = tl.exp2(m_i - m_safe)
  p = tl.exp2(s - m_safe[:, None])
  return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _halves(x, R: tl.constexpr, BD: tl.constexpr):
  """x [R, BD] -> (x[:, :BD/2], x[:, BD/2:]), in registers."""
  return tl.split(tl.permute(tl.reshape(x, [R, 2, BD // 2]), (0, 2, 1)))


@triton.jit
def _unhalve(lo, hi, R: tl.constexpr, BD: tl.constexpr):
  """The inverse of `_halves`: [R, BD/2] twice -> [R, BD]."""
  return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), [R, BD])


@triton.jit
def _load_nibbles(p, sp, zp, n, nmask, SROW: tl.constexpr, SSROW: tl.constexpr,
                  HD: tl.constexpr):
  """Rows n [N] of an int4 buffer as its two halves [N, HD] (HD = D / 2), dequantised in
  fp32: the low nibbles hold elements [0, D/2), the high ones [D/2, D) (duojax/kv_quant.py),
  so each byte is loaded once and no lane selects between nibbles."""
  offs = tl.arange(0, HD)
  raw = tl.load(p + n[:, None] * SROW + offs[None, :], mask=nmask[:, None], other=0).to(tl.int32)
  sc = tl.load(sp + n * SSROW, mask=nmask, other=0.0)[:, None]
  zr = tl.load(zp + n * SSROW, mask=nmask, other=0.0)[:, None]
  return (raw & 15).to(tl.float32) * sc + zr, (raw >> 4).to(tl.float32) * sc + zr


@triton.jit
def _next_block(kp, ksp, kzp, vp, vsp, vzp, BLOCK_N: tl.constexpr, SKS: tl.constexpr,
                SVS: tl.constexpr, SSS: tl.constexpr):
  """The six pointers of a key / value block (codes or values, scales, zeros) moved on by
  BLOCK_N rows (row strides SKS, SVS; SSS for the scales and zeros)."""
  return (kp + BLOCK_N * SKS, ksp + BLOCK_N * SSS, kzp + BLOCK_N * SSS, vp + BLOCK_N * SVS,
          vsp + BLOCK_N * SSS, vzp + BLOCK_N * SSS)


@triton.jit
def _carry_in(acc, m0, m_i, part):
  """The state a scan started from (acc [R, BD], at max m0 [R]) rescaled to the scan's final
  max m_i (the product of its alphas; 0 where there was none), plus the scan's own
  accumulator `part`, kept at m_i."""
  m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
  keep = tl.where(m0 == float("-inf"), 0.0, tl.exp2(m0 - m_fin))
  return acc * keep[:, None] + part


@triton.jit
def _f16_codes(code):
  """int32 codes in [-128, 1023 - 128] (int8's [-128, 127], int4's [0, 15]) -> the same
  integers in fp16, exactly, by bit pattern: 0x6400 + m is the fp16 1024 + m for m in [0,
  1024), so code + 0x6480 reads as 1152 + code, and the subtraction is exact. Integer adds
  and a truncation replace the quarter-rate int -> float convert."""
  return (code + 0x6480).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0


@triton.jit
def _load_nibble_codes(p, n, nmask, SROW: tl.constexpr, HD: tl.constexpr):
  """Rows n [N] of an int4 buffer as the codes of its two halves [N, HD] in fp16 (exact;
  `_f16_codes`), each byte loaded once: low nibbles hold elements [0, D/2), high ones
  [D/2, D) (duojax/kv_quant.py)."""
  offs = tl.arange(0, HD)
  raw = tl.load(p + n[:, None] * SROW + offs[None, :], mask=nmask[:, None], other=0).to(tl.int32)
  return _f16_codes(raw & 15), _f16_codes(raw >> 4)


@triton.jit
def f16_query(q):
  """q [R, BD] -> (q16, qshift, qsum): q in fp16 for products with fp16 codes, scaled by a
  power of two qshift (1 unless some |q| exceeds 2^14: fp16 stops at 65504) that the
  logits multiply back; qsum [R] = sum of each row in fp32 (what a zero point adds)."""
  qf = q.to(tl.float32)
  qmax = tl.max(tl.max(tl.abs(qf), 1), 0)
  qshift = tl.where(qmax > 16384.0, tl.exp2(tl.ceil(tl.log2(qmax / 16384.0))), 1.0)
  return (qf / qshift).to(tl.float16), qshift, tl.sum(qf, 1)


@triton.jit
def codes_tile_f16(p, n, nmask, SROW: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                   BITS: tl.constexpr):
  """Rows n [N] of int8 / int4 codes as [N, BD] fp16 integers (0 where masked)."""
  return _f16_codes(load_codes(p, n, nmask, SROW, D, BD, BITS))


@triton.jit
def fold_logits(s, ksp, kzp, n, nmask, SSS: tl.constexpr, qshift, qsum):
  """q16 . codes [R, N] -> the logits q . (code * scale + zero): s * qshift * scale +
  qsum * zero per key n (scales and zeros fp32, row stride SSS)."""
  ks = tl.load(ksp + n * SSS, mask=nmask, other=0.0)
  kz = tl.load(kzp + n * SSS, mask=nmask, other=0.0)
  return s * (ks * qshift)[None, :] + qsum[:, None] * kz[None, :]


@triton.jit
def fold_weights(p, vsp, vzp, n, nmask, SSS: tl.constexpr):
  """Softmax weights p [R, N] -> (p16, vmax, zterm): p @ (code * scale + zero) = vmax *
  (p16 @ codes) + zterm, with p16 = p * scale / vmax in fp16 (vmax, the tile's largest
  scale, keeps p16 in [0, 1], clear of fp16's underflow) and zterm [R, 1] = p . zero."""
  vs = tl.load(vsp + n * SSS, mask=nmask, other=0.0)
  vz = tl.load(vzp + n * SSS, mask=nmask, other=0.0)
  vmax = tl.maximum(tl.max(vs, 0), 1e-30)
  p16 = (p * (vs / vmax)[None, :]).to(tl.float16)
  return p16, vmax, tl.sum(p * vz[None, :], 1)[:, None]


@triton.jit
def _scan_codes(q, kp, ksp, kzp, vp, vsp, vzp, lo, hi, pos_ptr, qpos, m_i, l_i, acc,
                SKS: tl.constexpr, SVS: tl.constexpr, SSS: tl.constexpr, D: tl.constexpr,
                BD: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
                BLOCK_N: tl.constexpr, QK_SCALE: tl.constexpr, STREAM: tl.constexpr,
                SINK: tl.constexpr, RECENT: tl.constexpr, F16C: tl.constexpr):
  """`_scan` over a quantised cache with fp16 codes (`_f16_codes`; F16C): the codes go into
  fp16 products as they are and the scales and zeros are applied around them
  (`fold_logits`, `fold_weights`). F16C's bits 2 / 4: int4 keys / values (power-of-two
  head dim) are read as their two nibble halves (`_scan_nibbles`' layout: q split for the
  keys, the accumulator for the values), each byte loaded once; otherwise through
  `load_codes`, each byte by the two lanes that use it (`f16_codes` says which is used)."""
  GP: tl.constexpr = q.shape[0]
  HD: tl.constexpr = BD // 2
  KH: tl.constexpr = (F16C & 2) != 0 and KBITS == 4 and BD == D and D >= 32
  VH: tl.constexpr = (F16C & 4) != 0 and VBITS == 4 and BD == D and D >= 32
  q16, qshift, qsum = f16_query(q)
  q_lo, q_hi = _halves(q16, GP, BD)
  acc_lo = tl.zeros([GP, HD], tl.float32)
  acc_hi = tl.zeros([GP, HD], tl.float32)
  acc_w = tl.zeros([GP, BD], tl.float32)
  m0 = m_i
  offs_n = tl.arange(0, BLOCK_N)
  for start in range(lo, hi, BLOCK_N):
    vis = _visible(start + offs_n, hi, pos_ptr, qpos, STREAM, SINK, RECENT)
    if KH:
      k_lo, k_hi = _load_nibble_codes(kp, offs_n, vis, SKS, HD)
      s = tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))
    else:
      s = tl.dot(q16, tl.trans(codes_tile_f16(kp, offs_n, vis, SKS, D, BD, KBITS)))
    s = fold_logits(s, ksp, kzp, offs_n, vis, SSS, qshift, qsum)
    m_new, alpha, p, l_i = _online_softmax(s, vis, m_i, l_i, QK_SCALE)
    p16, vmax, zterm = fold_weights(p, vsp, vzp, offs_n, vis, SSS)
    if VH:
      v_lo, v_hi = _load_nibble_codes(vp, offs_n, vis, SVS, HD)
      acc_lo = acc_lo * alpha[:, None] + tl.dot(p16, v_lo) * vmax + zterm
      acc_hi = acc_hi * alpha[:, None] + tl.dot(p16, v_hi) * vmax + zterm
    else:
      acc_w = (acc_w * alpha[:, None]
               + tl.dot(p16, codes_tile_f16(vp, offs_n, vis, SVS, D, BD, VBITS)) * vmax + zterm)
    m_i = m_new
    kp, ksp, kzp, vp, vsp, vzp = _next_block(kp, ksp, kzp, vp, vsp, vzp, BLOCK_N, SKS, SVS, SSS)
  if VH:
    acc = _carry_in(acc, m0, m_i, _unhalve(acc_lo, acc_hi, GP, BD))
  else:
    acc = _carry_in(acc, m0, m_i, acc_w)
  return m_i, l_i, acc


@triton.jit
def _scan_nibbles(q, kp, ksp, kzp, vp, vsp, vzp, lo, hi, pos_ptr, qpos, m_i, l_i, acc,
                  SKS: tl.constexpr, SVS: tl.constexpr, SSS: tl.constexpr, BD: tl.constexpr,
                  KBITS: tl.constexpr, BLOCK_N: tl.constexpr, QK_SCALE: tl.constexpr,
                  IEEE: tl.constexpr, STREAM: tl.constexpr, SINK: tl.constexpr,
                  RECENT: tl.constexpr):
  """`_scan` over int4 values whose head dim is a power of two (BD == D): the accumulator
  is kept as its two halves, matching the nibbles, so a tile's value product is p v_lo |
  p v_hi: the same work as one product over D, half the loads, no nibble select. Keys
  int4 too (KBITS 4): q is split alike and the logits are q_lo k_lo^T + q_hi k_hi^T; int8
  keys (KBITS 8, k8v4) take one product over D."""
  GP: tl.constexpr = q.shape[0]
  HD: tl.constexpr = BD // 2
  q_lo, q_hi = _halves(q, GP, BD)
  acc_lo = tl.zeros([GP, HD], tl.float32)
  acc_hi = tl.zeros([GP, HD], tl.float32)
  m0 = m_i
  offs_n = tl.arange(0, BLOCK_N)
  for start in range(lo, hi, BLOCK_N):
    vis = _visible(start + offs_n, hi, pos_ptr, qpos, STREAM, SINK, RECENT)
    if KBITS == 4:
      k_lo, k_hi = _load_nibbles(kp, ksp, kzp, offs_n, vis, SKS, SSS, HD)
      k_lo = k_lo.to(q.dtype)
      k_hi = k_hi.to(q.dtype)
      if IEEE:
        s = (tl.dot(q_lo, tl.trans(k_lo), input_precision="ieee")
             + tl.dot(q_hi, tl.trans(k_hi), input_precision="ieee"))
      else:
        s = tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))
    else:
      k = load_kv(kp, ksp, kzp, offs_n, vis, SKS, SSS, BD, BD, KBITS).to(q.dtype)
      if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
      else:
        s = tl.dot(q, tl.trans(k))
    m_new, alpha, p, l_i = _online_softmax(s, vis, m_i, l_i, QK_SCALE)
    v_lo, v_hi = _load_nibbles(vp, vsp, vzp, offs_n, vis, SVS, SSS, HD)
    pv = p.to(q.dtype)
    if IEEE:
      acc_lo = acc_lo * alpha[:, None] + tl.dot(pv, v_lo.to(q.dtype), input_precision="ieee")
      acc_hi = acc_hi * alpha[:, None] + tl.dot(pv, v_hi.to(q.dtype), input_precision="ieee")
    else:
      acc_lo = acc_lo * alpha[:, None] + tl.dot(pv, v_lo.to(q.dtype))
      acc_hi = acc_hi * alpha[:, None] + tl.dot(pv, v_hi.to(q.dtype))
    m_i = m_new
    kp, ksp, kzp, vp, vsp, vzp = _next_block(kp, ksp, kzp, vp, vsp, vzp, BLOCK_N, SKS, SVS, SSS)
  return m_i, l_i, _carry_in(acc, m0, m_i, _unhalve(acc_lo, acc_hi, GP, BD))


@triton.jit
def _scan(q, kp, ksp, kzp, vp, vsp, vzp, lo, hi, pos_ptr, qpos, m_i, l_i, acc,
          SKS: tl.constexpr, SVS: tl.constexpr, SSS: tl.constexpr, D: tl.constexpr,
          BD: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, BLOCK_N: tl.constexpr,
          QK_SCALE: tl.constexpr, IEEE: tl.constexpr, STREAM: tl.constexpr,
          SINK: tl.constexpr, RECENT: tl.constexpr, FOLD: tl.constexpr = False,
          F16C: tl.constexpr = False):
  """Online softmax of q [GP, BD] over keys [lo, hi) at kp / vp (pointing at key lo;
  ksp ... vzp their scales and zeros when quantised, row stride SSS). KBITS / VBITS: the
  keys' and the values' bits (0 plain, 8, 4; k8v4 caches mix 8 and 4; 0 goes with 0).

  STREAM: key n sits at position pos_ptr[n] and is visible under the streaming
  mask; otherwise every key in [lo, hi) is visible (the caller bounded hi by the
  row's causal limit). Returns the unnormalised (m, l, acc) in fp32, base 2.

  A quantised tile is dequantised in fp32 and rounded to q's dtype for the products; with
  FOLD the scales and zeros move out of them instead, so the codes are only converted:
  q . (c s + z) = s (q . c) + z sum(q) per key, and p @ (c s + z) = (p s) @ c + p . z
  (codes are exact in bf16): measured faster for int8 (QUANT_DECODE_CONFIG), slower for
  int4. int4 values with a power-of-two head dim take `_scan_nibbles` (unless FOLD). F16C
  (a quantised cache, q in bf16 / fp16): `_scan_codes`, which supersedes both.
  """
  if F16C:
    m_i, l_i, acc = _scan_codes(q, kp, ksp, kzp, vp, vsp, vzp, lo, hi, pos_ptr, qpos, m_i, l_i,
                                acc, SKS, SVS, SSS, D, BD, KBITS, VBITS, BLOCK_N, QK_SCALE,
                                STREAM, SINK, RECENT, F16C)
  elif VBITS == 4 and KBITS > 0 and BD == D and D >= 32 and not FOLD:
    m_i, l_i, acc = _scan_nibbles(q, kp, ksp, kzp, vp, vsp, vzp, lo, hi, pos_ptr, qpos, m_i,
                                  l_i, acc, SKS, SVS, SSS, BD, KBITS, BLOCK_N, QK_SCALE, IEEE,
                                  STREAM, SINK, RECENT)
  else:
    offs_n = tl.arange(0, BLOCK_N)
    if FOLD:
      qsum = tl.sum(q.to(tl.float32), 1)  # [GP]: what each key's zero point adds to its logit
    for start in range(lo, hi, BLOCK_N):
      vis = _visible(start + offs_n, hi, pos_ptr, qpos, STREAM, SINK, RECENT)
      if FOLD:
        k = load_codes(kp, offs_n, vis, SKS, D, BD, KBITS).to(q.dtype)
        v = load_codes(vp, offs_n, vis, SVS, D, BD, VBITS).to(q.dtype)
      else:
        k = load_kv(kp, ksp, kzp, offs_n, vis, SKS, SSS, D, BD, KBITS).to(q.dtype)
        v = load_kv(vp, vsp, vzp, offs_n, vis, SVS, SSS, D, BD, VBITS).to(q.dtype)
      if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
      else:
        s = tl.dot(q, tl.trans(k))
      if FOLD:
        ks = tl.load(ksp + offs_n * SSS, mask=vis, other=0.0)
        kz = tl.load(kzp + offs_n * SSS, mask=vis, other=0.0)
        s = s * ks[None, :] + qsum[:, None] * kz[None, :]
      m_new, alpha, p, l_i = _online_softmax(s, vis, m_i, l_i, QK_SCALE)
      pv = p
      if FOLD:
        vs = tl.load(vsp + offs_n * SSS, mask=vis, other=0.0)
        pv = p * vs[None, :]
      if IEEE:
        acc = acc * alpha[:, None] + tl.dot(pv.to(v.dtype), v, input_precision="ieee")
      else:
        acc = acc * alpha[:, None] + tl.dot(pv.to(v.dtype), v)
      if FOLD:
        vz = tl.load(vzp + offs_n * SSS, mask=vis, other=0.0)
        acc = acc + tl.sum(p * vz[None, :], 1)[:, None]  # every column gets the zeros' share
      m_i = m_new
      kp, ksp, kzp, vp, vsp, vzp = _next_block(kp, ksp, kzp, vp, vsp, vzp, BLOCK_N, SKS, SVS,
                                               SSS)
  return m_i, l_i, acc


@triton.jit
def _add_new_token(q, kn_ptr, kns, knz, vn_ptr, vns, vnz, nval, qpos, m_i, l_i, acc,
                   D: tl.constexpr, BD: tl.constexpr, KBITS: tl.constexpr,
                   VBITS: tl.constexpr, QK_SCALE: tl.constexpr, SINK: tl.constexpr,
                   RECENT: tl.constexpr):
  """Folds the row's new token (position qpos, distance 0) into (m, l, acc): visible
  when the row is real and the window admits distance 0 or qpos is a sink position.
  A quantised new token (kns ... vnz its scales and zeros) is read as the cache holds it."""
  new_vis = (nval > 0) & ((RECENT > 0) | (qpos < SINK))
  kn = _load_row(kn_ptr, kns, knz, D, BD, KBITS).to(q.dtype)
  vn = _load_row(vn_ptr, vns, vnz, D, BD, VBITS).to(q.dtype)
  s_n = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * QK_SCALE
  s_n = tl.where(new_vis, s_n, float("-inf"))
  m_new = tl.maximum(m_i, s_n)
  m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
  alpha = tl.exp2(m_i - m_safe)
  p_n = tl.exp2(s_n - m_safe)
  l_i = l_i * alpha + p_n
  acc = acc * alpha[:, None] + p_n[:, None] * vn.to(tl.float32)[None, :]
  return m_new, l_i, acc


@triton.jit
def _load_q(Q, b, h, SQB: tl.constexpr, SQH: tl.constexpr, SQG: tl.constexpr,
            G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
  offs_g = tl.arange(0, GP)
  offs_d = tl.arange(0, BD)
  return tl.load(Q + b.to(tl.int64) * SQB + h * SQH + offs_g[:, None] * SQG + offs_d[None, :],
                 mask=(offs_g[:, None] < G) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_partial(OP, MP, LP, row, m_i, l_i, acc, G: tl.constexpr, GP: tl.constexpr,
                   D: tl.constexpr, BD: tl.constexpr):
  """Partials: OP [B, H, NS, G, D] fp32 (unnormalised), MP / LP [B, H, NS, G]; row =
  ((b * H + h) * NS + split) * G."""
  offs_g = tl.arange(0, GP)
  offs_d = tl.arange(0, BD)
  gmask = offs_g < G
  tl.store(MP + row + offs_g, m_i, mask=gmask)
  tl.store(LP + row + offs_g, l_i, mask=gmask)
  tl.store(OP + (row + offs_g[:, None]).to(tl.int64) * D + offs_d[None, :], acc,
           mask=gmask[:, None] & (offs_d[None, :] < D))


@triton.jit
def _split_range(QPOS, KVLEN, b, split, NS: tl.constexpr, BLOCK_N: tl.constexpr):
  """Keys [lo, hi) of split `split` of row b: the row's visible keys [0, min(kv_len,
  q_pos + 1)) cut into NS runs of whole blocks."""
  qpos = tl.load(QPOS + b)
  kvl = tl.load(KVLEN + b)
  limit = tl.maximum(tl.minimum(kvl, qpos + 1), 0)
  per = tl.cdiv(tl.cdiv(limit, BLOCK_N), NS)
  lo = split * per * BLOCK_N
  hi = tl.minimum(lo + per * BLOCK_N, limit)
  return lo, hi


@triton.jit
def _full_decode_kernel(Q, K, KS, KZ, V, VS, VZ, QPOS, KVLEN, OP, MP, LP,
                        SQB: tl.constexpr, SQH: tl.constexpr, SQG: tl.constexpr,
                        SKB: tl.constexpr, SKS: tl.constexpr, SKH: tl.constexpr,
                        SVB: tl.constexpr, SVS: tl.constexpr, SVH: tl.constexpr,
                        SCB: tl.constexpr, SCS: tl.constexpr, SCH: tl.constexpr,
                        H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                        BD: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
                        NS: tl.constexpr, BLOCK_N: tl.constexpr, QK_SCALE: tl.constexpr,
                        IEEE: tl.constexpr, FOLD: tl.constexpr, F16C: tl.constexpr):
  """K / V: plain values, or (KBITS / VBITS > 0) codes with per-row scales and zeros KS, KZ,
  VS, VZ (strides SC*; for a plain cache they repeat K / V and are never read). V's strides
  SV* differ from K's when their bits do (k8v4)."""
  split = tl.program_id(0)
  h = tl.program_id(1)
  b = tl.program_id(2)
  lo, hi = _split_range(QPOS, KVLEN, b, split, NS, BLOCK_N)
  q = _load_q(Q, b, h, SQB, SQH, SQG, G, GP, D, BD)
  off = b.to(tl.int64) * SKB + h * SKH + lo.to(tl.int64) * SKS
  voff = b.to(tl.int64) * SVB + h * SVH + lo.to(tl.int64) * SVS
  soff = b.to(tl.int64) * SCB + h * SCH + lo.to(tl.int64) * SCS
  m_i = tl.full([GP], float("-inf"), tl.float32)
  l_i = tl.zeros([GP], tl.float32)
  acc = tl.zeros([GP, BD], tl.float32)
  m_i, l_i, acc = _scan(q, K + off, KS + soff, KZ + soff, V + voff, VS + soff, VZ + soff, lo,
                        hi, QPOS, 0, m_i, l_i, acc, SKS, SVS, SCS, D, BD, KBITS, VBITS, BLOCK_N,
                        QK_SCALE, IEEE, False, 0, 0, FOLD, F16C)
  _store_partial(OP, MP, LP, ((b * H + h) * NS + split) * G, m_i, l_i, acc, G, GP, D, BD)


@triton.jit
def _duo_decode_kernel(Q, K, KS, KZ, V, VS, VZ, QPOS, KVLEN, SK, SKS_, SKZ, SV, SVS_, SVZ, SPOS,
                       KN, KNS, KNZ, VN, VNS, VNZ, NVALID, OP, MP, LP,
                       SQB: tl.constexpr, SQH: tl.constexpr, SQG: tl.constexpr,
                       SKB: tl.constexpr, SKS: tl.constexpr, SKH: tl.constexpr,
                       SVB: tl.constexpr, SVS: tl.constexpr, SVH: tl.constexpr,
                       SCB: tl.constexpr, SCS: tl.constexpr, SCH: tl.constexpr,
                       SSB: tl.constexpr, SSW: tl.constexpr, SSH: tl.constexpr,
                       SSVB: tl.constexpr, SSVW: tl.constexpr, SSVH: tl.constexpr,
                       SSCB: tl.constexpr, SSCW: tl.constexpr, SSCH: tl.constexpr,
                       SNB: tl.constexpr, SNH: tl.constexpr, SNVB: tl.constexpr,
                       SNVH: tl.constexpr, SNCB: tl.constexpr,
                       SNCH: tl.constexpr, HR: tl.constexpr, HS: tl.constexpr, W: tl.constexpr,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                       KBITS: tl.constexpr, VBITS: tl.constexpr, NS: tl.constexpr,
                       BLOCK_N: tl.constexpr,
                       SBLOCK_N: tl.constexpr, SINK: tl.constexpr, RECENT: tl.constexpr,
                       QK_SCALE: tl.constexpr, IEEE: tl.constexpr,
                       FOLD: tl.constexpr, F16C: tl.constexpr, NEW: tl.constexpr):
  """One launch for a DuoAttention layer: programs [0, NS * HR) are the retrieval
  heads' splits over the full cache, programs [NS * HR, NS * HR + HS) the streaming
  heads over sink + ring + the new token. All write partials; `_combine_kernel`
  (with HR) merges them into the layer's whole output, so no concatenation follows.
  Each buffer comes as (values or codes, scale, zero) as in `_full_decode_kernel`.
  NEW: the full cache does not hold the new token yet (KVLEN = the tokens before it);
  split 0 of each retrieval head folds it in from KN / VN, and `_combine_write_kernel`
  then writes it (HS may be 0: a layer of retrieval heads only)."""
  pid = tl.program_id(0)
  b = tl.program_id(1)
  m_i = tl.full([GP], float("-inf"), tl.float32)
  l_i = tl.zeros([GP], tl.float32)
  acc = tl.zeros([GP, BD], tl.float32)
  if pid < NS * HR:
    split = pid % NS
    h = pid // NS
    lo, hi = _split_range(QPOS, KVLEN, b, split, NS, BLOCK_N)
    q = _load_q(Q, b, h, SQB, SQH, SQG, G, GP, D, BD)
    off = b.to(tl.int64) * SKB + h * SKH + lo.to(tl.int64) * SKS
    voff = b.to(tl.int64) * SVB + h * SVH + lo.to(tl.int64) * SVS
    soff = b.to(tl.int64) * SCB + h * SCH + lo.to(tl.int64) * SCS
    m_i, l_i, acc = _scan(q, K + off, KS + soff, KZ + soff, V + voff, VS + soff, VZ + soff, lo,
                          hi, QPOS, 0, m_i, l_i, acc, SKS, SVS, SCS, D, BD, KBITS, VBITS,
                          BLOCK_N, QK_SCALE, IEEE, False, 0, 0, FOLD, F16C)
    if NEW:
      if split == 0:  # no split reads slot KVLEN, which the combine kernel writes
        nb = b.to(tl.int64) * SNB + h * SNH
        ns = b.to(tl.int64) * SNCB + h * SNCH
        m_i, l_i, acc = _add_new_token(q, KN + nb, KNS + ns, KNZ + ns,
                                       VN + b.to(tl.int64) * SNVB + h * SNVH, VNS + ns,
                                       VNZ + ns, tl.load(NVALID + b), tl.load(QPOS + b), m_i,
                                       l_i, acc, D, BD, KBITS, VBITS, QK_SCALE, 0, 1)
    _store_partial(OP, MP, LP, ((b * (HR + HS) + h) * NS + split) * G, m_i, l_i, acc, G, GP, D,
                   BD)
  else:
    hs = pid - NS * HR
    h = HR + hs
    qpos = tl.load(QPOS + b)
    q = _load_q(Q, b, h, SQB, SQH, SQG, G, GP, D, BD)
    off = b.to(tl.int64) * SSB + hs * SSH
    voff = b.to(tl.int64) * SSVB + hs * SSVH
    soff = b.to(tl.int64) * SSCB + hs * SSCH
    m_i, l_i, acc = _scan(q, SK + off, SKS_ + soff, SKZ + soff, SV + voff, SVS_ + soff,
                          SVZ + soff, 0, W, SPOS + b * W, qpos, m_i, l_i, acc, SSW, SSVW, SSCW,
                          D, BD, KBITS, VBITS, SBLOCK_N, QK_SCALE, IEEE, True, SINK, RECENT,
                          FOLD, F16C)
    nb = b.to(tl.int64) * SNB + h * SNH
    nvb = b.to(tl.int64) * SNVB + h * SNVH
    ns = b.to(tl.int64) * SNCB + h * SNCH
    m_i, l_i, acc = _add_new_token(q, KN + nb, KNS + ns, KNZ + ns, VN + nvb, VNS + ns, VNZ + ns,
                                   tl.load(NVALID + b), qpos, m_i, l_i, acc, D, BD, KBITS,
                                   VBITS, QK_SCALE, SINK, RECENT)
    _store_partial(OP, MP, LP, ((b * (HR + HS) + h) * NS) * G, m_i, l_i, acc, G, GP, D, BD)


@triton.jit
def _combine(OP, MP, LP, OUT, g, h, b, SOB: tl.constexpr, SOH: tl.constexpr,
             SOG: tl.constexpr, H: tl.constexpr, HR: tl.constexpr, G: tl.constexpr,
             D: tl.constexpr, BD: tl.constexpr, NS: tl.constexpr, NSP: tl.constexpr):
  """Merges the partials of query head g of KV head h in row b, all loads at once: NS
  splits for heads h < HR, the single partial (split 0) of a streaming head."""
  offs_s = tl.arange(0, NSP)
  offs_d = tl.arange(0, BD)
  smask = offs_s < tl.where(h < HR, NS, 1)
  dmask = offs_d < D
  rows = ((b * H + h) * NS + offs_s) * G + g
  m = tl.load(MP + rows, mask=smask, other=float("-inf"))
  l = tl.load(LP + rows, mask=smask, other=0.0)
  o = tl.load(OP + rows[:, None].to(tl.int64) * D + offs_d[None, :],
              mask=smask[:, None] & dmask[None, :], other=0.0)
  m_max = tl.max(m, 0)
  m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # a row that saw no key at all
  w = tl.exp2(m - m_max)  # 0 for empty splits
  num = tl.sum(w[:, None] * o, 0)
  den = tl.sum(w * l, 0)
  out = num / tl.maximum(den, 1e-30)
  tl.store(OUT + b.to(tl.int64) * SOB + h * SOH + g * SOG + offs_d,
           out.to(OUT.dtype.element_ty), mask=dmask)


@triton.jit
def _combine_kernel(OP, MP, LP, OUT,
                    SOB: tl.constexpr, SOH: tl.constexpr, SOG: tl.constexpr,
                    H: tl.constexpr, HR: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                    BD: tl.constexpr, NS: tl.constexpr, NSP: tl.constexpr):
  """Program (g, h, b) merges the partials of one query head (`_combine`)."""
  _combine(OP, MP, LP, OUT, tl.program_id(0), tl.program_id(1), tl.program_id(2), SOB, SOH,
           SOG, H, HR, G, D, BD, NS, NSP)


@triton.jit
def _copy_token(src, ssrc, zsrc, dst, sdst, zdst, N: tl.constexpr, BN: tl.constexpr,
                QUANT: tl.constexpr):
  """One token's row of N values or codes (and, QUANT, its scale and zero) src -> dst."""
  offs = tl.arange(0, BN)
  tl.store(dst + offs, tl.load(src + offs, mask=offs < N), mask=offs < N)
  if QUANT:
    tl.store(sdst, tl.load(ssrc))
    tl.store(zdst, tl.load(zsrc))


@triton.jit
def _combine_write(OP, MP, LP, START, NVALID, KN, KNS, KNZ, VN, VNS, VNZ, K, KS, KZ, V, VS,
                   VZ, SK, SKS_, SKZ, SV, SVS_, SVZ, OUT, H: tl.constexpr, HR: tl.constexpr,
                   G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, NS: tl.constexpr,
                   NSP: tl.constexpr, CAP: tl.constexpr, W: tl.constexpr, DK: tl.constexpr,
                   DV: tl.constexpr, BDC: tl.constexpr, SINK: tl.constexpr,
                   RECENT: tl.constexpr, QUANT: tl.constexpr):
  """`_combine`, and program (0, h, b) moves row b's new token of KV head h (KN, VN
  [B, 1, H, DK / DV] codes or values, scales and zeros [B, 1, H, 1]) where the cache
  keeps it: slot START[b] of the full cache K, V [B, CAP, HR, DK / DV] for h < HR (none
  past CAP), else the streaming head's sink or ring slot of SK, SV [B, W, H - HR, ...]
  (none when the window keeps no recent token). A row with no new token (NVALID 0) writes
  nothing, as `cache.write_full` / `write_stream` would not. The buffers are aliased to
  the kernel's outputs, so the write is in place."""
  g = tl.program_id(0)
  h = tl.program_id(1)
  b = tl.program_id(2)
  _combine(OP, MP, LP, OUT, g, h, b, H * G * D, G * D, D, H, HR, G, D, BD, NS, NSP)
  start = tl.load(START + b)
  go = (g == 0) & (tl.load(NVALID + b) > 0)
  src = b * H + h  # the new token's row among [B, 1, H]
  if h < HR:
    dst = (b.to(tl.int64) * CAP + start) * HR + h
    go = go & (start < CAP)
    kd, kds, kdz, vd, vds, vdz = K, KS, KZ, V, VS, VZ
  else:
    if RECENT > 0:
      slot = tl.where(start < SINK, start, SINK + (start - SINK) % RECENT)
    else:
      slot = start
      go = go & (start < SINK)
    dst = (b.to(tl.int64) * W + slot) * (H - HR) + (h - HR)
    kd, kds, kdz, vd, vds, vdz = SK, SKS_, SKZ, SV, SVS_, SVZ
  if go:
    _copy_token(KN + src * DK, KNS + src, KNZ + src, kd + dst * DK, kds + dst, kdz + dst, DK,
                BDC, QUANT)
    _copy_token(VN + src * DV, VNS + src, VNZ + src, vd + dst * DV, vds + dst, vdz + dst, DV,
                BDC, QUANT)


# The write kernels differ only in which buffers are aliased to outputs (jax-triton passes
# an output's pointer after the inputs, so each aliased buffer is a parameter): plain or
# quantised (codes, scales, zeros), with or without a streaming part. The trailing output
# parameters are the same buffers as the inputs they alias and are not read.
@triton.jit
def _combine_write_kernel(OP, MP, LP, START, NVALID, KN, VN, K, V, SK, SV, OUT, K_, V_, SK_,
                          SV_, H: tl.constexpr, HR: tl.constexpr, G: tl.constexpr,
                          D: tl.constexpr, BD: tl.constexpr, NS: tl.constexpr,
                          NSP: tl.constexpr, CAP: tl.constexpr, W: tl.constexpr,
                          DK: tl.constexpr, DV: tl.constexpr, BDC: tl.constexpr,
                          SINK: tl.constexpr, RECENT: tl.constexpr):
  _combine_write(OP, MP, LP, START, NVALID, KN, KN, KN, VN, VN, VN, K, K, K, V, V, V, SK, SK,
                 SK, SV, SV, SV, OUT, H, HR, G, D, BD, NS, NSP, CAP, W, DK, DV, BDC, SINK,
                 RECENT, False)


@triton.jit
def _combine_write_full_kernel(OP, MP, LP, START, NVALID, KN, VN, K, V, OUT, K_, V_,
                               H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                               BD: tl.constexpr, NS: tl.constexpr, NSP: tl.constexpr,
                               CAP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                               BDC: tl.constexpr):
  _combine_write(OP, MP, LP, START, NVALID, KN, KN, KN, VN, VN, VN, K, K, K, V, V, V, K, K,
                 K, V, V, V, OUT, H, H, G, D, BD, NS, NSP, CAP, 1, DK, DV, BDC, 0, 0, False)


@triton.jit
def _combine_write_quant_kernel(OP, MP, LP, START, NVALID, KN, KNS, KNZ, VN, VNS, VNZ, K, KS,
                                KZ, V, VS, VZ, SK, SKS_, SKZ, SV, SVS_, SVZ, OUT, K_, KS_, KZ_,
                                V_, VS_, VZ_, SK_, SKS__, SKZ_, SV_, SVS__, SVZ_,
                                H: tl.constexpr, HR: tl.constexpr, G: tl.constexpr,
                                D: tl.constexpr, BD: tl.constexpr, NS: tl.constexpr,
                                NSP: tl.constexpr, CAP: tl.constexpr, W: tl.constexpr,
                                DK: tl.constexpr, DV: tl.constexpr, BDC: tl.constexpr,
                                SINK: tl.constexpr, RECENT: tl.constexpr):
  _combine_write(OP, MP, LP, START, NVALID, KN, KNS, KNZ, VN, VNS, VNZ, K, KS, KZ, V, VS, VZ,
                 SK, SKS_, SKZ, SV, SVS_, SVZ, OUT, H, HR, G, D, BD, NS, NSP, CAP, W, DK, DV,
                 BDC, SINK, RECENT, True)


@triton.jit
def _combine_write_full_quant_kernel(OP, MP, LP, START, NVALID, KN, KNS, KNZ, VN, VNS, VNZ, K,
                                     KS, KZ, V, VS, VZ, OUT, K_, KS_, KZ_, V_, VS_, VZ_,
                                     H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                                     BD: tl.constexpr, NS: tl.constexpr, NSP: tl.constexpr,
                                     CAP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                                     BDC: tl.constexpr):
  _combine_write(OP, MP, LP, START, NVALID, KN, KNS, KNZ, VN, VNS, VNZ, K, KS, KZ, V, VS, VZ,
                 K, KS, KZ, V, VS, VZ, OUT, H, H, G, D, BD, NS, NSP, CAP, 1, DK, DV, BDC, 0, 0,
                 True)


@triton.jit
def _stream_decode_kernel(Q, SK, SKS_, SKZ, SV, SVS_, SVZ, SPOS, KN, KNS, KNZ, VN, VNS, VNZ,
                          QPOS, NVALID, OUT,
                          SQB: tl.constexpr, SQH: tl.constexpr, SQG: tl.constexpr,
                          SSB: tl.constexpr, SSW: tl.constexpr, SSH: tl.constexpr,
                          SSVB: tl.constexpr, SSVW: tl.constexpr, SSVH: tl.constexpr,
                          SSCB: tl.constexpr, SSCW: tl.constexpr, SSCH: tl.constexpr,
                          SNB: tl.constexpr, SNH: tl.constexpr, SNVB: tl.constexpr,
                          SNVH: tl.constexpr, SNCB: tl.constexpr,
                          SNCH: tl.constexpr, W: tl.constexpr, G: tl.constexpr,
                          GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                          KBITS: tl.constexpr, VBITS: tl.constexpr, BLOCK_N: tl.constexpr,
                          SINK: tl.constexpr,
                          RECENT: tl.constexpr, QK_SCALE: tl.constexpr, IEEE: tl.constexpr,
                          FOLD: tl.constexpr, F16C: tl.constexpr):
  h = tl.program_id(0)
  b = tl.program_id(1)
  qpos = tl.load(QPOS + b)
  q = _load_q(Q, b, h, SQB, SQH, SQG, G, GP, D, BD)
  m_i = tl.full([GP], float("-inf"), tl.float32)
  l_i = tl.zeros([GP], tl.float32)
  acc = tl.zeros([GP, BD], tl.float32)
  off = b.to(tl.int64) * SSB + h * SSH
  voff = b.to(tl.int64) * SSVB + h * SSVH
  soff = b.to(tl.int64) * SSCB + h * SSCH
  m_i, l_i, acc = _scan(q, SK + off, SKS_ + soff, SKZ + soff, SV + voff, SVS_ + soff, SVZ + soff,
                        0, W, SPOS + b * W, qpos, m_i, l_i, acc, SSW, SSVW, SSCW, D, BD, KBITS,
                        VBITS, BLOCK_N, QK_SCALE, IEEE, True, SINK, RECENT, FOLD, F16C)
  nb = b.to(tl.int64) * SNB + h * SNH
  nvb = b.to(tl.int64) * SNVB + h * SNVH
  ns = b.to(tl.int64) * SNCB + h * SNCH
  m_i, l_i, acc = _add_new_token(q, KN + nb, KNS + ns, KNZ + ns, VN + nvb, VNS + ns, VNZ + ns,
                                 tl.load(NVALID + b), qpos, m_i, l_i, acc, D, BD, KBITS, VBITS,
                                 QK_SCALE, SINK, RECENT)
  out = acc / tl.maximum(l_i, 1e-30)[:, None]
  offs_g = tl.arange(0, GP)
  offs_d = tl.arange(0, BD)
  tl.store(OUT + b.to(tl.int64) * SQB + h * SQH + offs_g[:, None] * SQG + offs_d[None, :],
           out.to(OUT.dtype.element_ty), mask=(offs_g[:, None] < G) & (offs_d[None, :] < D))


# -- launch plans (static shapes only) ------------------------------------------------

def bit_pair(bits) -> tuple[int, int]:
  """(key bits, value bits) from one number (both alike) or a pair (k8v4: (8, 4))."""
  kb, vb = (bits, bits) if isinstance(bits, int) else (int(bits[0]), int(bits[1]))
  if (kb == 0) != (vb == 0):
    raise ValueError(f"keys and values are both plain or both quantised, not {kb} and {vb} bits")
  return kb, vb


def decode_config(bits, cfg=None) -> dict:
  """The split-K kernel's tuning for a cache of `bits` (0: plain; a (key, value) pair for
  k8v4): `cfg` when given, else DECODE_CONFIG with the quantised overrides of
  QUANT_DECODE_CONFIG: a mixed cache's own entry (its (key, value) pair) when there is one,
  else the narrower buffer's (its tiles cost the most to convert)."""
  if cfg is not None:
    return cfg
  kb, vb = bit_pair(bits)
  if not kb:
    return DECODE_CONFIG
  over = QUANT_DECODE_CONFIG.get((kb, vb)) if kb != vb else None
  return {**DECODE_CONFIG, **(over if over is not None else
                              QUANT_DECODE_CONFIG.get(min(kb, vb), {}))}


def _fold(bits, cfg) -> bool:
  """Fold the scales out of the products (see `_scan`): only for a quantised cache."""
  return bool(bit_pair(bits)[0]) and bool(cfg.get("fold_scales", False))


def f16_codes(bits, cfg, dtype) -> int:
  """The F16C constant: 0 off; else 1 (fp16 codes, `_scan_codes`) | 2 (int4 keys read as
  nibble halves) | 4 (int4 values so). On for a quantised cache read with a bf16 / fp16 q
  unless `cfg` turns "f16_codes" off (fp32 keeps the exact dequantise-then-multiply path);
  cfg's "nibble_halves" ("k", "v", "kv" or "") picks the halves, default NIBBLE_HALVES."""
  if not (bit_pair(bits)[0] and dtype_name(dtype) in ("bfloat16", "float16")
          and cfg.get("f16_codes", F16_CODES_DEFAULT)):
    return 0
  halves = cfg.get("nibble_halves", NIBBLE_HALVES)
  return 1 | (2 if "k" in halves else 0) | (4 if "v" in halves else 0)


def n_splits(b: int, h: int, s: int, cfg=None) -> int:
  cfg = cfg or DECODE_CONFIG
  ns = cdiv(cfg["programs"], b * h)
  return max(1, min(ns, cfg["max_splits"], cdiv(s, cfg["block_n"])))


def full_decode_plans(q_shape, k_shape, dtype, cfg=None, bits=0):
  """q [B, 1, H, G, D]; k, v [B, S, H, D] (logical shape; bits 8 / 4, or a (key, value)
  pair: quantised, given as codes, scales, zeros) -> (split launch, combine launch).
  dtype: the compute dtype."""
  cfg = decode_config(bits, cfg)
  kb, vb = bit_pair(bits)
  b, t, h, g, d = q_shape
  s = k_shape[1]
  assert t == 1
  ns = n_splits(b, h, s, cfg)
  gp, bd = max(16, next_pow2(g)), max(16, next_pow2(d))
  sq = strides(q_shape)
  sk, sc = kv_strides(k_shape, kb)
  sv, _ = kv_strides(k_shape, vb)
  ieee = dtype_name(dtype) == "float32"
  split = Launch(
      _full_decode_kernel, (ns, h, b),
      (((b, h, ns, g, d), "float32"), ((b, h, ns, g), "float32"), ((b, h, ns, g), "float32")),
      dict(SQB=sq[0], SQH=sq[2], SQG=sq[3], SKB=sk[0], SKS=sk[1], SKH=sk[2], SVB=sv[0],
           SVS=sv[1], SVH=sv[2], SCB=sc[0], SCS=sc[1], SCH=sc[2], H=h, G=g, GP=gp, D=d, BD=bd,
           KBITS=kb, VBITS=vb, NS=ns,
           BLOCK_N=cfg["block_n"], QK_SCALE=float(LOG2E / math.sqrt(d)), IEEE=ieee,
           FOLD=_fold(bits, cfg), F16C=f16_codes(bits, cfg, dtype)),
      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
  return split, _combine_plan(q_shape, dtype, h, ns)


def _combine_plan(q_shape, dtype, n_retrieval, ns):
  b, _, h, g, d = q_shape
  sq = strides(q_shape)
  return Launch(
      _combine_kernel, (g, h, b), ((tuple(q_shape), dtype_name(dtype)),),
      dict(SOB=sq[0], SOH=sq[2], SOG=sq[3], H=h, HR=n_retrieval, G=g, D=d,
           BD=max(16, next_pow2(d)), NS=ns, NSP=max(2, next_pow2(ns))),
      num_warps=8 if ns * d > 8192 else 4, num_stages=1)


def duo_decode_plans(q_shape, k_shape, slot_shape, dtype, sink, recent, cfg=None, scfg=None,
                     bits=0, new=False):
  """q [B, 1, Hr + Hs, G, D]; k, v [B, S, Hr, D]; slot k/v [B, W, Hs, D]; new k/v
  [B, 1, Hr + Hs, D] (logical shapes; bits 8 / 4 or a (key, value) pair: all of them
  quantised) -> (fused split launch, combine launch). new: the kernel's NEW (the full
  cache lacks the new token; `decode_write`), which also allows slot_shape None (Hs 0)."""
  cfg = decode_config(bits, cfg)
  kb, vb = bit_pair(bits)
  scfg = scfg or STREAM_DECODE_CONFIG
  b, t, h, g, d = q_shape
  s, hr = k_shape[1], k_shape[2]
  if slot_shape is None:  # no streaming part: its arguments are never read
    slot_shape = (b, 1, 0, d)
  w, hs = slot_shape[1], slot_shape[2]
  assert t == 1 and hr + hs == h and hr > 0 and (hs > 0 or new), (q_shape, k_shape, slot_shape)
  ns = n_splits(b, hr, s, cfg)
  sq = strides(q_shape)
  (sk, sc), (ss, ssc), (sn, snc) = (kv_strides(x, kb) for x in (k_shape, slot_shape,
                                                                (b, 1, h, d)))
  sv, ssv, snv = (kv_strides(x, vb)[0] for x in (k_shape, slot_shape, (b, 1, h, d)))
  split = Launch(
      _duo_decode_kernel, (ns * hr + hs, b),
      (((b, h, ns, g, d), "float32"), ((b, h, ns, g), "float32"), ((b, h, ns, g), "float32")),
      dict(SQB=sq[0], SQH=sq[2], SQG=sq[3], SKB=sk[0], SKS=sk[1], SKH=sk[2], SVB=sv[0],
           SVS=sv[1], SVH=sv[2], SCB=sc[0], SCS=sc[1], SCH=sc[2], SSB=ss[0], SSW=ss[1],
           SSH=ss[2], SSVB=ssv[0], SSVW=ssv[1], SSVH=ssv[2], SSCB=ssc[0], SSCW=ssc[1],
           SSCH=ssc[2], SNB=sn[0], SNH=sn[2], SNVB=snv[0], SNVH=snv[2], SNCB=snc[0],
           SNCH=snc[2], HR=hr, HS=hs, W=w, G=g, GP=max(16, next_pow2(g)), D=d,
           BD=max(16, next_pow2(d)), KBITS=kb, VBITS=vb, NS=ns,
           BLOCK_N=cfg["block_n"], SBLOCK_N=scfg["block_n"], SINK=int(sink), RECENT=int(recent),
           QK_SCALE=float(LOG2E / math.sqrt(d)), IEEE=dtype_name(dtype) == "float32",
           FOLD=_fold(bits, cfg), F16C=f16_codes(bits, cfg, dtype), NEW=bool(new)),
      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
  return split, _combine_plan(q_shape, dtype, hr, ns)


def combine_write_plan(q_shape, dtype, n_retrieval, ns, buffers, sink=0, recent=0,
                       bits=0):
  """The combine launch that also writes the new token (`_combine_write`). buffers: (shape,
  dtype) of each cache buffer it updates in place, in kernel order (the full part's key
  codes / values, [scales, zeros,] its values ..., then the streaming part's likewise);
  they are the last inputs and alias the outputs after the layer's output."""
  b, _, h, g, d = q_shape
  kb, vb = bit_pair(bits)
  quant, stream = bool(kb), n_retrieval < h
  dk, dv = (d // 2 if x == 4 else d for x in (kb, vb))
  kernel = {(False, True): _combine_write_kernel, (False, False): _combine_write_full_kernel,
            (True, True): _combine_write_quant_kernel,
            (True, False): _combine_write_full_quant_kernel}[quant, stream]
  per = 6 if quant else 2
  assert len(buffers) == per * (2 if stream else 1), (len(buffers), quant, stream)
  first = 5 + (6 if quant else 2)  # OP, MP, LP, START, NVALID, then the new k / v parts
  consts = dict(H=h, G=g, D=d, BD=max(16, next_pow2(d)), NS=ns, NSP=max(2, next_pow2(ns)),
                CAP=int(buffers[0][0][1]), DK=dk, DV=dv, BDC=max(16, next_pow2(max(dk, dv))))
  if stream:
    consts.update(HR=n_retrieval, W=int(buffers[per][0][1]), SINK=int(sink),
                  RECENT=int(recent))
  return Launch(kernel, (g, h, b),
                ((tuple(q_shape), dtype_name(dtype)),
                 *((tuple(sh), dtype_name(dt)) for sh, dt in buffers)),
                consts, num_warps=8 if ns * d > 8192 else 4, num_stages=1,
                aliases=tuple((first + i, 1 + i) for i in range(len(buffers))))


def stream_decode_plan(q_shape, slot_shape, dtype, sink, recent, cfg=None, bits=0):
  """q [B, 1, H, G, D]; slot k/v [B, W, H, D]; new k/v [B, 1, H, D] (logical shapes; bits
  as for `full_decode_plans`)."""
  cfg = cfg or STREAM_DECODE_CONFIG
  kb, vb = bit_pair(bits)
  b, t, h, g, d = q_shape
  w = slot_shape[1]
  sq = strides(q_shape)
  (ss, ssc), (sn, snc) = (kv_strides(x, kb) for x in (slot_shape, (b, 1, h, d)))
  ssv, snv = (kv_strides(x, vb)[0] for x in (slot_shape, (b, 1, h, d)))
  return Launch(
      _stream_decode_kernel, (h, b), ((tuple(q_shape), dtype_name(dtype)),),
      dict(SQB=sq[0], SQH=sq[2], SQG=sq[3], SSB=ss[0], SSW=ss[1], SSH=ss[2], SSVB=ssv[0],
           SSVW=ssv[1], SSVH=ssv[2], SSCB=ssc[0], SSCW=ssc[1], SSCH=ssc[2], SNB=sn[0],
           SNH=sn[2], SNVB=snv[0], SNVH=snv[2], SNCB=snc[0], SNCH=snc[2], W=w, G=g,
           GP=max(16, next_pow2(g)), D=d, BD=max(16, next_pow2(d)), KBITS=kb, VBITS=vb,
           BLOCK_N=cfg["block_n"], SINK=int(sink), RECENT=int(recent),
           QK_SCALE=float(LOG2E / math.sqrt(d)), IEEE=dtype_name(dtype) == "float32",
           FOLD=_fold(bits, decode_config(bits)), F16C=f16_codes(bits, decode_config(bits), dtype)),
      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# -- the ops (dispatch signatures) ----------------------------------------------------
# A cache buffer is plain values or (duojax.kv_quant) a quantised one, read by its fields:
# its codes are dequantised in the kernel, and the compute dtype is then q's.

def compute_dtype(q, buf):
  """A plain cache's own dtype (a cast of q is cheap, of the cache not); q's when
  quantised (the dequantised tiles are rounded to it for the tensor-core products)."""
  return q.dtype if kv_bits(buf) else buf.dtype


def full_decode(q, k_cache, v_cache, q_pos, kv_len, *, return_partial: bool = False):
  """Retrieval heads, one token per row. q [B, 1, H, G, D]; k/v_cache [B, S, H, D]
  (plain or quantised); q_pos [B, 1]; kv_len [B]. Reads keys [0, min(kv_len, q_pos + 1))
  of each row.

  return_partial: instead of the output, the softmax state of those keys, (m, l
  [B, 1, H, G], acc [B, 1, H, G, D]) in fp32 (`merge_splits`); q_pos may be negative
  (the row sees no key: m = -inf, l = 0)."""
  import jax.numpy as jnp
  dt = compute_dtype(q, k_cache)
  split, combine = full_decode_plans(q.shape, k_cache.shape, dt,
                                     bits=(kv_bits(k_cache), kv_bits(v_cache)))
  op, mp, lp = split.jax(q.astype(dt), *kv_parts(k_cache, dt), *kv_parts(v_cache, dt),
                         q_pos.astype(jnp.int32), kv_len.astype(jnp.int32))
  if return_partial:
    return merge_splits(op, mp, lp)
  (out,) = combine.jax(op, mp, lp)
  return out.astype(q.dtype)


def full_decode_partial(q, k_cache, v_cache, q_pos, kv_len):
  """`full_decode(..., return_partial=True)` under the op table's name."""
  return full_decode(q, k_cache, v_cache, q_pos, kv_len, return_partial=True)


def merge_splits(op, mp, lp):
  """The split kernel's partials -> one softmax state per query head, what
  `_combine_kernel` computes before its division, in jnp.

  op [B, H, NS, G, D] unnormalised, mp / lp [B, H, NS, G] (base 2: m is the max of
  logit * log2(e)) -> (m, l [B, 1, H, G], acc [B, 1, H, G, D]) fp32 in natural units:
  exp2(s2 - m2) = exp(s - m2 / log2(e)), so l and acc carry over and only m is rescaled.
  An empty split has m = -inf and weighs 0; a row with no key gets m = -inf, l = 0.
  """
  import jax.numpy as jnp
  m2 = jnp.max(mp, axis=2)  # [B, H, G]
  w = jnp.exp2(mp - jnp.where(jnp.isfinite(m2), m2, 0.0)[:, :, None])  # exp2(-inf) = 0
  l = jnp.sum(w * lp, axis=2)
  acc = jnp.sum(w[..., None] * op, axis=2)  # elementwise: no TF32 matmul on the way
  m = jnp.where(l > 0, m2 / LOG2E, -jnp.inf)
  return m[:, None], l[:, None], acc[:, None]


def slot_positions(slot_pos, slot_valid):
  """One int32 array: a slot's position, or a far-future one when it is empty."""
  import jax.numpy as jnp
  return jnp.where(slot_valid, slot_pos.astype(jnp.int32), _FAR)


def streaming_decode(q, slot_k, slot_v, slot_pos, slot_valid, k, v, q_pos, n_valid, sink,
                     recent):
  """Streaming heads, one token per row: sink + ring slots and the new token (slots and
  the new k, v both plain or both quantised)."""
  import jax.numpy as jnp
  dt = compute_dtype(q, slot_k)
  plan = stream_decode_plan(q.shape, slot_k.shape, dt, sink, recent,
                            bits=(kv_bits(slot_k), kv_bits(slot_v)))
  (out,) = plan.jax(q.astype(dt), *kv_parts(slot_k, dt), *kv_parts(slot_v, dt),
                    slot_positions(slot_pos, slot_valid), *kv_parts(k, dt), *kv_parts(v, dt),
                    q_pos.astype(jnp.int32), n_valid.astype(jnp.int32))
  return out.astype(q.dtype)


def duo_decode(q, k_cache, v_cache, q_pos, kv_len, slot_k, slot_v, slot_pos, slot_valid, k, v,
               n_valid, sink, recent):
  """A DuoAttention layer's whole decode attention in one launch (+ the merge).

  q [B, 1, Hr + Hs, G, D] (retrieval heads first); k/v_cache [B, S, Hr, D] (the
  new token already written); slot_k/v [B, W, Hs, D] (before it); k, v
  [B, 1, Hr + Hs, D] the new token's keys/values (the streaming heads' are read
  from here); q_pos [B, 1]; kv_len, n_valid [B]. Returns [B, 1, Hr + Hs, G, D]:
  the concatenation of `full_decode` on the leading Hr heads and
  `streaming_decode` on the rest. Quantised: every key buffer (and k) with one number of
  bits, every value buffer (and v) with one (k8v4: 8 and 4).
  """
  import jax.numpy as jnp
  dt = compute_dtype(q, k_cache)
  split, combine = duo_decode_plans(q.shape, k_cache.shape, slot_k.shape, dt, sink, recent,
                                    bits=(kv_bits(k_cache), kv_bits(v_cache)))
  op, mp, lp = split.jax(q.astype(dt), *kv_parts(k_cache, dt), *kv_parts(v_cache, dt),
                         q_pos.astype(jnp.int32), kv_len.astype(jnp.int32),
                         *kv_parts(slot_k, dt), *kv_parts(slot_v, dt),
                         slot_positions(slot_pos, slot_valid), *kv_parts(k, dt),
                         *kv_parts(v, dt), n_valid.astype(jnp.int32))
  (out,) = combine.jax(op, mp, lp)
  return out.astype(q.dtype)


def _buffers(x) -> tuple:
  """A cache buffer's arrays in kernel order (codes, scale, zero; or the values)."""
  return (x.codes, x.scale, x.zero) if kv_bits(x) else (x,)


def _rebuild(like, arrays):
  """The buffer `like` from its arrays (`_buffers`' inverse)."""
  return like.__class__(*arrays, like.bits) if kv_bits(like) else arrays[0]


def decode_write(q, k_cache, v_cache, start, n_valid, k, v, stream=None):
  """One token's attention for a full or DuoAttention layer, with the new token's cache write
  in the same launches: the split kernel attends the cache before the token plus the token
  itself, and the combine kernel writes it in place (`_combine_write`), instead of a write
  by XLA before the attention (two scatters, and two ring selects for a DuoAttention
  layer, each a launch of its own).

  q [B, 1, H, G, D]; k/v_cache [B, S, Hr, D] (the full part, *without* the new token);
  start, n_valid [B]; k, v [B, 1, H, D] the new token as the caches store it (plain in
  their dtype, or quantised like them); stream None (Hr = H) or (slot_k, slot_v, slot_pos,
  slot_valid, sink, recent), the streaming part before the token. Returns (out
  [B, 1, H, G, D], k_cache, v_cache[, slot_k, slot_v]) with the token written where
  `cache.write_full` / `write_stream` would put it."""
  import jax.numpy as jnp
  dt = compute_dtype(q, k_cache)
  bits = (kv_bits(k_cache), kv_bits(v_cache))
  start = start.astype(jnp.int32)
  n_valid = n_valid.astype(jnp.int32)
  if stream is None:
    slot_k = slot_v = k
    slot_pos, sink, recent = start[:, None], 0, 0
    parts = (k_cache, v_cache)
  else:
    slot_k, slot_v, slot_pos, slot_valid, sink, recent = stream
    slot_pos = slot_positions(slot_pos, slot_valid)
    parts = (k_cache, v_cache, slot_k, slot_v)
  split, _ = duo_decode_plans(q.shape, k_cache.shape, None if stream is None else slot_k.shape,
                              dt, sink, recent, bits=bits, new=True)
  op, mp, lp = split.jax(q.astype(dt), *kv_parts(k_cache, dt), *kv_parts(v_cache, dt),
                         start[:, None], start, *kv_parts(slot_k, dt), *kv_parts(slot_v, dt),
                         slot_pos, *kv_parts(k, dt), *kv_parts(v, dt), n_valid)
  bufs = [a for x in parts for a in _buffers(x)]
  comb = combine_write_plan(q.shape, q.dtype, k_cache.shape[2], op.shape[2],
                            [(a.shape, a.dtype) for a in bufs], sink, recent, bits)
  out, *new = comb.jax(op, mp, lp, start, n_valid, *_buffers(k), *_buffers(v), *bufs)
  per = len(_buffers(k_cache))
  return (out, *(_rebuild(x, new[i * per:(i + 1) * per]) for i, x in enumerate(parts)))


def full_decode_write(q, k_cache, v_cache, start, n_valid, k, v):
  """`decode_write` for a layer of retrieval heads only -> (out, k_cache, v_cache)."""
  return decode_write(q, k_cache, v_cache, start, n_valid, k, v)


def duo_decode_write(q, k_cache, v_cache, start, n_valid, slot_k, slot_v, slot_pos, slot_valid,
                     k, v, sink, recent):
  """`decode_write` for a DuoAttention layer -> (out, k_cache, v_cache, slot_k, slot_v)."""
  return decode_write(q, k_cache, v_cache, start, n_valid, k, v,
                      (slot_k, slot_v, slot_pos, slot_valid, sink, recent))
