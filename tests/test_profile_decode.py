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


# An optimised-HLO excerpt in the form `compiled.as_text()` prints: a matrix-vector dot
# that XLA made a reduction, a cache write that fuses a reshape of a dot's output, and a
# loop fusion calling a nested one.
_HLO = '''
%region_0.1 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.3 = f32[] add(%a, %b), metadata={op_name="jit(step)/reduce_sum"}
}

%fused_reduce.7 (param_0: bf16[4096,1024], param_1: bf16[4096]) -> bf16[1024] {
  %param_0 = bf16[4096,1024]{1,0} parameter(0)
  %mul.1 = f32[4096,1024]{1,0} multiply(%param_0, %param_0), metadata={op_name="jit(step)/bte,ehd->bthd/dot_general"}
  %c = f32[] constant(0)
  ROOT %reduce.2 = f32[1024]{0} reduce(%mul.1, %c), dimensions={0}, to_apply=%region_0.1, metadata={op_name="jit(step)/bte,ehd->bthd/dot_general"}
}

%fused_dus.3 (param_0.1: bf16[1,1024], param_1.1: bf16[8,1024]) -> bf16[8,1024] {
  %param_0.1 = bf16[1,1024]{1,0} parameter(0)
  %bitcast.9 = bf16[1024]{0} bitcast(%param_0.1), metadata={op_name="jit(step)/bte,ehd->bthd/dot_general"}
  ROOT %dynamic-update-slice.1 = bf16[8,1024]{1,0} dynamic-update-slice(%param_1.1, %bitcast.9), metadata={op_name="jit(step)/scatter"}
}

%inner.2 (p: f32[16]) -> f32[16] {
  %p = f32[16]{0} parameter(0)
  ROOT %t = f32[16]{0} tanh(%p), metadata={op_name="jit(step)/tanh"}
}

%outer.1 (q: f32[16]) -> (f32[16], f32[16]) {
  %q = f32[16]{0} parameter(0)
  %f = f32[16]{0} fusion(%q), kind=kLoop, calls=%inner.2
  ROOT %tu = (f32[16]{0}, f32[16]{0}) tuple(%f, %q)
}

ENTRY %main.9 (x: bf16[4096,1024]) -> bf16[8,1024] {
  %x = bf16[4096,1024]{1,0} parameter(0)
  %input_reduce_fusion.65 = bf16[1024]{0} fusion(%x, %x), kind=kInput, calls=%fused_reduce.7
  %dynamic-update-slice_fusion = bf16[8,1024]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_dus.3
  %loop_tanh_fusion.2 = (f32[16]{0}, f32[16]{0}) fusion(%x), kind=kLoop, calls=%outer.1
  ROOT %r = bf16[8,1024]{1,0} copy(%dynamic-update-slice_fusion)
}
'''


def test_hlo_fusions_find_dots_by_what_they_compute():
  f = pdc.hlo_fusions(_HLO)
  assert set(f) == {"input_reduce_fusion_65", "dynamic_update_slice_fusion", "loop_tanh_fusion_2",
                    "f"}
  assert f["input_reduce_fusion_65"] == {"ops": ["bte,ehd->bthd/dot_general",
                                                 "jit(step)/reduce_sum"], "dot": True}
  assert f["dynamic_update_slice_fusion"]["dot"] is False  # only a dot's output, reshaped
  assert f["loop_tanh_fusion_2"] == {"ops": ["jit(step)/tanh"], "dot": False}  # nested call
  # the trace spells the kernel with '_' for '.' and '-'
  assert pdc.kind_of("input_reduce_fusion_65", f) == "matmul"
  assert pdc.kind_of("input_reduce_fusion_65") == "other"
  assert pdc.kind_of("dynamic-update-slice_fusion", f) == "other"
  b = pdc.breakdown([("input_reduce_fusion_65", 0, 3000), ("loop_tanh_fusion_2", 3000, 1000)],
                    steps=1, fusions=f)
  assert (b["matmul_ms"], b["other_ms"]) == pytest.approx((3e-3, 1e-3))
  assert b["top"][0]["ops"] == ["bte,ehd->bthd/dot_general", "jit(step)/reduce_sum"]
  assert "ops" in b["top"][1]


def test_hlo_fusions_on_a_compiled_program():
  import jax
  import jax.numpy as jnp

  def step(x, w, y):  # the tanh reads none of the dot's output: its own fusion everywhere
    return jnp.einsum("be,ef->bf", x, w), jnp.tanh(y) * 2.0 + 1.0
  text = jax.jit(step).lower(jnp.ones((1, 64)), jnp.ones((64, 32)),
                             jnp.ones((8, 128))).compile().as_text()
  f = pdc.hlo_fusions(text)
  # the elementwise tail is fused on every backend: found, with its JAX ops, and no dot
  tails = [v for v in f.values() if "jit(step)/tanh" in v["ops"]]
  assert tails, f"no fusion with the tanh parsed from the compiled HLO (format change?): {f}"
  assert not any(v["dot"] for v in tails)
