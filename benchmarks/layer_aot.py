"""One routing group of Monet layers against dense SwiGLU layers of equal parameters, compiled for one TPU
chip on this (CPU) machine: the quick loop for kernel work, beside ``tools/aot_compile.py``'s whole step.

    python benchmarks/layer_aot.py --config configs/monet-vd-1.4b.yaml                  # XLA path
    python benchmarks/layer_aot.py --config configs/monet-vd-1.4b.yaml model.moe_impl=pallas
    python benchmarks/layer_aot.py --config configs/monet-vd-1.4b.yaml model.moe_impl=pallas model.remat=layer

Compiles forward + backward (gradients of every parameter and of the input) of the router and
``moe_groups`` expert layers that share it, in ``bfloat16`` with float32 weights, on ``--tokens`` tokens
(default 2 rows of 2048; the per-device microbatch of ``configs/pretrain-v4-64.yaml`` is 8 rows), and the same
for ``moe_groups`` SwiGLU MLPs whose width matches the group's parameters. Prints the compiler's FLOPs
and bytes, the bytes of Pallas kernel calls (which the compiler does not count), the ratio, and the largest
movers of the Monet program by bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from monet_jax import sharding  # noqa: E402
from monet_jax.config import MonetConfig  # noqa: E402
from monet_jax.model.experts import DenseMLP, make_experts  # noqa: E402
from monet_jax.model.router import Router  # noqa: E402
from monet_jax.train import aot, hlo_bytes  # noqa: E402


class Group(nnx.Module):
    """A router and the ``moe_groups`` expert layers it serves (residual between them), or dense MLPs."""

    def __init__(self, cfg: MonetConfig):
        self.remat = cfg.remat == "layer"
        kw = dict(param_dtype=jnp.dtype(cfg.param_dtype), compute_dtype=jnp.dtype(cfg.compute_dtype),
                  rngs=nnx.Rngs(0))
        self.router = Router(cfg, **kw) if cfg.is_moe else None
        make = make_experts if cfg.is_moe else DenseMLP
        self.layers = nnx.List([make(cfg, **kw) for _ in range(cfg.moe_groups)])

    def __call__(self, x):
        wrap = nnx.remat if self.remat else (lambda f: f)  # each layer rematerialized, as model.remat=layer
        if self.router is None:
            for layer in self.layers:
                x = x + wrap(lambda layer, x: layer(x))(layer, x)
            return x
        probs = None
        for layer in self.layers:
            x, probs = wrap(_expert_layer)(layer, self.router, x, probs)
        return x


def _expert_layer(layer, router, x, probs):
    """One expert layer; the first of the group routes (inside its remat region, as in the model)."""
    if probs is None:
        probs = router.route(x, lanes_dtype=layer.compute_dtype)
    out, lanes_probs = layer(x, probs[0], probs[1], lanes_probs=probs[3:], carry=True)  # g passed on, as in the model
    return x + out, (*probs[:3], *(lanes_probs or ()))


def dense_twin(cfg: MonetConfig) -> MonetConfig:
    """SwiGLU MLPs with the group's parameters (its expert layers plus their one router)."""
    d, e, m, h = cfg.hidden_size, cfg.moe_experts, cfg.moe_dim, cfg.moe_heads
    params = cfg.moe_groups * (2 * d * e * m + e * m + e * d) + 2 * d * h * e
    return dataclasses.replace(cfg, moe_decompose="none", hidden_act="silu",
                               intermediate_size=round(params / (3 * d * cfg.moe_groups)))


def compile_group(cfg: MonetConfig, tokens: int, seq: int, device):
    """Forward + backward of a group on ``tokens`` tokens, compiled for ``device``; the compiled program."""
    group = nnx.eval_shape(lambda: Group(cfg))
    if group.router is not None:
        group.router.train()
    graphdef, state = nnx.split(group)
    sh = jax.sharding.SingleDeviceSharding(device)
    place = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t)  # noqa: E731
    x = jax.ShapeDtypeStruct((tokens // seq, seq, cfg.hidden_size), jnp.dtype(cfg.compute_dtype), sharding=sh)

    def loss(group, x, ct):
        return jnp.sum(group(x).astype(jnp.float32) * ct.astype(jnp.float32))

    def grads(state, x, ct):
        group = nnx.merge(graphdef, state)
        return nnx.grad(loss, argnums=(0, 1))(group, x, ct)

    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), [device])
    with sharding.activate(mesh):  # so the kernels see the TPU as their target
        return jax.jit(grads).lower(place(state), x, x).compile()


def measure(cfg: MonetConfig, tokens: int, seq: int, device) -> dict:
    compiled = compile_group(cfg, tokens, seq, device)
    cost = compiled.cost_analysis()
    ops = hlo_bytes.instruction_bytes(compiled.as_text())
    custom = hlo_bytes.kernel_bytes(ops)
    compiler_bytes = float(cost.get("bytes accessed", 0.0))
    return {"flops": float(cost.get("flops", 0.0)), "compiler_bytes": compiler_bytes, "kernel_bytes": custom,
            "bytes": compiler_bytes + custom, "hlo_bytes": sum(o.bytes for o in ops),
            "temp": compiled.memory_analysis().temp_size_in_bytes, "ops": ops}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/monet-vd-1.4b.yaml")
    p.add_argument("--tokens", type=int, default=2 * 2048)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--topology", default="v4:2x2x1", help="its first chip is compiled for")
    p.add_argument("--monet-only", action="store_true", help="skip the dense twin")
    p.add_argument("--top", type=int, default=12, help="rows of the bytes table")
    p.add_argument("overrides", nargs="*", help="dotted model overrides, e.g. model.moe_impl=pallas")
    args = p.parse_args(argv)
    overrides = ["compute_dtype=bfloat16"] + [o.removeprefix("model.") for o in args.overrides]
    cfg = MonetConfig.from_yaml(args.config, overrides)
    devices, _, _ = aot.tpu_devices(args.topology)
    gen = args.topology.split(":")[0]
    rows = []
    for name, c in (("monet", cfg), ("dense", dense_twin(cfg)))[:1 if args.monet_only else 2]:
        r = measure(c, args.tokens, args.seq, devices[0])
        seconds = max(r["flops"] / 275e12, r["bytes"] / aot.HBM_BYTES_PER_S[gen])
        rows.append((name, r, seconds))
        width = f"width {c.intermediate_size}" if name == "dense" else f"{c.moe_decompose} impl {c.moe_impl}"
        print(f"{name:>6} ({width}): {r['flops']:.4g} FLOPs, {r['bytes']:.4g} bytes "
              f"(compiler {r['compiler_bytes']:.4g} + kernels {r['kernel_bytes']:.4g}; "
              f"HLO shapes {r['hlo_bytes']:.4g}), temporaries {r['temp'] / 2**30:.2f} GiB, "
              f"roofline {1e3 * seconds:.2f} ms", flush=True)
    if len(rows) == 2:
        (_, monet, s_monet), (_, dense, s_dense) = rows
        print(f"monet / dense: bytes {monet['bytes'] / dense['bytes']:.3f}x, roofline {s_monet / s_dense:.3f}x "
              f"({args.tokens} tokens, {cfg.moe_groups} layers + router vs {cfg.moe_groups} SwiGLU MLPs)")
    for name, r, _ in rows:
        print(f"\nlargest movers, {name} (by the HLO shapes):\n" + hlo_bytes.table(r["ops"], args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
