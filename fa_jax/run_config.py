"""Run configurations: Python files with `get_config()` returning nested dicts, plus `key=value` overrides.

    fa-jax pretrain --config configs/pretrain_smollm2.py optim.lr=1e-4 run.steps=200

A config file starts from the command's defaults (`pretrain_defaults`, `sft_defaults`, here at the bottom, where
the training loop, the config checks and ahead-of-time compilation all read them) and changes what it needs; a key
that is not in the defaults is an error (in the file or on the command line), so a typo never silently does nothing.
"""
from __future__ import annotations

import ast
import copy
import json
import os
import types

from fa_jax import adapters as adapters_lib
from fa_jax.errors import FaJaxError

INIT_KINDS = ("random", "foundation", "peft")  # sft's init: random, foundation:RUN_DIR or peft:ADAPTER_DIR


class Config(dict):
    """A dict with attribute access for nested configs (`c.optim.lr`)."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None

    def __setattr__(self, k, v):
        self[k] = v

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict:
        return {k: (v.to_dict() if isinstance(v, Config) else v) for k, v in self.items()}


def wrap(d) -> Config:
    return Config({k: wrap(v) if isinstance(v, dict) else v for k, v in d.items()})


def _check_type(key: str, old, new, where: str):
    """`new` for `key` whose default is `old`: an int for a float default becomes a float; a float for an int
    default, a non-bool for a bool, a non-number for a number, a section replaced by a value or a value by a
    section are errors."""
    if old is None or new is None:
        return new
    if isinstance(old, dict) and old and not isinstance(new, dict):
        raise FaJaxError(f"{where}: {key}={new!r} should be a section (a dict of settings such as "
                         f"{{{next(iter(old))!r}: ...}}), like its default")
    if isinstance(new, dict) and isinstance(old, (bool, int, float, str)):
        raise FaJaxError(f"{where}: {key}={new!r} should be a single value like its default {old!r}, not a section")
    if isinstance(old, bool) != isinstance(new, bool):
        raise FaJaxError(f"{where}: {key}={new!r} should be a bool like its default {old!r}")
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, (int, float)) and not isinstance(new, (int, float)):
        raise FaJaxError(f"{where}: {key}={new!r} should be a number like its default {old!r}")
    if isinstance(old, int) and not isinstance(old, bool) and isinstance(new, float):
        raise FaJaxError(f"{where}: {key}={new!r}: expected an integer (like its default {old!r})")
    return new


def merge(defaults: dict, update: dict, where: str, prefix: str = "") -> Config:
    """`defaults` updated by `update`, refusing keys `defaults` does not have. Dicts merge recursively, except
    under a key whose default is an empty dict or None (free-form values such as rope overrides)."""
    out = wrap(copy.deepcopy(defaults))
    for k, v in update.items():
        key = f"{prefix}{k}"
        if k not in out:
            raise FaJaxError(f"{where}: unknown config key {key!r} (known here: {', '.join(sorted(out))})")
        if isinstance(out[k], dict) and out[k] and isinstance(v, dict):
            out[k] = merge(out[k], v, where, key + ".")
        else:
            v = _check_type(key, out[k], v, where)
            out[k] = wrap(v) if isinstance(v, dict) else v
    return out


def parse_value(text: str):
    """Python literal if it parses as one (numbers, bools, None, lists, dicts, quoted strings), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return text


def apply_overrides(config: dict, overrides) -> Config:
    """Apply `a.b.c=value` strings."""
    out = wrap(config)
    for item in overrides or ():
        if "=" not in item:
            raise FaJaxError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-4)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        nested = parse_value(text)
        for p in reversed(parts):
            nested = {p: nested}
        out = merge(out, nested, f"override {item!r}")
    return out


def read_file(path: str) -> dict:
    """The dict a config file's `get_config()` returns; a missing file, a syntax error or no dict is one line."""
    if not os.path.exists(path):
        raise FaJaxError(f"{path}: config file not found")
    if os.path.isdir(path):
        raise FaJaxError(f"{path}: a directory; expected a Python config file defining get_config()")
    # compiled and run here, whatever the file's name ends in, and without writing __pycache__ next to it
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as e:
        raise FaJaxError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    module = types.ModuleType(f"fa_jax_config_{abs(hash(path))}")
    module.__file__ = path
    try:
        exec(compile(source, path, "exec", dont_inherit=True), module.__dict__)
    except SyntaxError as e:
        raise FaJaxError(f"{path}:{e.lineno}: syntax error in config file ({e.msg})") from None
    except Exception as e:  # the file's own code failed (a NameError, a failed import, a null byte, ...)
        raise FaJaxError(f"{path}: running the config file failed ({_one_line(e)})") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise FaJaxError(f"{path}: a config file must define get_config()")
    try:
        got = get_config()
    except Exception as e:
        raise FaJaxError(f"{path}: get_config() failed ({_one_line(e)})") from None
    if not isinstance(got, dict):
        raise FaJaxError(f"{path}: get_config() returned {'None' if got is None else 'a ' + type(got).__name__}; "
                         "expected a dict of settings")
    return got


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load(path: str | None, defaults: dict, overrides=(), settings: dict | None = None) -> Config:
    """Defaults, then the config file's `get_config()` (or `settings`, that dict already read), then the
    overrides."""
    config = wrap(copy.deepcopy(defaults))
    if path:
        config = merge(config, read_file(path) if settings is None else settings, path)
    return apply_overrides(config, overrides)


