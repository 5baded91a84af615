"""Generation with the key/value cache against full recomputation, and the samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.eval.generate import Sampling, generate, sample
from monet_jax.eval.main import main as eval_main


def tiny_model(**over) -> MonetForCausalLM:
    cfg = MonetConfig(**{**dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64, moe_dim=4, moe_heads=2,
                                moe_experts=16, moe_topk=3, moe_groups=2, torch_dtype="float32"), **over})
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(5))
    norm = model.model.layers[0].router.norm1 if cfg.is_moe else None
    if norm is not None:  # non-trivial running statistics, as a trained model has
        norm.running_mean[...] = jnp.array([0.3, -0.2])
        norm.running_var[...] = jnp.array([1.5, 0.7])
    return model


@pytest.mark.parametrize("over", [{}, {"moe_decompose": "horizontal"},
                                  {"moe_decompose": "none", "hidden_act": "silu", "intermediate_size": 48}])
def test_cached_generation_equals_full_recomputation(over):
    model = tiny_model(**over)
    prompts = [[1, 5, 9, 13, 17, 21, 25], [1, 40, 41], [1, 7, 7, 7, 7]]
    res = generate(model, prompts, max_new_tokens=8, eos_id=None, return_logits=True)
    for row, (prompt, new) in enumerate(zip(prompts, res["tokens"], strict=True)):
        assert len(new) == 8
        for n in range(8):
            # Recompute from scratch on the unpadded sequence so far; the cached logits must agree.
            seq = np.array([prompt + new[:n]], np.int32)
            full = np.asarray(model(seq).logits)[0, -1]
            np.testing.assert_allclose(res["logits"][row, n], full, atol=2e-5, rtol=1e-5)
            assert new[n] == int(np.argmax(full))


def test_eos_stops_a_row_and_pads_the_rest():
    model = tiny_model()
    first = generate(model, [[1, 3, 4]], max_new_tokens=6, eos_id=None)["tokens"][0]
    eos = first[2]  # make the third greedy token the end of sequence
    res = generate(model, [[1, 3, 4], [1, 3, 4]], max_new_tokens=6, eos_id=eos)
    cut = first.index(eos) + 1
    assert res["tokens"] == [first[:cut], first[:cut]]


def test_samplers():
    logits = jnp.array([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    key = jax.random.key(0)
    greedy = np.asarray(sample(logits, key, Sampling()))
    assert greedy.tolist() == [1, 0]
    assert np.asarray(sample(logits, key, Sampling(temperature=1.0, top_k=1))).tolist() == [1, 0]
    assert np.asarray(sample(logits, key, Sampling(temperature=1.0, top_p=1e-6))).tolist() == [1, 0]
    # top-k 2 only ever yields the two best tokens; frequencies follow the renormalized softmax.
    keys = jax.random.split(key, 4000)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, Sampling(temperature=1.0, top_k=2)))(keys))
    assert set(np.unique(draws[:, 0])) == {1, 3} and set(np.unique(draws[:, 1])) == {0, 3}
    p = np.exp(3.0) / (np.exp(3.0) + np.exp(2.0))
    assert abs(np.mean(draws[:, 0] == 1) - p) < 0.03
    # top-p 0.7 on row 0 (probs .64 .24 .09 .03) keeps tokens 1 and 3.
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, Sampling(temperature=1.0, top_p=0.7)))(keys))
    assert set(np.unique(draws[:, 0])) == {1, 3}


def test_generate_cli(tmp_path, capsys):
    cfg = MonetConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=128, moe_dim=4, moe_heads=2, moe_experts=16, moe_topk=3,
                      moe_groups=2, torch_dtype="float32")
    MonetForCausalLM(cfg, rngs=nnx.Rngs(0)).save_checkpoint(tmp_path / "ckpt")
    args = ["generate", str(tmp_path / "ckpt"), "--prompt", "Hello", "--prompt", "def f(x):",
            "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "20", "--seed", "1"]
    assert eval_main(args) == 0
    out = capsys.readouterr().out
    assert out.count("--- prompt") == 2 and "tokens/s" in out
    assert eval_main(args) == 0
    texts = [[line for line in o.splitlines() if "tokens/s" not in line] for o in (out, capsys.readouterr().out)]
    assert texts[0] == texts[1]  # the same seed samples the same text
