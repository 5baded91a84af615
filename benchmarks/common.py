"""What the benchmark scripts share: the equal-size dense twin, median step timing, peak device memory.
(Run as ``python benchmarks/X.py``, so this directory is on ``sys.path``.)"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from monet_jax.config import MonetConfig, count_params


def equal_size_dense(cfg: MonetConfig) -> MonetConfig:
    """Dense SwiGLU twin: same attention and depth, intermediate size matched on parameter count."""
    dense = dataclasses.replace(cfg, moe_decompose="none", hidden_act="silu", intermediate_size=1)
    per_unit = 3 * cfg.hidden_size * cfg.num_hidden_layers  # parameters per unit of intermediate size
    width = max(1, round((count_params(cfg) - count_params(dense) + per_unit) / per_unit))
    return dataclasses.replace(dense, intermediate_size=width)


def timed(fn, args, steps: int) -> float:
    """Median seconds of ``fn(*args)`` over ``steps`` calls after one compiling call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def peak_memory_gib(device=None) -> float | None:
    """Peak bytes in use where the backend reports them (GPU, TPU); ``None`` on CPU."""
    stats = (device or jax.devices()[0]).memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30 or None
