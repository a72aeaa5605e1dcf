"""GGUF files (llama.cpp) in: metadata -> ModelConfig, tensors dequantised one at a time -> fa_jax params.

llama.cpp names and layouts differ from Hugging Face in three ways that matter here:
  * tensor names: `blk.N.attn_q.weight` for `model.layers.N.self_attn.q_proj.weight`, and so on (`_gguf_name`);
  * for the `llama` architecture the converter permutes the rows of q_proj and k_proj (each head's rotary pairs
    interleaved, llama.cpp's "normal" rope) — undone here so the weights match the rotate-half convention of the
    Hugging Face checkpoints; `qwen2` uses NeoX rope in llama.cpp and is stored unpermuted;
  * llama3-style rope scaling is not in the metadata but in a `rope_freqs` tensor of per-frequency divisors, which
    is matched against the llama3 rope formula (an unrecognised one is an error, never ignored).
"""
from __future__ import annotations

import os

import gguf
import jax
import numpy as np
from tqdm.auto import tqdm

from fa_jax import config as config_lib
from fa_jax.errors import FaJaxError
from fa_jax.io.hf import is_transposed, place, sharding_for
from fa_jax.models.spec import param_specs
from fa_jax.tree import unflatten

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")
ROPE_FREQS = "rope_freqs.weight"

# fa_jax module suffix inside a layer -> llama.cpp tensor stem inside `blk.N`.
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _gguf_name(path: str) -> str:
    """fa_jax parameter path -> llama.cpp tensor name (`model.layers.3.mlp.up_proj.kernel` -> `blk.3.ffn_up.weight`)."""
    module, leaf = path.rsplit(".", 1)
    suffix = "bias" if leaf == "bias" else "weight"
    if module.startswith("model.layers."):
        _, _, idx, rest = module.split(".", 3)
        return f"blk.{idx}.{_LAYER_NAMES[rest]}.{suffix}"
    return f"{_TOP_NAMES[module]}.{suffix}"


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation on w [n_heads * K, ...] (a weight [out, in] or a bias [out]).

    The converter reorders each head's K rows from (half, i) to (i, half), so that rotary pairs are adjacent;
    swapping the two axes back restores the rotate-half order.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Metadata:
    """Scalar metadata of a GGUF file, with errors that name the file and key."""

    def __init__(self, path: str, reader):
        self.path, self.fields = path, reader.fields

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        kind = field.types[0] if field.types else None
        if kind == gguf.GGUFValueType.ARRAY:
            raise FaJaxError(f"{self.path}: GGUF metadata {key!r} is an array, expected a single value")
        if kind == gguf.GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        value = field.parts[field.data[0]][0]
        if isinstance(value, np.floating):
            # float32 in the file: the shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)
            return float(str(np.float32(value)))
        return value.item()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise FaJaxError(f"{self.path}: GGUF metadata has no {key!r}")
        return value


def _open(path: str):
    """GGUFReader over a memory map; a truncated or corrupt file is one FaJaxError naming the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        what = "it is empty" if size == 0 else f"it starts with {magic!r}, not b'GGUF'"
        raise FaJaxError(f"{path}: not a GGUF file ({what})")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # on malformed input the reader fails with ValueError, IndexError, KeyError, ...
        msg = " ".join(str(e).split()) or type(e).__name__
        raise FaJaxError(f"{path}: corrupt or truncated GGUF file of {size} bytes (the reader says: {msg})") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise FaJaxError(f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes up to "
                             f"{t.data_offset + t.n_bytes} but the file has {size}")
    return reader


def _numpy_shape(t) -> tuple[int, ...]:
    """A tensor's shape in numpy (row-major) order: GGUF lists dimensions innermost first."""
    return tuple(int(n) for n in reversed(t.shape.tolist()))


def _dequantize(path: str, t) -> np.ndarray:
    """One tensor as float32 in numpy order ([out, in] for a matrix)."""
    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise FaJaxError(f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which the gguf package "
                         f"cannot dequantize (re-quantize the model, e.g. to Q8_0 or Q4_K)") from None
    return np.asarray(arr, dtype=np.float32).reshape(_numpy_shape(t))


