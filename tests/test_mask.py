"""Masked inference: deleting composed experts equals brute-force enumeration of all E x E experts."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.experts.mask import ExpertMask, apply_mask, load_mask
from monet_jax.model.experts import HorizontalExperts, VerticalExperts


def tiny(decompose="vertical", **kw):
    base = dict(vocab_size=300, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                max_position_embeddings=64, moe_dim=4, moe_heads=3, moe_experts=6, moe_topk=2, moe_groups=2,
                moe_decompose=decompose, torch_dtype="float32")
    return MonetConfig(**{**base, **kw})


def relu2(x):
    return np.maximum(x, 0.0) ** 2


def sparse_probs(rng, b, t, h, e):
    """Random routing probabilities with exact zeros, like the router's."""
    z = rng.normal(size=(b, t, h, e))
    keep = rng.random((b, t, h, e)) < 0.5
    keep[..., 0] = True
    p = np.where(keep, np.exp(z), 0.0)
    return p / p.sum(-1, keepdims=True)


def brute_force(layer, kind, x, g1, g2, deleted):
    """Sum over every composed expert (i, j) of (1 - D_ij) * (sum_h g1_hi g2_hj) * E_ij(x), in float64."""
    w = lambda a: np.asarray(a[...], np.float64)
    e = g1.shape[-1]
    score = np.einsum("bthi,bthj->btij", g1, g2) * (1.0 - deleted)
    if kind == "vertical":
        m = layer.u1.kernel.shape[1] // e
        x1 = relu2(x @ w(layer.u1.kernel) + w(layer.u1.bias)).reshape(*x.shape[:2], e, m)
        x2 = relu2(x @ w(layer.u2.kernel) + w(layer.u2.bias)).reshape(*x.shape[:2], e, m)
        blocks = {n: w(getattr(layer, n).kernel).reshape(e, m, -1) for n in ("v11", "v12", "v21", "v22")}
        # E_ij = [V11_i x1_i + V12_i x2_j + b1_i,  V21_j x1_i + V22_j x2_j + b2_j]
        top = (np.einsum("btim,imd->btid", x1, blocks["v11"])[:, :, :, None]
               + np.einsum("btjm,imd->btijd", x2, blocks["v12"]) + w(layer.b1)[None, None, :, None])
        bottom = (np.einsum("btim,jmd->btijd", x1, blocks["v21"])
                  + np.einsum("btjm,jmd->btjd", x2, blocks["v22"])[:, :, None] + w(layer.b2)[None, None, None])
        out = np.concatenate([np.broadcast_to(top, bottom.shape), bottom], axis=-1)
    else:
        m = layer.u.kernel.shape[1] // e
        xs = relu2(x @ w(layer.u.kernel) + w(layer.u.bias)).reshape(*x.shape[:2], e, m)
        v = w(layer.v.kernel).reshape(e, m, -1)
        out = np.einsum("btim,jmd->btijd", xs, v) + w(layer.b)[None, None, None]  # E_ij = V_j x_i + b_j
    return np.einsum("btij,btijd->btd", score, out)


@pytest.mark.parametrize("kind", ["vertical", "horizontal"])
def test_masked_layer_equals_brute_force(kind):
    cfg = tiny(kind)
    cls = VerticalExperts if kind == "vertical" else HorizontalExperts
    layer = cls(cfg, param_dtype=jnp.float32, compute_dtype=jnp.float32, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    for name, var in nnx.to_flat_state(nnx.state(layer)):
        if name[-1] in ("bias", "b", "b1", "b2"):  # biases start at zero: make them count
            var.set_value(jnp.asarray(rng.normal(size=var.shape) * 0.1, jnp.float32))
    x = rng.normal(size=(2, 5, cfg.hidden_size))
    g1, g2 = (sparse_probs(rng, 2, 5, cfg.moe_heads, cfg.moe_experts) for _ in range(2))
    deleted = (rng.random((6, 6)) < 0.3).astype(np.float64)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    for d in (np.zeros((6, 6)), deleted, np.ones((6, 6))):
        got = np.asarray(layer(f32(x), f32(g1), f32(g2), deleted=f32(d)))
        np.testing.assert_allclose(got, brute_force(layer, kind, x, g1, g2, d), rtol=1e-5, atol=1e-5)
    # no mask: the plain path also equals the full enumeration
    np.testing.assert_allclose(np.asarray(layer(f32(x), f32(g1), f32(g2))),
                               brute_force(layer, kind, x, g1, g2, np.zeros((6, 6))), rtol=1e-5, atol=1e-5)


def ids_of(pairs, e):
    return [i * e + j for i, j in pairs]


@pytest.mark.parametrize("kind", ["vertical", "horizontal"])
def test_masked_model_equals_model_with_those_experts_removed(kind):
    """Deleting all E*E experts of group 1 equals zeroing that group's expert output weights; an empty mask
    changes nothing; removing the mask restores the model."""
    cfg = tiny(kind)
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(1).integers(3, 300, size=(2, 9)).astype(np.int32)
    plain = np.asarray(model(ids).logits)
    e = cfg.moe_experts
    apply_mask(model, ExpertMask(e, [[], []]))
    np.testing.assert_array_equal(np.asarray(model(ids).logits), plain)
    apply_mask(model, ExpertMask(e, [[], np.arange(e * e)]))
    masked = np.asarray(model(ids).logits)

    zeroed = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
    for layer in zeroed.model.routing_groups()[1]:
        for name in ("v11", "v12", "v21", "v22", "v"):
            if hasattr(layer.moe, name):
                getattr(layer.moe, name).kernel[...] = 0.0
    np.testing.assert_allclose(masked, np.asarray(zeroed(ids).logits), rtol=1e-5, atol=1e-5)
    assert np.abs(masked - plain).max() > 1e-3
    apply_mask(model, None)
    np.testing.assert_array_equal(np.asarray(model(ids).logits), plain)
    # the mask is never part of what is saved
    apply_mask(model, ExpertMask(e, [ids_of([(0, 1)], e), []]))
    assert not any("deleted" in k for k in model.flat_state())


def test_mask_file_round_trip_and_errors(tmp_path):
    m = ExpertMask(6, [[5, 1, 5], [35]], {"rule": "test"})
    assert m.groups[0].tolist() == [1, 5] and m.count == 3
    back = ExpertMask.load(m.save(tmp_path / "m.json"))
    assert [g.tolist() for g in back.groups] == [[1, 5], [35]] and back.meta == {"rule": "test"}
    assert back.matrix(0)[0, 1] == 1 and back.matrix(0)[0, 5] == 1 and back.matrix(0).sum() == 2
    assert [g.tolist() for g in m.union(ExpertMask(6, [[2], []])).groups] == [[1, 2, 5], [35]]
    with pytest.raises(ValueError, match="ids must lie in"):
        ExpertMask(6, [[36]])
    with pytest.raises(ValueError, match="no such file"):
        ExpertMask.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a monet-expert-mask file"):
        ExpertMask.load(tmp_path / "bad.json")
    model = MonetForCausalLM(tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expert mask is for 1 routing groups of 6 experts, the model has 2 of 6"):
        apply_mask(model, ExpertMask(6, [[1]]))
    assert load_mask(model, None) is model
