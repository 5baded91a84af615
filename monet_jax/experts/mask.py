"""Expert deletion masks: which composed experts ``(i, j)`` of each routing group are cut out.

A mask file is JSON, readable by people and other tools::

    {"format": "monet-expert-mask", "moe_experts": 512,
     "groups": [[i * 512 + j, ...], ...],      # one list of deleted composed-expert ids per routing group
     "meta": {...}}                             # how the experts were selected (free form)

Deleting expert ``(i, j)`` zeroes its output ``E_ij(x)`` in every layer of its group; the routing
probabilities of the other experts are left as they are (no renormalization), as in the paper.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from monet_jax.model.experts import ExpertDeletion

if TYPE_CHECKING:
    from monet_jax.model.transformer import MonetForCausalLM

FORMAT = "monet-expert-mask"

@dataclass
class ExpertMask:
    """The composed experts to delete, per routing group: what ``eval.py experts select-domain`` and
    ``select-correlated`` write and every command's ``--mask`` reads.

    Ids are kept per group, not per layer, because the layers of a group share one router and so one set of
    composed experts. Apply one with ``apply_mask``.

    Attributes:
        experts: ``E`` (``moe_experts``): ids lie in ``[0, E * E)``.
        groups: Per routing group, the deleted ids ``i * E + j`` (sorted and unique once built).
        meta: How the experts were selected (free form; saved with the mask).

    Raises:
        ValueError: An id outside ``[0, E * E)``.
    """

    experts: int
    groups: list[np.ndarray]  # per routing group: sorted unique int64 ids i * E + j
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.groups = [np.unique(np.asarray(g, np.int64).reshape(-1)) for g in self.groups]
        for g, ids in enumerate(self.groups):
            if ids.size and (ids[0] < 0 or ids[-1] >= self.experts**2):
                raise ValueError(f"expert mask group {g}: ids must lie in [0, {self.experts ** 2})")

    @property
    def count(self) -> int:
        """How many composed experts the mask deletes, over all groups."""
        return sum(int(g.size) for g in self.groups)

    def matrix(self, group: int) -> np.ndarray:
        """``[E, E]`` float32, 1 where ``(i, j)`` is deleted."""
        d = np.zeros(self.experts * self.experts, np.float32)
        d[self.groups[group]] = 1.0
        return d.reshape(self.experts, self.experts)

    def union(self, other: ExpertMask) -> ExpertMask:
        """The experts that either mask deletes (both masks of the same model)."""
        if other.experts != self.experts or len(other.groups) != len(self.groups):
            raise ValueError("expert masks of different models cannot be combined")
        return ExpertMask(self.experts, [np.union1d(a, b) for a, b in zip(self.groups, other.groups, strict=True)],
                          {"union": [self.meta, other.meta]})

    def save(self, path: str | Path) -> Path:
        """Write the JSON file (parent directories too); returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": FORMAT, "moe_experts": self.experts,
                                    "groups": [g.tolist() for g in self.groups], "meta": self.meta}) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExpertMask:
        """Read a mask file; a missing, unreadable or malformed one is a one-line ``ValueError``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"expert mask {path}: no such file") from None
        except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
            raise ValueError(f"expert mask {path}: not readable JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"expert mask {path}: not a {FORMAT} file")
        try:
            return cls(int(data["moe_experts"]), list(data["groups"]), dict(data.get("meta", {})))
        except (KeyError, TypeError) as e:
            raise ValueError(f"expert mask {path}: missing or malformed field {e}") from None


def apply_mask(model: MonetForCausalLM, mask: ExpertMask | None) -> MonetForCausalLM:
    """Delete ``mask``'s experts from ``model`` in place, for every later call, until another mask replaces it.

    A deleted expert's output is subtracted inside each layer of its group; the other experts' routing
    probabilities are left as they are (no renormalization), as in the paper. The mask is a model variable
    of its own, never saved with the weights.

    Args:
        model: A Monet ``MonetForCausalLM``.
        mask: The experts to delete; ``None`` restores every expert.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: The mask is for another number of routing groups or experts, or the model is the
            dense baseline.
    """
    groups = model.model.routing_groups() if model.config.is_moe else []
    if mask is not None:
        if not model.config.is_moe:
            raise ValueError("the dense baseline has no experts to delete")
        if mask.experts != model.config.moe_experts or len(mask.groups) != len(groups):
            raise ValueError(f"expert mask is for {len(mask.groups)} routing groups of {mask.experts} experts, "
                             f"the model has {len(groups)} of {model.config.moe_experts}")
    dtype = np.dtype(model.config.compute_dtype)
    for g, layers in enumerate(groups):
        deleted = mask is not None and mask.groups[g].size > 0
        for layer in layers:
            layer.deleted = ExpertDeletion(jnp.asarray(mask.matrix(g), dtype)) if deleted else None
    return model


def load_mask(model: MonetForCausalLM, path: str | Path | None) -> MonetForCausalLM:
    """``apply_mask`` with a mask file: what the commands' ``--mask PATH`` does.

    Args:
        model: A Monet ``MonetForCausalLM``.
        path: A mask file (``ExpertMask.save``'s JSON); ``None`` leaves the model as it is.

    Returns:
        ``model``.
    """
    return model if path is None else apply_mask(model, ExpertMask.load(path))
