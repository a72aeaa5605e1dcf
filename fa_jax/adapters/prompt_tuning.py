"""The `prompt_tuning` and `prefix_tuning` kinds: N virtual tokens in front of every row, as input embeddings or as
per-layer keys and values (fa_jax/prompts.py; PEFT directories: fa_jax/io/peft_prompts.py)."""
from __future__ import annotations

from fa_jax import prompts
from fa_jax.adapters import registry
from fa_jax.io import peft, peft_prompts


def _save(config, adapters, out_dir, *, base_model_name_or_path=None, overwrite=False, **_):
    return peft_prompts.save_peft_prompt(config, adapters, out_dir, base_model_name_or_path=base_model_name_or_path,
                                         overwrite=overwrite)


def _load(config, in_dir):
    return peft_prompts.load_peft_prompt(config, in_dir, peft.read_adapter_config(in_dir))


registry.register(registry.Kind(
    name="prompt_tuning",
    init=lambda config, rng, a, params=None: prompts.init_prompt_tuning(
        config, rng, num_virtual_tokens=int(a["num_virtual_tokens"])),
    defaults={"num_virtual_tokens": 20},
    save=_save, load=_load, peft_types=("PROMPT_TUNING",),
    root=lambda config, adapters, dtype: ("prompt", prompts.prompt_embeddings(config, adapters)),
    priority=60))


def _init_prefix(config, rng, a, params=None):
    hidden = a["encoder_hidden_size"]
    return prompts.init_prefix_tuning(config, rng, num_virtual_tokens=int(a["num_virtual_tokens"]),
                                      prefix_projection=bool(a["prefix_projection"]),
                                      encoder_hidden_size=None if hidden is None else int(hidden))


registry.register(registry.Kind(
    name="prefix_tuning", init=_init_prefix,
    # prefix_projection trains the virtual tokens through an MLP
    defaults={"num_virtual_tokens": 20, "prefix_projection": False, "encoder_hidden_size": None},
    save=_save, load=_load, peft_types=("PREFIX_TUNING",),
    root=lambda config, adapters, dtype: ("prefix", prompts.prefix_key_values(config, adapters)),
    priority=50))
