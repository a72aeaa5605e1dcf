"""One entry point for every adapter kind: initialise from a config section, save and load, describe.

    adapters = init_adapter(config, rng, {"kind": "dora", "rank": 8}, params=params)  # the `adapter` config section
    save_adapter(config, adapters, "out/adapter")                                    # PEFT format where PEFT has one
    adapters = load_adapter_dir(config, "out/adapter")

Kinds (`adapter.kind`): lora, dora, bottleneck, prompt_tuning, prefix_tuning, llama_adapter, each declared in its
own module of this package and registered in `registry` (which says how a kind plugs in: its init, the places in
the decoder where it applies, its save/load, its parameter count). Each is a pytree of its own, nested like the
base parameters where it belongs to a layer; the forward pass (models/modules.py) applies whatever an adapter tree
holds by asking the registry. Every leaf is trained except `scale` (a constant of LoRA/DoRA modules).
"""
from __future__ import annotations

import os

import jax

from fa_jax.adapters import registry
# each kind module registers its kinds, in this order (the order of `kinds()`)
from fa_jax.adapters import lora as _lora  # noqa: F401,I001  lora, dora
from fa_jax.adapters import bottleneck as _bottleneck  # noqa: F401
from fa_jax.adapters import prompt_tuning as _prompt_tuning  # noqa: F401  prompt_tuning, prefix_tuning
from fa_jax.adapters import llama_adapter as _llama_adapter  # noqa: F401
from fa_jax.adapters import native
from fa_jax.errors import FaJaxError
from fa_jax.io import peft
from fa_jax.models import spec
from fa_jax.tree import unflatten

FA_JAX_CONFIG = native.CONFIG  # adapters PEFT has no format for (bottleneck) are saved with this config


def kinds() -> tuple[str, ...]:
    """The registered kinds (valid values of `adapter.kind`)."""
    return registry.names()


def __getattr__(name):  # KINDS and MERGEABLE follow the registry (a kind registered later is in them)
    if name == "KINDS":
        return registry.names()
    if name == "MERGEABLE":
        return {k.name: k.mergeable for k in registry.kinds()}
    raise AttributeError(name)


def adapter_defaults() -> dict:
    """The `adapter` section of pretrain/sft configs: the kind and every registered kind's settings, with their
    defaults (lora / dora: rank, alpha, targets, dropout, ...; bottleneck: bottleneck_size; prompt / prefix tuning:
    num_virtual_tokens, ...; llama_adapter: adapter_len, adapter_layers)."""
    out = {"kind": "lora"}
    for k in registry.kinds():
        out.update(k.defaults)
    return out


def check_kind(kind: str) -> str:
    return registry.get(kind).name


def kind_of(adapters) -> str:
    """The kind of an adapter tree (the highest-priority kind it holds: prompt, prefix, DoRA, LoRA, LLaMA-Adapter,
    bottleneck)."""
    return registry.kind_of(adapters).name


def init_adapter(config, rng, a, params=None):
    """A fresh adapter of kind `a["kind"]` for the model `config` (`a`: the `adapter` config section, see
    `adapter_defaults`). DoRA needs the base `params` (its magnitude starts at the weights' column norms); the
    others do not read them. Every kind starts as the base model (zero B, up-projection or gate), except prompt and
    prefix tuning, whose virtual tokens change the output from the start (as in PEFT)."""
    a = {**adapter_defaults(), **dict(a)}
    kind = registry.get(a["kind"])
    if kind.needs_params and params is None:
        raise FaJaxError(f"adapter.kind={kind.name!r}: the base parameters are needed (magnitude = their column "
                         f"norms)")
    return kind.init(config, rng, a, params=params)


def _abstract_params(config):
    return unflatten({k: jax.ShapeDtypeStruct(shape, "float32") for k, (shape, _) in spec.param_specs(config).items()})


def num_params(config, a, params=None) -> int:
    """Trainable parameters of a fresh adapter of the config section `a` (shapes only; nothing is allocated)."""
    if params is None:
        params = _abstract_params(config)
    shapes = jax.eval_shape(lambda p: init_adapter(config, jax.random.PRNGKey(0), a, params=p), params)
    return registry.get({**adapter_defaults(), **dict(a)}["kind"]).num_params(shapes)


def save_adapter(config, adapters, out_dir: str, *, base_model_name_or_path: str | None = None,
                 use_rslora: bool = False, overwrite: bool = False) -> str:
    """Write an adapter tree as its kind saves it: a PEFT directory for lora / dora / prompt_tuning /
    prefix_tuning / llama_adapter (`peft.PeftModel.from_pretrained` loads it), else (bottleneck) safetensors of the
    tree with `FA_JAX_CONFIG`; `load_adapter_dir` reads either. Written to a temporary directory and renamed."""
    kind = registry.kind_of(adapters)
    return kind.save(config, jax.device_get(adapters), out_dir, base_model_name_or_path=base_model_name_or_path,
                     use_rslora=use_rslora, overwrite=overwrite)


def load_adapter_dir(config, path: str):
    """An adapter tree from a directory `save_adapter` wrote or any PEFT adapter of a registered kind (LoRA, DoRA,
    prompt tuning, prefix tuning, adaption prompt)."""
    own = native.read_config(path)
    if own is not None:
        return registry.get(own.get("kind")).load(config, path)
    if not os.path.exists(os.path.join(path, peft.CONFIG)):
        raise FaJaxError(f"{path}: neither a PEFT adapter ({peft.CONFIG}) nor a fa_jax adapter ({FA_JAX_CONFIG})")
    peft_type = peft.read_adapter_config(path).get("peft_type")
    kind = registry.for_peft_type(peft_type)
    if kind is None:
        raise FaJaxError(f"{os.path.join(path, peft.CONFIG)}: peft_type {peft_type!r} is not a kind fa_jax reads "
                         f"(it reads {', '.join(t for k in registry.kinds() for t in k.peft_types)})")
    return kind.load(config, path)