def dump(config: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------- the defaults


def pretrain_defaults() -> dict:
    """Every key a pretrain config may set, with its default (the seed's setting where it gives one)."""
    return {
        "model": {
            "teacher": "embedded:smollm2-135m-instruct",  # HF directory, .gguf file or embedded:NAME
            "student": None,  # None: the teacher's weights (made smaller with keep_layers)
            "keep_layers": None,  # None | "every_other" | [layer indices] of the student
            "dtype": "float32",  # storage dtype of both models' frozen weights
            "compute_dtype": None,  # e.g. "bfloat16"; None = the storage dtype
            # recompute the student's layers in the backward pass: None/"none" (keep all activations), "full" (recompute
            # everything: least memory), "dots" (keep the projections' outputs), "all_dots" (keep every matmul's),
            # "mlp" (keep gate/up projections), "mlp_qkv" (and q/k/v); see transformer.REMAT_POLICIES; "auto": the
            # fastest of them whose compiled step fits the device memory or run.memory_budget (train.AUTO_REMAT_ORDER)
            "remat": None,
            # attention kernel: "auto" (splash on TPU, cudnn on GPU where supported, else xla), "xla", "splash" or
            # "cudnn"; see models/attention_kernels.py
            "attention": "auto",
            # run the decoder layers under nn.scan with their weights stacked (one layer body in the compiled
            # program: faster compiles, smaller programs for deep models); files keep per-layer names
            "scan_layers": False,
        },
        "adapter": adapters_lib.adapter_defaults(),  # kind: lora | dora | bottleneck | prompt_tuning | ...
        "loss": {"alpha": 0.5, "temperature": 1.0, "divergence": "forward_kl", "beta": 0.5, "chunk_size": 128},
        "teacher": {
            # a directory written by `fa-jax teacher-cache`: the KD term reads the teacher's top-k log-probabilities
            # from it and no teacher is loaded (fa_jax/teacher_cache.py)
            "cache": None,
            # tokens kept per position: `fa-jax teacher-cache` writes this many (None: 64); a run reading a cache
            # uses this many of its tokens, the rest folded into the tail bucket (None: all the cache holds)
            "top_k": None,
            "cache_dtype": "float16",  # the cache's log-probabilities: float16 | bfloat16 | float32
            # the live teacher's weights: None (as model.dtype) | "int8" (per-channel scales; fa_jax/quant.py)
            "quantize": None,
        },
        "data": {"train": None, "text_split": "paragraph", "text_field": "text", "seq_len": 256,
                 "batch_size": 4,  # global rows per step, over all processes
                 "seed": 0, "on_error": "skip", "streaming": False, "add_bos": True, "add_eos": True},
        "optim": {"lr": 2e-4, "schedule": "cosine", "warmup_steps": 10, "end_lr_fraction": 0.0, "weight_decay": 0.0,
                  "b1": 0.9, "b2": 0.999, "clip_norm": 1.0, "grad_accum": 1, "skip_nonfinite": True},
        "mesh": {"shape": [-1, 1, 1], "rules": None},  # (data, fsdp, tensor); rules: [[logical, mesh axes], ...]
        "run": {"steps": 100, "out_dir": "runs/pretrain", "seed": 0, "log_every": 10, "save_every": 100,
                "keep_checkpoints": 3, "async_checkpoint": True, "resume": True, "tensorboard": True,
                "export_peft": True, "peak_flops": None,
                "memory_budget": None,  # bytes per device for model.remat=auto (e.g. "12GiB"); None: the device's
                "stop_after": None,  # stop (with a checkpoint) after this many steps of this run; resume later
                # resume although optimisation settings differ from the run's (more steps, another lr schedule, loss
                # weights; see fa_jax/rundir.py); structural changes are refused regardless
                "force_resume": False},
    }


def sft_defaults() -> dict:
    """Every key an sft config may set, with its default."""
    d = copy.deepcopy(pretrain_defaults())
    d["init"] = "random"  # "random" | "foundation:RUN_DIR" (a fa_jax pretrain run) | "peft:ADAPTER_DIR"
    d["model"].update({"student": "embedded:smollm2-135m-instruct", "teacher": None})
    d["loss"].update({"alpha": 0.0})
    d["data"] = {"train": None, "seq_len": 256, "batch_size": 8, "seed": 0, "pack": False, "chat_template": True,
                 "prompt_field": None, "response_field": None, "on_error": "fail", "max_examples": None}
    d["run"].update({"out_dir": "runs/sft", "steps": 100})
    return d


def defaults(kind: str) -> dict:
    """The defaults of `fa-jax pretrain` (kind "pretrain") or `fa-jax sft` ("sft")."""
    if kind not in ("pretrain", "sft"):
        raise ValueError(f"kind={kind!r}; expected 'pretrain' or 'sft'")
    return pretrain_defaults() if kind == "pretrain" else sft_defaults()


def parse_init(init: str) -> tuple[str, str | None]:
    """sft's init as (kind, path): ("random", None), ("foundation", RUN_DIR) or ("peft", ADAPTER_DIR)."""
    kind, _, path = str(init).partition(":")
    if kind not in INIT_KINDS or (kind == "random") != (not path):
        raise FaJaxError(f"init={init!r}: expected random, foundation:RUN_DIR or peft:ADAPTER_DIR")
    return kind, path or None
