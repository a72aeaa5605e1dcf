"""Training checkpoints with orbax: the train state (adapters, optimizer state, step, RNG) as sharded arrays, and
each process's data-iterator position as JSON beside it.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when complete); the last
`keep` are kept. Once a save is complete, process 0 records the size and sha256 of each of its files
(checkpoints/integrity/step_N.json). Resuming takes the newest checkpoint that restores completely: its files
match their record, orbax restores it, and its data position exists. Newer ones that fail are moved to
`checkpoints_skipped/` beside `checkpoints/`, each with a printed reason; temporary directories of interrupted saves
are removed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from fa_jax.errors import FaJaxError

TMP_MARK = ".orbax-checkpoint-tmp"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True, clean: bool = True):
        self.directory = os.path.abspath(directory)
        self.keep, self.async_save = keep, async_save
        self.main = jax.process_index() == 0
        if clean and self.main:
            self._remove_orphans()
        self._unsigned: set[int] = set()
        self.manager = self._open()

    def _open(self):
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, enable_async_checkpointing=self.async_save,
                                                 create=True))

    def _remove_orphans(self) -> None:
        """Temporary directories of saves that never completed (a kill or a full disk during a save)."""
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if TMP_MARK in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                print(f"{self.directory}: removed {name} (a checkpoint save that did not complete)")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _data_file(self, step: int, process: int) -> str:
        return os.path.join(self.directory, "data_state", f"step_{step}.process_{process}.json")

    def _integrity_file(self, step: int) -> str:
        return os.path.join(self.directory, "integrity", f"step_{step}.json")

    # ------------------------------------------------------------------------------------------ saving

    def save(self, step: int, state, data_state: dict | None = None, force: bool = False) -> None:
        """Start saving `state` (and this process's data position) as checkpoint `step`. A failure to write is a
        FaJaxError naming the directory; the checkpoints saved before stay intact."""
        try:
            self._sign_finished(wait=True)
            if data_state is not None:
                # Written before the arrays: a checkpoint that exists always has its data position.
                path = self._data_file(step, jax.process_index())
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(data_state, f)
                os.replace(tmp, path)
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)
            self._unsigned.add(step)
            if not self.async_save:
                self._sign_finished(wait=False)
            self._prune()
        except FaJaxError:
            raise
        except Exception as e:
            self._save_failed(step, e)

    def _save_failed(self, step, e):
        with contextlib.suppress(Exception):
            self.manager.close()
        if self.main:
            self._remove_orphans()
        with contextlib.suppress(Exception):
            self.manager = self._open()
        kept = [s for s in self.all_steps() if s != step] if hasattr(self, "manager") else []
        intact = f"; checkpoint {kept[-1]} is intact" if kept else ""
        raise FaJaxError(f"{self.directory}: checkpoint {step} could not be written ({_first_line(e)}){intact}") \
            from None

    def _sign_finished(self, wait: bool) -> None:
        """Record file sizes and hashes of completed saves (process 0; every process waits for its saves)."""
        if not self._unsigned:
            return
        if wait:
            self.manager.wait_until_finished()
        done = set(self.manager.all_steps())
        for step in sorted(self._unsigned):
            if step in done and self.main:
                root = os.path.join(self.directory, str(step))
                files = {}
                for dirpath, _, names in os.walk(root):
                    for n in names:
                        p = os.path.join(dirpath, n)
                        files[os.path.relpath(p, root)] = [os.path.getsize(p), _sha256(p)]
                path = self._integrity_file(step)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "w") as f:
                    json.dump(files, f)
                os.replace(path + ".tmp", path)
        self._unsigned = {s for s in self._unsigned if s not in done}

    def _prune(self) -> None:
        """Data positions and integrity records of checkpoints orbax no longer keeps."""
        kept = set(self.manager.all_steps()) | self._unsigned
        newest = max(kept or [0])
        for sub in ("data_state", "integrity"):
            d = os.path.join(self.directory, sub)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                try:
                    step = int(name.split(".")[0].split("_")[1])
                except (IndexError, ValueError):
                    continue
                if step not in kept and step < newest:
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(d, name))

    # ----------------------------------------------------------------------------------------- restoring

    def verify(self, step: int) -> str | None:
        """Why checkpoint `step`'s files do not match the record made when it was saved (None: they match, or
        no record exists, as for a save interrupted before it was recorded)."""
        path = self._integrity_file(step)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                files = json.load(f)
        except (OSError, ValueError) as e:
            return f"its integrity record {path} is unreadable ({_first_line(e)})"
        root = os.path.join(self.directory, str(step))
        for rel, (size, digest) in sorted(files.items()):
            p = os.path.join(root, rel)
            if not os.path.exists(p):
                return f"{rel} is missing"
            if os.path.getsize(p) != size:
                return f"{rel} has {os.path.getsize(p)} bytes, {size} when saved"
            if _sha256(p) != digest:
                return f"{rel} has changed since it was saved"
        return None

    def _data_state(self, step: int, need: bool):
        path = self._data_file(step, jax.process_index())
        if not os.path.exists(path):
            if need:
                raise FaJaxError(f"its data position {os.path.relpath(path, self.directory)} is missing")
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise FaJaxError(f"its data position {os.path.relpath(path, self.directory)} is unreadable "
                             f"({_first_line(e)})") from None

    def saved_shapes(self, step: int, sharding=None):
        """Checkpoint `step`'s state as ShapeDtypeStructs placed on `sharding`, from the tree metadata orbax wrote
        with it: a restore target for a reader that does not rebuild the state (see `restore`)."""
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state")
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            getattr(meta, "tree", meta))

    def restore(self, abstract_state, step: int | None = None, need_data: bool = False, set_aside: bool = True,
                sharding=None):
        """(step, state, data_state) of the newest checkpoint that restores completely (or of `step`); state
        placed as `abstract_state` says (None: as it was saved, `saved_shapes`, every array on `sharding`). Newer
        checkpoints that fail are reported and (`set_aside`: a resuming run, not a reader) moved aside.
        `need_data`: a checkpoint without this process's data position does not count as complete."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FaJaxError(f"{self.directory}: no checkpoint to resume from")
        skipped = []
        for s in steps:
            try:
                reason = self.verify(s)
                if reason is not None:
                    raise FaJaxError(reason)
                data_state = self._data_state(s, need_data)
                target = self.saved_shapes(s, sharding) if abstract_state is None else abstract_state
                restored = self.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
            except Exception as e:  # any failure to read it: try the next older one
                reason = str(e) if isinstance(e, FaJaxError) else _first_line(e)
                print(f"checkpoint {s} skipped: {reason}")
                skipped.append((s, reason))
                continue
            if skipped and set_aside:
                self._set_aside([s_ for s_, _ in skipped])
            return s, restored["state"], data_state
        listed = "; ".join(f"{s}: {r}" for s, r in skipped)
        raise FaJaxError(f"{self.directory}: no checkpoint restores ({listed}); move checkpoints/ away to start "
                         "the run again from step 0")

    def _set_aside(self, steps) -> None:
        """Move failed checkpoints out of orbax's directory (so new saves can take their step numbers)."""
        self.manager.close()
        if self.main:
            aside = self.directory.rstrip("/") + "_skipped"
            os.makedirs(aside, exist_ok=True)
            for s in steps:
                src = os.path.join(self.directory, str(s))
                dst = os.path.join(aside, str(s))
                if os.path.exists(dst):
                    shutil.rmtree(dst, ignore_errors=True)
                if os.path.exists(src):
                    os.rename(src, dst)
                for extra in (self._integrity_file(s), self._data_file(s, 0)):
                    with contextlib.suppress(OSError):
                        os.replace(extra, os.path.join(aside, f"{s}.{os.path.basename(extra)}"))
                print(f"moved checkpoint {s} to {dst}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("fa_jax checkpoints set aside")
        self.manager = self._open()

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._sign_finished(wait=False)

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self._sign_finished(wait=False)
        except FaJaxError:
            raise
        except Exception as e:
            self._save_failed(max(self._unsigned or [-1]), e)
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a tree of arrays, the target structure for a restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
