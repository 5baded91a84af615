"""The H100 compile from a CPU host (``tools/aot_compile.py --topology h100``) and the kernel inventory of an
optimized GPU program. The inventory's parsing runs everywhere; the compiles need jax's CUDA plugin
(``pip install 'monet-jax[gpu-aot]'``), which CI does not install, so there they are skipped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from monet_jax.train import aot_gpu

ROOT = Path(__file__).resolve().parent.parent
needs_plugin = pytest.mark.skipif(not aot_gpu.plugin_available(),
                                  reason="jax's CUDA plugin is not installed (pip install 'monet-jax[gpu-aot]'; "
                                         "CI does not install it)")

# A hand-written optimized GPU program: a loop of 24 steps whose body has a product rewritten as multiply +
# reduce (two fusions), a cuBLAS product and a Triton product; the entry holds f32 [b, heads, t, t] scores.
HLO = """HloModule m

%fused_multiply (p0: bf16[64,32], p1: bf16[1,64]) -> bf16[64,32] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  %p1 = bf16[1,64]{1,0} parameter(1)
  %bc = bf16[64,32]{1,0} broadcast(%p1), dimensions={1}, metadata={op_name="jit(f)/dot_general"}
  ROOT %mul = bf16[64,32]{1,0} multiply(%bc, %p0), metadata={op_name="jit(f)/dot_general"}
}

%fused_reduce (p0: bf16[64,32]) -> f32[32] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  %c = f32[64,32]{1,0} convert(%p0)
  %z = f32[] constant(0)
  ROOT %r = f32[32]{0} reduce(%c, %z), dimensions={0}, to_apply=%add
}

