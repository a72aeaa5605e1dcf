"""LLaMA-Adapter (Zhang et al. 2023): learnable adaption prompts with zero-init gated attention in the top L layers,
numerically as PEFT's `AdaptionPromptConfig(adapter_len=n, adapter_layers=L)`.

Tree layout, beside any LoRA modules (which sit in the same "self_attn" dicts; `lora.iter_modules` only yields
dicts holding "lora_A", so it skips these two leaves):

    adapters["model"]["layers"][str(i)]["self_attn"]["adaption_prompt"]  [n, D]   for the top L layers i
    adapters["model"]["layers"][str(i)]["self_attn"]["adaption_gate"]    [1]

In an adapted layer the attention output before o_proj gains a gated attention over the prompt (PEFT's
`AdaptedAttention`, following the official implementation):

    k_p = k_proj(P), v_p = v_proj(P)          (no rope on the prompt; GQA: each query head uses its kv head)
    out = attention(x) + gate * softmax(q k_p^T / sqrt(K)) v_p      (q: the layer's own rope'd queries)

The prompt softmax is separate from the main attention (float32, as PEFT's), the prompt is not masked (every
query, at any position, sees all n prompt tokens), and gate = 0 at init so the model starts exactly as the base.
PEFT applies o_proj to the prompt output separately and adds it; here both go through one o_proj, which is the
same (o_proj is linear) except for models with an o_proj bias (Llama with attention_bias=True): PEFT adds that
bias twice (so its model differs from the base even at gate 0), fa_jax once. The prompt's keys and values go
through the layer's k_proj / v_proj as adapted (their LoRA modules included, if the tree has them).
PEFT supports model types llama and mistral; fa_jax applies the same math to every family it loads.
Not mergeable into the weights (it adds attention over extra keys).
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax.errors import FaJaxError
from fa_jax.io.atomic import atomic_dir
from fa_jax.io.peft_dir import read_adapter_config, weights_file, write_model_record
from fa_jax.io.safetensors import SafetensorsFile, write

PROMPT, GATE = "adaption_prompt", "adaption_gate"
PEFT_MODEL_TYPES = ("llama", "mistral")  # peft.tuners.adaption_prompt.config.TRANSFORMERS_MODEL_CONFIG
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def gated_prompt_attention(q, k, v, gate):
    """LLaMA-Adapter's zero-init attention of the queries q [B, T, H, K] over one layer's adaption prompt (keys and
    values [n, G, K]), scaled by the gate [1]: its own softmax, added to the layer's attention output. [B, T, H*K]."""
    B, T, H, K = q.shape
    G = k.shape[1]
    s = jnp.einsum("btgqk,ngk->btgqn", q.reshape(B, T, G, H // G, K), k,
                   preferred_element_type=jnp.float32) * (K ** -0.5)
    probs = jax.nn.softmax(s, axis=-1).astype(q.dtype) * gate.astype(q.dtype).reshape(())
    return jnp.einsum("btgqn,ngk->btgqk", probs, v).reshape(B, T, H * K)


def check_layer(config, path: str, sub: dict, where: str) -> None:
    """A FaJaxError (prefixed `where`) unless the self_attn subtree `sub` at `path` holds a prompt [n, D] and a gate
    [1] of this model."""
    D = config.hidden_size
    for key in (PROMPT, GATE):
        if key not in sub:
            continue
        s = tuple(np.shape(sub[key]))
        if (key == GATE and s != (1,)) or (key == PROMPT and (len(s) != 2 or s[1] != D)):
            want = "[1]" if key == GATE else f"[n, {D}] (the model's hidden_size is {D})"
            raise FaJaxError(f"{where}: adapter for another model: {path}.{key} has shape {list(s)}, expected {want}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def adapted_layers(config, adapter_layers: int) -> list[int]:
    """The top `adapter_layers` decoder layers (PEFT's "top L": the last L attention modules in model order)."""
    n = config.num_hidden_layers
    if not _is_int(adapter_layers) or not 1 <= adapter_layers <= n:
        raise FaJaxError(f"llama_adapter adapter_layers={adapter_layers!r}: expected an integer in [1, {n}] "
                         f"(this model has {n} layers)")
    return list(range(n - adapter_layers, n))


def init_llama_adapter(config, rng, adapter_len: int = 10, adapter_layers: int | None = None, *,
                       prompt_std: float = 1.0, dtype=jnp.float32):
    """A fresh LLaMA-Adapter tree: prompts [adapter_len, D] ~ N(0, prompt_std^2) (PEFT and the official code: a
    standard normal, like an nn.Embedding) and gates 0, in the top `adapter_layers` layers (None: every layer).

    PEFT has no defaults for adapter_len / adapter_layers; 10 is the paper's prompt length (the paper adapts the
    top 30 of LLaMA-7B's 32 layers).
    """
    if not _is_int(adapter_len) or adapter_len < 1:
        raise FaJaxError(f"llama_adapter adapter_len={adapter_len!r}: expected a positive integer (prompt tokens "
                         f"per layer)")
    if adapter_layers is None:
        adapter_layers = config.num_hidden_layers
    ids = adapted_layers(config, adapter_layers)
    if not float(prompt_std) >= 0:
        raise FaJaxError(f"llama_adapter prompt_std must be >= 0, got {prompt_std!r}")
    keys = jax.random.split(rng, len(ids))
    D = config.hidden_size
    layers = {str(i): {"self_attn": {
        PROMPT: (prompt_std * jax.random.normal(k, (adapter_len, D), jnp.float32)).astype(dtype),
        GATE: jnp.zeros((1,), dtype)}} for k, i in zip(keys, ids)}
    return {"model": {"layers": layers}}


def iter_prompts(adapters):
    """(layer index, prompt [n, D], gate [1]) for every adapted layer of a (possibly mixed) adapter tree."""
    layers = (adapters or {}).get("model", {}).get("layers", {})
    for i in sorted(layers, key=int):
        a = layers[i].get("self_attn", {})
        if PROMPT in a or GATE in a:
            if PROMPT not in a or GATE not in a:
                raise FaJaxError(f"model.layers.{i}.self_attn has only {PROMPT if PROMPT in a else GATE}: "
                                 f"a LLaMA-Adapter layer needs both {PROMPT} and {GATE}")
            yield int(i), a[PROMPT], a[GATE]


def _check_tree(config, adapters, what: str):
    found = list(iter_prompts(adapters))
    if not found:
        raise FaJaxError(f"{what}: the adapter tree holds no LLaMA-Adapter layer ({PROMPT} / {GATE} leaves)")
    n_layers, D = config.num_hidden_layers, config.hidden_size
    ids = [i for i, _, _ in found]
    L = len(ids)
    if ids != list(range(n_layers - L, n_layers)):
        raise FaJaxError(f"{what}: adapted layers {ids} are not the top {L} of {n_layers} (PEFT's adapter_layers "
                         f"counts from the top)")
    n = found[0][1].shape[0]
    for i, pr, g in found:
        if tuple(pr.shape) != (n, D) or tuple(g.shape) != (1,):
            raise FaJaxError(f"{what}: model.layers.{i}.self_attn has {PROMPT} {list(pr.shape)} and {GATE} "
                             f"{list(g.shape)}, expected [{n}, {D}] and [1]")
    return found, n, L


def save_llama_adapter(config, adapters, out_dir: str, *, base_model_name_or_path: str | None = None, dtype=None,
                       overwrite: bool = False) -> str:
    """Write the LLaMA-Adapter part of a tree as a PEFT adaption-prompt directory (adapter_config.json +
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads for llama / mistral models."""

    found, n, L = _check_tree(config, adapters, "save_llama_adapter")
    cfg = {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": int(n), "adapter_layers": int(L),
           "target_modules": "self_attn", "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
           "revision": None}
    out_dt = lambda x: np.dtype(jnp.dtype(dtype or x.dtype))
    entries = []
    for i, pr, g in found:
        base = f"{PREFIX}model.layers.{i}.self_attn."
        entries.append((base + PROMPT, (1, n, config.hidden_size), out_dt(pr),
                        lambda pr=pr: np.asarray(jax.device_get(pr))[None]))
        entries.append((base + GATE, (1,), out_dt(g), lambda g=g: np.asarray(jax.device_get(g))))

    with atomic_dir(out_dir, overwrite) as tmp:
        write(os.path.join(tmp, WEIGHTS), entries, metadata={"format": "pt"})
        write_model_record(config, tmp)  # the model it was made for (fa-jax merge and friends compare it)
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    return out_dir


def load_llama_adapter(config, in_dir: str, dtype=jnp.float32):
    """A LLaMA-Adapter tree from a PEFT adaption-prompt directory (the layout of `init_llama_adapter`)."""

    cfg = read_adapter_config(in_dir)
    f = os.path.join(in_dir, CONFIG)
    if cfg.get("peft_type") != "ADAPTION_PROMPT":
        raise FaJaxError(f"{f}: peft_type {cfg.get('peft_type')!r} is not an adaption prompt (expected "
                         f"'ADAPTION_PROMPT'; LoRA directories load with fa_jax.load_peft)")
    if cfg.get("target_modules", "self_attn") not in ("self_attn", None):
        raise FaJaxError(f"{f}: target_modules={cfg['target_modules']!r}: expected 'self_attn'")
    wf = weights_file(in_dir)
    st = SafetensorsFile(wf)
    n_layers, D = config.num_hidden_layers, config.hidden_size
    layers: dict = {}
    for name in st.keys():
        m = re.fullmatch(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.self_attn\.(adaption_prompt|adaption_gate)",
                         name)
        if not m:
            raise FaJaxError(f"{wf}: tensor {name!r} is not an adaption prompt or gate of a decoder layer")
        i, which = int(m.group(1)), m.group(2)
        if i >= n_layers:
            raise FaJaxError(f"{wf}: tensor {name!r} is for layer {i}, but this model has {n_layers} layers")
        x = np.asarray(st.get(name), np.float32)
        if which == PROMPT:
            if x.ndim != 3 or x.shape[0] != 1 or x.shape[2] != D:
                raise FaJaxError(f"{wf}: {name} has shape {list(x.shape)}, expected [1, adapter_len, {D}]")
            x = x[0]
        elif x.shape != (1,):
            raise FaJaxError(f"{wf}: {name} has shape {list(x.shape)}, expected [1]")
        layers.setdefault(str(i), {"self_attn": {}})["self_attn"][which] = jnp.asarray(x, dtype)
    tree = {"model": {"layers": layers}}
    found, n, L = _check_tree(config, tree, wf)
    for key, want in (("adapter_len", n), ("adapter_layers", L)):
        if cfg.get(key) is not None and int(cfg[key]) != want:
            raise FaJaxError(f"{f}: {key}={cfg[key]} but {wf} holds {want}")
    return tree


__all__ = ("init_llama_adapter", "adapted_layers", "iter_prompts", "save_llama_adapter",
           "load_llama_adapter", "PEFT_MODEL_TYPES")
