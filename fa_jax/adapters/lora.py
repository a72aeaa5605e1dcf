"""The `lora` and `dora` kinds: low-rank updates of linear modules (the math and the tree: fa_jax/lora.py; the PEFT
directory: fa_jax/io/peft.py). DoRA is a LoRA module with a `magnitude`; PEFT stores both as peft_type LORA."""
from __future__ import annotations

from fa_jax import lora
from fa_jax.adapters import registry
from fa_jax.io import peft

DEFAULTS = {"rank": 8, "alpha": 16.0, "targets": "all-linear", "dropout": 0.0, "use_rslora": False,
            "init": "kaiming"}


def _init(dora: bool):
    def init(config, rng, a, params=None):
        rank = lora.check_rank(a["rank"], "adapter.rank")  # 2.5 is an error, not rank 2
        return lora.init_lora(config, rng, rank=rank, alpha=float(a["alpha"]), targets=a["targets"],
                              use_rslora=bool(a["use_rslora"]), init=a["init"], use_dora=dora,
                              params=params if dora else None)
    return init


def save(config, adapters, out_dir, *, base_model_name_or_path=None, use_rslora=False, overwrite=False):
    return peft.save_peft(config, adapters, out_dir, use_rslora=use_rslora,
                          base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)


def load(config, in_dir):
    return peft.load_peft(config, in_dir)


_LORA = ("lora_A", "lora_B", "scale")

registry.register(registry.Kind(
    name="lora", init=_init(False), defaults=DEFAULTS, mergeable=True, save=save, load=load, peft_types=("LORA",),
    linear=lora.linear, linear_keys=_LORA, linear_excludes=("magnitude",), check_linear=lora.check_module,
    priority=30))
registry.register(registry.Kind(
    name="dora", init=_init(True), defaults=DEFAULTS, mergeable=True, needs_params=True, save=save, load=load,
    linear=lora.dora_linear, linear_keys=_LORA + ("magnitude",), check_linear=lora.check_module, priority=40))
