"""Corpus statistics, selection rules, corpus perplexity and the experts CLI, against brute force."""

import json
import struct
import zlib

import jax
import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.data.tokenizer import load_tokenizer
from monet_jax.data.windows import document_tokens, rows
from monet_jax.eval.corpus import perplexity
from monet_jax.eval.main import main as eval_main
from monet_jax.experts.mask import ExpertMask
from monet_jax.experts.select import correlated_experts, domain_experts
from monet_jax.experts.stats import ExpertStats, corpus_stats
from monet_jax.experts.viewer import find_chromium

DOCS = ["Hello world, hello sun.", "def f(x):\n    return x * 2\n", "3 + 4 = 7; 12 - 5 = 7", "abc abc abc abc",
        "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def model():
    cfg = MonetConfig(vocab_size=260, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                      max_position_embeddings=64, moe_dim=4, moe_heads=2, moe_experts=8, moe_topk=2, moe_groups=2,
                      torch_dtype="float32")
    m = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
    for layer in m.model.layers:  # logits of order one, so several experts pass the threshold
        if layer.router is not None:
            for w in (layer.router.w1, layer.router.w2):
                w.kernel[...] = w.kernel[...] * 60.0
    return m


def brute_force_scores(model, docs):
    """Per routing group, every token's full E x E score table ``s_ij = sum_h g1_hi g2_hj`` (float64)."""
    tok = load_tokenizer("byte")
    out = None
    for d in docs:
        ids = np.array([tok.bos_id, *tok.encode(d)], np.int32)
        probs = model(ids[None], output_router_probs=True).router_probs
        tables = [np.einsum("thi,thj->tij", np.asarray(g1[0], np.float64), np.asarray(g2[0], np.float64))
                  for g1, g2 in probs]
        out = tables if out is None else [np.concatenate([a, b]) for a, b in zip(out, tables, strict=True)]
    return [t.reshape(t.shape[0], -1) for t in out]


def test_corpus_stats_equal_brute_force(model):
    tok = load_tokenizer("byte")
    y_doc = [0.9, 0.1, 0.5, 0.0, 0.3]
    y_doc[3] = list(np.linspace(0, 1, len(tok.encode(DOCS[3])) + 1))  # one number per token (bos first)
    model.eval()
    st = corpus_stats(model, tok, DOCS, seq_len=64, batch_size=2, token_scores=y_doc)
    tables = brute_force_scores(model, DOCS)
    y = np.concatenate([np.broadcast_to(np.asarray(v, float), (len(tok.encode(d)) + 1,))
                        for v, d in zip(y_doc, DOCS, strict=True)])
    assert st.tokens == y.size == tables[0].shape[0]
    for g, s in enumerate(tables):
        np.testing.assert_allclose(st.mass[g], s.sum(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(st.frequency[g], (s > 0).sum(0))
        np.testing.assert_allclose(st.square[g], (s**2).sum(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(st.weighted[g], (y[:, None] * s).sum(0), rtol=1e-5, atol=1e-7)
        varying = s.std(0) > 1e-6
        r = np.array([np.corrcoef(s[:, k], y)[0, 1] if varying[k] else 0.0 for k in range(s.shape[1])])
        np.testing.assert_allclose(st.pearson()[g], r, atol=1e-5)
        assert 2 < (s > 0).sum(1).mean() < 40  # several experts per token, not all: the frequency check has teeth
    # short windows: each token still counted once, and each token's scores sum to H
    short = corpus_stats(model, tok, DOCS, seq_len=6, batch_size=4)
    assert short.tokens == st.tokens
    np.testing.assert_allclose(short.mass.sum(-1), 2 * st.tokens, rtol=1e-5)


def test_rows_predict_every_token_once():
    docs = [np.arange(1, 12, dtype=np.int32), np.arange(20, 23, dtype=np.int32), np.array([5, 6], np.int32)]
    seen = {d: [] for d in range(3)}
    for b in rows(docs, seq_len=4, batch_size=2, pad_id=0):
        for r in range(b.ids.shape[0]):
            if b.doc[r] < 0:
                assert not b.valid[r].any()
                continue
            window = b.ids[r][b.valid[r]]
            np.testing.assert_array_equal(window, docs[b.doc[r]][b.start[r]:b.start[r] + window.size])
            seen[b.doc[r]] += (b.start[r] + np.flatnonzero(b.targets[r])).tolist()
    for d, toks in enumerate(docs):
        assert sorted(seen[d]) == list(range(1, toks.size))


def test_perplexity_equals_per_window_losses(model):
    tok = load_tokenizer("byte")
    model.eval()
    got = perplexity(model, tok, DOCS, seq_len=8, batch_size=3, progress=False)
    total, count = 0.0, 0
    for ids in document_tokens(tok, DOCS):
        for s in range(0, ids.size - 1, 7):
            w = ids[s:s + 8]
            logp = jax.nn.log_softmax(np.asarray(model(w[None]).logits[0], np.float64), axis=-1)
            total -= sum(float(logp[t, w[t + 1]]) for t in range(w.size - 1))
            count += w.size - 1
    assert got["tokens"] == count == sum(len(tok.encode(d)) for d in DOCS)
    np.testing.assert_allclose(got["loss"], total / count, rtol=1e-5)


def reference_domain_rule(means, ratio, min_mean):
    names = list(means)
    out = {n: [] for n in names}
    groups, n_exp = means[names[0]].shape
    for g in range(groups):
        for x in range(n_exp):
            vals = sorted(((float(means[n][g, x]), n) for n in names), reverse=True)
            (best, name), (second, _) = vals[0], vals[1]
            if best > min_mean and best >= ratio * second:
                out[name].append((g, x))
    return out


def test_domain_rule_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    means = {n: rng.random((2, 16)) * (rng.random((2, 16)) < 0.6) for n in ("prose", "code", "math")}
    means["math"][1, 3] = 0.4
    means["code"][1, 3], means["prose"][1, 3] = 0.2, 0.1  # exactly 2x the second: selected
    for ratio, min_mean in ((2.0, 0.0), (1.5, 0.3)):
        masks = domain_experts(means, ratio=ratio, min_mean=min_mean)
        want = reference_domain_rule(means, ratio, min_mean)
        for name, mask in masks.items():
            got = [(g, int(x)) for g, ids in enumerate(mask.groups) for x in ids]
            assert got == want[name]
    assert 3 in domain_experts(means)["math"].groups[1]
    with pytest.raises(ValueError, match="at least two domains"):
        domain_experts({"one": means["prose"]})
    r = np.array([[0.5, 0.1, -0.9, 0.21]])
    assert correlated_experts(r, 0.2).groups[0].tolist() == [0, 3]


def test_experts_cli_end_to_end(model, tmp_path, capsys):
    ckpt = model.save_checkpoint(tmp_path / "ckpt")
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["def f(x):\n    return x", "import os\nos.sep"]))
    prose = tmp_path / "prose.txt"
    prose.write_text("The sun is warm.\n\nBirds sing in the morning.")
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({"text": t, "tox": s}) + "\n" for t, s in zip(DOCS, [1, 0, 0.5, 0, 0.2],
                                                                                        strict=True)))
    run = lambda *a: eval_main([*map(str, a)])
    assert run("experts", "stats", ckpt, "--data", code, "--out", tmp_path / "st", "--top", "2") == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "st" / "contexts.json").read_text())
    assert len(report) == 4 and report[0]["contexts"] and "group 1:" in out
    c = report[0]["contexts"][0]
    assert c["score"] > 0 and c["token"] and report[0]["frequency"] > 0
    saved = ExpertStats.load(tmp_path / "st" / "stats.npz")
    assert saved.mass.shape == saved.frequency.shape == (2, 64) and saved.square is None
    assert saved.tokens == sum(len(t) + 1 for t in ["def f(x):\n    return x", "import os\nos.sep"])
    np.testing.assert_allclose(saved.mass.sum(-1), 2 * saved.tokens, rtol=1e-5)  # scores sum to H per token

    assert run("experts", "select-domain", ckpt, "--domain", f"code={code}", "--domain", f"prose={prose}",
               "--out", tmp_path / "masks") == 0
    mask = ExpertMask.load(tmp_path / "masks" / "code.json")
    assert mask.meta["domain"] == "code" and mask.count > 0 and "code:" in capsys.readouterr().out

    assert run("experts", "select-correlated", ckpt, "--data", scored, "--score-key", "tox", "--threshold", "0.1",
               "--out", tmp_path / "tox.json") == 0
    assert ExpertMask.load(tmp_path / "tox.json").meta["rule"] == "pearson"

    base = run("perplexity", ckpt, "--data", code)
    plain = capsys.readouterr().out
    assert base == 0 and run("perplexity", ckpt, "--data", code, "--mask", tmp_path / "masks" / "code.json") == 0
    masked = capsys.readouterr().out
    assert plain.split("loss ")[1].split()[0] != masked.split("loss ")[1].split()[0]  # the loss moved
    for args in (("generate", ckpt, "--prompt", "def", "--max-new-tokens", "3"),
                 ("experts", "tokens", ckpt, "--text", "def")):
        assert run(*args, "--mask", tmp_path / "masks" / "code.json") == 0
    deleted = set(mask.groups[0].tolist())
    shown = [int(x.split(":")[0]) for line in capsys.readouterr().out.splitlines()[-4:]
             for x in line.split("top ")[1].split(" |")[0].split(", ")]
    assert shown and not deleted & set(shown)

    assert run("experts", "view", ckpt, "--expert", f"0:{report[0]['expert']}", "--text", "def g(y):",
               "--data", code, "--out", tmp_path / "view.html") == 0
    page = (tmp_path / "view.html").read_text()
    assert page.count('class="tok"') == len("def g(y):") and "Top-activating contexts" in page
    # without --data, stats and view read the embedded corpus (its first 300 tokens here)
    assert run("experts", "stats", ckpt, "--out", tmp_path / "embedded", "--top", "1", "--max-tokens", "300") == 0
    assert ExpertStats.load(tmp_path / "embedded" / "stats.npz").tokens == 300
    assert run("experts", "view", ckpt, "--expert", f"0:{report[0]['expert']}", "--text", "def g(y):",
               "--max-tokens", "300", "--out", tmp_path / "embedded.html") == 0
    assert "Top-activating contexts" in (tmp_path / "embedded.html").read_text()
    assert run("experts", "view", ckpt, "--expert", "9:1", "--text", "x", "--out", tmp_path / "v.html") == 2
    assert "group must be in [0, 2)" in capsys.readouterr().err
    assert run("perplexity", ckpt, "--mask", tmp_path / "nope.json") == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.skipif(find_chromium() is None, reason="Chromium not installed (apt-get install chromium)")
