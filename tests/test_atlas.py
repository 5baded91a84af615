"""The expert atlas: its data against ``experts stats`` and a planted expert, its limits and errors, and its
pages driven in a headless Chromium (skipped without one)."""

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.data.tokenizer import OFFSET, load_tokenizer
from monet_jax.data.windows import document_tokens
from monet_jax.eval.main import main as eval_main
from monet_jax.experts import atlas_files
from monet_jax.experts.atlas import AtlasOptions, collect, token_pieces
from monet_jax.experts.mask import ExpertMask
from monet_jax.experts.stats import ExpertStats, TopContexts, expert_scores, routed_batches
from tests.browser import needs_chromium

E, H = 8, 2
PLANT_I, PLANT_J = 5, 2
PLANTED = PLANT_I * E + PLANT_J   # composed id in group 0
TOKEN = "@"                       # the one token it fires on
DOCS = ["mail me @ noon, or @ dusk", "x = a @ b  # a matrix product", "no at sign here, just words",
        "def f(a, b):\n    return a @ b\n", "The quick brown fox jumps over the lazy dog.",
        "<b>@</b><img src=x onerror=alert(1)>", "3 + 4 = 7; 12 - 5 = 7"]
AT_COUNT = sum(d.count(TOKEN) for d in DOCS)


def planted_model():
    """A tiny model whose group-0 expert (PLANT_I, PLANT_J) has score ~H on "@" and exactly 0 elsewhere.

    Embedding coordinate 0 is large only for "@", coordinate 1 is 1 for every other token, and attention
    writes neither (its output projection's columns 0 and 1 are zero), so the first router sees them
    unchanged: logits +60 for "@" and -40 for every other token on i = PLANT_I (j = PLANT_J alike)."""
    cfg = MonetConfig(vocab_size=260, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                      max_position_embeddings=64, moe_dim=4, moe_heads=H, moe_experts=E, moe_topk=2, moe_groups=2,
                      torch_dtype="float32")
    m = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(260, 16)).astype(np.float32)
    at = ord(TOKEN) + OFFSET
    emb[:, 0], emb[:, 1] = 0.0, 1.0
    emb[at, 0], emb[at, 1] = 4.0, 0.0
    m.model.embed_tokens.embedding[...] = emb
    for layer in m.model.layers:
        o = np.array(layer.self_attn.o_proj.kernel[...])
        o[:, :2] = 0.0
        layer.self_attn.o_proj.kernel[...] = o
        if layer.router is not None:  # logits of order one, so several experts pass the threshold
            for w, chosen in ((layer.router.w1, PLANT_I), (layer.router.w2, PLANT_J)):
                k = np.array(w.kernel[...]) * 60.0
                if layer is m.model.layers[0]:
                    k[:2] = 0.0
                    cols = [h * E + chosen for h in range(H)]
                    k[0, cols], k[1, cols] = 20.0, -40.0
                w.kernel[...] = k
    return m


@pytest.fixture(scope="module")
def model():
    return planted_model()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    return path


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return model.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt")


def load_js(path: Path):
    """The value a data file hands to ``atlas.add``."""
    text = path.read_text(encoding="utf-8")
    head = text.index(",")
    assert text.startswith('atlas.add("') and text.rstrip().endswith(");")
    return json.loads(text[head + 1:text.rstrip().rindex(")")])


def site_experts(site: Path, g: int) -> dict:
    out = {}
    for f in sorted((site / "data" / f"g{g}").glob("e*.js")):
        out.update({int(k): v for k, v in load_js(f).items()})
    return out


def token_entry(site: Path, token: int):
    shard = site / "data" / "tokens" / f"t{token // atlas_files.TOKEN_SHARD:04d}.js"
    return load_js(shard).get(str(token)) if shard.exists() else None


