"""Training checkpoints with Orbax ``CheckpointManager``: the sharded train state, the data iterator's
position (one file per process, Grain's handler) and a small JSON record, saved asynchronously.

Restoring targets the *current* mesh's shardings, so a checkpoint written on one mesh loads on another.
A latest checkpoint that fails to restore (partly written, truncated, deleted files) is moved aside
as ``<step>.corrupt`` with a warning, and the one before it is used.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from monet_jax.train.config import CheckpointConfig


class RunMismatch(ValueError):
    pass


class _JsonStateIterator:
    """Presents any iterator with ``get_state() -> dict`` / ``set_state(dict)`` to Grain's handler
    (which stores each process's position as ``process_<i>-of-<n>.json``)."""

    def __init__(self, iterator):
        self.iterator = iterator

    def get_state(self) -> bytes:
        return json.dumps(self.iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:
        pass


class TrainCheckpoints:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig, identity: dict | None = None):
        """``identity`` (JSON-able) names the run; resuming a checkpoint of another run is an error."""
        self.identity = identity
        import grain

        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True,
                                               enable_async_checkpointing=cfg.async_save)
        self._grain = grain
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: nnx.State, data_iterator, meta: dict, *, force: bool = False) -> bool:
        """Save unless ``step`` is already saved (a periodic save can coincide with the final one)."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
                                  data=self._grain.checkpoint.CheckpointSave(_JsonStateIterator(data_iterator)),
                                  meta=ocp.args.JsonSave(dict(meta, step=step, run=self.identity)))
        return self.manager.save(step, args=args, force=force)

    def restore_latest(self, abstract_state: nnx.State, data_iterator) -> tuple[int, nnx.State, dict] | None:
        """Newest restorable checkpoint as ``(step, state, meta)``; ``data_iterator`` is repositioned."""
        for step in reversed(self.steps()):
            try:
                saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                if self.identity is not None and saved.get("run") != json.loads(json.dumps(self.identity)):
                    other = saved.get("run") or {}
                    diff = sorted(k for k in self.identity if other.get(k) != json.loads(json.dumps(self.identity[k])))
                    raise RunMismatch(f"{self.directory} holds checkpoints of a different run (differs in "
                                      f"{', '.join(diff) or 'everything'}); use another out_dir or "
                                      f"checkpoint.resume=false")
                return step, *self.restore(step, abstract_state, data_iterator)
            except RunMismatch:
                raise
            except Exception as e:  # noqa: BLE001 -- any failure to read a step means: use the previous one
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                self._move_aside(step)
                warnings.warn(f"checkpoint step {step} in {self.directory} could not be restored ({reason}); "
                              f"moved to {step}.corrupt, trying the previous one", stacklevel=2)
        return None

    def restore(self, step: int, abstract_state: nnx.State, data_iterator) -> tuple[nnx.State, dict]:
        target = nnx.to_pure_dict(abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=self._grain.checkpoint.CheckpointRestore(_JsonStateIterator(data_iterator)),
            meta=ocp.args.JsonRestore()))
        state = jax.tree.map(lambda x: x, abstract_state)  # a fresh State to fill in
        nnx.replace_by_pure_dict(state, restored["state"])
        return state, dict(restored["meta"])

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.directory / str(step)
            if src.exists():
                dst = self.directory / f"{step}.corrupt"
                shutil.rmtree(dst, ignore_errors=True)
                src.rename(dst)
        self.manager.reload()

    def delete_all(self) -> None:
        for step in self.steps():
            self.manager.delete(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
