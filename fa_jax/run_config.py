"""Run configurations: Python files with `get_config()` returning nested dicts, plus `key=value` overrides.

    fa-jax pretrain --config configs/pretrain_smollm2.py optim.lr=1e-4 run.steps=200

A config file starts from the command's defaults and changes what it needs; a key that is not in the defaults is an
error (in the file or on the command line), so a typo never silently does nothing.
"""
from __future__ import annotations

import ast
import copy
import json
import os
import types

from fa_jax.errors import FaJaxError


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
