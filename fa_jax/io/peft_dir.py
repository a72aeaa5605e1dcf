"""The files of a PEFT adapter directory that every adapter kind shares: adapter_config.json, the weights file, and
fa_jax's record of the model the adapter was made for (io/peft.py writes LoRA and DoRA, io/peft_prompts.py prompt
and prefix tuning)."""
from __future__ import annotations

import json
import os

from fa_jax import config as config_lib
from fa_jax.errors import FaJaxError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# The model an adapter was made for, beside adapter_config.json (PEFT's LoraConfig warns about keys it does not know,
# so the record is a file of its own): `fa-jax merge` compares it with the base it is given.
MODEL_RECORD = "fa_jax_model.json"
RECORD_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


def model_record(config) -> dict:
    """{key: value} of `RECORD_KEYS` for a ModelConfig: what identifies the model an adapter fits."""
    return {k: getattr(config, k) for k in RECORD_KEYS}


def write_model_record(config, directory: str) -> None:
    with open(os.path.join(directory, MODEL_RECORD), "w") as f:
        json.dump(model_record(config), f, indent=2)


def made_for(in_dir: str) -> tuple[str, dict] | None:
    """(where it was read, `model_record`) of the model an adapter directory was made for: its `MODEL_RECORD`, else
    the config.json of a local directory named by base_model_name_or_path in adapter_config.json; None when there
    is neither (nothing to compare)."""
    f = os.path.join(in_dir, MODEL_RECORD)
    if os.path.exists(f):
        try:
            with open(f) as fh:
                rec = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise FaJaxError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise FaJaxError(f"{f}: expected a JSON object with {', '.join(RECORD_KEYS)}")
        return f, {k: rec.get(k) for k in RECORD_KEYS}
    try:
        with open(os.path.join(in_dir, CONFIG)) as fh:
            base = json.load(fh).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(base, str) or not os.path.isfile(os.path.join(base, "config.json")):
        return None  # a hub name or nothing: no local config to compare with
    try:
        return f"base_model_name_or_path {base}", model_record(config_lib.load_config(base))
    except FaJaxError:
        return None  # a config fa_jax cannot read: nothing to compare


def check_made_for(in_dir: str, config, base: str, label: str = "--adapter") -> None:
    """A FaJaxError when the adapter in `in_dir` was made for another model than `config` (the model in `base`):
    another model_type, or other main sizes (`RECORD_KEYS`), even where its tensors' shapes would fit."""
    found = made_for(in_dir)
    if found is None:
        return
    where, rec = found
    have = model_record(config)
    diff = [k for k in RECORD_KEYS if rec.get(k) is not None and rec[k] != have[k]]
    if not diff:
        return
    if "model_type" in diff:
        raise FaJaxError(f"{label} {in_dir}: made for a {rec['model_type']} model ({where}); the base {base} is a "
                         f"{have['model_type']}")
    sizes = ", ".join(f"{k}={rec[k]}" for k in diff)
    raise FaJaxError(f"{label} {in_dir}: made for a {rec['model_type']} model with {sizes} ({where}); the base "
                     f"{base} has {', '.join(f'{k}={have[k]}' for k in diff)}")


def read_adapter_config(in_dir: str) -> dict:
    f = os.path.join(in_dir, CONFIG)
    if not os.path.isdir(in_dir):
        raise FaJaxError(f"{in_dir}: no such adapter directory")
    if not os.path.exists(f):
        raise FaJaxError(f"{in_dir}: no {CONFIG} (expected a PEFT adapter directory)")
    try:
        with open(f) as fh:
            cfg = json.load(fh)
    except json.JSONDecodeError as e:
        raise FaJaxError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return cfg


def weights_file(in_dir: str) -> str:
    """The adapter_model.safetensors of a PEFT directory; a clear error when it is missing or pickled."""
    wf = os.path.join(in_dir, WEIGHTS)
    if not os.path.exists(wf):
        other = [n for n in os.listdir(in_dir) if n.startswith("adapter_model")]
        raise FaJaxError(f"{in_dir}: no {WEIGHTS}" + (f" (found {other[0]}: re-save it with safe_serialization)"
                                                      if other else ""))
    return wf
