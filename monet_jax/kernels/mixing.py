"""Fused expert mixing kernels in the lane-dense layout of :mod:`monet_jax.kernels.lanes`.

Arrays are ``[b, m, E, t]`` (the ``u`` output ``p`` before ``relu2``, the ``v`` inputs) and ``[b, H, E, t]``
(routing probabilities, in the compute dtype): tokens on the 128 lanes, experts on sublanes, ``m`` and
``H`` as major dimensions, so a block is dense whatever ``m/2`` and ``H`` are. Each pass (VD or HD,
forward or backward) has two phases over a ``(batch, token block, expert chunk)`` grid:

1. *reduce*: the sums over all experts (``y_hm = sum_e g_he relu2(p)_me`` and, backward, the same of
   the cotangents), accumulated over the expert chunks into tiny ``[H, m, 1, t]`` float32 sums;
2. *emit*: per expert chunk, everything else: ``relu2``, the straight-flow scaling and the spreads
   forward (the inputs of the ``v`` matmuls, written once in the compute dtype), ``dp`` and ``dg``
   backward.

Where a token block's inputs over the whole expert axis fit VMEM (every pass at the 850M and 1.4B sizes),
both phases are one ``pallas_call`` (:func:`mix_pass`): the reduce phase keeps a VMEM copy of the chunks it
reads and the sums, and the emit phase reads that copy, so every input crosses HBM once and the sums never
do. Otherwise two calls (:func:`lanes_call`), which read the inputs of both phases twice and pass the sums
through HBM. Nothing of size ``H * E * m`` per token ever reaches memory. Blocks are sized from a VMEM
budget, so they fit a TPU core at every published size. The math is :mod:`~monet_jax.kernels.lanes`' (the
XLA path runs the same functions on whole arrays); the references are ``reference.{vd,hd}_mix_reference``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from monet_jax.kernels import dispatch, lanes

f32 = jnp.float32
VMEM_BUDGET = 6 << 20  # bytes per grid step: double-buffered blocks plus float32 temporaries
VMEM_LIMIT = 14 << 20  # blocks plus the one-pass VMEM copies: a v4 core's 16 MiB scoped VMEM, less headroom
LANE_BLOCK = 128  # tokens per block when the sequence is longer than this


def _sizes(e: int, t: int, per_expert_token: int, resident: int | None = None) -> tuple[int | None, int]:
    """(expert chunk, token block): tokens in 128-lane blocks (the whole sequence when shorter); the
    largest divisor of ``E`` that is a multiple of 16 (a bfloat16 sublane tile) and fits the budget.
    ``resident``: VMEM bytes per token held for the whole grid step (the one-pass copies); the chunk is
    then None when they leave no room."""
    tb = t if t <= LANE_BLOCK else LANE_BLOCK
    fits = [c for c in range(16, e + 1, 16) if e % c == 0 and c * tb * per_expert_token <= VMEM_BUDGET]
    chunk = max(fits) if fits else (16 if e % 16 == 0 else e)
    if resident is not None:  # the largest chunk that leaves room for the copies, if any
        room = [c for c in range(16, chunk + 1, 16) if e % c == 0] or [chunk]
        room = [c for c in room if (resident + c * per_expert_token) * tb <= VMEM_LIMIT]
        return (max(room) if room else None), tb
    return chunk, tb


def footprint(chunked, outs, reduce: bool) -> int:
    """VMEM bytes per (expert, token) of a block: double-buffered inputs and outputs, and float32
    temporaries (a dozen of the widest ``[m, e, t]`` / ``[H, e, t]`` values; contractions go one head
    at a time)."""
    per = sum(2 * math.prod(a.shape[1:-2]) * jnp.dtype(a.dtype).itemsize for a in chunked)
    per += 0 if reduce else sum(2 * math.prod(lead) * jnp.dtype(dt).itemsize for lead, dt in outs)
    return per + 4 * 12 * max(math.prod(a.shape[1:-2]) for a in chunked)


def _kernel(fn, n_in: int, reduce: bool):
    def body(*refs):
        ins, outs = refs[:n_in], refs[n_in:]
        values = fn(*(r[...] for r in ins))
        if reduce:
            @pl.when(pl.program_id(2) == 0)
            def _():
                for o in outs:
                    o[...] = jnp.zeros(o.shape, o.dtype)

            for o, v in zip(outs, values, strict=True):
                o[...] += v
            return
        _write(outs, values)

    return body


def _write(outs, values):
    for o, v in zip(outs, values, strict=True):
        if isinstance(v, tuple):  # a stacked output, written one slice at a time
            for k, part in enumerate(v):
                o[k] = part.astype(o.dtype)
        else:
            o[...] = v.astype(o.dtype)


def lanes_call(fn, chunked, sums, outs, *, name: str, reduce: bool = False, major: tuple[int, ...] = ()):
    """Run ``fn(*chunked_blocks, *sums_blocks)`` over a ``(b, token block, expert chunk)`` grid.

    ``chunked``: ``[b, *lead, E, t]`` arrays, blocked over experts and tokens. ``sums``: ``[b, H, m, 1, t]``
    float32 (whole over experts). ``outs``: ``(lead, dtype)`` per output, ``[b, *lead, E, t]``; with
    ``reduce``, ``[b, *lead, 1, t]`` sums over the expert chunks instead."""
    assert not (reduce and major), "reduce passes write [b, *lead, 1, t] sums, not lead-major outputs"
    b, e, t = chunked[0].shape[0], chunked[0].shape[-2], chunked[0].shape[-1]
    ec, tb = _sizes(e, t, footprint(chunked, outs, reduce))
    tpad = -(-t // tb) * tb
    pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, tpad - t)]) if tpad != t else a  # noqa: E731

    def spec(lead, experts: bool):
        n = len(lead)
        if experts:
            return pl.BlockSpec((None, *lead, ec, tb), lambda bi, ti, ei, n=n: (bi,) + (0,) * n + (ei, ti))
        return pl.BlockSpec((None, *lead, 1, tb), lambda bi, ti, ei, n=n: (bi,) + (0,) * n + (0, ti))

    in_specs = [spec(a.shape[1:-2], True) for a in chunked] + [spec(a.shape[1:-2], False) for a in sums]
    out_shape = [_out_shape(b, lead, 1 if reduce else e, tpad, dt, i in major) for i, (lead, dt) in enumerate(outs)]
    out_specs = [_major_spec(lead, ec, tb, lambda k: k) if i in major else spec(lead, not reduce)
                 for i, (lead, _) in enumerate(outs)]
    semantics = ("parallel", "parallel", "arbitrary" if reduce else "parallel")
    results = pl.pallas_call(
        _kernel(fn, len(chunked) + len(sums), reduce), out_shape=out_shape, grid=(b, tpad // tb, e // ec),
        in_specs=in_specs, out_specs=out_specs, interpret=dispatch.interpret_mode(),
        compiler_params=dispatch.compiler_params(dispatch.target_platform(), semantics), name=name,
    )(*[pad(a) for a in (*chunked, *sums)])
    return _finish(results, outs, major, t)


def _out_shape(b, lead, e, t, dtype, major: bool):
    return jax.ShapeDtypeStruct((*lead, b, e, t) if major else (b, *lead, e, t), dtype)


def _major_spec(lead, ec, tb, chunk_of):
    """An output written as ``[*lead, b, E, t]`` (see :func:`mix_pass`'s ``major``)."""
    n = len(lead)
    return pl.BlockSpec((*lead, None, ec, tb), lambda bi, ti, k, n=n: (0,) * n + (bi, chunk_of(k), ti))


def _finish(results, outs, major, t: int):
    """Cut the token padding; outputs written lead-major come back as ``[b, *lead, E, t]`` (a transpose XLA
    folds into the layout of their consumer)."""
    done = []
    for i, r in enumerate(results):
        r = r[..., :t] if r.shape[-1] != t else r
        if i in major:
            n = len(outs[i][0])
            r = jnp.moveaxis(r, n, 0)
        done.append(r)
    return done


def _sums(fn, args, h: int, m: int, count: int, name: str):
    """A reduce pass: ``count`` float32 ``[b, H, m, 1, t]`` sums over experts."""
    return lanes_call(fn, args, (), [((h, m), f32)] * count, name=name, reduce=True)


def _resident(inputs, both, h: int, m: int, n_sums: int) -> int:
    """VMEM bytes per token of the one-pass copies: the inputs of both phases over all experts, and the
    float32 ``[H, m, 1, t]`` sums (the unit sublane axis padded to 8)."""
    e = inputs[0].shape[-2]
    copies = sum(math.prod(inputs[i].shape[1:-2]) * e * jnp.dtype(inputs[i].dtype).itemsize for i in both)
    return copies + n_sums * h * m * 8 * 4


def _one_pass_kernel(reduce_fn, emit_fn, r_idx, e_idx, both, n_in: int, n_out: int, nc: int, ec: int):
    def body(*refs):
        ins, outs, scratch = refs[:n_in], refs[n_in:n_in + n_out], refs[n_in + n_out:]
        copies, sums = dict(zip(both, scratch, strict=False)), scratch[len(both):]
        k = pl.program_id(2)

        def chunk(ref, j):  # expert chunk j of a whole-axis VMEM copy
            start = pl.multiple_of(j * ec, ec)
            return (slice(None),) * (len(ref.shape) - 2) + (pl.ds(start, ec), slice(None))

        @pl.when(k < nc)
        def _reduce():
            for i, c in copies.items():
                c[chunk(c, k)] = ins[i][...]

            @pl.when(k == 0)
            def _():
                for s in sums:
                    s[...] = jnp.zeros(s.shape, s.dtype)

            for s, v in zip(sums, reduce_fn(*(ins[i][...] for i in r_idx)), strict=True):
                s[...] += v

        @pl.when(k >= nc)
        def _emit():
            blocks = [copies[i][chunk(copies[i], k - nc)] if i in copies else ins[i][...] for i in e_idx]
            _write(outs, emit_fn(*blocks, *(s[...] for s in sums)))

    return body


def distinct(r_args, e_args):
    """``(inputs, r_idx, e_idx)``: the distinct arrays (by identity) of a pass's two phases, each passed to the
    kernel once, and where each phase's arguments are among them."""
    inputs = []
    for a in (*r_args, *e_args):
        if not any(a is x for x in inputs):
            inputs.append(a)
    pos = lambda a: next(i for i, x in enumerate(inputs) if x is a)  # noqa: E731
    return inputs, [pos(a) for a in r_args], [pos(a) for a in e_args]


def plan(r_args, e_args, h: int, m: int, n_sums: int, outs):
    """How :func:`mix_pass` runs: ``(inputs, r_idx, e_idx, both, chunk, token block)`` with ``inputs`` the
    distinct arrays (by identity) of both phases, ``both`` those read in both (kept in VMEM), and ``chunk``
    None where their copies do not fit VMEM (then the two-call form runs)."""
    inputs, r_idx, e_idx = distinct(r_args, e_args)
    both = [i for i in range(len(inputs)) if i in r_idx and i in e_idx]
    e, t = inputs[0].shape[-2], inputs[0].shape[-1]
    ec, tb = _sizes(e, t, footprint(inputs, outs, False), _resident(inputs, both, h, m, n_sums))
    return inputs, r_idx, e_idx, both, ec, tb


def mix_pass(reduce_fn, r_args, emit_fn, e_args, h: int, m: int, n_sums: int, outs, *, name: str,
             major: tuple[int, ...] = ()):
    """``emit_fn(*e_args_blocks, *sums)`` per expert chunk, where ``sums = reduce_fn(*r_args_blocks)``
    summed over all experts (``n_sums`` float32 ``[b, H, m, 1, t]``); ``outs`` as :func:`lanes_call`.

    One ``pallas_call`` when the inputs of both phases fit VMEM over the whole expert axis: its grid runs
    ``2 * chunks`` steps per token block, the first half reducing (and copying its chunks to VMEM), the
    second emitting from those copies. Inputs of one phase only keep their block index through the other
    phase, so the pipeline fetches nothing for them there; outputs are written in the second half only.
    Otherwise the reduce and emit passes run as two calls.

    ``major``: outputs written as ``[*lead, b, E, t]`` and returned as ``[b, *lead, E, t]``: the layout in which
    the sharded training step's product loops read the ``u``/``v`` operands (``m`` major), where XLA otherwise
    copies each such output once more (TPU v4-64, Monet-HD 1.4B; BENCHMARKS.md)."""
    inputs, r_idx, e_idx, both, ec, tb = plan(r_args, e_args, h, m, n_sums, outs)
    if ec is None:
        sums = _sums(reduce_fn, r_args, h, m, n_sums, name.replace("emit", "reduce"))
        return lanes_call(emit_fn, e_args, sums, outs, name=name, major=major)
    b, e, t = inputs[0].shape[0], inputs[0].shape[-2], inputs[0].shape[-1]
    nc, tpad = e // ec, -(-t // tb) * tb
    pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, tpad - t)]) if tpad != t else a  # noqa: E731

    def spec(lead, chunk_of):
        n = len(lead)
        return pl.BlockSpec((None, *lead, ec, tb), lambda bi, ti, k, n=n: (bi,) + (0,) * n + (chunk_of(k), ti))

    last, first = lambda k: jnp.minimum(k, nc - 1), lambda k: jnp.maximum(k - nc, 0)
    in_specs = [spec(a.shape[1:-2], last if i in r_idx else first) for i, a in enumerate(inputs)]
    out_shape = [_out_shape(b, lead, e, tpad, dt, i in major) for i, (lead, dt) in enumerate(outs)]
    out_specs = [_major_spec(lead, ec, tb, first) if i in major else spec(lead, first)
                 for i, (lead, _) in enumerate(outs)]
    scratch = [_vmem((*inputs[i].shape[1:-2], e, tb), inputs[i].dtype) for i in both]
    scratch += [_vmem((h, m, 1, tb), f32) for _ in range(n_sums)]
    kernel = _one_pass_kernel(reduce_fn, emit_fn, r_idx, e_idx, both, len(inputs), len(outs), nc, ec)
    results = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, tpad // tb, 2 * nc), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch, interpret=dispatch.interpret_mode(), name=name.replace("_emit", ""),
        compiler_params=dispatch.compiler_params(dispatch.target_platform(), ("parallel", "parallel", "arbitrary")),
    )(*[pad(a) for a in inputs])
    return _finish(results, outs, major, t)


