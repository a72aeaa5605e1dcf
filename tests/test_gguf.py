"""GGUF loading: the embedded SmolLM2-135M-Instruct against transformers' own GGUF loader, and tiny GGUF files
written here from random transformers models the way llama.cpp's converter writes them (permuted q/k, llama3
`rope_freqs`), plus the errors for truncated, unsupported or inconsistent files.
"""
from __future__ import annotations

import math
import os
import re

import jax
import numpy as np
import pytest

import fa_jax
from fa_jax.errors import FaJaxError
from fa_jax.tree import flatten

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from helpers import hf_logits, make_hf_model  # noqa: E402

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"

# fa_jax and transformers run the same float32 math, but SmolLM2's residual stream carries activations of ~2.3e4
# (from layer 11 on), where one float32 ulp is ~2e-3. XLA's CPU matmul rounds a little differently from torch's
# (on layer 11's down_proj, 5e-3 vs 1e-3 away from float64), which leaves 0.4e-4 .. 1.5e-4 on the logits depending
# on the sentence; against a float64 forward, transformers is ~0.5e-4 off and fa_jax ~1.6e-4. The loader itself is
# held to exact equality of every weight (test_smollm2_weights_equal_transformers).
LOGITS_ATOL = 2.5e-4


# ---------------------------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M-Instruct against transformers (one load of each for the whole module)


@pytest.fixture(scope="module")
def smollm2(embedded_smollm2):
    path, config, params, tokenizer = embedded_smollm2  # fa_jax's load, shared with test_generate
    directory = os.path.dirname(path)
    if os.path.basename(path) != SMOLLM2:
        pytest.skip(f"the embedded GGUF is {os.path.basename(path)}, these tests expect {SMOLLM2}")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2, dtype=torch.float32).eval()
    forward = jax.jit(lambda p, tokens, mask: fa_jax.forward(config, p, tokens, mask=mask))
    return dict(config=config, params=params, tokenizer=tokenizer, model=model, forward=forward)


