"""Monet expert layers (vertical and horizontal decomposition) and the dense MLP baseline.

Both decompositions mix ``E * E`` composed experts without materializing any ``[.., E, E]`` tensor:
they are a dense MLP of width ``E * m`` whose hidden units are reweighted by ``g1`` / ``g2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from monet_jax.config import MonetConfig
from monet_jax.kernels import dispatch, lanes
from monet_jax.kernels import ops as kernel_ops
from monet_jax.model.layers import Dense, param, relu2
from monet_jax.sharding import constrain

EXPERT_ACT = ("batch", "seq", "experts", None)  # [b, t, E, m]: experts split like tensor-parallel hidden units
LANES_ACT = ("batch", None, "experts", "seq")  # [b, m, E, t]: the lane-dense layout (kernels.lanes)


class ExpertDeletion(nnx.Variable):
    """A layer's ``[E, E]`` 0/1 matrix of deleted composed experts ``(i, j)``: never trained, never saved."""


def deleted_weight(ga_btha, gb_bthb, d_ab):
    """``sum_h gb_hb sum_a D_ab ga_ha``: the routing weight of the deleted experts ``(a, b)`` per slot ``b``
    (the other side with ``D.T`` and the roles of ``g1``, ``g2`` swapped)."""
    return jnp.einsum("bthj,bthj->btj", gb_bthb, jnp.einsum("ij,bthi->bthj", d_ab, ga_btha))


def deleted_units(xa_btam, ga_btha, gb_bthb, d_ab):
    """``sum_h gb_hb sum_a D_ab ga_ha x_am``: the deleted experts' units ``x_a`` gathered at slot ``b``.
    Goes through ``[b, t, H, E, m]`` (H times the expert activations), never a ``[.., E, E]`` per token."""
    y_bthim = ga_btha[..., None] * xa_btam[:, :, None]
    return jnp.einsum("bthj,bthjm->btjm", gb_bthb, jnp.einsum("ij,bthim->bthjm", d_ab, y_bthim))


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
        self.moe_impl, self.sparse_k = cfg.moe_impl, dispatch.sparse_k(cfg.moe_sparse_k, cfg.moe_topk, e)

    def __call__(self, x_btd, g1_bthi, g2_bthj, deleted=None, lanes_probs=None):
        """``deleted``: optional ``[E, E]`` 0/1 matrix; those composed experts contribute nothing.
        ``lanes_probs``: ``(g1, g2)`` already in the lane-dense layout (made once per routing group).
        Expert ``(i, j)`` outputs ``[V11_i x1_i + V12_i x2_j + b1_i, V21_j x1_i + V22_j x2_j + b2_j]``."""
        b, t, _ = x_btd.shape
        cd = self.compute_dtype
        if deleted is None:
            if (impl := _impl(self, b * t, g1_bthi)) == "sparse":
                w = _weights(self, "u1", "u2", "v11", "v12", "v21", "v22", "b1", "b2")
                return kernel_ops.vertical_sparse(x_btd, w, g1_bthi, g2_bthj, compute_dtype=cd, k=self.sparse_k)
            return self._lanes(impl, x_btd, *(lanes_probs or _to_lanes(g1_bthi, g2_bthj, cd)))
        _masked(self)
        g1, g2 = g1_bthi.astype(cd), g2_bthj.astype(cd)
        x1_btim = constrain(relu2(self.u1(x_btd)).reshape(b, t, self.experts, self.half_dim), EXPERT_ACT)
        x2_btjm = constrain(relu2(self.u2(x_btd)).reshape(b, t, self.experts, self.half_dim), EXPERT_ACT)
        s1_bti, s2_btj = g1.sum(axis=2), g2.sum(axis=2)
        # Cross flows contract one side over its experts first, then spread over the other side.
        y2_bthm = jnp.einsum("bthj,btjm->bthm", g2, x2_btjm)
        y1_bthm = jnp.einsum("bthi,btim->bthm", g1, x1_btim)
        cross12_btim = jnp.einsum("bthm,bthi->btim", y2_bthm, g1)
        cross21_btjm = jnp.einsum("bthm,bthj->btjm", y1_bthm, g2)
        d_ij = deleted.astype(cd)  # subtract the deleted experts' share of each flow
        s1_bti = s1_bti - deleted_weight(g2, g1, d_ij.T)
        s2_btj = s2_btj - deleted_weight(g1, g2, d_ij)
        cross12_btim = cross12_btim - deleted_units(x2_btjm, g2, g1, d_ij.T)
        cross21_btjm = cross21_btjm - deleted_units(x1_btim, g1, g2, d_ij)
        top = (self.v11((x1_btim * s1_bti[..., None]).reshape(b, t, -1))
               + self.v12(cross12_btim.reshape(b, t, -1))
               + jnp.einsum("bti,id->btd", s1_bti, self.b1[...].astype(cd)))
        bottom = (self.v21(cross21_btjm.reshape(b, t, -1))
                  + self.v22((x2_btjm * s2_btj[..., None]).reshape(b, t, -1))
                  + jnp.einsum("btj,jd->btd", s2_btj, self.b2[...].astype(cd)))
        return jnp.concatenate([top, bottom], axis=-1)

    def _lanes(self, impl: str, x_btd, g1, g2):
        """The layer in the lane-dense layout of :mod:`monet_jax.kernels.lanes` (``impl``: xla or pallas)."""
        cd, e, m = self.compute_dtype, self.experts, self.half_dim
        p1 = constrain(lanes.up(x_btd, self.u1.kernel[...], self.u1.bias[...], e, cd), LANES_ACT)
        p2 = constrain(lanes.up(x_btd, self.u2.kernel[...], self.u2.bias[...], e, cd), LANES_ACT)
        top, bot = kernel_ops.mixer(impl, vertical=True)(p1, p2, g1, g2)

        def half(a, first, second, s_bet, bias):
            w = jnp.stack([getattr(self, first).kernel[...], getattr(self, second).kernel[...]]).reshape(2, e, m, -1)
            return lanes.down(a, w, cd) + jnp.einsum("bet,ed->btd", s_bet, bias[...].astype(cd))

        return jnp.concatenate([half(top, "v11", "v12", g1.sum(axis=1), self.b1),
                                half(bot, "v21", "v22", g2.sum(axis=1), self.b2)], axis=-1)


