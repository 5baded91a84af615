"""One token-blocked ``pallas_call`` shape shared by every kernel here: a 1-D grid over blocks of tokens.

Token-indexed arguments are padded to a whole number of blocks (so any token count works) and their
outputs cropped; small per-call arguments (statistics, cotangents of token sums) are passed whole to
every block; ``blocks`` outputs hold one partial sum per block, added up by XLA afterwards (so the grid
stays parallel: megacore and multi-SM friendly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from monet_jax.kernels import dispatch


def _index_map(ndim: int, blocked: bool):
    if blocked:
        return lambda i: (i,) + (0,) * (ndim - 1)
    return lambda i: (0,) * ndim


def token_call(kernel, args, tokens: tuple[bool, ...], outs: list[tuple[tuple[int, ...], object, str]], *,
               block: int, name: str):
    """Run ``kernel(*in_refs, *out_refs)`` over token blocks of ``block`` rows.

    ``tokens[k]``: argument ``k`` has a leading token axis (else it is passed whole). ``outs``: one
    ``(trailing shape, dtype, kind)`` per output, kind ``tokens`` (``[n, ...]``) or ``blocks``
    (``[num_blocks, ...]``, one partial result per block)."""
    n = next(a.shape[0] for a, t in zip(args, tokens, strict=True) if t)
    npad = -(-n // block) * block
    nb = npad // block
    padded = [jnp.pad(a, [(0, npad - n)] + [(0, 0)] * (a.ndim - 1)) if t and npad != n else a
              for a, t in zip(args, tokens, strict=True)]
    in_specs = [pl.BlockSpec((block,) + a.shape[1:], _index_map(a.ndim, True)) if t
                else pl.BlockSpec(a.shape, _index_map(a.ndim, False)) for a, t in zip(padded, tokens, strict=True)]
    out_shape, out_specs = [], []
    for tail, dtype, kind in outs:
        rows, blk = (npad, block) if kind == "tokens" else (nb, 1)
        out_shape.append(jax.ShapeDtypeStruct((rows, *tail), dtype))
        out_specs.append(pl.BlockSpec((blk, *tail), _index_map(1 + len(tail), True)))
    results = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(nb,), in_specs=in_specs, out_specs=out_specs,
        interpret=dispatch.interpret_mode(), compiler_params=dispatch.compiler_params(dispatch.target_platform()),
        name=name)(*padded)
    return [r[:n] if kind == "tokens" and npad != n else r for r, (_, _, kind) in zip(results, outs, strict=True)]