def test_planted_expert_is_found(model, tmp_path):
    tok = load_tokenizer("byte")
    model.eval()
    opts = AtlasOptions(experts=64, contexts=3, context_tokens=5, tokens=300, token_experts=4)
    atlas = collect(model, tok, DOCS, opts, seq_len=16, batch_size=2)
    assert atlas.stats.frequency[0, PLANTED] == AT_COUNT  # active on every "@" and nothing else
    np.testing.assert_allclose(atlas.stats.mass[0, PLANTED], AT_COUNT * H, rtol=1e-3)
    ga = atlas.groups[0]
    n = int(np.flatnonzero(ga.ids == PLANTED)[0])
    at = ord(TOKEN) + OFFSET
    assert [atlas.docs[c.doc][c.position] for c in ga.contexts.contexts(n)] == [at] * 3
    site = atlas_files.write_site(atlas, tok, model.config, tmp_path / "site")
    entry = token_entry(site, at)
    assert entry["n"] == AT_COUNT and entry["g"][0][0][0] == PLANTED and entry["g"][0][0][1] > 0.99 * H
    assert entry["g"][0][1][1] < 0.01 * H  # nothing else fires on it in group 0
    x = site_experts(site, 0)[PLANTED]
    assert x["top_tokens"][0][0] == at and len(x["top_tokens"]) == 1  # score on no other token
    assert len(x["contexts"]) == 3
    for c in x["contexts"]:
        assert c["text"][c["hit"]] == TOKEN and c["label"] == TOKEN and c["score"] > 0.99 * H
        assert len(c["text"]) == len(c["s"]) <= 11 and TOKEN in "".join(c["text"])
        assert c["s"][c["hit"]] == pytest.approx(c["score"], rel=1e-4)
        assert all(s is None or s < 0.01 for k, s in enumerate(c["s"]) if k != c["hit"] and c["text"][k] != TOKEN)


def test_site_equals_expert_stats(checkpoint, corpus, tmp_path, capsys):
    """Mass and frequency in the site's data files are those of ``experts stats`` (stats.npz), and every
    bound (experts, contexts, context tokens, tokens, token experts) holds."""
    common = ["--seq-len", "12", "--batch-size", "3"]
    mask = ExpertMask(E, [[PLANTED, 3], [7]], {"domain": "at"})
    mask.save(tmp_path / "at.json")
    ExpertMask(E, [[3, 9], []]).save(tmp_path / "other.json")
    assert eval_main(["experts", "stats", str(checkpoint), "--data", str(corpus), "--out", str(tmp_path / "st"),
                      *common]) == 0
    assert eval_main(["experts", "atlas", str(checkpoint), "--data", str(corpus), "--out", str(tmp_path / "site"),
                      "--experts", "20", "--contexts", "3", "--context-tokens", "4", "--tokens", "30",
                      "--token-experts", "4", "--mask", f"at={tmp_path / 'at.json'}", "--mask",
                      str(tmp_path / "other.json"), *common]) == 0
    out = capsys.readouterr().out
    assert "MiB in" in out and "experts kept per group: 20, 20" in out
    st = ExpertStats.load(tmp_path / "st" / "stats.npz")
    site = tmp_path / "site"
    meta = load_js(site / "data" / "meta.js")
    assert meta["tokens"] == st.tokens and meta["groups"] == 2 and meta["experts_per_group"] == E * E
    assert [d["name"] for d in meta["domains"]] == ["at", "other"]
    assert meta["domains"][0]["selected"] == [2, 1]
    for g in range(2):
        ix = load_js(site / "data" / f"g{g}" / "index.js")
        want = np.argsort(-st.mass[g], kind="stable")[:20]
        assert ix["id"] == want.tolist()
        assert ix["mass"] == st.mass[g, want].tolist() and ix["freq"] == st.frequency[g, want].tolist()
        assert meta["group"][g]["total_mass"] == pytest.approx(st.mass[g].sum())
        experts = site_experts(site, g)
        assert sorted(experts) == sorted(ix["id"])
        for x, v in experts.items():
            assert v["mass"] == st.mass[g, x] and v["freq"] == st.frequency[g, x]
            assert 1 <= len(v["contexts"]) <= 3 and all(len(c["text"]) <= 9 for c in v["contexts"])
            assert v["domains"] == [d for d, ids in enumerate(([PLANTED, 3], [3, 9]) if g == 0 else ([7], []))
                                    if x in ids]
        if g == 0:
            assert ix["dom"][ix["id"].index(PLANTED)] == [0]
    vocab = load_js(site / "data" / "vocab.js")
    assert len(vocab["id"]) == 30 and vocab["count"] == sorted(vocab["count"], reverse=True)
    entries = {}
    for f in (site / "data" / "tokens").glob("t*.js"):
        entries.update(load_js(f))
    assert sorted(map(int, entries)) == sorted(vocab["id"])
    assert all(len(per_group) <= 4 for e in entries.values() for per_group in e["g"])
    assert (site / "index.html").is_file() and (site / "expert.html").is_file() and (site / "text.html").is_file()


