"""The expert microscope: per-token composed-expert scores against brute force over all E x E pairs."""

import numpy as np
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.data.tokenizer import load_tokenizer
from monet_jax.eval.main import main as eval_main
from monet_jax.experts.microscope import composed_scores, token_routing


def brute_force(g1_he, g2_he):
    s = np.einsum("hi,hj->ij", g1_he.astype(np.float64), g2_he.astype(np.float64))
    ids = np.flatnonzero(s)  # row-major: i * E + j
    return dict(zip(ids.tolist(), s.ravel()[ids].tolist(), strict=True))


def test_composed_scores_equal_the_full_table():
    rng = np.random.default_rng(0)
    h, e = 3, 12
    g = rng.random((2, h, e)) * (rng.random((2, h, e)) < 0.3)
    g[1, 2] = 0.0  # a head with no active expert on one side contributes nothing
    r = composed_scores(g[0].astype(np.float32), g[1].astype(np.float32))
    want = brute_force(g[0], g[1])
    assert dict(zip(r.expert_ids.tolist(), r.scores.tolist(), strict=True)).keys() == want.keys()
    np.testing.assert_allclose(r.scores, [want[i] for i in r.expert_ids.tolist()], rtol=1e-6)
    assert np.all(np.diff(r.scores) <= 0)  # highest first


def test_token_routing_of_a_model_and_the_cli(tmp_path, capsys):
    cfg = MonetConfig(vocab_size=300, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      max_position_embeddings=64, moe_dim=4, moe_heads=2, moe_experts=16, moe_topk=3,
                      moe_groups=2, torch_dtype="float32")
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = np.array([1, *load_tokenizer("byte").encode("Hi!")], np.int32)
    routing = token_routing(model, ids)
    probs = model(ids[None], output_router_probs=True).router_probs
    assert len(routing) == 4 and all(len(groups) == 2 for groups in routing)
    for t in range(4):
        for g, (g1, g2) in enumerate(probs):
            want = brute_force(np.asarray(g1)[0, t], np.asarray(g2)[0, t])
            got = routing[t][g]
            assert sorted(got.expert_ids.tolist()) == sorted(want)
            # each head's probabilities sum to one on both sides, so the scores sum to H
            np.testing.assert_allclose(got.scores.sum(), cfg.moe_heads, rtol=1e-5)
    model.save_checkpoint(tmp_path / "ckpt")
    assert eval_main(["experts", "tokens", str(tmp_path / "ckpt"), "--text", "Hi!", "--top", "2"]) == 0
    tokenizer_line, *lines = capsys.readouterr().out.strip().splitlines()
    assert tokenizer_line.startswith("tokenizer: byte (259 ids)")
    assert lines[0].startswith("composed expert id = i * 16 + j") and len(lines) == 5
    top = routing[1][0]
    assert f"top {top.expert_ids[0]}:{top.scores[0]:.3f}, {top.expert_ids[1]}:{top.scores[1]:.3f}" in lines[2]
