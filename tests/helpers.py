"""Tiny random Hugging Face checkpoints built with transformers (PyTorch, CPU), and comparison helpers."""
from __future__ import annotations

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=False,
                                              rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    # Llama 3.1/3.2 style: llama3 rope scaling, tied embeddings (as in SmolLM2 and Llama-3.2-1B)
    "llama3": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=True, rope_parameters={
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=5, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=False),
    "gemma": lambda: transformers.GemmaConfig(**{**TINY, "head_dim": 16}, tie_word_embeddings=True),
}


def make_hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = FAMILIES[family]()
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms and biases away from their init so that mistakes in them show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(family: str, path, seed: int = 0):
    model = make_hf_model(family, seed)
    model.save_pretrained(str(path))
    return model


def hf_logits(model, tokens, mask=None, positions=None):
    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw["attention_mask"] = torch.tensor(np.asarray(mask))
        if positions is not None:
            kw["position_ids"] = torch.tensor(np.asarray(positions))
        return model(input_ids=torch.tensor(np.asarray(tokens)), **kw).logits.float().numpy()
