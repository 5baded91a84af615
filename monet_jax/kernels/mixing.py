"""Fused expert mixing kernels in the lane-dense layout of :mod:`monet_jax.kernels.lanes`.

Arrays are ``[b, m, E, t]`` (the ``u`` output ``p`` before ``relu2``, the ``v`` inputs) and ``[b, H, E, t]``
(routing probabilities, in the compute dtype): tokens on the 128 lanes, experts on sublanes, ``m`` and
``H`` as major dimensions, so a block is dense whatever ``m/2`` and ``H`` are. Each pass is two
``pallas_call``\\ s over a ``(batch, token block, expert chunk)`` grid:

1. *reduce*: the sums over all experts (``y_hm = sum_e g_he relu2(p)_me`` and, backward, the same of
   the cotangents), accumulated over the expert chunks into tiny ``[b, H, m, 1, t]`` float32 arrays;
2. *emit*: per expert chunk, everything else: ``relu2``, the straight-flow scaling and the spreads
   forward (the inputs of the ``v`` matmuls, written once in the compute dtype), ``dp`` and ``dg``
   backward.

So ``p`` and ``g`` are read twice per pass and every output is written once; nothing of size
``H * E * m`` per token ever reaches memory. Expert chunks are sized from a VMEM budget, so the blocks fit
a TPU core at every published size. The math is :mod:`~monet_jax.kernels.lanes`' (the XLA path runs the
same functions on whole arrays); the references are ``reference.{vd,hd}_mix_reference``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from monet_jax.kernels import dispatch, lanes

f32 = jnp.float32
VMEM_BUDGET = 6 << 20  # bytes per grid step: double-buffered blocks plus float32 temporaries
LANE_BLOCK = 128  # tokens per block when the sequence is longer than this


def _sizes(e: int, t: int, per_expert_token: int) -> tuple[int, int]:
    """(expert chunk, token block): tokens in 128-lane blocks (the whole sequence when shorter); the
    largest divisor of ``E`` that is a multiple of 16 (a bfloat16 sublane tile) and fits the budget."""
    tb = t if t <= LANE_BLOCK else LANE_BLOCK
    fits = [c for c in range(16, e + 1, 16) if e % c == 0 and c * tb * per_expert_token <= VMEM_BUDGET]
    return (max(fits) if fits else (16 if e % 16 == 0 else e)), tb


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
        for o, v in zip(outs, values, strict=True):
            if isinstance(v, tuple):  # a stacked output, written one slice at a time
                for k, part in enumerate(v):
                    o[k] = part.astype(o.dtype)
            else:
                o[...] = v.astype(o.dtype)

    return body


def lanes_call(fn, chunked, sums, outs, *, name: str, reduce: bool = False):
    """Run ``fn(*chunked_blocks, *sums_blocks)`` over a ``(b, token block, expert chunk)`` grid.

    ``chunked``: ``[b, *lead, E, t]`` arrays, blocked over experts and tokens. ``sums``: ``[b, H, m, 1, t]``
    float32 (whole over experts). ``outs``: ``(lead, dtype)`` per output, ``[b, *lead, E, t]``; with
    ``reduce``, ``[b, *lead, 1, t]`` sums over the expert chunks instead."""
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
    out_shape = [jax.ShapeDtypeStruct((b, *lead, 1 if reduce else e, tpad), dt) for lead, dt in outs]
    out_specs = [spec(lead, not reduce) for lead, _ in outs]
    semantics = ("parallel", "parallel", "arbitrary" if reduce else "parallel")
    results = pl.pallas_call(
        _kernel(fn, len(chunked) + len(sums), reduce), out_shape=out_shape, grid=(b, tpad // tb, e // ec),
        in_specs=in_specs, out_specs=out_specs, interpret=dispatch.interpret_mode(),
        compiler_params=dispatch.compiler_params(dispatch.target_platform(), semantics), name=name,
    )(*[pad(a) for a in (*chunked, *sums)])
    return [r[..., :t] if tpad != t else r for r in results]


def _sums(fn, args, h: int, m: int, count: int, name: str):
    """A reduce pass: ``count`` float32 ``[b, H, m, 1, t]`` sums over experts."""
    return lanes_call(fn, args, (), [((h, m), f32)] * count, name=name, reduce=True)


# -- HD -------------------------------------------------------------------------------------------------
@jax.custom_vjp
def hd_mix(p_bmEt, g1_bhEt, g2_bhEt):
    """HD: ``z[m, j] = sum_h g2[h, j] sum_i g1[h, i] relu2(p)[m, i]`` ``[b, m, E, t]`` in ``p``'s dtype,
    the input of ``v``. Reference: ``reference.hd_mix_reference`` (in the ``[n, E, m]`` layout)."""
    h, m = g1_bhEt.shape[1], p_bmEt.shape[1]
    (y,) = _sums(lanes.hd_reduce, (p_bmEt, g1_bhEt), h, m, 1, "monet_hd_mix_reduce")
    return lanes_call(lanes.hd_emit, (g2_bhEt,), (y,), [((m,), p_bmEt.dtype)], name="monet_hd_mix_emit")[0]


def _hd_fwd(p, g1, g2):
    return hd_mix(p, g1, g2), (p, g1, g2)


def _hd_bwd(res, dz):
    p, g1, g2 = res
    h, m, dz = g1.shape[1], p.shape[1], dz.astype(p.dtype)
    y, dy = _sums(lanes.hd_reduce_bwd, (p, g1, g2, dz), h, m, 2, "monet_hd_mix_reduce_bwd")
    outs = [((m,), p.dtype), ((h,), g1.dtype), ((h,), g2.dtype)]
    return tuple(lanes_call(lanes.hd_emit_bwd, (p, g1, dz), (y, dy), outs, name="monet_hd_mix_emit_bwd"))


hd_mix.defvjp(_hd_fwd, _hd_bwd)


# -- VD -------------------------------------------------------------------------------------------------
@jax.custom_vjp
def vd_mix(p1_bmEt, p2_bmEt, g1_bhEt, g2_bhEt):
    """VD: ``(top, bottom)``, each ``[b, 2, m, E, t]`` in ``p``'s dtype: the inputs of ``[v11; v12]`` and
    ``[v21; v22]`` (straight flow first for top, cross flow first for bottom). Reference:
    ``reference.vd_mix_reference`` (in the ``[n, 2, E, m]`` layout)."""
    args = (p1_bmEt, p2_bmEt, g1_bhEt, g2_bhEt)
    h, m = g1_bhEt.shape[1], p1_bmEt.shape[1]
    sums = _sums(lanes.vd_reduce, args, h, m, 2, "monet_vd_mix_reduce")
    out = ((2, m), p1_bmEt.dtype)
    return tuple(lanes_call(lanes.vd_emit, args, sums, [out, out], name="monet_vd_mix_emit"))


def _vd_fwd(*args):
    return vd_mix(*args), args


def _vd_bwd(res, cot):
    p1, p2, g1, g2 = res
    h, m = g1.shape[1], p1.shape[1]
    args = (*res, *(c.astype(p1.dtype) for c in cot))
    sums = _sums(lanes.vd_reduce_bwd, args, h, m, 4, "monet_vd_mix_reduce_bwd")
    outs = [((m,), p1.dtype), ((m,), p2.dtype), ((h,), g1.dtype), ((h,), g2.dtype)]
    return tuple(lanes_call(lanes.vd_emit_bwd, args, sums, outs, name="monet_vd_mix_emit_bwd"))


vd_mix.defvjp(_vd_fwd, _vd_bwd)