def _rope_from_freqs(path: str, freqs: np.ndarray, base: dict, orig_ctx) -> dict:
    """rope_parameters reproducing llama.cpp's `rope_freqs` divisors, or a FaJaxError if there are none.

    llama.cpp rotates with inv_freq / freqs. For Llama 3.x the converter fills freqs with the llama3 formula
    (factor, low/high_freq_factor, original_max_position_embeddings), which the GGUF does not record otherwise:
    1 for short wavelengths, `factor` for long ones, and between the two 1/s' with s' linear in 1/wavelength.
    The formula depends only on the two boundary wavelengths (old/low, old/high), so those are solved from the
    in-between entries (or, with fewer than two of them, taken from the usual values) and the result is checked.
    A constant divisor is linear scaling.
    """
    if np.all(freqs == 1.0):
        return base
    unexpressible = FaJaxError(f"{path}: tensor {ROPE_FREQS!r} holds rope frequency factors (min {freqs.min():.4g}, "
                               f"max {freqs.max():.4g}) that match no llama3 rope scaling fa_jax can express")
    if not np.all(np.isfinite(freqs)) or freqs.min() < 1.0:  # llama3 factors lie in [1, factor]
        raise unexpressible
    if np.all(freqs == freqs[0]):  # one divisor for every frequency: plain linear scaling
        return {**base, "rope_type": "linear", "factor": float(freqs[0])}
    hd = 2 * freqs.shape[0]
    probe = dict(model_type="llama", vocab_size=1, hidden_size=hd, intermediate_size=1, num_hidden_layers=1,
                 num_attention_heads=1, head_dim=hd)
    inv_freq = lambda rope: config_lib.rope_inv_freq(  # noqa: E731
        config_lib.from_hf_dict({**probe, "rope_parameters": rope}, path))
    plain = inv_freq(base).astype(np.float64)
    want = plain / freqs
    factor = float(freqs.max())
    candidates = []
    wavelen = 2 * np.pi / plain
    medium = (freqs > 1.0 + 1e-6) & (freqs < factor * (1 - 1e-6))
    s = (1 / freqs[medium] - 1 / factor) / (1 - 1 / factor)  # = (old/wavelen - lo) / (hi - lo) = A/wavelen + B
    if medium.sum() >= 2:
        A, B = np.polyfit(1 / wavelen[medium], s, 1)
        if B < 0 < A:
            lo_wavelen, ratio = -A / B, 1 - 1 / B  # old/lo, and hi/lo
            old = int(orig_ctx) if orig_ctx else int(round(lo_wavelen))
            lo = old / lo_wavelen
            candidates += [(old, round(lo, d), round(lo * ratio, d)) for d in (3, 6)] + [(old, lo, lo * ratio)]
    elif medium.sum() == 1:  # one equation: assume the usual low/high = 1/4 and solve for old
        candidates.append((int(round(wavelen[medium][0] * (3 * s[0] + 1))), 1.0, 4.0))
    olds = ([int(orig_ctx)] if orig_ctx else []) + [2 ** k for k in range(4, 21)]
    candidates += [(old, 1.0, 4.0) for old in olds]
    for old, lo, hi in candidates:
        rope = {**base, "rope_type": "llama3", "factor": round(factor, 6), "low_freq_factor": float(lo),
                "high_freq_factor": float(hi), "original_max_position_embeddings": old}
        if np.allclose(inv_freq(rope), want, rtol=1e-5, atol=0):
            return rope
    raise unexpressible


