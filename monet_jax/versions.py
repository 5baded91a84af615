"""The jax and flax this package runs on, checked before either is imported.

pyproject declares ranges (jax/jaxlib 0.10.2 - 0.12.x, flax 0.12.8 - 0.12.x) so that pip keeps a jax a
user already has. One pairing inside those ranges cannot work and pip does not know it: flax 0.12.8 (the
newest for Python 3.11) does not import under jax 0.11+, where flax 0.12.9+ is needed. An environment that
already held flax 0.12.8 keeps it when jax is newer, and the failure deep inside flax says nothing useful,
so the package says what to install instead.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

JAX_RANGE = ((0, 10, 2), (0, 13))  # [lowest, first unsupported)
FLAX_RANGE = ((0, 12, 8), (0, 13))
FLAX_FOR_NEW_JAX = (0, 12, 9)  # the first flax that imports under jax 0.11+


def parse(text: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: ``"0.12.0.1"`` -> ``(0, 12, 0, 1)``, ``"0.5.3rc1"``
    -> ``(0, 5, 3)``."""
    out = []
    for part in text.split("+")[0].split("."):
        digits = re.match(r"\d*", part).group()
        if not digits:
            break
        out.append(int(digits))
        if digits != part:  # a pre-release or dev suffix ends the release numbers
            break
    return tuple(out)


def _installed(name: str) -> tuple[str, tuple[int, ...]] | None:
    try:
        text = version(name)
    except PackageNotFoundError:
        return None
    return text, parse(text)


def incompatibility(jax_version: str | None, flax_version: str | None) -> str | None:
    """A one-line reason why this jax/flax pair cannot run monet-jax, or None."""
    if jax_version is None or flax_version is None:
        return None  # not installed as distributions (a source tree): let the imports speak
    j, f = parse(jax_version), parse(flax_version)
    if j >= (0, 11) and f < FLAX_FOR_NEW_JAX:
        return (f"flax {flax_version} does not run on jax {jax_version}: "
                f"pip install 'flax>={'.'.join(map(str, FLAX_FOR_NEW_JAX))},<0.13'")
    return None


def untested(jax_version: str | None, flax_version: str | None) -> str | None:
    """Why this pair is outside the tested ranges (it may still work), or None."""
    for name, text, (low, high) in (("jax", jax_version, JAX_RANGE), ("flax", flax_version, FLAX_RANGE)):
        if text is not None and not low <= parse(text) < high:
            return (f"{name} {text} is outside the range monet-jax is tested with "
                    f"({'.'.join(map(str, low))} to below {'.'.join(map(str, high))})")
    return None


def check() -> None:
    """Raise ImportError with the fix when the installed jax and flax cannot run together; warn when they are
    outside the tested ranges."""
    jax_info, flax_info = _installed("jax"), _installed("flax")
    jax_v, flax_v = jax_info and jax_info[0], flax_info and flax_info[0]
    reason = incompatibility(jax_v, flax_v)
    if reason:
        raise ImportError(f"monet-jax: {reason}")
    note = untested(jax_v, flax_v)
    if note:
        import warnings

        warnings.warn(f"monet-jax: {note}", stacklevel=3)


check()  # on import: ``monet_jax/__init__`` imports this module before anything that imports jax or flax
