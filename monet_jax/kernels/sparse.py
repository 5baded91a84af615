"""Sparse experts for decoding and small batches: read only the weights of the experts in use.

``g1``/``g2`` are exactly zero outside the experts that pass the router's threshold (about ``moe_topk``
per head), so a layer's output depends only on the experts some token and head of the call routes to: the
union, at most ``tokens * H * moe_topk`` of ``E`` per side. ``u`` is needed for the ``g1`` side's experts
(VD: ``u1`` for ``g1``, ``u2`` for ``g2``) and ``v``/``b`` for the side each output half mixes over, so this
path reads those experts' weights once per call and runs the whole layer over them alone: the mixing,
the ``relu2`` units and the ``v`` projections at the width of the union instead of ``E``. A union wider
than the static width runs the dense layer, so the result is always the dense layer's.

Counting bytes: an expert of ``v`` is ``m`` consecutive rows of its ``[E*m, d]`` kernel, so reading it
reads just its bytes. An expert of ``u`` is ``m`` strided columns of the ``[d, E*m]`` kernel, which a CPU
reads at the cost of the dense product; given ``u``'s rows (``u.T``, ``[E*m, d]``: ``{name}_rows`` in the
weights, which :class:`monet_jax.model.pure.PureModel` adds for decoding) only the experts in use are read,
else ``u`` runs dense and its output is narrowed.

How the rows are read depends on the backend (``loop``). On a CPU, XLA's gather copies element by element
(64 experts' rows of a ``[8192, 1024]`` float32 kernel: about 3 GB/s), so each expert's rows are multiplied
where they lie, one ``dynamic_slice`` and product per expert in a loop as long as the union (a batch-1
decoding step 8-11% faster: BENCHMARKS.md). On a TPU, where a gather is one parallel kernel and a
loop of small products is not, the rows are gathered at the smallest of a few static widths that holds the
union (``lax.cond``). On a GPU those gathers, tiers and their index work made half again as many kernels as
the dense layer's, so there the narrowed layer is Pallas kernels (:mod:`~monet_jax.kernels.sparse_gpu`: the
union, ``u``'s projection, the mixing, ``v``'s projection) at the one width, behind one ``lax.cond`` for the dense
fallback: where the unions fit, three kernels and one XLA fusion a layer, and the union once per routing group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from monet_jax.kernels import dispatch, sparse_gpu

TIERS = (0.5, 0.75, 1.0)  # gathered widths tried, as fractions of the largest (tokens * H * sparse_k)


def tiers(width: int, experts: int) -> list[int]:
    """The static widths tried, smallest first (multiples of 8 below ``experts``)."""
    out = sorted({min(experts, max(8, -(-int(width * f) // 8) * 8)) for f in TIERS})
    return [w for w in out if w < experts]


def widths(width: int, experts: int, loop: bool) -> list[int]:
    """The static widths :func:`layer` tries, smallest first: ``width`` itself where rows are read in a loop
    (its length is the union's), else the gather's :func:`tiers`; none when ``width`` covers every expert."""
    return ([width] if width < experts else []) if loop else tiers(width, experts)


def loops() -> bool:
    """Whether expert rows are read by a loop over the union (CPU) rather than gathered (accelerators)."""
    return dispatch.target_platform() == "cpu"


def _experts(w: dict) -> int:
    return (w["b1"] if "b1" in w else w["b"]).shape[0]


def _union(g_bthe, width: int):
    """The experts some token and head routes to, as ``width`` indices (slots past the union repeat
    expert 0), their number, and the routing weights at those indices (zero in the padding slots)."""
    use = jnp.any(g_bthe != 0, axis=(0, 1, 2))
    idx = jnp.nonzero(use, size=width, fill_value=0)[0]
    n = use.sum()
    return idx, n, jnp.where(jnp.arange(width) < n, jnp.take(g_bthe, idx, axis=3), 0)


def _rows(kernel, e: int, i, cd):
    """Expert ``i``'s ``m`` consecutive rows of an ``[E*m, d]`` kernel."""
    m = kernel.shape[0] // e
    return jax.lax.dynamic_slice_in_dim(kernel, i * m, m).astype(cd)


def _up(x_btd, w: dict, name: str, idx, n, cd, loop: bool):
    """``relu2(x @ u + b)`` of the experts ``idx`` only: ``[b, t, w, m]`` (the first ``n`` slots computed
    where ``loop``; the others hold ``relu2`` of the bias, which the zero routing weights there cancel)."""
    b, t, d = x_btd.shape
    bias, e = w[f"{name}_bias"], _experts(w)
    m = bias.shape[0] // e
    bias_w = bias.reshape(e, m)[idx].astype(cd)
    rows, x = w.get(f"{name}_rows"), x_btd.astype(cd)
    if rows is None:
        y = jnp.einsum("btd,dn->btn", x, w[name].astype(cd)).reshape(b, t, e, m)[:, :, idx]
    elif loop:
        def one(s, y_wbtm):
            y = jax.lax.dot_general(x, _rows(rows, e, idx[s], cd), (((2,), (1,)), ((), ())))
            return jax.lax.dynamic_update_index_in_dim(y_wbtm, y, s, 0)
        y = jax.lax.fori_loop(0, n, one, jnp.zeros((idx.shape[0], b, t, m), cd)).transpose(1, 2, 0, 3)
    else:
        k = rows.reshape(e, m, d)[idx].reshape(-1, d).astype(cd)
        y = jax.lax.dot_general(x, k, (((2,), (1,)), ((), ()))).reshape(b, t, -1, m)
    return jnp.square(jax.nn.relu(y + bias_w))


def _down(a_btwm: list, kernels: list, s_btw, bias_ed, idx, n, cd, loop: bool):
    """``sum_k a_k @ kernel_k[idx] + s @ bias[idx]``: the ``v`` projections of the experts ``idx``
    (of the first ``n`` where ``loop``: the others have zero weights)."""
    e = bias_ed.shape[0]
    b, t, _ = s_btw.shape
    if loop:
        a_wbtm = [jnp.moveaxis(a, 2, 0) for a in a_btwm]
        s_wbt = jnp.moveaxis(s_btw, 2, 0)

        def one(s, out_btd):
            i = idx[s]
            out_btd = out_btd + s_wbt[s][..., None] * _rows(bias_ed, e, i, cd)
            for a, k in zip(a_wbtm, kernels, strict=True):
                out_btd = out_btd + jnp.einsum("btm,md->btd", a[s], _rows(k, e, i, cd))
            return out_btd
        return jax.lax.fori_loop(0, n, one, jnp.zeros((b, t, bias_ed.shape[1]), cd))
    out = jnp.einsum("btw,wd->btd", s_btw, bias_ed[idx].astype(cd))
    for a, k in zip(a_btwm, kernels, strict=True):
        k_wmd = k.reshape(e, -1, k.shape[-1])[idx].astype(cd)
        out = out + jnp.einsum("btn,nd->btd", a.reshape(*a.shape[:2], -1), k_wmd.reshape(-1, k.shape[-1]))
    return out


def vd_narrow(x_btd, w: dict, g1_bthi, g2_bthj, width: int, cd, loop: bool = False, slots=None):
    """The VD layer over the ``width`` experts of each side's union (exact when both unions fit).
    ``slots``: both sides' ``(idx, n)`` (:func:`sparse_gpu.union`), given on a GPU: the layer runs as its kernels."""
    if slots is not None:
        return _vd_kernels(x_btd, w, g1_bthi, g2_bthj, slots, cd)
    idx1, n1, g1 = _union(g1_bthi.astype(cd), width)
    idx2, n2, g2 = _union(g2_bthj.astype(cd), width)
    x1, x2 = _up(x_btd, w, "u1", idx1, n1, cd, loop), _up(x_btd, w, "u2", idx2, n2, cd, loop)
    s1, s2 = g1.sum(axis=2), g2.sum(axis=2)
    cross12 = jnp.einsum("bthm,bthi->btim", jnp.einsum("bthj,btjm->bthm", g2, x2), g1)
    cross21 = jnp.einsum("bthm,bthj->btjm", jnp.einsum("bthi,btim->bthm", g1, x1), g2)
    top = _down([x1 * s1[..., None], cross12], [w["v11"], w["v12"]], s1, w["b1"], idx1, n1, cd, loop)
    bottom = _down([cross21, x2 * s2[..., None]], [w["v21"], w["v22"]], s2, w["b2"], idx2, n2, cd, loop)
    return jnp.concatenate([top, bottom], axis=-1)


def hd_narrow(x_btd, w: dict, g1_bthi, g2_bthj, width: int, cd, loop: bool = False, slots=None):
    """The HD layer over the ``width`` experts of each side's union (exact when both unions fit);
    ``slots`` as in :func:`vd_narrow`."""
    if slots is not None:
        return _hd_kernels(x_btd, w, g1_bthi, g2_bthj, slots, cd)
    idx1, n1, g1 = _union(g1_bthi.astype(cd), width)
    idx2, n2, g2 = _union(g2_bthj.astype(cd), width)
    x1 = _up(x_btd, w, "u", idx1, n1, cd, loop)
    z = jnp.einsum("bthm,bthj->btjm", jnp.einsum("btim,bthi->bthm", x1, g1), g2)
    return _down([z], [w["v"]], g2.sum(axis=2), w["b"], idx2, n2, cd, loop)


def layer(narrow, dense, x_btd, w: dict, g1_bthi, g2_bthj, width: int, cd, loop: bool | None = None):
    """``narrow`` at the smallest static width that holds both unions, else ``dense(x, w, g1, g2)``.
    ``loop`` (default :func:`loops`): read each expert's rows in a loop over the union, at the one width
    ``width`` (the loop's length is the union's), instead of gathering them at a few tiers of it. On a GPU
    target (not looping) the projections are Pallas kernels at the one width: :func:`_gpu_layer`."""
    loop = loops() if loop is None else loop
    if not loop and dispatch.target_platform() == "gpu":
        return _gpu_layer(narrow, dense, x_btd, w, g1_bthi, g2_bthj, width, cd)
    used = jnp.maximum(*(jnp.any(g != 0, axis=(0, 1, 2)).sum() for g in (g1_bthi, g2_bthj)))
    run = dense
    for tier in reversed(widths(width, _experts(w), loop)):  # nest: the smallest tier is tried first
        run = _tier(narrow, tier, cd, loop, run, used)
    return run(x_btd, w, g1_bthi, g2_bthj)


def _tier(narrow, tier: int, cd, loop: bool, wider, used):
    this = _looped(narrow, tier, cd) if loop else (lambda *a: narrow(*a, tier, cd, False))

    def run(x_btd, w, g1, g2):
        return jax.lax.cond(used <= tier, this, wider, x_btd, w, g1, g2)
    return run


def _looped(narrow, width: int, cd):
    """``narrow`` reading rows in loops, with the gathering version's gradient: reverse-mode
    differentiation does not go through a loop whose length depends on the data."""
    @jax.custom_vjp
    def run(x_btd, w, g1, g2):
        return narrow(x_btd, w, g1, g2, width, cd, True)

    def forward(*args):
        return run(*args), args

    def backward(args, ct):
        return jax.vjp(lambda *a: narrow(*a, width, cd, False), *args)[1](ct)

    run.defvjp(forward, backward)
    return run


# -- GPU: the layer as Pallas kernels -------------------------------------------------------------------------
def _gpu_layer(narrow, dense, x_btd, w: dict, g1_bthi, g2_bthj, width: int, cd):
    """``narrow`` through :mod:`~monet_jax.kernels.sparse_gpu`'s kernels at the one static ``width`` where both
    unions fit, else ``dense``: one conditional (no tiers: a kernel's launch costs the same at any width, and the
    padding slots read nothing). The unions and the predicate come before it, from ``g`` alone, so the layers of a
    routing group share them."""
    e = _experts(w)
    if width >= e:
        return dense(x_btd, w, g1_bthi, g2_bthj)
    idx, n, fits = sparse_gpu.union([jax.lax.stop_gradient(_flat(g)) for g in (g1_bthi, g2_bthj)], width)
    return jax.lax.cond(fits, _kernel_form(narrow, width, cd), lambda x, w, g1, g2, _: dense(x, w, g1, g2),
                        x_btd, w, g1_bthi, g2_bthj, (idx, n))


def _kernel_form(narrow, width: int, cd):
    """``narrow`` through the kernels, with the gathering version's gradient (as :func:`_looped`: the kernels
    have no VJP of their own; training with ``moe_impl=sparse`` still differentiates)."""
    @jax.custom_vjp
    def run(x_btd, w, g1, g2, slots):
        return narrow(x_btd, w, g1, g2, width, cd, slots=slots)

    def forward(*args):
        return run(*args), args[:4]

    def backward(args, ct):
        return (*jax.vjp(lambda *a: narrow(*a, width, cd, False), *args)[1](ct), None)

    run.defvjp(forward, backward)
    return run


def _up_kernel(x_btd, w: dict, names: tuple[str, ...], idx, n, cd):
    """:func:`sparse_gpu.up` of each named ``u`` (side ``p`` for the ``p``-th name), padded. Reads
    ``{name}_rows`` where the weights have them, else the strided columns of ``u`` itself (training)."""
    rows = all(f"{name}_rows" in w for name in names)
    kernels = [w[f"{name}_rows"] if rows else w[name] for name in names]
    return sparse_gpu.up(x_btd.reshape(-1, x_btd.shape[-1]), idx, n, kernels, [w[f"{name}_bias"] for name in names],
                         w[f"{names[0]}_bias"].shape[0] // _experts(w), compute_dtype=cd,
                         columns=(not rows,) * len(names), padded=True)


def _flat(g_bthe):
    b, t, h, e = g_bthe.shape
    return g_bthe.reshape(b * t, h, e)


def _vd_kernels(x_btd, w: dict, g1_bthi, g2_bthj, slots, cd):
    """:func:`vd_narrow` as three calls: ``up`` for ``u1`` and ``u2``, ``mix`` for both cross flows and slot
    weights, ``down`` for both output halves (``[V11 | V12]`` over side 1's slots, ``[V21 | V22]`` over side 2's)."""
    (idx, n), (b, t, d) = slots, x_btd.shape
    m = w["u1_bias"].shape[0] // _experts(w)
    x = _up_kernel(x_btd, w, ("u1", "u2"), idx, n, cd)
    cross, s = sparse_gpu.mix(idx, n, [_flat(g1_bthi), _flat(g2_bthj)], x, ((0, 1), (1, 0)), m, compute_dtype=cd,
                              padded=True)
    terms = (((0, 0, True), (1, 0, False)), ((1, 1, False), (0, 1, True)))  # (array: x / cross, row, scaled)
    out = sparse_gpu.down(idx, n, s, [x, cross], [[w["v11"], w["v12"]], [w["v21"], w["v22"]]], [w["b1"], w["b2"]],
                          terms, compute_dtype=cd, tokens=b * t)
    return jnp.concatenate([out[0], out[1]], axis=-1).reshape(b, t, d)


def _hd_kernels(x_btd, w: dict, g1_bthi, g2_bthj, slots, cd):
    """:func:`hd_narrow` as three calls: ``up`` over side 1's slots, ``mix`` (``z`` at side 2's), ``down``."""
    (idx, n), (b, t, d) = slots, x_btd.shape
    m = w["u_bias"].shape[0] // _experts(w)
    x = _up_kernel(x_btd, w, ("u",), idx, n, cd)
    z, s = sparse_gpu.mix(idx, n, [_flat(g1_bthi), _flat(g2_bthj)], x, ((1, 0),), m, compute_dtype=cd, padded=True)
    out = sparse_gpu.down(idx, n, s, [z], [[w["v"]]], [w["b"]], (((0, 0, False),),), compute_dtype=cd, sides=(1,),
                          tokens=b * t)
    return out[0].reshape(b, t, d)
