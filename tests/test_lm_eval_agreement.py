"""``eval.py tasks`` and ``monet-lm-eval`` with the task ``monet_jax.eval.lm_eval_task`` writes give the same
numbers on the same JSONL: per-choice log-likelihoods, acc and acc_norm, zero- and few-shot, partial scoring."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.data.tokenizer import load_tokenizer
from monet_jax.eval import tasks
from monet_jax.eval.lm_eval_task import main as task_main
from monet_jax.eval.lm_eval_task import task_config
from monet_jax.eval.main import main as eval_main

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before lm_eval imports datasets: local JSON only, never the Hub
os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import monet_jax.eval.harness  # noqa: E402,F401  (registers the monet_jax model with lm-eval)

# Contexts end without a space and choices start without one, so a delimiter changes every score; two
# choices have more UTF-8 bytes than characters, so dividing by bytes would rank them differently.
EXAMPLES = [
    {"context": "Q: 2+2=\nA:", "choices": ["4", "five", "x"], "answer": 0},
    {"context": "The sky is", "choices": ["blue", "green"], "answer": 0},
    {"context": "Un caf", "choices": ["é noir", "e noir", "ééé"], "answer": 0},
    {"context": "def f(x):\n    return", "choices": ["x", "None", ")("], "answer": 1},
    {"context": "", "choices": ["hello", "zz"], "answer": 1},
    {"context": "naïve or", "choices": ["naive", "naïf", "ñ"], "answer": 2},
]
PARTIAL = [
    {"context": ["The cup fell because the cup", "The cup fell because the table"], "choices": [" was tipped."] * 2,
     "answer": 0},
    {"context": ["Sam thanked Alex since Sam", "Sam thanked Alex since Alex"], "choices": [" helped."] * 2,
     "answer": 1},
    {"context": ["It rained so we", "It rained so they"], "choices": [" stayed in."] * 2, "answer": 0},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("agree")
    cfg = MonetConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=128, moe_dim=4, moe_heads=2, moe_experts=8, moe_topk=2,
                      moe_groups=2, torch_dtype="float32")
    MonetForCausalLM(cfg, rngs=nnx.Rngs(3)).save_checkpoint(root / "ckpt")
    for name, rows in (("mc", EXAMPLES), ("partial", PARTIAL)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        assert task_main([f"agree_{name}", str(root / f"{name}.jsonl"), "--out", str(root / "tasks")]) == 0
    return root


def eval_py(root, name: str, shots: int, capsys) -> dict:
    capsys.readouterr()
    assert eval_main(["tasks", str(root / "ckpt"), str(root / f"{name}.jsonl"), "--shots", str(shots),
                      "--tokenizer", "byte"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    return {"acc": float(line.split("acc ")[1].split()[0]), "acc_norm": float(line.split("acc_norm ")[1].split()[0])}


def lm_eval(root, name: str, shots: int) -> tuple[dict, list]:
    out = simple_evaluate(model="monet_jax", model_args=f"pretrained={root / 'ckpt'},tokenizer=byte,batch_size=4",
                          tasks=[f"agree_{name}"], num_fewshot=shots, log_samples=True,
                          task_manager=TaskManager(include_path=str(root / "tasks")))
    samples = sorted(out["samples"][f"agree_{name}"], key=lambda s: s["doc_id"])
    return out["results"][f"agree_{name}"], samples


@pytest.mark.parametrize("shots", [0, 2])
def test_multiple_choice_agrees(setup, capsys, shots):
    root = setup
    ours = eval_py(root, "mc", shots, capsys)
    theirs, samples = lm_eval(root, "mc", shots)
    assert theirs["acc,none"] == pytest.approx(ours["acc"], abs=1e-4)
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-4)
    # Every choice's request is the same string pair, and its score the one eval.py tasks computes.
    model, tok = MonetForCausalLM.from_pretrained(root / "ckpt"), load_tokenizer("byte")
    for k, (sample, ex) in enumerate(zip(samples, EXAMPLES, strict=True)):
        shots_for = [s for j, s in enumerate(EXAMPLES) if j != k][:shots]
        prefix = "".join(s["context"] + s["choices"][s["answer"]] + "\n\n" for s in shots_for)
        assert [tuple(a) for a in sample["arguments"]] == [(prefix + ex["context"], c) for c in ex["choices"]]
        want = tasks.loglikelihoods(model, tok, [(prefix + ex["context"], c) for c in ex["choices"]], progress=False)
        np.testing.assert_allclose([r[0][0] for r in sample["resps"]], want, rtol=1e-5, atol=1e-4)


def test_the_delimiter_and_the_length_unit_matter(setup):
    """What the template fixes: lm-eval's default target_delimiter (a space) scores other strings, and a
    byte-length normalization ranks these examples differently from the character length both tools use."""
    model, tok = MonetForCausalLM.from_pretrained(setup / "ckpt"), load_tokenizer("byte")
    plain = [tasks.loglikelihoods(model, tok, [(ex["context"], c) for c in ex["choices"]], progress=False)
             for ex in EXAMPLES]
    spaced = [tasks.loglikelihoods(model, tok, [(ex["context"], " " + c) for c in ex["choices"]], progress=False)
              for ex in EXAMPLES]
    assert all(np.abs(np.asarray(a) - np.asarray(b)).min() > 1e-3 for a, b in zip(plain, spaced, strict=True))
    acc = lambda scores, norm: np.mean([int(np.argmax(np.asarray(s) / norm(ex))) == ex["answer"]
                                        for s, ex in zip(scores, EXAMPLES, strict=True)])
    chars = lambda ex: np.array([len(c) for c in ex["choices"]])
    utf8 = lambda ex: np.array([len(c.encode()) for c in ex["choices"]])
    assert acc(plain, chars) != acc(spaced, lambda ex: chars(ex))  # the delimiter changes acc_norm here
    assert acc(plain, chars) != acc(plain, utf8)  # so does the unit of length


def test_partial_scoring_agrees(setup, capsys):
    root, shots = setup, 1
    ours = eval_py(root, "partial", shots, capsys)
    theirs, samples = lm_eval(root, "partial", shots)
    assert theirs["acc,none"] == pytest.approx(ours["acc"], abs=1e-4)
    assert "acc_norm,none" not in theirs  # lm-eval would divide by the contexts' lengths here
    for k, (sample, ex) in enumerate(zip(samples, PARTIAL, strict=True)):
        shots_for = [s for j, s in enumerate(PARTIAL) if j != k][:shots]
        prefix = "".join(s["context"][s["answer"]] + s["choices"][s["answer"]] + "\n\n" for s in shots_for)
        assert [tuple(a) for a in sample["arguments"]] == [(prefix + c, ex["choices"][0]) for c in ex["context"]]


def test_generator_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": ["a", "b"], "choices": [" x", " y"], "answer": 0}) + "\n")
    assert task_main(["t", str(bad), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "example 1 has a context per choice but different continuations; lm-eval scores one continuation "
        "after every context")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(EXAMPLES[0]) + "\n" + json.dumps(PARTIAL[0]) + "\n")
    with pytest.raises(ValueError, match="mixes string and list contexts"):
        task_config("t", mixed)
    assert task_main(["t", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert "task file not found" in capsys.readouterr().err
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps(EXAMPLES[1]) + "\n")
    config = task_config("t", ok, fewshot_file=ok)
    assert config["fewshot_split"] == "train" and config["target_delimiter"] == ""
    assert config["dataset_kwargs"]["data_files"] == {"test": str(ok.resolve()), "train": str(ok.resolve())}
