"""The sparse experts path on GPUs: a layer narrowed to the experts in use as four Pallas (Triton) kernels.

:mod:`~monet_jax.kernels.sparse` narrows a layer to the ``width`` slots of the experts some token and head routes
to, per side (``idx``, the first ``n`` valid, the others repeating expert 0). Gathering those rows with XLA at a
few static widths made a decoding step half again as many kernels as the dense layer's (the union's index work,
gathers, tier conditionals, the mixing's small products: BENCHMARKS.md). Here each stage is one call for both
sides of a layer (VD's ``u1`` and ``u2``, its two output halves):

- :func:`union`: each side's experts in use, in increasing order, their number, and whether all fit the width
  (the predicate of the dense fallback's conditional); it runs once per routing group, whose layers share ``g``.
- :func:`up`: ``relu2(x @ rows[idx[s]*m : idx[s]*m + m].T + bias[idx[s]])`` for every slot ``s`` and token, one
  program per slot and side. A program reads its index from an int32 ref and its ``m`` rows by a dynamic slice of
  the whole ``[E*m, d]`` ref (Triton has no data-dependent block index), walking ``d`` in power-of-two chunks.
  Slots past ``n`` read no rows and hold ``relu2(bias)``, as the CPU loop's do; zero routing weights cancel them.
- :func:`mix`: the routing mixtures at each output side's slots: ``s_w = sum_h g`` and the mixture through the
  heads of the other side's units (VD's cross flows, HD's ``z``), each program summing the source side over its
  valid slots itself (a few KB read from L2) rather than in a call of its own.
- :func:`down`: ``sum_s sum_k a[:, s, k] v[idx[s]*m + k, :] + s_w[:, s] bias[idx[s], :]``, programs over output
  column blocks x slot groups x output sides, each term's ``a`` a row of :func:`up`'s or :func:`mix`'s output
  (VD's straight flows scaled by ``s_w`` inside). One program per column block over every slot would give
  ``d_out / 128`` programs (16 for both of VD's halves at 1.4B, an eighth of an H100's SMs, each reading the rows
  of 128 slots in sequence), so slots are split into groups until there are about :data:`PROGRAMS`; XLA adds the
  groups' float32 partial sums (``groups * tokens * d_out`` floats: 128 KB for VD 1.4B at batch 1, against up to
  8.9 MB of rows read; atomics would make the sum's order vary from run to run).

Every tensor a program holds is a power of two (Triton's rule): tokens, heads, units and columns are padded in
registers and loads past an array's end are masked, so no operand is copied or padded in memory; :func:`up` and
:func:`mix` can hand their padded outputs on as they are (``padded``), without a slicing copy. The token count
stays small by construction (the union is narrower than ``E`` only while ``tokens * H * k < E``): a product tile
is at most :data:`BUDGET` float32 values. Operands are rounded to the compute dtype, as the XLA forms' are, and
multiplied in float32; each mixture is rounded where the XLA form's einsum output is. Under an active mesh XLA
gathers these calls' operands onto each device (they are meant for one device's decoding).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from monet_jax.kernels import dispatch

f32 = jnp.float32
i32 = jnp.int32
BUDGET = 4096  # float32 values of a program's largest product tile: 32 a thread at NUM_WARPS = 4
PROGRAMS = 256  # programs :func:`down` aims for (about two per SM of an H100)
COLUMNS = 128  # most output columns per :func:`down` program (a 256-byte row of bfloat16 per unit)
MIN_CHUNK = 16  # fewest columns a chunk of ``d`` (:func:`up`) or of the output (:func:`down`) is cut to
NUM_WARPS = 4
HIGHEST = jax.lax.Precision.HIGHEST


def _pow2(n: int) -> int:
    """The smallest power of two ``>= n``."""
    return 1 << max(0, int(n) - 1).bit_length()


def _floor2(n: int) -> int:
    """The largest power of two ``<= n`` (1 for ``n < 1``)."""
    return 1 << max(0, int(n).bit_length() - 1)


def _cdiv(a, b: int):
    return (a + b - 1) // b


def _relu2(v):
    r = jnp.maximum(v, 0.0)
    return r * r


def _iota(shape, axis: int):
    return jax.lax.broadcasted_iota(i32, shape, axis)


def _and(*masks):
    """The conjunction of the masks that are not None (None where all are)."""
    masks = [m for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, masks) if masks else None


def _below(shape, axis: int, start, limit: int, padded: int):
    """``start + iota < limit`` along ``axis``, or None where the ``padded`` extent never passes ``limit``."""
    return None if padded == limit else start + _iota(shape, axis) < limit


def _triton():
    """Pallas's Triton module (masked loads and stores), imported where a kernel is traced, as
    :func:`dispatch.compiler_params` imports it: importing this module loads no backend's lowering."""
    from jax.experimental.pallas import triton

    return triton


