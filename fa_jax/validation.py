"""Checks of a resolved pretrain / sft config before anything is written: ranges, types and paths, each failure one
line naming the key, the value and what is expected.

    validation.check_run_config(cfg, "pretrain")   # FaJaxError("loss.temperature=0: expected a number > 0")

The allowed names of enumerations come from the modules that consume them (optim.SCHEDULES, losses.DIVERGENCES,
data.TEXT_SPLITS, transformer.REMAT_POLICIES, attention_kernels.check_impl, adapters.check_kind, ...).
"""
from __future__ import annotations

import math
import numbers
import os

import jax.numpy as jnp
import numpy as np

from fa_jax import adapters as adapters_lib
from fa_jax import data as data_lib
from fa_jax import losses, optim, run_config, runs
from fa_jax.embedded import resolve_model_path
from fa_jax.errors import FaJaxError
from fa_jax.memory import parse_bytes
from fa_jax.models import attention_kernels, transformer
from fa_jax.sharding import MESH_AXES

CACHE_DTYPES = ("float16", "bfloat16", "float32")  # fa_jax.teacher_cache.DTYPES
QUANTIZE_MODES = ("int8",)  # fa_jax.quant

# Storage / compute dtypes of model weights (model.dtype, model.compute_dtype, convert/merge --dtype).
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
# lora.init_lora's `init` values (adapter.init).
LORA_INITS = ("kaiming", "gaussian")
MODEL_EXPECTED = "expected a Hugging Face model directory (with config.json), a .gguf file or embedded:NAME"


def check_run_config(cfg, kind: str, batches_given: bool = False) -> None:
    """Raise FaJaxError for the first bad value of `cfg` (kind: "pretrain" or "sft"). `batches_given`: the caller
    supplies its own batches, so data.train may be unset."""
    if kind not in ("pretrain", "sft"):
        raise ValueError(f"check_run_config: kind={kind!r}; expected 'pretrain' or 'sft'")
    defaults = run_config.defaults(kind)
    c = _Sections(cfg, defaults)
    _check_keys(cfg, defaults)
    _check_types(c, defaults)
    _check_model(c, kind)
    _check_adapter(c)
    _check_loss(c)
    _check_teacher(c, kind)
    _check_optim(c)
    _check_data(c, kind, batches_given)
    _check_mesh(c)
    _check_run(c)
    if kind == "sft":
        _check_init(c.get("init"))
    _check_model_paths(c, kind)


# ----------------------------------------------------------------------------------------------- structure


class _Sections:
    """Values by dotted key; a key the config lacks reads as its default."""

    def __init__(self, cfg, defaults):
        self.cfg, self.defaults = cfg, defaults

    def get(self, key: str):
        node, default = self.cfg, self.defaults
        for part in key.split("."):
            default = default.get(part) if isinstance(default, dict) else None
            node = node.get(part, default) if isinstance(node, dict) else default
        return node


def _check_keys(cfg, defaults, prefix: str = "") -> None:
    if not isinstance(cfg, dict):
        raise FaJaxError(f"{prefix.rstrip('.') or 'config'}={cfg!r}: expected a section (a dict of settings)")
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if k not in defaults:
            raise FaJaxError(f"unknown config key {key!r} (known here: {', '.join(sorted(defaults))})")
        d = defaults[k]
        if isinstance(d, dict) and d:
            _check_keys(v, d, key + ".")


