"""The TPU ahead-of-time compile of the real training step (needs libtpu; skipped without it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("libtpu", reason="libtpu not installed (pip install 'monet-jax[tpu]')")


def aot(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "aot_compile.py"), "--json", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_tiny_train_step_compiles_for_a_v4_slice(tmp_path):
    """The whole step with the Pallas router and mixing kernels (Mosaic, under shard_map): their operand
    and result bytes are added to the compiler's count, and the bytes table is printed."""
    proc, r = aot(tmp_path, "--topology", "v4:2x2x2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                  "optim.grad_accum=2", "model.scan_groups=true", "model.remat=layer", "model.moe_impl=pallas")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert r["devices"] == 8 and r["megacore"] and r["device_kind"] == "TPU v4"
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert r["fits"] and 0 < r["memory_per_device"]["total"] < r["hbm_per_device"] == 32 * 2**30
    # The compiler's FLOPs (8 devices) cover at least the model's FLOPs, and not wildly more.
    total = r["compiler_flops_per_device"] * r["devices"]
    assert 0.9 * r["model_flops_per_step"] < total < 3 * r["model_flops_per_step"]
    assert r["estimated_step_seconds"] > 0 and 0 < r["implied_mfu"] < 1
    assert "memory per device" in proc.stdout and "implied MFU" in proc.stdout
    assert r["kernel_bytes_per_device"] > 0
    assert r["bytes_per_device"] == r["compiler_bytes_per_device"] + r["kernel_bytes_per_device"]
    assert r["table_hbm_bytes_per_device"] > 0 and r["table_other_space_bytes_per_device"] >= 0
    assert "in other memory spaces" in proc.stdout
    assert "where the bytes go" in proc.stdout and "tpu_custom_call" in proc.stdout


def test_hlo_bytes_pad_to_tiles_and_count_kernels():
    from monet_jax.train import hlo_bytes

    assert hlo_bytes.array_bytes("bf16", "3,5", "1,0:T(8,128)(2,1)") == 8 * 128 * 2
    assert hlo_bytes.array_bytes("f32", "2,16,256", "2,1,0:T(8,128)") == 2 * 16 * 256 * 4
    assert hlo_bytes.array_bytes("f32", "4,8", "0,1:T(8,128)") == 128 * 8 * 4  # dim 0 is the minor one
    text = """HloModule m, entry_computation_layout={(f32[8,128]{1,0})->f32[8,128]{1,0}}

%fused (p: f32[8,128]) -> f32[8,128] {
  %p = f32[8,128]{1,0:T(8,128)} parameter(0)
  ROOT %n = f32[8,128]{1,0:T(8,128)} negate(%p)
}

ENTRY %main (x: f32[8,128]) -> f32[8,128] {
  %x = f32[8,128]{1,0:T(8,128)} parameter(0)
  %k = f32[8,128]{1,0:T(8,128)} custom-call(%x), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/k"}
  ROOT %f = f32[8,128]{1,0:T(8,128)} fusion(%k), kind=kLoop, calls=%fused
}
"""
    ops = hlo_bytes.instruction_bytes(text)
    assert [(o.kind, o.bytes) for o in ops] == [("custom-call:tpu_custom_call", 8192), ("fusion:kLoop", 8192)]
    assert hlo_bytes.kernel_bytes(ops) == 8192
    assert "tpu_custom_call" in hlo_bytes.table(ops)

    # Flash attention over 1024 tokens in 512-token blocks: key block j is fetched by the query blocks
    # j..1 (3 block fetches for 2 blocks), so k and v are charged 1.5 times, q once.
    a = "f32[1,1,1024,128]{3,2,1,0:T(8,128)}"
    meta = 'metadata={op_name="jit(f)/shard_map/jit(flash_attention)/pallas_call"}'
    text = f"""HloModule m

ENTRY %main (q: f32[1,1,1024,128], k: f32[1,1,1024,128], v: f32[1,1,1024,128]) -> f32[1,1,1024,128] {{
  %q = {a} parameter(0)
  %k = {a} parameter(1)
  %v = {a} parameter(2)
  ROOT %o = {a} custom-call(%q, %k, %v), custom_call_target="tpu_custom_call", {meta}
}}
"""
    one = 1024 * 128 * 4
    assert hlo_bytes.kernel_bytes(hlo_bytes.instruction_bytes(text)) == 2 * one + 2 * 1.5 * one

    # An async slice of a quarter of the rows moves that quarter twice (read + write), an async copy its
    # operand twice, whatever their result tuples repeat.
    text = """HloModule m

ENTRY %main (x: f32[8,1024]) -> f32[2,1024] {
  %x = f32[8,1024]{1,0:T(8,128)} parameter(0)
  %s = (f32[8,1024]{1,0:T(8,128)}, f32[2,1024]{1,0:T(2,128)}, s32[]) slice-start(%x), slice={[0:2], [0:1024]}
  %c = (f32[8,1024]{1,0:T(8,128)}, f32[8,1024]{1,0:T(8,128)}, u32[]) copy-start(%x)
  ROOT %d = f32[2,1024]{1,0:T(2,128)} slice-done(%s)
}
"""
    assert [o.bytes for o in hlo_bytes.instruction_bytes(text)] == [2 * 2 * 1024 * 4, 2 * 8 * 1024 * 4]
    # Their source column is the JAX operation that made them, as for every other instruction.
    named = text.replace("slice={[0:2], [0:1024]}", 'slice={[0:2], [0:1024]}, metadata={op_name="jit(step)/slice"}')
    assert [o.source for o in hlo_bytes.instruction_bytes(named)] == ["slice", ""]
    # The same slice into another memory space (S(3)): half its traffic (the write) is not HBM's.
    staged = text.replace("f32[2,1024]{1,0:T(2,128)}, s32[]", "f32[2,1024]{1,0:T(2,128)S(3)}, s32[]")
    assert [o.other_space for o in hlo_bytes.instruction_bytes(staged)] == [2 * 1024 * 4, 0]


def test_per_core_devices_and_bad_topologies(tmp_path):
    proc, r = aot(tmp_path, "--topology", "v4:2x2x1", "--per-core")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert r["devices"] == 8 and not r["megacore"] and r["hbm_per_device"] == 16 * 2**30
    proc, _ = aot(tmp_path, "--topology", "v9:2x2")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("aot_compile: error: ")


def test_a_step_that_cannot_fit_is_a_one_line_answer(tmp_path):
    proc, r = aot(tmp_path, "--topology", "v4:2x2x2", "data.batch_size=65536", "data.seq_len=512")
    assert proc.returncode == 1 and r is None
    lines = proc.stderr.strip().splitlines()
    # libtpu 0.0.50 (jax 0.12) puts an error code before XLA's words: "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom:"
    assert lines[-1].startswith("aot_compile: does not fit on v4:2x2x2: RESOURCE_EXHAUSTED: ")
    assert "Ran out of memory on HBM" in lines[-1]
    assert "Traceback" not in proc.stderr
