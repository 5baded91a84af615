"""Where the bytes of a compiled program go, read from its optimized HLO text.

XLA's ``cost_analysis()`` gives one total of bytes accessed, and counts nothing for a custom call
without a cost estimate (a Pallas kernel is opaque to it). This module sizes every top-level
instruction (fusions, matmuls, copies, collectives, custom calls) as its operand bytes plus its result
bytes, with the TPU tile padding of each shape's layout (``{1,0:T(8,128)(2,1)}`` pads the two minor
dimensions to 8 x 128), so kernels can be charged for the traffic they really cause and the largest
movers can be listed by shape. A kernel reads each operand once, except the flash-attention kernels,
which fetch their streamed operands once per visited block and are charged for it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
               "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
# Instructions that move no data of their own (their callees' instructions are counted instead).
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
        "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"}
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\](?:\{([^}]*)\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_CALLEES = re.compile(r"\b(body|condition|to_apply|branch_computations|true_computation|false_computation)="
                      r"(\{[^}]*\}|%?[\w.\-]+)")


def array_bytes(dtype: str, dims: str, layout: str | None) -> float:
    """Bytes of one array in memory: its dims padded to the first tile of its layout."""
    shape = [int(d) for d in dims.split(",") if d]
    size = DTYPE_BYTES.get(dtype, 0)
    if layout and ":" in layout:
        order_str, _, rest = layout.partition(":")
        tile = re.match(r"T\(([0-9,]+)\)", rest)
        order = [int(o) for o in order_str.split(",") if o]
        if tile and order:
            tile_dims = [int(t) for t in tile.group(1).split(",")]
            for dim, t in zip(order, reversed(tile_dims), strict=False):  # most minor dimension first
                shape[dim] = -(-shape[dim] // t) * t
    return size * math.prod(shape)


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string (an array or a tuple of arrays)."""
    return sum(array_bytes(*m.groups()) for m in _ARRAY.finditer(shape))


def _space(layout: str | None) -> int:
    """The memory space of a layout (``S(3)``): 0, the default, is HBM; others are on-chip memories the
    compiler stages buffers in (on TPU v4, ``S(3)`` buffers live in a 128 MiB space beside HBM)."""
    m = re.search(r"S\((\d+)\)", layout or "")
    return int(m.group(1)) if m else 0


def _other_space_bytes(shape: str) -> float:
    return sum(array_bytes(*m.groups()) for m in _ARRAY.finditer(shape) if _space(m.group(3)))


def _split_shape(rest: str) -> tuple[str, str]:
    """``"(f32[2]{0}, s32[]) opcode(...)..."`` -> (shape, remainder)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    shape, _, remainder = rest.partition(" ")
    return shape, remainder


def _until_close(args: str) -> str:
    """The text of an operand list up to its closing parenthesis."""
    depth = 1
    for i, ch in enumerate(args):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return args[:i]
    return args


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    shape: str
    operands: list[str]
    line: str


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str | None]:
    """Computations of an HLO module: ``{name: [instructions]}`` and the entry computation's name."""
    comps: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if (h := _HEADER.match(line)) and not line.startswith(" "):
            current = h.group(2)
            comps[current] = []
            if h.group(1):
                entry = current
            continue
        if current is None or not (m := _INSTR.match(line)):
            continue
        shape, rest = _split_shape(m.group(2))
        opcode, _, args = rest.partition("(")
        operands = re.findall(r"%([\w.\-]+)", _until_close(args))
        comps[current].append(Instruction(m.group(1), opcode.strip(), shape, operands, line))
    return comps, entry


def callees(line: str) -> dict[str, list[str]]:
    """The computations an instruction calls, by attribute (``body``, ``condition``, ``true_computation``,
    ``branch_computations``, ...)."""
    return {key: [n.strip().lstrip("%") for n in names.strip("{}").split(",") if n.strip()]
            for key, names in _CALLEES.findall(line)}


def _branches(called: dict[str, list[str]], which: str) -> list[str]:
    """A conditional's branches to follow: all, or (``which="true"``) the one a predicate's true value takes:
    ``true_computation``, or the last of ``branch_computations`` (where ``jax.lax.cond`` puts its true branch)."""
    every = called.get("true_computation", []) + called.get("false_computation", []) \
        + called.get("branch_computations", [])
    if which == "all" or not every:
        return every
    return called.get("true_computation") or called["branch_computations"][-1:]


def reachable(comps: dict[str, list[Instruction]], roots: list[str], branches: str = "all") -> list[str]:
    """The computations that run as kernels of their own from ``roots``, in the order met: the roots and every
    loop body, call and conditional branch they reach (not the insides of fusions, nor reductions' scalar
    computations). ``branches="true"``: each conditional's true branch only (:func:`_branches`), the kernels of
    one run where every predicate holds."""
    seen, todo = {}, list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen[name] = None
        for ins in comps[name]:
            if ins.opcode in ("while", "call", "conditional"):
                called = callees(ins.line)
                todo.extend(_branches(called, branches) if ins.opcode == "conditional"
                            else [n for names in called.values() for n in names])
    return list(seen)


def top_level(comps: dict[str, list[Instruction]], entry: str | None) -> list[Instruction]:
    """Instructions that run as their own kernels: those of :func:`reachable` from the entry."""
    return [ins for name in reachable(comps, [entry] if entry else []) for ins in comps[name]]