def _vmem(shape, dtype):
    from jax.experimental.pallas import tpu as pltpu  # only when a kernel is built (no TPU module at import)

    return pltpu.VMEM(shape, dtype)


# -- HD -------------------------------------------------------------------------------------------------
def hd_forward(p, g1, g2, m_major: bool = True):
    """HD: ``(z, sum_h g2)``: ``z[m, j] = sum_h g2[h, j] sum_i g1[h, i] relu2(p)[m, i]`` ``[b, m, E, t]`` in
    ``p``'s dtype, the input of ``v``, and the weights of the expert biases ``[b, 1, E, t]``, summed from the
    blocks of ``g2`` the kernel reads anyway instead of by another pass over ``g2``. ``m_major``: ``z`` written
    as ``[m, b, E, t]`` (:func:`mix_pass`'s ``major``: what the weight gradient reads; the forward product
    reads it row-major). Reference: ``reference.hd_mix_reference`` (in the ``[n, E, m]`` layout).
    Differentiated through ``ops.hd_experts_carry`` with :func:`hd_backward`."""
    h, m = g1.shape[1], p.shape[1]
    emit = lambda g2_, y: (*lanes.hd_emit(g2_, y), lanes.heads_sum(g2_))  # noqa: E731
    return tuple(mix_pass(lanes.hd_reduce, (p, g1), emit, (g2,), h, m, 1, [((m,), p.dtype), ((1,), g2.dtype)],
                          name="monet_hd_mix_emit", major=(0,) if m_major else ()))


