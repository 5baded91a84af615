"""Compile the training step and the decoding loop for a GPU (an H100) on a host without one.

jax's CUDA plugin compiles for a device it is only told about: ``get_topology_desc(platform="cuda",
topology="1x1x1", target_config=...)`` under ``JAX_PLATFORMS=cpu`` takes a text ``GpuTargetConfigProto``
(``targets/h100.txtpb``, written from the card's published figures) and gives a compile-only device. XLA
then runs its whole GPU pipeline (fusion, Triton and cuBLAS products, Pallas Triton kernels, buffer
assignment), so memory and the optimized program are what a GPU would run, except that matrix-product
tiles are not autotuned (no device to time them on). ``cost_analysis()`` returns None there, so the
costs come from XLA's analysis of the optimized module run through the CPU client (:func:`module_cost`),
plus the products of cuBLAS / cuDNN calls counted from their shapes (:func:`custom_call_flops`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

from monet_jax.train import hlo_bytes

TARGETS = Path(__file__).resolve().parent / "targets"
# HBM and its bandwidth per target, and the target proto file; HBM is the card's, not jax's default pool
# (jax preallocates 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise).
GPU_TARGETS = {"h100": {"file": "h100.txtpb", "hbm_bytes": 80 * 2**30, "hbm_bytes_per_s": 3.35e12}}


def plugin_install() -> str:
    """The pip command that adds the CUDA plugin matching the installed jax (no CUDA libraries: compiling only)."""
    from importlib.metadata import version

    v = version("jax")
    return f"pip install jax-cuda13-plugin=={v} jax-cuda13-pjrt=={v}"


def plugin_available() -> bool:
    """Whether jax's CUDA plugin (any CUDA major version) is installed: it compiles for the GPU target."""
    return any(importlib.util.find_spec(f"jax_cuda{v}_plugin") is not None for v in (12, 13))


def is_gpu_target(name: str) -> bool:
    return name in GPU_TARGETS


@functools.cache
def gpu_devices(name: str = "h100"):
    """The compile-only devices of a GPU target (one GPU), through the CUDA plugin on this host."""
    from jax.experimental import topologies

    if name not in GPU_TARGETS:
        raise ValueError(f"unknown GPU target {name!r} (known: {', '.join(GPU_TARGETS)})")
    if not plugin_available():
        raise ValueError(f"the CUDA plugin is not installed ({plugin_install()})")
    text = (TARGETS / GPU_TARGETS[name]["file"]).read_text()
    return topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=text).devices


# -- the optimized program's kernels ------------------------------------------------------------------------


def _called(line: str) -> list[str]:
    return [n.strip().lstrip("%") for n in re.findall(r"calls=%?([\w.\-]+)", line)]


def _fusion_kind(ins: hlo_bytes.Instruction) -> str:
    m = re.search(r'"fusion_backend_config":\{"kind":"([^"]+)"', ins.line)
    kind = (re.search(r"kind=(\w+)", ins.line) or [None, "?"])[1]
    return m.group(1) if m else kind


def _target(ins: hlo_bytes.Instruction) -> str:
    return (re.search(r'custom_call_target="([^"]+)"', ins.line) or [None, "?"])[1]


def classify(ins: hlo_bytes.Instruction) -> str | None:
    """What kernel a top-level instruction launches: ``gemm_triton`` (an XLA Triton product), ``cublas``,
    ``cudnn``, ``pallas_triton`` (a Pallas kernel), ``triton`` (other XLA Triton fusions), ``fusion``
    (XLA's own loop / reduction kernels), ``other`` (a lone copy, reduce, sort...), or None (no kernel)."""
    if ins.opcode in hlo_bytes.FREE or ins.opcode.endswith("-done"):
        return None
    if ins.opcode == "custom-call":
        target = _target(ins)
        if target.startswith("__cublas"):
            return "cublas"
        if target.startswith("__cudnn"):
            return "cudnn"
        if target in hlo_bytes.KERNEL_TARGETS:
            return "pallas_triton"
        return "other"
    if ins.opcode == "fusion":
        kind = _fusion_kind(ins)
        if "gemm" in kind:
            return "gemm_triton"
        if kind.startswith("__cudnn"):
            return "cudnn"
        if kind.startswith("__triton"):
            return "triton"
        if kind.startswith("__cublas") or "cublas" in kind:
            return "cublas"
        return "fusion"
    return "other"


