"""LoRA as a separate pytree that mirrors the base parameter paths.

For a linear module at `model.layers.3.self_attn.q_proj` the adapter tree holds, at the same path,
`{"lora_A": [I, R], "lora_B": [R, O], "scale": []}` with `scale = alpha / R` (or `alpha / sqrt(R)` for rsLoRA).
The module computes `x @ W + scale * (x @ A) @ B`, which equals `x @ materialize(W, adapter)`.
`scale` is a constant of the adapter: it gets no gradient (stop_gradient here) and trainers keep it out of the
optimizer with `trainable_mask`.

A DoRA module (weight-decomposed LoRA, Liu et al. 2024; PEFT `use_dora=True`) is a LoRA module plus
`"magnitude": [O]` (float32): the adapted weight is `W' = m * V / ||V||_c` with `V = W + scale * A @ B` and
`||V||_c` the norm of each output feature's column (over the input axis I). It starts at `m = ||W||_c`, B = 0.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp

from fa_jax import quant
from fa_jax.errors import FaJaxError
from fa_jax.models.spec import linear_modules
from fa_jax.tree import get_path, set_path

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply(x, y, adapter, dropout=None):
    """y + scale * (dropout(x) @ A) @ B, for x [..., I] and y [..., O]."""
    xa = x if dropout is None else dropout(x)
    scale = jax.lax.stop_gradient(adapter["scale"]).astype(x.dtype)
    return y + _low_rank(xa, adapter["lora_A"].astype(x.dtype), adapter["lora_B"].astype(x.dtype), scale)


@jax.custom_vjp
def _low_rank(x, a, b, scale):
    """scale * (x @ a) @ b for x [..., I], a [I, R], b [R, O].

    The backward pass is written out because the generic transpose of the two einsums makes XLA:CPU copy the
    incoming [..., O] gradient into a transposed layout and contract over the token axis with a slow kernel: for
    LoRA r 8 on a 135M model that doubled the cost of the adapters' backward pass. Here both weight gradients
    contract the flattened token axis of row-major operands, and the only [..., O]-sized work is one rank-R matmul.
    """
    return jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x, a), b) * scale


def _low_rank_fwd(x, a, b, scale):
    h = jnp.einsum("...i,ir->...r", x, a)
    return jnp.einsum("...r,ro->...o", h, b) * scale, (x, a, b, scale, h)


def _low_rank_bwd(res, g):
    x, a, b, scale, h = res
    i, r, o = x.shape[-1], h.shape[-1], g.shape[-1]
    x2, h2, g2 = x.reshape(-1, i), h.reshape(-1, r), g.reshape(-1, o)
    gh = jnp.einsum("no,ro->nr", g2, b) * scale  # d loss / d (x @ a), [N, R]
    da = jnp.einsum("ni,nr->ir", x2, gh)
    db = jnp.einsum("nr,no->ro", h2 * scale, g2)
    dx = jnp.einsum("nr,ir->ni", gh, a).reshape(x.shape)
    return dx, da, db, jnp.zeros_like(scale)


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def linear(x, p, adapter, dropout=None):
    """A linear module with a LoRA adapter: x @ kernel (+ bias) + scale * (dropout(x) @ A) @ B, for p {"kernel" [I, O],
    "bias" [O] or None} (the `linear` site of the registry, fa_jax/adapters/); the kernel may be a `quant.QInt8`."""
    y = quant.einsum("...i,io->...o", x, p["kernel"])
    if p.get("bias") is not None:
        y = y + p["bias"].astype(y.dtype)
    return apply(x, y, adapter, dropout)


def dora_linear(x, p, adapter, dropout=None):
    """A linear module with a DoRA adapter: `apply_dora` on the bias-free output, then the bias (as in PEFT)."""
    y = apply_dora(x, quant.einsum("...i,io->...o", x, p["kernel"]), p["kernel"], adapter, dropout)
    if p.get("bias") is not None:
        y = y + p["bias"].astype(y.dtype)
    return y


def is_dora(adapter) -> bool:
    """Whether a module's adapter is DoRA (a LoRA module with a `magnitude` vector)."""
    return isinstance(adapter, dict) and "magnitude" in adapter


