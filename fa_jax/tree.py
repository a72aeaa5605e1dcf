"""Dotted-path helpers for the nested-dict parameter and adapter trees (`model.layers.3.self_attn.q_proj.kernel`)."""
from __future__ import annotations

from typing import Any


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a.b": x}, in insertion order."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    """Inverse of `flatten`."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = v
    return out


def get_path(tree: dict, path: str, default=KeyError):
    node = tree
    for k in path.split("."):
        if not isinstance(node, dict) or k not in node:
            if default is KeyError:
                raise KeyError(path)
            return default
        node = node[k]
    return node


def set_path(tree: dict, path: str, value) -> dict:
    """A new tree with `path` set to `value`; dicts along the path are copied, the input is not mutated."""
    keys = path.split(".")
    new = dict(tree)
    node = new
    for k in keys[:-1]:
        child = dict(node.get(k, {}))
        node[k] = child
        node = child
    node[keys[-1]] = value
    return new