def _strength_reduced(comps) -> set[str]:
    """Computations (transitively) holding a ``multiply`` that XLA made from a ``dot_general``: a product
    rewritten as elementwise multiply + reduce."""
    direct = {name for name, instrs in comps.items()
              if any(i.opcode == "multiply" and re.search(r'op_name="[^"]*dot_general', i.line) for i in instrs)}
    out, changed = set(direct), True
    while changed:
        changed = False
        for name, instrs in comps.items():
            if name not in out and any(set(_called(i.line)) & out for i in instrs if i.opcode == "fusion"):
                out.add(name)
                changed = True
    return out


def _trip_count(ins: hlo_bytes.Instruction) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.line)
    return int(m.group(1)) if m else None


def score_buffers(comps, entry, seq_len: int, rows_x_heads: int) -> list[str]:
    """Shapes of buffers (top-level results, which live in memory) shaped like attention scores: the last two
    dimensions ``seq_len`` and the leading ones ``rows_x_heads`` elements or more (``[b, heads, t, t]``,
    ``[b, kv, r, t, t]``, ``[b * heads, t, t]``; not the ``[b, t, t]`` mask)."""
    found = set()
    for ins in hlo_bytes.top_level(comps, entry):
        for dtype, dims, _ in hlo_bytes._ARRAY.findall(ins.shape):
            shape = [int(d) for d in dims.split(",") if d and int(d) != 1]  # [b, n, t, t, 1] too
            if len(shape) >= 3 and shape[-2:] == [seq_len, seq_len] and math.prod(shape[:-2]) >= rows_x_heads:
                found.add(f"{dtype}[{dims}]")
    return sorted(found)


def _loops(comps: dict, names: list[str]) -> list[tuple[str, int | None]]:
    """The while loops in ``names``' computations, as ``(body, trip count)``."""
    return [(re.search(r"body=%?([\w.\-]+)", ins.line).group(1), _trip_count(ins))
            for name in names for ins in comps[name] if ins.opcode == "while"]


def inventory(hlo_text: str, seq_len: int | None = None, rows_x_heads: int | None = None) -> dict:
    """The kernels of an optimized GPU program: counts per class for the whole program run once (loop
    bodies once each) and, per ``while`` loop, its body's kernels with the loop's trip count; custom-call
    targets; products done as multiply + reduce; buffers shaped like ``[b, heads, t, t]`` scores. A run takes one
    branch of each conditional: counts follow the true branches (the sparse decoding path's: the unions fit),
    and ``other_branch_kernels`` says how many kernels the other branches hold."""
    comps, entry = hlo_bytes.parse(hlo_text)
    reduced = _strength_reduced(comps)

    def count(names):
        classes, targets, fusions, mul_reduce = Counter(), Counter(), Counter(), 0
        for name in names:
            for ins in comps.get(name, []):
                c = classify(ins)
                if c is None:
                    continue
                classes[c] += 1
                if ins.opcode == "custom-call":
                    targets[_target(ins)] += 1
                if ins.opcode == "fusion":
                    fusions[_fusion_kind(ins)] += 1
                    mul_reduce += bool(set(_called(ins.line)) & reduced)
                elif ins.opcode == "multiply" and name in reduced:
                    mul_reduce += 1
        return {"kernels": sum(classes.values()), **{k: classes.get(k, 0) for k in
                ("gemm_triton", "cublas", "cudnn", "pallas_triton", "triton", "fusion", "other")},
                "fusion_kinds": dict(fusions), "custom_call_targets": dict(targets),
                "multiply_reduce_products": mul_reduce}

    def counted(roots):  # along the conditionals' true branches, and how many kernels the other branches hold
        taken, every = hlo_bytes.reachable(comps, roots, "true"), hlo_bytes.reachable(comps, roots)
        return {**count(taken), "other_branch_kernels": count([n for n in every if n not in taken])["kernels"]}

    seen = hlo_bytes.reachable(comps, [entry] if entry else [], "true")
    result = counted([entry] if entry else [])
    result["loops"] = [{"body": body, "trip_count": trips, **counted([body])} for body, trips in _loops(comps, seen)]
    result["score_buffers"] = score_buffers(comps, entry, seq_len, rows_x_heads) if seq_len and rows_x_heads else []
    return result


