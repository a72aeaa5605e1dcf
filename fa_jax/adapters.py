"""One entry point for every adapter kind: initialise from a config section, save and load, describe.

    adapters = init_adapter(config, params, rng, {"kind": "dora", "rank": 8})   # the `adapter` section of a run
    save_adapter(config, adapters, "out/adapter", kind="dora")                  # PEFT format where PEFT has one
    adapters = load_adapter_dir(config, "out/adapter")

Kinds (`adapter.kind`): lora, dora, bottleneck, prompt_tuning, prefix_tuning, llama_adapter. Each is a pytree of
its own, nested like the base parameters where it belongs to a layer (see the modules named in KINDS); the forward
pass (`transformer.hidden_states`) applies whatever an adapter tree holds. Every leaf is trained except `scale`
(a constant of LoRA/DoRA modules).
"""
from __future__ import annotations

import json
import os

import jax

from fa_jax.errors import FaJaxError

KINDS = ("lora", "dora", "bottleneck", "prompt_tuning", "prefix_tuning", "llama_adapter")
MERGEABLE = {"lora": True, "dora": True, "bottleneck": False, "prompt_tuning": False, "prefix_tuning": False,
             "llama_adapter": False}
FA_JAX_CONFIG = "fa_jax_adapter.json"  # adapters PEFT has no format for (bottleneck) are saved with this config


def adapter_defaults() -> dict:
    """The `adapter` section of pretrain/sft configs: the kind and every kind's settings, with their defaults."""
    return {
        "kind": "lora",
        # lora / dora
        "rank": 8, "alpha": 16.0, "targets": "all-linear", "dropout": 0.0, "use_rslora": False, "init": "kaiming",
        # bottleneck (Houlsby): width m of the down-projection
        "bottleneck_size": 64,
        # prompt_tuning / prefix_tuning: virtual tokens; prefix_projection trains them through an MLP
        "num_virtual_tokens": 20, "prefix_projection": False, "encoder_hidden_size": None,
        # llama_adapter: adaption prompt length and how many of the top layers get one (None: every layer)
        "adapter_len": 10, "adapter_layers": None,
    }


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise FaJaxError(f"adapter.kind={kind!r}: expected one of {', '.join(KINDS)}")
    return kind


def kind_of(adapters) -> str:
    """The kind of an adapter tree (the first found of: prompt, prefix, DoRA, LoRA, LLaMA-Adapter, bottleneck)."""
    from fa_jax import bottleneck, llama_adapter, lora

    if "prompt_tuning" in adapters:
        return "prompt_tuning"
    if "prefix_tuning" in adapters:
        return "prefix_tuning"
    modules = list(lora.iter_modules(adapters))
    if modules:
        return "dora" if any("magnitude" in m for _, m in modules) else "lora"
    if any(True for _ in llama_adapter.iter_prompts(adapters)):
        return "llama_adapter"
    if any(True for _ in bottleneck.iter_adapters(adapters)):
        return "bottleneck"
    raise FaJaxError("the adapter tree holds no adapter of a known kind")


def init_adapter(config, rng, a, params=None):
    """A fresh adapter of kind `a["kind"]` for the model `config` (`a`: the `adapter` config section, see
    `adapter_defaults`). DoRA needs the base `params` (its magnitude starts at the weights' column norms); the
    others do not read them. Every kind starts as the base model (zero B, up-projection or gate), except prompt and
    prefix tuning, whose virtual tokens change the output from the start (as in PEFT)."""
    from fa_jax import bottleneck, llama_adapter, lora, prompts

    a = {**adapter_defaults(), **dict(a)}
    kind = check_kind(a["kind"])
    if kind in ("lora", "dora"):
        if kind == "dora" and params is None:
            raise FaJaxError("adapter.kind='dora': the base parameters are needed (magnitude = their column norms)")
        rank = lora.check_rank(a["rank"], "adapter.rank")  # 2.5 is an error, not rank 2
        return lora.init_lora(config, rng, rank=rank, alpha=float(a["alpha"]), targets=a["targets"],
                              use_rslora=bool(a["use_rslora"]), init=a["init"], use_dora=kind == "dora",
                              params=params if kind == "dora" else None)
    if kind == "bottleneck":
        return bottleneck.init_bottleneck(config, rng, int(a["bottleneck_size"]))
    if kind == "prompt_tuning":
        return prompts.init_prompt_tuning(config, rng, num_virtual_tokens=int(a["num_virtual_tokens"]))
    if kind == "prefix_tuning":
        hidden = a["encoder_hidden_size"]
        return prompts.init_prefix_tuning(config, rng, num_virtual_tokens=int(a["num_virtual_tokens"]),
                                          prefix_projection=bool(a["prefix_projection"]),
                                          encoder_hidden_size=None if hidden is None else int(hidden))
    layers = a["adapter_layers"]
    return llama_adapter.init_llama_adapter(config, rng, adapter_len=int(a["adapter_len"]),
                                            adapter_layers=None if layers is None else int(layers))