def hd_backward(p, g1, g2, dz, dg1_in=None, dg2_in=None, ds2=None):
    """``(dp, dg1, dg2)``; ``dg1_in`` / ``dg2_in`` (``[b, H, E, t]``) and ``ds2`` (``[b, 1, E, t]``, the
    gradient of ``sum_h g2``), where given, are added to ``dg1`` / ``dg2`` inside the kernel."""
    h, m, dz = g1.shape[1], p.shape[1], dz.astype(p.dtype)
    outs = [((m,), p.dtype), ((h,), g1.dtype), ((h,), g2.dtype)]
    extra = [(a, i) for a, i in ((dg1_in, 1), (dg2_in, 2), (ds2, 2)) if a is not None]
    emit = _adding(lanes.hd_emit_bwd, 3, [i for _, i in extra])
    return tuple(mix_pass(lanes.hd_reduce_bwd, (p, g1, g2, dz), emit, (p, g1, dz, *(a for a, _ in extra)), h, m, 2,
                          outs, name="monet_hd_mix_emit_bwd", major=(0,)))


def _adding(emit_fn, n_in: int, targets: list[int]):
    """``emit_fn`` over ``n_in`` emit inputs and the sums, taking one more block per ``targets`` entry after
    its inputs and adding it (in float32, before the one cast to the output dtype) to output ``targets[i]``:
    a routing group's gradients of ``g`` arrive in the kernel instead of being added outside."""
    if not targets:
        return emit_fn

    def emit(*blocks):
        more = blocks[n_in:n_in + len(targets)]
        outs = list(emit_fn(*blocks[:n_in], *blocks[n_in + len(targets):]))
        for i, a in zip(targets, more, strict=True):
            outs[i] = outs[i] + a.astype(f32)
        return tuple(outs)

    return emit


