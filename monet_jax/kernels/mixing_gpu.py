"""The mixing passes on GPUs: Pallas on Triton, with the math and entry points of :mod:`~monet_jax.kernels.mixing`.

Same layout (``[b, m, E, t]`` activations and ``v`` inputs, ``[b, H, E, t]`` routing probabilities), same
functions (``hd_forward``, ``hd_backward``, ``vd_forward``, ``vd_backward``, same arguments and outputs), same
references (``reference.{vd,hd}_mix_reference``); ``ops`` picks this module when the target is a GPU.

Each pass is two calls, shaped by what a GPU thread can keep in registers:

- **Sums.** ``y[h][k] = sum_e g[h] x[k]`` (the head mixtures, and in the backward those of the cotangents):
  every program owns ``TOKENS`` tokens, one per thread, and ``EXPERTS`` experts, walked one at a time: each
  expert's rows are ``[tokens]`` vectors, so the sum over experts is an addition inside each thread (a tile
  ``[experts, tokens]`` summed over its first axis costs shuffles and barriers, and 256 such sums live at once
  spilled every register at 1.4B). The programs write partial sums per expert slice; XLA adds the slices (a
  small array: ``H * m`` floats a token against ``E * m`` inputs).
- **Emit.** Every expert's outputs given the sums, again one expert at a time over the program's slice.

A program never keeps more than about ``SUMS`` sums a token: the sums and outputs are split into *roles*
(unit chunks of one side; head chunks of ``dg``), each a branch on the first grid axis, so a program runs one.
Roles that read the same inputs are adjacent there, so their programs run together and share L2. ``m`` and
``H`` (6, 12 and 24 at 850M and 4.1B) index Python lists of rows, never array axes; the only array axis is the
token block's (a power of two: Triton's shapes are). Arithmetic in float32, as the TPU kernels'.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from monet_jax.kernels import dispatch

f32 = jnp.float32
TOKENS = 128  # tokens per program: one per thread at NUM_WARPS=4 (rounded down to a shorter sequence's power of two)
EXPERTS = 128  # most experts per program (a divisor of E)
PROGRAMS = 512  # fewer experts per program (down to 16) where the batch's token blocks give fewer programs than this
SUMS = 64  # most float32 sums per token one program keeps (the rest go to other roles)
NUM_WARPS = 4


def blocks() -> str:
    """``TOKENS,EXPERTS,SUMS,NUM_WARPS`` as the benchmarks' ``--gpu-blocks`` write them."""
    return f"{TOKENS},{EXPERTS},{SUMS},{NUM_WARPS}"


def use_blocks(spec: str) -> None:
    """Set ``TOKENS,EXPERTS,SUMS,NUM_WARPS`` from ``spec`` (:func:`blocks`' form), for the next trace."""
    global TOKENS, EXPERTS, SUMS, NUM_WARPS
    TOKENS, EXPERTS, SUMS, NUM_WARPS = map(int, spec.split(","))


def _pow2_at_most(n: int, cap: int) -> int:
    return 1 << min(int(np.log2(max(1, n))), int(np.log2(cap)))