# -- Triton kernels: registers, spills and shared memory -----------------------------------------------------
# With ``xla_dump_to`` XLA:GPU writes the module's PTX (``*.ptx``, one file per piece it compiled in parallel,
# each Pallas Triton kernel an entry named as the call, ``__N`` added for a second variant), the optimized
# program and its thunk sequence (every launch's grid, threads and dynamic shared memory). ptxas then gives
# what XLA's own ``ptxas -arch=sm_90a --warn-on-spills`` made of each kernel (XLA runs the same binary,
# found the same way, unless it is built with NVIDIA's compiler library).

_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_THUNK = re.compile(r"\]\s+([\w.\-]+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+) bytes")
_PALLAS = re.compile(r'name = "([\w.\-]+)"(?:, num_stages = (\d+) : i32, num_warps = (\d+) : i32)?')


def find_ptxas() -> str | None:
    """The ptxas XLA:GPU compiles with: on ``PATH``, else in the ``nvidia-cuda-nvcc`` wheel, else in
    ``$CUDA_HOME/bin`` (``/usr/local/cuda/bin``); None where there is none."""
    found = shutil.which("ptxas")
    if found:
        return found
    candidates = []
    try:  # the pip wheels of jax's CUDA extras: nvidia/cu13/bin (CUDA 13), nvidia/cuda_nvcc/bin (CUDA 12)
        import nvidia

        candidates += [Path(p) / sub / "bin" / "ptxas" for p in nvidia.__path__ for sub in ("cu13", "cuda_nvcc")]
    except ImportError:
        pass
    candidates += [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "ptxas"]
    return next((str(p) for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def parse_ptxas(text: str) -> dict[str, dict]:
    """``ptxas -v``'s report per entry function: ``registers`` per thread, ``spill_store_bytes``,
    ``spill_load_bytes``, ``stack_bytes`` (the stack frame, where spills go) and ``static_shared_bytes``
    (``.shared`` arrays of fixed size; Triton's shared memory is dynamic, given at launch)."""
    out: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = out.setdefault(m.group(1), {"registers": 0, "spill_store_bytes": 0, "spill_load_bytes": 0,
                                                  "stack_bytes": 0, "static_shared_bytes": 0})
        elif m := _PTXAS_PROPS.search(line):
            current = out.get(m.group(1))  # None for a device function: not a kernel
        elif current is not None and (m := _PTXAS_FRAME.search(line)):
            current.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                           spill_load_bytes=int(m.group(3)))
        elif current is not None and (m := _PTXAS_USED.search(line)):
            current["registers"] = int(m.group(1))
            if s := _PTXAS_SMEM.search(line):
                current["static_shared_bytes"] = int(s.group(1))
    return out


def parse_thunks(text: str) -> dict[str, dict]:
    """Kernel launches of XLA:GPU's thunk sequence dump, per kernel name: ``launches``, ``grid``, ``threads``
    and ``shared_bytes`` (the dynamic shared memory of a launch; the largest where launches differ)."""
    out: dict[str, dict] = {}
    for name, grid, threads, smem in _THUNK.findall(text):
        k = out.setdefault(name, {"launches": 0, "grid": [int(g) for g in grid.split(",")],
                                  "threads": math.prod(int(t) for t in threads.split(",")), "shared_bytes": 0})
        k["launches"] += 1
        k["shared_bytes"] = max(k["shared_bytes"], int(smem))
    return out


def pallas_calls(hlo_text: str) -> dict[str, dict]:
    """The Pallas Triton calls of an optimized program by kernel name: how many calls, and ``num_warps``."""
    out: dict[str, dict] = {}
    for line in hlo_text.splitlines():
        if '"__gpu$xla.gpu.triton"' not in line:
            continue
        found = _PALLAS.findall(line)
        if found:
            name, _, warps = found[-1]  # the call's own name comes last, after the serialized kernel
            k = out.setdefault(name, {"calls": 0, "num_warps": int(warps) if warps else None})
            k["calls"] += 1
    return out


def triton_kernels(dump_dir: str | Path, ptxas: str | None = None, *, timeout: float = 1800) -> list[dict] | None:
    """Registers, spills and shared memory of the Pallas Triton kernels of the program dumped in ``dump_dir``
    (``xla_dump_to``: its ``*.ptx``, ``*gpu_after_optimizations.txt`` and ``*thunk_sequence.txt``), by
    running ``ptxas -v`` for ``sm_90a`` on the PTX that holds them. One row per compiled kernel (XLA's
    variants of one Pallas kernel, ``name__1``..., separately): ``name``, ``kernel`` (the Pallas name),
    ``launches``, ``grid``, ``threads``, ``registers`` (per thread), ``spill_store_bytes``,
    ``spill_load_bytes``, ``stack_bytes``, ``shared_bytes`` (dynamic at launch + static). None without
    ptxas; FileNotFoundError where the directory holds no optimized program."""
    ptxas = ptxas or find_ptxas()
    if ptxas is None:
        return None
    root = Path(dump_dir)
    programs = sorted(root.glob("*gpu_after_optimizations.txt"))
    if not programs:  # e.g. a compile served from jax's persistent cache: XLA did not run
        raise FileNotFoundError(f"no optimized GPU program in {root} (the compile was not run by XLA)")
    hlo = "\n".join(p.read_text() for p in programs)
    thunks: dict[str, dict] = {}
    for p in sorted(root.glob("*thunk_sequence.txt")):
        thunks |= parse_thunks(p.read_text())
    calls = pallas_calls(hlo)
    if not calls:
        return []
    names = "|".join(re.escape(n) for n in sorted(calls, key=len, reverse=True))
    variant = re.compile(rf"({names})(?:__\d+)?")
    entry = re.compile(r"^\.(?:visible|weak) \.entry ([\w$.]+)\(", re.M)
    rows = []
    for ptx in sorted(root.glob("*.ptx")):
        text = ptx.read_text()
        wanted = [n for n in entry.findall(text) if variant.fullmatch(n)]
        if not wanted:
            continue
        proc = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", "-o", "/dev/null", str(ptx)],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed on {ptx.name}: {proc.stderr[-2000:]}")
        report = parse_ptxas(proc.stdout + proc.stderr)
        for name in wanted:
            got, launch = report.get(name, {}), thunks.get(name, {})
            kernel = variant.fullmatch(name).group(1)
            rows.append({
                "name": name, "kernel": kernel, "launches": launch.get("launches"), "grid": launch.get("grid"),
                "threads": launch.get("threads"), "num_warps": calls[kernel]["num_warps"],
                "registers": got.get("registers"), "spill_store_bytes": got.get("spill_store_bytes"),
                "spill_load_bytes": got.get("spill_load_bytes"), "stack_bytes": got.get("stack_bytes"),
                "shared_bytes": (launch.get("shared_bytes") or 0) + got.get("static_shared_bytes", 0),
            })
    return sorted(rows, key=lambda r: r["name"])


