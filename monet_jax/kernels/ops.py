"""Entry points the model calls for the kernels: the fused router and the mixing function of each ``moe_impl``
(arrays in, arrays out). Under an active mesh each Pallas kernel runs per batch shard.
"""

from __future__ import annotations

import jax.numpy as jnp

from monet_jax.kernels import dispatch, lanes
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