class HorizontalExperts(nnx.Module):
    """HD: expert ``(i, j)`` = bottom layer ``i`` (``u``) followed by top layer ``j`` (``v``, ``b``)."""

    def __init__(self, cfg: MonetConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d, e, m = cfg.hidden_size, cfg.moe_experts, cfg.moe_dim
        self.experts, self.dim, self.compute_dtype = e, m, compute_dtype
        kw = dict(std=cfg.initializer_range, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.u = Dense(d, e * m, axes=("embed", "expert_mlp"), use_bias=True, **kw)
        self.v = Dense(e * m, d, axes=("expert_mlp", "embed"), use_bias=False, **kw)
        self.b = param(jnp.zeros((e, d), param_dtype), ("experts", "embed"))
        self.moe_impl, self.sparse_k = cfg.moe_impl, dispatch.sparse_k(cfg.moe_sparse_k, cfg.moe_topk, e)

    def __call__(self, x_btd, g1_bthi, g2_bthj, deleted=None, lanes_probs=None):
        """``deleted``: optional ``[E, E]`` 0/1 matrix; those composed experts contribute nothing.
        ``lanes_probs``: ``(g1, g2)`` already in the lane-dense layout (made once per routing group)."""
        b, t, _ = x_btd.shape
        cd = self.compute_dtype
        if deleted is None:
            if (impl := _impl(self, b * t, g1_bthi)) == "sparse":
                w = _weights(self, "u", "v", "b")
                return kernel_ops.horizontal_sparse(x_btd, w, g1_bthi, g2_bthj, compute_dtype=cd, k=self.sparse_k)
            g1, g2 = lanes_probs or _to_lanes(g1_bthi, g2_bthj, cd)
            p = constrain(lanes.up(x_btd, self.u.kernel[...], self.u.bias[...], self.experts, cd), LANES_ACT)
            z = kernel_ops.mixer(impl, vertical=False)(p, g1, g2)
            w = self.v.kernel[...].reshape(self.experts, self.dim, -1)
            return lanes.down(z, w, cd) + jnp.einsum("bet,ed->btd", g2.sum(axis=1), self.b[...].astype(cd))
        _masked(self)
        g1, g2 = g1_bthi.astype(cd), g2_bthj.astype(cd)
        x_btim = constrain(relu2(self.u(x_btd)).reshape(b, t, self.experts, self.dim), EXPERT_ACT)
        y_bthm = jnp.einsum("btim,bthi->bthm", x_btim, g1)
        z_btjm = constrain(jnp.einsum("bthm,bthj->btjm", y_bthm, g2), EXPERT_ACT)
        d_ij = deleted.astype(cd)
        z_btjm = z_btjm - deleted_units(x_btim, g1, g2, d_ij)
        s2_btj = g2.sum(axis=2) - deleted_weight(g1, g2, d_ij)
        return self.v(z_btjm.reshape(b, t, -1)) + jnp.einsum("btj,jd->btd", s2_btj, self.b[...].astype(cd))


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


def _impl(layer, tokens: int, g_bthe) -> str:
    """The ``moe_impl`` of this call: ``xla``, ``pallas`` or ``sparse`` (``kernels.dispatch``)."""
    if layer.moe_impl == "xla":
        return "xla"
    return dispatch.choose(layer.moe_impl, tokens, g_bthe.shape[2], layer.experts, layer.sparse_k)


def _to_lanes(g1_bthi, g2_bthj, dtype):
    return lanes.probs_to_lanes(g1_bthi, dtype), lanes.probs_to_lanes(g2_bthj, dtype)


def _masked(layer) -> None:
    """An expert deletion mask runs on the ``[b, t, E, m]`` einsums of DESIGN section 1."""
    if layer.moe_impl != "xla":
        dispatch.warn_once(f"moe_impl={layer.moe_impl}: expert deletion masks run on the XLA einsum path")


def _weights(layer, *names) -> dict:
    """A layer's weights as arrays for ``kernels.ops``: ``{name}`` kernels and ``{name}_bias`` biases."""
    w = {}
    for name in names:
        v = getattr(layer, name)
        if isinstance(v, Dense):
            w[name] = v.kernel[...]
            if v.bias is not None:
                w[f"{name}_bias"] = v.bias[...]
        else:
            w[name] = v[...]
    return w


def make_experts(cfg: MonetConfig, **kw):
    return {"vertical": VerticalExperts, "horizontal": HorizontalExperts}[cfg.moe_decompose](cfg, **kw)