NO_PTXAS = "ptxas not found (on PATH, in the nvidia-cuda-nvcc wheel, or in CUDA_HOME/bin)"


def report_triton(rows: list[dict] | None, note: str | None = None) -> list[str]:
    if rows is None:
        return [f"Pallas Triton kernels' registers and spills: not measured: {note or NO_PTXAS}"]
    if not rows:
        return ["Triton kernels' registers: no Pallas Triton kernels in the program"]
    lines = ["Pallas Triton kernels (ptxas -v for sm_90a; registers per thread, at most 255; spill stores, spill "
             "loads and stack in bytes per thread):",
             f"  {'kernel':<28} {'launches':>8} {'threads':>7} {'registers':>9} {'spill st':>9} {'spill ld':>9} "
             f"{'stack':>7} {'shared':>8}"]
    for r in rows:
        lines.append(f"  {r['name']:<28} {r['launches'] or 0:>8} {r['threads'] or 0:>7} {r['registers']:>9} "
                     f"{r['spill_store_bytes']:>9,} {r['spill_load_bytes']:>9,} {r['stack_bytes']:>7,} "
                     f"{r['shared_bytes']:>8,}")
    spilling = [r["name"] for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    lines.append(f"  spilling: {', '.join(spilling) if spilling else 'none'}")
    return lines


def _dims(shape: str) -> list[list[int]]:
    return [[int(d) for d in dims.split(",") if d] for _, dims, _ in hlo_bytes._ARRAY.findall(shape)]


def custom_call_flops(hlo_text: str) -> dict:
    """FLOPs of cuBLAS and cuDNN calls, which XLA's cost analysis does not count, from their shapes: a
    product is ``2 * result elements * contracted size``; cuDNN attention ``4 * b * n * tq * tk * d`` forward
    and ``10 *`` that backward (five products), halved when causal. Loop bodies counted once each."""
    comps, _ = hlo_bytes.parse(hlo_text)
    shapes = {i.name: i.shape for instrs in comps.values() for i in instrs}
    out = {"cublas": 0.0, "cudnn": 0.0}
    for instrs in comps.values():
        for ins in instrs:
            if ins.opcode != "custom-call":
                continue
            target = _target(ins)
            operands = [_dims(shapes.get(o, ""))[0] for o in ins.operands if _dims(shapes.get(o, ""))]
            if target.startswith("__cublas") and len(operands) >= 2:
                result = _dims(ins.shape)[0]
                m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.line)
                contract = [int(x.strip('" ')) for x in m.group(1).split(",") if x.strip('" ')] if m else [-1]
                out["cublas"] += 2.0 * math.prod(result) * math.prod(operands[0][c] for c in contract)
            elif target.startswith("__cudnn$fmha") and len(operands) >= 3:
                q, k = operands[0], operands[1]
                b, n, tq, tk, d = q[0], q[2], q[1], k[1], q[3]  # jax's cuDNN attention: [b, t, n, d]
                work = 4.0 * b * n * tq * tk * d * (2.5 if "Backward" in target else 1.0)
                out["cudnn"] += work * (0.5 if "CAUSAL" in ins.line.upper() else 1.0)
    return out