%gemm (p0: bf16[8,64], p1: bf16[64,32]) -> bf16[8,32] {
  %p0 = bf16[8,64]{1,0} parameter(0)
  %p1 = bf16[64,32]{1,0} parameter(1)
  ROOT %d = bf16[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (s: (bf16[64,32], bf16[1,64], bf16[8,64])) -> (bf16[64,32], bf16[1,64], bf16[8,64]) {
  %s = (bf16[64,32]{1,0}, bf16[1,64]{1,0}, bf16[8,64]{1,0}) parameter(0)
  %w = bf16[64,32]{1,0} get-tuple-element(%s), index=0
  %x = bf16[1,64]{1,0} get-tuple-element(%s), index=1
  %y = bf16[8,64]{1,0} get-tuple-element(%s), index=2
  %m = bf16[64,32]{1,0} fusion(%w, %x), kind=kLoop, calls=%fused_multiply
  %r = f32[32]{0} fusion(%m), kind=kInput, calls=%fused_reduce
  %cb = (bf16[8,32]{1,0}, s8[1024]{0}) custom-call(%y, %w), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %tg = bf16[8,32]{1,0} fusion(%y, %w), kind=kCustom, calls=%gemm, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  ROOT %t = (bf16[64,32]{1,0}, bf16[1,64]{1,0}, bf16[8,64]{1,0}) tuple(%w, %x, %y)
}

%cond (s: (bf16[64,32], bf16[1,64], bf16[8,64])) -> pred[] {
  %s = (bf16[64,32]{1,0}, bf16[1,64]{1,0}, bf16[8,64]{1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (w: bf16[64,32], x: bf16[1,64], y: bf16[8,64], q: f32[2,4,128,16]) -> f32[2,4,128,128] {
  %w = bf16[64,32]{1,0} parameter(0)
  %x = bf16[1,64]{1,0} parameter(1)
  %y = bf16[8,64]{1,0} parameter(2)
  %q = f32[2,4,128,16]{3,2,1,0} parameter(3)
  %t = (bf16[64,32]{1,0}, bf16[1,64]{1,0}, bf16[8,64]{1,0}) tuple(%w, %x, %y)
  %l = (bf16[64,32]{1,0}, bf16[1,64]{1,0}, bf16[8,64]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"24"}}
  ROOT %s = f32[2,4,128,128]{3,2,1,0} fusion(%q), kind=kLoop, calls=%fused_reduce
}
"""  # noqa: E501 (the optimized text's lines as XLA writes them)


def test_inventory_counts_kernels_loops_rewritten_products_and_scores():
    inv = aot_gpu.inventory(HLO, seq_len=128, rows_x_heads=2 * 4)
    assert (inv["kernels"], inv["gemm_triton"], inv["cublas"], inv["fusion"]) == (5, 1, 1, 3)
    assert inv["fusion_kinds"] == {"kLoop": 2, "kInput": 1, "__triton_nested_gemm_fusion": 1}
    assert inv["custom_call_targets"] == {"__cublas$gemm": 1}
    assert inv["multiply_reduce_products"] == 1  # the multiply fusion (its reduce is the second half)
    assert inv["score_buffers"] == ["f32[2,4,128,128]"]
    [loop] = inv["loops"]
    assert (loop["body"], loop["trip_count"], loop["kernels"], loop["multiply_reduce_products"]) == ("body", 24, 4, 1)
    # Fewer rows x heads than the leading dimensions hold: still scores; more: not (e.g. a [b, t, t] mask).
    assert aot_gpu.inventory(HLO, seq_len=128, rows_x_heads=9)["score_buffers"] == []
    # The cuBLAS product: 2 * (8 x 32) results * 64 contracted.
    assert aot_gpu.custom_call_flops(HLO) == {"cublas": 2 * 8 * 32 * 64, "cudnn": 0.0}


def aot(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "aot_compile.py"), "--topology", "h100",
                           "--json", str(out), "--hlo", str(tmp_path / "step.hlo"), *args],
                          capture_output=True, text=True, env=env, timeout=900)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@needs_plugin
@pytest.mark.slow
def test_tiny_train_step_compiles_for_an_h100(tmp_path):
    """The whole tiny VD step, bfloat16, for one H100: fits, its products are Triton or cuBLAS products (none
    rewritten as multiply + reduce), XLA's FLOPs cover the model's, and the optimized text is written."""
    proc, r = aot(tmp_path, "--config", str(ROOT / "configs" / "tiny-vd.yaml"), "model.compute_dtype=bfloat16",
                  "data.batch_size=4", "data.seq_len=256", "model.attention_impl=xla")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert r["device_kind"] == "NVIDIA H100 80GB HBM3" and r["devices"] == 1 and r["fits"]
    assert 0 < r["memory_per_device"]["total"] < 2**30 and r["hbm_per_device"] == 80 * 2**30
    inv = r["inventory"]
    assert inv["gemm_triton"] + inv["cublas"] >= 4 * 7  # per layer at least q, k, v, o and the expert products
    assert inv["multiply_reduce_products"] == 0 and inv["loops"] == []
    assert inv["score_buffers"]  # the XLA attention keeps [b, heads, t, t] scores
    assert 0.9 * r["model_flops_per_step"] < r["flops_per_device"] < 3 * r["model_flops_per_step"]
    assert r["bytes_per_device"] > 0 and 0 < r["implied_mfu"] < 1
    assert "HloModule" in (tmp_path / "step.hlo").read_text()[:200]
    assert "kernels (loop bodies once)" in proc.stdout and "where the bytes go" in proc.stdout


@needs_plugin
@pytest.mark.slow
def test_tiny_decoding_keeps_one_row_products_as_products(tmp_path):
    """At one row XLA:GPU rewrites ``x @ W`` into multiply + reduce unless the rewrite is disabled, which the
    decoding compile does by default."""
    cfg = ["--config", str(ROOT / "configs" / "tiny-vd.yaml"), "--decode", "1", "model.param_dtype=bfloat16",
           "model.compute_dtype=bfloat16"]
    proc, off = aot(tmp_path, *cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert off["rows"] == 1 and off["step"]["multiply_reduce_products"] == 0
    assert off["kernels_per_step"] > 0 and off["step"]["gemm_triton"] + off["step"]["cublas"] > 0
    proc, on = aot(tmp_path, *cfg, "--strength-reduction")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert on["step"]["multiply_reduce_products"] > 0


def test_without_the_plugin_the_gpu_target_is_a_one_line_error(tmp_path, monkeypatch):
    from monet_jax.train import aot

    monkeypatch.setattr(aot_gpu, "plugin_available", lambda: False)
    assert aot.main(["--topology", "h100"]) == 2
