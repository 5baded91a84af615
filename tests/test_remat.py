"""Remat policies: ``dots`` keeps the products' outputs and recomputes the rest, with the same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.model.transformer import layer_policy
from tests.conftest import tiny_config


def loss_and_grads(remat: str, scan: bool):
    cfg = MonetConfig.from_hf_dict(tiny_config(), remat=remat, scan_groups=scan)
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
    model.train()
    ids = np.random.default_rng(0).integers(0, 96, (2, 16)).astype(np.int32)

    def loss(m):
        return (m(ids).logits * jnp.cos(jnp.arange(96))).mean()

    value, grads = nnx.value_and_grad(loss)(model)
    return float(value), jax.tree.leaves(nnx.to_pure_dict(grads))


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_dots_policy_gives_the_same_gradients(scan):
    want_loss, want = loss_and_grads("none", scan)
    for remat in ("layer", "dots"):
        got_loss, got = loss_and_grads(remat, scan)
        assert got_loss == pytest.approx(want_loss, rel=1e-6)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6 * max(1.0, np.abs(w).max()), rtol=1e-5)


def test_dots_policy_keeps_projections_not_batched_products():
    """The policy saves a plain projection's output and the named attention output, not a batched product
    (the attention scores') nor elementwise work."""
    policy = layer_policy("dots")
    assert layer_policy("layer") is None and layer_policy("none") is None

    def f(x, w, s):
        h = x @ w                                                     # a projection: saved
        a = jnp.einsum("bqd,bkd->bqk", h, h)                          # batched (scores): recomputed
        return jnp.sum(jnp.tanh(a) @ s) + jnp.sum(jax.ad_checkpoint.checkpoint_name(jnp.sin(h), "attention_out"))

    x, w, s = jnp.ones((2, 4, 8)), jnp.ones((8, 8)), jnp.ones((4, 3))
    _, f_jvp = jax.linearize(jax.checkpoint(f, policy=policy), x, w, s)  # its leaves: the saved residuals
    shapes = [tuple(r.shape) for r in jax.tree.leaves(f_jvp)]
    assert shapes.count((2, 4, 8)) == 2 and (2, 4, 4) not in shapes  # h and sin(h); not the scores
    _, f_jvp = jax.linearize(jax.checkpoint(f), x, w, s)  # nothing saved: only the inputs
    assert [tuple(r.shape) for r in jax.tree.leaves(f_jvp)].count((2, 4, 8)) <= 1  # x itself at most, not h
    assert MonetConfig(remat="dots").remat == "dots"
