"""Which implementation runs a Monet layer, where a Pallas kernel lowers, and how it is partitioned.

``moe_impl`` (config): ``xla`` (the lane-dense math as XLA fusions, the default), ``pallas`` (fused router
and mixing kernels),
``sparse`` (gather only the active experts' weights: decoding, small batches) or ``auto``. A request
that cannot be honoured falls back to ``xla`` with one logged warning per reason. Pallas lowers for TPU
(Mosaic; AOT-compiled in the tests) and for GPU (Triton: the mixing passes of :mod:`~monet_jax.kernels.mixing_gpu`
and the router's GPU grid; lowered for CUDA from a CPU host in the tests, see :func:`lowering_for`); on CPU only
in interpret mode (``MONET_PALLAS_INTERPRET=1`` or :func:`force_interpret`), which is how the tests run the
kernels through the whole model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import jax
from jax.sharding import PartitionSpec

from monet_jax import sharding

log = logging.getLogger(__name__)
INTERPRET_ENV = "MONET_PALLAS_INTERPRET"
_interpret_override: bool | None = None
_platform_override: str | None = None
_warned: set[str] = set()
BLOCK_CAP = 256  # most tokens per kernel block (tests lower it to exercise several, partial blocks)


def interpret_mode() -> bool:
    if _interpret_override is not None:
        return _interpret_override
    return os.environ.get(INTERPRET_ENV, "") not in ("", "0")


@contextlib.contextmanager
def force_interpret(on: bool = True):
    """Run (trace) the Pallas kernels in interpret mode inside this block, whatever the backend."""
    global _interpret_override
    old, _interpret_override = _interpret_override, on
    try:
        yield
    finally:
        _interpret_override = old


@contextlib.contextmanager
def lowering_for(platform: str):
    """Build the kernels (and choose paths) for ``platform`` (``tpu`` or ``gpu``) inside this block, whatever
    the host: with ``jax.jit(...).trace(...).lower(lowering_platforms=...)`` a CPU host lowers the GPU kernels
    to Triton, or, with :func:`force_interpret`, runs their GPU form in interpret mode."""
    global _platform_override
    old, _platform_override = _platform_override, platform
    try:
        yield
    finally:
        _platform_override = old


@contextlib.contextmanager
def cuda_lowering(device_kind: str = "NVIDIA H100 80GB HBM3"):
    """Lower the GPU kernels for CUDA from a host without a GPU (with ``lowering_platforms=("cuda",)``):
    :func:`lowering_for` ``gpu``, and where jax reads the GPU a Pallas Triton kernel is built for from the
    abstract mesh (jax 0.12: otherwise "No supported GPU devices found"), an abstract ``device_kind`` there."""
    from jax._src import mesh as mesh_lib

    abstract = None
    # Not under an active mesh: shard_map would then see two different context meshes (on jax 0.12 a sharded
    # program needs its mesh's own devices to be GPUs, as in the H100 compile).
    if hasattr(mesh_lib, "AbstractDevice") and sharding._ACTIVE.get() is None:
        try:
            device = mesh_lib.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
            abstract = mesh_lib.AbstractMesh((1,), ("cuda_target",), abstract_device=device)
        except TypeError:  # an AbstractMesh without abstract devices: the kernels need none there
            abstract = None
    with lowering_for("gpu"), (jax.sharding.use_abstract_mesh(abstract) if abstract is not None
                               else contextlib.nullcontext()):
        yield


def target_platform() -> str:
    """The platform being compiled for: :func:`lowering_for`'s, else the active mesh's devices (an AOT
    compile for a TPU topology runs on a CPU host), else the default backend."""
    if _platform_override is not None:
        return _platform_override
    active = sharding._ACTIVE.get()
    if active is not None:
        return active[0].devices.flat[0].platform
    return jax.default_backend()


# XLA:GPU rewrites a product of one row, ``x @ W`` below about 10M elements, into ``x * W`` written to memory
# and summed ("dot strength reduction"): three times the weight's bytes at every decoding step of a batch of
# one. Decoding compiles with that pass off, so the product stays a matrix product (checked in the H100
# compile: ``tests/test_aot_gpu.py``). An option XLA does not know as a pass name is ignored.
GPU_DECODE_OPTIONS = {"xla_disable_hlo_passes": "dot-strength-reduction"}


def decode_compiler_options() -> dict | None:
    """XLA options for a decoding (few-row) program on the target: :data:`GPU_DECODE_OPTIONS` on a GPU."""
    return dict(GPU_DECODE_OPTIONS) if target_platform() == "gpu" else None


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def pallas_available() -> bool:
    """TPU (Mosaic), GPU (Triton) or interpret mode."""
    return interpret_mode() or target_platform() in ("tpu", "gpu")


def sparse_k(requested: int, topk: int, experts: int) -> int:
    """Experts gathered per token and head by the sparse path (exact anyway: see ``kernels.sparse``)."""
    return min(experts, requested or 2 * topk)


def choose(requested: str, tokens: int, heads: int, experts: int, k: int) -> str:
    """Resolve ``moe_impl`` for one call of ``tokens`` tokens to ``xla``, ``pallas`` or ``sparse``.

    ``auto`` takes the sparse path when it reads fewer expert weights than the dense one
    (``tokens * heads * k < experts`` rows of each weight) and the target is not a GPU, else Pallas on TPU
    (its Mosaic lowering is compile-checked at every published size), else XLA. On a GPU (an H100) the
    sparse path's first form (XLA gathers at three widths) decoded 1.4B VD at 741 tokens/s against the dense
    path's 985 (batch 2); its Pallas form (:mod:`~monet_jax.kernels.sparse_gpu`, fewer kernels a step than
    the dense path) is not timed yet, so ``auto`` stays dense there until it is."""
    if requested in ("xla", "sparse"):
        return requested
    if requested not in ("pallas", "auto"):
        raise ValueError(f"unknown moe_impl {requested!r}")
    if requested == "auto" and tokens * heads * k < experts and target_platform() != "gpu":
        return "sparse"  # not on a GPU: its gather and tier conditionals lost to the dense path there
    if requested == "pallas" and not pallas_available():
        warn_once(f"moe_impl=pallas: no Pallas lowering on {target_platform()} outside interpret mode "
                  f"(set {INTERPRET_ENV}=1 to interpret); using the XLA path")
        return "xla"
    if requested == "auto" and not (target_platform() == "tpu" or interpret_mode()):
        return "xla"
    return "pallas"


def compiler_params(platform: str, semantics: tuple[str, ...] = ("parallel",), num_warps: int = 4):
    """Per-backend Pallas options (TPU: ``semantics``, one of ``parallel`` / ``arbitrary`` per grid axis; GPU:
    Triton, whose grid is always parallel, with ``num_warps``); each backend's module is imported only when
    used."""
    if interpret_mode():
        return None
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=semantics)
    if platform == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=num_warps, num_stages=2)
    return None


def partitioned(fn, batched: tuple[bool, ...], out_batched: tuple[bool, ...]):
    """Run ``fn`` per shard of the batch axes under the active mesh (a Pallas custom call is opaque to
    the partitioner: without ``shard_map`` XLA would gather it onto every device). Batched arguments
    split their leading (batch) axis like ``batch`` activations; the others are replicated. Inside,
    every expert axis is whole, so tensor-parallel expert shards are gathered first."""
    active = sharding._ACTIVE.get()
    if active is None:
        return fn
    mesh, rules = active

    def run(*args):
        specs = []
        for a, b in zip(args, batched, strict=True):
            spec = sharding.logical_to_spec(("batch",) + (None,) * (a.ndim - 1), a.shape, mesh, rules) if b else None
            specs.append(spec if spec is not None else PartitionSpec())
        batch_spec = next((s for s, b in zip(specs, batched, strict=True) if b), PartitionSpec())
        if all(s == PartitionSpec() for s in specs):
            return fn(*args)
        outs = tuple(PartitionSpec(*batch_spec[:1]) if b else PartitionSpec() for b in out_batched)
        return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=outs if len(outs) > 1 else outs[0],
                             check_vma=False)(*args)

    return run


def block_tokens(n: int, bytes_per_token: int, budget: int = 2 << 20, cap: int | None = None) -> int:
    """Tokens per kernel block: a power of two (>= 8, Mosaic's sublane tile) whose working set fits
    ``budget`` bytes, no larger than ``n`` rounded up to 8."""
    fit = max(8, 2 ** int(math.log2(max(1, budget // max(1, bytes_per_token)))))
    return max(8, min(cap or BLOCK_CAP, fit, -(-n // 8) * 8))
