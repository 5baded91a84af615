"""Logits and router probabilities of checkpoints written by the independent PyTorch reference."""

import numpy as np
import pytest
import torch

from monet_jax import MonetForCausalLM
from tests.conftest import LAYOUTS

TOL = 1e-4


def _ids(vocab, b=2, t=11, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(b, t), dtype=np.int32)


def _compare(directory, ref, ids, attention_mask=None, keep=None):
    model = MonetForCausalLM.from_pretrained(directory)
    out = model(ids, attention_mask=attention_mask, output_router_probs=True)
    with torch.no_grad():
        mask = None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask))
        want_logits, want_probs = ref(torch.from_numpy(ids).long(), mask)
    keep = np.ones(ids.shape, bool) if keep is None else keep
    got = np.asarray(out.logits)
    np.testing.assert_array_less(np.abs(got - want_logits.numpy())[keep].max(), TOL)
    assert len(out.router_probs) == len(want_probs)
    for (g1, g2), (w1, w2) in zip(out.router_probs, want_probs):
        for g, w in ((g1, w1), (g2, w2)):
            g, w = np.asarray(g), w.numpy()
            assert g.dtype == np.float32
            np.testing.assert_array_less(np.abs(g - w)[keep].max(), TOL)
            # Exactly the same experts are selected, and more than one of them for some tokens.
            np.testing.assert_array_equal((g > 0)[keep], (w > 0)[keep])
    return out, model


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("decompose", ["vertical", "horizontal"])
def test_parity_every_layout(reference_checkpoint, layout, decompose):
    directory, ref = reference_checkpoint(layout, moe_decompose=decompose)
    out, _ = _compare(directory, ref, _ids(96))
    counts = (np.asarray(out.router_probs[0][0]) > 0).sum(-1)
    assert counts.max() > 1, "the test checkpoint should route to several experts per head"


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("decompose", ["vertical", "horizontal"])
def test_parity_routing_groups(reference_checkpoint, groups, decompose):
    directory, ref = reference_checkpoint(moe_groups=groups, moe_decompose=decompose, num_hidden_layers=5)
    out, _ = _compare(directory, ref, _ids(96, seed=1))
    assert len(out.router_probs) == len(range(0, 5, groups))


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_parity_gqa_and_mha(reference_checkpoint, kv_heads):
    directory, ref = reference_checkpoint(num_key_value_heads=kv_heads, seed=3)
    _compare(directory, ref, _ids(96, seed=2))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_parity_half_precision_checkpoints(reference_checkpoint, dtype):
    """A bf16/fp16 checkpoint loads losslessly into float32 parameters and computes like the reference."""
    directory, ref = reference_checkpoint("safetensors", dtype=dtype, moe_decompose="horizontal")
    _, model = _compare(directory, ref, _ids(96, seed=4))
    want = ref.model.layers[0].moe.u.weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(model.model.layers[0].moe.u.kernel[...]), want)


def test_parity_padding_mask(reference_checkpoint):
    directory, ref = reference_checkpoint(seed=5)
    ids = _ids(96, b=3, t=9, seed=5)
    mask = np.ones(ids.shape, np.int32)
    mask[0, 6:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    _compare(directory, ref, ids, attention_mask=mask, keep=mask.astype(bool))


def test_parity_dense_llama_baseline(reference_checkpoint):
    directory, ref = reference_checkpoint(model_type="llama", hidden_act="silu", intermediate_size=40,
                                          architectures=["LlamaForCausalLM"])
    out, model = _compare(directory, ref, _ids(96, seed=6))
    assert out.router_probs == ()
    assert model.config.moe_decompose == "none"


def test_training_mode_batchnorm_matches_pytorch(reference_checkpoint):
    """Batch statistics in the forward pass, running statistics updated like BatchNorm1d.train()."""
    directory, ref = reference_checkpoint(moe_groups=2, seed=7)
    model = MonetForCausalLM.from_pretrained(directory)
    model.train()
    ref.train()
    for step in range(2):  # two steps: the second starts from updated running statistics
        ids = _ids(96, b=3, t=8, seed=10 + step)
        out = model(ids, output_router_probs=True)
        with torch.no_grad():
            want_logits, want_probs = ref(torch.from_numpy(ids).long())
        np.testing.assert_array_less(np.abs(np.asarray(out.logits) - want_logits.numpy()).max(), TOL)
        for (g1, g2), (w1, w2) in zip(out.router_probs, want_probs):
            np.testing.assert_allclose(np.asarray(g1), w1.numpy(), atol=TOL)
            np.testing.assert_allclose(np.asarray(g2), w2.numpy(), atol=TOL)
    for layer in (0, 2):
        ours, theirs = model.model.layers[layer].router, ref.model.layers[layer].router
        for name in ("norm1", "norm2"):
            mine, bn = getattr(ours, name), getattr(theirs, name)
            for stat in ("running_mean", "running_var"):
                np.testing.assert_allclose(np.asarray(getattr(mine, stat)[...]), getattr(bn, stat).numpy(),
                                           rtol=1e-5, atol=1e-6)
            assert int(mine.num_batches_tracked[...]) == int(bn.num_batches_tracked) == 9
    # Back in inference mode the updated running statistics are used, as in PyTorch.
    model.eval()
    ref.eval()
    ids = _ids(96, seed=20)
    with torch.no_grad():
        want_logits, _ = ref(torch.from_numpy(ids).long())
    np.testing.assert_array_less(np.abs(np.asarray(model(ids).logits) - want_logits.numpy()).max(), TOL)
