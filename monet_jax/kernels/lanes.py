"""Expert mixing with tokens on the lane (last) axis: the layout that is dense at the published shapes.

Activations are ``[b, m, E, t]`` (``p``: the ``u`` projection's output before ``relu2``; the inputs of the
``v`` projections) and routing probabilities ``[b, H, E, t]``: ``E`` (512) is the sublane axis and the
sequence the 128-lane axis, so ``m/2 = 8`` and ``H = 8`` are major dimensions and pad nothing. Every
contraction of the mixing is then a lane-parallel multiply-add over whole ``[E, t]`` slabs:

- ``mix``: ``y_hm = sum_e g_he x_me`` (a sublane reduction per ``(h, m)``),
- ``spread``: ``x_me = sum_h g_he y_hm`` (a row broadcast over sublanes, summed over heads),
- ``inner``: ``g_he = sum_m y_hm x_me``.

The ``u``/``v`` matmuls read and write this layout directly (``einsum("btd,dem->bmet")``), so no
``[tokens, E, m]`` array with an 8-wide minor dimension is ever formed. The same functions run on the
blocks of the Pallas kernels in :mod:`monet_jax.kernels.mixing` and, as the ``xla`` path, on whole arrays
(there XLA decides what it fuses and what it materializes; see BENCHMARKS.md). Arithmetic is float32
whatever the storage dtype. Backward passes recompute ``relu2(p)`` and the head mixtures from ``p`` and
``g`` instead of saving them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def _head(a, h: int):
    return a[..., h, :, :].astype(f32)


def mix(g_hEt, x_mEt):
    """``y[h, m, 1, t] = sum_e g[h, e, t] x[m, e, t]`` (leading batch dimensions allowed; the unit
    sublane axis lets ``y`` broadcast back over experts without a relayout inside a kernel). One head at
    a time, so no ``[H, m, E, t]`` product is ever formed."""
    x = x_mEt.astype(f32)
    return jnp.stack([jnp.sum(_head(g_hEt, h)[..., None, :, :] * x, axis=-2, keepdims=True)
                      for h in range(g_hEt.shape[-3])], axis=-4)


def spread(g_hEt, y_hm1t):
    """``x[m, e, t] = sum_h g[h, e, t] y[h, m, t]``."""
    heads = range(g_hEt.shape[-3])
    return sum(_head(g_hEt, h)[..., None, :, :] * y_hm1t[..., h, :, :, :].astype(f32) for h in heads)


def inner(y_hm1t, x_mEt):
    """``g[h, e, t] = sum_m y[h, m, t] x[m, e, t]``."""
    x = x_mEt.astype(f32)
    return jnp.stack([jnp.sum(y_hm1t[..., h, :, :, :].astype(f32) * x, axis=-3)
                      for h in range(y_hm1t.shape[-4])], axis=-3)


def heads_sum(g_hEt):
    """``sum_h g[h, e, t]`` as ``[1, e, t]`` (broadcasts over ``m``)."""
    return jnp.sum(g_hEt.astype(f32), axis=-3, keepdims=True)


def act(p):
    """``(relu2(p), relu(p))`` in float32."""
    r = jnp.maximum(p.astype(f32), 0.0)
    return r * r, r


# Each pass is split in two: ``*_reduce`` (sums over all experts, tiny ``[H, m, 1, t]`` results) and
# ``*_emit`` (per expert, given those sums), so a kernel can stream the expert axis in chunks.
# -- HD -------------------------------------------------------------------------------------------------
def hd_reduce(p_mEt, g1_hEt):
    return (mix(g1_hEt, act(p_mEt)[0]),)


def hd_emit(g2_hEt, y):
    """``z[m, j] = sum_h g2[h, j] y[h, m]``: the input of ``v``."""
    return (spread(g2_hEt, y),)


def hd_reduce_bwd(p_mEt, g1_hEt, g2_hEt, dz_mEt):
    return mix(g1_hEt, act(p_mEt)[0]), mix(g2_hEt, dz_mEt)


def hd_emit_bwd(p_mEt, g1_hEt, dz_mEt, y, dy):
    """``(dp, dg1, dg2)``."""
    x, r = act(p_mEt)
    return spread(g1_hEt, dy) * 2.0 * r, inner(dy, x), inner(y, dz_mEt)


# -- VD -------------------------------------------------------------------------------------------------
def vd_reduce(p1_mEt, p2_mEt, g1_hEt, g2_hEt):
    return mix(g1_hEt, act(p1_mEt)[0]), mix(g2_hEt, act(p2_mEt)[0])


def vd_emit(p1_mEt, p2_mEt, g1_hEt, g2_hEt, y1, y2):
    """``(top, bottom)``, each a pair of ``[m, E, t]`` (straight flow first for top, cross first for
    bottom): stacked, the inputs of ``[v11; v12]`` and ``[v21; v22]``."""
    x1, x2 = act(p1_mEt)[0], act(p2_mEt)[0]
    return (x1 * heads_sum(g1_hEt), spread(g1_hEt, y2)), (spread(g2_hEt, y1), x2 * heads_sum(g2_hEt))


def vd_reduce_bwd(p1_mEt, p2_mEt, g1_hEt, g2_hEt, dtop_kmEt, dbot_kmEt):
    """``(y1, y2, dy1, dy2)``: the head mixtures and those of the cross flows' cotangents."""
    y1, y2 = vd_reduce(p1_mEt, p2_mEt, g1_hEt, g2_hEt)
    return y1, y2, mix(g2_hEt, dbot_kmEt[..., 0, :, :, :]), mix(g1_hEt, dtop_kmEt[..., 1, :, :, :])


