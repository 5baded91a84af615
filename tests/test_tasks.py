"""Multiple-choice scoring by log-likelihood (eval.py tasks)."""

import json

import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.data.tokenizer import load_tokenizer
from monet_jax.eval import tasks
from monet_jax.eval.main import main as eval_main
from monet_jax.train.config import TrainConfig
from monet_jax.train.main import run

HANDCRAFTED = [
    {"context": "def main():\n    return", "choices": [" None", " Nqxj"], "answer": 0},
    {"context": "The model is trained on", "choices": [" zzkq wvx", " the corpus"], "answer": 1},
    {"context": "import numpy as", "choices": [" np", " q#"], "answer": 0},
    {"context": "for i in", "choices": [" range(n):", " )(]]}{"], "answer": 0},
    {"context": "self.", "choices": ["config", "qzxvk"], "answer": 0},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_loglikelihoods(model, tokenizer, requests, max_len: int = 10**9) -> list[float]:
    """Every sequence from position 0 with only filler after it (a causal model's logits at a position never
    see later tokens), so one forward pass scores them all; log-softmax summed in NumPy over each
    continuation."""
    seqs, conts = [], []
    for context, continuation in requests:
        cont = [int(t) for t in tokenizer.encode(continuation)]
        seqs.append(([tokenizer.bos_id, *map(int, tokenizer.encode(context))] + cont)[-(max_len + 1):])
        conts.append(cont)
    width = max(len(ids) for ids in seqs) - 1
    rows = np.array([ids[:-1] + [0] * (width - len(ids) + 1) for ids in seqs], np.int32)
    logits = np.asarray(model(rows).logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    out = []
    for row, ids, cont in zip(logp, seqs, conts, strict=True):
        start = len(ids) - len(cont)
        out.append(float(sum(row[start - 1 + k, t] for k, t in enumerate(cont))))
    return out


def test_batched_loglikelihoods_equal_one_sequence_at_a_time():
    cfg = TrainConfig().model
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(3))
    tok = load_tokenizer("byte")
    requests = [("Question: what is two plus two?\nAnswer:", " four"), ("a", "b"), ("", "just a continuation"),
                ("x" * 40, " y"), ("The end", ".")]
    # One reference pass for all: every request but the last is shorter than 64 tokens, so only the last is cut.
    want = reference_loglikelihoods(model, tok, [*requests, ("z" * 600, " end")], max_len=64)
    got = tasks.loglikelihoods(model, tok, requests, batch_size=2, progress=False)
    np.testing.assert_allclose(got, want[:-1], rtol=1e-5, atol=1e-4)
    # Contexts longer than the model's positions are cut from the left.
    long = tasks.loglikelihoods(model, tok, [("z" * 600, " end")], batch_size=1, max_len=64, progress=False)
    np.testing.assert_allclose(long, want[-1:], rtol=1e-5)


def test_shots_are_the_other_examples_with_their_answers():
    pool = [tasks.Example(c["context"], tuple(c["choices"]), c["answer"]) for c in HANDCRAFTED]
    prefix = tasks.few_shot_prefix(pool[1:3])
    assert prefix == "The model is trained on the corpus\n\nimport numpy as np\n\n"
    cfg = TrainConfig().model
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
    tok = load_tokenizer("byte")
    # Scoring pool[0] with 2 shots scores its choices after pool[1] and pool[2] (never pool[0] itself).
    direct = tasks.loglikelihoods(model, tok, [(prefix + pool[0].context, ch) for ch in pool[0].choices],
                                  progress=False)
    result = tasks.evaluate(model, tok, pool[:1], shots=2, shot_pool=pool, progress=False)
    assert result["acc"] == float(np.argmax(direct) == pool[0].answer)
    with pytest.raises(ValueError, match="5 shots requested but only 4"):
        tasks.evaluate(model, tok, pool, shots=5, progress=False)


@pytest.mark.slow
def test_a_trained_model_picks_the_right_answers(tmp_path, capsys):
    run(TrainConfig.load(None, [f"out_dir={tmp_path / 'run'}", "optim.steps=120", "data.batch_size=8",
                                "data.seq_len=64", "eval_every=1000", "eval_batches=1",
                                "metrics.tensorboard=false"]))
    path = write_jsonl(tmp_path / "hand.jsonl", HANDCRAFTED)
    assert eval_main(["tasks", str(tmp_path / "run" / "checkpoint"), str(path), "--shots", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("(5 examples, 1-shot)")
    acc, acc_norm = float(line.split("acc ")[1].split()[0]), float(line.split("acc_norm ")[1].split()[0])
    # Length normalization picks every right answer; the raw sum may still prefer a shorter wrong one.
    assert acc_norm == 1.0 and acc >= 0.8


def test_task_file_errors_are_one_line(tmp_path, capsys):
    model = MonetForCausalLM(TrainConfig().model, rngs=nnx.Rngs(0))
    model.save_checkpoint(tmp_path / "ckpt")
    cases = [
        ("missing.jsonl", None, "task file not found"),
        ("bad.jsonl", "{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"answer\": 0}\nnot json\n",
         "bad.jsonl:2: not valid JSON"),
        ("range.jsonl", '{"context": "a", "choices": ["b", "c"], "answer": 2}\n', "range.jsonl:1: needs two or more"),
        ("keys.jsonl", '{"question": "a", "choices": ["b", "c"], "answer": 0}\n', "keys.jsonl:1: expected context"),
    ]
    for name, text, needle in cases:
        if text is not None:
            (tmp_path / name).write_text(text)
        assert eval_main(["tasks", str(tmp_path / "ckpt"), str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("monet-eval: error:") and "\n" not in err and needle in err, err
