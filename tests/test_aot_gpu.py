"""The H100 compile from a CPU host (``tools/aot_compile.py --topology h100``) and the kernel inventory of an
optimized GPU program. The inventory's parsing runs everywhere; the compiles need jax's CUDA plugin
(``pip install jax-cuda13-plugin==V jax-cuda13-pjrt==V``, V the installed jax's version), which CI does not install,
so there they are skipped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from monet_jax.train import aot_gpu

ROOT = Path(__file__).resolve().parent.parent
needs_plugin = pytest.mark.skipif(not aot_gpu.plugin_available(),
                                  reason=f"jax's CUDA plugin is not installed ({aot_gpu.plugin_install()}; "
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


# A loop body with a conditional (as the sparse decoding path's: the kernels where the unions fit, else the
# dense layer): its true branch has one fusion, its false branch two; then the same as an index conditional.
COND = """HloModule c

%narrow (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %a = f32[8]{0} fusion(%p), kind=kLoop, calls=%fused_reduce
}

%dense (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %a = f32[8]{0} fusion(%p), kind=kLoop, calls=%fused_reduce
  ROOT %b = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_reduce
}

%body (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %k = pred[] constant(true)
  %c = f32[8]{0} conditional(%k, %p, %p), true_computation=%narrow, false_computation=%dense
  ROOT %e = f32[8]{0} fusion(%c), kind=kLoop, calls=%fused_reduce
}

%cond (p: f32[8]) -> pred[] {
  %p = f32[8]{0} parameter(0)
  ROOT %t = pred[] constant(true)
}