def _config_dict(path: str, meta: _Metadata, tensors: dict) -> dict:
    """A Hugging Face style config dict built from the GGUF metadata (and, where it is silent, the tensors)."""
    arch = meta.require("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise FaJaxError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
    key = lambda k: f"{arch}.{k}"  # noqa: E731
    if (meta.get(key("expert_count")) or 0) > 0:
        raise FaJaxError(f"{path}: mixture-of-experts GGUF ({key('expert_count')}={meta.get(key('expert_count'))}) "
                         f"is not supported")
    hidden = int(meta.require(key("embedding_length")))
    n_heads = int(meta.require(key("attention.head_count")))
    n_kv = meta.get(key("attention.head_count_kv"), n_heads)  # a per-layer array is an error in `get`
    head_dim = int(meta.get(key("attention.key_length")) or hidden // n_heads)
    v_dim = int(meta.get(key("attention.value_length")) or head_dim)
    if v_dim != head_dim:
        raise FaJaxError(f"{path}: {key('attention.value_length')}={v_dim} differs from key_length={head_dim}; "
                         f"fa_jax needs equal key and value head sizes")
    rope_dim = meta.get(key("rope.dimension_count"))
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise FaJaxError(f"{path}: {key('rope.dimension_count')}={rope_dim} differs from the head size {head_dim} "
                         f"(partial rotary embeddings are not supported)")
    if "token_embd.weight" not in tensors:
        raise FaJaxError(f"{path}: missing tensor 'token_embd.weight' (the token embedding)")
    vocab = int(meta.get(key("vocab_size")) or _numpy_shape(tensors["token_embd.weight"])[0])

    rope = {"rope_theta": float(meta.get(key("rope.freq_base"), 10000.0)), "rope_type": "default"}
    scaling = meta.get(key("rope.scaling.type"), "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(meta.require(key("rope.scaling.factor"))))
    elif scaling != "none":
        raise FaJaxError(f"{path}: {key('rope.scaling.type')}={scaling!r} is not supported (supported: none, linear)")
    if ROPE_FREQS in tensors:
        if rope["rope_type"] != "default":
            raise FaJaxError(f"{path}: both {key('rope.scaling.type')}={scaling!r} and a {ROPE_FREQS!r} tensor; "
                             f"fa_jax cannot combine them")
        freqs = _dequantize(path, tensors[ROPE_FREQS]).reshape(-1)
        if freqs.shape[0] != head_dim // 2:
            raise FaJaxError(f"{path}: tensor {ROPE_FREQS!r} has {freqs.shape[0]} entries, expected head_dim/2 = "
                             f"{head_dim // 2}")
        rope = _rope_from_freqs(path, freqs, rope, meta.get(key("rope.scaling.original_context_length")))

    d = dict(
        model_type=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta.require(key("feed_forward_length"))),
        num_hidden_layers=int(meta.require(key("block_count"))),
        num_attention_heads=n_heads,
        num_key_value_heads=int(n_kv),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get(key("attention.layer_norm_rms_epsilon"), 1e-6)),
        max_position_embeddings=int(meta.get(key("context_length")) or 2048),
        rope_parameters=rope,
        # llama.cpp omits `output.weight` when the LM head is the token embedding
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        hidden_act="silu",
    )
    if arch == "llama":
        # Llama's attention_bias puts biases on q, k, v and o alike; the tensors say whether there are any.
        d["attention_bias"] = "blk.0.attn_q.bias" in tensors
        d["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    return d


def gguf_config(path: str):
    """The model config of a GGUF file, from its metadata and tensor shapes only (no tensor is read)."""
    reader = _open(path)
    return config_lib.from_hf_dict(_config_dict(path, _Metadata(path, reader), {t.name: t for t in reader.tensors}),
                                   where=path)


def load_gguf(path: str, dtype="float32", sharding=None):
    """(config, params) from a llama.cpp GGUF file; see `fa_jax.load_model`.

    Quantised tensors are dequantised to float32 one at a time, then cast to `dtype` and placed on device(s),
    so host memory stays near one float32 copy of the largest tensor plus the device copy of the model.
    """
    reader = _open(path)
    meta = _Metadata(path, reader)
    tensors = {t.name: t for t in reader.tensors}
    config = config_lib.from_hf_dict(_config_dict(path, meta, tensors), where=path)

    specs = param_specs(config)
    wanted = {}  # fa_jax path -> GGUF tensor name, every shape checked before anything is dequantised
    for p, (shape, _) in specs.items():
        name = _gguf_name(p)
        expected = tuple(shape[::-1]) if is_transposed(p) else tuple(shape)
        if name not in tensors:
            raise FaJaxError(f"{path}: missing tensor {name!r} (needed by the metadata: shape {list(expected)})")
        got = _numpy_shape(tensors[name])
        if got != expected:
            raise FaJaxError(f"{path}: tensor {name!r} has shape {list(got)}, the metadata implies {list(expected)}")
        wanted[p] = name
    extra = sorted(set(tensors) - set(wanted.values()) - {ROPE_FREQS})
    if extra:
        raise FaJaxError(f"{path}: {len(extra)} tensor(s) not used by this {config.model_type} model, e.g. "
                         f"{extra[0]!r}")

    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    dtype = np.dtype(jax.numpy.dtype(dtype))

    def fetch(p: str, name: str) -> np.ndarray:
        w = _dequantize(path, tensors[name])  # numpy order: [out, in], [V, D] or [D]
        proj = p.rsplit(".", 2)[-2]
        if config.model_type == "llama" and proj in heads:
            w = _unpermute(w, heads[proj])
        return w.T if is_transposed(p) else w

    flat = {}
    for p, name in tqdm(wanted.items(), desc=f"loading {os.path.basename(path)}", unit="tensor", disable=None,
                        leave=False):
        shape = specs[p][0]
        flat[p] = place(lambda p=p, name=name: fetch(p, name), shape, dtype, sharding_for(sharding, config, p, shape))
    return config, unflatten(flat)