def _walk(defaults, prefix: str = ""):
    for k, d in defaults.items():
        if isinstance(d, dict) and d:
            yield from _walk(d, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", d


def _check_types(c, defaults) -> None:
    """Every key whose default is a bool, an int or a float holds one (no float for an int, no "yes" for a bool)."""
    for key, d in _walk(defaults):
        v = c.get(key)
        if isinstance(d, bool):
            if not isinstance(v, bool):
                raise FaJaxError(f"{key}={v!r}: expected true or false")
        elif isinstance(d, numbers.Integral):
            _integer(key, v)
        elif isinstance(d, numbers.Real) and not _is_number(v):  # (a range check follows for most)
            raise FaJaxError(f"{key}={v!r}: expected a number")


# ------------------------------------------------------------------------------------------------ values


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _integer(key, v, low=None, optional=False):
    """An integer >= low (None allowed when optional)."""
    if optional and v is None:
        return
    what = "an integer" + ("" if low is None else f" >= {low}") + (" or None" if optional else "")
    if not _is_int(v) or (low is not None and v < low):
        raise FaJaxError(f"{key}={v!r}: expected {what}")


def _number(key, v, low=None, high=None, low_open=False, high_open=False, optional=False):
    """A finite number in the interval given by low/high (open at an end when low_open/high_open)."""
    if optional and v is None:
        return
    if low is not None and high is not None:
        what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        what = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        what = "a number"
    what += " or None" if optional else ""
    ok = _is_number(v) and math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        raise FaJaxError(f"{key}={v!r}: expected {what}")


def _choice(key, v, allowed, extra: str = ""):
    if not isinstance(v, str) or v not in allowed:
        raise FaJaxError(f"{key}={v!r}: expected one of {', '.join(allowed)}{extra}")


def _string(key, v, optional=False):
    if optional and v is None:
        return
    if not isinstance(v, str) or not v:
        raise FaJaxError(f"{key}={v!r}: expected a non-empty string" + (" or None" if optional else ""))


def _dtype(key, v, optional=False):
    if optional and v is None:
        return
    name = v
    if not isinstance(v, str):  # a numpy / jax dtype given from Python
        try:
            name = np.dtype(jnp.dtype(v)).name
        except (TypeError, ValueError):
            name = None
    if name not in FLOAT_DTYPES:
        raise FaJaxError(f"{key}={v!r}: expected a dtype name, one of {', '.join(FLOAT_DTYPES)}"
                         + (" (or None: the storage dtype)" if optional else ""))


# ------------------------------------------------------------------------------------------------ sections


def _check_model(c, kind) -> None:
    _dtype("model.dtype", c.get("model.dtype"))
    _dtype("model.compute_dtype", c.get("model.compute_dtype"), optional=True)
    remat = c.get("model.remat")
    if not (remat is None or isinstance(remat, bool) or (
            isinstance(remat, str) and (remat in ("none", "auto") or remat in transformer.REMAT_POLICIES))):
        raise FaJaxError(f"model.remat={remat!r}: expected None, 'none', 'auto' or one of "
                         f"{', '.join(transformer.REMAT_POLICIES)}")
    attention_kernels.check_impl(c.get("model.attention"))
    keep = c.get("model.keep_layers")
    if keep is not None and keep != "every_other":
        if (not isinstance(keep, (list, tuple)) or not keep or not all(_is_int(i) and i >= 0 for i in keep)
                or len(set(keep)) != len(keep)):
            raise FaJaxError(f"model.keep_layers={keep!r}: expected None, 'every_other' or a list of distinct layer "
                             "indices >= 0")


def _check_adapter(c) -> None:
    adapters_lib.check_kind(c.get("adapter.kind"))
    _integer("adapter.rank", c.get("adapter.rank"), 1)
    _number("adapter.alpha", c.get("adapter.alpha"), 0, low_open=True)
    _number("adapter.dropout", c.get("adapter.dropout"), 0, 1, high_open=True)
    targets = c.get("adapter.targets")
    if not ((isinstance(targets, str) and targets) or (
            isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets))):
        raise FaJaxError(f"adapter.targets={targets!r}: expected 'all-linear' or a non-empty list of module names "
                         "(e.g. ['q_proj', 'v_proj'])")
    _choice("adapter.init", c.get("adapter.init"), LORA_INITS)
    _integer("adapter.bottleneck_size", c.get("adapter.bottleneck_size"), 1)
    _integer("adapter.num_virtual_tokens", c.get("adapter.num_virtual_tokens"), 1)
    _integer("adapter.encoder_hidden_size", c.get("adapter.encoder_hidden_size"), 1, optional=True)
    _integer("adapter.adapter_len", c.get("adapter.adapter_len"), 1)
    _integer("adapter.adapter_layers", c.get("adapter.adapter_layers"), 1, optional=True)


def _check_loss(c) -> None:
    _number("loss.alpha", c.get("loss.alpha"), 0, 1)
    _number("loss.temperature", c.get("loss.temperature"), 0, low_open=True)
    _choice("loss.divergence", c.get("loss.divergence"), losses.DIVERGENCES)
    beta = c.get("loss.beta")
    if c.get("loss.divergence") == "jsd":
        _number("loss.beta", beta, 0, 1, low_open=True, high_open=True)
    else:
        _number("loss.beta", beta, 0, 1)
    _integer("loss.chunk_size", c.get("loss.chunk_size"), 1)


def _check_teacher(c, kind) -> None:
    cache, quantize, top_k = c.get("teacher.cache"), c.get("teacher.quantize"), c.get("teacher.top_k")
    _string("teacher.cache", cache, optional=True)
    _integer("teacher.top_k", top_k, 1, optional=True)
    _choice("teacher.cache_dtype", c.get("teacher.cache_dtype"), CACHE_DTYPES)
    if quantize is not None:
        _choice("teacher.quantize", quantize, QUANTIZE_MODES, " or None")
    if cache is None:
        return
    if kind != "pretrain":
        raise FaJaxError(f"teacher.cache={cache}: only `fa-jax pretrain` reads a teacher cache (it holds the "
                         "pre-training stream); expected None")
    if float(c.get("loss.alpha")) == 0:
        raise FaJaxError(f"teacher.cache={cache} with loss.alpha=0: there is no teacher term to read it for")
    if quantize is not None:
        raise FaJaxError(f"teacher.quantize={quantize!r} with teacher.cache={cache}: a cached run loads no "
                         "teacher (quantize when writing the cache); expected None")


