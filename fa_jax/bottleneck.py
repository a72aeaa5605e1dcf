"""Houlsby bottleneck adapters: a small down-project / GELU / up-project module after each sub-layer.

Placement (seed 002, after Houlsby et al. 2019): "the adapter is always applied directly to the output of the
sub-layer, after the projection back to the input size, but before adding the skip connection back". With `o` the
output of the attention block (after o_proj) or of the MLP block (after down_proj), a decoder layer computes

    x = x + adapter(o),    adapter(o) = o + gelu(o @ W_down + b_down) @ W_up + b_up

(the adapter's own internal skip connection is the `o +`). GELU is the exact (erf) one, as torch's nn.GELU.

Tree layout, beside any LoRA modules of the same adapter tree (one per decoder layer, two adapters each):

    adapters["model"]["layers"][str(i)]["attn_adapter"] = {"down": {"kernel": [D, m], "bias": [m]},
                                                           "up":   {"kernel": [m, D], "bias": [D]}}
    adapters["model"]["layers"][str(i)]["mlp_adapter"]  = (same)

Each adapter has 2md + d + m parameters (D = d the model width, m the bottleneck size), all trainable. The up
projection starts at zero (`up_std=0`, the default), so the model starts exactly as the base ("near-identity
init"); the down projection is drawn from N(0, down_std^2) (Houlsby: 1e-2). Houlsby also trains new layer-norm
parameters per task; those are not part of this adapter (the base norms stay frozen). The adapter is nonlinear, so
it cannot be merged into the base weights: it runs at inference too (`transformer.forward`, `generate`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax.errors import FaJaxError

SITES = ("attn_adapter", "mlp_adapter")


def apply(adapter, o):
    """adapter(o) = o + up(gelu(down(o))) for a sub-layer output o [..., D]; `o` itself when `adapter` is None or
    empty (no adapter at this site). Computed in o's dtype."""
    if not adapter:
        return o
    d, u = adapter["down"], adapter["up"]
    h = jnp.einsum("...d,dm->...m", o, d["kernel"].astype(o.dtype)) + d["bias"].astype(o.dtype)
    h = jax.nn.gelu(h, approximate=False)
    return o + (jnp.einsum("...m,md->...d", h, u["kernel"].astype(o.dtype)) + u["bias"].astype(o.dtype))


def check(config, path: str, ad, where: str) -> None:
    """A FaJaxError (prefixed `where`) unless `ad` at `path` is a bottleneck adapter of this model's width."""
    D = config.hidden_size
    try:
        parts = {"down.kernel": ("down", "kernel"), "down.bias": ("down", "bias"), "up.kernel": ("up", "kernel"),
                 "up.bias": ("up", "bias")}
        shapes = {k: tuple(np.shape(ad[a][b])) for k, (a, b) in parts.items()}
    except (KeyError, TypeError, IndexError):
        raise FaJaxError(f"{where}: {path} is not a bottleneck adapter (expected down.kernel, down.bias, up.kernel, "
                         f"up.bias)") from None
    dk = shapes["down.kernel"]
    if len(dk) != 2 or dk[0] != D:
        raise FaJaxError(f"{where}: adapter for another model: {path}.down.kernel has shape {list(dk)}, expected "
                         f"[{D}, m] (the model's hidden_size is {D})")
    m = dk[1]
    for k, want in (("down.bias", (m,)), ("up.kernel", (m, D)), ("up.bias", (D,))):
        if shapes[k] != want:
            raise FaJaxError(f"{where}: {path}.{k} has shape {list(shapes[k])}, expected {list(want)} (hidden_size "
                             f"{D}, bottleneck size {m})")


def num_params_per_adapter(d: int, m: int) -> int:
    """2md + d + m: W_down [d, m], b_down [m], W_up [m, d], b_up [d]."""
    return 2 * m * d + d + m


def _check_layers(config, layers):
    n = config.num_hidden_layers
    if layers is None:
        return list(range(n))
    if isinstance(layers, int) and not isinstance(layers, bool):
        raise FaJaxError(f"bottleneck layers={layers!r}: expected a list of layer indices (or None for all {n})")
    out = [int(i) for i in layers]
    bad = [i for i in out if not 0 <= i < n]
    if bad or not out or len(set(out)) != len(out):
        raise FaJaxError(f"bottleneck layers={list(layers)}: expected distinct layer indices in [0, {n})")
    return sorted(out)


def init_bottleneck(config, rng, size: int = 64, *, sites=SITES, layers=None, down_std: float = 1e-2,
                    up_std: float = 0.0, dtype=jnp.float32):
    """A fresh bottleneck-adapter tree (see the module docstring for the layout).

    size: the bottleneck width m (Houlsby used 8 to 256; 64 by default). sites: which sub-layers get an adapter,
    any of "attn_adapter" / "mlp_adapter" (both by default, as in Houlsby). layers: the decoder layers to adapt
    (indices; None = all). down_std: std of the normal init of W_down. up_std: std of W_up (0: exactly zero, the
    model starts as the base; a small value such as 1e-4 gives Houlsby's near-identity init). Biases start at 0.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise FaJaxError(f"bottleneck size must be a positive integer (the bottleneck width m), got {size!r}")
    if isinstance(sites, str):
        sites = (sites,)
    sites = tuple(sites)
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites or len(set(sites)) != len(sites):
        raise FaJaxError(f"bottleneck sites={list(sites)}: expected one or both of {', '.join(SITES)}")
    for name, v in (("down_std", down_std), ("up_std", up_std)):
        if not float(v) >= 0:
            raise FaJaxError(f"bottleneck {name} must be >= 0, got {v!r}")
    layer_ids = _check_layers(config, layers)
    D, m = config.hidden_size, size
    keys = jax.random.split(rng, 2 * len(layer_ids) * len(sites)).reshape(len(layer_ids), len(sites), 2, -1)
    out = {}
    for li, i in enumerate(layer_ids):
        entry = {}
        for si, site in enumerate(sites):
            k_down, k_up = keys[li, si]
            entry[site] = {
                "down": {"kernel": (down_std * jax.random.normal(k_down, (D, m), jnp.float32)).astype(dtype),
                         "bias": jnp.zeros((m,), dtype)},
                "up": {"kernel": (up_std * jax.random.normal(k_up, (m, D), jnp.float32)).astype(dtype),
                       "bias": jnp.zeros((D,), dtype)},
            }
        out[str(i)] = entry
    return {"model": {"layers": out}}


def iter_adapters(adapters):
    """(layer index, site, adapter dict) for every bottleneck adapter in a (possibly mixed) adapter tree."""
    layers = (adapters or {}).get("model", {}).get("layers", {})
    for i in sorted(layers, key=int):
        for site in SITES:
            if layers[i].get(site):
                yield int(i), site, layers[i][site]


__all__ = ("init_bottleneck", "apply", "num_params_per_adapter", "iter_adapters", "SITES")
