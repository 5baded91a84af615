"""The mixing passes on GPUs: Pallas on Triton, with the math and entry points of :mod:`~monet_jax.kernels.mixing`.

Same layout (``[b, m, E, t]`` activations and ``v`` inputs, ``[b, H, E, t]`` routing probabilities), same
functions (``hd_forward``, ``hd_backward``, ``vd_forward``, ``vd_backward``, same arguments and outputs), same
references (``reference.{vd,hd}_mix_reference``); ``ops`` picks this module when the target is a GPU. What Triton
asks for is different:

- No scratch memory and no sequential grid axis: one program per ``(row, token block)`` walks the expert axis
  twice in a loop, first summing over experts (the head mixtures ``[H, m]`` per token stay in registers), then
  emitting. Inputs of both phases are read twice (the second time from L2 where the program's blocks are still
  there), where the TPU kernels keep a VMEM copy.
- Every value's size a power of two: a value here is one ``[experts, tokens]`` tile, and ``m`` and ``H`` (6, 12 and
  24 at 850M and 4.1B) index Python lists of tiles, never array axes (Triton's lowering also has no general
  slice or stack). Loads and stores address one tile of a ref at a time.

Token blocks are 64 tokens (a 128-byte row of bfloat16 per tile row), expert chunks 16 experts (the largest power
of two dividing ``E`` up to that); arithmetic in float32, as the TPU kernels'.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from monet_jax.kernels import dispatch, mixing

f32 = jnp.float32
TOKENS = 64  # tokens per program (rounded down to the sequence's power of two when shorter)
CHUNK = 16  # experts per loop step
NUM_WARPS = 4


def _pow2_at_most(n: int, cap: int) -> int:
    return 1 << min(int(np.log2(max(1, n))), int(np.log2(cap)))


def _chunk(e: int) -> int:
    """The largest power of two dividing ``e``, at most :data:`CHUNK`."""
    return min(e & -e, CHUNK)


# -- tile math: lists of [chunk, tokens] float32 tiles; sums over experts are [1, tokens] ------------------------
def _add(tiles):
    return functools.reduce(operator.add, tiles)


def _act(p):
    """``(relu2(p), relu(p))`` per tile."""
    r = [jnp.maximum(t, 0.0) for t in p]
    return [t * t for t in r], r


def _mix(g, x):
    """``y[h][k] = sum_e g[h] x[k]``."""
    return [[jnp.sum(gh * xk, axis=0, keepdims=True) for xk in x] for gh in g]


def _spread(g, y):
    """``x[k] = sum_h g[h] y[h][k]``."""
    return [_add([gh * yh[k] for gh, yh in zip(g, y, strict=True)]) for k in range(len(y[0]))]


def _inner(y, x):
    """``g[h] = sum_k y[h][k] x[k]``."""
    return [_add([yh[k] * xk for k, xk in enumerate(x)]) for yh in y]


def _plus(tiles, extra):
    """``tiles`` plus ``extra`` tile by tile; an ``extra`` of one tile (``sum_h g``'s gradient) is added to each."""
    if len(extra) == 1:
        return [t + extra[0] for t in tiles]
    return [t + a for t, a in zip(tiles, extra, strict=True)]


# -- the pass ------------------------------------------------------------------------------------------------
def _lead(a) -> tuple[int, ...]:
    return tuple(a.shape[1:-2])


def gpu_pass(reduce_fn, r_args, emit_fn, e_args, outs, *, name: str, major: tuple[int, ...] = ()):
    """``emit_fn(*e_tiles, *sums)`` per expert chunk, where ``sums = reduce_fn(*r_tiles)`` summed over all experts.

    ``r_args``, ``e_args``: ``[b, *lead, E, t]`` arrays; each reaches the functions as the list of its float32
    tiles over ``lead`` (row-major). ``reduce_fn`` returns a tuple of trees of ``[1, tokens]`` sums; ``emit_fn``
    one list of tiles per output. ``outs``: ``(lead, dtype)`` per output, ``[b, *lead, E, t]``, or
    ``[*lead, b, E, t]`` for those in ``major`` (returned as ``[b, *lead, E, t]``, as :func:`mixing.mix_pass`
    does)."""
    inputs, r_idx, e_idx = mixing.distinct(r_args, e_args)
    b, e, t = inputs[0].shape[0], inputs[0].shape[-2], inputs[0].shape[-1]
    tb, ec = _pow2_at_most(t, TOKENS), _chunk(e)
    nc, tpad = e // ec, -(-t // tb) * tb
    leads = [_lead(a) for a in inputs]

    def body(*refs):
        ins, out_refs = refs[:len(inputs)], refs[len(inputs):]

        def at(idx, k):  # tile idx of expert chunk k (a loop index, or 0 for the peeled first step)
            return (*idx, pl.ds(k * ec if isinstance(k, int) else pl.multiple_of(k * ec, ec), ec), slice(None))

        def tiles(i, k):
            return [ins[i][at(idx, k)].astype(f32) for idx in np.ndindex(*leads[i])]

        def reduce_step(k, acc):
            return jax.tree.map(operator.add, acc, reduce_fn(*(tiles(i, k) for i in r_idx)))

        sums = jax.lax.fori_loop(1, nc, reduce_step, reduce_fn(*(tiles(i, 0) for i in r_idx)))

        def emit_step(k, carry):
            values = emit_fn(*(tiles(i, k) for i in e_idx), *sums)
            for ref, (lead, _), vals in zip(out_refs, outs, values, strict=True):
                for idx, v in zip(np.ndindex(*lead), vals, strict=True):
                    ref[at(idx, k)] = v.astype(ref.dtype)
            return carry

        jax.lax.fori_loop(0, nc, emit_step, 0)

    def spec(lead, is_major: bool = False):
        n = len(lead)
        if is_major:
            return pl.BlockSpec((*lead, None, e, tb), lambda bi, ti, n=n: (*(0,) * n, bi, 0, ti))
        return pl.BlockSpec((None, *lead, e, tb), lambda bi, ti, n=n: (bi, *(0,) * n, 0, ti))

    pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, tpad - t)]) if tpad != t else a  # noqa: E731
    out_shape = [jax.ShapeDtypeStruct((*lead, b, e, tpad) if i in major else (b, *lead, e, tpad), dt)
                 for i, (lead, dt) in enumerate(outs)]
    results = pl.pallas_call(
        body, out_shape=out_shape, grid=(b, tpad // tb), in_specs=[spec(lead) for lead in leads],
        out_specs=[spec(lead, i in major) for i, (lead, _) in enumerate(outs)], interpret=dispatch.interpret_mode(),
        compiler_params=dispatch.compiler_params("gpu", num_warps=NUM_WARPS), name=name,
    )(*[pad(a) for a in inputs])
    done = []
    for i, r in enumerate(results):
        r = r[..., :t] if tpad != t else r
        done.append(jnp.moveaxis(r, len(outs[i][0]), 0) if i in major else r)
    return done


# -- HD -------------------------------------------------------------------------------------------------
def _hd_reduce(p, g1):
    return (_mix(g1, _act(p)[0]),)


def hd_forward(p, g1, g2, m_major: bool = True):
    """As :func:`mixing.hd_forward`: ``(z, sum_h g2)``."""
    m = p.shape[1]
    emit = lambda g2_, y: (_spread(g2_, y), [_add(g2_)])  # noqa: E731
    return tuple(gpu_pass(_hd_reduce, (p, g1), emit, (g2,), [((m,), p.dtype), ((1,), g2.dtype)],
                          name="monet_hd_mix", major=(0,) if m_major else ()))


def hd_backward(p, g1, g2, dz, dg1_in=None, dg2_in=None, ds2=None):
    """As :func:`mixing.hd_backward`: ``(dp, dg1, dg2)``, the given accumulators added inside."""
    h, m, dz = g1.shape[1], p.shape[1], dz.astype(p.dtype)
    extra = [(a, i) for a, i in ((dg1_in, 1), (dg2_in, 2), (ds2, 2)) if a is not None]

    def reduce(p_, g1_, g2_, dz_):
        return _mix(g1_, _act(p_)[0]), _mix(g2_, dz_)

    def emit(p_, g1_, dz_, *rest):
        more, (y, dy) = rest[:len(extra)], rest[len(extra):]
        x, r = _act(p_)
        grads = [[s * 2.0 * rk for s, rk in zip(_spread(g1_, dy), r, strict=True)], _inner(dy, x), _inner(y, dz_)]
        for tiles, (_, i) in zip(more, extra, strict=True):
            grads[i] = _plus(grads[i], tiles)
        return grads

    outs = [((m,), p.dtype), ((h,), g1.dtype), ((h,), g2.dtype)]
    return tuple(gpu_pass(reduce, (p, g1, g2, dz), emit, (p, g1, dz, *(a for a, _ in extra)), outs,
                          name="monet_hd_mix_bwd", major=(0,)))


# -- VD -------------------------------------------------------------------------------------------------
def _vd_reduce(p1, p2, g1, g2):
    return _mix(g1, _act(p1)[0]), _mix(g2, _act(p2)[0])


def vd_forward(p1, p2, g1, g2, m_major: bool = True):
    """As :func:`mixing.vd_forward`: ``(top, bottom, s1, s2)``."""
    m = p1.shape[1]

    def emit(p1_, p2_, g1_, g2_, y1, y2):
        s1, s2 = _add(g1_), _add(g2_)
        x1, x2 = _act(p1_)[0], _act(p2_)[0]
        top = [x * s1 for x in x1] + _spread(g1_, y2)  # straight flow, then cross flow
        bottom = _spread(g2_, y1) + [x * s2 for x in x2]
        return top, bottom, [s1], [s2]

    args = (p1, p2, g1, g2)
    out = ((2, m), p1.dtype)
    return tuple(gpu_pass(_vd_reduce, args, emit, args, [out, out, ((1,), g1.dtype), ((1,), g2.dtype)],
                          name="monet_vd_mix", major=(0, 1) if m_major else ()))


def vd_backward(p1, p2, g1, g2, dtop, dbot, dg1_in=None, dg2_in=None, ds1=None, ds2=None):
    """As :func:`mixing.vd_backward`: ``(dp1, dp2, dg1, dg2)``, the given accumulators added inside."""
    h, m = g1.shape[1], p1.shape[1]
    args = (p1, p2, g1, g2, dtop.astype(p1.dtype), dbot.astype(p1.dtype))
    extra = [(a, i) for a, i in ((dg1_in, 2), (dg2_in, 3), (ds1, 2), (ds2, 3)) if a is not None]

    def reduce(p1_, p2_, g1_, g2_, dtop_, dbot_):  # the head mixtures, and those of the cross flows' cotangents
        return (*_vd_reduce(p1_, p2_, g1_, g2_), _mix(g2_, dbot_[:m]), _mix(g1_, dtop_[m:]))

    def emit(p1_, p2_, g1_, g2_, dtop_, dbot_, *rest):
        more, (y1, y2, dy1, dy2) = rest[:len(extra)], rest[len(extra):]
        (x1, r1), (x2, r2) = _act(p1_), _act(p2_)
        d11, d12, d21, d22 = dtop_[:m], dtop_[m:], dbot_[:m], dbot_[m:]
        s1, s2 = _add(g1_), _add(g2_)
        straight1 = _add([d * x for d, x in zip(d11, x1, strict=True)])  # sum_m d11 x1: to every head
        straight2 = _add([d * x for d, x in zip(d22, x2, strict=True)])
        dg1 = [straight1 + a + c for a, c in zip(_inner(y2, d12), _inner(dy1, x1), strict=True)]
        dg2 = [straight2 + a + c for a, c in zip(_inner(y1, d21), _inner(dy2, x2), strict=True)]
        dp1 = [(d * s1 + s) * 2.0 * r for d, s, r in zip(d11, _spread(g1_, dy1), r1, strict=True)]
        dp2 = [(d * s2 + s) * 2.0 * r for d, s, r in zip(d22, _spread(g2_, dy2), r2, strict=True)]
        grads = [dp1, dp2, dg1, dg2]
        for tiles, (_, i) in zip(more, extra, strict=True):
            grads[i] = _plus(grads[i], tiles)
        return grads

    outs = [((m,), p1.dtype), ((m,), p2.dtype), ((h,), g1.dtype), ((h,), g2.dtype)]
    return tuple(gpu_pass(reduce, args, emit, (*args, *(a for a, _ in extra)), outs, name="monet_vd_mix_bwd",
                          major=(0, 1)))
