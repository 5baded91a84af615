"""The eight benchmarks' row converters and partial (per-choice context) scoring."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.data.tokenizer import load_tokenizer
from monet_jax.eval import tasks
from monet_jax.eval.benchmarks import CONVERTERS, convert

ROOT = Path(__file__).resolve().parent.parent
ROWS = {
    "mmlu": {"question": "2 + 2 = ?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"],
             "answer": 1},
    "arc": {"question": "Which is a mammal?", "choices": {"text": ["shark", "whale"], "label": ["A", "B"]},
            "answerKey": "B"},
    "winogrande": {"sentence": "The cup fell off the table because _ was too close to the edge.",
                   "option1": "the cup", "option2": "the table", "answer": "1"},
    "piqa": {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
    "siqa": {"context": "Alex gave Sam a gift.", "question": "How does Sam feel?", "answerA": "happy",
             "answerB": "angry", "answerC": "bored", "label": "1"},
    "openbookqa": {"question_stem": "The sun is a", "choices": {"text": ["star", "planet", "moon", "comet"],
                                                                 "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    "hellaswag": {"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
                  "endings": ["puts it in the oven.", "dives in [title] the [header] pool."], "label": 0},
    "commonsense_qa": {"question": "Where do you keep milk?",
                       "choices": {"text": ["fridge", "shoe"], "label": ["A", "B"]}, "answerKey": "A"},
}
EXPECTED = {
    "mmlu": ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
             "2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", [" A", " B", " C", " D"], 1),
    "arc": ("Question: Which is a mammal?\nAnswer:", [" shark", " whale"], 1),
    "winogrande": (["The cup fell off the table because the cup", "The cup fell off the table because the table"],
                   [" was too close to the edge."] * 2, 0),
    "piqa": ("Question: Open a jar\nAnswer:", [" Twist the lid.", " Eat the lid."], 0),
    "siqa": ("Q: Alex gave Sam a gift. How does Sam feel?\nA:", [" happy", " angry", " bored"], 0),
    "openbookqa": ("The sun is a", [" star", " planet", " moon", " comet"], 0),
    "hellaswag": ("Baking: A man mixes flour. He", [" puts it in the oven.", " dives in. the pool."], 0),
    "commonsense_qa": ("Question: Where do you keep milk?\nAnswer:", [" fridge", " shoe"], 0),
}


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_converters_write_the_tasks_format(name, tmp_path):
    assert set(CONVERTERS) == set(ROWS)
    src = tmp_path / f"{name}.jsonl"
    src.write_text(json.dumps(ROWS[name]) + "\n")
    assert convert(name, src, tmp_path / "out.jsonl") == 1
    ex = tasks.read_examples(tmp_path / "out.jsonl")[0]
    context, choices, answer = EXPECTED[name]
    assert ex.context == (tuple(context) if isinstance(context, list) else context)
    assert list(ex.choices) == choices and ex.answer == answer


def test_parquet_input_bad_rows_and_the_cli(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([ROWS["piqa"], ROWS["piqa"]]), tmp_path / "piqa.parquet")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "tasks_to_jsonl.py"), "piqa",
                           str(tmp_path / "piqa.parquet"), str(tmp_path / "p.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 0 and "wrote 2 piqa examples" in proc.stdout
    assert len(tasks.read_examples(tmp_path / "p.jsonl")) == 2
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="row 1 is not a arc row"):
        convert("arc", tmp_path / "bad.jsonl", tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="unknown benchmark 'boolq'"):
        convert("boolq", tmp_path / "bad.jsonl", tmp_path / "x.jsonl")


def test_partial_scoring_uses_each_choice_context():
    """WinoGrande-style examples: choice k is scored as log p(continuation | context k), checked against
    one forward pass per choice in NumPy."""
    cfg = MonetConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=128, moe_dim=4, moe_heads=2, moe_experts=8, moe_topk=2,
                      moe_groups=2, torch_dtype="float32")
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(5))
    tok = load_tokenizer("byte")
    ex = tasks.Example(("The cat sat because the cat", "The cat sat because the mat"), (" was tired.",) * 2, 0)

    def score(context, continuation):
        ids = [tok.bos_id, *tok.encode(context), *tok.encode(continuation)]
        logits = np.asarray(model(np.array([ids[:-1]], np.int32)).logits, np.float64)[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        n = len(tok.encode(continuation))
        return sum(logp[len(ids) - n - 1 + k, t] for k, t in enumerate(ids[-n:]))

    s = [score(ex.context[k], ex.choices[k]) for k in range(2)]
    r = tasks.evaluate(model, tok, [ex], progress=False)
    assert r["acc"] == float(np.argmax(s) == 0)
    r1 = tasks.evaluate(model, tok, [tasks.Example(ex.context, ex.choices, 1)], progress=False)
    assert r["acc"] + r1["acc"] == 1.0  # exactly one of the two answers wins
    assert tasks.few_shot_prefix([ex]) == "The cat sat because the cat was tired.\n\n"
