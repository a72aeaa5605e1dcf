"""Reading the run directory of a `fa-jax pretrain` / `fa-jax sft` run, finished or still going: its resolved config,
its checkpoints, and its adapter, exported or in its newest intact checkpoint. (fa_jax/rundir.py writes the
directory; fa_jax/checkpoint.py its checkpoints.)

    cfg = runs.run_config_of("runs/pretrain")                 # the resolved config (config.json)
    adapters = runs.run_adapters("runs/pretrain", student_cfg)   # the adapter of its newest intact checkpoint

`sft init=foundation:RUN`, `fa-jax export`, `fa-jax merge --adapter RUN` and `fa-jax eval --adapter RUN` read runs
through this module; resuming (rundir.RunDir) decides with `read_identity`, `has_checkpoint` and `finished_summary`.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from fa_jax import adapters as adapters_lib
from fa_jax import run_config
from fa_jax import sharding as sh
from fa_jax.checkpoint import Checkpointer
from fa_jax.errors import FaJaxError
from fa_jax.io.peft_dir import CONFIG as PEFT_CONFIG
from fa_jax.models import transformer

CONFIG = "config.json"  # the resolved config
RUN_JSON = "run.json"  # what defines the run (rundir.identity)
CHECKPOINTS = "checkpoints"  # orbax checkpoints, one directory per step
SUMMARY = "summary.json"  # written when the loop ends
EXPORT = "adapter_peft"  # the adapter a finished run exported (PEFT, or fa_jax's own format for bottleneck adapters)


def is_run(path: str) -> bool:
    """Whether `path` has a run's config.json (a pretrain or sft run directory)."""
    return os.path.isfile(os.path.join(path, CONFIG))


def holds_adapter(path: str) -> bool:
    """Whether `path` is an adapter directory: PEFT (adapter_config.json) or fa_jax's own (`adapters.FA_JAX_CONFIG`)."""
    return any(os.path.exists(os.path.join(path, f)) for f in (PEFT_CONFIG, adapters_lib.FA_JAX_CONFIG))


def exported_adapter(run_dir: str) -> str | None:
    """The adapter directory a run exported (`EXPORT`), None when it has none (not finished, or export_peft off)."""
    path = os.path.join(run_dir, EXPORT)
    return path if holds_adapter(path) else None


def keep_layers_of(run_dir: str):
    """model.keep_layers of a run (the student's layers), None without config.json or without the key."""
    if not is_run(run_dir):
        return None
    with open(os.path.join(run_dir, CONFIG)) as f:
        return json.load(f).get("model", {}).get("keep_layers")


def run_config_of(run_dir: str):
    """The resolved config of a fa_jax pretrain or sft run directory (its config.json)."""
    path = os.path.join(run_dir, CONFIG)
    if not os.path.exists(path):
        raise FaJaxError(f"{run_dir}: not a fa_jax run directory (no {CONFIG})")
    raw = json.load(open(path))
    if not isinstance(raw, dict) or "run" not in raw or "model" not in raw:
        raise FaJaxError(f"{run_dir}: not a fa_jax run directory (its {CONFIG} is not a run config)")
    return run_config.merge(run_config.defaults("sft" if "init" in raw else "pretrain"), raw, path)


def read_identity(run_dir: str) -> dict | None:
    """run.json of a run directory; for a directory written before run.json existed, its config.json as the
    settings (then only the settings are compared); None for a new run."""
    p = os.path.join(run_dir, RUN_JSON)
    if os.path.exists(p):
        try:
            with open(p) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise FaJaxError(f"{p}: unreadable run record ({e}); restore it or use another run.out_dir") from None
    p = os.path.join(run_dir, CONFIG)
    if os.path.exists(p):
        try:
            with open(p) as f:
                return {"settings": json.load(f)}
        except (OSError, ValueError):
            pass
    return None


def checkpoint_steps(run_dir: str) -> list[int]:
    """The steps of the checkpoints in the run directory, oldest first (intact or not: see `Checkpointer.verify`)."""
    d = os.path.join(run_dir, CHECKPOINTS)
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def has_checkpoint(run_dir: str) -> bool:
    return bool(checkpoint_steps(run_dir))


def finished_summary(run_dir: str, steps: int) -> dict | None:
    """summary.json of a run that reached `steps` (or more) with its final checkpoint; None otherwise."""
    p = os.path.join(run_dir, SUMMARY)
    if not os.path.exists(p):
        return None
    try:
        with open(p) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    latest = (checkpoint_steps(run_dir) or [None])[-1]
    step = summary.get("step")
    if isinstance(step, int) and step >= steps and latest == step and summary.get("status", "finished") == "finished":
        return summary
    return None


def run_adapters(run_dir: str, config, allow_pruned: bool = False):
    """The adapters of a fa_jax run's newest intact orbax checkpoint (for runs not finished or exported), on the
    host. `config` is the model they were trained on; a run on a pruned student (keep_layers) is refused unless
    `allow_pruned` (then `config` must be that student's). The checkpoint is restored as it was saved (its own tree
    metadata), so reading it needs neither the optimizer nor the training code; an adapter whose layout differs from
    what the run's adapter.* settings give on `config` is refused."""
    cfg = run_config_of(run_dir)
    if cfg.model.keep_layers is not None and not allow_pruned:
        raise FaJaxError(f"adapter {run_dir}: trained on a student with keep_layers={cfg.model.keep_layers}; its "
                         "layer numbers are the student's, so it merges only into that student, not into this base")
    ckpt = Checkpointer(os.path.join(run_dir, CHECKPOINTS), clean=False)  # (a reader: the run may be going on)
    try:
        if ckpt.latest_step() is None:
            raise FaJaxError(f"adapter {run_dir}: the run has no checkpoint yet")
        _, state, _ = ckpt.restore(None, sharding=sh.replicated(sh.make_mesh([1, 1, 1])), set_aside=False)
    finally:
        ckpt.close()
    adapters = jax.device_get(state["adapters"])
    _check_layout(adapters, cfg, config, run_dir)
    return adapters


def _check_layout(adapters, cfg, config, run_dir: str) -> None:
    """A FaJaxError unless `adapters` has the modules and shapes the run's adapter.* settings give on `config`."""
    a = dict(cfg.adapter)
    params = transformer.abstract_params(config, jnp.dtype(cfg.model.dtype)) if a["kind"] == "dora" else None
    want = jax.eval_shape(lambda r, p: adapters_lib.init_adapter(config, r, params=p, a=a),
                          jax.ShapeDtypeStruct((2,), jnp.uint32), params)
    got = jax.tree_util.tree_flatten_with_path(adapters)[0]
    expected = jax.tree_util.tree_flatten_with_path(want)[0]
    if [p for p, _ in got] != [p for p, _ in expected]:
        extra = sorted({jax.tree_util.keystr(p) for p, _ in got} - {jax.tree_util.keystr(p) for p, _ in expected})
        raise FaJaxError(f"adapter {run_dir}: its checkpoint's adapter does not have the modules this model's "
                         f"{a['kind']} adapter has (e.g. {extra[0] if extra else 'fewer modules'}): a run on another "
                         "model")
    for (path, x), (_, s) in zip(got, expected):
        if tuple(x.shape) != tuple(s.shape):
            raise FaJaxError(f"adapter {run_dir}: its checkpoint's {jax.tree_util.keystr(path)} has shape "
                             f"{list(x.shape)}; this model's is {list(s.shape)} (a run on another model)")