def _check_optim(c) -> None:
    _number("optim.lr", c.get("optim.lr"), 0)
    _choice("optim.schedule", c.get("optim.schedule"), optim.SCHEDULES)
    _integer("optim.warmup_steps", c.get("optim.warmup_steps"), 0)
    _number("optim.end_lr_fraction", c.get("optim.end_lr_fraction"), 0, 1)
    _number("optim.weight_decay", c.get("optim.weight_decay"), 0)
    _number("optim.b1", c.get("optim.b1"), 0, 1, high_open=True)
    _number("optim.b2", c.get("optim.b2"), 0, 1, high_open=True)
    _number("optim.clip_norm", c.get("optim.clip_norm"), 0, low_open=True, optional=True)
    _integer("optim.grad_accum", c.get("optim.grad_accum"), 1)


def _check_data(c, kind, batches_given) -> None:
    _integer("data.batch_size", c.get("data.batch_size"), 1)
    _integer("data.seq_len", c.get("data.seq_len"), 1)
    _integer("data.seed", c.get("data.seed"), 0)
    _choice("data.on_error", c.get("data.on_error"), data_lib.ON_ERROR)
    if kind == "pretrain":
        _choice("data.text_split", c.get("data.text_split"), data_lib.TEXT_SPLITS)
        _string("data.text_field", c.get("data.text_field"))
    else:
        _string("data.prompt_field", c.get("data.prompt_field"), optional=True)
        _string("data.response_field", c.get("data.response_field"), optional=True)
        _integer("data.max_examples", c.get("data.max_examples"), 1, optional=True)
    if not batches_given:
        _check_train_source(c.get("data.train"), kind)


def _check_train_source(spec, kind) -> None:
    """data.train: set, of a type the loader takes, and its files there (globs matching, one format)."""
    if spec is None:
        raise FaJaxError("data.train is not set: give a text/JSONL/parquet file, a save_to_disk directory, or a list"
                         if kind == "pretrain" else
                         "data.train is not set: give a JSONL/parquet file or a save_to_disk directory of records")
    if isinstance(spec, (bool, numbers.Number)) or (isinstance(spec, str) and not spec):
        expected = ("a text/JSONL/parquet file, a glob, a save_to_disk directory, a list of them or a "
                    "{'path' | 'tfds': ...} dict" if kind == "pretrain" else
                    "a JSONL/parquet file, a save_to_disk directory or a list of records")
        raise FaJaxError(f"data.train={spec!r}: expected {expected}")
    if kind == "sft":
        if isinstance(spec, (str, os.PathLike)):
            if not os.path.exists(spec):
                raise FaJaxError(f"data.train={os.fspath(spec)!r}: no such file or directory (expected a "
                                 "JSONL/parquet file or a save_to_disk directory of records)")
        elif isinstance(spec, (list, tuple)) and not all(isinstance(r, dict) for r in spec):
            raise FaJaxError(f"data.train: a list of {len(spec)} items that are not all dicts; expected a list of "
                             "records ({'prompt': ..., 'response': ...}, {'messages': [...]}, ...)")
        return
    paths = None
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(data_lib._SPEC_KEYS))
        if unknown or ("path" in spec) == ("tfds" in spec):
            raise FaJaxError(f"data.train={spec!r}: expected a 'path' or a 'tfds' key, and only the keys "
                             f"{list(data_lib._SPEC_KEYS)}")
        if "path" in spec:
            paths = spec["path"]
    elif isinstance(spec, (str, os.PathLike, list, tuple)):
        paths = spec
    if paths is None:
        return  # a TFDS source, a datasets.Dataset or documents already loaded
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise FaJaxError(f"data.train={spec!r}: expected a path, a glob or a list of them")
    try:
        data_lib._resolve(paths)
    except FaJaxError as e:
        raise FaJaxError(f"data.train={spec!r}: {e}") from None