def _load(view, mask, cd=None):
    """``view`` (a ref slice); ``mask`` (or None) gives zeros where it is false (Triton reads nothing there,
    interpret mode pads past the end); rounded to ``cd`` and returned in float32 when ``cd`` is given."""
    v = view[...] if mask is None else _triton().load(view, mask=mask, other=0)
    return v if cd is None else v.astype(cd).astype(f32)


def _rd(v, cd):
    """``v`` rounded to ``cd`` (where the XLA form's einsum writes its output), kept in float32."""
    return v.astype(cd).astype(f32)


def _whole(shape) -> pl.BlockSpec:
    """The whole array as one block, each extent rounded up to a power of two: programs read it by slices that
    may pass its end (Pallas masks a block's reads and writes past the array's end, and newer jax rejects a
    static slice past the end of the block itself)."""
    return pl.BlockSpec(tuple(_pow2(n) for n in shape), lambda *_: (0,) * len(shape))


def _call(kernel, args, out_shape, grid, out_specs, name: str):
    """One ``pallas_call``: inputs whole (programs read them by dynamic slices), outputs by ``out_specs``
    (None: whole too)."""
    outs = out_shape if isinstance(out_shape, tuple) else (out_shape,)
    whole = [_whole(o.shape) for o in outs]
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, interpret=dispatch.interpret_mode(), name=name,
        in_specs=[_whole(a.shape) for a in args],
        out_specs=out_specs if out_specs is not None else (tuple(whole) if isinstance(out_shape, tuple) else whole[0]),
        compiler_params=dispatch.compiler_params("gpu", num_warps=NUM_WARPS),
    )(*args)


def _rows(n: int, sides: Sequence[int] | None) -> tuple[int, ...]:
    return tuple(range(n)) if sides is None else tuple(int(s) for s in sides)


