"""Entry points the model calls for the Pallas kernels: the fused router, and the mixing of a routing group's
layers with their ``v`` products and expert biases (arrays in, arrays out; the ``xla`` path calls
:mod:`monet_jax.kernels.lanes` itself). Under an active mesh each kernel runs per batch shard.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from monet_jax.kernels import dispatch, lanes, mixing, mixing_gpu
from monet_jax.kernels.router import fused_router


def router_probs(z_bhet, mean_h, var_h, sigma: float, eps: float, dtype):
    """``g`` ``[b, H, E, t]`` in the mixing ``dtype`` from raw logits ``[b, H, E, t]`` (read in their dtype, computed
    on in float32 inside the kernel; their gradient comes back in that dtype) and the (global)
    BatchNorm statistics, with the kernel's token sums for the aux losses: ``sum_bt g`` ``[H, E]`` and
    ``sum_bt (1 - max_e g)`` ``[H]``."""
    def run(z, mean, var):
        g, col, amb = fused_router(z, mean, var, sigma, eps, dtype)
        return g, col[None], amb[None]  # per shard; summed over shards below

    g, col, amb = dispatch.partitioned(run, (True, False, False), (True, True, True))(
        z_bhet, mean_h, var_h)
    return g, col.sum(axis=0), amb.sum(axis=0)


def _mixing():
    """The mixing kernels for the target: Triton's form on a GPU, else the TPU's (also in interpret mode)."""
    return mixing_gpu if dispatch.target_platform() == "gpu" else mixing


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


# The carrying ops cover a layer's mixing and its ``v`` product(s): the forward pass writes the mixing's output
# row-major for the product it feeds, and the backward rule runs the mixing forward again itself, ``m``-major for
# the weight gradient (the layer is rematerialized anyway). Differentiated apart, the one forward kernel served
# both and XLA copied its output for one of them (TPU v4-64: a copy of the ``v`` inputs per layer; BENCHMARKS.md).
@jax.custom_vjp
def hd_experts_carry(p_bmEt, g1_bhEt, g2_bhEt, w_Emd, bias_Ed):
    """The Pallas HD mixing, ``v`` product and expert biases of one layer of a routing group: ``(out, g1, g2)``
    with ``out`` ``[b, t, d]`` and ``g1``, ``g2`` passed on unchanged for the group's next layer to take from
    here. So the backward pass of a layer receives the gradients of ``g`` of the group's later layers and adds
    its own (and those of the biases' weights ``sum_h g2``, broadcast over heads) inside the backward kernel,
    instead of separate XLA adds over ``[b, H, E, t]`` for every layer but one. ``sum_h g2`` comes from the
    forward kernel, which reads ``g2`` anyway; the biases are inside the op so that its backward rule, not a
    rematerialized forward, makes it again for their gradient. ``w``: ``v`` as ``[E, m, d]`` and ``bias``
    ``[E, d]``, in the compute dtype."""
    z, s2 = _part(partial(_mixing().hd_forward, m_major=False), 3, 2)(p_bmEt, g1_bhEt, g2_bhEt)
    return lanes.down_product(z, w_Emd) + lanes.bias_product(s2[:, 0], bias_Ed), g1_bhEt, g2_bhEt


def _hd_carry_bwd(res, cts):
    p, g1, g2, w, bias = res
    dout, dg1_in, dg2_in = cts
    dout = _dense(dout).astype(p.dtype)
    z, s2 = _part(_mixing().hd_forward, 3, 2)(p, g1, g2)
    dz, dw = lanes.down_grads(z, w, dout)
    ds2, dbias = lanes.bias_grads(s2[:, 0], bias, dout)
    accumulators = {"dg1_in": dg1_in, "dg2_in": dg2_in, "ds2": ds2[:, None]}
    grads = _backward(_mixing().hd_backward, (p, g1, g2, dz), accumulators, 3)
    return (*grads, dw, dbias)


hd_experts_carry.defvjp(_primal(hd_experts_carry), _hd_carry_bwd, symbolic_zeros=True)


@jax.custom_vjp
def vd_experts_carry(p1_bmEt, p2_bmEt, g1_bhEt, g2_bhEt, w_top, w_bottom, b1_Ed, b2_Ed):
    """The Pallas VD mixing, ``v`` products and expert biases of one layer of a routing group: ``(out, g1, g2)``
    with ``out`` ``[b, t, d]``, its halves from ``[v11; v12]`` and ``[v21; v22]`` (``w_top``, ``w_bottom``:
    ``[2, E, m, d/2]``; biases ``[E, d/2]``; in the compute dtype), and ``g`` passed on as in
    :func:`hd_experts_carry`; the biases' weights ``sum_h g`` come from the forward kernel, and their gradients
    are added to those of ``g`` inside the backward kernel, as HD's."""
    forward = _part(partial(_mixing().vd_forward, m_major=False), 4, 4)
    top, bottom, s1, s2 = forward(p1_bmEt, p2_bmEt, g1_bhEt, g2_bhEt)
    halves = [lanes.down_product(a, w) + lanes.bias_product(s[:, 0], bias)
              for a, w, s, bias in ((top, w_top, s1, b1_Ed), (bottom, w_bottom, s2, b2_Ed))]
    return jnp.concatenate(halves, axis=-1), g1_bhEt, g2_bhEt


def _vd_carry_bwd(res, cts):
    p1, p2, g1, g2, w_top, w_bottom, b1, b2 = res
    dout, dg1_in, dg2_in = cts
    top, bottom, s1, s2 = _part(_mixing().vd_forward, 4, 4)(p1, p2, g1, g2)
    halves = zip((top, bottom), (w_top, w_bottom), (s1, s2), (b1, b2),
                 jnp.split(_dense(dout).astype(p1.dtype), 2, axis=-1), strict=True)
    (da1, dw1, ds1, db1), (da2, dw2, ds2, db2) = [
        (*lanes.down_grads(a, w, d), *lanes.bias_grads(s[:, 0], bias, d)) for a, w, s, bias, d in halves]
    accumulators = {"dg1_in": dg1_in, "dg2_in": dg2_in, "ds1": ds1[:, None], "ds2": ds2[:, None]}
    grads = _backward(_mixing().vd_backward, (p1, p2, g1, g2, da1, da2), accumulators, 4)
    return (*grads, dw1, dw2, db1, db2)


vd_experts_carry.defvjp(_primal(vd_experts_carry), _vd_carry_bwd, symbolic_zeros=True)