def _check_mesh(c) -> None:
    shape = c.get("mesh.shape")
    values = list(shape.values()) if isinstance(shape, dict) else shape
    ok = isinstance(values, (list, tuple)) and all(_is_int(s) and (s >= 1 or s == -1) for s in values) and \
        list(values).count(-1) <= 1
    if isinstance(shape, dict):
        ok = ok and set(shape) <= set(MESH_AXES)
    elif ok:
        ok = len(values) == 3
    if not ok:
        raise FaJaxError(f"mesh.shape={shape!r}: expected a list of 3 integers for ({', '.join(MESH_AXES)}), each "
                         ">= 1 or one of them -1 (all the remaining devices), e.g. [-1, 1, 1]")
    rules = c.get("mesh.rules")
    if rules is None:
        return
    axes_ok = lambda a: a is None or a in MESH_AXES or (
        isinstance(a, (list, tuple)) and all(isinstance(x, str) and x in MESH_AXES for x in a))
    if not isinstance(rules, (list, tuple)) or not all(
            isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) and axes_ok(r[1]) for r in rules):
        raise FaJaxError(f"mesh.rules={rules!r}: expected None or a list of [logical axis, mesh axes] pairs, the mesh "
                         f"axes None, one of {', '.join(MESH_AXES)} or a list of them")


def _check_run(c) -> None:
    _integer("run.steps", c.get("run.steps"), 1)
    _integer("run.seed", c.get("run.seed"), 0)
    _integer("run.log_every", c.get("run.log_every"), 1)
    _integer("run.save_every", c.get("run.save_every"), 0)
    _integer("run.keep_checkpoints", c.get("run.keep_checkpoints"), 1)
    _integer("run.stop_after", c.get("run.stop_after"), 1, optional=True)
    _number("run.peak_flops", c.get("run.peak_flops"), 0, low_open=True, optional=True)
    budget = c.get("run.memory_budget")
    if budget not in (None, ""):
        parse_bytes(budget, "run.memory_budget")
    _check_out_dir("run.out_dir", c.get("run.out_dir"))


def _check_out_dir(key, value) -> None:
    """A directory that exists (a run to resume) or can be created: its nearest existing ancestor is a writable
    directory."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise FaJaxError(f"{key}={value!r}: expected a directory path")
    path = os.path.abspath(os.fspath(value))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FaJaxError(f"{key}={value!r}: an existing file; expected a directory (a new one, or a run to resume)")
    ancestor = path
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise FaJaxError(f"{key}={value!r}: {ancestor} is a file, not a directory; expected a directory path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise FaJaxError(f"{key}={value!r}: {ancestor} is not writable; expected a directory you can write to")


def _check_init(init) -> None:
    """sft's init: random, foundation:RUN_DIR (a pretrain run) or peft:ADAPTER_DIR, the directory there."""
    if not isinstance(init, str):
        raise FaJaxError(f"init={init!r}: expected random, foundation:RUN_DIR or peft:ADAPTER_DIR")
    kind, path = run_config.parse_init(init)
    if kind == "random":
        return
    if not os.path.isdir(path):
        raise FaJaxError(f"init={init}: {path} is not a directory")
    if kind == "foundation" and not runs.is_run(path):
        raise FaJaxError(f"init={init}: {path} is not a fa_jax pre-training run (no {runs.CONFIG})")
    if kind == "peft" and not runs.holds_adapter(path):
        raise FaJaxError(f"init={init}: {path} is neither a PEFT adapter (adapter_config.json) nor a fa_jax adapter "
                         f"({adapters_lib.FA_JAX_CONFIG})")


def _check_model_paths(c, kind) -> None:
    teacher, student = c.get("model.teacher"), c.get("model.student")
    if kind == "pretrain":
        if teacher is None:
            raise FaJaxError(f"model.teacher=None: pre-training distills from a teacher; {MODEL_EXPECTED}")
        _model_path("model.teacher", teacher)
        if student is not None:
            _model_path("model.student", student)
        return
    if student is None:
        raise FaJaxError(f"model.student=None: fine-tuning needs the model to adapt; {MODEL_EXPECTED}")
    _model_path("model.student", student)
    alpha = c.get("loss.alpha")
    if alpha > 0:
        if teacher is None:
            raise FaJaxError(f"loss.alpha={alpha} distills from a teacher, but model.teacher is not set")
        _model_path("model.teacher", teacher)


def _model_path(key, value) -> None:
    """An HF directory with config.json, a .gguf file or embedded:NAME (an installed one)."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise FaJaxError(f"{key}={value!r}: {MODEL_EXPECTED}")
    value = os.fspath(value)
    try:
        path = resolve_model_path(value)
    except FaJaxError as e:
        raise FaJaxError(f"{key}: {e}") from None
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FaJaxError(f"{key}={value!r}: a directory without config.json; {MODEL_EXPECTED}")
    elif os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise FaJaxError(f"{key}={value!r}: a file that is not .gguf; {MODEL_EXPECTED}")
    else:
        raise FaJaxError(f"{key}={value!r}: no such file or directory; {MODEL_EXPECTED}")
