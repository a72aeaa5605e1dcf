"""Cheap checks of what users hand to the model's entry points (`forward`, `hidden_states`, `generate`, the
evaluators), run on the host before anything is traced or compiled; each failure is one FaJaxError line naming the
argument or parameter path, the bad value and what was expected.

    check_tokens(config, tokens, mask=mask, positions=positions)   # int dtype, [batch, seq], ids in the vocabulary
    check_adapters(config, adapters)                               # every module path and shape fits this model

Under `jax.jit` / `jax.grad` the arrays are tracers: dtypes and shapes are still checked (they are static), the
range of the token ids only when the array is concrete (a NumPy array, a list or a concrete jax.Array).
"""
from __future__ import annotations

import jax
import numpy as np

from fa_jax.adapters import registry
from fa_jax.errors import FaJaxError
from fa_jax.models.spec import linear_modules


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _shape(x) -> tuple:
    return tuple(np.shape(x))


def token_array(tokens, name: str = "tokens"):
    """`tokens` itself when it is an array (NumPy, jax, a tracer), else (lists) as a NumPy array."""
    if hasattr(tokens, "shape") and hasattr(tokens, "dtype"):
        return tokens
    try:
        arr = np.asarray(tokens)
    except (ValueError, TypeError):  # ragged rows
        raise FaJaxError(f"{name}: expected token ids [batch, seq] (rows of equal length), got a ragged "
                         f"{type(tokens).__name__}") from None
    return arr.astype(np.int32) if arr.size == 0 else arr  # np.asarray([[]]) is float64


def check_token_ids(config, tokens, name: str = "tokens"):
    """Integer dtype, rank 2 [batch, seq] and, when concrete, ids in [0, config.vocab_size). Returns
    `token_array(tokens)`."""
    tokens = token_array(tokens, name)
    dtype = np.dtype(tokens.dtype)
    if not np.issubdtype(dtype, np.integer):
        raise FaJaxError(f"{name} has dtype {dtype.name}: expected integer token ids (e.g. int32); token arrays are "
                         f"not cast")
    shape = _shape(tokens)
    if len(shape) != 2:
        hint = f" (one sequence: {name}[None])" if len(shape) == 1 else ""
        raise FaJaxError(f"{name} has shape {list(shape)}: expected [batch, seq]{hint}")
    concrete = isinstance(tokens, np.ndarray) or (isinstance(tokens, jax.Array) and not _is_tracer(tokens))
    if not concrete or not tokens.size:  # traced (jit, grad, eval_shape) or abstract: dtype and shape only
        return tokens
    if isinstance(tokens, np.ndarray):
        lo, hi = int(tokens.min()), int(tokens.max())
    else:  # one min and one max on the device, evaluated now even when a jit trace closes over the array
        with jax.ensure_compile_time_eval():
            lo, hi = (int(v) for v in jax.device_get((tokens.min(), tokens.max())))
    V = config.vocab_size
    bad = [f"{v} ({which})" for v, which, wrong in ((lo, "smallest", lo < 0), (hi, "largest", hi >= V)) if wrong]
    if bad:
        raise FaJaxError(f"{name} holds token id {' and '.join(bad)}: expected ids in [0, {V}) (the model's "
                         f"vocab_size is {V})")
    return tokens


def check_tokens(config, tokens, name: str = "tokens", **same_shape) -> None:
    """`check_token_ids`, and every other array given (mask=, positions=, segment_ids=, ...; None skipped) of the
    tokens' shape."""
    want = _shape(check_token_ids(config, tokens, name))
    for other, value in same_shape.items():
        if value is not None and _shape(value) != want:
            raise FaJaxError(f"{other} has shape {list(_shape(value))}: expected the shape of {name}, {list(want)}")


# ---------------------------------------------------------------------------------------------------------------
# Adapter trees

def _not_in_model(config, name: str, path: str, why: str = ""):
    raise FaJaxError(f"{name}: {path} is not a module of this {config.model_type} model{why} (an adapter for "
                     f"another model?)")


def check_adapters(config, adapters, name: str = "adapters") -> None:
    """Every path of an adapter tree is a place of this model where a registered kind applies, with shapes that fit
    it: linear-module adapters at the model's linear layers (LoRA / DoRA: `lora.check_module`), layer-site adapters
    (bottleneck) and attention-site adapters (LLaMA-Adapter) of its layers and width. None and {} pass. Root kinds
    (prompt / prefix tuning) are checked where the forward pass reads them."""
    if adapters is None:
        return
    if not isinstance(adapters, dict):
        raise FaJaxError(f"{name}: expected an adapter tree (a dict, as init_lora returns), got "
                         f"{type(adapters).__name__}")
    top = ("model",) + tuple(k.name for k in registry.at_root())
    for key in adapters:
        if key not in top:
            _not_in_model(config, name, str(key), f" (an adapter tree holds {', '.join(top)})")
    model = adapters.get("model", {})
    if not isinstance(model, dict):
        raise FaJaxError(f"{name}: model is a {type(model).__name__}, expected a tree of layers")
    for key in model:
        if key != "layers":
            _not_in_model(config, name, f"model.{key}", " (adapters live under model.layers)")
    n = config.num_hidden_layers
    linear = dict(linear_modules(config))
    layer_kinds = registry.layer_keys()
    attention_keys = {key: k for k in registry.at_attention() for key in k.attention_keys}
    default_linear = next((k for k in registry.kinds() if k.check_linear is not None), None)
    for i, la in model.get("layers", {}).items():
        if not (str(i).isdigit() and int(i) < n):
            _not_in_model(config, name, f"model.layers.{i}", f", which has {n} layers (0..{n - 1})")
        for site, sub in (la or {}).items():
            p = f"model.layers.{i}.{site}"
            if site in layer_kinds:
                if layer_kinds[site].check_layer is not None:
                    layer_kinds[site].check_layer(config, p, sub, name)
                continue
            if site not in ("self_attn", "mlp") or not isinstance(sub, dict):
                _not_in_model(config, name, p)
            for kind in {attention_keys[m] for m in sub if site == "self_attn" and m in attention_keys}:
                if kind.check_attention is not None:
                    kind.check_attention(config, p, sub, name)
            for mod, ad in sub.items():
                mp = f"{p}.{mod}"
                if site == "self_attn" and mod in attention_keys:
                    continue
                if mp not in linear:
                    _not_in_model(config, name, mp)
                kind = registry.linear_kind(ad) or default_linear  # unclaimed: what the default kind expects
                if kind is not None and kind.check_linear is not None:
                    kind.check_linear(mp, ad, *linear[mp], where=name)
