"""Prefill-chunk attention as Triton flash-attention kernels.

Both kernels pack a KV head's G query heads into the rows of one tile: row r of
program (m, h, b) is chunk token m * (BLOCK_M // G) + r // G, query head r % G,
so every key/value block is loaded once for the whole group (GQA).

full_chunk       retrieval heads: a chunk of queries over the cache written so
                 far (slot j = position j). Key blocks past the tile's last query
                 position or the row's kv_len are never visited; blocks wholly
                 before the tile's first query position run without a mask.
                 Cost O(T * kv_len).
streaming_chunk  streaming heads, the exact mask `j <= t and (j < sink or
                 t - j < recent)` over the W = sink + recent cache slots and the
                 chunk's own keys. Of the chunk it visits only the blocks holding
                 sink positions and the band [first query - recent + 1, last
                 query] of the tile, so a chunk costs O(T * (W + recent + BLOCK_M)),
                 independent of the sequence length.

Plain-jnp references: `duojax.attention.reference.full_chunk_attention` and
`streaming_chunk_attention` (same signatures).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from duojax.kernels.gpu import tokamax_chunk
from duojax.kernels.gpu.decode import (LOG2E, bit_pair, codes_tile_f16, compute_dtype, f16_codes,
                                       f16_query, fold_logits, fold_weights, load_kv,
                                       slot_positions)
from duojax.kernels.gpu.launch import (Launch, cdiv, dtype_name, kv_bits, kv_parts, kv_strides,
                                       next_pow2, strides)

# Tuning (H100, bf16, D = 128): 483-491 TFLOP/s for a 4096-token chunk over a 32K-128K
# prefix (infer/bench_kernels.py). BLOCK_M rows = tokens x G.
# f16_codes (decode.py's fp16 codes with the scales folded around the products) is off for
# the chunks: measured slower, an int4 duo 0.5 prefill to 128K took 19.95 s with it and
# 13.36 s without on an H100 (infer/results/h100-2026-12-07-eve/); compiled for sm_90 it
# spills more (infer/kernel_resources.py).
FULL_CHUNK_CONFIG = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3,
                     "f16_codes": False}
STREAM_CHUNK_CONFIG = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 2,
                       "f16_codes": False}


@triton.jit
def _query(q, F16C: tl.constexpr):
  """q as `_attend_block` takes it: (q16, qshift, qsum) of `decode.f16_query` with F16C,
  else (q, 1, 0)."""
  if F16C:
    q16, qshift, qsum = f16_query(q)
  else:
    q16, qshift, qsum = q, 1.0, tl.zeros([q.shape[0]], tl.float32)
  return q16, qshift, qsum


@triton.jit
def _attend_block(acc, m_i, l_i, q, qshift, qsum, kp, ksp, kzp, vp, vsp, vzp, n, kmask, vis,
                  SKS: tl.constexpr, SVS: tl.constexpr, SSS: tl.constexpr, D: tl.constexpr,
                  BD: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
                  QK_SCALE: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr,
                  F16C: tl.constexpr):
  """One key block: online-softmax update of (acc, m_i, l_i). kp/vp point at the
  block's first key (row strides SKS / SVS; ksp ... vzp at its scales and zeros when
  quantised: KBITS / VBITS > 0, row stride SSS); n [BLOCK_N] its in-block offsets; kmask
  [BLOCK_N] keys that exist; vis [BLOCK_M, BLOCK_N] the visibility mask (only used when
  MASKED). F16C: q, qshift, qsum from `_query`, and the codes go into fp16 products with
  the scales and zeros folded around them (decode.py's `_scan_codes`); else qshift and
  qsum are unused and quantised tiles are dequantised first."""
  if F16C:
    s = tl.dot(q, tl.trans(codes_tile_f16(kp, n, kmask, SKS, D, BD, KBITS)))
    s = fold_logits(s, ksp, kzp, n, kmask, SSS, qshift, qsum) * QK_SCALE
  else:
    k = load_kv(kp, ksp, kzp, n, kmask, SKS, SSS, D, BD, KBITS).to(q.dtype)
    if IEEE:
      s = tl.dot(q, tl.trans(k), input_precision="ieee") * QK_SCALE
    else:
      s = tl.dot(q, tl.trans(k)) * QK_SCALE
  if MASKED:
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
  else:
    m_new = tl.maximum(m_i, tl.max(s, 1))
  alpha = tl.exp2(m_i - m_new)
  p = tl.exp2(s - m_new[:, None])
  l_i = l_i * alpha + tl.sum(p, 1)
  if F16C:
    p16, vmax, zterm = fold_weights(p, vsp, vzp, n, kmask, SSS)
    acc = (acc * alpha[:, None]
           + tl.dot(p16, codes_tile_f16(vp, n, kmask, SVS, D, BD, VBITS)) * vmax + zterm)
  else:
    v = load_kv(vp, vsp, vzp, n, kmask, SVS, SSS, D, BD, VBITS).to(q.dtype)
    if IEEE:
      acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
      acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
  return acc, m_new, l_i


@triton.jit
def _q_tile(Q, pid_m, h, b, SQB: tl.constexpr, SQT: tl.constexpr, SQH: tl.constexpr,
            SQG: tl.constexpr, T: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
            BD: tl.constexpr, BLOCK_M: tl.constexpr):
  """The query tile of program (pid_m, h, b): row r is chunk token pid_m * (BLOCK_M // G)
  + r // G, query head r % G of KV head h. Returns (q [BLOCK_M, BD], tok, rmask, qoff)."""
  TPB: tl.constexpr = BLOCK_M // G
  r = tl.arange(0, BLOCK_M)
  tok = pid_m * TPB + r // G
  rmask = (r < TPB * G) & (tok < T)
  offs_d = tl.arange(0, BD)
  qoff = b.to(tl.int64) * SQB + tok * SQT + h * SQH + (r % G) * SQG
  q = tl.load(Q + qoff[:, None] + offs_d[None, :], mask=rmask[:, None] & (offs_d[None, :] < D),
              other=0.0)
  return q, tok, rmask, qoff


@triton.jit
def _full_chunk_tile(Q, K, KS, KZ, V, VS, VZ, QPOS, KVLEN,
                     SQB: tl.constexpr, SQT: tl.constexpr, SQH: tl.constexpr,
                     SQG: tl.constexpr, SKB: tl.constexpr, SKS: tl.constexpr,
                     SKH: tl.constexpr, SVB: tl.constexpr, SVS: tl.constexpr,
                     SVH: tl.constexpr, SCB: tl.constexpr, SCS: tl.constexpr,
                     SCH: tl.constexpr, T: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                     BD: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_SCALE: tl.constexpr,
                     IEEE: tl.constexpr, F16C: tl.constexpr):
  """Program (m, h, b)'s tile over its visible keys: (acc, m_i, l_i) unnormalised (base 2;
  m_i = 0 where a row saw nothing, l_i = 0 there), with the tile's qoff and rmask.
  K / V plain, or codes with scales and zeros KS ... VZ (KBITS / VBITS > 0, strides SC*;
  V's own strides SV*: a k8v4 cache's values are int4 beside int8 keys)."""
  h = tl.program_id(1)
  b = tl.program_id(2)
  q, tok, rmask, qoff = _q_tile(Q, tl.program_id(0), h, b, SQB, SQT, SQH, SQG, T, G, D, BD,
                                BLOCK_M)
  q, qshift, qsum = _query(q, F16C)
  offs_n = tl.arange(0, BLOCK_N)
  qpos = tl.load(QPOS + b * T + tok, mask=rmask, other=-1)
  kvl = tl.load(KVLEN + b)
  q_hi = tl.max(tl.where(rmask, qpos, -1), 0)
  q_lo = tl.min(tl.where(rmask, qpos, 1 << 30), 0)
  hi = tl.maximum(tl.minimum(kvl, q_hi + 1), 0)  # no key at or past hi is visible to any row
  # keys below min(kvl, q_lo + 1) are visible to every row: no mask there
  free = tl.maximum(tl.minimum(tl.minimum(kvl, q_lo + 1), hi), 0)
  free = (free // BLOCK_N) * BLOCK_N

  off = b.to(tl.int64) * SKB + h * SKH
  voff = b.to(tl.int64) * SVB + h * SVH
  soff = b.to(tl.int64) * SCB + h * SCH
  m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
  l_i = tl.zeros([BLOCK_M], tl.float32)
  acc = tl.zeros([BLOCK_M, BD], tl.float32)
  all_keys = offs_n >= 0
  kp, ksp, kzp, vp, vsp, vzp = K + off, KS + soff, KZ + soff, V + voff, VS + soff, VZ + soff
  for start in range(0, free, BLOCK_N):
    acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, qshift, qsum, kp, ksp, kzp, vp, vsp, vzp,
                                  offs_n, all_keys, all_keys[None, :], SKS, SVS, SCS, D, BD,
                                  KBITS, VBITS, QK_SCALE, IEEE, False, F16C)
    kp, vp = kp + BLOCK_N * SKS, vp + BLOCK_N * SVS
    ksp, kzp, vsp, vzp = (ksp + BLOCK_N * SCS, kzp + BLOCK_N * SCS, vsp + BLOCK_N * SCS,
                          vzp + BLOCK_N * SCS)
  off += free.to(tl.int64) * SKS
  voff += free.to(tl.int64) * SVS
  soff += free.to(tl.int64) * SCS
  kp, ksp, kzp, vp, vsp, vzp = K + off, KS + soff, KZ + soff, V + voff, VS + soff, VZ + soff
  for start in range(free, hi, BLOCK_N):
    j = start + offs_n
    kmask = j < hi
    vis = (j[None, :] <= qpos[:, None]) & (j[None, :] < kvl)
    acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, qshift, qsum, kp, ksp, kzp, vp, vsp, vzp,
                                  offs_n, kmask, vis, SKS, SVS, SCS, D, BD, KBITS, VBITS,
                                  QK_SCALE, IEEE, True, F16C)
    kp, vp = kp + BLOCK_N * SKS, vp + BLOCK_N * SVS
    ksp, kzp, vsp, vzp = (ksp + BLOCK_N * SCS, kzp + BLOCK_N * SCS, vsp + BLOCK_N * SCS,
                          vzp + BLOCK_N * SCS)
  return acc, m_i, l_i, qoff, rmask


@triton.jit
def _full_chunk_kernel(Q, K, KS, KZ, V, VS, VZ, QPOS, KVLEN, OUT,
                       SQB: tl.constexpr, SQT: tl.constexpr, SQH: tl.constexpr,
                       SQG: tl.constexpr, SKB: tl.constexpr, SKS: tl.constexpr,
                       SKH: tl.constexpr, SVB: tl.constexpr, SVS: tl.constexpr,
                       SVH: tl.constexpr, SCB: tl.constexpr, SCS: tl.constexpr,
                       SCH: tl.constexpr, T: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                       BD: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_SCALE: tl.constexpr,
                       IEEE: tl.constexpr, F16C: tl.constexpr):
  acc, m_i, l_i, qoff, rmask = _full_chunk_tile(Q, K, KS, KZ, V, VS, VZ, QPOS, KVLEN, SQB, SQT,
                                                SQH, SQG, SKB, SKS, SKH, SVB, SVS, SVH, SCB, SCS,
                                                SCH, T, G, D, BD, KBITS, VBITS, BLOCK_M, BLOCK_N,
                                                QK_SCALE, IEEE, F16C)
  offs_d = tl.arange(0, BD)
  out = acc / tl.maximum(l_i, 1e-30)[:, None]
  tl.store(OUT + qoff[:, None] + offs_d[None, :], out.to(OUT.dtype.element_ty),
           mask=rmask[:, None] & (offs_d[None, :] < D))


@triton.jit
def _full_chunk_partial_kernel(Q, K, KS, KZ, V, VS, VZ, QPOS, KVLEN, ACC, M, L,
                               SQB: tl.constexpr, SQT: tl.constexpr, SQH: tl.constexpr,
                               SQG: tl.constexpr, SKB: tl.constexpr, SKS: tl.constexpr,
                               SKH: tl.constexpr, SVB: tl.constexpr, SVS: tl.constexpr,
                               SVH: tl.constexpr, SCB: tl.constexpr, SCS: tl.constexpr,
                               SCH: tl.constexpr, T: tl.constexpr, G: tl.constexpr,
                               D: tl.constexpr, BD: tl.constexpr, KBITS: tl.constexpr,
                               VBITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               QK_SCALE: tl.constexpr, IEEE: tl.constexpr, F16C: tl.constexpr):
  """The same tile, stored unnormalised: ACC [B, T, H, G, D] (q's layout, so q's offsets),
  M / L [B, T, H, G] fp32 (offset qoff // SQG: q is contiguous, SQG = D)."""
  acc, m_i, l_i, qoff, rmask = _full_chunk_tile(Q, K, KS, KZ, V, VS, VZ, QPOS, KVLEN, SQB, SQT,
                                                SQH, SQG, SKB, SKS, SKH, SVB, SVS, SVH, SCB, SCS,
                                                SCH, T, G, D, BD, KBITS, VBITS, BLOCK_M, BLOCK_N,
                                                QK_SCALE, IEEE, F16C)
  offs_d = tl.arange(0, BD)
  tl.store(ACC + qoff[:, None] + offs_d[None, :], acc, mask=rmask[:, None] & (offs_d[None, :] < D))
  tl.store(M + qoff // SQG, m_i, mask=rmask)
  tl.store(L + qoff // SQG, l_i, mask=rmask)


@triton.jit
def _stream_chunk_kernel(Q, SK, SKS_, SKZ, SV, SVS_, SVZ, SPOS, K, KS, KZ, V, VS, VZ, QPOS,
                         NVALID, OUT,
                         SQB: tl.constexpr, SQT: tl.constexpr, SQH: tl.constexpr,
                         SQG: tl.constexpr, SSB: tl.constexpr, SSW: tl.constexpr,
                         SSH: tl.constexpr, SSVB: tl.constexpr, SSVW: tl.constexpr,
                         SSVH: tl.constexpr, SSCB: tl.constexpr, SSCW: tl.constexpr,
                         SSCH: tl.constexpr, SKB: tl.constexpr, SKT: tl.constexpr,
                         SKH: tl.constexpr, SVB: tl.constexpr, SVT: tl.constexpr,
                         SVH: tl.constexpr, SCB: tl.constexpr, SCT: tl.constexpr,
                         SCH: tl.constexpr, W: tl.constexpr, T: tl.constexpr, G: tl.constexpr,
                         D: tl.constexpr, BD: tl.constexpr, KBITS: tl.constexpr,
                         VBITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         SINK: tl.constexpr, RECENT: tl.constexpr, QK_SCALE: tl.constexpr,
                         IEEE: tl.constexpr, F16C: tl.constexpr):
  """Slots SK / SV and the chunk's K / V: plain, or (KBITS / VBITS > 0) codes with their
  scales and zeros (the chunk then read as the cache will hold it); values have their own
  strides (SSV*, SV*)."""
  h = tl.program_id(1)
  b = tl.program_id(2)
  q, tok, rmask, qoff = _q_tile(Q, tl.program_id(0), h, b, SQB, SQT, SQH, SQG, T, G, D, BD,
                                BLOCK_M)
  q, qshift, qsum = _query(q, F16C)
  offs_d = tl.arange(0, BD)
  offs_n = tl.arange(0, BLOCK_N)
  dmask = offs_d < D
  qpos = tl.load(QPOS + b * T + tok, mask=rmask, other=-(1 << 30))
  nval = tl.load(NVALID + b)
  start_pos = tl.load(QPOS + b * T)  # chunk token j sits at position start_pos + j

  m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
  l_i = tl.zeros([BLOCK_M], tl.float32)
  acc = tl.zeros([BLOCK_M, BD], tl.float32)

  # 1) the sink + ring slots (their positions precede the chunk)
  so, sso = b.to(tl.int64) * SSB + h * SSH, b.to(tl.int64) * SSCB + h * SSCH
  svo = b.to(tl.int64) * SSVB + h * SSVH
  for start in range(0, W, BLOCK_N):
    j = start + offs_n
    kmask = j < W
    kpos = tl.load(SPOS + b * W + j, mask=kmask, other=1 << 30)
    dist = qpos[:, None] - kpos[None, :]
    vis = (dist >= 0) & ((kpos[None, :] < SINK) | (dist < RECENT)) & kmask[None, :]
    o, vo, sc = so + start * SSW, svo + start * SSVW, sso + start * SSCW
    acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, qshift, qsum, SK + o, SKS_ + sc, SKZ + sc,
                                  SV + vo, SVS_ + sc, SVZ + sc, offs_n, kmask, vis, SSW, SSVW,
                                  SSCW, D, BD, KBITS, VBITS, QK_SCALE, IEEE, True, F16C)

  # 2) the chunk's own keys: blocks holding sink positions, then the window band
  co, cso = b.to(tl.int64) * SKB + h * SKH, b.to(tl.int64) * SCB + h * SCH
  cvo = b.to(tl.int64) * SVB + h * SVH
  q_hi = tl.max(tl.where(rmask, qpos, -(1 << 30)), 0)
  q_lo = tl.min(tl.where(rmask, qpos, 1 << 30), 0)
  c_hi = tl.minimum(tl.minimum(q_hi - start_pos + 1, nval), T)  # chunk index bound
  sink_hi = tl.minimum(tl.maximum(SINK - start_pos, 0), c_hi)
  sink_hi = tl.cdiv(sink_hi, BLOCK_N) * BLOCK_N
  band_lo = tl.maximum(q_lo - RECENT + 1 - start_pos, 0)
  band_lo = tl.maximum((band_lo // BLOCK_N) * BLOCK_N, sink_hi)
  for start in range(0, sink_hi, BLOCK_N):
    j = start + offs_n
    kmask = j < c_hi
    kpos = start_pos + j
    dist = qpos[:, None] - kpos[None, :]
    vis = (dist >= 0) & ((kpos[None, :] < SINK) | (dist < RECENT)) & kmask[None, :]
    o, vo, sc = co + start * SKT, cvo + start * SVT, cso + start * SCT
    acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, qshift, qsum, K + o, KS + sc, KZ + sc,
                                  V + vo, VS + sc, VZ + sc, offs_n, kmask, vis, SKT, SVT, SCT, D,
                                  BD, KBITS, VBITS, QK_SCALE, IEEE, True, F16C)
  for start in range(band_lo, c_hi, BLOCK_N):
    j = start + offs_n
    kmask = j < c_hi
    kpos = start_pos + j
    dist = qpos[:, None] - kpos[None, :]
    vis = (dist >= 0) & ((kpos[None, :] < SINK) | (dist < RECENT)) & kmask[None, :]
    o, vo, sc = co + start * SKT, cvo + start * SVT, cso + start * SCT
    acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, qshift, qsum, K + o, KS + sc, KZ + sc,
                                  V + vo, VS + sc, VZ + sc, offs_n, kmask, vis, SKT, SVT, SCT, D,
                                  BD, KBITS, VBITS, QK_SCALE, IEEE, True, F16C)
  out = acc / tl.maximum(l_i, 1e-30)[:, None]
  tl.store(OUT + qoff[:, None] + offs_d[None, :], out.to(OUT.dtype.element_ty),
           mask=rmask[:, None] & dmask[None, :])


# -- launch plans ---------------------------------------------------------------------

def _block_m(g: int, cfg) -> int:
  return max(cfg["block_m"], next_pow2(g), 16)


def full_chunk_plan(q_shape, k_shape, dtype, cfg=None, partial: bool = False, bits=0):
  """q [B, T, H, G, D]; k/v cache [B, S, H, D] (logical shape; bits 8 / 4 or a (key,
  value) pair such as k8v4's (8, 4): quantised). partial: the kernel that stores the
  unnormalised (acc [B, T, H, G, D], m, l [B, T, H, G]) in fp32 instead of the output."""
  cfg = cfg or FULL_CHUNK_CONFIG
  kb, vb = bit_pair(bits)
  b, t, h, g, d = q_shape
  bm = _block_m(g, cfg)
  sq = strides(q_shape)
  sk, sc = kv_strides(k_shape, kb)
  sv, _ = kv_strides(k_shape, vb)
  outs = ((tuple(q_shape), dtype_name(dtype)),)
  if partial:
    outs = ((tuple(q_shape), "float32"), (tuple(q_shape[:4]), "float32"),
            (tuple(q_shape[:4]), "float32"))
  return Launch(
      _full_chunk_partial_kernel if partial else _full_chunk_kernel, (cdiv(t, bm // g), h, b),
      outs,
      dict(SQB=sq[0], SQT=sq[1], SQH=sq[2], SQG=sq[3], SKB=sk[0], SKS=sk[1], SKH=sk[2],
           SVB=sv[0], SVS=sv[1], SVH=sv[2], SCB=sc[0], SCS=sc[1], SCH=sc[2], T=t, G=g, D=d,
           BD=max(16, next_pow2(d)), KBITS=kb, VBITS=vb,
           BLOCK_M=bm, BLOCK_N=cfg["block_n"], QK_SCALE=float(LOG2E / math.sqrt(d)),
           IEEE=dtype_name(dtype) == "float32", F16C=f16_codes(bits, cfg, dtype)),
      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def stream_chunk_plan(q_shape, slot_shape, dtype, sink, recent, cfg=None, bits=0):
  """q [B, T, H, G, D]; slot k/v [B, W, H, D]; chunk k/v [B, T, H, D] (logical shapes;
  bits as for `full_chunk_plan`)."""
  cfg = cfg or STREAM_CHUNK_CONFIG
  kb, vb = bit_pair(bits)
  b, t, h, g, d = q_shape
  w = slot_shape[1]
  bm = _block_m(g, cfg)
  sq = strides(q_shape)
  (ss, ssc), (sk, sc) = (kv_strides(x, kb) for x in (slot_shape, (b, t, h, d)))
  ssv, sv = (kv_strides(x, vb)[0] for x in (slot_shape, (b, t, h, d)))
  return Launch(
      _stream_chunk_kernel, (cdiv(t, bm // g), h, b), ((tuple(q_shape), dtype_name(dtype)),),
      dict(SQB=sq[0], SQT=sq[1], SQH=sq[2], SQG=sq[3], SSB=ss[0], SSW=ss[1], SSH=ss[2],
           SSVB=ssv[0], SSVW=ssv[1], SSVH=ssv[2], SSCB=ssc[0], SSCW=ssc[1], SSCH=ssc[2],
           SKB=sk[0], SKT=sk[1], SKH=sk[2], SVB=sv[0], SVT=sv[1], SVH=sv[2], SCB=sc[0],
           SCT=sc[1], SCH=sc[2], W=w, T=t, G=g, D=d, BD=max(16, next_pow2(d)), KBITS=kb,
           VBITS=vb,
           BLOCK_M=bm, BLOCK_N=cfg["block_n"], SINK=int(sink), RECENT=int(recent),
           QK_SCALE=float(LOG2E / math.sqrt(d)), IEEE=dtype_name(dtype) == "float32",
           F16C=f16_codes(bits, cfg, dtype)),
      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# -- the ops (dispatch signatures) ----------------------------------------------------

def full_chunk(q, k_cache, v_cache, q_pos, kv_len, *, return_partial: bool = False):
  """Retrieval heads: q [B, T, H, G, D] over k/v_cache [B, S, H, D] (slot j =
  position j; plain or quantised); key j visible iff j < kv_len[b] and j <= q_pos[b, t].

  Through tokamax's Mosaic GPU kernel when it is installed and takes the shape
  (faster on Hopper, see tokamax_chunk.py), else the Triton kernel below; a quantised
  cache always takes the Triton kernel (it dequantises its tiles).
  return_partial: the softmax state instead (see `triton_full_chunk`); always the
  Triton kernel, whose state we can store."""
  if return_partial or kv_bits(k_cache):
    return triton_full_chunk(q, k_cache, v_cache, q_pos, kv_len, return_partial=return_partial)
  out = tokamax_chunk.full_chunk(q, k_cache, v_cache, q_pos, kv_len)
  return out if out is not None else triton_full_chunk(q, k_cache, v_cache, q_pos, kv_len)


def triton_full_chunk(q, k_cache, v_cache, q_pos, kv_len, *, return_partial: bool = False):
  """`full_chunk` through our Triton kernel, whatever is installed.

  return_partial: (m, l [B, T, H, G], acc [B, T, H, G, D]) in fp32 and natural-log units
  (the kernel's base-2 max divided by log2(e)); m = -inf where a row sees no key (q_pos
  may be negative), so partials of disjoint cache slices merge exactly."""
  import jax.numpy as jnp
  dt = compute_dtype(q, k_cache)
  plan = full_chunk_plan(q.shape, k_cache.shape, dt, partial=return_partial,
                         bits=(kv_bits(k_cache), kv_bits(v_cache)))
  res = plan.jax(q.astype(dt), *kv_parts(k_cache, dt), *kv_parts(v_cache, dt),
                 q_pos.astype(jnp.int32), kv_len.astype(jnp.int32))
  if return_partial:
    acc, m2, l = res
    return jnp.where(l > 0, m2 / LOG2E, -jnp.inf), l, acc
  (out,) = res
  return out.astype(q.dtype)


def full_chunk_partial(q, k_cache, v_cache, q_pos, kv_len):
  """`full_chunk(..., return_partial=True)` under the op table's name."""
  return full_chunk(q, k_cache, v_cache, q_pos, kv_len, return_partial=True)


def streaming_chunk(q, slot_k, slot_v, slot_pos, slot_valid, k, v, q_pos, n_valid, sink, recent):
  """Streaming heads over sink + ring slots and the chunk, exact streaming mask (slots and
  chunk k, v both plain or both quantised)."""
  import jax.numpy as jnp
  dt = compute_dtype(q, slot_k)
  plan = stream_chunk_plan(q.shape, slot_k.shape, dt, sink, recent,
                           bits=(kv_bits(slot_k), kv_bits(slot_v)))
  (out,) = plan.jax(q.astype(dt), *kv_parts(slot_k, dt), *kv_parts(slot_v, dt),
                    slot_positions(slot_pos, slot_valid), *kv_parts(k, dt), *kv_parts(v, dt),
                    q_pos.astype(jnp.int32), n_valid.astype(jnp.int32))
  return out.astype(q.dtype)
