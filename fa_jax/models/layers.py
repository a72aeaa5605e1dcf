"""The math every decoder family shares, as pure functions on arrays: RMSNorm, rotary embedding, attention masks,
grouped-query attention (in array order with block skipping, or over cache slots), MLP activations. The Flax
modules of models/modules.py hold the parameters and call these.

Axis legend: B batch, T query time, S key time, D model, H query heads, G key/value heads, Q query heads per
key/value head (H = G * Q), K head dim, F MLP hidden, V vocab, R adapter rank.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fa_jax import quant
from fa_jax.adapters import registry
from fa_jax.errors import FaJaxError


def dense(x, p, adapter=None, dropout=None):
    """x [..., I] @ kernel [I, O] (+ bias) for p {"kernel"[, "bias"]}; with an adapter, the output of the registered
    kind that claims it (fa_jax/adapters/registry.py: LoRA, DoRA). The kernel may be int8 (a `quant.QInt8`).

    `dropout` is a function applied to the adapter's input only (LoRA dropout); the frozen path never drops.
    """
    kind = registry.linear_kind(adapter)
    if kind is not None:
        return kind.linear(x, p, adapter, dropout)
    if adapter:
        raise FaJaxError(f"no registered adapter kind applies to a linear module holding {sorted(adapter)}")
    y = quant.einsum("...i,io->...o", x, p["kernel"])
    if p.get("bias") is not None:
        y = y + p["bias"].astype(y.dtype)
    return y


_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows give a uniform softmax, not NaN




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


def activation(name):
    if name == "silu":
        return jax.nn.silu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    return lambda x: jax.nn.gelu(x, approximate=True)  # gelu_pytorch_tanh, gelu_new


# ---------------------------------------------------------------------------------------------------------------
# Masks beyond one packed sequence: virtual prompt tokens in front of packed documents, and key/value cache slots
# (generation). Attention over cache slots never uses `causal_attention`'s block skipping and always runs in XLA
# (the kernels' causal block masks assume queries and keys in array order, which a cache does not keep).


def prompt_mask(segment_ids, n: int, positions, window: int = 0):
    """Boolean [B, N + T, N + T] for N virtual prompt tokens (positions 0..N-1) in front of T tokens with
    `segment_ids` [B, T] and shifted `positions` [B, T] (N and more).

    The virtual tokens attend causally to each other, never to the tokens; every token attends to the whole prompt
    whatever its segment (within the layer's sliding window, by position), and to its own segment as in
    `attention_mask`. Causal in array order, so `causal_attention` can skip blocks."""
    B, T = segment_ids.shape
    idx = jnp.arange(n)
    top = idx[None, :] <= idx[:, None]
    if window:
        top = top & (idx[:, None] - idx[None, :] < window)
    top = jnp.concatenate([jnp.broadcast_to(top, (B, n, n)), jnp.zeros((B, n, T), bool)], axis=2)
    if window:
        left = positions[:, :, None] - idx[None, None, :] < window
    else:
        left = jnp.ones((B, T, n), bool)
    bottom = jnp.concatenate([left, attention_mask(segment_ids, window=window)], axis=2)
    return jnp.concatenate([top, bottom], axis=1)


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

