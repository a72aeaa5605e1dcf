"""The decoder as Flax Linen modules, used pure-functionally: one set of modules for every family (a family is a
config) and for every use (training, evaluation, prefill, decoding).

    hidden, cache = CausalLM(config, dtype).apply({"params": base, "adapters": tree}, tokens, positions, segment_ids)

The base weights are the `params` collection, with the Hugging Face module names as paths (models/spec.py holds
every parameter's shape and logical axes; the modules declare theirs from it). Adapters are a second collection,
`adapters`, whose tree mirrors the module paths: each module reads the part at its own path and applies it
(LoRA / DoRA in `Dense`, bottleneck adapters after each sub-layer in `DecoderLayer`, LLaMA-Adapter prompts in
`Attention`; prompt and prefix tuning live at the root of the tree and enter through `Decoder` as virtual tokens in
front of the sequence or as extra keys). Nothing here is trained through Flax: gradients are taken with respect to
the `adapters` argument of `apply`, so frozen weights never get any.

A key/value cache is an explicit argument (`transformer.init_cache` builds it): without one the modules attend over
the sequence itself (array order, block skipping, attention kernels); with one they write the new keys and values
into the cache slots and attend over the slots.

Axis legend: B batch, T time, S key slots, D model, H query heads, G key/value heads, K head dim, N virtual tokens.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from fa_jax import prompts, quant
from fa_jax.adapters import registry
from fa_jax import config as config_lib
from fa_jax.errors import FaJaxError
from fa_jax.models import attention_kernels, layers, spec
from fa_jax.sharding import constrain_batch

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
    name = "full" if remat is True else remat
    if name not in REMAT_POLICIES:
        raise FaJaxError(f"model.remat={remat!r}: expected false, true or one of none, {', '.join(REMAT_POLICIES)}")
    policy = REMAT_POLICIES[name]
    if isinstance(policy, tuple):  # outputs named with checkpoint_name below
        return jax.checkpoint_policies.save_only_these_names(*policy)
    return None if policy is None else getattr(jax.checkpoint_policies, policy)


def _param(module: nn.Module, name: str, shape, axes, init):
    """A base parameter with its logical axis names (sharding.py maps them to the mesh)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), jnp.float32)


def _dropout(x, rate: float, rng):
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Dense(nn.Module):
    """One linear module of a decoder layer (`kind`: q_proj ... down_proj): x [..., I] @ kernel [I, O] (+ bias),
    plus its LoRA / DoRA adapter when the `adapters` collection holds one at this path.

    Adapter dropout (LoRA dropout) applies to the adapter's input only, with a fresh mask per call from the
    `dropout` rng; the frozen path never drops. A DoRA adapter (one with a `magnitude`) rescales the bias-free
    output, then the bias is added (as in PEFT).
    """
    config: Any
    kind: str
    dropout_rate: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, deterministic: bool | None = None):
        d_in, d_out = spec.linear_shape(self.config, self.kind)
        kernel = _param(self, "kernel", (d_in, d_out), spec.LINEAR_AXES[self.kind], nn.initializers.normal(0.02))
        bias = (_param(self, "bias", (d_out,), spec.bias_axes(self.kind), nn.initializers.zeros)
                if spec.has_bias(self.config, self.kind) else None)
        adapter = self.variables.get("adapters", {})
        deterministic = self.deterministic if deterministic is None else deterministic
        drop = None
        if adapter and self.dropout_rate and not deterministic:
            drop = lambda v: _dropout(v, self.dropout_rate, self.make_rng("dropout"))
        return layers.dense(x, {"kernel": kernel, "bias": bias}, adapter, drop)


class RMSNorm(nn.Module):
    """RMSNorm in float32 (Gemma's norms multiply by 1 + weight: `config.norm_offset`)."""
    config: Any

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.config.norm_offset else nn.initializers.ones
        w = _param(self, "weight", (self.config.hidden_size,), ("norm",), init)
        return layers.rms_norm(x, w, self.config.rms_norm_eps, self.config.norm_offset)


class Embed(nn.Module):
    config: Any

    @nn.compact
    def __call__(self, tokens):
        table = _param(self, "embedding", (self.config.vocab_size, self.config.hidden_size), ("vocab", "embed"),
                       nn.initializers.normal(0.02))
        return quant.take(table, tokens)  # an int8 table (quant.QInt8) gives float32 rows


