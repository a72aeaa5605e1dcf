"""The layers every decoder family shares: adapter-aware dense, RMSNorm, rotary embedding, grouped-query
attention, gated MLP. Pure functions on plain dicts of arrays.

Axis legend: B batch, T query time, S key time, D model, H query heads, G key/value heads, Q query heads per
key/value head (H = G * Q), K head dim, F MLP hidden, V vocab, R adapter rank.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from fa_jax import lora
from fa_jax.models import attention_kernels

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows give a uniform softmax, not NaN


def dense(x, p, adapter=None, dropout=None):
    """x [..., I] @ kernel [I, O] (+ bias), plus the adapter's contribution if one is given.

    `dropout` is a function applied to the adapter's input only (LoRA dropout); the frozen path never drops.
    A DoRA adapter (one with a `magnitude`) rescales the bias-free output, then the bias is added (as in PEFT).
    """
    y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(x.dtype))
    if adapter and "magnitude" in adapter:
        y = lora.apply_dora(x, y, p["kernel"], adapter, dropout)
        adapter = None
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


def attention(config, p, a, x, cos, sin, mask, dropout=None, prefix=None, segment_ids=None, window: int = 0):
    """Grouped-query self-attention. x [B, T, D], mask [B, T, S] boolean -> [B, T, D].

    `prefix`: None, or (keys [N, G, K], values [N, G, K], mask [B, T, N] or None for all visible) that every query
    also attends to, in front of the tokens' own keys (prompt / prefix tuning, fa_jax/prompts.py).

    `mask` must be causal in array order (query t never sees key s > t), as `attention_mask` builds it: the
    queries are processed in blocks and block i only reads the keys up to its own end, which skips the fully
    masked upper-right part of the score matrix (a quarter of it with two blocks).

    `config.attention_impl` picks the kernel (models/attention_kernels.py); the kernels build their mask from
    `segment_ids` [B, T] (0 = padding) and the layer's sliding `window` (0: none), which must describe `mask`.
    Without `segment_ids` the xla path runs.
    """
    B, T, _ = x.shape
    H, G, K = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    # named for the remat policies that keep projection outputs (transformer.REMAT_POLICIES)
    q = checkpoint_name(dense(x, p["q_proj"], a.get("q_proj"), dropout), "q_proj").reshape(B, T, H, K)
    k = checkpoint_name(dense(x, p["k_proj"], a.get("k_proj"), dropout), "k_proj").reshape(B, T, G, K)
    v = checkpoint_name(dense(x, p["v_proj"], a.get("v_proj"), dropout), "v_proj").reshape(B, T, G, K)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    impl = "xla" if segment_ids is None else attention_kernels.choose(
        config.attention_impl, q.shape, k.shape, q.dtype, prefix=prefix)
    if impl == "splash":
        out = attention_kernels.splash_attention(q, k, v, segment_ids, window)
    elif impl == "cudnn":
        out = attention_kernels.cudnn_attention(q, k, v, segment_ids, window)
    else:
        out = causal_attention(q.reshape(B, T, G, H // G, K), k, v, mask, prefix)
    out = out.reshape(B, T, H * K)
    if "adaption_prompt" in a:  # LLaMA-Adapter: gated attention over the layer's adaption prompt (llama_adapter.py)
        from fa_jax.llama_adapter import prompt_attention
        out = out + prompt_attention(config, p, a, q)
    return dense(out, p["o_proj"], a.get("o_proj"), dropout)


def query_blocks(T: int, min_block: int = 128, max_blocks: int = 8) -> int:
    """How many equal query blocks causal attention over T positions uses (1 for short sequences)."""
    n = 1
    while n * 2 <= max_blocks and T % (n * 2) == 0 and T // (n * 2) >= min_block:
        n *= 2
    return n


def causal_attention(q, k, v, mask, prefix=None):
    """softmax(q k^T / sqrt(K) masked) v for q [B, T, G, Q, K], k and v [B, S, G, K], mask [B, T, S] causal.

    The Q query heads that share a key/value head are stacked along time ([B, G, Q*T, K]), so each (batch, group)
    pair is one larger matmul instead of Q small ones. Scores and softmax are float32.
    `prefix` (see `attention`) is one more key block in front, shared by the batch and read by every query block.
    """
    B, T, G, Q, K = q.shape
    n = query_blocks(T) if k.shape[1] == T else 1
    c = T // n
    qg = jnp.moveaxis(q, 1, 3)  # [B, G, Q, T, K]
    N = 0 if prefix is None else prefix[0].shape[0]
    outs = []
    for i in range(n):
        S = (i + 1) * c if n > 1 else k.shape[1]
        qi = qg[:, :, :, i * c:(i + 1) * c].reshape(B, G, Q * c, K)
        s = jnp.einsum("bgmk,bsgk->bgms", qi, k[:, :S], preferred_element_type=jnp.float32) * (K ** -0.5)
        s = jnp.where(mask[:, None, None, i * c:(i + 1) * c, :S], s.reshape(B, G, Q, c, S), _NEG)
        if N:
            s = jnp.concatenate([_prefix_scores(qi, prefix, i * c, c).reshape(B, G, Q, c, N), s], axis=-1)
        probs = jax.nn.softmax(s, axis=-1).astype(v.dtype).reshape(B, G, Q * c, N + S)
        o = jnp.einsum("bgms,bsgk->bgmk", probs[..., N:] if N else probs, v[:, :S])
        if N:
            o = o + jnp.einsum("bgmn,ngk->bgmk", probs[..., :N], prefix[1].astype(v.dtype))
        outs.append(o.reshape(B, G, Q, c, K))
    out = outs[0] if n == 1 else jnp.concatenate(outs, axis=3)
    return jnp.moveaxis(out, 3, 1)  # [B, T, G, Q, K]


def _prefix_scores(qi, prefix, start: int, c: int):
    """Float32 scores [B, G, Q*c, N] of the query block qi [B, G, Q*c, K] (queries start..start+c) over the
    prefix keys, masked by the prefix mask where there is one."""
    pk, _, pmask = prefix
    B, G, M, K = qi.shape
    s = jnp.einsum("bgmk,ngk->bgmn", qi, pk.astype(qi.dtype), preferred_element_type=jnp.float32) * (K ** -0.5)
    if pmask is None:
        return s
    s = s.reshape(B, G, M // c, c, -1)
    return jnp.where(pmask[:, None, None, start:start + c], s, _NEG).reshape(B, G, M, -1)


def _activation(name):
    if name == "silu":
        return jax.nn.silu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    return lambda x: jax.nn.gelu(x, approximate=True)  # gelu_pytorch_tanh, gelu_new


def mlp(config, p, a, x, dropout=None):
    """Gated MLP: down(act(gate(x)) * up(x)). SwiGLU for Llama/Mistral/Qwen2, GeGLU for Gemma."""
    act = _activation(config.hidden_act)
    gate = checkpoint_name(dense(x, p["gate_proj"], a.get("gate_proj"), dropout), "gate_proj")
    up = checkpoint_name(dense(x, p["up_proj"], a.get("up_proj"), dropout), "up_proj")
    return dense(act(gate) * up, p["down_proj"], a.get("down_proj"), dropout)


# ---------------------------------------------------------------------------------------------------------------
# Attention over a key/value cache (generation). Its own path: the mask comes from the cache's slot metadata
# (valid slots, positions), not from array order, so `causal_attention`'s block skipping does not apply. Always
# XLA: `config.attention_impl` is not read here (a "splash" or "cudnn" config generates through this path too; the
# kernels' causal block masks assume queries and keys in array order, which a cache does not keep).


def cache_mask(q_positions, k_positions, k_valid, window: int = 0):
    """Boolean [B, T, S] for queries at positions [B, T] over cache slots with positions and validity [B, S].

    A query sees a slot if it holds a real token (`k_valid`) at the same or an earlier position, and, if
    window > 0, fewer than `window` positions back. Positions are per row, so left padding needs nothing more.
    """
    q = q_positions[:, :, None]
    k = k_positions[:, None, :]
    allowed = k_valid[:, None, :] & (k <= q)
    if window:
        allowed = allowed & (q - k < window)
    return allowed


def masked_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(K) masked) v for q [B, T, G, Q, K], k and v [B, S, G, K] and any mask [B, T, S].

    Scores and softmax are float32; a fully masked query row gets a uniform softmax (finite, never NaN).
    """
    K = q.shape[-1]
    s = jnp.einsum("btgqk,bsgk->bgqts", q, k, preferred_element_type=jnp.float32) * (K ** -0.5)
    s = jnp.where(mask[:, None, None], s, _NEG)
    probs = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bgqts,bsgk->btgqk", probs, v)


