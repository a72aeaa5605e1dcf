"""fa_jax: foundation adapters for LLMs in JAX.

    config, params = fa_jax.load_model(path)                 # HF directory or .gguf file
    logits = fa_jax.forward(config, params, tokens, adapters=None)
    lora = fa_jax.init_lora(config, rng, rank=8, alpha=16)
    fa_jax.save_peft(config, lora, out_dir); lora = fa_jax.load_peft(config, in_dir)
    fa_jax.save_hf(config, params, out_dir)
    report = fa_jax.compile_report("configs/pretrain_llama31_8b_to_llama32_1b.py", topology="v5e-8")  # TPU, no TPU
"""
from __future__ import annotations

from fa_jax.config import ModelConfig, load_config
from fa_jax.errors import FaJaxError
from fa_jax.io.hf import save_hf
from fa_jax.io.load import load_model, load_tokenizer
from fa_jax.io.peft import load_peft, save_peft
from fa_jax.lora import init_lora, merge_into as merge_lora
from fa_jax.models.transformer import abstract_params, forward, hidden_states, init_params, lm_logits
from fa_jax.prompts import init_prefix_tuning, init_prompt_tuning
from fa_jax import generate  # callable: fa_jax.generate(config, params, prompts, ...)
from fa_jax.bottleneck import init_bottleneck
from fa_jax.llama_adapter import init_llama_adapter
from fa_jax.adapters import init_adapter, load_adapter_dir, save_adapter

__version__ = "0.1.0"


def compile_report(config, topology: str = "v5e-8", **kw) -> dict:
    """Compile a pretrain / sft config for a TPU topology and report per-chip HBM, FLOPs, collectives and a
    roofline estimate; see `fa_jax.aot.compile_report` (needs the libtpu wheel: pip install -e .[tpu])."""
    from fa_jax import aot  # lazy: aot brings the training stack (optax, orbax), which `import fa_jax` does not need

    return aot.compile_report(config, topology, **kw)


__all__ = ["ModelConfig", "FaJaxError", "load_model", "load_config", "load_tokenizer", "forward", "hidden_states",
           "lm_logits", "init_params", "abstract_params", "init_lora", "merge_lora", "save_peft", "load_peft",
           "save_hf", "init_prompt_tuning", "init_prefix_tuning", "init_bottleneck", "init_llama_adapter",
           "init_adapter", "save_adapter", "load_adapter_dir", "generate", "compile_report"]
