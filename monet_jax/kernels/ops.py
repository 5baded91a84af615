"""Entry points the model calls for the Pallas kernels: the fused router and the mixing of a routing group's
layers (arrays in, arrays out; the ``xla`` path calls :mod:`monet_jax.kernels.lanes` itself). Under an active
mesh each kernel runs per batch shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from monet_jax.kernels import dispatch, mixing
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


def _part(fn, n_in: int, n_out: int):
    return dispatch.partitioned(fn, (True,) * n_in, (True,) * n_out)


def _primal(op):
    """The forward rule of a carrying op: its outputs, and its inputs as the residuals."""
    def fwd(*args):
        args = tuple(a.value for a in args)  # symbolic_zeros=True wraps them
        return op(*args), args

    return fwd


def _dense(ct):
    """A cotangent as an array (zeros where JAX passed a symbolic zero)."""
    return jnp.zeros(ct.shape, ct.dtype) if isinstance(ct, SymbolicZero) else ct


def _backward(backward, args: tuple, accumulators: dict, n_out: int):
    """``backward(*args, **accumulators)`` per batch shard, given only the accumulators that are not symbolic
    zeros (the group's last layer gets none, so its kernel reads none)."""
    given = {k: v for k, v in accumulators.items() if not isinstance(v, SymbolicZero)}

    def run(*arrays):
        return backward(*arrays[:len(args)], **dict(zip(given, arrays[len(args):], strict=True)))

    return _part(run, len(args) + len(given), n_out)(*args, *given.values())


@jax.custom_vjp
def hd_mix_carry(p_bmEt, g1_bhEt, g2_bhEt):
    """The Pallas HD mixing of one layer of a routing group: ``(z, s2, g1, g2)`` with ``s2 = sum_h g2``
    ``[b, E, t]`` (the weights of the expert biases, summed in the forward kernel) and ``g1``, ``g2``
    passed on unchanged for the group's next layer to take from here. So the backward pass of a layer
    receives the gradients of ``g`` of the group's later layers and adds its own (and ``s2``'s, broadcast
    over heads) inside the backward kernel, instead of separate XLA adds over ``[b, H, E, t]`` for every
    layer but one."""
    z, s2 = _part(mixing.hd_forward, 3, 2)(p_bmEt, g1_bhEt, g2_bhEt)
    return z, s2[:, 0], g1_bhEt, g2_bhEt


def _hd_carry_bwd(res, cts):
    g2 = res[2]
    dz, ds2, dg1_in, dg2_in = cts
    ds2 = ds2 if isinstance(ds2, SymbolicZero) else ds2[:, None].astype(g2.dtype)
    return _backward(mixing.hd_backward, (*res, _dense(dz)), {"dg1_in": dg1_in, "dg2_in": dg2_in, "ds2": ds2}, 3)


hd_mix_carry.defvjp(_primal(hd_mix_carry), _hd_carry_bwd, symbolic_zeros=True)


@jax.custom_vjp
def vd_mix_carry(p1_bmEt, p2_bmEt, g1_bhEt, g2_bhEt):
    """The Pallas VD mixing of one layer of a routing group: ``(top, bottom, g1, g2)``, ``g`` passed on as
    in :func:`hd_mix_carry` so the group's gradients of ``g`` are summed inside the backward kernels."""
    top, bottom = _part(mixing.vd_forward, 4, 2)(p1_bmEt, p2_bmEt, g1_bhEt, g2_bhEt)
    return top, bottom, g1_bhEt, g2_bhEt


def _vd_carry_bwd(res, cts):
    dtop, dbot, dg1_in, dg2_in = cts
    return _backward(mixing.vd_backward, (*res, _dense(dtop), _dense(dbot)), {"dg1_in": dg1_in, "dg2_in": dg2_in}, 4)


vd_mix_carry.defvjp(_primal(vd_mix_carry), _vd_carry_bwd, symbolic_zeros=True)