def module_cost(compiled) -> dict | None:
    """XLA's cost analysis of the optimized module, run through the CPU client (the GPU client that
    compiled it has no device); loop bodies are counted once. None where this jax does not offer it."""
    import jax

    try:
        from jax._src.lib import xla_client

        analyse = xla_client._xla.hlo_module_cost_analysis
        try:
            module = compiled.runtime_executable().hlo_modules()[0]
        except Exception:  # noqa: BLE001 - an executable that does not hand out its module: parse the text
            from jaxlib import _hlo

            module = _hlo.hlo_module_from_text(compiled.as_text())
        return dict(analyse(jax.devices("cpu")[0].client, module))
    except (AttributeError, ImportError, RuntimeError):
        return None


def memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes \
        - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes
    return {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes, "aliased": mem.alias_size_in_bytes,
            "code": mem.generated_code_size_in_bytes, "total": total}


def costs(compiled, hlo_text: str, model_flops: float, target: str) -> dict:
    """FLOPs and bytes of a compiled program without loops worth scaling (or per loop body run once):
    XLA's count plus the custom calls' products (:func:`custom_call_flops`) and their operand and result
    bytes (``hlo_bytes``), and the roofline step time of both against the target's peaks."""
    from monet_jax.train import metrics as M

    cost = module_cost(compiled) or {}
    extra = custom_call_flops(hlo_text)
    ops = hlo_bytes.instruction_bytes(hlo_text)
    library = [o for o in ops if o.kind.startswith("custom-call:__cu")]  # cuBLAS, cuDNN
    custom = sum(o.bytes for o in library)
    compiler_flops = float(cost.get("flops", float("nan")))
    compiler_bytes = float(cost.get("bytes accessed", float("nan")))
    flops = compiler_flops + extra["cublas"] + extra["cudnn"]
    kernel = hlo_bytes.kernel_bytes(ops)
    nbytes = compiler_bytes + kernel
    peak = next(f for name, f in M.PEAK_FLOPS if name.lower() == target.lower())
    seconds = max(max(flops, model_flops) / peak, nbytes / GPU_TARGETS[target]["hbm_bytes_per_s"])
    return {
        "cost_pieces_per_step": 1, "compiler_flops_per_device": compiler_flops,
        "custom_call_flops_per_device": extra["cublas"] + extra["cudnn"], "flops_per_device": flops,
        "compiler_bytes_per_device": compiler_bytes, "kernel_bytes_per_device": kernel,
        "custom_call_bytes_per_device": custom, "bytes_per_device": nbytes,
        "bytes_table": hlo_bytes.table(ops, top=15),
        "table_hbm_bytes_per_device": sum(o.bytes for o in ops), "table_other_space_bytes_per_device": 0.0,
        "compiler_optimal_seconds": float("nan"), "estimated_step_seconds": seconds,
        "step_time_estimate": "roofline", "model_flops_per_step": model_flops,
        "implied_mfu": model_flops / (seconds * peak) if seconds > 0 else None,
    }


# -- the programs ------------------------------------------------------------------------------------------