def vd_emit_bwd(p1_mEt, p2_mEt, g1_hEt, g2_hEt, dtop_kmEt, dbot_kmEt, y1, y2, dy1, dy2):
    """``(dp1, dp2, dg1, dg2)``. Straight flows give ``sum_m d x`` to every head; the cross flows give
    both of their routing factors a term."""
    x1, r1 = act(p1_mEt)
    x2, r2 = act(p2_mEt)
    d11, d12 = dtop_kmEt[..., 0, :, :, :].astype(f32), dtop_kmEt[..., 1, :, :, :].astype(f32)
    d21, d22 = dbot_kmEt[..., 0, :, :, :].astype(f32), dbot_kmEt[..., 1, :, :, :].astype(f32)
    dg1 = jnp.sum(d11 * x1, axis=-3, keepdims=True) + inner(y2, d12) + inner(dy1, x1)
    dg2 = jnp.sum(d22 * x2, axis=-3, keepdims=True) + inner(y1, d21) + inner(dy2, x2)
    dp1 = (d11 * heads_sum(g1_hEt) + spread(g1_hEt, dy1)) * 2.0 * r1
    dp2 = (d22 * heads_sum(g2_hEt) + spread(g2_hEt, dy2)) * 2.0 * r2
    return dp1, dp2, dg1, dg2


# -- the XLA path: whole arrays, custom_vjp so the backward recomputes instead of saving -----------------
def _cast(values, like):
    return tuple(v.astype(a.dtype) for v, a in zip(values, like, strict=False))


@jax.custom_vjp
def hd_mix_lanes(p_bmEt, g1_bhEt, g2_bhEt):
    """HD mixing on ``[b, m, E, t]`` / ``[b, H, E, t]`` arrays, in ``p``'s dtype."""
    return hd_emit(g2_bhEt, *hd_reduce(p_bmEt, g1_bhEt))[0].astype(p_bmEt.dtype)


def _hd_fwd(p, g1, g2):
    return hd_mix_lanes(p, g1, g2), (p, g1, g2)


