"""Model configuration: one frozen dataclass for every supported decoder family, read from and written to the
Hugging Face `config.json` (transformers 5 layout, with the transformers 4 layout also accepted).

A family differs only by its config: which biases exist, the MLP activation, the embedding scale, the norm
offset. Any field that would change the math and is not implemented is an error naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from fa_jax.errors import FaJaxError
from fa_jax.models import spec  # the parameter table: plain Python, no JAX

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs. Hashable, so it can be a static argument of `jax.jit`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama with attention_bias)
    o_bias: bool = False  # bias on o_proj (Llama with attention_bias)
    mlp_bias: bool = False
    embed_scale: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): 1.0 for Gemma
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    sliding_windows: tuple = ()  # per layer: window length or 0 for full attention; () means all full
    max_position_embeddings: int = 2048
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    # How training/evaluation forward passes compute attention: "xla" | "splash" | "cudnn" | "auto" (see
    # models/attention_kernels.py). Not a property of the checkpoint, so never written to config.json; part of
    # equality and hashing because it changes the traced program (jit static arguments must tell them apart).
    attention_impl: str = "xla"
    # Run the decoder layers under `nn.scan` (run configs: `model.scan_layers`): the layers' weights stacked along a
    # leading axis (`transformer.stack_layers`). A way of computing, like attention_impl: never in config.json.
    scan_layers: bool = False
    # The source config.json as a dict (kept to write it back); not part of equality or hashing.
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def num_params(self) -> int:
        """Number of parameters of the base model (tied embeddings counted once)."""
        return spec.count_params(self)

    def window(self, layer: int) -> int:
        return self.sliding_windows[layer] if self.sliding_windows else 0

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_hf_dict(self) -> dict:
        """The config.json transformers 5 reads back into the same architecture."""
        d = dict(self.hf_config)
        for k in ("_name_or_path", "transformers_version", "quantization_config", "_commit_hash"):
            d.pop(k, None)
        d.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=list(self.bos_token_id) if isinstance(self.bos_token_id, tuple) else self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=list(self.pad_token_id) if isinstance(self.pad_token_id, tuple) else self.pad_token_id,
        )
        d["architectures"] = [_ARCHITECTURES[self.model_type]]
        rope = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
        if self.rope_type == "linear":
            rope["factor"] = self.rope_factor
        elif self.rope_type == "llama3":
            rope.update(factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                        high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position)
        d["rope_parameters"] = rope
        d.pop("rope_scaling", None)
        d.pop("rope_theta", None)
        if self.model_type == "llama":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_windows[0] if self.sliding_windows else None
        if self.model_type == "qwen2" and "layer_types" in d:
            d["layer_types"] = [("sliding_attention" if self.window(i) else "full_attention")
                                for i in range(self.num_hidden_layers)]
        return d

    def save(self, out_dir: str) -> None:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
}


def _rope_fields(d: dict, where: str) -> dict:
    """Rope settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (transformers 4)."""
    rp = d.get("rope_parameters")
    src = "rope_parameters"  # the field of the file the settings come from, for error messages
    if rp is None:
        src = "rope_scaling"
        rp = d.get("rope_scaling") or {}
        if not isinstance(rp, dict):
            raise FaJaxError(f"{where}: rope_scaling must be a mapping or null, got {rp!r}")
        rp = dict(rp)
        if "rope_theta" in d:
            rp.setdefault("rope_theta", d["rope_theta"])
    if not isinstance(rp, dict):
        raise FaJaxError(f"{where}: rope_parameters must be a mapping, got {rp!r}")
    if "rope_theta" not in rp and "rope_theta" not in d:
        raise FaJaxError(f"{where}: no rope_theta in {src} (or at the top level)")
    type_key = "rope_type" if "rope_type" in rp or "type" not in rp else "type"
    rope_type = rp.get(type_key, "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise FaJaxError(f"{where}: {src}.{type_key}={rope_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if float(rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0:
        raise FaJaxError(f"{where}: partial_rotary_factor != 1 is not supported")
    out = dict(rope_theta=float(rp.get("rope_theta", d.get("rope_theta"))), rope_type=rope_type)
    if rope_type in ("linear", "llama3"):
        if "factor" not in rp:
            raise FaJaxError(f"{where}: rope_type {rope_type!r} needs {src}.factor")
        out["rope_factor"] = float(rp["factor"])
    if rope_type == "llama3":
        for key, field in (("low_freq_factor", "rope_low_freq_factor"), ("high_freq_factor", "rope_high_freq_factor"),
                           ("original_max_position_embeddings", "rope_original_max_position")):
            if key not in rp:
                raise FaJaxError(f"{where}: rope_type 'llama3' needs {src}.{key}")
            out[field] = type(ModelConfig.__dataclass_fields__[field].default)(rp[key])
    return out


def _token_ids(v):
    """A token id list (e.g. Llama-3.1-Instruct's eos_token_id) as a tuple, so that ModelConfig stays hashable."""
    return tuple(v) if isinstance(v, list) else v


def from_hf_dict(d: dict, where: str = "config.json") -> ModelConfig:
    """Parse a Hugging Face config dict. `where` names the source in error messages."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise FaJaxError(f"{where}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise FaJaxError(f"{where}: missing required field(s) {', '.join(missing)}")
    n_heads = int(d["num_attention_heads"])
    n_kv = int(d.get("num_key_value_heads") or n_heads)
    if n_heads % n_kv:
        raise FaJaxError(f"{where}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    head_dim = d.get("head_dim") or d["hidden_size"] // n_heads
    act = d.get("hidden_act") or d.get("hidden_activation") or "silu"
    if act not in _ACTIVATIONS:
        raise FaJaxError(f"{where}: hidden_act={act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    if d.get("use_bidirectional_attention"):
        raise FaJaxError(f"{where}: use_bidirectional_attention=true is not supported (decoders are causal)")
    kw: dict[str, Any] = {}
    n_layers = int(d["num_hidden_layers"])
    if model_type == "llama":
        kw.update(qkv_bias=bool(d.get("attention_bias", False)), o_bias=bool(d.get("attention_bias", False)),
                  mlp_bias=bool(d.get("mlp_bias", False)))
    elif model_type == "mistral":
        if d.get("sliding_window"):
            kw["sliding_windows"] = (int(d["sliding_window"]),) * n_layers
    elif model_type == "qwen2":
        kw["qkv_bias"] = True
        layer_types = d.get("layer_types")
        if layer_types is None and d.get("use_sliding_window") and d.get("sliding_window"):
            mwl = int(d.get("max_window_layers", n_layers))
            layer_types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(n_layers)]
        if layer_types and "sliding_attention" in layer_types:
            if not d.get("sliding_window"):
                raise FaJaxError(f"{where}: layer_types asks for sliding_attention but sliding_window is not set")
            kw["sliding_windows"] = tuple(int(d["sliding_window"]) if t == "sliding_attention" else 0
                                          for t in layer_types)
    elif model_type == "gemma":
        kw.update(embed_scale=True, norm_offset=1.0, qkv_bias=bool(d.get("attention_bias", False)),
                  o_bias=bool(d.get("attention_bias", False)))
    tie_default = model_type == "gemma"
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=int(head_dim),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        hidden_act=act,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
        max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
        bos_token_id=_token_ids(d.get("bos_token_id")),
        eos_token_id=_token_ids(d.get("eos_token_id")),
        pad_token_id=_token_ids(d.get("pad_token_id")),
        hf_config=dict(d),
        **_rope_fields(d, where),
        **kw,
    )


def load_config(path: str) -> ModelConfig:
    """Read `config.json` from a Hugging Face model directory (or the file itself)."""
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(f):
        raise FaJaxError(f"{path}: no config.json found (expected a Hugging Face model directory)")
    try:
        with open(f) as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise FaJaxError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise FaJaxError(f"{f}: expected a JSON object")
    return from_hf_dict(d, where=f)


def rope_inv_freq(config: ModelConfig):
    """Inverse frequencies [K/2] as float32, computed as transformers does (so parity holds bit for bit)."""
    import numpy as np

    dim = config.head_dim
    inv = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)))
    inv = inv.astype(np.float32)
    if config.rope_type == "linear":
        inv = inv / np.float32(config.rope_factor)
    elif config.rope_type == "llama3":
        factor, lo, hi = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old = config.rope_original_max_position
        lo_wavelen, hi_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv
