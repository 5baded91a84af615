"""The expert lab (``eval.py experts serve``): its answers against independent computations on a planted model,
its errors, its queue, and its pages driven in a headless Chromium (skipped without one)."""

import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from monet_jax.data.tokenizer import OFFSET, load_tokenizer
from monet_jax.eval.main import main as eval_main
from monet_jax.experts import atlas_files
from monet_jax.experts.atlas import AtlasOptions, collect
from monet_jax.experts.mask import ExpertMask
from monet_jax.experts.microscope import token_routing
from tests.browser import needs_chromium
from tests.test_atlas import DOCS, PLANT_I, PLANT_J, PLANTED, TOKEN, E, H, planted_model

pytest.importorskip("fastapi", reason="the lab needs fastapi and uvicorn (pip install -e '.[lab]')")
pytest.importorskip("uvicorn", reason="the lab needs fastapi and uvicorn (pip install -e '.[lab]')")

from monet_jax.eval.lab.app import create_app  # noqa: E402
from monet_jax.eval.lab.engine import Lab, LabError, LabOptions  # noqa: E402
from monet_jax.eval.lab.service import LabService  # noqa: E402

AT = ord(TOKEN) + OFFSET
TARGET = " "                     # what follows "@" in TEXT: the planted expert makes the model predict it
TEXT = "mail me @ noon"
AFTER_AT = TEXT.index(TOKEN) + 2  # the target's position in bos + bytes
OPTIONS = LabOptions(seq_len=32, batch_size=4, contexts=3, quantiles=2, per_quantile=1)


def lab_model():
    """The atlas's planted model, and its expert ``(PLANT_I, PLANT_J)`` of group 0 writes (through its biases, in
    both layers of the group) a large multiple of ``lm_head``'s column of TARGET, made long: deleting it must
    raise the loss of TARGET after "@"."""
    m = planted_model()
    head = np.array(m.lm_head.kernel[...])
    col = head[:, ord(TARGET) + OFFSET] / np.linalg.norm(head[:, ord(TARGET) + OFFSET])
    head[:, ord(TARGET) + OFFSET] = 3.0 * col  # a residual stream along col makes TARGET the clear favourite
    m.lm_head.kernel[...] = head
    half = m.config.hidden_size // 2
    for layer in m.model.routing_groups()[0]:
        b1, b2 = np.array(layer.moe.b1[...]), np.array(layer.moe.b2[...])
        b1[PLANT_I], b2[PLANT_J] = 40.0 * col[:half], 40.0 * col[half:]
        layer.moe.b1[...], layer.moe.b2[...] = b1, b2
    m.eval()
    return m


def direction(model, x: int) -> np.ndarray:
    """Expert ``x`` of group 0's output direction, written from DESIGN section 1's VD weights: per layer of the
    group, ``[b1_i + V11_i 1 + V12_i 1, b2_j + V21_j 1 + V22_j 1]`` (every hidden unit at activation 1), summed."""
    i, j = divmod(x, E)
    total = 0.0
    for layer in model.model.layers[:model.config.moe_groups]:
        moe, m = layer.moe, layer.moe.half_dim

        def rows(name, k, moe=moe, m=m):
            return np.asarray(getattr(moe, name).kernel[...], np.float64)[k * m:(k + 1) * m].sum(0)

        top = np.asarray(moe.b1[...], np.float64)[i] + rows("v11", i) + rows("v12", i)
        bottom = np.asarray(moe.b2[...], np.float64)[j] + rows("v21", j) + rows("v22", j)
        total = total + np.concatenate([top, bottom])
    return total


def output_direction(model, x: int) -> np.ndarray:
    """The direction's logit effect: times the final norm's scale, through lm_head."""
    gamma = np.asarray(model.model.norm.weight[...], np.float64)
    return (gamma * direction(model, x)) @ np.asarray(model.lm_head.kernel[...], np.float64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app on a free port in a thread of this process."""

    def __init__(self, service, atlas=None):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(service, atlas), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the lab server did not start"
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


def call(url: str, body=None, timeout: float = 120.0):
    """(status, JSON) of GET ``url`` or POST ``body``."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.fixture(scope="module")
def model():
    return lab_model()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    return path


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return model.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lab")


@pytest.fixture(scope="module")
def lab(model, workdir):
    return Lab(model, load_tokenizer("byte"), DOCS, OPTIONS, out_dir=workdir / "out",
               domain_masks={"at-signs": ExpertMask(E, [[PLANTED], []])})


@pytest.fixture(scope="module")
def server(model, lab, workdir):
    tok = load_tokenizer("byte")
    atlas = atlas_files.write_site(collect(model, tok, DOCS, AtlasOptions(experts=64, tokens=300), seq_len=32,
                                           batch_size=4), tok, model.config, workdir / "out" / "atlas")
    s = Server(LabService(lambda note: lab), atlas)
    yield s
    s.close()


def test_tokens_equal_the_microscope(lab, model):
    r = lab.analyze(TEXT, top=4)
    ids = [load_tokenizer("byte").bos_id, *(ord(c) + OFFSET for c in TEXT)]
    assert [t["id"] for t in r["tokens"]] == ids and r["tokens"][0]["piece"] == "<bos>"
    routing = token_routing(model, np.array(ids))
    for t, groups in zip(r["tokens"], routing, strict=True):
        for shown, want in zip(t["groups"], groups, strict=True):
            assert shown["active"] == want.expert_ids.size
            assert [x["id"] for x in shown["top"]] == want.expert_ids[:4].tolist()
            assert [x["score"] for x in shown["top"]] == [float(s) for s in want.scores[:4]]
    at = r["tokens"][TEXT.index(TOKEN) + 1]["groups"][0]["top"][0]
    assert (at["id"], at["i"], at["j"]) == (PLANTED, PLANT_I, PLANT_J) and abs(at["score"] - H) < 1e-3


def test_expert_page_data(lab, model):
    x = lab.expert(0, PLANTED)
    at_positions = sorted((d, k + 1) for d, doc in enumerate(DOCS) for k, c in enumerate(doc) if c == TOKEN)
    assert x["frequency"] == len(at_positions) and x["tokens"] == sum(len(d) + 1 for d in DOCS)
    np.testing.assert_allclose(x["mass"], H * len(at_positions), rtol=1e-4)
    assert sum(x["histogram"]["counts"]) == x["frequency"] and x["histogram"]["zero"] == x["tokens"] - x["frequency"]
    assert len(x["top"]) == OPTIONS.contexts
    for c in x["top"] + x["quantiles"]:
        assert (c["doc"], c["pos"]) in at_positions and c["text"][c["hit"]] == TOKEN and c["s"][c["hit"]] > 1.99
        assert sorted(c["s"])[-2] == 0.0  # nothing else around it scores
    assert {c["quantile"] for c in x["quantiles"]} == {"0-50%", "50-100%"}
    effect = output_direction(model, PLANTED)
    order = np.argsort(-effect, kind="stable")
    assert [t["token"] for t in x["promoted"]] == order[:OPTIONS.logit_tokens].tolist()
    assert [t["token"] for t in x["suppressed"]] == order[::-1][:OPTIONS.logit_tokens].tolist()
    assert x["promoted"][0]["token"] == ord(TARGET) + OFFSET
    np.testing.assert_allclose([t["logit"] for t in x["promoted"]], effect[order[:OPTIONS.logit_tokens]], rtol=1e-6)
    # neighbours by output direction: cosine over experts active in the corpus, computed here from the weights
    own = direction(model, PLANTED)
    cos = {y: float(direction(model, y) @ own / np.linalg.norm(direction(model, y)) / np.linalg.norm(own))
           for y in range(E * E) if y != PLANTED and lab.stats.frequency[0, y] > 0}
    best = sorted(cos, key=lambda y: (-cos[y], -lab.stats.mass[0, y]))[:OPTIONS.neighbours]
    assert [y["id"] for y in x["nearest_output"]] == best
    np.testing.assert_allclose([y["cosine"] for y in x["nearest_output"]], [cos[y] for y in best], rtol=1e-6)
    # by co-activation: the experts that fire on "@" too
    for y in x["nearest_coactivation"]:
        assert lab.scores(0, y["id"])[[lab.offset[d] + p for d, p in at_positions]].max() > 0


def test_search_finds_the_planted_expert(lab):
    r = lab.search(TOKEN)
    assert r["occurrences"] == sum(d.count(TOKEN) for d in DOCS)
    assert r["groups"][0][0]["id"] == PLANTED and abs(r["groups"][0][0]["mean"] - H) < 1e-3
    r = lab.search("a @")  # a piece of text: its last token, where the whole piece occurs
    assert r["occurrences"] == sum(d.count("a @") for d in DOCS) and r["groups"][0][0]["id"] == PLANTED


def test_ablation_raises_the_planted_loss_as_perplexity_does(lab, checkpoint, workdir, capsys):
    assert lab.mask([f"0:{PLANTED}"]).groups[0].tolist() == [PLANTED]  # the pages' GROUP:ID form too
    r = lab.ablate(TEXT, lab.mask([[0, PLANTED]]), new_tokens=4)
    before, after = r["before"]["losses"], r["after"]["losses"]
    assert len(before) == len(TEXT) and r["deleted"] == 1
    assert after[AFTER_AT - 1] > before[AFTER_AT - 1] + 1.0  # TARGET after "@" is no longer predicted
    assert before[AFTER_AT - 1] < 0.1
    np.testing.assert_allclose(before[:AFTER_AT - 2], after[:AFTER_AT - 2], atol=1e-6)  # before "@": unchanged
    path = lab.save_mask("planted", lab.mask([[0, PLANTED]]))
    assert path == workdir / "out" / "masks" / "planted.json"
    data = workdir / "text.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n")
    for mask, want in ((None, r["before"]["loss"]), (path, r["after"]["loss"])):
        capsys.readouterr()
        assert eval_main(["perplexity", str(checkpoint), "--data", str(data), "--seq-len", "32",
                          *(["--mask", str(mask)] if mask else [])]) == 0
        loss = float(re.search(r"loss (\S+)", capsys.readouterr().out).group(1))
        assert loss == pytest.approx(want, abs=1e-4)


def test_lab_errors_are_messages(lab, workdir):
    cases = [(lambda: lab.expert(0, E * E), f"unknown expert 0:{E * E}: groups are 0..1 and ids 0..{E * E - 1}"),
             (lambda: lab.expert(2, 0), "unknown expert 2:0"),
             (lambda: lab.expert("x", 0), "group and id must be integers"),
             (lambda: lab.analyze("  "), "the text is empty"),
             (lambda: lab.analyze("y" * 64), "the text is 65 tokens with bos; the model's window is 64"),
             (lambda: lab.ablate(TEXT, lab.mask([[0, 1]]), new_tokens=60), "pass the model's window of 64"),
             (lambda: lab.mask([]), "no experts chosen"),
             (lambda: lab.mask([[0, 1, 2]]), "an expert is [group, id] or 'GROUP:ID', got [0, 1, 2]"),
             (lambda: lab.mask("0:1"), "experts is a list of [group, id] pairs or 'GROUP:ID' strings"),
             (lambda: lab.mask(["0:x"]), "group and id must be integers"),
             (lambda: lab.mask(masks=["nope"]), "no mask named 'nope'"),
             (lambda: lab.save_mask("../escape", lab.mask([[0, 1]])), "mask name '../escape'"),
             (lambda: lab.search("zzzz"), "does not occur in the corpus")]
    for fn, message in cases:
        with pytest.raises(LabError, match=re.escape(message)):
            fn()
    other = workdir / "out" / "masks" / "other-model.json"
    other.parent.mkdir(parents=True, exist_ok=True)
    ExpertMask(16, [[3], [4], [5]]).save(other)
    with pytest.raises(LabError, match=re.escape("mask 'other-model' is for 3 routing groups of 16 experts; this "
                                                 "model has 2 of 8")):
        lab.mask(masks=["other-model"])
    assert not (workdir / "escape.json").exists() and not (workdir / "out" / "escape.json").exists()


def test_api_errors_are_400_messages(server, lab):
    other = lab.out_dir / "masks" / "other-model.json"
    other.parent.mkdir(parents=True, exist_ok=True)
    ExpertMask(16, [[3], [4], [5]]).save(other)
    for path, body, message in [
        (f"/api/expert?g=0&id={E * E}", None, "unknown expert 0:64"),
        ("/api/expert?g=0&id=abc", None, "group and id must be integers"),
        ("/api/tokens", {"text": ""}, "the text is empty"),
        ("/api/tokens", {"text": "y" * 100}, "the model's window is 64"),
        ("/api/tokens", {"txt": "a"}, "bad request: text: Field required"),
        ("/api/ablate", {"text": TEXT, "masks": ["other-model"]}, "is for 3 routing groups of 16 experts"),
        ("/api/ablate", {"text": TEXT, "experts": [0, 42]}, "an expert is [group, id] or 'GROUP:ID', got 0"),
        ("/api/ablate", {"text": TEXT, "experts": ["0:99"]}, "unknown expert 0:99"),
        ("/api/masks", {"name": "../../x", "experts": [[0, 1]]}, "mask name '../../x'"),
        ("/api/masks/nope", None, "no mask named 'nope'"),
    ]:
        status, data = call(server.url + path, body)
        assert status == 400 and message in data["error"], (path, data)
    status, data = call(server.url + "/atlas/../../etc/passwd")
    assert status == 404