def compile_train_step(cfg, target: str = "h100", *, cost: bool = True, hlo_path: str | None = None,
                       compiler_options: dict | None = None, devices=None, registers: bool = False) -> dict:
    """The training step of ``cfg`` compiled for one GPU of ``target``: memory, kernels and costs, with the
    same fields as the TPU compile (``aot.compile_for_topology``) plus ``inventory``. ``devices``: compile for
    these (real) devices instead, with the choices of their platform (the GPU suite's check on a GPU).
    ``registers``: also ``triton_kernels``, the Pallas Triton kernels' registers, spills and shared memory
    (:func:`triton_kernels`, from a dump of the compile; None without ptxas)."""
    import jax
    from flax import nnx

    from monet_jax import sharding
    from monet_jax.kernels import dispatch
    from monet_jax.train import metrics as M
    from monet_jax.train.step import BATCH_KEYS, TrainState, _build, make_train_step

    devices = gpu_devices(target) if devices is None else devices
    mesh = sharding.make_mesh(cfg.mesh, devices)
    cfg = dataclasses.replace(cfg, init_from=None)
    # A flat program (no loops) when costs are wanted: XLA's analysis counts a loop body once.
    if cost:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_groups=False),
                                  optim=dataclasses.replace(cfg.optim, grad_accum=1))
    with dispatch.lowering_for(devices[0].platform):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _build(cfg)))
        ts = TrainState(graphdef, abstract, sharding.state_shardings(abstract, mesh), mesh)
        rows, seq = cfg.data.batch_size, cfg.data.seq_len
        batch_sh = sharding.batch_sharding(mesh, 2)
        batch = {k: jax.ShapeDtypeStruct((rows, seq), "float32" if k == "loss_mask" else "int32", sharding=batch_sh)
                 for k in BATCH_KEYS}
        t0 = time.perf_counter()
        step = make_train_step(ts, cfg)
        ptxas = find_ptxas() if registers else None
        dump = _dump_options(compiler_options) if ptxas else None
        with sharding.activate(mesh):
            compiled = step.jitted.lower(ts.abstract(), batch).compile(
                compiler_options=dump[1] if dump else compiler_options)
    seconds = time.perf_counter() - t0
    text = compiled.as_text()
    if hlo_path:
        Path(hlo_path).write_text(text)
    mem = memory(compiled)
    hbm = GPU_TARGETS[target]["hbm_bytes"]
    inv = inventory(text, seq, rows * cfg.model.num_attention_heads)
    result = {
        "topology": target, "devices": len(devices), "chips": len(devices), "device_kind": devices[0].device_kind,
        "megacore": False, "mesh": dict(mesh.shape), "tokens_per_step": rows * seq,
        "compile_seconds": round(seconds, 1), "kernel_calls": inv["pallas_triton"],
        "memory_per_device": mem, "hbm_per_device": hbm, "fits": mem["total"] <= hbm, "inventory": inv,
    }
    if registers:
        result["triton_kernels"], result["triton_kernels_note"] = None, NO_PTXAS
        try:
            if dump:
                result["triton_kernels"], result["triton_kernels_note"] = triton_kernels(dump[0], ptxas), None
        except FileNotFoundError as e:
            result["triton_kernels_note"] = str(e)
        finally:
            if dump and dump[2]:
                shutil.rmtree(dump[0], ignore_errors=True)
    if cost:
        result |= costs(compiled, text, rows * seq * M.train_flops_per_token(cfg.model, seq), target)
    return result


def _dump_options(options: dict | None) -> tuple[str, dict, bool]:
    """``(dump directory, compiler options that dump there, whether the directory is ours to remove)``: the
    options' own ``xla_dump_to`` if they name one, else a new temporary directory (tens of MB for a step:
    XLA also writes each piece's LLVM IR)."""
    import tempfile

    options = dict(options or {})
    if options.get("xla_dump_to"):
        return options["xla_dump_to"], options, False
    path = tempfile.mkdtemp(prefix="monet-aot-gpu-")
    return path, {**options, "xla_dump_to": path}, True


