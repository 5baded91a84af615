"""Generation with the key/value cache against full recomputation, and the samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.eval import generate as gen
from monet_jax.eval.generate import Sampling, generate, sample
from monet_jax.eval.main import main as eval_main
from monet_jax.kernels import dispatch
from monet_jax.model.pure import PureModel


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
        # Recompute from scratch on the unpadded sequence (causal: position len(prompt) + n - 1 sees exactly
        # the sequence before new token n); the cached logits must agree.
        full = np.asarray(model(np.array([prompt + new], np.int32)).logits)[0, len(prompt) - 1:-1]
        for n in range(8):
            np.testing.assert_allclose(res["logits"][row, n], full[n], atol=2e-5, rtol=1e-5)
            assert new[n] == int(np.argmax(full[n]))


def test_seeded_sampling_equals_full_recomputation():
    """Each sampled token is the draw of step n's key (fold_in(seed key, n)) from the logits of the whole
    sequence so far recomputed without a cache; rows of different lengths share the batch."""
    model = tiny_model(moe_decompose="horizontal")
    s = Sampling(temperature=0.9, top_k=12, top_p=0.9)
    prompts = [[1, 5, 9, 13, 17], [1, 40]]
    res = generate(model, prompts, max_new_tokens=6, eos_id=None, sampling=s, seed=3, return_logits=True)
    key = jax.random.key(3)
    greedy = True
    for row, (prompt, new) in enumerate(zip(prompts, res["tokens"], strict=True)):
        # From scratch on the unpadded sequence (causal: position len(prompt) + n - 1 sees exactly the
        # sequence before new token n).
        full = np.asarray(model(np.array([prompt + new], np.int32)).logits)[0, len(prompt) - 1:-1]
        for n in range(6):
            np.testing.assert_allclose(res["logits"][row, n], full[n], atol=2e-5, rtol=1e-5)
            draw = sample(jnp.asarray(np.stack([full[n]] * len(prompts))), jax.random.fold_in(key, n), s)
            assert new[n] == int(draw[row])
            greedy &= new[n] == int(np.argmax(full[n]))
    assert not greedy  # the draws are not all the argmax


def test_eos_stops_rows_independently():
    model = tiny_model()
    prompts = [[1, 3, 4], [1, 50, 51, 52]]
    free = generate(model, prompts, max_new_tokens=8, eos_id=None)["tokens"]
    # an eos that row 0 draws at step 2 or later and row 1 never draws
    eos = next(t for t in free[0][2:] if t not in free[1])
    res = generate(model, prompts, max_new_tokens=8, eos_id=eos)
    assert res["tokens"] == [free[0][:free[0].index(eos) + 1], free[1]]
    # a row that stops early does not stop the others; all stopping ends the loop
    both = generate(model, [prompts[0], prompts[0]], max_new_tokens=8, eos_id=eos)["tokens"]
    assert both == [free[0][:free[0].index(eos) + 1]] * 2


def test_buckets_reuse_compilations_and_keep_results():
    """Prompt lengths within a power-of-two bucket reuse the compiled prefill and loop; a prompt decoded
    alone or beside a longer one (another bucket, more left padding) gets the same tokens and logits."""
    model = tiny_model()
    pure = PureModel(model)
    alone = generate(model, [[1, 8, 9]], max_new_tokens=5, eos_id=None, return_logits=True, pure=pure)
    prefill = pure.jit(gen._prefill, static_argnums=(3, 4, 5))
    decode = pure.jit(gen._decode, static_argnums=(3, 4), donate_argnums=(0,))
    compiled = prefill.func._cache_size(), decode.func._cache_size()
    for prompt in ([1, 2, 3, 4, 5, 6], [1, 7, 7, 7, 7, 7, 7, 7], [1, 8]):  # 2 to 8 tokens: one bucket
        generate(model, [prompt], max_new_tokens=5, eos_id=None, return_logits=True, pure=pure)
    assert (prefill.func._cache_size(), decode.func._cache_size()) == compiled
    mixed = generate(model, [[1, 8, 9], list(range(1, 21))], max_new_tokens=9, eos_id=None, return_logits=True)
    assert mixed["tokens"][0][:5] == alone["tokens"][0]
    np.testing.assert_allclose(mixed["logits"][0, :5], alone["logits"][0], atol=2e-5, rtol=1e-5)


def test_streamed_chunks_equal_one_call():
    model = tiny_model()
    whole = generate(model, [[1, 3, 4], [1, 9]], max_new_tokens=7, eos_id=None)["tokens"]
    seen = []
    streamed = generate(model, [[1, 3, 4], [1, 9]], max_new_tokens=7, eos_id=None, chunk=3,
                        on_tokens=lambda t: seen.append(t.tolist()))
    assert streamed["tokens"] == whole
    assert [len(s[0]) for s in seen] == [1, 2, 5, 7]  # first token, the compiling step, then chunks of 3
    assert seen[-1] == whole


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
    one = args[:3] + args[5:]  # the first prompt alone
    assert eval_main(one) == 0
    whole = capsys.readouterr().out
    assert eval_main(one + ["--stream", "2"]) == 0
    streamed = capsys.readouterr().out
    assert [x for x in streamed.splitlines() if "tokens/s" not in x] == [x for x in whole.splitlines()
                                                                          if "tokens/s" not in x]


@pytest.mark.parametrize("b", [1, 2])
def test_decoding_loop_updates_the_cache_in_place(b):
    """The compiled decoding loop writes each step's keys and values into the donated cache without copying
    it: no ``copy`` in its optimized program produces a cache-shaped array (with rows and KV heads as
    separate axes XLA wrote each update twice and copied the whole cache three times a step at batch 1)."""
    model = tiny_model(moe_decompose="horizontal")
    pure = PureModel(model)
    p, new = 8, 8
    fixed = gen._Fixed(jnp.ones((b, p + new), bool), jax.random.key(0), jnp.int32(-1), jnp.int32(0),
                       jnp.zeros((b,), bool))
    ids = jnp.ones((b, p), jnp.int32)
    positions = jnp.tile(jnp.arange(p, dtype=jnp.int32), (b, 1))
    state = pure.jit(gen._prefill, static_argnums=(3, 4, 5))(ids, positions, fixed, new, Sampling(), False)
    cache_shape = state.cache[0][0].shape
    assert cache_shape == (b * model.config.kv_heads, p + new, model.config.head_size)
    decode = pure.jit(gen._decode, static_argnums=(3, 4), donate_argnums=(0,), rows=b)
    text = decode.func.lower(decode.args[0], state, fixed, jnp.int32(new), Sampling(), False).compile().as_text()
    shape = "f32[" + ",".join(map(str, cache_shape)) + "]"
    copies = [line for line in text.splitlines() if " copy(" in line and f"= {shape}" in line]
    assert "while" in text and not copies, copies


def test_a_gpu_decodes_a_single_prompt_on_one_row_without_strength_reduction(monkeypatch):
    """On a GPU a batch of one runs as one row, compiled with XLA's rewrite of one-row products (into an
    elementwise ``x * W`` summed) off, and the dense expert path: same tokens and logits as on the CPU."""
    model = tiny_model(moe_impl="auto")
    one = generate(model, [[1, 8, 9]], max_new_tokens=6, eos_id=None, return_logits=True)
    rows, jit = [], PureModel.jit

    def spy(self, fn, **kw):
        rows.append((fn.__name__, kw.get("rows"), dispatch.decode_compiler_options()))
        return jit(self, fn, **kw)

    monkeypatch.setattr(PureModel, "jit", spy)
    monkeypatch.setattr(dispatch, "target_platform", lambda: "gpu")
    assert gen.least_rows() == 1
    two = generate(model, [[1, 8, 9]], max_new_tokens=6, eos_id=None, return_logits=True)
    off = {"xla_disable_hlo_passes": "dot-strength-reduction"}
    assert rows == [("_prefill", 8, off), ("_decode", 1, off)]  # the prompt's bucket is 8 tokens
    assert two["tokens"] == one["tokens"] and two["logits"].shape == one["logits"].shape == (1, 6, 64)
    np.testing.assert_allclose(two["logits"], one["logits"], atol=2e-5, rtol=1e-5)