def test_requests_wait_for_the_model_and_status_says_so(lab):
    gate = threading.Event()

    def load(note):
        note("loading the planted model")
        gate.wait(30)
        return lab

    s = Server(LabService(load))
    try:
        status, st = call(s.url + "/api/status")
        assert st["state"] == "loading" and st["message"] == "loading the planted model" and not st["atlas"]
        answers = []
        t = threading.Thread(target=lambda: answers.append(call(s.url + "/api/tokens", {"text": "a @ b"})))
        t.start()
        time.sleep(0.5)
        assert not answers and call(s.url + "/api/status")[1]["waiting"] == 1
        gate.set()
        t.join(60)
        assert answers[0][0] == 200 and answers[0][1]["tokens"][3]["groups"][0]["top"][0]["id"] == PLANTED
        assert call(s.url + "/api/status")[1]["state"] == "ready"
        with urllib.request.urlopen(s.url + "/", timeout=10) as r:  # no atlas: the lab's own text page
            assert r.url.endswith("/lab/text.html")
    finally:
        gate.set()
        s.close()


def test_serve_command_in_two_steps(checkpoint, corpus, tmp_path):
    """``eval.py experts serve CHECKPOINT`` as a user runs it: it answers at once, builds its atlas into its
    output directory, and writes nothing elsewhere."""
    port, out = free_port(), tmp_path / "lab"
    before = set(tmp_path.iterdir())
    proc = subprocess.Popen([sys.executable, "eval.py", "experts", "serve", str(checkpoint), "--data", str(corpus),
                             "--out", str(out), "--port", str(port), "--seq-len", "32"],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline, st = time.monotonic() + 300, {}
        while st.get("state") != "ready":
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else st
            try:
                st = call(f"http://127.0.0.1:{port}/api/status", timeout=5)[1]
            except OSError:
                pass
            time.sleep(0.3)
        status, r = call(f"http://127.0.0.1:{port}/api/tokens", {"text": "a @ b"})
        assert status == 200 and r["tokens"][3]["groups"][0]["top"][0]["id"] == PLANTED
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.url.endswith("/atlas/index.html") and b"/lab/hook.js" in page.read()
        assert (out / "atlas" / "index.html").is_file()
    finally:
        proc.terminate()
        proc.wait(30)
    assert set(tmp_path.iterdir()) - before == {out}


def test_serve_reads_less_of_the_corpus_without_changing_other_commands():
    from monet_jax.eval.main import parser

    p = parser()
    assert p.parse_args(["experts", "serve", "ck"]).max_tokens == 50_000
    for argv in (["perplexity", "ck"], ["experts", "stats", "ck", "--out", "o"],
                 ["experts", "atlas", "ck", "--out", "o"]):
        assert p.parse_args(argv).max_tokens is None  # the whole corpus


def test_serve_rejects_bad_arguments(checkpoint, tmp_path, capsys):
    assert eval_main(["experts", "serve", str(checkpoint), "--atlas", str(tmp_path)]) == 2
    assert "no index.html" in capsys.readouterr().err
    assert eval_main(["experts", "serve", str(checkpoint), "--mask", f"x={tmp_path / 'none.json'}"]) == 2
    assert "no such file" in capsys.readouterr().err


# -- pages in a headless Chromium ----------------------------------------------------------------------------------

@needs_chromium
def test_text_page_shows_the_planted_expert_with_its_exact_score(server, browser, model, checkpoint, capsys):
    browser.open(server.url + "/lab/text.html")
    browser.eval("document.querySelector('#text').value = ''")
    browser.type("#text", TEXT)
    browser.eval("document.querySelector('#run').click()")
    browser.wait(f"document.querySelectorAll('#tokens .tok').length === {len(TEXT) + 1}", timeout=60)
    browser.eval(f"document.querySelector('#tokens .tok[data-t=\"{TEXT.index(TOKEN) + 1}\"]').click()")
    row = browser.wait("(() => { const r = document.querySelector("
                       f"'#experts tr[data-g=\"0\"][data-id=\"{PLANTED}\"]'); "
                       "return r && [r.dataset.score, r.querySelector('.score').textContent]; })()")
    ids = np.array([load_tokenizer("byte").bos_id, *(ord(c) + OFFSET for c in TEXT)])
    routing = token_routing(model, ids)[TEXT.index(TOKEN) + 1][0]
    assert float(row[0]) == float(routing.scores[list(routing.expert_ids).index(PLANTED)])
    capsys.readouterr()
    assert eval_main(["experts", "tokens", str(checkpoint), "--text", TEXT, "--top", "1"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith(repr(TOKEN)))
    shown = re.search(r"group 0: +\d+ active, top (\d+):(\S+)", line)
    assert int(shown.group(1)) == PLANTED and f"{float(row[1]):.3f}" == shown.group(2)
    assert not browser.errors


@needs_chromium
def test_expert_page_shows_contexts_and_promoted_tokens(server, browser, model):
    browser.open(server.url + f"/lab/expert.html?g=0&id={PLANTED}")
    hits = browser.eval("[...document.querySelectorAll('#top .hit')].map(h => h.textContent)")
    assert hits == [TOKEN] * OPTIONS.contexts
    assert browser.eval("[...document.querySelectorAll('#quantiles .hit')].map(h => h.textContent)") == [TOKEN] * 2
    promoted = browser.eval("[...document.querySelectorAll('#promoted tr[data-token]')]"
                            ".map(r => Number(r.dataset.token))")
    effect = output_direction(model, PLANTED)
    assert promoted == np.argsort(-effect, kind="stable")[:OPTIONS.logit_tokens].tolist()
    bars = browser.eval("[...document.querySelectorAll('#histogram div')].map(d => Number(d.dataset.count))")
    assert sum(bars) == sum(d.count(TOKEN) for d in DOCS)
    # corpus text stays text: the markup in the documents is shown, never parsed into elements
    assert browser.eval("document.querySelectorAll('#top img, #top b, #quantiles img').length") == 0
    browser.open(server.url + "/lab/expert.html?g=0&id=99999")
    assert "unknown expert 0:99999" in browser.eval("document.querySelector('#page-error').textContent")
    # the atlas's page of the same expert links to this one
    browser.open(server.url + f"/atlas/expert.html?g=0&id={PLANTED}")
    href = browser.wait("(() => { const a = document.querySelector('#lab-expert'); return a && a.href; })()")
    assert href.endswith(f"/lab/expert.html?g=0&id={PLANTED}")
    assert not browser.errors


@needs_chromium
def test_ablation_page_before_after_and_the_saved_mask(server, browser, checkpoint, workdir, capsys):
    browser.open(server.url + "/lab/ablate.html")
    browser.eval("localStorage.clear(); document.querySelector('#text').value = ''")
    browser.type("#add-expert", f"0:{PLANTED}")
    browser.eval("document.querySelector('#add').click()")
    assert browser.eval(f"!!document.querySelector('#selection .chip[data-id=\"{PLANTED}\"]')")
    browser.type("#text", TEXT)
    browser.eval("document.querySelector('#new-tokens').value = '4'; document.querySelector('#run').click()")
    losses = browser.wait("(() => { const b = document.querySelector('#loss-before'), "
                          "a = document.querySelector('#loss-after'); return a && [b.textContent, a.textContent]; })()",
                          timeout=60)
    assert float(losses[1]) > float(losses[0])
    row = browser.eval(f"(() => {{ const r = document.querySelector('#losses tr[data-n=\"{AFTER_AT}\"]'); "
                       "return [Number(r.dataset.before), Number(r.dataset.after)]; })()")
    assert row[1] > row[0] + 1.0
    browser.type("#mask-name", "from-page")
    browser.eval("document.querySelector('#save').click()")
    browser.wait("!!document.querySelector('#saved code')")
    saved = workdir / "out" / "masks" / "from-page.json"
    mask = ExpertMask.load(saved)
    assert mask.groups[0].tolist() == [PLANTED] and mask.groups[1].size == 0
    data = workdir / "page-text.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n")
    capsys.readouterr()
    assert eval_main(["perplexity", str(checkpoint), "--data", str(data), "--mask", str(saved)]) == 0
    loss = float(re.search(r"loss (\S+)", capsys.readouterr().out).group(1))
    assert loss == pytest.approx(float(losses[1]), abs=2e-4)
    # the saved mask reloads: cleared selection, then its experts back from the file
    browser.eval("document.querySelector('#clear').click()")
    browser.wait("(() => { const s = document.querySelector('#masks'); return s && "
                 "[...s.options].some(o => o.value === 'from-page'); })()")
    browser.eval("document.querySelector('#masks').value = 'from-page'; document.querySelector('#load-mask').click()")
    browser.wait(f"!!document.querySelector('#selection .chip[data-id=\"{PLANTED}\"]')")
    assert not browser.errors
