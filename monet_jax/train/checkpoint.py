"""Training checkpoints with Orbax ``CheckpointManager``: the sharded train state, the data iterator's
position and a small JSON record, saved asynchronously.

Restoring targets the *current* mesh's shardings and the current process count: the state is sharded by
Orbax, and the data position is one entry per row stream of the global batch (each process writes the
streams it reads; a restoring process takes its streams from all files), so a run saved by 2 processes
resumes on 1 or 4. A checkpoint is moved aside as ``<step>.corrupt`` only when it cannot be read (partly
written, truncated, deleted files); one that reads fine but belongs to another run or data pipeline is a
one-line error that changes nothing on disk.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from monet_jax import distributed
from monet_jax.data.pipeline import merge_states
from monet_jax.train.config import CheckpointConfig


class RunMismatch(ValueError):
    """A readable checkpoint that this run cannot use (another model, data set or pipeline)."""


class DataStateHandler(ocp.CheckpointHandler):
    """The data iterator's position: ``process_<i>.json`` per writing process, each holding the row streams
    that process reads; restoring merges every file, so any process count finds its rows."""

    def save(self, directory: epath.Path, args: DataSave) -> None:
        (directory / f"process_{jax.process_index()}.json").write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataRestore) -> None:
        files = sorted(directory.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{directory}: no data iterator state")
        states = [json.loads(f.read_text()) for f in files]
        try:
            args.iterator.set_state(merge_states(states))
        except ValueError as e:
            raise RunMismatch(f"{directory}: {e} (the data changed since this checkpoint: use another out_dir, or "
                              "checkpoint.resume=false to start over)") from None

    def metadata(self, directory: epath.Path) -> None:
        return None

    def structure(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    state: dict  # taken when the save is requested: an asynchronous write must not see later batches


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    iterator: Any


class TrainCheckpoints:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig, identity: dict | None = None):
        """``identity`` (JSON-able) names the run; resuming a checkpoint of another run is an error."""
        self.identity = identity
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True,
                                               enable_async_checkpointing=cfg.async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": DataStateHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: nnx.State, data_iterator, meta: dict, *, force: bool = False) -> bool:
        """Save unless ``step`` is already saved (a periodic save can coincide with the final one)."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
                                  data=DataSave(data_iterator.get_state()),
                                  meta=ocp.args.JsonSave(dict(meta, step=step, run=self.identity)))
        return self.manager.save(step, args=args, force=force)

    def restore_latest(self, abstract_state: nnx.State, data_iterator) -> tuple[int, nnx.State, dict] | None:
        """Newest restorable checkpoint as ``(step, state, meta)``; ``data_iterator`` is repositioned.

        Every process takes the same decision: a step counts as unreadable when any process failed to read it.
        """
        for step in reversed(self.steps()):
            error = None
            try:
                self._check_run(step, abstract_state)
                restored = self.restore(step, abstract_state, data_iterator)
            except RunMismatch as e:
                error = e
            except Exception as e:  # noqa: BLE001 -- an unreadable step: use the previous one
                error = e
            if distributed.agree(isinstance(error, RunMismatch)):
                raise error if isinstance(error, RunMismatch) else RunMismatch(
                    f"{self.directory}: checkpoint step {step} belongs to another run on another process")
            if not distributed.agree(error is not None):
                return step, *restored
            reason = _first_line(error) if error is not None else "another process could not read it"
            self._move_aside(step)
            warnings.warn(f"checkpoint step {step} in {self.directory} could not be restored ({reason}); "
                          f"moved to {step}.corrupt, trying the previous one", stacklevel=2)
        return None

    def _check_run(self, step: int, abstract_state: nnx.State) -> None:
        """RunMismatch when step ``step`` is readable but not this run's: another model or data (the saved
        identity), or a train state of another structure (e.g. routers frozen or not, another optimizer)."""
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if self.identity is not None and saved.get("run") != json.loads(json.dumps(self.identity)):
            other = saved.get("run") or {}
            diff = sorted(k for k in self.identity if other.get(k) != json.loads(json.dumps(self.identity[k])))
            raise RunMismatch(f"{self.directory} holds checkpoints of a different run (differs in "
                              f"{', '.join(diff) or 'everything'}); use another out_dir or checkpoint.resume=false")
        have = _shapes(self.manager.item_metadata(step)["state"])
        want = _shapes(nnx.to_pure_dict(abstract_state))
        if have != want:
            key = sorted(set(have) ^ set(want)) or sorted(k for k in want if have[k] != want[k])
            what = (f"{key[0]}: shape {have.get(key[0])} saved, {want.get(key[0])} here" if key[0] in have and
                    key[0] in want else f"{key[0]} is only {'saved' if key[0] in have else 'here'}")
            raise RunMismatch(f"{self.directory}: checkpoint step {step} holds a train state of another structure "
                              f"({what}); use another out_dir or checkpoint.resume=false")

    def restore(self, step: int, abstract_state: nnx.State, data_iterator) -> tuple[nnx.State, dict]:
        target = nnx.to_pure_dict(abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=DataRestore(data_iterator),
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
        distributed.barrier(f"monet_checkpoint_move_aside_{step}")
        self.manager.reload()

    def delete_all(self) -> None:
        for step in self.steps():
            self.manager.delete(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(getattr(v, "shape", ()))
            for path, v in leaves}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