def _hd_bwd(res, dz):
    p, g1, g2 = res
    return _cast(hd_emit_bwd(p, g1, dz, *hd_reduce_bwd(p, g1, g2, dz)), res)


hd_mix_lanes.defvjp(_hd_fwd, _hd_bwd)


@jax.custom_vjp
def vd_mix_lanes(p1_bmEt, p2_bmEt, g1_bhEt, g2_bhEt):
    """VD mixing on ``[b, m, E, t]`` / ``[b, H, E, t]`` arrays: ``(top, bottom)`` ``[b, 2, m, E, t]`` in
    ``p``'s dtype."""
    args = (p1_bmEt, p2_bmEt, g1_bhEt, g2_bhEt)
    return tuple(jnp.stack(pair, axis=1).astype(p1_bmEt.dtype) for pair in vd_emit(*args, *vd_reduce(*args)))


def _vd_fwd(*args):
    return vd_mix_lanes(*args), args


def _vd_bwd(res, cot):
    return _cast(vd_emit_bwd(*res, *cot, *vd_reduce_bwd(*res, *cot)), res)


vd_mix_lanes.defvjp(_vd_fwd, _vd_bwd)


# -- projections into and out of the layout ----------------------------------------------------------------
def probs_to_lanes(g_bthe, dtype):
    """``[b, t, H, E]`` routing probabilities as ``[b, H, E, t]`` in the mixing dtype (once per group)."""
    return jnp.transpose(g_bthe.astype(dtype), (0, 2, 3, 1))


def up(x_btd, w_dk, bias_k, experts: int, dtype):
    """``u`` projection ``x @ w + bias`` written as ``[b, m, E, t]`` (``w``'s columns are expert-major)."""
    d = w_dk.shape[0]
    p = _up(x_btd.astype(dtype), w_dk.reshape(d, experts, -1).astype(dtype))
    return p + bias_k.reshape(experts, -1).T.astype(dtype)[None, :, :, None]


# Both projections state their products in the orientation whose natural output is the layout wanted:
# a product batched over rows, the weight broadcast to every row (XLA fuses the broadcast into the product),
# gives ``[b, m, E, t]`` directly. Left to autodiff, the backward pass of ``down`` made ``dz`` as
# ``[b, t, E, m]`` and the sharded training step transposed it, and ``up``'s output went through
# ``[E, m, b, t]``: four copies of ``[b, m, E, t]`` per layer (TPU v4-64, Monet-HD 1.4B; BENCHMARKS.md).
def _rows(w, b):
    """``w`` broadcast to every row: ``[b, *w.shape]``."""
    return jnp.broadcast_to(w, (b, *w.shape))


def _by_rows(w_rows, x_btd):
    """``w [b, ..., d] . x [b, t, d]`` over ``d``, batched over rows: ``[b, ..., t]``."""
    return jax.lax.dot_general(w_rows, x_btd, (((w_rows.ndim - 1,), (2,)), ((0,), (0,))))


@jax.custom_vjp
def _up(x_btd, w_dem):
    return _by_rows(_rows(jnp.transpose(w_dem, (2, 1, 0)), x_btd.shape[0]), x_btd)


def _up_fwd(x_btd, w_dem):
    return _up(x_btd, w_dem), (x_btd, w_dem)


def _up_bwd(res, dp_bmEt):
    x_btd, w_dem = res
    w_rows = _rows(jnp.transpose(w_dem, (2, 1, 0)), x_btd.shape[0])
    dx = jax.lax.dot_general(dp_bmEt, w_rows, (((1, 2), (1, 2)), ((0,), (0,))))
    dw_dme = jax.lax.dot_general(x_btd, dp_bmEt, (((0, 1), (0, 3)), ((), ())))
    return dx.astype(x_btd.dtype), jnp.swapaxes(dw_dme, 1, 2).astype(w_dem.dtype)


_up.defvjp(_up_fwd, _up_bwd)


