"""Run directories of `fa-jax pretrain` / `fa-jax sft`: what defines a run, the lock, and nothing half-written.

A run directory holds
    run.json        what defines the run: its settings, and fingerprints of the models, tokenizer and data files
    config.json     the resolved config (read through fa_jax.runs by `fa-jax export`, `sft init=foundation:RUN`,
                    `merge`)
    run.lock        while a process trains into it: {"host", "pid", "started"}
    checkpoints/    orbax checkpoints, data positions and integrity manifests (fa_jax.checkpoint)
    metrics.jsonl, loss_curve.png, tensorboard/, summary.json, adapter_peft/

Resuming compares the new run with `run.json` before anything in the directory changes. Settings fall in three
classes (`FREE_KEYS`, `SAFE_KEYS`, everything else):
  - free: how the run is executed or logged (mesh, remat, attention kernel, logging and checkpoint cadence); they
    change numbers at most by float rounding and may differ silently;
  - safe with `--force-resume` (`run.force_resume=true`): deliberate changes of the optimisation that keep the
    data stream and the adapter layout (more steps, another learning rate or schedule, loss weights);
  - structural: everything else (models, tokenizer, adapter layout, data files and their order, sequence length,
    batch rows, seeds): a resume with a different value is refused, with or without `--force-resume`; start a new
    run directory instead.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import time

from fa_jax.embedded import resolve_model_path
from fa_jax.errors import FaJaxError
from fa_jax.io.atomic import write_text
from fa_jax.runs import RUN_JSON, finished_summary, has_checkpoint, read_identity  # noqa: F401  (reading: runs.py)

LOCK = "run.lock"
FORMAT = 1

# Keys (flattened with dots) that never make a resume differ: execution and bookkeeping only.
FREE_KEYS = ("run.out_dir", "run.log_every", "run.save_every", "run.keep_checkpoints", "run.async_checkpoint",
             "run.tensorboard", "run.export_peft", "run.peak_flops", "run.memory_budget", "run.stop_after",
             "run.resume", "run.force_resume", "mesh.shape", "mesh.rules", "model.remat", "model.attention",
             "model.scan_layers",
             "loss.chunk_size", "data.streaming", "teacher.cache_dtype",
             # a cache may move: its id (teacher_cache) decides
             "teacher.cache",
             # models and data files may move: their fingerprints (models.*, data.*) decide
             "model.teacher", "model.student", "data.train")
# Prefixes / keys whose change a user may make deliberately with --force-resume.
SAFE_KEYS = ("run.steps", "optim.", "loss.", "adapter.dropout", "model.compute_dtype", "teacher.top_k",
             "teacher.quantize")


def flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def key_class(key: str) -> str:
    """"free", "safe" or "structural" for a flattened key of run.json (settings.* / models.* / data.* ...)."""
    if key.startswith("settings."):
        k = key[len("settings."):]
        if k in FREE_KEYS:
            return "free"
        if any(k == s or (s.endswith(".") and k.startswith(s)) for s in SAFE_KEYS):
            return "safe"
    return "structural"


# ------------------------------------------------------------------------------------------- fingerprints


def _file_digest(path: str, whole_below: int = 64 << 20, sample: int = 4 << 20) -> str:
    """sha256 of a file: all of it up to `whole_below` bytes, else its size, first and last `sample` bytes."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= whole_below:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(sample))
            f.seek(size - sample)
            h.update(f.read(sample))
    return h.hexdigest()[:16]


def _tree_digest(root: str, names=None) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if names is not None and name not in names:
                continue
            p = os.path.join(dirpath, name)
            h.update(os.path.relpath(p, root).encode())
            h.update(_file_digest(p).encode())
    return h.hexdigest()[:16]


_MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def model_fingerprint(spec) -> dict | None:
    """{"format", "bytes", "sha256"} of a model (HF directory: config.json and the weight files' names and
    sizes; .gguf: the file), None for no model. Cheap: no weights are read for directories."""
    if spec in (None, ""):
        return None
    path = resolve_model_path(spec)
    if os.path.isfile(path):
        return {"format": "file", "bytes": os.path.getsize(path), "sha256": _file_digest(path)}
    if not os.path.isdir(path):
        return {"missing": str(spec)}
    h = hashlib.sha256()
    total = 0
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if name in _MODEL_FILES:
            h.update(name.encode() + _file_digest(p).encode())
        elif name.endswith((".safetensors", ".bin", ".gguf")) and os.path.isfile(p):
            size = os.path.getsize(p)
            total += size
            h.update(f"{name}:{size}".encode())
    return {"format": "directory", "bytes": total, "sha256": h.hexdigest()[:16]}


def tokenizer_fingerprint(spec) -> str | None:
    """Digest of a model's tokenizer files (a GGUF file carries its tokenizer: its fingerprint covers it)."""
    if spec in (None, ""):
        return None
    path = resolve_model_path(spec)
    if not os.path.isdir(path):
        return "in the model file"
    return _tree_digest(path, TOKENIZER_FILES)