@dataclasses.dataclass
class OpBytes:
    name: str
    kind: str  # opcode, or fusion kind / custom-call target
    source: str  # the JAX operation that made it (metadata op_name), shortened
    out_shape: str
    in_shapes: list[str]
    bytes: float
    other_space: float = 0.0  # of ``bytes``, those in a memory space other than HBM


def _short_shape(shape: str) -> str:
    return ", ".join(f"{d}[{s}]" for d, s, _ in _ARRAY.findall(shape))


def instruction_bytes(hlo_text: str) -> list[OpBytes]:
    """Operand + result bytes of every top-level instruction of a compiled module."""
    comps, entry = parse(hlo_text)
    shapes = {ins.name: ins.shape for instrs in comps.values() for ins in instrs}
    out = []
    for ins in top_level(comps, entry):
        if ins.opcode in FREE or ins.opcode.endswith("-done"):
            continue
        kind = ins.opcode
        if ins.opcode == "fusion":
            kind = "fusion:" + (re.search(r"kind=(\w+)", ins.line) or [None, "?"])[1]
        elif ins.opcode == "custom-call":
            kind = "custom-call:" + (re.search(r'custom_call_target="([^"]+)"', ins.line) or [None, "?"])[1]
        src = re.search(r'op_name="([^"]*)"', ins.line)
        source = re.sub(r"jit\([^)]*\)/|jvp\(|transpose\(|\)", "", src.group(1))[-70:] if src else ""
        in_shapes = [shapes.get(o, "") for o in ins.operands]
        if ins.opcode in ("slice", "dynamic-slice", "slice-start", "copy-start"):
            # A slice reads only what it writes; an async start's result tuple repeats its operand.
            arrays = [m.groups() for m in _ARRAY.finditer(ins.shape)]
            written = arrays[1] if ins.opcode.endswith("-start") and len(arrays) > 1 else arrays[0]
            read = _ARRAY.search(in_shapes[0]) if in_shapes else None
            moved = array_bytes(*written)
            total = 2 * moved
            other = moved * ((_space(written[2]) > 0) + (read is not None and _space(read.group(3)) > 0))
        else:
            total = shape_bytes(ins.shape) + sum(shape_bytes(s) for s in in_shapes)
            other = _other_space_bytes(ins.shape) + sum(_other_space_bytes(s) for s in in_shapes)
        if src and kind.removeprefix("custom-call:") in KERNEL_TARGETS and "flash_attention" in src.group(1):
            total += _flash_rereads(src.group(1), in_shapes)
        out.append(OpBytes(ins.name, kind, source, _short_shape(ins.shape), [_short_shape(s) for s in in_shapes],
                           total, other))
    return out


# Custom calls that are Pallas kernels (Mosaic on TPU, Triton / Mosaic GPU): the compiler's cost analysis
# counts none of their traffic. XLA's own custom calls (e.g. ``ConcatBitcast``) are layout bookkeeping.
KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu")


# Operands of JAX's TPU flash-attention kernels (q, k, v, q and kv segment ids, then for the backward l, m,
# dO, di) that are streamed along the inner grid axis, so fetched once per visited block, not once.
_FLASH_STREAMED = {"bwd_dkv": (0, 5, 6, 7, 8), "bwd_dq": (1, 2), "forward": (1, 2)}


def _flash_rereads(op_name: str, in_shapes: list[str]) -> float:
    """Bytes a flash-attention call reads beyond its operands once (see ``attention.reread_factor``)."""
    from monet_jax.kernels.attention import reread_factor

    kernel = next((k for k in ("bwd_dkv", "bwd_dq") if k in op_name), "forward")
    q = _ARRAY.search(in_shapes[0]) if in_shapes else None
    dims = q.group(2).split(",") if q else []
    if len(dims) != 4:  # q is [b, heads, t, d]
        return 0.0
    extra = reread_factor(int(dims[2])) - 1
    return extra * sum(shape_bytes(in_shapes[i]) for i in _FLASH_STREAMED[kernel] if i < len(in_shapes))


def kernel_bytes(ops: list[OpBytes]) -> float:
    """Operand + result bytes of every Pallas kernel call (flash attention: with its block re-reads)."""
    return sum(o.bytes for o in ops if o.kind.removeprefix("custom-call:") in KERNEL_TARGETS)


def table(ops: list[OpBytes], top: int = 15, scale: float = 1.0) -> str:
    """The ``top`` groups of instructions with the same kind and shapes, by bytes (times ``scale``)."""
    groups: dict[tuple, list[OpBytes]] = defaultdict(list)
    for o in ops:
        groups[(o.kind, o.out_shape, tuple(o.in_shapes))].append(o)
    total = sum(o.bytes for o in ops) or 1.0
    rows = sorted(groups.items(), key=lambda kv: -sum(o.bytes for o in kv[1]))[:top]
    lines = [f"{'bytes':>10} {'share':>6} {'count':>5}  kind / result <- operands / source"]
    for (kind, out_shape, in_shapes), members in rows:
        b = sum(o.bytes for o in members)
        ins = "; ".join(s for s in in_shapes if s)
        lines.append(f"{b * scale:10.3g} {100 * b / total:5.1f}% {len(members):5d}  {kind} {out_shape} <- {ins[:160]}"
                     f"  [{members[0].source}]")
    return "\n".join(lines)
