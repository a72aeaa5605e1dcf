"""The layers every decoder family shares: adapter-aware dense, RMSNorm, rotary embedding, grouped-query
attention, gated MLP. Pure functions on plain dicts of arrays.

Axis legend: B batch, T query time, S key time, D model, H query heads, G key/value heads, Q query heads per
key/value head (H = G * Q), K head dim, F MLP hidden, V vocab, R adapter rank.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fa_jax import lora

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows give a uniform softmax, not NaN


def dense(x, p, adapter=None, dropout=None):
    """x [..., I] @ kernel [I, O] (+ bias), plus the adapter's contribution if one is given.

    `dropout` is a function applied to the adapter's input only (LoRA dropout); the frozen path never drops.
    """
    y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(x.dtype))
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    if adapter:
        y = lora.apply(x, y, adapter, dropout)
    return y


def rms_norm(x, weight, eps: float, offset: float = 0.0):
    """RMSNorm computed in float32. Llama multiplies by w after casting back; Gemma by (1 + w) before."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return (y * (offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_tables(inv_freq, positions, dtype):
    """cos, sin [B, T, K] for integer positions [B, T] (the two halves repeat, as in rotate-half rope)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, N, K] rotated by position (rotate-half convention of the Hugging Face checkpoints)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_mask(segment_ids, q_positions=None, k_positions=None, window: int = 0):
    """Boolean [B, T, S]: causal, within the same non-zero segment, and within `window` tokens if window > 0."""
    T = segment_ids.shape[1]
    q_idx = jnp.arange(T)[:, None] if q_positions is None else q_positions
    k_idx = jnp.arange(T)[None, :] if k_positions is None else k_positions
    allowed = (k_idx <= q_idx)[None]
    if window:
        allowed = allowed & (q_idx - k_idx < window)[None]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
    return allowed & same


def attention(config, p, a, x, cos, sin, mask, dropout=None):
    """Grouped-query self-attention. x [B, T, D], mask [B, T, S] boolean -> [B, T, D]."""
    B, T, _ = x.shape
    H, G, K = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = dense(x, p["q_proj"], a.get("q_proj"), dropout).reshape(B, T, H, K)
    k = dense(x, p["k_proj"], a.get("k_proj"), dropout).reshape(B, T, G, K)
    v = dense(x, p["v_proj"], a.get("v_proj"), dropout).reshape(B, T, G, K)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = q.reshape(B, T, G, H // G, K)
    scores = jnp.einsum("BTGQK,BSGK->BGQTS", q, k, preferred_element_type=jnp.float32) * (K ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BGQTS,BSGK->BTGQK", probs, v).reshape(B, T, H * K)
    return dense(out, p["o_proj"], a.get("o_proj"), dropout)


def _activation(name):
    if name == "silu":
        return jax.nn.silu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    return lambda x: jax.nn.gelu(x, approximate=True)  # gelu_pytorch_tanh, gelu_new


def mlp(config, p, a, x, dropout=None):
    """Gated MLP: down(act(gate(x)) * up(x)). SwiGLU for Llama/Mistral/Qwen2, GeGLU for Gemma."""
    act = _activation(config.hidden_act)
    h = act(dense(x, p["gate_proj"], a.get("gate_proj"), dropout)) * dense(x, p["up_proj"], a.get("up_proj"), dropout)
    return dense(h, p["down_proj"], a.get("down_proj"), dropout)