def _slice(e: int, blocks: int) -> int:
    """Experts per program: the largest divisor of ``e`` up to :data:`EXPERTS` that gives ``blocks`` token blocks
    :data:`PROGRAMS` programs (or is 16 or less). Each slice adds its partial sums to the traffic (at 128
    experts a sixteenth of the inputs' bytes), so slices are only cut thinner to fill the GPU."""
    divisors = [d for d in range(1, min(e, EXPERTS) + 1) if e % d == 0]
    return max(d for d in divisors if blocks * (e // d) >= PROGRAMS or d <= 16)


def _chunks(n: int, size: int) -> list[range]:
    size = max(1, min(n, size))
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def _add(rows):
    return functools.reduce(operator.add, rows)


def _relu2(v):
    r = jnp.maximum(v, 0.0)
    return r * r


# -- roles and the two calls ---------------------------------------------------------------------------------
Row = Callable[[int, tuple], jax.Array]  # (input, lead index) -> this expert's [tokens] float32 row


@dataclass
class Role:
    """One branch of a call. ``fn(row, sums)`` gets this expert's rows (``row(input, lead index)``, each read
    once per expert) and the sums it names (``sums[r]``: ``[tokens]`` float32, read once per program).
    Summing roles return ``{sum row: value}`` (accumulated over experts); emitting roles
    ``[(output, lead index, value)]``."""

    fn: Callable[[Row, dict], object]
    sums: list[int] = field(default_factory=list)


def _lead(a) -> tuple[int, ...]:
    return tuple(a.shape[1:-2])


# Bytes per token each call moves, by name, recorded when its kernel is traced (benchmarks/mixing_registers.py
# prints them): ``reads`` (every role's rows of every expert), ``unique`` (the distinct ones among them: what
# HBM serves where the roles of one block run together, as the grid orders them), ``writes`` (outputs or
# partial sums), and ``sums`` (the emitting call's reads of the sums).
TRAFFIC: dict[str, dict[str, int]] = {}


def _call(roles: list[Role], inputs: list, tb: int, *, name: str, n_sums: int, sums=None, outs=(), major=(),
          reducing: bool = False):
    """One ``pallas_call`` over ``(roles x expert slices, token blocks of tb, batch)``. Inputs ``[b, *lead, E, t]``
    with ``t`` a multiple of ``tb``; ``sums`` ``[b, n_sums, t]`` float32 (emitting). Returns the summed partial
    sums ``[b, n_sums, t]`` (summing) or the outputs, ``outs`` ``(lead, dtype)`` each, ``[b, *lead, E, t]``
    (written ``[*lead, b, E, t]`` for those in ``major``)."""
    b, e, tpad = inputs[0].shape[0], inputs[0].shape[-2], inputs[0].shape[-1]
    nr = len(roles)
    es = _slice(e, b * tpad // tb)
    ns = e // es
    leads = [_lead(a) for a in inputs]
    n_in = len(inputs) + (sums is not None)

    read: dict[int, set] = {}  # the rows each role reads, by role
    writes = n_sums * 4 * ns if reducing else sum(np.prod(lead) * np.dtype(dt).itemsize for lead, dt in outs) * e

    def body(*refs):
        ins, sums_ref, out_refs = refs[:len(inputs)], (refs[len(inputs)] if sums is not None else None), refs[n_in:]

        def run(role: Role, seen: set):
            fixed = {r: sums_ref[r, :] for r in role.sums}

            def rows_at(k):
                cache = {}

                def row(i, idx):
                    if (i, idx) not in cache:
                        cache[(i, idx)] = ins[i][(*idx, k, slice(None))].astype(f32)
                        seen.add((i, idx))
                    return cache[(i, idx)]
                return row

            if reducing:
                keys = list(role.fn(lambda i, idx: jnp.zeros((tb,), f32), fixed))  # the sums it writes, in order

                def step(k, acc):
                    got = role.fn(rows_at(k), fixed)
                    return tuple(a + got[r] for a, r in zip(acc, keys, strict=True))

                acc = jax.lax.fori_loop(0, es, step, tuple(jnp.zeros((tb,), f32) for _ in keys))
                for r, a in zip(keys, acc, strict=True):
                    out_refs[0][r, :] = a
                return

            def emit(k, carry):
                for o, idx, v in role.fn(rows_at(k), fixed):
                    out_refs[o][(*idx, k, slice(None))] = v.astype(out_refs[o].dtype)
                return carry

            jax.lax.fori_loop(0, es, emit, 0)

        if nr == 1:
            run(roles[0], read.setdefault(0, set()))
            return
        which = jax.lax.rem(pl.program_id(0), nr)
        for i, role in enumerate(roles):
            pl.when(which == i)(functools.partial(run, role, read.setdefault(i, set())))

    def spec(lead, is_major: bool = False):
        n = len(lead)
        if is_major:
            return pl.BlockSpec((*lead, None, es, tb), lambda si, ti, bi, n=n: (*(0,) * n, bi, si // nr, ti))
        return pl.BlockSpec((None, *lead, es, tb), lambda si, ti, bi, n=n: (bi, *(0,) * n, si // nr, ti))

    in_specs = [spec(lead) for lead in leads]
    args = list(inputs)
    if sums is not None:
        in_specs.append(pl.BlockSpec((None, n_sums, tb), lambda si, ti, bi: (bi, 0, ti)))
        args.append(sums)
    if reducing:
        out_shape = [jax.ShapeDtypeStruct((b, ns, n_sums, tpad), f32)]
        out_specs = [pl.BlockSpec((None, None, n_sums, tb), lambda si, ti, bi: (bi, si // nr, 0, ti))]
    else:
        out_shape = [jax.ShapeDtypeStruct((*lead, b, e, tpad) if i in major else (b, *lead, e, tpad), dt)
                     for i, (lead, dt) in enumerate(outs)]
        out_specs = [spec(lead, i in major) for i, (lead, _) in enumerate(outs)]
    results = pl.pallas_call(
        body, out_shape=out_shape, grid=(ns * nr, tpad // tb, b), in_specs=in_specs, out_specs=out_specs,
        interpret=dispatch.interpret_mode(), name=name,
        compiler_params=dispatch.compiler_params("gpu", num_warps=NUM_WARPS),
    )(*args)
    size = lambda rows: sum(inputs[i].dtype.itemsize for i, _ in rows) * e  # noqa: E731
    TRAFFIC[name] = {"reads": sum(size(r) for r in read.values()),
                     "unique": size(set().union(*read.values())), "writes": int(writes),
                     "sums": sum(len(r.sums) for r in roles) * 4 * ns}
    if reducing:
        return results[0].sum(axis=1)  # [b, n_sums, tpad]: the slices' partial sums added
    return [jnp.moveaxis(r, len(outs[i][0]), 0) if i in major else r for i, r in enumerate(results)]


def gpu_pass(sum_roles: list[Role], sum_inputs: list, n_sums: int, emit_roles: list[Role], emit_inputs: list,
             outs, *, name: str, major: tuple[int, ...] = ()):
    """The summing call, then the emitting call given its sums (``name_sums``, ``name``). Token axes off the
    block are padded once for both calls (the same arrays by identity once)."""
    t = sum_inputs[0].shape[-1]
    tb = _pow2_at_most(t, TOKENS)
    tpad = -(-t // tb) * tb
    padded: dict[int, jax.Array] = {}

    def pad(a):
        if id(a) not in padded:
            padded[id(a)] = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, tpad - t)]) if tpad != t else a
        return padded[id(a)]

    sums = _call(sum_roles, [pad(a) for a in sum_inputs], tb, name=f"{name}_sums", n_sums=n_sums, reducing=True)
    out = _call(emit_roles, [pad(a) for a in emit_inputs], tb, name=name, n_sums=n_sums, sums=sums, outs=outs,
                major=major)
    return [r[..., :t] if tpad != t else r for r in out]


class Sums:
    """Row numbers of named ``[H, m]`` blocks of sums, in order."""

    def __init__(self, h: int, m: int, *names: str):
        self.h, self.m, self.names = h, m, names

    def __call__(self, name: str, hi: int, k: int) -> int:
        return (self.names.index(name) * self.h + hi) * self.m + k

    def __len__(self) -> int:
        return len(self.names) * self.h * self.m

    def units(self, name: str, ks) -> list[int]:
        """The rows of units ``ks`` for every head."""
        return [self(name, hi, k) for hi in range(self.h) for k in ks]

    def heads(self, name: str, hs) -> list[int]:
        """The rows of heads ``hs`` for every unit."""
        return [self(name, hi, k) for hi in hs for k in range(self.m)]


def _mixture(at: Sums, name: str, g: int, x: Callable[[Row, int], jax.Array], ks) -> Role:
    """A summing role: ``name[h][k] = sum_e g[h] x(k)`` for units ``ks``."""
    def fn(row, _):
        xs = {k: x(row, k) for k in ks}
        return {at(name, hi, k): row(g, (hi,)) * xs[k] for hi in range(at.h) for k in ks}
    return Role(fn)


def _unit_chunks(h: int, m: int) -> list[range]:
    return _chunks(m, SUMS // h)


def _head_chunks(m: int, per_head: int, h: int) -> list[range]:
    return _chunks(h, SUMS // (per_head * m))


def _extras(extra, base: int):
    """Accumulators added inside: ``(input index, output index, one row for every head?)``."""
    return [(base + j, o, a.shape[1] == 1) for j, (a, o) in enumerate(extra)]


def _plus(row, value, extras, o: int, hi: int):
    for i, out, shared in extras:
        if out == o:
            value = value + row(i, (0,) if shared else (hi,))
    return value


# -- HD -------------------------------------------------------------------------------------------------
P, G1, G2, DZ = 0, 1, 2, 3


def hd_forward(p, g1, g2, m_major: bool = True):
    """As :func:`mixing.hd_forward`: ``(z, sum_h g2)``."""
    h, m = g1.shape[1], p.shape[1]
    at = Sums(h, m, "y")
    units = _unit_chunks(h, m)
    sum_roles = [_mixture(at, "y", G1, lambda row, k: _relu2(row(P, (k,))), ks) for ks in units]

    def emit(ks, first):
        def fn(row, s):
            out = [(0, (k,), _add([row(G2, (hi,)) * s[at("y", hi, k)] for hi in range(h)])) for k in ks]
            return out + ([(1, (0,), _add([row(G2, (hi,)) for hi in range(h)]))] if first else [])
        return Role(fn, at.units("y", ks))

    emit_roles = [emit(ks, i == 0) for i, ks in enumerate(units)]
    return tuple(gpu_pass(sum_roles, [p, g1], len(at), emit_roles, [p, g1, g2],
                          [((m,), p.dtype), ((1,), g2.dtype)], name="monet_hd_mix", major=(0,) if m_major else ()))


def hd_backward(p, g1, g2, dz, dg1_in=None, dg2_in=None, ds2=None):
    """As :func:`mixing.hd_backward`: ``(dp, dg1, dg2)``, the given accumulators added inside."""
    h, m, dz = g1.shape[1], p.shape[1], dz.astype(p.dtype)
    at = Sums(h, m, "y", "dy")
    extra = [(a, o) for a, o in ((dg1_in, 1), (dg2_in, 2), (ds2, 2)) if a is not None]
    extras = _extras(extra, 4)
    units = _unit_chunks(h, m)
    sum_roles = ([_mixture(at, "y", G1, lambda row, k: _relu2(row(P, (k,))), ks) for ks in units]
                 + [_mixture(at, "dy", G2, lambda row, k: row(DZ, (k,)), ks) for ks in units])

    def dp(ks):
        def fn(row, s):
            return [(0, (k,), _add([row(G1, (hi,)) * s[at("dy", hi, k)] for hi in range(h)])
                     * 2.0 * jnp.maximum(row(P, (k,)), 0.0)) for k in ks]
        return Role(fn, at.units("dy", ks))

    def dg(o: int, name: str, x, hs):
        def fn(row, s):
            xs = [x(row, k) for k in range(m)]
            return [(o, (hi,), _plus(row, _add([s[at(name, hi, k)] * xs[k] for k in range(m)]), extras, o, hi))
                    for hi in hs]
        return Role(fn, at.heads(name, hs))

    heads = _head_chunks(m, 1, h)
    emit_roles = ([dp(ks) for ks in units]
                  + [dg(1, "dy", lambda row, k: _relu2(row(P, (k,))), hs) for hs in heads]
                  + [dg(2, "y", lambda row, k: row(DZ, (k,)), hs) for hs in heads])
    outs = [((m,), p.dtype), ((h,), g1.dtype), ((h,), g2.dtype)]
    return tuple(gpu_pass(sum_roles, [p, g1, g2, dz], len(at), emit_roles, [p, g1, g2, dz, *(a for a, _ in extra)],
                          outs, name="monet_hd_mix_bwd", major=(0,)))


# -- VD -------------------------------------------------------------------------------------------------
P1, P2, VG1, VG2, DT, DB = 0, 1, 2, 3, 4, 5


def _x(side_p: int):
    return lambda row, k: _relu2(row(side_p, (k,)))


def vd_forward(p1, p2, g1, g2, m_major: bool = True):
    """As :func:`mixing.vd_forward`: ``(top, bottom, s1, s2)``."""
    h, m = g1.shape[1], p1.shape[1]
    at = Sums(h, m, "y1", "y2")
    units = _unit_chunks(h, m)
    sum_roles = [_mixture(at, y, g, _x(pi), ks) for y, g, pi in (("y1", VG1, P1), ("y2", VG2, P2)) for ks in units]

    def half(o: int, pi: int, g: int, other: str, ks, first: bool):
        """Top (``o`` 0: straight flow, then cross flow) or bottom (``o`` 1: cross flow, then straight)."""
        def fn(row, s):
            total = _add([row(g, (hi,)) for hi in range(h)])
            out = []
            for k in ks:
                straight = _relu2(row(pi, (k,))) * total
                cross = _add([row(g, (hi,)) * s[at(other, hi, k)] for hi in range(h)])
                out += [(o, (0, k), straight if o == 0 else cross), (o, (1, k), cross if o == 0 else straight)]
            return out + ([(2 + o, (0,), total)] if first else [])
        return Role(fn, at.units(other, ks))

    emit_roles = [half(o, pi, g, other, ks, i == 0) for o, pi, g, other in ((0, P1, VG1, "y2"), (1, P2, VG2, "y1"))
                  for i, ks in enumerate(units)]
    out = ((2, m), p1.dtype)
    return tuple(gpu_pass(sum_roles, [p1, p2, g1, g2], len(at), emit_roles, [p1, p2, g1, g2],
                          [out, out, ((1,), g1.dtype), ((1,), g2.dtype)], name="monet_vd_mix",
                          major=(0, 1) if m_major else ()))


def vd_backward(p1, p2, g1, g2, dtop, dbot, dg1_in=None, dg2_in=None, ds1=None, ds2=None):
    """As :func:`mixing.vd_backward`: ``(dp1, dp2, dg1, dg2)``, the given accumulators added inside.

    With ``d11, d12 = dtop`` and ``d21, d22 = dbot``, the sums are the head mixtures ``y1``, ``y2`` and those
    of the cross flows' cotangents, ``dy1[h][k] = sum_e g2[h] d21[k]`` and ``dy2[h][k] = sum_e g1[h] d12[k]``."""
    h, m = g1.shape[1], p1.shape[1]
    args = [p1, p2, g1, g2, dtop.astype(p1.dtype), dbot.astype(p1.dtype)]
    at = Sums(h, m, "y1", "y2", "dy1", "dy2")
    extra = [(a, o) for a, o in ((dg1_in, 2), (dg2_in, 3), (ds1, 2), (ds2, 3)) if a is not None]
    extras = _extras(extra, len(args))
    units = _unit_chunks(h, m)
    d = lambda ref, half: lambda row, k: row(ref, (half, k))  # noqa: E731
    sum_roles = [_mixture(at, name, g, x, ks)
                 for name, g, x in (("y1", VG1, _x(P1)), ("y2", VG2, _x(P2)), ("dy1", VG2, d(DB, 0)),
                                    ("dy2", VG1, d(DT, 1)))
                 for ks in units]

    def dp(o: int, pi: int, g: int, dd, dy: str, ks):
        """``dp[k] = (d[k] sum_h g + sum_h g[h] dy[h][k]) * 2 relu(p[k])``, ``d`` the straight flow's cotangent."""
        def fn(row, s):
            total = _add([row(g, (hi,)) for hi in range(h)])
            return [(o, (k,), (dd(row, k) * total + _add([row(g, (hi,)) * s[at(dy, hi, k)] for hi in range(h)]))
                     * 2.0 * jnp.maximum(row(pi, (k,)), 0.0)) for k in ks]
        return Role(fn, at.units(dy, ks))

    def dg(o: int, pi: int, straight, cross, y: str, dy: str, hs):
        """``dg[h] = sum_k (d[k] + dy[h][k]) x[k] + sum_k y_other[h][k] cross[k]``."""
        def fn(row, s):
            xs = [_relu2(row(pi, (k,))) for k in range(m)]
            base = _add([straight(row, k) * xs[k] for k in range(m)])
            return [(o, (hi,), _plus(row, base + _add([s[at(y, hi, k)] * cross(row, k) + s[at(dy, hi, k)] * xs[k]
                                                       for k in range(m)]), extras, o, hi)) for hi in hs]
        return Role(fn, at.heads(y, hs) + at.heads(dy, hs))

    heads = _head_chunks(m, 2, h)
    emit_roles = ([dp(0, P1, VG1, d(DT, 0), "dy1", ks) for ks in units]
                  + [dg(2, P1, d(DT, 0), d(DT, 1), "y2", "dy1", hs) for hs in heads]
                  + [dp(1, P2, VG2, d(DB, 1), "dy2", ks) for ks in units]
                  + [dg(3, P2, d(DB, 1), d(DB, 0), "y1", "dy2", hs) for hs in heads])
    outs = [((m,), p1.dtype), ((m,), p2.dtype), ((h,), g1.dtype), ((h,), g2.dtype)]
    return tuple(gpu_pass(sum_roles, args, len(at), emit_roles, [*args, *(a for a, _ in extra)], outs,
                          name="monet_vd_mix_bwd", major=(0, 1)))
