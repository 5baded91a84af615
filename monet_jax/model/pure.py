"""Inference entry points as pure ``jax.jit`` functions of a model split once.

``nnx.jit`` walks the module graph in Python on every call (tens of milliseconds for a few hundred
Variables, whatever the model's size). :class:`PureModel` splits the model once and passes only its
state's leaves, a flat list that ``jax.jit``'s C++ dispatch handles in well under a millisecond
(DESIGN section 7). Compiled functions are shared by every model with the same structure.
"""

from __future__ import annotations

from functools import partial

import jax
from flax import nnx

_COMPILED: dict = {}


class PureModel:
    """A model in inference mode, split into its graph and its state's leaves.

    Split again (make a new one) after changing the model: an applied expert mask or new weights are
    not seen by an existing ``PureModel``."""

    def __init__(self, model):
        model.eval()
        self.config = model.config
        self.graphdef, state = nnx.split(model)
        self.leaves, self.treedef = jax.tree.flatten(state)

    def jit(self, fn, *, static_argnums: tuple[int, ...] = (), donate_argnums: tuple[int, ...] = ()):
        """``fn(model, *args)`` compiled as a function of the state: returns ``call(*args)``. Argument
        numbers count ``args`` (the model excluded)."""
        key = (fn, self.graphdef, self.treedef, static_argnums, donate_argnums)
        compiled = _COMPILED.get(key)
        if compiled is None:
            graphdef, treedef = self.graphdef, self.treedef

            def pure(leaves, *args):
                return fn(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), *args)

            compiled = _COMPILED[key] = jax.jit(pure, static_argnums=tuple(i + 1 for i in static_argnums),
                                                donate_argnums=tuple(i + 1 for i in donate_argnums))
        return partial(compiled, self.leaves)