def _direction(kernel, adapter):
    """V = W + scale * A @ B, [I, O] float32.

    DoRA's column norms need V whole, which this forms in float32 anyway; so an int8 kernel (quant.QInt8) is
    dequantized here, one module at a time, and DoRA over a quantized base costs no more than over a float one."""
    delta = adapter["scale"].astype(jnp.float32) * (adapter["lora_A"].astype(jnp.float32)
                                                    @ adapter["lora_B"].astype(jnp.float32))
    return quant.dequantize(kernel, jnp.float32) + delta


def weight_norm(kernel, adapter):
    """||W + scale * A @ B||_c: the L2 norm over the input axis of each output feature, [O] float32 for W [I, O]
    (PEFT's `get_weight_norm`, which takes it over dim 1 of torch's [O, I] weight)."""
    return jnp.linalg.norm(_direction(kernel, adapter), axis=0)


def apply_dora(x, y, kernel, adapter, dropout=None):
    """DoRA output for x [..., I], y = x @ kernel [..., O] without bias (the caller adds the bias after), W [I, O].

    g = magnitude / ||W + scale * A @ B||_c, [O]; without dropout the result is g * (y + scale * (x @ A) @ B). As in
    PEFT, the norm is a constant of the step (stop_gradient, the DoRA paper's section 4.3: A and B get gradients
    through the low-rank term only), and with dropout the base output is rescaled on the dropped input:
    y + (g - 1) * dropout(x) @ W + g * scale * (dropout(x) @ A) @ B.
    """
    scale = jax.lax.stop_gradient(adapter["scale"]).astype(x.dtype)
    norm = jax.lax.stop_gradient(weight_norm(kernel, adapter))
    g = (adapter["magnitude"].astype(jnp.float32) / norm).astype(x.dtype)
    a, b = adapter["lora_A"].astype(x.dtype), adapter["lora_B"].astype(x.dtype)
    if dropout is None:
        return g * (y + _low_rank(x, a, b, scale))
    xd = dropout(x)
    yd = quant.einsum("...i,io->...o", xd, kernel)
    return y + (g - 1) * yd + g * _low_rank(xd, a, b, scale)


def check_module(path: str, adapter, d_in: int, d_out: int, where: str) -> None:
    """A FaJaxError (prefixed `where`) unless `adapter` is a LoRA / DoRA module for a linear layer [d_in, d_out]:
    lora_A [d_in, r], lora_B [r, d_out], a scale, and magnitude [d_out] if DoRA. Shapes only: cheap, and fine on
    tracers."""
    import numpy as np

    keys = sorted(adapter) if isinstance(adapter, dict) else None
    if keys is None or "lora_A" not in adapter or "lora_B" not in adapter or "scale" not in adapter:
        got = f"keys {keys}" if keys is not None else f"a {type(adapter).__name__}"
        raise FaJaxError(f"{where}: {path} holds {got}, expected a LoRA module (lora_A, lora_B, scale"
                         f"[, magnitude])")
    extra = [k for k in keys if k not in ("lora_A", "lora_B", "scale", "magnitude")]
    if extra:
        raise FaJaxError(f"{where}: {path}.{extra[0]} is not part of a LoRA module (lora_A, lora_B, scale"
                         f"[, magnitude])")
    a, b = tuple(np.shape(adapter["lora_A"])), tuple(np.shape(adapter["lora_B"]))
    if len(a) != 2 or len(b) != 2:
        raise FaJaxError(f"{where}: {path} has lora_A {list(a)} and lora_B {list(b)}, expected [{d_in}, r] and "
                         f"[r, {d_out}]")
    if a[0] != d_in:
        raise FaJaxError(f"{where}: adapter for another model: {path} has in-features {a[0]} (lora_A {list(a)}), "
                         f"the model's module has {d_in}")
    if b[1] != d_out:
        raise FaJaxError(f"{where}: adapter for another model: {path} has out-features {b[1]} (lora_B {list(b)}), "
                         f"the model's module has {d_out}")
    if a[1] != b[0]:
        raise FaJaxError(f"{where}: {path} has lora_A {list(a)} and lora_B {list(b)}: their ranks differ")
    if "magnitude" in adapter and tuple(np.shape(adapter["magnitude"])) != (d_out,):
        raise FaJaxError(f"{where}: adapter for another model: {path}.magnitude has shape "
                         f"{list(np.shape(adapter['magnitude']))}, the model's module has {d_out} out-features")


