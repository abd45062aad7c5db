"""Decode (one new token per row) on TPU: the chunk kernel with a decode tiling.

  full_decode(q, k_cache, v_cache, q_pos, kv_len)      retrieval heads, ragged per-row lengths
  streaming_decode(q, slot_k, slot_v, slot_pos, slot_valid, k, v, q_pos, n_valid, sink, recent)
                                                       streaming heads: sink + ring + the token
Signatures are the chunk ops' with T == 1 (`duojax.attention.reference`).

With T == 1 a KV head's G query heads are the G rows of one query block ([B, H, G, D], a free
reshape of q), so the grid is (B, head blocks, 1, key blocks) and each step reads one key
block of the layer's cache [B, S, H * D] (the lanes of its heads) exactly once. Decode is
memory-bound, so key blocks are as long as VMEM allows (up to 2048 keys) to amortise the
per-step overhead.

Ragged batches: `kv_len` [B] is scalar-prefetched; a row's key blocks past its length are not
computed (`pl.when`) and not copied (their index map repeats the row's last needed block),
so a row of length L reads ceil(L / block_k) blocks whatever the cache capacity. The
streaming part is constant-size (sink + recent + 1 keys, usually one block).
"""

from __future__ import annotations

from duojax.kernels.tpu import chunk_attention

DECODE_MAX_KEYS = 2048


def _check(q):
  if q.shape[1] != 1:
    raise ValueError(f"decode takes one query per row, got T={q.shape[1]}; use the chunk op")


def full_decode(q, k_cache, v_cache, q_pos, kv_len, *, interpret: bool = False,
                block_k: int | None = None, block_h: int | None = None,
                return_partial: bool = False):
  """q [B, 1, H, G, D]; k_cache, v_cache [B, S, H, D]; q_pos [B, 1]; kv_len [B].
  return_partial: (m, l, acc) in fp32 instead (`chunk_attention.full_chunk`)."""
  _check(q)
  return chunk_attention.full_chunk(q, k_cache, v_cache, q_pos, kv_len, interpret=interpret,
                                    block_k=block_k, block_h=block_h,
                                    max_keys=DECODE_MAX_KEYS, return_partial=return_partial)


def streaming_decode(q, slot_k, slot_v, slot_pos, slot_valid, k, v, q_pos, n_valid, sink: int,
                     recent: int, *, interpret: bool = False, block_k: int | None = None,
                     block_h: int | None = None, return_partial: bool = False):
  """q [B, 1, H, G, D]; slots [B, W, H, D]; k, v [B, 1, H, D]; q_pos [B, 1]; n_valid [B].
  return_partial: (m, l, acc) in fp32 instead."""
  _check(q)
  return chunk_attention.streaming_chunk(q, slot_k, slot_v, slot_pos, slot_valid, k, v, q_pos,
                                         n_valid, sink, recent, interpret=interpret,
                                         block_k=block_k, block_h=block_h,
                                         max_keys=DECODE_MAX_KEYS,
                                         return_partial=return_partial)
