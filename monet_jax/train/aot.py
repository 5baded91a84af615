"""Compile the real training step for a TPU topology, or for one H100, on a machine without either.

    python tools/aot_compile.py --config configs/monet-vd-1.4b.yaml --topology v4:4x4x2 \\
        data.batch_size=1024 data.seq_len=2048 mesh.data=1 mesh.fsdp=-1 model.remat=group optim.grad_accum=4
    python tools/aot_compile.py --config configs/monet-vd-1.4b.yaml --topology h100 --hlo step.hlo \\
        data.batch_size=8 data.seq_len=2048 model.compute_dtype=bfloat16
    python tools/aot_compile.py --config configs/monet-vd-1.4b.yaml --topology h100 --decode 1 \\
        model.param_dtype=bfloat16 model.compute_dtype=bfloat16

TPU topologies need libtpu; ``h100`` needs jax's CUDA plugin (``monet_jax.train.aot_gpu``) and also lists
the optimized program's kernels (Triton / cuBLAS / cuDNN / Pallas calls, products done as multiply + reduce,
buffers shaped like ``[b, heads, t, t]``) and, where ptxas is found, each Pallas Triton kernel's registers,
spills and shared memory. ``--decode B`` compiles the decoding loop of ``generate`` at B rows instead of the
training step (GPU targets).

Prints per-device memory (against the chip's HBM) and the compiler's cost analysis: FLOPs, bytes (plus
the operand and result bytes of Pallas kernels, which the compiler does not count), its estimated step
time, the MFU that estimate implies for the model FLOPs of the config, and a table of where the bytes go.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

from monet_jax.train import hlo_bytes

# v4 and v5p chips run as one "megacore" device (two TensorCores); HBM per JAX device in that mode.
HBM_GIB = {"v4": 32, "v5p": 95, "v5e": 16, "v5litepod": 16, "v6e": 32, "v3": 16, "v2": 8}
HBM_BYTES_PER_S = {"v4": 1.2e12, "v5p": 2.76e12, "v5e": 0.82e12, "v5litepod": 0.82e12, "v6e": 1.64e12, "v3": 0.9e12,
                   "v2": 0.7e12}  # per chip
MEGACORE = ("v4", "v5p")


def _topology_env(topology: str, megacore: bool) -> tuple[str, int]:
    """``TPU_ACCELERATOR_TYPE`` for a topology like ``v4:4x4x2`` (named by TensorCores on megacore chips)."""
    gen, _, dims = topology.partition(":")
    if gen not in HBM_GIB or not dims:
        raise ValueError(f"unsupported topology {topology!r} (expected e.g. v4:2x2x2, v5e:4x4, v6e:2x2)")
    try:
        chips = math.prod(int(d) for d in dims.split("x"))
    except ValueError:
        raise ValueError(f"bad topology dimensions in {topology!r}") from None
    cores = chips * (2 if gen in MEGACORE else 1)
    return f"{gen}-{cores}", chips


def tpu_devices(topology: str, *, per_core: bool = False):
    """``(devices, chips, megacore)`` of a TPU topology, compiled for on this (CPU) host through libtpu."""
    from jax.experimental import topologies

    gen = topology.split(":")[0]
    megacore = gen in MEGACORE and not per_core
    accel, chips = _topology_env(topology, megacore)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accel)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no TPU to guard with a lockfile
    kwargs = {"chip_config_name": "megacore"} if megacore else {}
    return topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices, chips, megacore


def compile_for_topology(cfg, topology: str, *, per_core: bool = False, cost: bool = True) -> dict:
    """Lower and compile the train step of ``cfg`` for ``topology``; returns the figures (without
    ``cost``, only memory and the kernels in the step: no second, unrolled compile for the costs)."""
    import jax
    from flax import nnx

    from monet_jax import sharding
    from monet_jax.train import metrics as M
    from monet_jax.train.step import BATCH_KEYS, TrainState, _build

    gen = topology.split(":")[0]
    devices, chips, megacore = tpu_devices(topology, per_core=per_core)
    mesh = sharding.make_mesh(cfg.mesh, devices)

    cfg = dataclasses.replace(cfg, init_from=None)  # only shapes matter here
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _build(cfg)))
    shardings = sharding.state_shardings(abstract, mesh)
    ts = TrainState(graphdef, abstract, shardings, mesh)
    dp = sharding.data_parallel_size(mesh)
    rows = cfg.data.batch_size
    if rows % (dp * cfg.optim.grad_accum):
        raise ValueError(f"data.batch_size {rows} is not divisible by data x fsdp ({dp}) x grad_accum "
                         f"({cfg.optim.grad_accum})")
    batch_sh = sharding.batch_sharding(mesh, 2)
    batch = {k: jax.ShapeDtypeStruct((rows, cfg.data.seq_len), "float32" if k == "loss_mask" else "int32",
                                     sharding=batch_sh) for k in BATCH_KEYS}
    state = ts.abstract()
    t0 = time.perf_counter()
    compiled = _compile(ts, cfg, state, batch)
    mem = compiled.memory_analysis()
    per_device = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes \
        - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes
    hbm = HBM_GIB[gen] * 2**30 / (2 if gen in MEGACORE and per_core else 1)
    result = {
        "topology": topology, "devices": len(devices), "chips": chips, "device_kind": devices[0].device_kind,
        "megacore": megacore, "mesh": dict(mesh.shape), "tokens_per_step": rows * cfg.data.seq_len,
        "compile_seconds": round(time.perf_counter() - t0, 1),
        "kernel_calls": sum(compiled.as_text().count(f'custom_call_target="{t}"') for t in hlo_bytes.KERNEL_TARGETS),
        "memory_per_device": {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
                              "temporaries": mem.temp_size_in_bytes, "aliased": mem.alias_size_in_bytes,
                              "code": mem.generated_code_size_in_bytes, "total": per_device},
        "hbm_per_device": int(hbm), "fits": per_device <= hbm,
    }
    if not cost:
        return result
    # XLA's cost analysis counts a loop body once, whatever its trip count: take the costs from the
    # same step with no loops (layers unrolled, one microbatch) and scale by the number of microbatches.
    # Unrolled, a microbatch may not fit in HBM (the TPU compiler then refuses it); halve it until it
    # does (weight reads are then counted once per piece, so bytes are an upper bound).
    accum, pieces = cfg.optim.grad_accum, 1
    cost_compiled = compiled if accum == 1 and not cfg.model.scan_groups else None
    flat = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_groups=False),
                               optim=dataclasses.replace(cfg.optim, grad_accum=1))
    flat_graphdef, _ = nnx.split(nnx.eval_shape(lambda: _build(flat)))  # the model reads scan_groups
    while cost_compiled is None:
        micro_rows = rows // (accum * pieces)
        micro = {k: jax.ShapeDtypeStruct((micro_rows, cfg.data.seq_len), v.dtype, sharding=batch_sh)
                 for k, v in batch.items()}
        try:
            cost_compiled = _compile(TrainState(flat_graphdef, abstract, shardings, mesh), flat, state, micro)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e) or micro_rows % (2 * dp):
                raise
            pieces *= 2
    cost = cost_compiled.cost_analysis()
    cost = dict(cost[0] if isinstance(cost, list | tuple) else cost)
    for key in ("flops", "bytes accessed", "optimal_seconds"):
        cost[key] = float(cost.get(key, float("nan"))) * accum * pieces
    # The cost analysis counts no traffic for a Pallas kernel (a custom call): charge each its operand
    # and result bytes from the HLO shapes, so moving work into kernels cannot hide bytes.
    ops = hlo_bytes.instruction_bytes(cost_compiled.as_text())
    kernel_bytes = hlo_bytes.kernel_bytes(ops) * accum * pieces
    tokens = rows * cfg.data.seq_len
    model_flops = tokens * M.train_flops_per_token(cfg.model, cfg.data.seq_len)
    share = 2 if gen in MEGACORE and per_core else 1  # a per-core device has half a chip
    peak = (M.peak_flops(devices[0]) or float("nan")) / share
    flops, compiler_bytes = float(cost.get("flops", float("nan"))), float(cost.get("bytes accessed", float("nan")))
    nbytes = compiler_bytes + kernel_bytes
    # The compiler's own estimate when it gives one; otherwise a roofline of the byte count and of the
    # FLOPs, the compiler's or, where larger, the model's own count per device (the compiler counts none
    # inside a kernel, e.g. flash attention's, and undercounts at scale: see BENCHMARKS.md).
    seconds = float(cost.get("optimal_seconds", float("nan")))
    estimate = "compiler"
    if not seconds > 0:
        work = max(flops, model_flops / len(devices))
        seconds, estimate = max(work / peak, nbytes / (HBM_BYTES_PER_S[gen] / share)), "roofline"
    return result | {
        "cost_pieces_per_step": accum * pieces,
        "compiler_flops_per_device": flops, "compiler_bytes_per_device": compiler_bytes,
        "kernel_bytes_per_device": kernel_bytes, "bytes_per_device": nbytes,
        "bytes_table": hlo_bytes.table(ops, top=15, scale=accum * pieces),
        # The table's own sum, split by memory space: the compiler's count does not say which of its
        # bytes are HBM traffic and which are staged on chip (prefetches into and reads from it).
        "table_hbm_bytes_per_device": sum(o.bytes - o.other_space for o in ops) * accum * pieces,
        "table_other_space_bytes_per_device": sum(o.other_space for o in ops) * accum * pieces,
        "compiler_optimal_seconds": float(cost.get("optimal_seconds", float("nan"))),
        "estimated_step_seconds": seconds, "step_time_estimate": estimate,
        "model_flops_per_step": model_flops,
        "implied_mfu": model_flops / (seconds * len(devices) * peak) if seconds > 0 else None,
    }


def _compile(ts, cfg, state, batch):
    from monet_jax import sharding
    from monet_jax.train.step import make_train_step

    step = make_train_step(ts, cfg)
    with sharding.activate(ts.mesh):
        return step.jitted.lower(state, batch).compile()


def _report(r: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    m = r["memory_per_device"]
    lines = [
        f"topology {r['topology']}: {r['chips']} chips, {r['devices']} devices ({r['device_kind']}"
        f"{', megacore' if r['megacore'] else ''}); mesh " + " x ".join(f"{k}={v}" for k, v in r["mesh"].items()),
        f"compiled in {r['compile_seconds']}s; {r['tokens_per_step']:,} tokens per step",
        f"memory per device: arguments {gib(m['arguments'])}, outputs {gib(m['outputs'])}, temporaries "
        f"{gib(m['temporaries'])}, aliased {gib(m['aliased'])}, code {gib(m['code'])}",
        f"  total {gib(m['total'])} of {gib(r['hbm_per_device'])} HBM -> {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"Pallas kernel calls in the step: {r['kernel_calls']}",
    ]
    if "bytes_per_device" not in r:
        return "\n".join(lines)
    lines += [
        f"compiler cost per device (loops unrolled, {r['cost_pieces_per_step']} pieces per step): "
        f"{r['compiler_flops_per_device']:.4g} FLOPs, {r['bytes_per_device']:.4g} bytes accessed "
        f"({r['compiler_bytes_per_device']:.4g} counted by the compiler + {r['kernel_bytes_per_device']:.4g} "
        f"operand/result bytes of Pallas kernels)",
        f"estimated step time {r['estimated_step_seconds']:.3f}s ("
        + ("the compiler's estimate" if r["step_time_estimate"] == "compiler" else
           f"roofline of the bytes and of the larger of the compiler's and the model's FLOPs; the compiler's "
           f"optimal_seconds was {r['compiler_optimal_seconds']:.4g}")
        + f"); model FLOPs per step {r['model_flops_per_step']:.4g}"
        + (f"; implied MFU {100 * r['implied_mfu']:.1f}%" if r["implied_mfu"] is not None else ""),
        f"the table's own sum: {r['table_hbm_bytes_per_device']:.4g} bytes in HBM + "
        f"{r['table_other_space_bytes_per_device']:.4g} in other memory spaces (buffers the compiler stages on chip)",
        "where the bytes go (per device and step, top-level HLO instructions of the same kind and shapes, "
        "operand + result bytes with tile padding; the compiler's own count may differ per instruction):",
        r["bytes_table"],
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``tools/aot_compile.py``: compile the real training step (or the decoding loop) for a TPU topology or
    one H100 on a machine without either, and print its memory and costs.

    Args:
        argv: The command line without the program name (``None``: ``sys.argv[1:]``), e.g.
            ``["--config", "configs/monet-vd-1.4b.yaml", "--topology", "v4:4x4x2"]``.

    Returns:
        The exit status, 0 when the program fits the device's memory, 1 when it does not and 2 for a bad
            config or a missing compiler plugin.
    """
    p = argparse.ArgumentParser(prog="aot_compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=None,
                   help="YAML config (repeatable: merged in order); default: the embedded tiny run")
    p.add_argument("--topology", default="v4:2x2x2", help="TPU topology, e.g. v4:4x4x2 (32 chips), or h100 (one GPU)")
    p.add_argument("--per-core", action="store_true", help="one device per TensorCore instead of megacore")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--memory-only", action="store_true",
                   help="compile the step once for memory and kernels; skip the unrolled compile for the costs")
    p.add_argument("--hlo", default=None, help="write the optimized program's text to this file")
    p.add_argument("--decode", type=int, default=None, metavar="B",
                   help="compile the decoding loop at B rows instead of the training step (GPU targets)")
    p.add_argument("--strength-reduction", action="store_true",
                   help="with --decode: leave XLA's rewrite of one-row products into multiply + reduce on")
    p.add_argument("--no-registers", action="store_true",
                   help="GPU training step: skip measuring the Pallas Triton kernels' registers, spills and shared "
                        "memory (ptxas -v run again on their PTX from a dump of the compile: minutes at 1.4B here)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs on CPU; the TPU exists only as a topology

    from monet_jax.config import ConfigError
    from monet_jax.train import aot_gpu
    from monet_jax.train.config import TrainConfig

    if aot_gpu.is_gpu_target(args.topology):
        return _main_gpu(args)
    if args.decode is not None:
        print("aot_compile: error: --decode compiles for GPU targets only (--topology h100)", file=sys.stderr)
        return 2
    try:
        import libtpu  # noqa: F401
    except ImportError:
        print("aot_compile: error: libtpu is not installed (pip install 'monet-jax[tpu]')", file=sys.stderr)
        return 2
    try:
        result = compile_for_topology(TrainConfig.load(args.config, args.overrides), args.topology,
                                      per_core=args.per_core, cost=not args.memory_only)
    except (ConfigError, ValueError) as e:
        print(f"aot_compile: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the TPU compiler refusing the program (HBM or VMEM) is an answer, not a crash
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        reason = next((line.strip() for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line), str(e))
        print(f"aot_compile: does not fit on {args.topology}: {reason[:300]}", file=sys.stderr)
        return 1
    if args.hlo:
        print("--hlo: the TPU compile keeps no optimized text here; use XLA_FLAGS=--xla_dump_to", file=sys.stderr)
    print(_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["fits"] else 1


def _report_gpu(r: dict) -> str:
    from monet_jax.train import aot_gpu

    gib = lambda b: f"{b / 2**30:.2f} GiB"
    m = r["memory_per_device"]
    head = (f"{r['topology']} ({r['device_kind']}), compiled on this host in {r['compile_seconds']}s")
    lines = [head, f"memory per device: arguments {gib(m['arguments'])}, outputs {gib(m['outputs'])}, temporaries "
             f"{gib(m['temporaries'])}, aliased {gib(m['aliased'])}; total {gib(m['total'])} of "
             f"{gib(r['hbm_per_device'])} HBM -> {'fits' if r['fits'] else 'DOES NOT FIT'}"]
    if "kernels_per_step" in r:  # decoding
        s = r["step"]
        lines += [f"decoding {r['batch']} row(s) as {r['rows']} ({'sparse' if r['sparse'] else 'dense'} experts), "
                  f"{r['cache_slots']} cache slots; one-row products "
                  + ("left to XLA's strength reduction" if r["strength_reduction"] else "kept as matrix products"),
                  f"kernels per step: {r['kernels_per_step']} ({s['gemm_triton']} Triton products, "
                  f"{s['cublas']} cuBLAS, {s['pallas_triton']} Pallas, {s['fusion']} XLA fusions, {s['other']} other"
                  + (f"; conditionals on their true branch, {s['other_branch_kernels']:,} more kernels in the others"
                     if s.get("other_branch_kernels") else "") + "); "
                  f"products as multiply + reduce: {s['multiply_reduce_products']}",
                  f"one step: {r['step_flops']:.4g} FLOPs, {r['step_bytes']:.4g} bytes (XLA's count); weights "
                  f"{r['weight_bytes']:.4g} bytes -> roofline {r['roofline_steps_per_second']:.0f} steps/s"]
        return "\n".join(lines)
    lines += [f"{r['tokens_per_step']:,} tokens per step", *aot_gpu.report_inventory(r["inventory"])]
    if "triton_kernels" in r:
        lines += aot_gpu.report_triton(r["triton_kernels"], r.get("triton_kernels_note"))
    if "bytes_per_device" in r:
        lines += [f"cost: {r['flops_per_device']:.4g} FLOPs ({r['compiler_flops_per_device']:.4g} counted by XLA + "
                  f"{r['custom_call_flops_per_device']:.4g} in cuBLAS / cuDNN calls), {r['bytes_per_device']:.4g} "
                  f"bytes ({r['compiler_bytes_per_device']:.4g} by XLA + {r['kernel_bytes_per_device']:.4g} of "
                  "Pallas kernels)",
                  f"roofline step {r['estimated_step_seconds']:.3f}s; model FLOPs {r['model_flops_per_step']:.4g}"
                  + (f"; implied MFU {100 * r['implied_mfu']:.1f}%" if r["implied_mfu"] is not None else ""),
                  "where the bytes go (top-level instructions, operand + result bytes):", r["bytes_table"]]
    return "\n".join(lines)


def _main_gpu(args) -> int:
    from monet_jax.config import ConfigError
    from monet_jax.train import aot_gpu
    from monet_jax.train.config import TrainConfig

    if not aot_gpu.plugin_available():
        print(f"aot_compile: error: jax's CUDA plugin is not installed ({aot_gpu.plugin_install()})",
              file=sys.stderr)
        return 2
    try:
        cfg = TrainConfig.load(args.config, args.overrides)
        if args.decode is not None:
            result = aot_gpu.compile_decode(cfg.model, args.topology, batch=args.decode, hlo_path=args.hlo,
                                            strength_reduction=args.strength_reduction)
        else:
            result = aot_gpu.compile_train_step(cfg, args.topology, cost=not args.memory_only, hlo_path=args.hlo,
                                                registers=not args.no_registers)
    except (ConfigError, ValueError) as e:
        print(f"aot_compile: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the GPU compiler refusing the program for memory is an answer, not a crash
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        reason = next((line.strip() for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line), str(e))
        print(f"aot_compile: does not fit on {args.topology}: {reason[:300]}", file=sys.stderr)
        return 1
    print(_report_gpu(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
