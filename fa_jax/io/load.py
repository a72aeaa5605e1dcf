"""A model or its tokenizer from a path: a Hugging Face directory, a .gguf file or an embedded model name
(`fa_jax.load_model` / `fa_jax.load_tokenizer`)."""
from __future__ import annotations

import os

from fa_jax.embedded import resolve_model_path
from fa_jax.errors import FaJaxError
from fa_jax.config import load_config
from fa_jax.io.gguf import gguf_config, load_gguf
from fa_jax.io.hf import load_hf


def load_model(path: str, dtype="float32", sharding=None):
    """(config, params) from a Hugging Face directory (config.json + safetensors, single or sharded), a .gguf file
    or an embedded model name (`embedded:smollm2-135m-instruct`).

    Tensors are read one at a time, so host memory peaks near one copy of the model.
    `sharding`: None (default device), one `jax.sharding.Sharding` for every tensor, a dict {param path: Sharding},
    or a function (param path, shape) -> Sharding; each device then receives only its own slice.
    """
    path = resolve_model_path(path)  # embedded:NAME -> the file shipped in its package
    if not os.path.exists(path):
        raise FaJaxError(f"{path}: no such file or directory")
    if os.path.isfile(path) and path.endswith(".gguf"):
        return load_gguf(path, dtype=dtype, sharding=sharding)
    if os.path.isfile(path):
        raise FaJaxError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    return load_hf(path, dtype=dtype, sharding=sharding)


def load_model_config(path: str):
    """The `ModelConfig` of a Hugging Face directory, a .gguf file or an embedded model name, no weights read."""
    path = resolve_model_path(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return gguf_config(path)
    return load_config(path)


def load_tokenizer(path: str):
    """The transformers tokenizer of a Hugging Face directory, a .gguf file or an embedded model name."""
    from transformers import AutoTokenizer  # lazy: transformers is large, and only tokenizers come from it

    path = resolve_model_path(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                             gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)