class Attention(nn.Module):
    """Grouped-query self-attention of one layer, with or without a key/value cache.

    ctx (built once per call by `Decoder`): "cos", "sin" [B, T, K] for the new tokens; "masks" {window: boolean
    [B, T, S]}; without a cache "segment_ids" [B, T] (for the attention kernels) and "prefix", None or this layer's
    (keys [N, G, K], values [N, G, K], mask [B, T, N] or None) that every query also attends to (prefix tuning);
    with a cache "index", the first slot the new tokens go to (a Python int during prefill, a traced scalar while
    decoding).
    `prefixed`: the sequence holds virtual tokens or a prefix (the attention kernels are not used then).
    """
    config: Any
    layer: int
    dropout_rate: float = 0.0
    deterministic: bool = True
    prefixed: bool = False

    @nn.compact
    def __call__(self, x, ctx, cache=None):
        cfg = self.config
        B, T, _ = x.shape
        H, G, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = lambda kind: Dense(cfg, kind, self.dropout_rate, self.deterministic, name=kind)
        q_proj, k_proj, v_proj = dense("q_proj"), dense("k_proj"), dense("v_proj")
        # named for the remat policies that keep projection outputs (REMAT_POLICIES)
        q = checkpoint_name(q_proj(x), "q_proj").reshape(B, T, H, K)
        k = checkpoint_name(k_proj(x), "k_proj").reshape(B, T, G, K)
        v = checkpoint_name(v_proj(x), "v_proj").reshape(B, T, G, K)
        q, k = layers.apply_rope(q, ctx["cos"], ctx["sin"]), layers.apply_rope(k, ctx["cos"], ctx["sin"])
        window = cfg.window(self.layer)
        mask = ctx["masks"][window]
        new_cache = None
        if cache is None:
            prefix = ctx.get("prefix")
            impl = attention_kernels.choose(cfg.attention_impl, q.shape, k.shape, q.dtype,
                                            prefix=prefix if prefix is not None or not self.prefixed else ())
            if impl == "splash":
                out = attention_kernels.splash_attention(q, k, v, ctx["segment_ids"], window)
            elif impl == "cudnn":
                out = attention_kernels.cudnn_attention(q, k, v, ctx["segment_ids"], window)
            else:
                out = layers.causal_attention(q.reshape(B, T, G, H // G, K), k, v, mask, prefix)
        else:
            index = ctx["index"]
            k_cache = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=1)
            S = mask.shape[-1]  # prefill reads only the slots written so far
            out = layers.masked_attention(q.reshape(B, T, G, H // G, K), k_cache[:, :S].astype(q.dtype),
                                          v_cache[:, :S].astype(q.dtype), mask)
            new_cache = {"k": k_cache, "v": v_cache}
        out = out.reshape(B, T, H * K)
        adapter = self.variables.get("adapters", {})
        # attention-site adapters (registry: LLaMA-Adapter), with the layer's own adapted key/value projections
        project = lambda p: (k_proj(p, deterministic=True).reshape(p.shape[0], G, K),
                             v_proj(p, deterministic=True).reshape(p.shape[0], G, K))
        for kind in registry.at_attention():
            if all(k in adapter for k in kind.attention_keys):
                out = out + kind.attention(adapter, q, project)
        return dense("o_proj")(out), new_cache


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)). SwiGLU for Llama/Mistral/Qwen2, GeGLU for Gemma."""
    config: Any
    dropout_rate: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        dense = lambda kind: Dense(self.config, kind, self.dropout_rate, self.deterministic, name=kind)
        act = layers.activation(self.config.hidden_act)
        gate = checkpoint_name(dense("gate_proj")(x), "gate_proj")
        up = checkpoint_name(dense("up_proj")(x), "up_proj")
        return dense("down_proj")(act(gate) * up)


def _layer_site(adapter, site: str, o):
    """A sub-layer's output after the layer-site adapters the layer holds (registry: bottleneck adapters)."""
    for kind in registry.at_layer():
        key = kind.layer_sites.get(site)
        if key is not None and adapter.get(key):
            o = kind.layer(adapter[key], o)
    return o


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residuals; a bottleneck adapter (bottleneck.py) on each sub-layer's
    output where the `adapters` collection holds one (`attn_adapter`, `mlp_adapter`)."""
    config: Any
    layer: int
    dropout_rate: float = 0.0
    deterministic: bool = True
    prefixed: bool = False

    @nn.compact
    def __call__(self, x, ctx, cache=None, prefix=None):
        """x [B, T, D] -> (x, the layer's updated cache or None). prefix: None or this layer's prefix-tuning
        (keys, values) [N, G, K] (the mask is ctx["prefix_masks"])."""
        cfg = self.config
        if prefix is not None:
            ctx = {**ctx, "prefix": (prefix[0], prefix[1], ctx["prefix_masks"][cfg.window(self.layer)])}
        adapter = self.variables.get("adapters", {})
        h = RMSNorm(cfg, name="input_layernorm")(x)
        o, cache = Attention(cfg, self.layer, self.dropout_rate, self.deterministic, self.prefixed,
                             name="self_attn")(h, ctx, cache)
        x = x + _layer_site(adapter, "attn_output", o)
        h = RMSNorm(cfg, name="post_attention_layernorm")(x)
        o = MLP(cfg, self.dropout_rate, self.deterministic, name="mlp")(h)
        x = x + _layer_site(adapter, "mlp_output", o)
        return constrain_batch(x), cache  # activations split by batch only, under a mesh (sharding.constrain_batch)


class Layers(nn.Module):
    """The decoder layers, `model.layers.0` ... in order; each remat'ed with the policy of `remat` if set."""
    config: Any
    dropout_rate: float = 0.0
    deterministic: bool = True
    remat: Any = False
    prefixed: bool = False

    @nn.compact
    def __call__(self, x, ctx, caches=None, prefix=None):
        cfg = self.config
        layer_cls = DecoderLayer
        if self.remat and self.remat != "none" and caches is None:
            layer_cls = nn.remat(DecoderLayer, policy=remat_policy(self.remat), prevent_cse=True)
        new_caches = {}
        for i in range(cfg.num_hidden_layers):
            x, c = layer_cls(cfg, i, self.dropout_rate, self.deterministic, self.prefixed, name=str(i))(
                x, ctx, None if caches is None else caches[str(i)],
                None if prefix is None else (prefix[0][i], prefix[1][i]))
            if caches is not None:
                new_caches[str(i)] = c
        return x, new_caches


def _windows(config) -> list[int]:
    """The distinct attention windows of the model's layers (0: full attention), sorted."""
    return sorted(set(config.window(i) for i in range(config.num_hidden_layers)))


def scanned_layers(config, dropout_rate: float, deterministic: bool, remat, prefixed: bool, name: str):
    """The decoder layers as one `DecoderLayer` under `nn.scan`: every parameter and adapter leaf of the layers
    stacked along a leading axis of length num_hidden_layers (`transformer.stack_layers`), one layer body in the
    program however deep the model. Each layer is remat'ed with the policy of `remat`; every layer draws its own
    dropout masks. Called as (x, ctx, None, prefix) with prefix None or (keys, values) [L, N, G, K]; no cache."""
    windows = _windows(config)
    if len(windows) > 1:
        raise FaJaxError(f"model.scan_layers=true needs the same attention window in every layer; this "
                         f"{config.model_type} model has sliding windows {list(config.sliding_windows)} (set "
                         f"model.scan_layers=false)")
    body = DecoderLayer
    if remat and remat != "none":
        body = nn.remat(DecoderLayer, policy=remat_policy(remat), prevent_cse=False)  # scan keeps CSE apart
    stack = nn.scan(body, variable_axes={"params": 0, "adapters": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, 0, 0), length=config.num_hidden_layers)
    return stack(config, 0, dropout_rate, deterministic, prefixed, name=name)


class Decoder(nn.Module):
    """`model`: token embedding, the layers, the final norm. Returns final-norm hidden states in `dtype`."""
    config: Any
    dtype: Any = jnp.float32
    dropout_rate: float = 0.0
    deterministic: bool = True
    remat: Any = False

    @nn.compact
    def __call__(self, tokens, positions, segment_ids=None, *, prompt=None, prefix=None, cache=None, index=None,
                 valid=None, embeddings=None):
        cfg, dtype = self.config, self.dtype
        windows = _windows(cfg)
        if embeddings is not None:  # virtual tokens, used as they are (no embedding scale)
            x = embeddings.astype(dtype)
        else:
            x = Embed(cfg, name="embed_tokens")(tokens).astype(dtype)
            if cfg.embed_scale:
                x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
        x = constrain_batch(x)
        B, T = x.shape[:2]
        positions = jnp.asarray(positions, jnp.int32)
        n = 0
        if cache is None:
            n = prompt.shape[0] if prompt is not None else (prefix[0].shape[1] if prefix is not None else 0)
            positions = positions + n  # virtual tokens at positions 0..N-1
            if prompt is not None:
                x = jnp.concatenate([jnp.broadcast_to(prompt.astype(dtype), (B, n, x.shape[2])), x], axis=1)
                masks = {w: layers.prompt_mask(segment_ids, n, positions, w) for w in windows}
                q_positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n)), positions],
                                              axis=1)
            else:
                masks = {w: layers.attention_mask(segment_ids, window=w) for w in windows}
                q_positions = positions
            cos, sin = layers.rope_tables(config_lib.rope_inv_freq(cfg), q_positions, dtype)
            ctx = {"cos": cos, "sin": sin, "masks": masks, "segment_ids": segment_ids}
            if prefix is not None:
                ctx["prefix_masks"] = {w: prompts.prefix_mask(positions, n, w) for w in windows}
            caches = None
        else:
            valid = jnp.ones((B, T), bool) if valid is None else jnp.asarray(valid, bool)
            k_pos = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, index, axis=1)
            k_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid, index, axis=1)
            S = index + T if isinstance(index, int) else k_pos.shape[1]
            masks = {w: layers.cache_mask(positions, k_pos[:, :S], k_valid[:, :S], w) for w in windows}
            cos, sin = layers.rope_tables(config_lib.rope_inv_freq(cfg), positions, dtype)
            ctx = {"cos": cos, "sin": sin, "masks": masks, "index": index}
            caches = cache["layers"]
        prefixed = prompt is not None or prefix is not None
        if cfg.scan_layers and cache is None:
            x, _ = scanned_layers(cfg, self.dropout_rate, self.deterministic, self.remat, prefixed, "layers")(
                x, ctx, None, prefix)
        else:
            x, new_caches = Layers(cfg, self.dropout_rate, self.deterministic, self.remat, prefixed,
                                   name="layers")(x, ctx, caches, prefix)
        h = RMSNorm(cfg, name="norm")(x)
        if prompt is not None:
            h = h[:, n:]  # the real tokens only
        new_cache = None if cache is None else {"layers": new_caches, "positions": k_pos, "valid": k_valid}
        return h, new_cache