def data_fingerprint(spec):
    """Digest of a data source: files by content, directories by their files, in-memory lists by their JSON;
    None where it cannot be told (a Python iterator, a dataset object without a fingerprint)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if os.path.isfile(spec):
            return {"format": "file", "bytes": os.path.getsize(spec), "sha256": _file_digest(spec)}
        if os.path.isdir(spec):
            return {"format": "directory", "sha256": _tree_digest(spec)}
        return {"name": spec}  # a dataset name (hf:..., tfds:...): the name is what can be compared
    if isinstance(spec, (list, tuple)):
        try:
            return {"list": len(spec), "sha256": hashlib.sha256(json.dumps(
                [data_fingerprint(x) if isinstance(x, str) and os.path.exists(x) else x for x in spec],
                sort_keys=True, default=str).encode()).hexdigest()[:16]}
        except TypeError:
            return None
    fp = getattr(spec, "_fingerprint", None)
    return {"dataset": fp} if fp else None


def identity(cfg, kind: str, batches_given: bool = False) -> dict:
    """What defines a run, as run.json records it."""
    settings = json.loads(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg), default=str))
    m = cfg["model"]
    tok_source = m.get("teacher") if kind == "pretrain" else m.get("student")
    ident = {
        "format": FORMAT, "kind": kind, "settings": settings,
        "models": {"teacher": model_fingerprint(m.get("teacher")), "student": model_fingerprint(m.get("student"))},
        "tokenizer": tokenizer_fingerprint(tok_source),
        "data": "given by the caller" if batches_given else data_fingerprint(cfg["data"].get("train")),
        "teacher_cache": _cache_id((cfg.get("teacher") or {}).get("cache")),
    }
    if kind == "sft":
        init = str(cfg.get("init", "random"))
        if ":" in init:
            where, path = init.split(":", 1)
            p = os.path.join(path, "config.json") if where == "foundation" else os.path.join(path,
                                                                                          "adapter_config.json")
            ident["init"] = _file_digest(p) if os.path.isfile(p) else None
    return ident


def _cache_id(path) -> str | None:
    """The id a teacher cache records in its cache.json (fa_jax.teacher_cache), None for none or an unreadable one."""
    if not path:
        return None
    try:
        with open(os.path.join(path, "cache.json")) as f:
            return json.load(f).get("id")
    except (OSError, ValueError, AttributeError):
        return None


def differences(old: dict, new: dict) -> dict:
    """{flattened key: (old, new)} where the two identities differ."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _short(v) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


def check_resume(old: dict, new: dict, run_dir: str, force: bool) -> list[str]:
    """Refuse (FaJaxError) a resume whose identity differs structurally, or in safe keys without `force`.
    Returns the safe keys that differ (accepted with force), for a message."""
    diff = differences(old, new)
    unknown = (None, "given by the caller")
    if "data" in old and (old.get("data") in unknown or new.get("data") in unknown):
        # batches from the caller, or a Python object without a fingerprint: the caller answers for the data
        diff = {k: v for k, v in diff.items() if not (k == "data" or k.startswith("data."))}
    structural = {k: v for k, v in diff.items() if key_class(k) == "structural"}
    safe = {k: v for k, v in diff.items() if key_class(k) == "safe"}
    name = lambda k: k[len("settings."):] if k.startswith("settings.") else k
    if structural:
        items = "; ".join(f"{name(k)}: {_short(a)} -> {_short(b)}" for k, (a, b) in list(structural.items())[:6])
        more = f" (and {len(structural) - 6} more)" if len(structural) > 6 else ""
        raise FaJaxError(f"{run_dir}: cannot resume: this run differs from the one in the directory in {items}"
                         f"{more}; use another run.out_dir for a new run")
    if safe and not force:
        items = "; ".join(f"{name(k)}: {_short(a)} -> {_short(b)}" for k, (a, b) in safe.items())
        raise FaJaxError(f"{run_dir}: resuming with changed settings ({items}); pass --force-resume "
                         "(run.force_resume=true) if that is intended")
    return [name(k) for k in safe]


