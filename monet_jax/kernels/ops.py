"""Entry points the model calls for the kernels: the fused router and the mixing function of each ``moe_impl``
(arrays in, arrays out). Under an active mesh each Pallas kernel runs per batch shard.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from monet_jax.kernels import dispatch, lanes, mixing
from monet_jax.kernels.mixing import hd_mix, vd_mix
from monet_jax.kernels.router import fused_router


def router_probs(z_bhet, mean_h, var_h, sigma: float, eps: float, dtype):
    """``g`` ``[b, H, E, t]`` in the mixing ``dtype`` from raw float32 logits ``[b, H, E, t]`` and the (global)
    BatchNorm statistics, with the kernel's token sums for the aux losses: ``sum_bt g`` ``[H, E]`` and
    ``sum_bt (1 - max_e g)`` ``[H]``."""
    def run(z, mean, var):
        g, col, amb = fused_router(z, mean, var, sigma, eps, dtype)
        return g, col[None], amb[None]  # per shard; summed over shards below

    g, col, amb = dispatch.partitioned(run, (True, False, False), (True, True, True))(
        z_bhet.astype(jnp.float32), mean_h, var_h)
    return g, col.sum(axis=0), amb.sum(axis=0)


def mixer(impl: str, vertical: bool):
    """The mixing function of the lane-dense layer (:mod:`monet_jax.kernels.lanes` arrays in and out):
    the Pallas kernels per batch shard for ``pallas``, the same math as XLA fusions for ``xla``."""
    if impl == "xla":
        return lanes.vd_mix_lanes if vertical else lanes.hd_mix_lanes
    n_in, n_out = (4, 2) if vertical else (3, 1)
    return dispatch.partitioned(vd_mix if vertical else hd_mix, (True,) * n_in, (True,) * n_out)


def _part(fn, n_in: int, n_out: int):
    return dispatch.partitioned(fn, (True,) * n_in, (True,) * n_out)


def _given(ct):
    return None if isinstance(ct, SymbolicZero) else ct


@jax.custom_vjp
def hd_mix_carry(p_bmEt, g1_bhEt, g2_bhEt):
    """The Pallas HD mixing of one layer of a routing group: ``(z, s2, g1, g2)`` with ``s2 = sum_h g2``
    ``[b, E, t]`` (the weights of the expert biases, summed in the forward kernel) and ``g1``, ``g2``
    passed on unchanged for the group's next layer to take from here. So the backward pass of a layer
    receives the gradients of ``g`` of the group's later layers and adds its own (and ``s2``'s, broadcast
    over heads) inside the backward kernel, instead of separate XLA adds over ``[b, H, E, t]`` for every
    layer but one."""
    z, s2 = _part(partial(mixing.hd_forward, heads_sum=True), 3, 2)(p_bmEt, g1_bhEt, g2_bhEt)
    return z, s2[:, 0], g1_bhEt, g2_bhEt


def _hd_carry_fwd(p, g1, g2):
    p, g1, g2 = p.value, g1.value, g2.value
    return hd_mix_carry(p, g1, g2), (p, g1, g2)


def _hd_carry_bwd(res, cts):
    p, g1, g2 = res
    dz, ds2, dg1_in, dg2_in = cts
    dz = jnp.zeros(p.shape, p.dtype) if isinstance(dz, SymbolicZero) else dz
    extra = {"dg1_in": _given(dg1_in), "dg2_in": _given(dg2_in),
             "ds2": None if _given(ds2) is None else ds2[:, None].astype(g2.dtype)}
    names = [k for k, v in extra.items() if v is not None]

    def run(p, g1, g2, dz, *more):
        return mixing.hd_backward(p, g1, g2, dz, **dict(zip(names, more, strict=True)))

    return _part(run, 4 + len(names), 3)(p, g1, g2, dz, *(extra[k] for k in names))


hd_mix_carry.defvjp(_hd_carry_fwd, _hd_carry_bwd, symbolic_zeros=True)


@jax.custom_vjp
def vd_mix_carry(p1_bmEt, p2_bmEt, g1_bhEt, g2_bhEt):
    """The Pallas VD mixing of one layer of a routing group: ``(top, bottom, g1, g2)``, ``g`` passed on as
    in :func:`hd_mix_carry` so the group's gradients of ``g`` are summed inside the backward kernels."""
    top, bottom = _part(mixing.vd_forward, 4, 2)(p1_bmEt, p2_bmEt, g1_bhEt, g2_bhEt)
    return top, bottom, g1_bhEt, g2_bhEt


def _vd_carry_fwd(*args):
    args = tuple(a.value for a in args)
    return vd_mix_carry(*args), args


def _vd_carry_bwd(res, cts):
    p1 = res[0]
    dtop, dbot, dg1_in, dg2_in = cts
    zero = (2, *p1.shape[1:])
    dtop = jnp.zeros((p1.shape[0], *zero), p1.dtype) if isinstance(dtop, SymbolicZero) else dtop
    dbot = jnp.zeros((p1.shape[0], *zero), p1.dtype) if isinstance(dbot, SymbolicZero) else dbot
    extra = {"dg1_in": _given(dg1_in), "dg2_in": _given(dg2_in)}
    names = [k for k, v in extra.items() if v is not None]

    def run(p1, p2, g1, g2, dtop, dbot, *more):
        return mixing.vd_backward(p1, p2, g1, g2, dtop, dbot, **dict(zip(names, more, strict=True)))

    return _part(run, 6 + len(names), 4)(*res, dtop, dbot, *(extra[k] for k in names))


vd_mix_carry.defvjp(_vd_carry_fwd, _vd_carry_bwd, symbolic_zeros=True)
