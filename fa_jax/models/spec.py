"""The parameter table of the decoder: every base parameter's path, shape and logical axes, from the config alone.

The Flax modules (models/modules.py) declare their parameters from this table, so shapes and logical axis names
live in one place; loaders, sharding and adapter initialisation read it without building a model.

Paths are the Hugging Face module names with the leaf renamed by kind: linear `kernel` [in, out] (the transpose of
torch's weight) and `bias`, embedding `embedding` [V, D], norm `weight` [D].
"""
from __future__ import annotations

import functools
import math

# logical axes of each linear module's kernel [in, out], by module name
LINEAR_AXES = {"q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
               "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
               "down_proj": ("mlp", "embed")}


def linear_shape(config, name: str) -> tuple[int, int]:
    """(in, out) of the linear module `name` (q_proj, ..., down_proj) of every decoder layer."""
    D, F = config.hidden_size, config.intermediate_size
    HK, GK = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q_proj": (D, HK), "k_proj": (D, GK), "v_proj": (D, GK), "o_proj": (HK, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}[name]


def has_bias(config, name: str) -> bool:
    if name in ("q_proj", "k_proj", "v_proj"):
        return bool(config.qkv_bias)
    if name == "o_proj":
        return bool(config.o_bias)
    return bool(config.mlp_bias)


def bias_axes(name: str) -> tuple[str]:
    out = LINEAR_AXES[name][1]
    return ("norm",) if out == "embed" else (out,)  # a bias over the model width is replicated like a norm


def _layer_specs(config, p: str) -> dict:
    specs = {f"{p}.input_layernorm.weight": ((config.hidden_size,), ("norm",))}
    for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        if block == "mlp":
            specs[f"{p}.post_attention_layernorm.weight"] = ((config.hidden_size,), ("norm",))
        for name in names:
            shape = linear_shape(config, name)
            specs[f"{p}.{block}.{name}.kernel"] = (shape, LINEAR_AXES[name])
            if has_bias(config, name):
                specs[f"{p}.{block}.{name}.bias"] = ((shape[1],), bias_axes(name))
    return specs


@functools.lru_cache(maxsize=64)
def _param_specs(config) -> tuple:
    D, V = config.hidden_size, config.vocab_size
    specs = {"model.embed_tokens.embedding": ((V, D), ("vocab", "embed"))}
    for i in range(config.num_hidden_layers):
        specs.update(_layer_specs(config, f"model.layers.{i}"))
    specs["model.norm.weight"] = ((D,), ("norm",))
    if not config.tie_word_embeddings:
        specs["lm_head.kernel"] = ((D, V), ("embed", "vocab"))
    return tuple(specs.items())


def param_specs(config) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Flat {path: (shape, logical axes)} of every base parameter, in checkpoint order."""
    return dict(_param_specs(config))


def linear_modules(config) -> list[tuple[str, tuple[int, int]]]:
    """(module path, (in, out)) of every linear layer an adapter can target (the LM head excluded)."""
    return [(path[: -len(".kernel")], shape) for path, (shape, _) in _param_specs(config)
            if path.endswith(".kernel") and path != "lm_head.kernel"]


def count_params(config) -> int:
    return sum(math.prod(shape) for _, (shape, _) in _param_specs(config))