# -- VD -------------------------------------------------------------------------------------------------
def vd_forward(p1, p2, g1, g2, m_major: bool = True):
    """VD: ``(top, bottom, s1, s2)``: ``top``, ``bottom`` each ``[b, 2, m, E, t]`` in ``p``'s dtype, the inputs of
    ``[v11; v12]`` and ``[v21; v22]`` (straight flow first for top, cross flow first for bottom), and the weights
    of the expert biases ``s = sum_h g`` ``[b, 1, E, t]`` in ``g``'s dtype, summed from the blocks of ``g`` the
    kernel reads anyway. ``m_major`` as in :func:`hd_forward` (``top`` and ``bottom``). Reference:
    ``reference.vd_mix_reference`` (in the ``[n, 2, E, m]`` layout). Differentiated through
    ``ops.vd_experts_carry`` with :func:`vd_backward`."""
    args = (p1, p2, g1, g2)
    h, m = g1.shape[1], p1.shape[1]
    out = ((2, m), p1.dtype)

    def emit(p1_, p2_, g1_, g2_, y1, y2):
        return (*lanes.vd_emit(p1_, p2_, g1_, g2_, y1, y2), lanes.heads_sum(g1_), lanes.heads_sum(g2_))

    return tuple(mix_pass(lanes.vd_reduce, args, emit, args, h, m, 2, [out, out, ((1,), g1.dtype), ((1,), g2.dtype)],
                          name="monet_vd_mix_emit", major=(0, 1) if m_major else ()))


def vd_backward(p1, p2, g1, g2, dtop, dbot, dg1_in=None, dg2_in=None, ds1=None, ds2=None):
    """``(dp1, dp2, dg1, dg2)``; ``dg1_in`` / ``dg2_in`` (``[b, H, E, t]``) and ``ds1`` / ``ds2`` (``[b, 1, E, t]``,
    the gradients of ``sum_h g`` through the expert biases), where given, are added to ``dg1`` / ``dg2`` inside
    the kernel."""
    h, m = g1.shape[1], p1.shape[1]
    args = (p1, p2, g1, g2, dtop.astype(p1.dtype), dbot.astype(p1.dtype))
    outs = [((m,), p1.dtype), ((m,), p2.dtype), ((h,), g1.dtype), ((h,), g2.dtype)]
    extra = [(a, i) for a, i in ((dg1_in, 2), (dg2_in, 3), (ds1, 2), (ds2, 3)) if a is not None]
    emit = _adding(lanes.vd_emit_bwd, 6, [i for _, i in extra])
    return tuple(mix_pass(lanes.vd_reduce_bwd, args, emit, (*args, *(a for a, _ in extra)), h, m, 4, outs,
                          name="monet_vd_mix_emit_bwd", major=(0, 1)))