def test_atlas_errors(checkpoint, corpus, tmp_path, capsys):
    base = ["experts", "atlas", str(checkpoint), "--data", str(corpus)]
    wrong = tmp_path / "wrong.json"
    ExpertMask(4, [[1], [2], [3]]).save(wrong)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    cases = [(["--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "a")], "data path not found"),
             (["--out", str(tmp_path / "a"), "--mask", f"x={tmp_path / 'bad.json'}"], "not readable JSON"),
             (["--out", str(tmp_path / "a"), "--mask", f"x={tmp_path / 'missing.json'}"], "no such file"),
             (["--out", str(tmp_path / "a"), "--mask", f"x={wrong}"], "mask 'x' is for 3 routing groups of 4"),
             (["--out", str(tmp_path / "a"), "--mask", "x="], "--mask expects NAME=FILE"),
             (["--out", str(tmp_path / "a"), "--experts", "0"], "--experts must be at least 1"),
             (["--out", str(tmp_path / "a"), "--context-tokens", "-1"], "--context-tokens must be at least 0"),
             (["--out", str(tmp_path / "taken")], "exists and is not an expert atlas")]
    for extra, message in cases:
        assert eval_main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a").exists() and (tmp_path / "taken" / "notes.txt").read_text() == "keep me"


def test_site_is_written_atomically(model, tmp_path, monkeypatch):
    tok = load_tokenizer("byte")
    atlas = collect(model, tok, DOCS[:3], AtlasOptions(experts=4, contexts=1, tokens=8), seq_len=16, batch_size=2)
    first = atlas_files.write_site(atlas, tok, model.config, tmp_path / "site")
    (first / "stale.txt").write_text("from an earlier atlas")

    def interrupted(root, *a, **k):
        (root / "data").mkdir()
        (root / "data" / "meta.js").write_text("half")
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(atlas_files, "_write_data", interrupted)
        with pytest.raises(KeyboardInterrupt):
            atlas_files.write_site(atlas, tok, model.config, tmp_path / "site")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # no temporary directory left
    assert (first / "stale.txt").exists() and load_js(first / "data" / "meta.js")["groups"] == 2
    atlas_files.write_site(atlas, tok, model.config, tmp_path / "site")  # a new atlas replaces the old one whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"] and not (first / "stale.txt").exists()


def test_top_contexts_equal_brute_force(model):
    """TopContexts's batch-by-batch merge keeps each expert's best tokens over the corpus, and the scores
    of their neighbours in the window (here every document is one window; group 1 is not planted)."""
    tok = load_tokenizer("byte")
    model.eval()
    docs = document_tokens(tok, DOCS)
    ids = np.arange(0, E * E, 3)
    found = TopContexts(ids.size, 3, width=2)
    for batch, count, probs in routed_batches(model, docs, seq_len=64, batch_size=3, pad_id=0, desc="test"):
        count[:, 0] = False
        found.add(expert_scores(*probs[1], jnp.asarray(ids // E), jnp.asarray(ids % E)), count, batch)
    padded = np.zeros((len(docs), 64), np.int32)
    for r, d in enumerate(docs):
        padded[r, :d.size] = d
    g1, g2 = (np.asarray(g, np.float64) for g in model(padded, attention_mask=(padded > 0).astype(np.int32),
                                                          output_router_probs=True).router_probs[1])
    s_all = np.einsum("bthi,bthj->btij", g1, g2).reshape(len(docs), 64, -1)[..., ids]
    tables = [s_all[r, :d.size] for r, d in enumerate(docs)]
    checked = 0
    for n in range(ids.size):
        want = sorted((s[p, n] for s in tables for p in range(1, s.shape[0]) if s[p, n] > 0), reverse=True)[:3]
        got = found.contexts(n)
        np.testing.assert_allclose([c.score for c in got], want, rtol=1e-5)
        for f, c in enumerate(got):
            s = tables[c.doc][:, n]
            window = [s[p] if 0 <= p < s.size else np.nan for p in range(c.position - 2, c.position + 3)]
            np.testing.assert_allclose(found.near[n, f], window, rtol=1e-5, atol=1e-7)
            checked += 1
    assert checked > ids.size  # most experts have several contexts: the merge was exercised


def test_token_pieces_join_into_the_text():
    tok = load_tokenizer("byte")
    ids = tok.encode("añb€")
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == "añb€"
    assert pieces[:3] == ["a", "", "ñ"]  # a two-byte character shows with its last byte


# ------------------------------------------------------------------------------------------ in a browser



@pytest.fixture(scope="module")
def site(model, tmp_path_factory):
    tok = load_tokenizer("byte")
    atlas = collect(model, tok, DOCS, AtlasOptions(experts=64, contexts=AT_COUNT + 2, context_tokens=6, tokens=300),
                    seq_len=32, batch_size=4)
    mask = ExpertMask(E, [[PLANTED], []], {"domain": "at-signs"})
    return atlas_files.write_site(atlas, tok, model.config, tmp_path_factory.mktemp("atlas") / "site",
                                  masks={"at-signs": mask}, source={"checkpoint": "ckpt", "corpus": "docs.jsonl"})


@needs_chromium
def test_index_lists_experts(site, browser):
    browser.open((site / "index.html").as_uri())
    ids = browser.eval("[...document.querySelectorAll('#experts tr[data-id]')].map(r => Number(r.dataset.id))")
    index = load_js(site / "data" / "g0" / "index.js")
    assert ids == index["id"] and PLANTED in ids
    row = browser.eval(f"document.querySelector('#experts tr[data-id=\"{PLANTED}\"]').textContent")
    assert "at-signs" in row and f"{PLANT_I}, {PLANT_J}" in row and TOKEN in row
    # every row formats a column alike: mass with one decimal, frequency a whole count, shares in percent
    cells = browser.eval("[...document.querySelectorAll('#experts tr[data-id]')].map(r => "
                         "[3, 4, 5, 6, 7].map(k => r.cells[k].textContent))")
    odd = [row for row in cells if not all(re.fullmatch(pattern, cell) for pattern, cell in zip(
        (r"\d{1,3}(,\d{3})*\.\d", r"\d+\.\d\d%|<0\.01%", r"\d\.\d{3}|0\.0+[1-9]\d\d|[1-9]\.\d\de-\d+",
         r"\d{1,3}(,\d{3})*", r"\d+\.\d\d%|<0\.01%"), row, strict=True))]
    assert not odd
    n = index["id"].index(PLANTED)
    assert cells[n][0] == f"{index['mass'][n]:,.1f}" and cells[n][3] == f"{index['freq'][n]:,}"
    assert browser.eval("[sum1(61784.25), sum1(9681.3), count(1234567), score(1), score(0.93329), score(0.0612345), "
                        "pct(0.1234), pct(0.00001)]") == ["61,784.3", "9,681.3", "1,234,567", "1.000", "0.933",
                                                          "0.0612", "12.34%", "<0.01%"]
    # the search box's hint is not cut off
    assert browser.eval("(() => { const q = document.querySelector('#q'), cs = getComputedStyle(q); "
                        "const c = document.createElement('canvas').getContext('2d'); "
                        "c.font = cs.fontStyle + ' ' + cs.fontWeight + ' ' + cs.fontSize + ' ' + cs.fontFamily; "
                        "return c.measureText(q.placeholder).width <= "
                        "q.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight); })()")
    browser.eval("document.querySelector('#by-freq').click()")
    freqs = browser.wait("(() => { const r = [...document.querySelectorAll('#experts tr[data-id]')]; "
                         "return document.querySelector('#by-freq.on') && r.map(x => Number(x.dataset.id)); })()")
    by_freq = [x for _, x in sorted(zip(index["freq"], index["id"], strict=True), key=lambda p: -p[0])]
    assert freqs == by_freq and freqs != ids
    browser.eval("document.querySelector('#group-1').click()")
    browser.wait("document.querySelector('#summary').textContent.startsWith('Group 1:')")
    ids1 = browser.eval("[...document.querySelectorAll('#experts tr[data-id]')].map(r => Number(r.dataset.id))")
    index1 = load_js(site / "data" / "g1" / "index.js")  # still ranked by frequency
    assert ids1 == [x for _, x in sorted(zip(index1["freq"], index1["id"], strict=True), key=lambda p: -p[0])]
    assert not browser.errors


@needs_chromium
def test_search_finds_the_planted_expert(site, browser):
    browser.open((site / "index.html").as_uri())
    browser.type("#q", TOKEN)
    first = browser.wait("(() => { const r = document.querySelector('#search-results tr[data-g=\"0\"]'); "
                         "return r && Number(r.dataset.id); })()")
    assert first == PLANTED
    browser.eval("document.querySelector('#q').value = ''")
    browser.type("#q", str(PLANTED))  # a bare id: the groups that keep it (and the digits as tokens)
    found = browser.wait("(() => { const r = document.querySelector('#id-results'); "
                         "return r && [...r.querySelectorAll('a')].map(a => a.textContent); })()")
    kept = [g for g in range(2) if PLANTED in load_js(site / "data" / f"g{g}" / "index.js")["id"]]
    assert found == [f"{g}:{PLANTED}" for g in kept]
    assert found[0] == f"0:{PLANTED}"
    browser.eval("document.querySelector('#q').value = ''")
    browser.type("#q", f"0:{PLANTED}")
    browser.press_enter()
    browser.wait(f"location.pathname.endsWith('expert.html') && location.search === '?g=0&id={PLANTED}' && "
                 "document.body.dataset.ready === '1'")
    assert not browser.errors


@needs_chromium
def test_expert_page_shows_the_planted_contexts(site, browser):
    browser.open((site / "expert.html").as_uri() + f"?g=0&id={PLANTED}")
    hits = browser.eval("[...document.querySelectorAll('#contexts .hit')].map(h => h.textContent)")
    assert hits == [TOKEN] * AT_COUNT  # every "@", and no other token (its score elsewhere is exactly 0)
    contexts = browser.eval("[...document.querySelectorAll('#contexts td.ctx')].map(c => c.textContent)")
    assert len(contexts) == AT_COUNT and all(TOKEN in c for c in contexts)
    # corpus text stays text: the markup in the documents is shown, never parsed into elements
    assert sum(c == "<b>@</b><i" for c in contexts) == 1
    assert browser.eval("document.querySelectorAll('#contexts img, #contexts b').length") == 0
    stats = browser.eval("document.querySelector('#stats').textContent")
    assert f"{AT_COUNT} = " in stats and "at-signs" in stats
    x = site_experts(site, 0)[PLANTED]
    assert f"mass (summed score){x['mass']:,.1f}  (rank {x['mass_rank']} of " in stats
    # context scores keep three decimals: the planted expert's are all about H, written 2.000, never "2"
    scores = browser.eval("[...document.querySelectorAll('#contexts tr')].slice(1).map(r => r.cells[1].textContent)")
    assert scores == [f"{c['score']:.3f}" for c in x["contexts"]] and all(s == f"{H:.3f}" for s in scores)
    assert f"{AT_COUNT} contexts tie at {H:.3f}" in browser.eval("document.querySelector('#legend').textContent")
    shaded = browser.eval("getComputedStyle(document.querySelector('#contexts .hit')).backgroundColor")
    assert shaded.startswith("rgba(230, 80, 0") or shaded == "rgb(230, 80, 0)"
    browser.open((site / "expert.html").as_uri() + "?g=1&id=63")
    assert browser.eval("!!document.querySelector('#not-kept') || !!document.querySelector('#contexts')")
    assert not browser.errors


@needs_chromium
def test_text_box_shows_experts_for_pasted_text(site, browser):
    browser.open((site / "text.html").as_uri())
    assert "does not run the model" in browser.eval("document.querySelector('#caveat').textContent")
    browser.type("#text", "a @ b")
    rows = browser.wait("(() => { const r = [...document.querySelectorAll('#token-table tr[data-token]')]; "
                        "return r.length === 5 && r.map(x => [x.cells[0].textContent, "
                        "[...x.cells[2].querySelectorAll('a')].map(a => a.textContent)]); })()")
    assert [r[0] for r in rows] == ["a", "\u2423", TOKEN, "\u2423", "b"]
    assert rows[2][1][0] == f"0:{PLANTED}" and f"0:{PLANTED}" not in rows[0][1]
    assert not browser.errors
