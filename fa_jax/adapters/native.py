"""The fa_jax adapter directory, for kinds PEFT has no format for: the tree's leaves as safetensors under their dotted
paths, and `fa_jax_adapter.json` naming the kind and the model's shape. Any kind can use it as its save/load."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax.errors import FaJaxError
from fa_jax.io.atomic import atomic_dir
from fa_jax.io import safetensors
from fa_jax.tree import flatten, unflatten

CONFIG = "fa_jax_adapter.json"
WEIGHTS = "adapter_model.safetensors"


def save(kind: str, config, adapters, out_dir: str, *, base_model_name_or_path: str | None = None,
         overwrite: bool = False, **_) -> str:
    flat = {k: np.asarray(v) for k, v in flatten(jax.device_get(adapters)).items()}
    with atomic_dir(out_dir, overwrite) as tmp:
        safetensors.write(os.path.join(tmp, WEIGHTS), [(k, v.shape, v.dtype, lambda v=v: v) for k, v in flat.items()],
              metadata={"format": "fa_jax"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump({"kind": kind, "base_model_name_or_path": base_model_name_or_path,
                       "num_hidden_layers": config.num_hidden_layers, "hidden_size": config.hidden_size}, f, indent=2)
    return out_dir


def read_config(path: str) -> dict | None:
    """The directory's fa_jax adapter config, or None when it has none."""
    own = os.path.join(path, CONFIG)
    if not os.path.exists(own):
        return None
    try:
        with open(own) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise FaJaxError(f"{own}: not a readable JSON file ({e})") from None


def load(config, path: str):
    own = os.path.join(path, CONFIG)
    meta = read_config(path)
    for key in ("num_hidden_layers", "hidden_size"):
        if meta.get(key) != getattr(config, key):
            raise FaJaxError(f"{own}: {key}={meta.get(key)}, but the model has {getattr(config, key)}")
    st = safetensors.SafetensorsFile(os.path.join(path, WEIGHTS))
    return unflatten({k: jnp.asarray(st.get(k)) for k in st.keys()})