def test_smollm2_config(smollm2):
    c = smollm2["config"]
    assert (c.model_type, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == ("llama", 576, 1536, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and (c.rope_type, c.rope_theta, c.rms_norm_eps) == ("default", 1e5, 1e-5)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    assert c.num_params == sum(p.numel() for p in smollm2["model"].parameters()) == 134_515_008


def test_smollm2_weights_equal_transformers(smollm2):
    """Same dequantisation, same q/k un-permutation: every weight is bit-identical to transformers'."""
    state = smollm2["model"].state_dict()
    flat = flatten(smollm2["params"])
    assert len(flat) == len([k for k in state if k != "lm_head.weight"])  # tied: lm_head is the embedding
    for path, value in flat.items():
        name = path.rsplit(".", 1)[0] + ".weight"
        got = np.asarray(value)
        np.testing.assert_array_equal(got.T if path.endswith(".kernel") else got, state[name].numpy(), err_msg=path)


def test_smollm2_logits_match_transformers(smollm2):
    tokens = smollm2["tokenizer"](["The quick brown fox jumps over the lazy dog."], return_tensors="np")["input_ids"]
    want = hf_logits(smollm2["model"], tokens)
    got = np.asarray(smollm2["forward"](smollm2["params"], tokens, np.ones_like(tokens)))
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGITS_ATOL)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_smollm2_padded_batch_matches_transformers(smollm2):
    batch = smollm2["tokenizer"](["Paris is the capital and most populous city of France.", "Hello there!"],
                                 return_tensors="np", padding=True)
    tokens, mask = batch["input_ids"], batch["attention_mask"]
    assert not mask.all()  # the second row really is padded
    want = hf_logits(smollm2["model"], tokens, mask)
    got = np.asarray(smollm2["forward"](smollm2["params"], tokens, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=LOGITS_ATOL)


# ---------------------------------------------------------------------------------------------------------------
# Tiny GGUF files written like llama.cpp's convert_hf_to_gguf.py

_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_cpp_name(hf_name: str) -> str:
    module, leaf = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, i, rest = module.split(".", 3)
        return f"blk.{i}.{_LAYER[rest]}.{leaf}"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[module] + "." + leaf


def _permute(w, n_head):
    """llama.cpp's LlamaModel.permute: rotate-half row order -> interleaved pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(cfg):
    """llama.cpp's rope_freqs for a llama3 rope_parameters (LlamaModel.generate_extra_tensors)."""
    rp = cfg.rope_parameters
    dim = cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (rp["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, lo, hi, factor = (rp["original_max_position_embeddings"], rp["low_freq_factor"], rp["high_freq_factor"],
                           rp["factor"])
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def write_gguf(model, path, arch=None, rope_freqs=None, **overrides):
    """Write a transformers model as an F32 GGUF; `overrides` replace metadata values (to make bad files)."""
    cfg = model.config
    arch = arch or cfg.model_type
    meta = dict(block_count=cfg.num_hidden_layers, context_length=cfg.max_position_embeddings,
                embedding_length=cfg.hidden_size, feed_forward_length=cfg.intermediate_size,
                head_count=cfg.num_attention_heads, head_count_kv=cfg.num_key_value_heads,
                rope_freq_base=float(cfg.rope_parameters["rope_theta"]), layer_norm_rms_eps=cfg.rms_norm_eps,
                vocab_size=cfg.vocab_size)
    meta.update(overrides)
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if cfg.rope_parameters.get("rope_type") == "llama3" and rope_freqs is None:
        rope_freqs = _llama3_rope_factors(cfg)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    for name, t in model.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            a = _permute(a, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            a = _permute(a, cfg.num_key_value_heads)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w.add_tensor(_llama_cpp_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2"])
def test_tiny_gguf_matches_transformers(family, tmp_path):
    """llama: untied head, 4 heads / 2 kv heads (q and k un-permuted); llama3: tied, rope from `rope_freqs`;
    qwen2: q/k/v biases, stored unpermuted."""
    model = make_hf_model(family)
    path = write_gguf(model, tmp_path / f"{family}.gguf")
    config, params = fa_jax.load_model(path)
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, None)
    if family == "llama3":
        rp = model.config.rope_parameters
        assert (config.rope_type, config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor,
                config.rope_original_max_position) == ("llama3", rp["factor"], rp["low_freq_factor"],
                                                       rp["high_freq_factor"], rp["original_max_position_embeddings"])
    tokens = np.random.RandomState(0).randint(0, model.config.vocab_size, (2, 24))
    mask = np.ones_like(tokens)
    mask[1, 17:] = 0
    want = hf_logits(model, tokens, mask)
    got = np.asarray(fa_jax.forward(config, params, tokens, mask=mask))
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], rtol=0, atol=1e-5)


def test_tiny_gguf_dtype_and_sharding(tmp_path):
    model = make_hf_model("llama")
    path = write_gguf(model, tmp_path / "m.gguf")
    _, ref = fa_jax.load_model(path)
    mesh = jax.make_mesh((len(jax.devices()),), ("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, params = fa_jax.load_model(path, dtype="bfloat16", sharding=lambda p, shape: replicated)
    for (p, a), b in zip(flatten(params).items(), flatten(ref).values()):
        assert a.dtype == jax.numpy.bfloat16 and a.sharding == replicated, p
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jax.numpy.bfloat16)))


def test_truncated_gguf_is_a_clear_error(tmp_path):
    path = write_gguf(make_hf_model("llama"), tmp_path / "m.gguf")
    data = open(path, "rb").read()
    for cut in (0, 3, 40, 600, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(FaJaxError, match=f"^{re.escape(str(bad))}: (not a GGUF file|corrupt or truncated)"):
            fa_jax.load_model(str(bad))


def test_corrupt_magic_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(200))
    with pytest.raises(FaJaxError, match=re.escape(f"{bad}: not a GGUF file (it starts with b'NOPE', not b'GGUF')")):
        fa_jax.load_model(str(bad))


def test_unsupported_architecture(tmp_path):
    path = write_gguf(make_hf_model("llama"), tmp_path / "m.gguf", arch="gpt2")
    with pytest.raises(FaJaxError, match=r"architecture 'gpt2' is not supported \(supported: llama, qwen2\)"):
        fa_jax.load_model(path)


def test_unexpressible_rope_freqs_is_an_error(tmp_path):
    """Per-frequency factors that follow no llama3 formula must not be dropped silently."""
    model = make_hf_model("llama")
    freqs = np.random.RandomState(0).uniform(1.0, 8.0, 8)  # head_dim 16 -> 8 frequencies
    path = write_gguf(model, tmp_path / "m.gguf", rope_freqs=freqs)
    with pytest.raises(FaJaxError, match="rope_freqs.weight.*no llama3 rope scaling"):
        fa_jax.load_model(path)


def test_metadata_shape_mismatch_names_the_tensor(tmp_path):
    path = write_gguf(make_hf_model("llama"), tmp_path / "m.gguf", feed_forward_length=96)
    with pytest.raises(FaJaxError, match=r"tensor 'blk.0.ffn_gate.weight' has shape \[128, 64\], the metadata "
                                         r"implies \[96, 64\]"):
        fa_jax.load_model(path)
