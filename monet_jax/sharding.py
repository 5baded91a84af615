"""Device meshes and logical axis rules, in one place.

Parameters carry logical axis names (``nnx.Param(..., out_sharding=("embed", "expert_mlp"))``) and
key activations are annotated with :func:`constrain`; :data:`DEFAULT_RULES` maps logical names to the
mesh axes ``data``, ``fsdp`` and ``tensor``. The expert dimension shards like tensor parallelism (the
``E * m`` hidden units of the expert MLP are ordinary hidden units), so no expert parallelism is needed.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from monet_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (a name, a tuple of names, or None for replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("router", "tensor"),        # the H * E router logits of one projection
    ("experts", "tensor"),       # E: expert biases b/b1/b2 and the expert axis of activations
    ("expert_mlp", "tensor"),    # E * m hidden units of the expert MLP (expert-major)
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take every remaining device."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes must be positive or -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    if sizes.count(-1) > 1:
        raise ConfigError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor} does not divide "
                              f"{num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh {sizes[0]}x{sizes[1]}x{sizes[2]} (data x fsdp x tensor) needs {math.prod(sizes)} "
                          f"devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """A ``data x fsdp x tensor`` mesh; real hardware gets a topology-aware device order."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    try:
        arranged = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU and simulated devices have no physical topology to honour
        arranged = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arranged, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> PartitionSpec:
    """Resolve logical axis names to a ``PartitionSpec``. A mesh axis is used at most once, and a
    dimension that the mesh axes do not divide stays replicated (tiny configs run on any mesh)."""
    if not names:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """``NamedSharding`` for every variable of an NNX state, from its ``out_sharding`` metadata."""
    def one(var):
        value = var.get_value()
        if not hasattr(value, "shape"):  # e.g. optax's empty MaskedNode for frozen parameters
            return var
        spec = logical_to_spec(var.get_metadata().get("out_sharding"), value.shape, mesh, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# -- activations ------------------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar("monet_mesh", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES):
    """Make :func:`constrain` annotate activations while tracing under ``mesh``."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names; a no-op outside :func:`activate`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
    """Rows over the data-parallel axes, everything else replicated."""
    batch_axes = dict(rules)["batch"]
    return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    axes = dict(rules)["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def process_batch_rows(mesh: Mesh, batch_size: int, rules=DEFAULT_RULES) -> list[int]:
    """The rows of a global batch that this process's devices hold under :func:`batch_sharding`: the rows it
    reads from the data pipeline (several processes hold the same rows when a model axis spans them)."""
    index = batch_sharding(mesh, 2, rules).addressable_devices_indices_map((batch_size, 1))
    rows: set[int] = set()
    for idx in index.values():
        rows.update(range(*idx[0].indices(batch_size)))
    return sorted(rows)
