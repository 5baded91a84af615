"""The paper's eight zero-shot benchmarks, from their published row format (the fields of the Hugging
Face datasets) to the ``eval.py tasks`` JSONL. Prompts follow lm-eval's default templates, so scores are
comparable with numbers reported through it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path


def _letters(choices: dict) -> tuple[list[str], list[str]]:
    return [str(t) for t in choices["text"]], [str(label) for label in choices["label"]]


def _keyed(question: str, choices: dict, key: str) -> dict:
    texts, labels = _letters(choices)
    return {"context": f"Question: {question}\nAnswer:", "choices": [f" {t}" for t in texts],
            "answer": labels.index(str(key))}


def mmlu(row: dict) -> dict:
    """cais/mmlu: question, choices (4), answer (0-3); scored on the letter, as lm-eval's ``mmlu``."""
    subject = str(row.get("subject", "")).replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    options = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", row["choices"], strict=True))
    return {"context": f"{head}{row['question'].strip()}{options}\nAnswer:", "choices": [" A", " B", " C", " D"],
            "answer": int(row["answer"])}


def arc(row: dict) -> dict:
    """allenai/ai2_arc (Easy and Challenge): question, choices {text, label}, answerKey."""
    return _keyed(row["question"], row["choices"], row["answerKey"])


def winogrande(row: dict) -> dict:
    """allenai/winogrande: sentence with one ``_``, option1/2, answer "1"/"2"; partial scoring: each option
    fills the blank in its own context, and the rest of the sentence is the continuation scored."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    rest = " " + sentence[blank + 1:].strip()
    return {"context": [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]],
            "choices": [rest, rest], "answer": int(row["answer"]) - 1}


def piqa(row: dict) -> dict:
    """ybisk/piqa: goal, sol1, sol2, label."""
    return {"context": f"Question: {row['goal']}\nAnswer:", "choices": [f" {row['sol1']}", f" {row['sol2']}"],
            "answer": int(row["label"])}


def siqa(row: dict) -> dict:
    """allenai/social_i_qa: context, question, answerA/B/C, label "1"-"3"."""
    return {"context": f"Q: {row['context']} {row['question']}\nA:",
            "choices": [f" {row['answerA']}", f" {row['answerB']}", f" {row['answerC']}"],
            "answer": int(row["label"]) - 1}


def openbookqa(row: dict) -> dict:
    """allenai/openbookqa (main): question_stem, choices {text, label}, answerKey."""
    texts, labels = _letters(row["choices"])
    return {"context": row["question_stem"], "choices": [f" {t}" for t in texts],
            "answer": labels.index(str(row["answerKey"]))}


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict) -> dict:
    """Rowan/hellaswag: activity_label, ctx_a, ctx_b, endings (4), label."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"context": _hellaswag_clean(row["activity_label"] + ": " + ctx),
            "choices": [" " + _hellaswag_clean(e) for e in row["endings"]], "answer": int(row["label"])}


def commonsense_qa(row: dict) -> dict:
    """tau/commonsense_qa: question, choices {text, label}, answerKey."""
    return _keyed(row["question"], row["choices"], row["answerKey"])


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "mmlu": mmlu, "arc": arc, "winogrande": winogrande, "piqa": piqa, "siqa": siqa,
    "openbookqa": openbookqa, "hellaswag": hellaswag, "commonsense_qa": commonsense_qa,
}


def read_rows(path: str | Path) -> Iterable[dict]:
    """Rows of a JSONL, JSON (a list) or Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"benchmark file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    elif path.suffix == ".json":
        yield from json.loads(path.read_text())
    else:
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)


def convert(benchmark: str, src: str | Path, dst: str | Path) -> int:
    """Write ``dst`` (``eval.py tasks`` JSONL) from ``src``; returns the number of examples."""
    if benchmark not in CONVERTERS:
        raise ValueError(f"unknown benchmark {benchmark!r} (expected one of {', '.join(CONVERTERS)})")
    fn, lines = CONVERTERS[benchmark], []
    for n, row in enumerate(read_rows(src), 1):
        try:
            lines.append(json.dumps(fn(row)))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{src}: row {n} is not a {benchmark} row ({type(e).__name__}: {e})") from None
    Path(dst).write_text("".join(line + "\n" for line in lines))
    return len(lines)
