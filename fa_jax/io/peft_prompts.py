"""PEFT prompt-tuning and prefix-tuning directories in and out (adapter_config.json + adapter_model.safetensors).

PEFT saves one tensor, `prompt_embeddings`: for PROMPT_TUNING the N virtual input embeddings [N, D]; for
PREFIX_TUNING the prefix itself [N, L*2*G*K] (per virtual token: layer, key/value, head, head dim), also when it
was trained through the reparametrising MLP (prefix_projection=True): PEFT saves the MLP's output, not the MLP.
So a loaded prefix is always the plain {"key", "value"} form, and a reparametrised fa_jax prefix is folded before
saving (written with prefix_projection false, which PEFT loads both for inference and for further training).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import prompts
from fa_jax.errors import FaJaxError
from fa_jax.io.atomic import atomic_dir
from fa_jax.io.peft_dir import CONFIG, WEIGHTS, weights_file, write_model_record
from fa_jax.io.safetensors import SafetensorsFile, write

TENSOR = "prompt_embeddings"
PEFT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING"}


def _flat_prefix(config, adapters):
    """The prefix as PEFT stores it: [N, L*2*G*K]."""
    k, v = prompts.prefix_key_values(config, adapters)
    kv = jnp.stack([k, v], axis=1)  # [L, 2, N, G, K]
    return jnp.moveaxis(kv, 2, 0).reshape(k.shape[1], -1)


def save_peft_prompt(config, adapters, out_dir: str, *, base_model_name_or_path: str | None = None, dtype=None,
                     overwrite: bool = False) -> str:
    """Write a prompt_tuning or prefix_tuning tree as a PEFT directory (`PeftModel.from_pretrained` loads it on the
    transformers model and gives the same logits)."""
    kind = prompts.adapter_kind(adapters)
    if kind is None:
        raise FaJaxError("save_peft_prompt: the adapter tree holds no prompt_tuning or prefix_tuning")
    L, G, K = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    n = prompts.num_virtual_tokens(adapters)
    cfg = {"peft_type": PEFT_TYPES[kind], "task_type": "CAUSAL_LM", "num_virtual_tokens": n,
           "num_transformer_submodules": 1, "num_layers": L, "inference_mode": True, "modules_to_save": None,
           "base_model_name_or_path": base_model_name_or_path, "revision": None}
    if kind == "prompt_tuning":
        emb = adapters["prompt_tuning"]["embedding"]
        if emb.ndim != 2 or emb.shape[1] != config.hidden_size:
            raise FaJaxError(f"prompt_tuning: embedding has shape {list(emb.shape)}, "
                             f"expected [N, {config.hidden_size}]")
        tensor = emb
        cfg.update(token_dim=config.hidden_size, num_attention_heads=config.num_attention_heads,
                   prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                   tokenizer_kwargs=None)
    else:
        tensor = _flat_prefix(config, adapters)
        # PEFT's view of a grouped-query model: token_dim = G*K, num_attention_heads = G
        cfg.update(token_dim=G * K, num_attention_heads=G, encoder_hidden_size=G * K, prefix_projection=False,
                   init_weights=None)
    out_dt = np.dtype(jnp.dtype(dtype or tensor.dtype))
    entries = [(TENSOR, tuple(tensor.shape), out_dt, lambda: np.asarray(jax.device_get(tensor)))]
    with atomic_dir(out_dir, overwrite) as tmp:
        write(os.path.join(tmp, WEIGHTS), entries, metadata={"format": "pt"})
        write_model_record(config, tmp)  # the model it was made for (fa-jax merge and friends compare it)
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    return out_dir


def load_peft_prompt(config, in_dir: str, cfg: dict, dtype=jnp.float32):
    """{"prompt_tuning": ...} or {"prefix_tuning": {"key", "value"}} from a PEFT directory whose adapter config
    `cfg` (already read) has peft_type PROMPT_TUNING or PREFIX_TUNING."""
    f = os.path.join(in_dir, CONFIG)
    kind = {v: k for k, v in PEFT_TYPES.items()}[cfg["peft_type"]]
    if cfg.get("task_type") not in ("CAUSAL_LM", None):
        raise FaJaxError(f"{f}: task_type {cfg['task_type']!r}: only CAUSAL_LM prompts are supported")
    if (cfg.get("num_transformer_submodules") or 1) != 1:
        raise FaJaxError(f"{f}: num_transformer_submodules={cfg['num_transformer_submodules']}: encoder-decoder "
                         f"prompts are not supported")
    if cfg.get("num_layers") not in (None, config.num_hidden_layers):
        raise FaJaxError(f"{f}: num_layers={cfg['num_layers']}, but this model has {config.num_hidden_layers} layers")
    wf = weights_file(in_dir)
    st = SafetensorsFile(wf)
    if TENSOR not in st.keys():
        raise FaJaxError(f"{wf}: no {TENSOR!r} tensor (found {sorted(st.keys())})")
    t = np.asarray(st.get(TENSOR), np.float32)
    n = cfg.get("num_virtual_tokens") or t.shape[0]
    L, G, K = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    width = config.hidden_size if kind == "prompt_tuning" else L * 2 * G * K
    if t.shape != (n, width):
        raise FaJaxError(f"{wf}: {TENSOR} has shape {list(t.shape)}, expected [{n}, {width}] for a "
                         f"{cfg['peft_type']} adapter of this {config.model_type} model")
    if kind == "prompt_tuning":
        return {"prompt_tuning": {"embedding": jnp.asarray(t, dtype)}}
    kv = np.moveaxis(t.reshape(n, L, 2, G, K), 0, 2)  # [L, 2, N, G, K]
    return {"prefix_tuning": {"key": jnp.asarray(kv[:, 0], dtype), "value": jnp.asarray(kv[:, 1], dtype)}}
