"""The decoder shared by every family: parameter layout, initialisation, and the pure forward pass.

Parameter paths are the Hugging Face module names with the leaf renamed by kind: linear `kernel` [in, out]
(the transpose of torch's weight) and `bias`, embedding `embedding` [V, D], norm `weight` [D].

Axis legend: B batch, T time, D model, V vocab.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import bottleneck, checks
from fa_jax import config as config_lib
from fa_jax.sharding import constrain_batch
from fa_jax.models import layers
from fa_jax.tree import unflatten


def param_specs(config) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Flat {path: (shape, logical axes)} of every base parameter, in checkpoint order."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    HK, GK = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    specs = {"model.embed_tokens.embedding": ((V, D), ("vocab", "embed"))}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        specs[f"{p}.input_layernorm.weight"] = ((D,), ("norm",))
        for name, (d_out, axis) in {"q_proj": (HK, "heads"), "k_proj": (GK, "kv_heads"),
                                    "v_proj": (GK, "kv_heads")}.items():
            specs[f"{p}.self_attn.{name}.kernel"] = ((D, d_out), ("embed", axis))
            if config.qkv_bias:
                specs[f"{p}.self_attn.{name}.bias"] = ((d_out,), (axis,))
        specs[f"{p}.self_attn.o_proj.kernel"] = ((HK, D), ("heads", "embed"))
        if config.o_bias:
            specs[f"{p}.self_attn.o_proj.bias"] = ((D,), ("norm",))
        specs[f"{p}.post_attention_layernorm.weight"] = ((D,), ("norm",))
        for name in ("gate_proj", "up_proj"):
            specs[f"{p}.mlp.{name}.kernel"] = ((D, F), ("embed", "mlp"))
            if config.mlp_bias:
                specs[f"{p}.mlp.{name}.bias"] = ((F,), ("mlp",))
        specs[f"{p}.mlp.down_proj.kernel"] = ((F, D), ("mlp", "embed"))
        if config.mlp_bias:
            specs[f"{p}.mlp.down_proj.bias"] = ((D,), ("norm",))
    specs["model.norm.weight"] = ((D,), ("norm",))
    if not config.tie_word_embeddings:
        specs["lm_head.kernel"] = ((D, V), ("embed", "vocab"))
    return specs


def linear_modules(config) -> list[tuple[str, tuple[int, int]]]:
    """(module path, (in, out)) of every linear layer an adapter can target (the LM head excluded)."""
    return [(path[: -len(".kernel")], shape) for path, (shape, _) in param_specs(config).items()
            if path.endswith(".kernel") and path != "lm_head.kernel"]


def count_params(config) -> int:
    return sum(math.prod(shape) for shape, _ in param_specs(config).values())


def init_params(config, rng, dtype=jnp.float32):
    """Random parameters (normal(0, 0.02) matrices, unit norms, zero biases), for tests and `jax.eval_shape`."""
    specs = param_specs(config)
    keys = jax.random.split(rng, len(specs))
    flat = {}
    for key, (path, (shape, _)) in zip(keys, specs.items()):
        if path.endswith("norm.weight"):
            flat[path] = jnp.full(shape, 0.0 if config.norm_offset else 1.0, dtype)
        elif path.endswith(".bias"):
            flat[path] = jnp.zeros(shape, dtype)
        else:
            flat[path] = (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return unflatten(flat)


class _Dropout:
    """Independent dropout masks for each adapter input, drawn from one key (a fresh fold per call)."""

    def __init__(self, rate: float, rng):
        self.rate, self.rng, self.calls = rate, rng, 0

    def __call__(self, x):
        self.calls += 1
        keep = jax.random.bernoulli(jax.random.fold_in(self.rng, self.calls), 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


def segment_positions(segment_ids):
    """Position of each token inside its own segment: 0, 1, ... restarting where the segment id changes."""
    T = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T), segment_ids.shape)
    changed = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                               segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(changed, idx, 0), axis=1)
    return idx - start


def _decoder_layer(config, i, lp, la, x, cos, sin, masks, dropout, prefix=None, segment_ids=None):
    eps, off = config.rms_norm_eps, config.norm_offset
    h = layers.rms_norm(x, lp["input_layernorm"]["weight"], eps, off)
    o = layers.attention(config, lp["self_attn"], la.get("self_attn", {}), h, cos, sin, masks[config.window(i)],
                         dropout, prefix, segment_ids=segment_ids, window=config.window(i))
    x = x + bottleneck.apply(la.get("attn_adapter"), o)  # Houlsby adapter on the sub-layer output (if any)
    h = layers.rms_norm(x, lp["post_attention_layernorm"]["weight"], eps, off)
    return x + bottleneck.apply(la.get("mlp_adapter"), layers.mlp(config, lp["mlp"], la.get("mlp", {}), h, dropout))


REMAT_POLICIES = {
    # recompute everything of the layer in the backward pass: least memory, one more forward pass
    "full": None,
    # keep the outputs of the projections (matmuls without batch dimensions); recompute norms, rope, attention
    # scores and softmax, activations: most of the memory saving at a small fraction of the compute
    "dots": "dots_with_no_batch_dims_saveable",
    # keep every matmul output, attention scores included
    "all_dots": "dots_saveable",
    # keep the MLP's gate and up projections (with their adapters): the backward pass recomputes the attention
    # block's input projections and attention only (about a fifth of a layer's forward FLOPs) and never the MLP,
    # for two [tokens, intermediate] arrays per layer
    "mlp": ("gate_proj", "up_proj"),
    # as "mlp", plus the query/key/value projections: only norms, rope and attention are recomputed
    "mlp_qkv": ("gate_proj", "up_proj", "q_proj", "k_proj", "v_proj"),
}


def remat_policy(remat):
    """The jax.checkpoint policy for `remat` = True / "full", "dots" or "all_dots" (see REMAT_POLICIES); False and
    "none" mean no rematerialization."""
    from fa_jax.errors import FaJaxError

    name = "full" if remat is True else remat
    if name not in REMAT_POLICIES:
        raise FaJaxError(f"model.remat={remat!r}: expected false, true or one of none, {', '.join(REMAT_POLICIES)}")
    policy = REMAT_POLICIES[name]
    if isinstance(policy, tuple):  # outputs named with checkpoint_name in models/layers.py
        return jax.checkpoint_policies.save_only_these_names(*policy)
    return None if policy is None else getattr(jax.checkpoint_policies, policy)


def hidden_states(config, params, tokens, adapters=None, *, mask=None, positions=None, segment_ids=None,
                  dtype=None, dropout_rate: float = 0.0, rng=None, remat=False):
    """Final-norm hidden states [B, T, D] in the compute dtype. See `forward` for the arguments."""
    # on the host, before any tracing: dtypes, shapes, adapter paths; the ids' range when the tokens are concrete
    checks.check_tokens(config, tokens, mask=mask, positions=positions, segment_ids=segment_ids)
    checks.check_adapters(config, adapters)
    emb = params["model"]["embed_tokens"]["embedding"]
    dtype = jnp.dtype(dtype or emb.dtype)
    tokens = jnp.asarray(tokens)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32) if mask is None else jnp.asarray(mask).astype(jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
    # (activations split by batch only, under a mesh: see sharding.constrain_batch)
    x = constrain_batch(jnp.take(emb, tokens, axis=0).astype(dtype))
    if config.embed_scale:
        x = x * jnp.asarray(math.sqrt(config.hidden_size), dtype)
    prefixes = [None] * config.num_hidden_layers
    if "prompt_tuning" in (adapters or {}) or "prefix_tuning" in (adapters or {}):
        from fa_jax import prompts  # virtual tokens at positions 0..N-1: a per-layer key/value prefix

        pk, pv = prompts.layer_prefixes(config, params, adapters, dtype)
        positions = jnp.asarray(positions) + pk.shape[1]
        prefixes = [(pk[i], pv[i], prompts.prefix_mask(positions, pk.shape[1], config.window(i)))
                    for i in range(config.num_hidden_layers)]
    cos, sin = layers.rope_tables(config_lib.rope_inv_freq(config), positions, dtype)
    masks = {w: layers.attention_mask(segment_ids, window=w)
             for w in sorted(set(config.window(i) for i in range(config.num_hidden_layers)))}
    dropout = _Dropout(dropout_rate, rng) if dropout_rate and rng is not None else None
    adapters = adapters or {}
    layer_adapters = adapters.get("model", {}).get("layers", {})
    for i in range(config.num_hidden_layers):
        fn = lambda lp, la, x, i=i: _decoder_layer(config, i, lp, la, x, cos, sin, masks, dropout, prefixes[i],
                                                   segment_ids)
        if remat and remat != "none":
            fn = jax.checkpoint(fn, policy=remat_policy(remat))
        x = constrain_batch(fn(params["model"]["layers"][str(i)], layer_adapters.get(str(i), {}), x))
    return layers.rms_norm(x, params["model"]["norm"]["weight"], config.rms_norm_eps, config.norm_offset)


def lm_head_kernel(config, params):
    """The output projection as [D, V] (the embedding's transpose when tied)."""
    if config.tie_word_embeddings:
        return params["model"]["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def lm_head(config, params):
    """(weight, vocab_major): the output projection as stored, [V, D] (the tied embedding, vocab_major True) or
    [D, V]; for code that can use either orientation without a transposed copy."""
    if config.tie_word_embeddings:
        return params["model"]["embed_tokens"]["embedding"], True
    return params["lm_head"]["kernel"], False


def lm_logits(config, params, hidden):
    """Float32 logits [..., V] from hidden states [..., D]."""
    w = lm_head_kernel(config, params).astype(hidden.dtype)
    return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)


def forward(config, params, tokens, adapters=None, *, mask=None, positions=None, segment_ids=None, dtype=None,
            dropout_rate: float = 0.0, rng=None, remat: bool = False):
    """Logits float32 [B, T, V] for int tokens [B, T].

    Checked first, on the host (a FaJaxError naming the argument): tokens of an integer dtype and rank 2, with ids in
    [0, vocab_size) when they are concrete (not under jit); mask / positions / segment_ids of the tokens' shape;
    every adapter module a module of this model, with shapes that fit it (`fa_jax.checks`).

    mask: [B, T], 1 for real tokens and 0 for padding (left or right). segment_ids: [B, T] for packed rows,
    0 for padding and a distinct id per document; tokens attend only inside their own document. Without explicit
    `positions` [B, T], positions count from 0 at the first real token of each row or document.
    dtype: compute dtype (e.g. "bfloat16"); softmax, norms and logits stay float32.
    dropout_rate / rng: adapter dropout for training. remat: recompute each layer in the backward pass.
    adapters "prompt_tuning" / "prefix_tuning" (fa_jax/prompts.py) put N virtual tokens in front of every row: the
    logits stay those of the T real tokens, whose positions (default or given) are shifted by N.
    """
    h = hidden_states(config, params, tokens, adapters, mask=mask, positions=positions, segment_ids=segment_ids,
                      dtype=dtype, dropout_rate=dropout_rate, rng=rng, remat=remat)
    return lm_logits(config, params, h)


def abstract_params(config, dtype=jnp.float32):
    """The parameter tree as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), dtype))


def cast(params, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), params)


def to_numpy(params):
    return jax.tree.map(np.asarray, params)


def select_layers(config, params, keep):
    """A smaller model made of the layers `keep` (indices, in order) of this one: (config, params).

    The arrays are shared, not copied. `keep="every_other"` keeps layers 0, 2, 4, ... (layer pruning, the student
    of the embedded demo). Per-layer settings (sliding windows) follow their layers.
    """
    from fa_jax.errors import FaJaxError

    n = config.num_hidden_layers
    if keep == "every_other":
        keep = list(range(0, n, 2))
    keep = [int(i) for i in keep]
    bad = [i for i in keep if not 0 <= i < n]
    if bad or not keep or len(set(keep)) != len(keep):
        raise FaJaxError(f"keep_layers={keep}: expected distinct layer indices in [0, {n})")
    new_config = config.replace(num_hidden_layers=len(keep),
                                sliding_windows=tuple(config.window(i) for i in keep) if config.sliding_windows else ())
    model = dict(params["model"])
    model["layers"] = {str(j): params["model"]["layers"][str(i)] for j, i in enumerate(keep)}
    return new_config, {**params, "model": model}


# ---------------------------------------------------------------------------------------------------------------
# Key/value cache for generation. Separate from `hidden_states` (which training uses): the attention mask comes
# from the cache's own record of which slots hold real tokens and at which positions.


def init_cache(config, batch: int, length: int, dtype=jnp.float32):
    """An empty cache of `length` slots per row.

    {"layers": {"0": {"k": [B, S, G, K], "v": [B, S, G, K]}, ...}, "positions": int32 [B, S], "valid": bool [B, S]}.
    Slot s of row b holds the keys/values of one token, its position (for rope, causality and sliding windows) and
    whether it is a real token (False for padding and for slots not written yet).
    """
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    return {"layers": {str(i): {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                       for i in range(config.num_hidden_layers)},
            "positions": jnp.zeros((batch, length), jnp.int32), "valid": jnp.zeros((batch, length), bool)}


def hidden_states_with_cache(config, params, tokens, cache, index, positions, valid=None, adapters=None, *,
                             dtype=None):
    """Run T new tokens [B, T] through the decoder on top of a cache (see `init_cache`).

    The tokens go into slots [index, index + T) of every row, with `positions` [B, T] and `valid` [B, T] (False
    for padding; default all True); each attends to the real tokens of its row at the same or earlier positions
    (within the layer's sliding window). `index` is a Python int (prefill: slots past index + T are not read) or
    a traced int32 scalar (decoding: the whole cache is read, nothing recompiles per step).
    Returns (final-norm hidden states [B, T, D] in the compute dtype, the updated cache).
    """
    emb = params["model"]["embed_tokens"]["embedding"]
    dtype = jnp.dtype(dtype or emb.dtype)
    tokens = jnp.asarray(tokens)
    positions = jnp.asarray(positions, jnp.int32)
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    T = tokens.shape[1]
    k_pos = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, index, axis=1)
    k_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid, index, axis=1)
    S = index + T if isinstance(index, int) else k_pos.shape[1]
    # (activations split by batch only, under a mesh: see sharding.constrain_batch)
    x = constrain_batch(jnp.take(emb, tokens, axis=0).astype(dtype))
    if config.embed_scale:
        x = x * jnp.asarray(math.sqrt(config.hidden_size), dtype)
    cos, sin = layers.rope_tables(config_lib.rope_inv_freq(config), positions, dtype)
    masks = {w: layers.cache_mask(positions, k_pos[:, :S], k_valid[:, :S], w)
             for w in sorted(set(config.window(i) for i in range(config.num_hidden_layers)))}
    eps, off = config.rms_norm_eps, config.norm_offset
    layer_adapters = (adapters or {}).get("model", {}).get("layers", {})
    new_layers = {}
    for i in range(config.num_hidden_layers):
        lp, la = params["model"]["layers"][str(i)], layer_adapters.get(str(i), {})
        c = cache["layers"][str(i)]
        h = layers.rms_norm(x, lp["input_layernorm"]["weight"], eps, off)
        out, k, v = layers.attention_with_cache(config, lp["self_attn"], la.get("self_attn", {}), h, cos, sin,
                                                c["k"], c["v"], index, masks[config.window(i)])
        new_layers[str(i)] = {"k": k, "v": v}
        x = x + bottleneck.apply(la.get("attn_adapter"), out)  # Houlsby adapter on the sub-layer output (if any)
        h = layers.rms_norm(x, lp["post_attention_layernorm"]["weight"], eps, off)
        x = x + bottleneck.apply(la.get("mlp_adapter"), layers.mlp(config, lp["mlp"], la.get("mlp", {}), h))
        x = constrain_batch(x)
    h = layers.rms_norm(x, params["model"]["norm"]["weight"], eps, off)
    return h, {"layers": new_layers, "positions": k_pos, "valid": k_valid}
