"""Hugging Face checkpoint directories in and out: config.json + model.safetensors (or sharded with
model.safetensors.index.json). Tensors are read and written one at a time.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from fa_jax import config as config_lib
from fa_jax.errors import FaJaxError
from fa_jax.io.atomic import atomic_dir
from fa_jax.io.safetensors import SafetensorsFile, dtype_name, write
from fa_jax.models.spec import param_specs
from fa_jax.tree import flatten, unflatten

INDEX = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(path: str) -> str:
    """fa_jax parameter path -> Hugging Face tensor name."""
    if path.endswith(".kernel"):
        return path[: -len("kernel")] + "weight"
    if path.endswith(".embedding"):
        return path[: -len("embedding")] + "weight"
    return path


def is_transposed(path: str) -> bool:
    return path.endswith(".kernel")


class CheckpointReader:
    """All tensors of a Hugging Face directory, by name, across one or many safetensors files."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX)
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise FaJaxError(f"{index}: malformed index (expected a JSON object with a 'weight_map')") from None
            for name, fname in weight_map.items():
                full = os.path.join(path, fname)
                if fname not in self.files:
                    if not os.path.exists(full):
                        raise FaJaxError(f"{index}: tensor {name!r} is listed in {fname}, which does not exist")
                    self.files[fname] = SafetensorsFile(full)
                if name not in self.files[fname].tensors:
                    raise FaJaxError(f"{full}: tensor {name!r} listed in the index is not in the file")
                self.where[name] = fname
        else:
            names = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not names:
                raise FaJaxError(f"{path}: no model.safetensors (or {INDEX}) found")
            for full in names:
                fname = os.path.basename(full)
                self.files[fname] = SafetensorsFile(full)
                for name in self.files[fname].keys():
                    self.where[name] = fname

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self):
        return self.where.keys()

    def shape(self, name: str):
        return self.files[self.where[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].get(name)

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.files[self.where[name]].get_rows(name, start, stop)

    def dtype(self, name: str):
        return self.files[self.where[name]].dtype(name)

    def file_of(self, name: str) -> str:
        return os.path.join(self.path, self.where[name])


def sharding_for(sharding, config, path: str, shape):
    """The sharding of one parameter, from what `load_model(sharding=...)` accepts: None, one Sharding, a dict
    {path: Sharding}, a function (path, shape) -> Sharding, or `fa_jax.sharding.Rules` (mesh + rule table)."""
    if hasattr(sharding, "for_config"):
        sharding = sharding.for_config(config)
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return sharding
    if isinstance(sharding, dict):
        return sharding.get(path)
    return sharding(path, shape)


def check_tensors(config, reader: CheckpointReader, source: str) -> dict[str, str]:
    """{fa_jax path: HF name} after checking every tensor the config needs exists with the right shape."""
    wanted = {}
    for path, (shape, _) in param_specs(config).items():
        name = hf_name(path)
        if name not in reader:
            raise FaJaxError(f"{source}: missing tensor {name!r} (needed by the config: shape "
                             f"{list(shape[::-1] if is_transposed(path) else shape)})")
        got = tuple(reader.shape(name))
        expected = tuple(shape[::-1]) if is_transposed(path) else tuple(shape)
        if got != expected:
            raise FaJaxError(f"{reader.file_of(name)}: tensor {name!r} has shape {list(got)}, "
                             f"config.json implies {list(expected)}")
        wanted[path] = name
    known = set(wanted.values()) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    extra = [n for n in reader.names() if n not in known and not n.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise FaJaxError(f"{source}: {len(extra)} tensor(s) not used by this {config.model_type} config, e.g. "
                         f"{extra[0]!r} (does config.json match the weights?)")
    return wanted


def place(arr_fn: Callable[[], np.ndarray], shape, dtype, sharding):
    """Put one host tensor on device(s): the whole array, or only each device's slice when sharded."""
    if sharding is None:
        return jax.device_put(np.asarray(arr_fn(), dtype=dtype))
    view = arr_fn()
    return jax.make_array_from_callback(tuple(shape), sharding, lambda idx: np.asarray(view[idx], dtype=dtype))


def as_dtype(dtype, where: str) -> np.dtype:
    """`dtype` (a name like "bfloat16" or a dtype) as a numpy dtype, or a FaJaxError naming the value."""
    try:
        return np.dtype(jax.numpy.dtype(dtype))
    except (TypeError, ValueError):
        raise FaJaxError(f"{where}: dtype={dtype!r} is not a dtype (expected e.g. 'float32' or 'bfloat16')") from None


def load_hf(path: str, dtype="float32", sharding=None):
    """(config, params) from a Hugging Face directory; see `fa_jax.load_model`."""
    dtype = as_dtype(dtype, "load_model")
    config = config_lib.load_config(path)
    reader = CheckpointReader(path)
    wanted = check_tensors(config, reader, path)
    if hasattr(sharding, "for_config"):  # resolve the rule table once, not per tensor
        sharding = sharding.for_config(config)
    specs = param_specs(config)
    flat = {}
    for p, name in tqdm(wanted.items(), desc=f"loading {os.path.basename(os.path.abspath(path))}", unit="tensor",
                        disable=None, leave=False):
        fetch = (lambda n=name: reader.get(n).T) if is_transposed(p) else (lambda n=name: reader.get(n))
        shape = specs[p][0]
        flat[p] = place(fetch, shape, dtype, sharding_for(sharding, config, p, shape))
    return config, unflatten(flat)


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("GIB", 2**30), ("MIB", 2**20), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_hf(config, params, out_dir: str, *, dtype=None, max_shard_size="5GB", tokenizer=None,
            overwrite: bool = False) -> str:
    """Write a directory that transformers' AutoModelForCausalLM loads with equal logits.

    Shards the weights above `max_shard_size` (with model.safetensors.index.json). Writes under a temporary name and
    renames, so a failed save leaves nothing behind. `tokenizer` (a transformers tokenizer) is saved alongside.
    """
    flat = flatten(params)
    specs = param_specs(config)
    for p, (shape, _) in specs.items():
        if p not in flat:
            raise FaJaxError(f"save_hf: params have no {p!r} (expected shape {list(shape)})")
        if tuple(flat[p].shape) != tuple(shape):
            raise FaJaxError(f"save_hf: {p} has shape {list(flat[p].shape)}, the config implies {list(shape)}")
    extra = [p for p in flat if p not in specs]
    if extra:
        raise FaJaxError(f"save_hf: {len(extra)} param(s) not used by this {config.model_type} config, e.g. "
                         f"{extra[0]!r} (they would not be saved; does the config match the params?)")
    if dtype is not None:
        dtype = as_dtype(dtype, "save_hf")
        dtype_name(dtype)  # storable in safetensors, checked before anything is written
    out_dtype = lambda a: dtype if dtype is not None else np.dtype(a.dtype)
    entries = []
    for p, (shape, _) in specs.items():
        a = flat[p]
        hf_shape = tuple(shape[::-1]) if is_transposed(p) else tuple(shape)
        fetch = (lambda a=a: np.asarray(jax.device_get(a)).T) if is_transposed(p) else (lambda a=a: jax.device_get(a))
        entries.append((hf_name(p), hf_shape, out_dtype(a), fetch))
    hf_cfg = config.to_hf_dict()
    hf_cfg["dtype"] = out_dtype(flat["model.embed_tokens.embedding"]).name
    return write_dir(out_dir, entries, hf_cfg, None, max_shard_size, overwrite, desc="saving", tokenizer=tokenizer)


def _shards(entries, limit: int):
    """Group (name, shape, dtype, fetch) entries into files of at most `limit` bytes."""
    shards, cur, size = [], [], 0
    for e in entries:
        n = int(np.prod(e[1])) * np.dtype(e[2]).itemsize
        if cur and size + n > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    return shards + [cur]


def write_dir(out_dir: str, entries, config_dict: dict, extra_files: dict | None = None,
              max_shard_size="5GB", overwrite: bool = False, desc: str = "writing", tokenizer=None,
              fill=None) -> str:
    """An HF-style directory: config.json, safetensors (sharded with an index above `max_shard_size`) and any
    extra JSON files, and the tokenizer if given; written atomically; tensors are produced one at a time by their
    fetch functions (an array, or an iterator of row blocks). fill(directory): writes more files into the
    temporary directory before it is renamed into place. A failed write (disk full, ...) leaves nothing and is a
    FaJaxError naming `out_dir` (`atomic.atomic_dir`)."""
    shards = _shards(entries, _parse_size(max_shard_size))
    bar = tqdm(total=len(entries), desc=desc, unit="tensor", disable=None, leave=False)

    def counted(e):
        name, shape, dtype, fetch = e

        def f():
            arr = fetch()
            bar.update(1)
            return arr
        return name, shape, dtype, f

    with atomic_dir(out_dir, overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_dict, f, indent=2, sort_keys=True)
        for name, content in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2, sort_keys=True)
        if len(shards) == 1:
            write(os.path.join(tmp, "model.safetensors"), [counted(e) for e in shards[0]], metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write(os.path.join(tmp, fname), [counted(e) for e in shard], metadata={"format": "pt"})
                for name, shape, dt, _ in shard:
                    weight_map[name] = fname
                    total += int(np.prod(shape)) * np.dtype(dt).itemsize
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if fill is not None:
            fill(tmp)
    bar.close()
    return out_dir