def test_view_page_renders_in_headless_chromium(model, tmp_path):
    ckpt = model.save_checkpoint(tmp_path / "ckpt")
    assert eval_main(["experts", "view", str(ckpt), "--expert", "0:9", "--text", "Hello world", "--contexts", "0",
                      "--out", str(tmp_path / "v.html"), "--png", str(tmp_path / "v.png")]) == 0
    png = (tmp_path / "v.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1200, 1400)
    idat, pos = b"", 8
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        idat += png[pos + 8:pos + 8 + n] if kind == b"IDAT" else b""
        pos += 12 + n
    pixels = np.frombuffer(zlib.decompress(idat), np.uint8)
    assert np.mean(pixels < 200) > 0.002  # text and shading were drawn, not a blank page


def test_frequency_table_and_pair_list_agree_with_brute_force():
    """Both ways of counting active tokens (per-token pair lists, per-token tables in chunks that do not
    divide the token count) equal ``sum_t 1[s_tij > 0]`` with padding tokens excluded."""
    import jax.numpy as jnp

    from monet_jax.experts.stats import _frequency_pairs, _frequency_table

    rng = np.random.default_rng(3)
    b, t, h, e = 3, 37, 4, 24
    g1 = rng.random((b, t, h, e)) * (rng.random((b, t, h, e)) < 0.2)
    g2 = rng.random((b, t, h, e)) * (rng.random((b, t, h, e)) < 0.3)
    g1[0, 0] = 0.0  # a token with no active expert
    valid = rng.random((b, t)) < 0.8
    s = np.einsum("bthi,bthj->btij", g1, g2).reshape(b * t, e * e)
    want = ((s > 0) & valid.reshape(-1, 1)).sum(0)
    k = int(max((g1 > 0).sum(-1).max(), (g2 > 0).sum(-1).max()))
    args = (jnp.asarray(g1, jnp.float32), jnp.asarray(g2, jnp.float32), jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(_frequency_pairs(*args, k)), want)
    np.testing.assert_array_equal(np.asarray(_frequency_table(*args)), want)
    np.testing.assert_array_equal(np.asarray(_frequency_table(*args, chunk=10)), want)  # 111 = 11 x 10 + 1
    assert 0 < want.sum() < valid.sum() * e * e
