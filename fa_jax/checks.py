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

from fa_jax.errors import FaJaxError


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

_TOP = ("model", "prompt_tuning", "prefix_tuning")  # prompt_tuning / prefix_tuning: checked where used (prompts.py)
_BOTTLENECK = ("attn_adapter", "mlp_adapter")
_LLAMA_ADAPTER = ("adaption_prompt", "adaption_gate")


def _not_in_model(config, name: str, path: str, why: str = ""):
    raise FaJaxError(f"{name}: {path} is not a module of this {config.model_type} model{why} (an adapter for "
                     f"another model?)")


def _check_bottleneck(config, name: str, path: str, ad) -> None:
    D = config.hidden_size
    try:
        parts = {"down.kernel": ("down", "kernel"), "down.bias": ("down", "bias"), "up.kernel": ("up", "kernel"),
                 "up.bias": ("up", "bias")}
        shapes = {k: _shape(ad[a][b]) for k, (a, b) in parts.items()}
    except (KeyError, TypeError, IndexError):
        raise FaJaxError(f"{name}: {path} is not a bottleneck adapter (expected down.kernel, down.bias, up.kernel, "
                         f"up.bias)") from None
    dk = shapes["down.kernel"]
    if len(dk) != 2 or dk[0] != D:
        raise FaJaxError(f"{name}: adapter for another model: {path}.down.kernel has shape {list(dk)}, expected "
                         f"[{D}, m] (the model's hidden_size is {D})")
    m = dk[1]
    for k, want in (("down.bias", (m,)), ("up.kernel", (m, D)), ("up.bias", (D,))):
        if shapes[k] != want:
            raise FaJaxError(f"{name}: {path}.{k} has shape {list(shapes[k])}, expected {list(want)} (hidden_size "
                             f"{D}, bottleneck size {m})")


def check_adapters(config, adapters, name: str = "adapters") -> None:
    """Every path of an adapter tree is a module of this model, with shapes that fit it: LoRA / DoRA modules at the
    model's linear layers (`lora.check_module`), bottleneck adapters and LLaMA-Adapter prompts of its layers and
    width. None and {} pass. Prompt / prefix tuning are checked where the forward pass reads them."""
    from fa_jax import lora
    from fa_jax.models.transformer import linear_modules

    if adapters is None:
        return
    if not isinstance(adapters, dict):
        raise FaJaxError(f"{name}: expected an adapter tree (a dict, as init_lora returns), got "
                         f"{type(adapters).__name__}")
    for key in adapters:
        if key not in _TOP:
            _not_in_model(config, name, str(key), f" (an adapter tree holds {', '.join(_TOP)})")
    model = adapters.get("model", {})
    if not isinstance(model, dict):
        raise FaJaxError(f"{name}: model is a {type(model).__name__}, expected a tree of layers")
    for key in model:
        if key != "layers":
            _not_in_model(config, name, f"model.{key}", " (adapters live under model.layers)")
    n, D = config.num_hidden_layers, config.hidden_size
    linear = dict(linear_modules(config))
    for i, la in model.get("layers", {}).items():
        if not (str(i).isdigit() and int(i) < n):
            _not_in_model(config, name, f"model.layers.{i}", f", which has {n} layers (0..{n - 1})")
        for site, sub in (la or {}).items():
            p = f"model.layers.{i}.{site}"
            if site in _BOTTLENECK:
                _check_bottleneck(config, name, p, sub)
                continue
            if site not in ("self_attn", "mlp") or not isinstance(sub, dict):
                _not_in_model(config, name, p)
            for mod, ad in sub.items():
                mp = f"{p}.{mod}"
                if site == "self_attn" and mod in _LLAMA_ADAPTER:
                    s = _shape(ad)
                    if (mod == "adaption_gate" and s != (1,)) or (mod == "adaption_prompt" and
                                                                  (len(s) != 2 or s[1] != D)):
                        want = "[1]" if mod == "adaption_gate" else f"[n, {D}] (the model's hidden_size is {D})"
                        raise FaJaxError(f"{name}: adapter for another model: {mp} has shape {list(s)}, expected "
                                         f"{want}")
                elif mp in linear:
                    lora.check_module(mp, ad, *linear[mp], where=name)
                else:
                    _not_in_model(config, name, mp)
