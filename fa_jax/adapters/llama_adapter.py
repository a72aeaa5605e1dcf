"""The `llama_adapter` kind: a gated attention over a learned prompt in the top layers (fa_jax/llama_adapter.py,
which also reads and writes its PEFT adaption-prompt directory)."""
from __future__ import annotations

from fa_jax import llama_adapter
from fa_jax.adapters import registry


def _attention(adapter, q, project):
    """The prompt's keys and values through the layer's own (adapted) projections; its own softmax, gated."""
    k, v = project(adapter[llama_adapter.PROMPT].astype(q.dtype))
    return llama_adapter.gated_prompt_attention(q, k, v, adapter[llama_adapter.GATE])


def _init(config, rng, a, params=None):
    n = a["adapter_layers"]
    return llama_adapter.init_llama_adapter(config, rng, adapter_len=int(a["adapter_len"]),
                                            adapter_layers=None if n is None else int(n))


def _save(config, adapters, out_dir, *, base_model_name_or_path=None, overwrite=False, **_):
    return llama_adapter.save_llama_adapter(config, adapters, out_dir,
                                            base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)


registry.register(registry.Kind(
    name="llama_adapter", init=_init,
    # adaption prompt length and how many of the top layers get one (None: every layer)
    defaults={"adapter_len": 10, "adapter_layers": None},
    save=_save, load=llama_adapter.load_llama_adapter, peft_types=("ADAPTION_PROMPT",),
    attention=_attention, attention_keys=(llama_adapter.PROMPT, llama_adapter.GATE),
    check_attention=llama_adapter.check_layer, priority=20))
