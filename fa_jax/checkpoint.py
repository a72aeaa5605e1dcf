"""Training checkpoints with orbax: the train state (adapters, optimizer state, step, RNG) as sharded arrays, and
each process's data-iterator position as JSON beside it. Saves are asynchronous and atomic (orbax writes to a
temporary directory and renames it when complete); the last `keep` are kept."""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from fa_jax.errors import FaJaxError


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _data_file(self, step: int, process: int) -> str:
        return os.path.join(self.directory, "data_state", f"step_{step}.process_{process}.json")

    def save(self, step: int, state, data_state: dict | None = None, force: bool = False) -> None:
        if data_state is not None:
            # Written before the arrays: a checkpoint that exists always has its data position.
            path = self._data_file(step, jax.process_index())
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(data_state, f)
            os.replace(tmp, path)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)
        self._prune_data_states()

    def _prune_data_states(self) -> None:
        d = os.path.join(self.directory, "data_state")
        if not os.path.isdir(d):
            return
        kept = set(self.manager.all_steps()) | set(self._pending())
        for name in os.listdir(d):
            try:
                step = int(name.split(".")[0].split("_")[1])
            except (IndexError, ValueError):
                continue
            if step not in kept and step < max(kept or [0]):
                os.remove(os.path.join(d, name))

    def _pending(self):
        latest = self.manager.latest_step()
        return [latest] if latest is not None else []

    def restore(self, abstract_state, step: int | None = None):
        """(step, state, data_state) for `step` (default: the latest); state placed as `abstract_state` says."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FaJaxError(f"{self.directory}: no checkpoint to resume from")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        data_state = None
        path = self._data_file(step, jax.process_index())
        if os.path.exists(path):
            with open(path) as f:
                data_state = json.load(f)
        return step, restored["state"], data_state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a tree of arrays, the target structure for a restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
