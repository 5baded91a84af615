"""Three distinguishable domains that exist on every machine with Python, for the expert-deletion demo:
English prose (the package's prose and the prose paragraphs of Python's own documentation), Python
source (the standard library), and arithmetic (a small formal language, generated)."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

from monet_jax.data.text import PACKAGE


def english(max_chars: int) -> list[str]:
    import pydoc_data.topics

    docs = [p for p in (PACKAGE / "data" / "corpus" / "prose.txt").read_text().split("\n") if p.strip()]
    for key in sorted(pydoc_data.topics.topics):
        for para in re.split(r"\n\s*\n", pydoc_data.topics.topics[key]):
            para = " ".join(para.split())
            letters = sum(c.isalpha() or c in " ,.;'()-" for c in para) / max(len(para), 1)
            if len(para) > 200 and para.endswith(".") and letters > 0.95 and not para.startswith(("*", ">>>")):
                docs.append(para)
    return _take(docs, max_chars)


def python_source(max_chars: int) -> list[str]:
    """Top-level blocks (functions, classes) of standard-library modules, in a fixed order."""
    stdlib = Path(os.__file__).parent
    docs = []
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(errors="replace")
        for block in re.split(r"\n(?=def |class )", text)[1:]:
            if 200 < len(block) < 3000:
                docs.append(block.strip() + "\n")
        if sum(map(len, docs)) > 2 * max_chars:
            break
    return _take(docs, max_chars)


def arithmetic(max_chars: int, seed: int = 0) -> list[str]:
    """Documents of ten true equations like ``(17 + 4) * 3 = 63``."""
    rng = random.Random(seed)
    docs, total = [], 0
    while total < max_chars:
        lines = []
        for _ in range(10):
            a, b, c = rng.randint(0, 99), rng.randint(0, 99), rng.randint(1, 9)
            op = rng.choice("+-*")
            expr = rng.choice([f"{a} {op} {b}", f"({a} {op} {b}) * {c}", f"{a} + {b} - {c}"])
            lines.append(f"{expr} = {eval(expr)}")  # noqa: S307 - generated digits and operators only
        docs.append("\n".join(lines))
        total += len(docs[-1])
    return docs


def _take(docs: list[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d)
        total += len(d)
    return out


def demo_domains(chars_per_domain: int = 100_000, seed: int = 0) -> dict[str, list[str]]:
    out = {"english": english(chars_per_domain), "python": python_source(chars_per_domain),
           "arithmetic": arithmetic(chars_per_domain, seed)}
    for docs in out.values():
        random.Random(seed).shuffle(docs)
    return out
