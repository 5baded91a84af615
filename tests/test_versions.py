"""The supported jax/flax ranges: the install metadata, the pinned CI sets and the import-time check agree."""

import re
import tomllib
from pathlib import Path

import pytest

from monet_jax import versions

ROOT = Path(__file__).resolve().parent.parent


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _declared() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.match(r"[A-Za-z0-9_.-]+", d).group().lower(): d for d in deps}


@pytest.mark.parametrize("text, parsed", [("0.10.2", (0, 10, 2)), ("0.12.0.1", (0, 12, 0, 1)),
                                          ("0.5.3rc1", (0, 5, 3)), ("2.13.0+cpu", (2, 13, 0)),
                                          ("0.13.0.dev20261201", (0, 13, 0))])
def test_parse_reads_the_release_numbers(text, parsed):
    assert versions.parse(text) == parsed


@pytest.mark.parametrize("jax_v, flax_v, ok", [("0.10.2", "0.12.8", True), ("0.11.2", "0.12.12", True),
                                               ("0.12.0.1", "0.12.12", True), ("0.11.2", "0.12.8", False),
                                               ("0.12.0.1", "0.12.8", False), (None, "0.12.8", True)])
def test_the_one_impossible_pair_is_named_with_its_fix(jax_v, flax_v, ok):
    reason = versions.incompatibility(jax_v, flax_v)
    if ok:
        assert reason is None
    else:
        assert reason == f"flax 0.12.8 does not run on jax {jax_v}: pip install 'flax>=0.12.9,<0.13'"


def test_versions_outside_the_tested_ranges_are_named():
    assert versions.untested("0.12.0.1", "0.12.12") is None
    assert versions.untested("0.13.0", "0.12.12") == (
        "jax 0.13.0 is outside the range monet-jax is tested with (0.10.2 to below 0.13)")
    assert versions.untested("0.10.2", "0.11.2").startswith("flax 0.11.2 is outside")


def test_pyproject_declares_the_ranges_the_check_knows():
    declared = _declared()
    assert declared["jax"] == declared["jaxlib"].replace("jaxlib", "jax") == "jax>=0.10.2,<0.13"
    assert declared["flax"] == "flax>=0.12.8,<0.13"
    assert versions.JAX_RANGE == ((0, 10, 2), (0, 13)) and versions.FLAX_RANGE == ((0, 12, 8), (0, 13))


@pytest.mark.parametrize("name, jax_v, flax_v", [("py311-jax0.10.txt", "0.10.2", "0.12.8"),
                                                 ("py313-jax0.12.txt", "0.12.0.1", "0.12.12")])
def test_each_pinned_ci_set_is_one_end_of_the_range(name, jax_v, flax_v):
    pins = _pins(ROOT / "constraints" / name)
    assert (pins["jax"], pins["jaxlib"], pins["flax"]) == (jax_v, jax_v, flax_v)
    assert versions.incompatibility(pins["jax"], pins["flax"]) is None
    assert versions.untested(pins["jax"], pins["flax"]) is None
    for dist in ("optax", "orbax-checkpoint", "grain", "libtpu", "tokenizers", "safetensors"):
        assert dist in pins, f"{name} does not pin {dist}"