def check_rank(value, what: str = "LoRA rank") -> int:
    """An integer rank >= 1 as an int: Python / NumPy ints and integral floats (8.0 from a config file) pass;
    a non-integral float is an error, never rounded."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise FaJaxError(f"{what}={value!r}: expected an integer >= 1 (ranks are not rounded)")
    if int(value) < 1:
        raise FaJaxError(f"{what} must be >= 1, got {value}")
    return int(value)


def materialize(kernel, adapter):
    """W + scale * A @ B for LoRA, m * V / ||V||_c with V = W + scale * A @ B for DoRA; in W's dtype (formed in
    float32; an int8 W gives its float dtype)."""
    v = _direction(kernel, adapter)
    if is_dora(adapter):
        v = v * (adapter["magnitude"].astype(jnp.float32) / jnp.linalg.norm(v, axis=0))[None, :]
    return v.astype(quant.float_dtype(kernel))


def init_magnitude(adapters, params):
    """The adapter tree with every LoRA module made DoRA: `magnitude` = ||W + scale * A @ B||_c [O] float32 from
    the base `params` (PEFT's initialisation), so the model's output is unchanged by the conversion."""

    out = adapters
    for path, ad in iter_modules(adapters):
        try:
            kernel = get_path(params, path + ".kernel")
        except KeyError:
            raise FaJaxError(f"DoRA: the base params have no {path}.kernel for the adapter module {path}") from None
        out = set_path(out, path, {**ad, "magnitude": weight_norm(kernel, ad)})
    return out


def resolve_targets(config, targets) -> list[str]:
    """Module paths (e.g. `model.layers.0.self_attn.q_proj`) selected by `targets`.

    `targets` is "all-linear" (every projection of every layer; the LM head is excluded, as in PEFT), or a list
    of module names (`q_proj`) or full module paths. A name that matches nothing is an error listing the choices.
    """
    modules = [m for m, _ in linear_modules(config)]
    if targets == "all-linear":
        return [m for m in modules if m.rsplit(".", 1)[-1] in ALL_LINEAR]
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise FaJaxError("LoRA targets is empty (give module names such as ['q_proj', 'v_proj'], or 'all-linear')")
    chosen = []
    for t in targets:
        hits = [m for m in modules if m == t or m.rsplit(".", 1)[-1] == t]
        if not hits:
            names = sorted({m.rsplit(".", 1)[-1] for m in modules})
            raise FaJaxError(f"LoRA target {t!r} matches no module of this {config.model_type} model "
                             f"(module names: {', '.join(names)}, or 'all-linear')")
        chosen += [h for h in hits if h not in chosen]
    return [m for m in modules if m in chosen]


def _set(tree: dict, path: str, value) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def init_lora(config, rng, rank: int = 8, alpha: float = 16.0, targets="all-linear", use_rslora: bool = False,
              dtype=jnp.float32, rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
              init: str = "kaiming", use_dora: bool = False, params=None):
    """A fresh LoRA tree: B = 0 (so the model starts exactly as the base), A random.

    `init="kaiming"` draws A uniformly in +-1/sqrt(I) (PEFT's default); `init="gaussian"` draws N(0, 1/R^2).
    `rank_pattern` / `alpha_pattern` map module names or paths to per-module rank / alpha.
    `use_dora` makes every module DoRA, with `magnitude` = the column norms of the base kernels: it needs the base
    `params` (see `init_magnitude`).
    """
    rank = check_rank(rank)
    if use_dora and params is None:
        raise FaJaxError("init_lora(use_dora=True) needs the base params (params=...): DoRA's magnitude starts at "
                         "the column norms of the base weights")
    shapes = dict(linear_modules(config))
    paths = resolve_targets(config, targets)
    for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for k in pattern or {}:
            if not any(pattern_key({k: None}, p) is not None for p in shapes):
                raise FaJaxError(f"LoRA {name} key {k!r} matches no module of this {config.model_type} model "
                                 f"(module names: {', '.join(sorted({p.rsplit('.', 1)[-1] for p in shapes}))}, "
                                 f"or full module paths)")
    rank_pattern = {k: check_rank(v, f"LoRA rank_pattern[{k!r}]") for k, v in (rank_pattern or {}).items()}
    tree: dict = {}
    keys = jax.random.split(rng, len(paths))
    for key, path in zip(keys, paths):
        r = int(pattern_value(rank_pattern, path, rank))
        a = float(pattern_value(alpha_pattern, path, alpha))
        d_in, d_out = shapes[path]
        if init == "kaiming":
            A = jax.random.uniform(key, (d_in, r), dtype, -1.0, 1.0) / math.sqrt(d_in)
        elif init == "gaussian":
            A = jax.random.normal(key, (d_in, r), dtype) / r
        else:
            raise FaJaxError(f"unknown LoRA init {init!r} (expected 'kaiming' or 'gaussian')")
        _set(tree, path, {"lora_A": A.astype(dtype), "lora_B": jnp.zeros((r, d_out), dtype),
                          "scale": jnp.asarray(a / (math.sqrt(r) if use_rslora else r), jnp.float32)})
    return init_magnitude(tree, params) if use_dora else tree


def pattern_key(pattern: dict | None, path: str):
    """The key of `rank_pattern` / `alpha_pattern` that applies to the module `path`, or None: PEFT's rule, the first
    key k (in the dict's order) with re.match(rf"(.*\\.)?({k})$", path), so a key is a module name (`q_proj`), a path
    suffix or full path (`layers.0.self_attn.q_proj`) or a regular expression."""
    for k in pattern or {}:
        if re.match(rf"(.*\.)?({k})$", path):
            return k
    return None


def pattern_value(pattern: dict | None, path: str, default):
    """The per-module value of `pattern` for `path` (`pattern_key`), else `default`. The one matcher of fa_jax: LoRA
    initialisation, PEFT import and export all use it."""
    k = pattern_key(pattern, path)
    return default if k is None else pattern[k]


def iter_modules(adapters, prefix: str = "") -> Iterable[tuple[str, dict]]:
    """(module path, {"lora_A", "lora_B", "scale"[, "magnitude"]}) for every LoRA or DoRA module in the tree."""
    if isinstance(adapters, dict) and "lora_A" in adapters:
        yield prefix, adapters
        return
    if isinstance(adapters, dict):
        for k, v in adapters.items():
            yield from iter_modules(v, f"{prefix}.{k}" if prefix else k)


def trainable_mask(adapters):
    """Same structure as `adapters`, True for leaves an optimizer should update (everything but `scale`; DoRA's
    `magnitude` is trained)."""
    def mark(path, _):
        return getattr(path[-1], "key", None) != "scale"
    return jax.tree_util.tree_map_with_path(mark, adapters)


def merge_into(params, adapters):
    """Base params with every LoRA or DoRA module folded in (`materialize`); returns a new tree."""

    out = params
    for path, ad in iter_modules(adapters):
        try:
            kernel = get_path(params, path + ".kernel")
        except KeyError:
            raise FaJaxError(f"merge_lora: adapter module {path} is not a linear layer of the base params (an "
                             f"adapter for another model?)") from None
        if kernel.ndim == 2:
            check_module(path, ad, *kernel.shape, where="merge_lora")
        out = set_path(out, path + ".kernel", materialize(kernel, ad))
    return out


def num_params(adapters, trainable_only: bool = True) -> int:
    mask = trainable_mask(adapters)
    return sum(int(x.size) for x, m in zip(jax.tree.leaves(adapters), jax.tree.leaves(mask)) if m or not trainable_only)


__all__: Sequence[str] = ("init_lora", "init_magnitude", "apply", "apply_dora", "linear", "dora_linear", "is_dora",
                          "pattern_key", "pattern_value", "weight_norm",
                          "materialize", "merge_into", "resolve_targets", "iter_modules", "trainable_mask",
                          "num_params", "check_module", "check_rank", "ALL_LINEAR")