def down_product(a_bkmEt, w_kEmd):
    """``sum_{(k,) m, e} a[b, (k,) m, e, t] w[(k,) e, m, d]`` -> ``[b, t, d]`` (both in the compute dtype)."""
    if a_bkmEt.ndim == 4:
        return jnp.einsum("bmet,emd->btd", a_bkmEt, w_kEmd)
    return jnp.einsum("bkmet,kemd->btd", a_bkmEt, w_kEmd)


def down_grads(a_bkmEt, w_kEmd, dout_btd):
    """``(da, dw)`` of :func:`down_product`: ``da`` ``[b, (k,) m, E, t]`` as a product batched over rows (its
    natural layout), ``dw`` one contraction over rows and tokens."""
    n, dout = a_bkmEt.ndim - 1, dout_btd.astype(a_bkmEt.dtype)  # a's axes after b: ((k,) m, E, t); w's: ((k,) E, m, d)
    da = _by_rows(_rows(jnp.swapaxes(w_kEmd, -3, -2), a_bkmEt.shape[0]), dout)
    dw = jax.lax.dot_general(a_bkmEt, dout, (((0, n), (0, 1)), ((), ())))  # [(k,) m, E, d]
    return da.astype(a_bkmEt.dtype), jnp.swapaxes(dw, -3, -2).astype(w_kEmd.dtype)


def bias_product(s_bEt, bias_Ed):
    """The expert biases weighted by ``s = sum_h g`` ``[b, E, t]``: ``[b, t, d]``."""
    return jnp.einsum("bet,ed->btd", s_bEt, bias_Ed)


def bias_grads(s_bEt, bias_Ed, dout_btd):
    """``(ds, dbias)`` of :func:`bias_product`, ``ds`` ``[b, E, t]`` as a product batched over rows."""
    dout = dout_btd.astype(bias_Ed.dtype)
    ds = _by_rows(_rows(bias_Ed, s_bEt.shape[0]), dout)
    return ds.astype(s_bEt.dtype), jnp.einsum("bet,btd->ed", s_bEt, dout).astype(bias_Ed.dtype)


@jax.custom_vjp
def down(a_bkmEt, w_kEmd):
    """``v`` projection(s) of ``[b, (k,) m, E, t]`` inputs with ``[(k,) E, m, d]`` weights (both in the compute
    dtype) -> ``[b, t, d]``, differentiated by :func:`down_grads`."""
    return down_product(a_bkmEt, w_kEmd)


def _down_fwd(a, w):
    return down(a, w), (a, w)


def _down_bwd(res, dout_btd):
    return down_grads(*res, dout_btd)


down.defvjp(_down_fwd, _down_bwd)


# -- a layer on the XLA path: what ``ops.{hd,vd}_experts_carry`` compute with the kernels -----------------------
def hd_experts(p_bmEt, g1_bhEt, g2_bhEt, w_Emd, bias_Ed):
    """HD mixing, ``v`` product and expert biases weighted by ``sum_h g2``: ``[b, t, d]`` (weights in the compute
    dtype)."""
    return down(hd_mix_lanes(p_bmEt, g1_bhEt, g2_bhEt), w_Emd) + bias_product(g2_bhEt.sum(axis=1), bias_Ed)


def vd_experts(p1_bmEt, p2_bmEt, g1_bhEt, g2_bhEt, w_top, w_bottom, b1_Ed, b2_Ed):
    """VD mixing, the two output halves' ``v`` products (``[2, E, m, d/2]`` each) and expert biases: ``[b, t, d]``."""
    halves = zip(vd_mix_lanes(p1_bmEt, p2_bmEt, g1_bhEt, g2_bhEt), (w_top, w_bottom), (g1_bhEt, g2_bhEt),
                 (b1_Ed, b2_Ed), strict=True)
    return jnp.concatenate([down(a, w) + bias_product(g.sum(axis=1), bias) for a, w, g, bias in halves], axis=-1)