# -- union ------------------------------------------------------------------------------------------------
def union(gs: Sequence, width: int):
    """Each side's experts in use: those some token and head routes to (nonzero weight).

    One program for all sides (a few KB of routing weights each), so it can also say whether they all fit: the
    predicate of the caller's conditional comes out of the kernel, not from a reduction of ``n`` after it.

    Args:
        gs: per side, routing weights ``[tokens, H, E]``.
        width: slots per side.

    Returns:
        ``(idx, n, fits)``: int32 ``[sides, width]``, the experts in use in increasing order, then expert 0 (the
        first ``width`` of them where more are in use); int32 ``[sides]``, how many are in use; and a boolean
        scalar, whether every side's fit in ``width``.
    """
    sides = len(gs)
    t, h, e = gs[0].shape
    sc = max(1, min(_pow2(width), _floor2(BUDGET // _pow2(e))))

    def kernel(*refs):
        g_refs, (idx_ref, n_ref, fits_ref) = refs[:sides], refs[sides:]
        fits = True
        for q in range(sides):
            n = _union_side(g_refs[q], idx_ref, q, t=t, h=h, e=e, width=width, sc=sc)
            n_ref[q] = n
            fits = jnp.logical_and(fits, n <= width)
        fits_ref[0] = fits

    out_shape = (jax.ShapeDtypeStruct((sides, width), i32), jax.ShapeDtypeStruct((sides,), i32),
                 jax.ShapeDtypeStruct((1,), jnp.bool_))
    idx, n, fits = _call(kernel, tuple(gs), out_shape, (1,), None, "monet_sparse_union")
    return idx, n, fits.reshape(())


def _union_side(g_ref, idx_ref, q: int, *, t, h, e, width, sc):
    """Writes side ``q``'s slots; returns how many experts are in use."""
    hp, ep = _pow2(h), _pow2(e)
    mask = _and(_below((hp, ep), 0, 0, h, hp), _below((hp, ep), 1, 0, e, ep))

    def token(i, use):
        g = _load(g_ref.at[i, pl.ds(0, hp), pl.ds(0, ep)], mask)
        return jnp.maximum(use, jnp.max((g != 0).astype(i32), axis=0))

    use = jax.lax.fori_loop(0, t, token, jnp.zeros((ep,), i32))
    pos = jnp.cumsum(use) - 1  # each expert in use: its slot
    experts, row = _iota((sc, ep), 1), i32(q)

    def chunk(c, carry):  # slots s0 .. s0 + sc: the expert whose slot each is (a one-hot sum, no scatter)
        s0 = c * sc
        hit = jnp.logical_and(pos[None, :] == s0 + _iota((sc, ep), 0), use[None, :] > 0)
        vals = jnp.sum(jnp.where(hit, experts, 0), axis=1)
        keep = _below((sc,), 0, s0, width, _cdiv(width, sc) * sc)
        if keep is None:
            idx_ref[row, pl.ds(s0, sc)] = vals
        else:
            _triton().store(idx_ref.at[row, pl.ds(s0, sc)], vals, mask=keep)
        return carry

    jax.lax.fori_loop(0, _cdiv(width, sc), chunk, 0)
    return jnp.sum(use)


def union_reference(gs: Sequence, width: int):
    """:func:`union` with ``jnp.nonzero``."""
    use = [jnp.any(g != 0, axis=(0, 1)) for g in gs]
    idx = jnp.stack([jnp.nonzero(u, size=width, fill_value=0)[0] for u in use]).astype(i32)
    n = jnp.stack([u.sum() for u in use]).astype(i32)
    return idx, n, jnp.all(n <= width)


# -- up ---------------------------------------------------------------------------------------------------
def up(x_td, idx, n, kernels: Sequence, biases: Sequence, units: int, *, compute_dtype,
       columns: Sequence[bool] | None = None, sides: Sequence[int] | None = None, padded: bool = False):
    """``relu2(x @ u_e + a_e)`` of the experts ``idx`` of each part (one call for all parts).

    Args:
        x_td: ``[tokens, d]``.
        idx: int32 ``[sides, width]``: each side's experts, the first ``n`` valid.
        n: int32 ``[sides]``.
        kernels: per part, ``u``'s expert rows ``[E*m, d]`` (``{name}_rows``), or ``u`` itself ``[d, E*m]`` where
            ``columns[p]`` (each expert's ``m`` columns are then read in runs of ``m`` values, one a row of ``d``:
            twice the bytes moved where a run is shorter than a 32-byte sector).
        biases: per part, ``u``'s bias ``[E*m]``.
        units: ``m``, hidden units per expert.
        compute_dtype: operands are rounded to it; the output's dtype.
        columns: per part, whether ``kernels[p]`` is ``[d, E*m]`` (default: none).
        sides: per part, its row of ``idx`` and ``n`` (default: part ``p`` reads row ``p``).
        padded: return the output with tokens and units padded to powers of two.

    Returns:
        ``[parts, tokens, width, m]``; slots past ``n`` hold ``relu2`` of their expert's bias.
    """
    parts, width = len(kernels), idx.shape[1]
    t, d = x_td.shape
    rows, cols = _rows(parts, sides), tuple(bool(c) for c in (columns or (False,) * parts))
    tp, mp = _pow2(t), _pow2(units)
    dk = min(_pow2(d), max(MIN_CHUNK, _floor2(BUDGET // (tp * mp))))
    out_shape = jax.ShapeDtypeStruct((parts, tp, width, mp), compute_dtype)
    spec = pl.BlockSpec((None, tp, None, mp), lambda s, p: (p, 0, s, 0))

    def kernel(idx_ref, n_ref, x_ref, *refs):
        w_refs, b_refs, o_ref = refs[:parts], refs[parts:2 * parts], refs[-1]
        s, p = pl.program_id(0), pl.program_id(1)
        for q in range(parts):
            pl.when(p == q)(functools.partial(
                _up_part, idx_ref[rows[q], s], s < n_ref[rows[q]], x_ref, w_refs[q], b_refs[q], o_ref,
                t=t, d=d, m=units, dk=dk, cd=compute_dtype, transposed=cols[q]))

    out = _call(kernel, (idx.astype(i32), n.astype(i32), x_td, *kernels, *biases), out_shape, (width, parts),
                spec, "monet_sparse_up")
    return out if padded else out[:, :t, :, :units]


def _up_part(i, valid, x_ref, w_ref, b_ref, o_ref, *, t, d, m, dk, cd, transposed: bool):
    tp, mp = o_ref.shape
    start, dpad = i * m, _cdiv(d, dk) * dk
    bias = _load(b_ref.at[pl.ds(start, mp)], _below((mp,), 0, 0, m, mp), cd)

    def chunk(c, acc):
        k0 = pl.multiple_of(c * dk, dk)
        x = _load(x_ref.at[pl.ds(0, tp), pl.ds(k0, dk)],
                  _and(_below((tp, dk), 0, 0, t, tp), _below((tp, dk), 1, k0, d, dpad)), cd)
        if transposed:  # [dk, mp]: the columns of u
            w = _load(w_ref.at[pl.ds(k0, dk), pl.ds(start, mp)],
                      _and(_below((dk, mp), 0, k0, d, dpad), _below((dk, mp), 1, 0, m, mp)), cd)
            return acc + jnp.sum(x[:, :, None] * w[None, :, :], axis=1)
        w = _load(w_ref.at[pl.ds(start, mp), pl.ds(k0, dk)],
                  _and(_below((mp, dk), 0, 0, m, mp), _below((mp, dk), 1, k0, d, dpad)), cd)
        return acc + jnp.sum(x[:, None, :] * w[None, :, :], axis=2)

    @pl.when(valid)
    def _():
        acc = jax.lax.fori_loop(0, _cdiv(d, dk), chunk, jnp.zeros((tp, mp), f32))
        o_ref[...] = _relu2(acc + bias[None, :]).astype(o_ref.dtype)

    @pl.when(jnp.logical_not(valid))
    def _():  # a padding slot: no rows read
        o_ref[...] = jnp.broadcast_to(_relu2(bias)[None, :], (tp, mp)).astype(o_ref.dtype)


def up_reference(x_td, idx, n, kernels: Sequence, biases: Sequence, units: int, *, compute_dtype,
                 columns: Sequence[bool] | None = None, sides: Sequence[int] | None = None):
    """:func:`up` with jnp: the experts' rows gathered, float32 products of operands rounded to the compute
    dtype, padding slots ``relu2(bias)``."""
    width, x = idx.shape[1], _rd(x_td, compute_dtype)
    out = []
    for p, r in enumerate(_rows(len(kernels), sides)):
        k = kernels[p].T if columns is not None and columns[p] else kernels[p]
        rows = _rd(k, compute_dtype).reshape(-1, units, k.shape[-1])[idx[r]]  # [w, m, d]
        y = jnp.einsum("td,wmd->twm", x, rows, precision=HIGHEST)
        y = jnp.where((jnp.arange(width) < n[r])[None, :, None], y, 0.0)
        out.append(_relu2(y + _rd(biases[p], compute_dtype).reshape(-1, units)[idx[r]][None]))
    return jnp.stack(out).astype(compute_dtype)


# -- mix --------------------------------------------------------------------------------------------------
def mix(idx, n, gs: Sequence, x, parts: Sequence[tuple[int, int]], units: int, *, compute_dtype,
        padded: bool = False):
    """The routing mixtures the ``v`` projections take, at the slots of each part's own side.

    For part ``(o, c)`` and slot ``s`` of side ``o``, with ``w[h] = g_o[t, h, idx[o, s]]``: ``s_w[t, s] = sum_h
    w[h]`` and ``cross[t, s] = sum_h w[h] y[t, h]``, where ``y[t, h] = sum_{j < n[c]} g_c[t, h, idx[c, j]]
    x[c, t, j]`` mixes side ``c``'s units through the heads: VD's cross flows are parts ``(0, 1)`` and ``(1, 0)``,
    HD's ``z`` is part ``(1, 0)``.

    Args:
        idx: int32 ``[sides, width]``: each side's experts, the first ``n`` valid.
        n: int32 ``[sides]``.
        gs: per side, routing weights ``[tokens, H, E]``.
        x: ``[rows, tokens, width, m]``, row ``c`` side ``c``'s units (:func:`up`'s output; padded or not).
        parts: per part, ``(own side, source side)``.
        units: ``m``.
        compute_dtype: operands and the mixtures are rounded to it; the outputs' dtype.
        padded: return the outputs with tokens, slots and units padded.

    Returns:
        ``(cross, s_w)``: ``[parts, tokens, width, m]`` and ``[parts, tokens, width]``, zero past ``n``.
    """
    (t, h, _), width, nparts = gs[0].shape, idx.shape[1], len(parts)
    tp, hp, mp = _pow2(t), _pow2(h), _pow2(units)
    wc = max(1, min(_pow2(width), _floor2(BUDGET // (tp * hp * mp))))  # slots per [tokens, H, slots, m] tile
    nc = _cdiv(width, wc)
    out_shape = (jax.ShapeDtypeStruct((nparts, tp, nc * wc, mp), compute_dtype),
                 jax.ShapeDtypeStruct((nparts, tp, nc * wc), compute_dtype))
    specs = (pl.BlockSpec((None, tp, wc, mp), lambda c, p: (p, 0, c, 0)),
             pl.BlockSpec((None, tp, wc), lambda c, p: (p, 0, c)))
    sides = len(gs)

    def kernel(idx_ref, n_ref, x_ref, *refs):
        g_refs, cross_ref, s_ref = refs[:sides], refs[-2], refs[-1]
        c, p = pl.program_id(0), pl.program_id(1)
        for q, (own, src) in enumerate(parts):
            pl.when(p == q)(functools.partial(
                _mix_part, c, own, src, idx_ref, n_ref, g_refs[own], g_refs[src], x_ref, cross_ref, s_ref,
                t=t, h=h, m=units, width=width, cd=compute_dtype))

    cross, s = _call(kernel, (idx.astype(i32), n.astype(i32), x, *gs), out_shape, (nc, nparts), specs,
                     "monet_sparse_mix")
    return (cross, s) if padded else (cross[:, :t, :width, :units], s[:, :t, :width])


def _gather(g_ref, idx_ref, side: int, s0, slots: int, limit, *, t, h, width, cd):
    """``g[:, :, idx[side, s0 : s0 + slots]]`` as ``[tokens, H, slots]`` (padded), zero at slots ``>= limit``."""
    tp, hp = _pow2(t), _pow2(h)
    at = s0 + _iota((slots,), 0)
    ids = _load(idx_ref.at[i32(side), pl.ds(s0, slots)], _below((slots,), 0, s0, width, _cdiv(width, slots) * slots))
    shape = (tp, hp, slots)
    ti, hi = _iota(shape, 0), _iota(shape, 1)
    mask = _and(_below(shape, 0, 0, t, tp), _below(shape, 1, 0, h, hp), (at < limit)[None, None, :])
    return _load(g_ref.at[ti, hi, jnp.broadcast_to(ids[None, None, :], shape)], mask, cd)


def _mix_part(c, own: int, src: int, idx_ref, n_ref, g_own, g_src, x_ref, cross_ref, s_ref, *, t, h, m, width, cd):
    tp, wc, mp = cross_ref.shape
    n_src = jnp.minimum(n_ref[src], width)
    xmask = _and(_below((tp, wc, mp), 0, 0, t, tp), _below((tp, wc, mp), 2, 0, m, mp))

    def chunk(k, y):  # side src's valid slots, wc at a time
        j0 = k * wc
        g = _gather(g_src, idx_ref, src, j0, wc, n_src, t=t, h=h, width=width, cd=cd)
        x = _load(x_ref.at[i32(src), pl.ds(0, tp), pl.ds(j0, wc), pl.ds(0, mp)],
                  _and(xmask, (j0 + _iota((tp, wc, mp), 1)) < n_src), cd)
        return y + jnp.sum(g[:, :, :, None] * x[:, None, :, :], axis=2)

    y = _rd(jax.lax.fori_loop(0, _cdiv(n_src, wc), chunk, jnp.zeros((tp, _pow2(h), mp), f32)), cd)
    g = _gather(g_own, idx_ref, own, c * wc, wc, n_ref[own], t=t, h=h, width=width, cd=cd)
    s_ref[...] = jnp.sum(g, axis=1).astype(s_ref.dtype)
    cross_ref[...] = jnp.sum(g[:, :, :, None] * y[:, :, None, :], axis=1).astype(cross_ref.dtype)


def mix_reference(idx, n, gs: Sequence, x, parts: Sequence[tuple[int, int]], units: int, *, compute_dtype):
    """:func:`mix` with jnp: the routing weights gathered at the slots, the XLA form's two einsums."""
    (t, _, _), width, cd = gs[0].shape, idx.shape[1], compute_dtype
    valid = [jnp.arange(width) < n[i] for i in range(len(gs))]
    gw = [jnp.where(valid[i], _rd(jnp.take(g, idx[i], axis=2), cd), 0.0) for i, g in enumerate(gs)]  # [t, H, w]
    cross, s = [], []
    for own, src in parts:
        xs = jnp.where(valid[src][None, :, None], _rd(x[src][:t, :width, :units], cd), 0.0)
        y = _rd(jnp.einsum("thj,tjm->thm", gw[src], xs, precision=HIGHEST), cd)
        cross.append(jnp.einsum("ths,thm->tsm", gw[own], y, precision=HIGHEST))
        s.append(gw[own].sum(axis=1))
    return jnp.stack(cross).astype(cd), jnp.stack(s).astype(cd)


# -- down -------------------------------------------------------------------------------------------------
def _down_blocks(parts: int, width: int, d_out: int, tp: int, mp: int) -> tuple[int, int, int]:
    """``(columns per program, column blocks, slots per group)``: column blocks within :data:`BUDGET`, then slot
    groups until the grid has about :data:`PROGRAMS` programs."""
    db = min(COLUMNS, _pow2(d_out), max(MIN_CHUNK, _floor2(BUDGET // (tp * mp))))
    nb = _cdiv(d_out, db)
    groups = max(1, min(width, _cdiv(PROGRAMS, parts * nb)))
    return db, nb, _cdiv(width, groups)


def down(idx, n, s_w, a: Sequence, kernels: Sequence[Sequence], biases: Sequence,
         terms: Sequence[Sequence[tuple[int, int, bool]]], *, compute_dtype, sides: Sequence[int] | None = None,
         tokens: int | None = None):
    """``sum_k a_k @ kernel_k[idx] + s_w @ bias[idx]`` of each part (one call for all parts).

    Args:
        idx: int32 ``[sides, width]``: each side's experts, the first ``n`` valid.
        n: int32 ``[sides]``.
        s_w: ``[parts, tokens, width]`` (padded or not): each slot's bias weight (:func:`mix`'s ``s_w``).
        a: activation arrays ``[rows, tokens, width, m]`` (padded or not: :func:`up`'s and :func:`mix`'s outputs).
        kernels: per part, its terms' ``v`` kernels ``[E*m, d_out]`` (an expert's rows are contiguous).
        biases: per part, ``[E, d_out]``.
        terms: per part, per term ``(array, row, scaled)``: ``a[array][row]`` multiplies the term's kernel,
            times ``s_w`` first where ``scaled`` (VD's straight flows).
        compute_dtype: operands are rounded to it; the output's dtype.
        sides: per part, its row of ``idx`` and ``n`` (default: part ``p`` reads row ``p``).
        tokens: the token count (default ``s_w.shape[1]``, which padding rounds up).

    Returns:
        ``[parts, tokens, d_out]``; slots past ``n`` are not read.
    """
    parts, width = len(kernels), idx.shape[1]
    t = s_w.shape[1] if tokens is None else tokens
    e, d_out = biases[0].shape
    m = kernels[0][0].shape[0] // e
    rows = _rows(parts, sides)
    tp, mp = _pow2(t), _pow2(m)
    db, nb, slots = _down_blocks(parts, width, d_out, tp, mp)
    groups = _cdiv(width, slots)
    out_shape = jax.ShapeDtypeStruct((parts, groups, tp, nb * db), f32)
    spec = pl.BlockSpec((None, None, tp, db), lambda jb, g, p: (p, g, 0, jb))
    flat = [arr for q in range(parts) for arr in (*kernels[q], biases[q])]

    def kernel(idx_ref, n_ref, s_ref, *refs):
        a_refs, o_ref, at = refs[:len(a)], refs[-1], len(a)
        jb, g, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        for q in range(parts):
            k = len(terms[q])
            w_refs, b_ref = refs[at:at + k], refs[at + k]
            at += k + 1
            pl.when(p == q)(functools.partial(
                _down_part, jb, g, q, rows[q], idx_ref, n_ref, s_ref, a_refs, w_refs, b_ref, o_ref, terms[q],
                t=t, m=m, d_out=d_out, slots=slots, width=width, cd=compute_dtype))

    out = _call(kernel, (idx.astype(i32), n.astype(i32), s_w, *a, *flat), out_shape, (nb, groups, parts), spec,
                "monet_sparse_down")
    return out[:, :, :t, :d_out].sum(axis=1).astype(compute_dtype)


def _down_part(jb, g, q: int, side: int, idx_ref, n_ref, s_ref, a_refs, w_refs, b_ref, o_ref, terms, *, t, m,
               d_out, slots, width, cd):
    tp, db = o_ref.shape
    mp = _pow2(m)
    c0 = pl.multiple_of(jb * db, db)
    cmask = _below((1, db), 1, c0, d_out, _cdiv(d_out, db) * db)
    amask = _and(_below((tp, mp), 0, 0, t, tp), _below((tp, mp), 1, 0, m, mp))
    wmask = _and(_below((mp, db), 0, 0, m, mp), None if cmask is None else jnp.broadcast_to(cmask, (mp, db)))
    first = g * slots

    def one(j, acc):
        s = first + j
        i = idx_ref[side, s]
        sw = _load(s_ref.at[i32(q), pl.ds(0, tp), s], _below((tp,), 0, 0, t, tp), cd)
        acc = acc + sw[:, None] * _load(b_ref.at[pl.ds(i, 1), pl.ds(c0, db)], cmask, cd)
        for (arr, row, scaled), w_ref in zip(terms, w_refs, strict=True):
            x = _load(a_refs[arr].at[i32(row), pl.ds(0, tp), s, pl.ds(0, mp)], amask, cd)
            if scaled:
                x = _rd(x * sw[:, None], cd)
            w = _load(w_ref.at[pl.ds(i * m, mp), pl.ds(c0, db)], wmask, cd)
            acc = acc + jnp.sum(x[:, :, None] * w[None, :, :], axis=1)
        return acc

    count = jnp.clip(jnp.minimum(n_ref[side], width) - first, 0, slots)  # this group's valid slots only
    o_ref[...] = jax.lax.fori_loop(0, count, one, jnp.zeros((tp, db), f32))


def down_reference(idx, n, s_w, a: Sequence, kernels: Sequence[Sequence], biases: Sequence,
                   terms: Sequence[Sequence[tuple[int, int, bool]]], *, compute_dtype,
                   sides: Sequence[int] | None = None, tokens: int | None = None):
    """:func:`down` with jnp: the valid slots' rows gathered, float32 products of operands rounded to the
    compute dtype."""
    width, cd = idx.shape[1], compute_dtype
    t = s_w.shape[1] if tokens is None else tokens
    out = []
    for p, r in enumerate(_rows(len(kernels), sides)):
        valid = (jnp.arange(width) < n[r]).astype(f32)
        s = _rd(s_w[p, :t, :width], cd) * valid[None]
        y = jnp.einsum("tw,wd->td", s, _rd(biases[p], cd)[idx[r]], precision=HIGHEST)
        for (arr, row, scaled), w in zip(terms[p], kernels[p], strict=True):
            rows = _rd(w, cd).reshape(biases[p].shape[0], -1, w.shape[-1])[idx[r]]  # [w, m, d]
            x = _rd(a[arr][row][:t, :width, :rows.shape[1]], cd)
            if scaled:
                x = _rd(x * s[..., None], cd)
            y = y + jnp.einsum("twm,wmd->td", x * valid[None, :, None], rows, precision=HIGHEST)
        out.append(y)
    return jnp.stack(out).astype(cd)
