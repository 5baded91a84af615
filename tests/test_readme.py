"""The README's two quickstart commands stay what CI runs."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quickstart() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Install and quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def _words(command: str) -> list[str]:
    """A pip or pytest command's words, without the quiet flag and the ``python -m`` prefix CI adds."""
    words = [w for w in shlex.split(command) if w != "-q"]
    return words[2:] if words[:2] == ["python", "-m"] else words


def test_the_readme_shows_two_quickstart_commands():
    assert _quickstart() == ["pip install -e . && python train.py",
                             'pip install -c constraints/py311-jax0.10.txt -e ".[test]" && python -m pytest -q']


def test_the_readme_test_command_is_what_ci_runs():
    install, run = _quickstart()[1].split(" && ")
    ci = [_words(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("python ")]
    assert _words(install) in ci, "the README's install differs from .ci/run's"
    assert _words(run) in ci, "the README's test command differs from .ci/run's"
    constraints = shlex.split(install)[shlex.split(install).index("-c") + 1]
    assert (ROOT / constraints).is_file()