# ------------------------------------------------------------------------------------------------- lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(run_dir: str) -> str:
    """Create run_dir/run.lock for this process, or refuse when another live process holds it. A lock of a dead
    process on this host is taken over (with a message); one from another host is refused (its liveness cannot
    be seen from here)."""
    path = os.path.join(run_dir, LOCK)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = json.load(f)
                host, pid = owner["host"], int(owner["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                owner, host, pid = None, None, None
            if owner is not None and host == me["host"] and (pid == os.getpid() or _alive(pid)):
                raise FaJaxError(f"{run_dir}: another run is writing into this directory (process {pid} on "
                                 f"{host}, since {owner.get('started', '?')}); wait for it or use another "
                                 "run.out_dir")
            if owner is not None and host != me["host"]:
                raise FaJaxError(f"{run_dir}: locked by process {pid} on host {host} (since "
                                 f"{owner.get('started', '?')}); if that run is gone, delete {path}")
            what = f"process {pid} is gone" if owner is not None else "unreadable lock file"
            print(f"{run_dir}: taking over a stale lock ({what})")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise FaJaxError(f"{path}: could not take the run lock")


def release_lock(path: str | None) -> None:
    if path is None:
        return
    with contextlib.suppress(OSError, ValueError, KeyError):
        with open(path) as f:
            if int(json.load(f)["pid"]) != os.getpid():
                return
        os.remove(path)


# ----------------------------------------------------------------------------------------- run directory


class RunDir:
    """Context manager around a training run's directory (process 0 writes; every process may enter).

    On entry: the identity check against an existing run (before anything changes), the lock, then config.json
    and run.json. On an exception before the run has a checkpoint of its own, whatever this run created is
    removed again (the whole directory if it made it) and overwritten files get their old content back.
    """

    def __init__(self, cfg, kind: str, batches_given: bool = False, main: bool = True):
        self.cfg, self.kind, self.main = cfg, kind, main
        self.path = os.path.abspath(cfg["run"]["out_dir"])
        self.batches_given = batches_given
        self.created_dir = False
        self.lock = None
        self.resumed = False
        self.finished = None  # summary of a run already finished
        self._before: dict = {}  # path -> old bytes (None: did not exist)
        self._had_checkpoint = False
        self._pre: set = set()
        self.forced: list[str] = []

    def __enter__(self):
        cfg, path = self.cfg, self.path
        if os.path.exists(path) and not os.path.isdir(path):
            raise FaJaxError(f"run.out_dir={path}: exists and is not a directory")
        new = identity(cfg, self.kind, self.batches_given)
        old = read_identity(path) if os.path.isdir(path) else None
        self._had_checkpoint = os.path.isdir(path) and has_checkpoint(path)
        resuming = bool(cfg["run"].get("resume", True)) and self._had_checkpoint
        if resuming and old is not None:
            if set(old) == {"settings"}:  # a run directory from before run.json: compare the settings only
                new_cmp = {"settings": new["settings"]}
            else:
                new_cmp = new
            self.forced = check_resume(old, new_cmp, path, bool(cfg["run"].get("force_resume", False)))
            self.finished = finished_summary(path, int(cfg["run"]["steps"]))
            if self.finished is not None:
                return self
        elif self._had_checkpoint and not resuming:
            raise FaJaxError(f"{path}: holds checkpoints and run.resume is false; remove the directory or use "
                             "another run.out_dir (a new run never overwrites another's checkpoints)")
        self.resumed = resuming
        self._pre = {os.path.join(path, n) for n in os.listdir(path)} if os.path.isdir(path) else set()
        if self.main:
            if not os.path.isdir(path):
                try:
                    os.makedirs(path)
                except OSError as e:
                    raise FaJaxError(f"run.out_dir={path}: cannot create it ({e.strerror})") from None
                self.created_dir = True
            self.lock = acquire_lock(path)
            try:
                self._write("config.json", json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
                self._write(RUN_JSON, json.dumps(new, indent=2, sort_keys=True, default=str) + "\n")
            except BaseException:
                self.__exit__(*sys.exc_info())
                raise
        if self.forced:
            print(f"--force-resume: resuming {path} with changed {', '.join(self.forced)}")
        return self

    def _write(self, name: str, text: str) -> None:
        p = os.path.join(self.path, name)
        if p not in self._before:
            self._before[p] = open(p, "rb").read() if os.path.exists(p) else None
        try:
            write_text(p, text)
        except OSError as e:
            raise FaJaxError(f"{p}: cannot write ({e.strerror})") from None

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None and self.main and not self._had_checkpoint and not has_checkpoint(self.path):
                self._roll_back()
            elif exc_type is not None and self.main and self._had_checkpoint:
                self._restore_overwritten()
        finally:
            release_lock(self.lock)
            self.lock = None
            if exc_type is not None and self.created_dir and self.main and not has_checkpoint(self.path):
                shutil.rmtree(self.path, ignore_errors=True)
        return False

    def _restore_overwritten(self) -> None:
        for p, old in self._before.items():
            with contextlib.suppress(OSError):
                if old is None:
                    os.remove(p)
                else:
                    with open(p, "wb") as f:
                        f.write(old)

    def _roll_back(self) -> None:
        """A run that failed before its first checkpoint leaves the directory as it found it."""
        if self.created_dir:
            return  # removed as a whole in __exit__ (after the lock is released)
        self._restore_overwritten()
        for name in ("metrics.jsonl", "loss_curve.png", "tensorboard", "checkpoints", "summary.json"):
            p = os.path.join(self.path, name)
            if p in self._pre:
                continue
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                with contextlib.suppress(OSError):
                    os.remove(p)