def root_site(config, adapters, dtype):
    """(what, value) of the root-site adapter the tree holds (registry: prompt tuning gives ("prompt", embeddings
    [N, D]), prefix tuning ("prefix", (keys, values) [L, N, G, K])), or (None, None). One at a time."""
    held = [k for k in registry.at_root() if k.name in (adapters or {})]
    if len(held) > 1:
        raise FaJaxError(f"the adapter tree holds both {' and '.join(k.name for k in held)}: use one of them")
    return held[0].root(config, adapters, dtype) if held else (None, None)


class CausalLM(nn.Module):
    """The whole model: `model` (the decoder) and, unless tied to the embedding, `lm_head`.

    __call__ returns (final-norm hidden states [B, T, D] in `dtype`, the updated cache or None); `logits=True`
    returns float32 logits instead of hidden states. Prompt / prefix tuning (prompts.py) are read from the root of
    the `adapters` collection: without a cache the N virtual tokens run in front of every row (prompt tuning) or
    their keys and values are a per-layer prefix (prefix tuning); with a cache they are already in its first slots
    (`transformer.fill_cache`).
    """
    config: Any
    dtype: Any = jnp.float32
    dropout_rate: float = 0.0
    deterministic: bool = True
    remat: Any = False

    @nn.compact
    def __call__(self, tokens, positions, segment_ids=None, *, cache=None, index=None, valid=None, embeddings=None,
                 logits: bool = False):
        cfg = self.config
        adapters = self.variables.get("adapters", {})
        prompt = prefix = None
        if cache is None:  # (with a cache the virtual tokens are in its first slots: transformer.fill_cache)
            what, value = root_site(cfg, adapters, self.dtype)
            if what == "prompt":
                prompt = value
            elif what == "prefix":
                prefix = (value[0].astype(self.dtype), value[1].astype(self.dtype))
        h, cache = Decoder(cfg, self.dtype, self.dropout_rate, self.deterministic, self.remat, name="model")(
            tokens, positions, segment_ids, prompt=prompt, prefix=prefix, cache=cache, index=index, valid=valid,
            embeddings=embeddings)
        if not logits:
            return h, cache
        if cfg.tie_word_embeddings:
            w = nn.unbox(self.variables["params"]["model"]["embed_tokens"]["embedding"]).T
        else:
            w = LMHead(cfg, name="lm_head")()
        return quant.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32), cache


class LMHead(nn.Module):
    config: Any

    @nn.compact
    def __call__(self):
        return _param(self, "kernel", (self.config.hidden_size, self.config.vocab_size), ("embed", "vocab"),
                      nn.initializers.normal(0.02))
