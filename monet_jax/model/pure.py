"""Inference entry points as pure ``jax.jit`` functions of a model split once.

``nnx.jit`` walks the module graph in Python on every call (tens of milliseconds for a few hundred
Variables, whatever the model's size). :class:`PureModel` splits the model once and passes only its
state's leaves, a flat list that ``jax.jit``'s C++ dispatch handles in well under a millisecond
(DESIGN section 7). Compiled functions are shared by every model with the same structure.
"""

from __future__ import annotations

import functools
import os
import platform
from functools import partial

import jax
from flax import nnx

from monet_jax.kernels import dispatch
from monet_jax.model.experts import HorizontalExperts, VerticalExperts

_COMPILED: dict = {}
ONEDNN_DOTS = {"xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
# XLA's classic (Eigen) products: XLA's CPU backend otherwise hands each product to YNNPACK.
EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# Fewest rows (tokens per call) for which oneDNN's and YNNPACK's products beat Eigen's on this model's shapes.
ONEDNN_MIN_ROWS = 128
CPU_DOTS = ("auto", "onednn", "eigen", "xla")


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor (``GenuineIntel``, ``AuthenticAMD``) from ``/proc/cpuinfo``; ``""`` where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_compiler_options(rows: int | None = None) -> dict | None:
    """XLA options for inference on an x86 CPU: which library runs the matrix products.

    ``MONET_JAX_CPU_DOT``: ``auto`` (default), ``onednn``, ``eigen`` or ``xla`` (XLA's default, YNNPACK).
    ``auto`` picks, from ``benchmarks/cpu_gemm.py`` and ``benchmarks/decode_vs_torch.py`` on this model's
    shapes (BENCHMARKS.md), by the CPU's vendor:

    - Intel (a 2-core Xeon, AVX-512): Eigen for calls of fewer than ``ONEDNN_MIN_ROWS`` tokens (``rows``;
      decoding steps and short prefills: ``[8, 1024] x [1024, 4096]`` 1.7 ms against YNNPACK's 2.5 and
      oneDNN's 10, ``[32, 1024] x [1024, 4096]`` 3.0 against 5.5 and 5.0); oneDNN for forward passes over
      more tokens (``rows`` None: a corpus; 2 x 256 tokens: VD 399 ms against YNNPACK's 457, HD 409 against
      454). The HD mixing's batched ``[8, 512] x [512, 16]`` products take 3 ms in Eigen and 27 in oneDNN:
      XLA takes one choice per compiled program, so no product gets its best library everywhere.
    - Others (a 2-core AMD EPYC Zen 4, AVX-512): XLA's default everywhere. There oneDNN slowed the forward
      of 2 x 256 tokens (VD 382-422 ms against YNNPACK's 369-373, HD 413-451 against 357-372) and Eigen
      did not speed decoding up.

    Individual products only: oneDNN's fused-graph mode aborts compiling this model."""
    mode = os.environ.get("MONET_JAX_CPU_DOT", "auto")
    if mode not in CPU_DOTS:
        raise ValueError(f"MONET_JAX_CPU_DOT must be one of {', '.join(CPU_DOTS)}, got {mode!r}")
    if mode == "xla" or jax.default_backend() != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if mode == "auto":
        if cpu_vendor() != "GenuineIntel":
            return None
        return EIGEN_DOTS if rows is not None and rows < ONEDNN_MIN_ROWS else ONEDNN_DOTS
    return EIGEN_DOTS if mode == "eigen" else ONEDNN_DOTS


class ExpertRows(nnx.Variable):
    """An inference copy of an expert layer's ``u`` kernel as ``[E*m, d]`` (each expert's rows contiguous),
    for the sparse path to read only the experts in use (``monet_jax.kernels.sparse``). Never trained or saved."""


def decodes_sparse(config, batch: int) -> bool:
    """Whether decoding ``batch`` rows one token at a time takes the sparse expert path (``moe_impl``
    ``auto`` or ``sparse``), which reads ``u`` through :class:`ExpertRows`."""
    if not config.is_moe:
        return False
    k = dispatch.sparse_k(config.moe_sparse_k, config.moe_topk, config.moe_experts)
    return dispatch.choose(config.moe_impl, batch, config.moe_heads, config.moe_experts, k) == "sparse"


class PureModel:
    """A model in inference mode, split into its graph and its state's leaves.

    ``expert_rows``: add :class:`ExpertRows` copies of every expert layer's ``u`` to the split state (the
    model itself is left as it was), for decoding at small batches; they cost the memory of ``u`` once more.
    Split again (make a new one) after changing the model: an applied expert mask or new weights are
    not seen by an existing ``PureModel``."""

    def __init__(self, model, *, expert_rows: bool = False):
        model.eval()
        self.config = model.config
        added = []
        if expert_rows:
            for _, module in nnx.iter_modules(model):
                if isinstance(module, (VerticalExperts, HorizontalExperts)):
                    for name in ("u1", "u2") if isinstance(module, VerticalExperts) else ("u",):
                        setattr(module, f"{name}_rows", ExpertRows(getattr(module, name).kernel[...].T))
                        added.append((module, f"{name}_rows"))
        try:
            self.graphdef, state = nnx.split(model)
        finally:
            for module, name in added:
                delattr(module, name)
        self.leaves, self.treedef = jax.tree.flatten(state)

    def jit(self, fn, *, static_argnums: tuple[int, ...] = (), donate_argnums: tuple[int, ...] = (),
            rows: int | None = None):
        """``fn(model, *args)`` compiled as a function of the state: returns ``call(*args)``. Argument
        numbers count ``args`` (the model excluded); ``rows``: tokens per call where it is small (decoding;
        it picks the CPU's matmul, :func:`cpu_compiler_options`, and on a GPU keeps one-row products as
        matrix products, :func:`~monet_jax.kernels.dispatch.decode_compiler_options`)."""
        options = cpu_compiler_options(rows) or (dispatch.decode_compiler_options() if rows is not None else None)
        key = (fn, self.graphdef, self.treedef, static_argnums, donate_argnums, str(options))
        compiled = _COMPILED.get(key)
        if compiled is None:
            graphdef, treedef = self.graphdef, self.treedef

            def pure(leaves, *args):
                return fn(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), *args)

            compiled = _COMPILED[key] = jax.jit(pure, static_argnums=tuple(i + 1 for i in static_argnums),
                                                donate_argnums=tuple(i + 1 for i in donate_argnums),
                                                compiler_options=options)
        return partial(compiled, self.leaves)
