"""The `bottleneck` kind: Houlsby adapters on each sub-layer's output (fa_jax/bottleneck.py); saved in the fa_jax
format (PEFT has none)."""
from __future__ import annotations

import functools

from fa_jax import bottleneck
from fa_jax.adapters import native, registry

registry.register(registry.Kind(
    name="bottleneck",
    init=lambda config, rng, a, params=None: bottleneck.init_bottleneck(config, rng, int(a["bottleneck_size"])),
    defaults={"bottleneck_size": 64},  # width m of the down-projection
    save=functools.partial(native.save, "bottleneck"), load=native.load,
    layer=bottleneck.apply, layer_sites={"attn_output": "attn_adapter", "mlp_output": "mlp_adapter"},
    check_layer=bottleneck.check, priority=10))
