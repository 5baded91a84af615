"""Inference entry points as pure functions of a model split once, and what eval.py scores by default."""

import numpy as np
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.data.sources import open_documents
from monet_jax.data.tokenizer import load_tokenizer
from monet_jax.eval.corpus import perplexity
from monet_jax.eval.main import held_out_documents
from monet_jax.eval.main import main as eval_main
from monet_jax.model.pure import PureModel

CFG = MonetConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, moe_dim=4, moe_heads=2, moe_experts=16, moe_topk=3,
                  moe_groups=2, torch_dtype="float32")


def _last_logits(model, ids_bt):
    return model(ids_bt).logits[:, -1]


def test_calls_after_the_first_never_touch_the_module_graph(monkeypatch):
    """After compilation a call passes the split state's leaves to ``jax.jit``: NNX's split, merge and
    graph walk are not run again, which is where ``nnx.jit`` spends its per-call time."""
    model = MonetForCausalLM(CFG, rngs=nnx.Rngs(0))
    ids = np.array([[1, 5, 7, 9]], np.int32)
    want = np.asarray(model(ids).logits)[:, -1]
    call = PureModel(model).jit(_last_logits)
    np.testing.assert_allclose(np.asarray(call(ids)), want, atol=1e-5, rtol=1e-5)

    def fail(*a, **k):
        raise AssertionError("the module graph was walked on a call")

    for name in ("split", "merge", "state", "graphdef"):
        monkeypatch.setattr(nnx, name, fail)
    monkeypatch.setattr(nnx.graph, "flatten", fail)
    monkeypatch.setattr(nnx.graph, "unflatten", fail)
    for _ in range(3):
        np.testing.assert_allclose(np.asarray(call(ids)), want, atol=1e-5, rtol=1e-5)


def test_perplexity_without_data_scores_the_held_out_documents(tmp_path, capsys):
    """The default training run (seed 0, val_fraction 0.05) holds out these documents of the embedded
    corpus: those whose key's hash with the seed falls below 0.05; ``eval.py perplexity`` without ``--data``
    scores exactly them."""
    import hashlib

    from monet_jax.data.text import embedded_documents

    docs = open_documents(None, "auto", "text")
    keys = [k for k, _ in embedded_documents()]
    u = [int.from_bytes(hashlib.blake2b(f"0:{k}".encode(), digest_size=8).digest(), "big") / 2**64 for k in keys]
    held = [i for i, x in enumerate(u) if x < 0.05] or [int(np.argmin(u))]
    assert held_out_documents() == [docs[int(i)] for i in held]
    MonetForCausalLM(CFG, rngs=nnx.Rngs(0)).save_checkpoint(tmp_path / "ckpt")
    assert eval_main(["perplexity", str(tmp_path / "ckpt"), "--max-batches", "2", "--seq-len", "32"]) == 0
    printed = capsys.readouterr().out
    model = MonetForCausalLM.from_pretrained(tmp_path / "ckpt")
    r = perplexity(model, load_tokenizer("byte"), [docs[int(i)] for i in held], seq_len=32, max_batches=2,
                   progress=False)
    assert f"loss {r['loss']:.4f}" in printed and f"tokens {r['tokens']:,}" in printed


def test_cpu_matrix_products_go_through_onednn_and_match_xla(monkeypatch):
    """On an Intel x86 CPU, forward passes over many tokens compile each matrix product as a oneDNN call
    (``ONEDNN_DOTS``), calls of few tokens (decoding steps) as Eigen's (``EIGEN_DOTS``: no YNNPACK fusion); on
    another vendor's, XLA's default; ``MONET_JAX_CPU_DOT`` forces one. All give the same logits."""
    import platform

    import jax
    import pytest

    from monet_jax.model import pure as pure_module
    from monet_jax.model.pure import EIGEN_DOTS, ONEDNN_DOTS, ONEDNN_MIN_ROWS, cpu_compiler_options

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("oneDNN products are used on x86 CPUs only")
    assert pure_module.cpu_vendor() in ("GenuineIntel", "AuthenticAMD", "")
    monkeypatch.setattr(pure_module, "cpu_vendor", lambda: "GenuineIntel")
    assert cpu_compiler_options(None) == ONEDNN_DOTS == cpu_compiler_options(ONEDNN_MIN_ROWS)
    assert cpu_compiler_options(8) == EIGEN_DOTS == cpu_compiler_options(ONEDNN_MIN_ROWS - 1)
    monkeypatch.setattr(pure_module, "cpu_vendor", lambda: "AuthenticAMD")
    assert cpu_compiler_options(None) is None and cpu_compiler_options(8) is None
    monkeypatch.setenv("MONET_JAX_CPU_DOT", "onednn")
    assert cpu_compiler_options(1) == ONEDNN_DOTS
    monkeypatch.setenv("MONET_JAX_CPU_DOT", "eigen")
    assert cpu_compiler_options(None) == EIGEN_DOTS
    monkeypatch.setenv("MONET_JAX_CPU_DOT", "xla")
    assert cpu_compiler_options(1) is None
    monkeypatch.setenv("MONET_JAX_CPU_DOT", "fast")
    with pytest.raises(ValueError, match="MONET_JAX_CPU_DOT must be one of auto, onednn, eigen, xla, got 'fast'"):
        cpu_compiler_options()
    monkeypatch.setenv("MONET_JAX_CPU_DOT", "onednn")

    model = MonetForCausalLM(CFG, rngs=nnx.Rngs(1))
    ids = np.random.default_rng(0).integers(3, 300, (2, 24)).astype(np.int32)
    pure = PureModel(model)
    with_dnn = np.asarray(pure.jit(_last_logits)(ids))
    compiled = jax.jit(lambda leaves, x: _last_logits(nnx.merge(pure.graphdef, jax.tree.unflatten(pure.treedef,
                                                                                                    leaves)), x))
    lowered = compiled.lower(pure.leaves, ids)
    assert "onednn" in lowered.compile(compiler_options=ONEDNN_DOTS).as_text()
    assert "ynn_fusion" in lowered.compile().as_text()
    assert "ynn_fusion" not in lowered.compile(compiler_options=EIGEN_DOTS).as_text()
    for dots in ("xla", "eigen", "auto"):
        monkeypatch.setenv("MONET_JAX_CPU_DOT", dots)
        np.testing.assert_allclose(with_dnn, np.asarray(pure.jit(_last_logits)(ids)), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(with_dnn, np.asarray(model(ids).logits)[:, -1], atol=2e-5, rtol=2e-5)