def compile_decode(cfg, target: str = "h100", *, batch: int = 1, prompt: int = 128, new_tokens: int = 128,
                   hlo_path: str | None = None, strength_reduction: bool = False) -> dict:
    """The decoding loop of ``generate`` (``lax.while_loop`` over one-token steps, cache donated) compiled
    for one GPU of ``target`` at ``batch`` rows: memory, kernels per step (the loop body's) and one step's
    costs. ``strength_reduction``: leave XLA's rewrite of one-row products on (to compare)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from monet_jax.eval import generate as G
    from monet_jax.kernels import dispatch
    from monet_jax.model import MonetForCausalLM
    from monet_jax.model.pure import PureModel, decodes_sparse

    devices = gpu_devices(target)
    mesh = jax.sharding.Mesh(devices, ("data",))
    rep = NamedSharding(mesh, PartitionSpec())
    put = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)
    with dispatch.lowering_for("gpu"):
        b = G.bucket(batch, G.least_rows())
        p, total = G.bucket(prompt, 8), G.bucket(G.bucket(prompt, 8) + new_tokens)
        sparse = decodes_sparse(cfg, b)
        holder = {}

        def split():
            holder["pure"] = PureModel(MonetForCausalLM(cfg, rngs=nnx.Rngs(0)), expert_rows=sparse)
            return holder["pure"].leaves

        leaves = put(jax.eval_shape(split))
        pure = holder["pure"]
        fixed = put(G._Fixed(jax.ShapeDtypeStruct((b, total), jnp.bool_), jax.eval_shape(lambda: jax.random.key(0)),
                             jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
                             jax.ShapeDtypeStruct((b,), jnp.bool_)))
        sampling = G.Sampling()

        def run(fn, *args):
            return fn(nnx.merge(pure.graphdef, jax.tree.unflatten(pure.treedef, args[0])), *args[1:])

        ids = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=rep)
        state = put(jax.eval_shape(lambda lv, i, f: run(G._prefill, lv, i, i, f, total - p, sampling, False),
                                   leaves, ids, fixed))
        loop = jax.jit(lambda lv, s, f, stop: run(G._decode, lv, s, f, stop, sampling, False), donate_argnums=(1,))
        options = None if strength_reduction else dispatch.decode_compiler_options()
        t0 = time.perf_counter()
        compiled = loop.lower(leaves, state, fixed, jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)).compile(
            compiler_options=options)
    seconds = time.perf_counter() - t0
    text = compiled.as_text()
    if hlo_path:
        Path(hlo_path).write_text(text)
    inv = inventory(text, None, None)
    body = max(inv["loops"], key=lambda lp: lp["kernels"]) if inv["loops"] else inv
    mem = memory(compiled)
    hbm = GPU_TARGETS[target]["hbm_bytes"]
    cost = module_cost(compiled) or {}
    extra = custom_call_flops(text)
    weights = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(leaves))
    return {
        "topology": target, "device_kind": devices[0].device_kind, "batch": batch, "rows": b, "cache_slots": total,
        "sparse": sparse, "strength_reduction": strength_reduction, "compile_seconds": round(seconds, 1),
        "memory_per_device": mem, "hbm_per_device": hbm, "fits": mem["total"] <= hbm, "weight_bytes": weights,
        "kernels_per_step": body["kernels"], "step": body, "inventory": inv,
        # XLA's count covers the loop body once, i.e. one step (plus the loop's bookkeeping).
        "step_flops": float(cost.get("flops", float("nan"))) + extra["cublas"] + extra["cudnn"],
        "step_bytes": float(cost.get("bytes accessed", float("nan"))),
        "roofline_steps_per_second": GPU_TARGETS[target]["hbm_bytes_per_s"] / weights,
    }


def report_inventory(inv: dict) -> list[str]:
    lines = [f"kernels (loop bodies once): {inv['kernels']} = {inv['gemm_triton']} Triton products + "
             f"{inv['cublas']} cuBLAS + {inv['cudnn']} cuDNN + {inv['pallas_triton']} Pallas (Triton) + "
             f"{inv['triton']} other Triton fusions + {inv['fusion']} XLA fusions + {inv['other']} other"
             + _branch_note(inv),
             f"  fusion kinds: {json.dumps(inv['fusion_kinds'], sort_keys=True)}",
             f"  products done as multiply + reduce: {inv['multiply_reduce_products']}; "
             f"[b, heads, t, t] buffers: {', '.join(inv['score_buffers']) or 'none'}"]
    for lp in inv["loops"]:
        products = lp["gemm_triton"] + lp["cublas"]
        lines.append(f"  loop {lp['body']} (trip count {lp['trip_count']}): {lp['kernels']} kernels a pass, "
                     f"{products} products, {lp['multiply_reduce_products']} as multiply + reduce" + _branch_note(lp))
    return lines


def _branch_note(counts: dict) -> str:
    n = counts.get("other_branch_kernels", 0)
    return f" (conditionals on their true branch; {n:,} more kernels in the other branches)" if n else ""
