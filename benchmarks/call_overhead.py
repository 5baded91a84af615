"""Host time of one call of each jitted inference entry point, beyond the device's work.

    python benchmarks/call_overhead.py                 # a narrow 24-layer Monet-VD (the published depth)

Every entry point (generation's prefill and decoding loop, log-likelihood scoring, corpus perplexity,
router probabilities for the expert statistics and microscope) is ``PureModel.jit`` of a function of
the model. A call's overhead is measured as the time of a call that does no work on the device:
the same compiled dispatch with the model's state leaves but a trivial body, and the decoding loop
asked for zero more tokens. ``nnx.jit`` of the same trivial body is shown for comparison.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.eval import generate as gen
from monet_jax.model.pure import PureModel


def _nothing(model, ids_bt):
    return ids_bt + 1


def per_call(fn, calls: int) -> float:
    """Mean seconds per call (results waited for), after a compiling call."""
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    cfg = MonetConfig(vocab_size=256, hidden_size=64, num_hidden_layers=args.layers, num_attention_heads=4,
                      moe_dim=4, moe_heads=2, moe_experts=16, moe_topk=2, moe_groups=4, torch_dtype="float32")
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
    pure = PureModel(model)
    ids = np.zeros((1, 4), np.int32)
    print(f"{args.layers} layers, {len(pure.leaves)} state leaves, {jax.devices()[0].device_kind}")
    trivial = pure.jit(_nothing)
    print(f"PureModel.jit, trivial body:       {1e3 * per_call(lambda: trivial(ids), args.calls):7.3f} ms/call")
    decode = pure.jit(gen._decode, static_argnums=(3, 4), donate_argnums=(0,))
    prefill = pure.jit(gen._prefill, static_argnums=(3, 4, 5))
    fixed = gen._Fixed(jnp.ones((1, 16), bool), jax.random.key(0), jnp.int32(-1), jnp.int32(0), jnp.zeros(1, bool))
    stop = jnp.int32(1)
    state = [prefill(np.zeros((1, 8), np.int32), np.zeros((1, 8), np.int32), fixed, 8, gen.Sampling(), False)]

    def empty_decode():  # stop = tokens already drawn: the loop body never runs
        state[0] = decode(state[0], fixed, stop, gen.Sampling(), False)
        return state[0].n

    print(f"decoding loop, no step to run:     {1e3 * per_call(empty_decode, args.calls):7.3f} ms/call")
    nnx_trivial = nnx.jit(_nothing)
    print(f"nnx.jit, trivial body:             {1e3 * per_call(lambda: nnx_trivial(model, ids), 20):7.3f} ms/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