ENTRY %main (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %l = f32[8]{0} while(%p), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
}
"""


@pytest.mark.parametrize("form", ["predicate", "index"])
def test_inventory_follows_a_conditionals_true_branch_and_counts_the_others(form):
    """A step runs one branch of a conditional: the kernels per step follow the true branch (``jax.lax.cond``'s
    second, the last of an index conditional's), and the other branches' kernels are counted apart."""
    text = COND if form == "predicate" else COND.replace(
        "conditional(%k, %p, %p), true_computation=%narrow, false_computation=%dense",
        "conditional(%k, %p, %p), branch_computations={%dense, %narrow}")
    [loop] = aot_gpu.inventory(text)["loops"]
    assert (loop["body"], loop["trip_count"], loop["kernels"], loop["other_branch_kernels"]) == ("body", 4, 2, 2)
    assert "(conditionals on their true branch; 2 more kernels in the other branches)" in \
        "\n".join(aot_gpu.report_inventory(aot_gpu.inventory(text)))


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
    # The Pallas kernels' registers where ptxas is found (XLA's attention here: no attention kernel).
    kernels = r["triton_kernels"]
    assert kernels is None if aot_gpu.find_ptxas() is None else all(k["registers"] > 0 for k in kernels)
    assert not any(k["kernel"].startswith("mha") for k in kernels or []) and "Pallas Triton kernels" in proc.stdout


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


# -- the Pallas Triton kernels' registers, spills and shared memory ------------------------------------------
# What ``ptxas -v --gpu-name sm_90a`` printed for the PTX of a tiny VD step's dump (four kernels of two PTX
# pieces, here in one), with a device function and an entry that is not a Pallas kernel between them.
PTXAS_V = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'monet_vd_mix' for 'sm_90a'
ptxas info    : Function properties for monet_vd_mix
    504 bytes stack frame, 912 bytes spill stores, 916 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 504 bytes cumulative stack size
ptxas info    : Compile time = 723.654 ms
ptxas info    : Function properties for __internal_trig_reduction
    40 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'loop_add_fusion_3' for 'sm_90a'
ptxas info    : Function properties for loop_add_fusion_3
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 16 registers, used 0 barriers
ptxas info    : Compile time = 3.120 ms
ptxas info    : Compiling entry function 'monet_vd_mix_bwd__1' for 'sm_90a'
ptxas info    : Function properties for monet_vd_mix_bwd__1
    7864 bytes stack frame, 29184 bytes spill stores, 35424 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 7864 bytes cumulative stack size
ptxas info    : Compile time = 3777.017 ms
ptxas info    : (C7519) warpgroup.arrive is injected in around line 1376 by compiler to allow use of registers in GMMA in function 'mha_forward'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mha_forward' for 'sm_90a'
ptxas info    : Function properties for mha_forward
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 207 registers, used 1 barriers, 1024 bytes smem
ptxas info    : Compile time = 129.905 ms
"""  # noqa: E501
# The same program's thunk sequence (launch dimensions) and optimized text (the Pallas calls), as XLA dumps them.
THUNKS = """047: kCustomKernel [prev=046 (1)   | next=049 (2)  ] monet_vd_mix grid: [2, 2, 1] threads: [128, 1, 1]  shared_memory: 512 bytes
048: kCustomKernel [prev=047 (1)   | next=049 (1)  ] loop_add_fusion_3 grid: [4, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
080: kCustomKernel [prev=079 (1)   | next=082 (2)  ] monet_vd_mix grid: [2, 2, 1] threads: [128, 1, 1]  shared_memory: 512 bytes
144: kCustomKernel [prev=143 (1)   | next=146 (2)  ] monet_vd_mix_bwd__1 grid: [2, 2, 1] threads: [128, 1, 1]  shared_memory: 512 bytes
150: kCustomKernel [prev=149 (1)   | next=151 (1)  ] mha_forward grid: [1, 2, 4] threads: [128, 1, 1]  shared_memory: 16384 bytes
"""  # noqa: E501
PALLAS_HLO = """  %pallas_call.3 = (bf16[2,2,4,32,128]{4,3,2,1,0}) custom-call(%p), custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = false, grid_x = 2 : i32, grid_y = 2 : i32, grid_z = 1 : i32, ir = "ML\\EFR\\0D name = \\22x\\22", name = "monet_vd_mix", num_stages = 2 : i32, num_warps = 4 : i32}
  %pallas_call.9 = (bf16[2,4,32,128]{3,2,1,0}) custom-call(%q), custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = false, grid_x = 2 : i32, grid_y = 2 : i32, grid_z = 1 : i32, ir = "ML\\EFR", name = "monet_vd_mix_bwd", num_stages = 2 : i32, num_warps = 4 : i32}
  %pallas_call.12 = (bf16[2,128,4,32]{3,2,1,0}) custom-call(%k), custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = false, grid_x = 1 : i32, grid_y = 2 : i32, grid_z = 4 : i32, ir = "ML\\EFR", name = "mha_forward", num_stages = 2 : i32, num_warps = 4 : i32}
  %loop_add_fusion.3 = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_add
"""  # noqa: E501


def test_ptxas_report_per_kernel():
    got = aot_gpu.parse_ptxas(PTXAS_V)
    assert set(got) == {"monet_vd_mix", "loop_add_fusion_3", "monet_vd_mix_bwd__1", "mha_forward"}  # entries only
    assert got["monet_vd_mix"] == {"registers": 255, "spill_store_bytes": 912, "spill_load_bytes": 916,
                                   "stack_bytes": 504, "static_shared_bytes": 0}
    assert got["monet_vd_mix_bwd__1"]["registers"] == 32 and got["monet_vd_mix_bwd__1"]["spill_load_bytes"] == 35424
    assert got["mha_forward"] == {"registers": 207, "spill_store_bytes": 0, "spill_load_bytes": 0, "stack_bytes": 0,
                                  "static_shared_bytes": 1024}
    launches = aot_gpu.parse_thunks(THUNKS)
    assert launches["monet_vd_mix"] == {"launches": 2, "grid": [2, 2, 1], "threads": 128, "shared_bytes": 512}
    assert aot_gpu.pallas_calls(PALLAS_HLO) == {"monet_vd_mix": {"calls": 1, "num_warps": 4},
                                                "monet_vd_mix_bwd": {"calls": 1, "num_warps": 4},
                                                "mha_forward": {"calls": 1, "num_warps": 4}}


def test_triton_kernels_from_a_dump(tmp_path):
    """The dump's Pallas kernels (variants ``name__N`` too), not XLA's own kernels, each with ptxas's figures
    and its launches; shared memory is the launch's (dynamic) plus ptxas's static; no ptxas: None."""
    (tmp_path / "module_0001.jit_step.sm_9.0a_gpu_after_optimizations.txt").write_text(PALLAS_HLO)
    (tmp_path / "module_0001.jit_step.thunk_sequence.txt").write_text(THUNKS)
    entries = ("monet_vd_mix", "loop_add_fusion_3", "monet_vd_mix_bwd__1", "mha_forward")
    (tmp_path / "module_0001.jit_step.7.ptx").write_text(
        ".version 9.0\n.target sm_90a\n" + "".join(f".visible .entry {e}(\n)\n{{\n}}\n" for e in entries))
    (tmp_path / "module_0001.jit_step.9.ptx").write_text(".visible .entry loop_add_fusion_4(\n)\n{\n}\n")
    ptxas = tmp_path / "ptxas"  # prints the captured report, and which file it was given
    (tmp_path / "report.txt").write_text(PTXAS_V)
    ptxas.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls.txt\ncat {tmp_path}/report.txt\n')
    ptxas.chmod(0o755)
    rows = aot_gpu.triton_kernels(tmp_path, str(ptxas))
    assert [r["name"] for r in rows] == ["mha_forward", "monet_vd_mix", "monet_vd_mix_bwd__1"]
    assert (tmp_path / "calls.txt").read_text().split() == ["-v", "--gpu-name", "sm_90a", "-o", "/dev/null",
                                                             str(tmp_path / "module_0001.jit_step.7.ptx")]
    mix, bwd = rows[1], rows[2]
    assert mix == {"name": "monet_vd_mix", "kernel": "monet_vd_mix", "launches": 2, "grid": [2, 2, 1],
                   "threads": 128, "num_warps": 4, "registers": 255, "spill_store_bytes": 912,
                   "spill_load_bytes": 916, "stack_bytes": 504, "shared_bytes": 512}
    assert bwd["kernel"] == "monet_vd_mix_bwd" and bwd["launches"] == 1 and bwd["spill_store_bytes"] == 29184
    assert rows[0]["shared_bytes"] == 16384 + 1024
    table = "\n".join(aot_gpu.report_triton(rows))
    assert "monet_vd_mix_bwd__1" in table and "spilling: monet_vd_mix, monet_vd_mix_bwd__1" in table
    assert "not measured: ptxas not found" in aot_gpu.report_triton(None)[0]
    with pytest.raises(FileNotFoundError):
        aot_gpu.triton_kernels(tmp_path / "calls.txt", str(ptxas))  # no optimized program there


@needs_plugin
@pytest.mark.slow
@pytest.mark.skipif(aot_gpu.find_ptxas() is None, reason="ptxas not found (CUDA's, or the nvidia-cuda-nvcc wheel)")
def test_tiny_mixing_kernels_compile_for_an_h100_with_registers(tmp_path):
    """A tiny VD layer's Triton mixing kernels (forward and backward, bfloat16: a summing and an emitting call
    each) compiled for one H100 by XLA here: ptxas reports registers and no spills for all four, and their
    launches are in the thunk sequence."""
    import jax
    import jax.numpy as jnp

    from monet_jax.kernels import dispatch, mixing_gpu

    device = aot_gpu.gpu_devices("h100")[0]
    b, m, h, e, t = 1, 2, 2, 16, 64
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device))  # noqa: E731

    def layer(p1, p2, g1, g2, dtop, dbot):
        return mixing_gpu.vd_forward(p1, p2, g1, g2), mixing_gpu.vd_backward(p1, p2, g1, g2, dtop, dbot)

    args = (bf(b, m, e, t), bf(b, m, e, t), bf(b, h, e, t), bf(b, h, e, t), bf(b, 2, m, e, t), bf(b, 2, m, e, t))
    with dispatch.force_interpret(False), dispatch.lowering_for("gpu"):
        jax.jit(layer).lower(*args).compile(compiler_options={"xla_dump_to": str(tmp_path)})
    rows = {r["kernel"]: r for r in aot_gpu.triton_kernels(tmp_path)}
    assert set(rows) == {"monet_vd_mix_sums", "monet_vd_mix", "monet_vd_mix_bwd_sums", "monet_vd_mix_bwd"}, rows
    for r in rows.values():  # one program per role and expert slice (16 experts: 64 tokens, one batch row)
        assert 0 < r["registers"] <= 255 and r["launches"] == 1 and r["threads"] == 128 and r["num_warps"] == 4
        assert r["spill_store_bytes"] == 0 and r["stack_bytes"] == 0, r
        assert r["grid"][1:] == [1, b] and r["grid"][0] >= 1 and r["shared_bytes"] >= 0


def test_missing_plugin_message_names_the_matching_wheels():
    from importlib.metadata import version

    v = version("jax")
    assert aot_gpu.plugin_install() == f"pip install jax-cuda13-plugin=={v} jax-cuda13-pjrt=={v}"
