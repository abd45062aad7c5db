"""infer/profile_decode.py's accounting, on hand-made kernel events (the GPU trace itself is
read on the device only): overlapping kernels count once in busy time, kinds by name."""

import pytest

from infer import profile_decode as pdc


def test_union_merges_overlaps_and_keeps_gaps():
  # [0, 10) and [5, 12) overlap -> 12; [20, 25) apart -> 5; [21, 22) inside it -> 0
  assert pdc.union_ns([(20, 25), (0, 10), (5, 12), (21, 22)]) == 17
  assert pdc.union_ns([]) == 0


@pytest.mark.parametrize("name,kind", [
    ("_duo_decode_kernel", "attention"), ("_combine_kernel", "attention"),
    ("nvjet_tst_128x64_64x8_1x1_v_bz_TNT", "matmul"), ("gemm_fusion_dot_12", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"), ("loop_add_fusion_3", "other"),
    ("Memcpy DtoD", "copy"), ("input_reduce_fusion", "other")])
def test_kind_of(name, kind):
  assert pdc.kind_of(name) == kind


def test_breakdown_per_step():
  ms = 1_000_000  # ns
  events = [("gemm_a", 0, 4 * ms), ("_duo_decode_kernel", 4 * ms, 2 * ms),
            ("loop_fusion", 5 * ms, 2 * ms),  # overlaps the attention by 1 ms
            ("gemm_a", 10 * ms, 4 * ms)]  # a gap of 3 ms before it
  b = pdc.breakdown(events, steps=2)
  assert b["busy_ms"] == pytest.approx((7 + 4) / 2)
  assert b["span_ms"] == pytest.approx(14 / 2)
  assert (b["matmul_ms"], b["attention_ms"], b["other_ms"]) == pytest.approx((4, 1, 1))
  assert b["launches"] == 2
  assert b["top"][0] == {"name": "gemm_a", "kind": "matmul", "us": 4000, "launches": 1}
