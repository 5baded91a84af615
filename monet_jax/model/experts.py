"""Monet expert layers (vertical and horizontal decomposition) and the dense MLP baseline.

Both decompositions mix ``E * E`` composed experts without materializing any ``[.., E, E]`` tensor:
they are a dense MLP of width ``E * m`` whose hidden units are reweighted by ``g1`` / ``g2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from monet_jax.config import MonetConfig
from monet_jax.model.layers import Dense, param, relu2
from monet_jax.sharding import constrain

EXPERT_ACT = ("batch", "seq", "experts", None)  # [b, t, E, m]: experts split like tensor-parallel hidden units


class VerticalExperts(nnx.Module):
    """VD: expert ``(i, j)`` = left half ``i`` and right half ``j`` of the hidden units, each feeding
    both the top and bottom halves of the output (straight and cross flows)."""

    def __init__(self, cfg: MonetConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d, e, m = cfg.hidden_size, cfg.moe_experts, cfg.moe_dim // 2
        self.experts, self.half_dim, self.compute_dtype = e, m, compute_dtype
        kw = dict(std=cfg.initializer_range, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        up, down = dict(axes=("embed", "expert_mlp"), use_bias=True), dict(axes=("expert_mlp", "embed"), use_bias=False)
        self.u1 = Dense(d, e * m, **up, **kw)
        self.u2 = Dense(d, e * m, **up, **kw)
        self.v11 = Dense(e * m, d // 2, **down, **kw)
        self.v12 = Dense(e * m, d // 2, **down, **kw)
        self.v21 = Dense(e * m, d // 2, **down, **kw)
        self.v22 = Dense(e * m, d // 2, **down, **kw)
        self.b1 = param(jnp.zeros((e, d // 2), param_dtype), ("experts", "embed"))
        self.b2 = param(jnp.zeros((e, d // 2), param_dtype), ("experts", "embed"))

    def __call__(self, x_btd, g1_bthi, g2_bthj):
        b, t, _ = x_btd.shape
        cd = self.compute_dtype
        g1, g2 = g1_bthi.astype(cd), g2_bthj.astype(cd)
        x1_btim = constrain(relu2(self.u1(x_btd)).reshape(b, t, self.experts, self.half_dim), EXPERT_ACT)
        x2_btjm = constrain(relu2(self.u2(x_btd)).reshape(b, t, self.experts, self.half_dim), EXPERT_ACT)
        s1_bti, s2_btj = g1.sum(axis=2), g2.sum(axis=2)
        # Cross flows contract one side over its experts first, then spread over the other side.
        y2_bthm = jnp.einsum("bthj,btjm->bthm", g2, x2_btjm)
        y1_bthm = jnp.einsum("bthi,btim->bthm", g1, x1_btim)
        top = (self.v11((x1_btim * s1_bti[..., None]).reshape(b, t, -1))
               + self.v12(jnp.einsum("bthm,bthi->btim", y2_bthm, g1).reshape(b, t, -1))
               + jnp.einsum("bti,id->btd", s1_bti, self.b1[...].astype(cd)))
        bottom = (self.v21(jnp.einsum("bthm,bthj->btjm", y1_bthm, g2).reshape(b, t, -1))
                  + self.v22((x2_btjm * s2_btj[..., None]).reshape(b, t, -1))
                  + jnp.einsum("btj,jd->btd", s2_btj, self.b2[...].astype(cd)))
        return jnp.concatenate([top, bottom], axis=-1)


class HorizontalExperts(nnx.Module):
    """HD: expert ``(i, j)`` = bottom layer ``i`` (``u``) followed by top layer ``j`` (``v``, ``b``)."""

    def __init__(self, cfg: MonetConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d, e, m = cfg.hidden_size, cfg.moe_experts, cfg.moe_dim
        self.experts, self.dim, self.compute_dtype = e, m, compute_dtype
        kw = dict(std=cfg.initializer_range, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.u = Dense(d, e * m, axes=("embed", "expert_mlp"), use_bias=True, **kw)
        self.v = Dense(e * m, d, axes=("expert_mlp", "embed"), use_bias=False, **kw)
        self.b = param(jnp.zeros((e, d), param_dtype), ("experts", "embed"))

    def __call__(self, x_btd, g1_bthi, g2_bthj):
        b, t, _ = x_btd.shape
        cd = self.compute_dtype
        g1, g2 = g1_bthi.astype(cd), g2_bthj.astype(cd)
        x_btim = constrain(relu2(self.u(x_btd)).reshape(b, t, self.experts, self.dim), EXPERT_ACT)
        y_bthm = jnp.einsum("btim,bthi->bthm", x_btim, g1)
        z_btjm = constrain(jnp.einsum("bthm,bthj->btjm", y_bthm, g2), EXPERT_ACT)
        return self.v(z_btjm.reshape(b, t, -1)) + jnp.einsum("btj,jd->btd", g2.sum(axis=2), self.b[...].astype(cd))


class DenseMLP(nnx.Module):
    """The dense baseline: LLaMA SwiGLU (``hidden_act: silu``) or a relu2 MLP of ``intermediate_size``."""

    def __init__(self, cfg: MonetConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=False, std=cfg.initializer_range, param_dtype=param_dtype,
                  compute_dtype=compute_dtype, rngs=rngs)
        self.gated = cfg.hidden_act == "silu"
        self.gate_proj = Dense(d, f, axes=("embed", "mlp"), **kw) if self.gated else None
        self.up_proj = Dense(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(f, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x_btd):
        if self.gated:
            return self.down_proj(jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd))
        return self.down_proj(relu2(self.up_proj(x_btd)))


def make_experts(cfg: MonetConfig, **kw):
    return {"vertical": VerticalExperts, "horizontal": HorizontalExperts}[cfg.moe_decompose](cfg, **kw)