def attention_with_cache(config, p, a, x, cos, sin, k_cache, v_cache, index, mask):
    """Grouped-query attention of T new tokens over a key/value cache.

    x [B, T, D]; cos, sin [B, T, K] for the new tokens' positions; k_cache, v_cache [B, S, G, K]. The new keys and
    values are written at slots [index, index + T) (the same slots in every row) before attending, so the new
    tokens see each other as the mask allows. mask [B, T, S'] covers the first S' <= S slots (S' = index + T when
    index is a Python int, which skips the empty tail during prefill). Returns (out [B, T, D], k_cache, v_cache).
    """
    B, T, _ = x.shape
    H, G, K = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = dense(x, p["q_proj"], a.get("q_proj")).reshape(B, T, H, K)
    k = dense(x, p["k_proj"], a.get("k_proj")).reshape(B, T, G, K)
    v = dense(x, p["v_proj"], a.get("v_proj")).reshape(B, T, G, K)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
    S = mask.shape[-1]
    out = masked_attention(q.reshape(B, T, G, H // G, K), k_cache[:, :S].astype(q.dtype),
                           v_cache[:, :S].astype(q.dtype), mask)
    out = out.reshape(B, T, H * K)
    if "adaption_prompt" in a:  # LLaMA-Adapter: gated attention over the layer's adaption prompt (llama_adapter.py)
        from fa_jax.llama_adapter import prompt_attention
        out = out + prompt_attention(config, p, a, q)
    return dense(out, p["o_proj"], a.get("o_proj")), k_cache, v_cache