def num_params(config, a, params=None) -> int:
    """Trainable parameters of a fresh adapter of the config section `a` (shapes only; nothing is allocated)."""
    from fa_jax import lora
    from fa_jax.models import transformer

    if params is None:
        params = transformer.abstract_params(config)
    shapes = jax.eval_shape(lambda p: init_adapter(config, jax.random.PRNGKey(0), a, params=p), params)
    return lora.num_params(shapes)


def save_adapter(config, adapters, out_dir: str, *, base_model_name_or_path: str | None = None,
                 use_rslora: bool = False, overwrite: bool = False) -> str:
    """Write an adapter tree: a PEFT directory for lora / dora / prompt_tuning / prefix_tuning / llama_adapter
    (`peft.PeftModel.from_pretrained` loads it), else (bottleneck) safetensors of the tree with `FA_JAX_CONFIG`;
    `load_adapter_dir` reads either. Written to a temporary directory and renamed."""
    from fa_jax import llama_adapter
    from fa_jax.io.peft import save_peft

    kind = kind_of(adapters)
    host = jax.device_get(adapters)
    if kind == "llama_adapter":
        return llama_adapter.save_llama_adapter(config, host, out_dir, base_model_name_or_path=base_model_name_or_path,
                                                overwrite=overwrite)
    if kind != "bottleneck":
        return save_peft(config, host, out_dir, use_rslora=use_rslora,
                         base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)
    import numpy as np

    from fa_jax.io.atomic import atomic_dir
    from fa_jax.io.safetensors import write
    from fa_jax.tree import flatten

    flat = {k: np.asarray(v) for k, v in flatten(host).items()}
    with atomic_dir(out_dir, overwrite) as tmp:
        write(os.path.join(tmp, "adapter_model.safetensors"),
              [(k, v.shape, v.dtype, lambda v=v: v) for k, v in flat.items()], metadata={"format": "fa_jax"})
        with open(os.path.join(tmp, FA_JAX_CONFIG), "w") as f:
            json.dump({"kind": kind, "base_model_name_or_path": base_model_name_or_path,
                       "num_hidden_layers": config.num_hidden_layers, "hidden_size": config.hidden_size}, f,
                      indent=2)
    return out_dir


def load_adapter_dir(config, path: str):
    """An adapter tree from a directory `save_adapter` wrote or any PEFT adapter of a supported kind (LoRA, DoRA,
    prompt tuning, prefix tuning, adaption prompt)."""
    import jax.numpy as jnp

    from fa_jax import llama_adapter
    from fa_jax.io.peft import CONFIG, load_peft, read_adapter_config

    own = os.path.join(path, FA_JAX_CONFIG)
    if os.path.exists(own):
        from fa_jax.io.safetensors import SafetensorsFile
        from fa_jax.tree import unflatten

        meta = json.load(open(own))
        for key in ("num_hidden_layers", "hidden_size"):
            if meta.get(key) != getattr(config, key):
                raise FaJaxError(f"{own}: {key}={meta.get(key)}, but the model has {getattr(config, key)}")
        st = SafetensorsFile(os.path.join(path, "adapter_model.safetensors"))
        return unflatten({k: jnp.asarray(st.get(k)) for k in st.keys()})
    if not os.path.exists(os.path.join(path, CONFIG)):
        raise FaJaxError(f"{path}: neither a PEFT adapter ({CONFIG}) nor a fa_jax adapter ({FA_JAX_CONFIG})")
    if read_adapter_config(path).get("peft_type") == "ADAPTION_PROMPT":
        return llama_adapter.load_llama_adapter(config, path)
    return load_peft(config, path)
