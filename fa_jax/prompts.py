"""Prompt tuning and prefix tuning: N learned virtual tokens in front of every sequence (PEFT's PromptTuning and
PrefixTuning for causal LMs, same parameters, same logits).

    adapters = fa_jax.prompts.init_prompt_tuning(config, rng, num_virtual_tokens=20)
    adapters = fa_jax.prompts.init_prefix_tuning(config, rng, num_virtual_tokens=20, prefix_projection=True)
    logits = fa_jax.forward(config, params, tokens, adapters=adapters)        # [B, T, V]: real tokens only

Tree layout (top-level keys of the adapter tree, next to "model", which holds LoRA and the other per-module
adapters; one of the two kinds at a time, everything in it trainable):
    {"prompt_tuning": {"embedding": [N, D]}}
        N input embeddings, used as they are (no sqrt(D) scaling for Gemma: PEFT concatenates them after the
        scaled token embeddings).
    {"prefix_tuning": {"key": [L, N, G, K], "value": [L, N, G, K]}}
        per layer, N keys and values in front of the tokens' own (already "rotated": no rope is applied to them).
    {"prefix_tuning": {"embedding": [N, C], "mlp": {"hidden": {"kernel": [C, E], "bias": [E]},
                                                    "output": {"kernel": [E, L*2*G*K], "bias": [L*2*G*K]}}}}
        the reparametrised prefix (PEFT's prefix_projection=True, C = G*K): keys and values are
        output(tanh(hidden(embedding))) laid out [N, L, 2, G, K]; `fold_prefix_projection` turns it into the
        plain form after training (PEFT saves only that form too).

What the model computes (as PEFT on transformers): the virtual tokens take positions 0..N-1 and the real tokens'
positions are shifted by N (explicit `positions` count from 0 and are shifted too). Prompt tuning runs the N
embeddings through every layer in front of each row (models/modules.py; they attend only to each other, causally);
prefix tuning's keys and values are a per-layer prefix in front of the tokens' own. Every real token attends to the
whole prompt or prefix whatever its padding or segment: in a packed row every document sees it, as if it stood at
the start of each document (positions restart at N in each document). In sliding-window layers the prefix is seen
only while it is inside the window (q - k < window with the prefix at 0..N-1), as in transformers.
`forward` / `hidden_states` return the real tokens only ([B, T, ...]), so masks and losses are unchanged.
Generation puts the prompt or prefix in the first N slots of every layer's cache (`transformer.fill_cache`).

Axis legend: N virtual tokens, L layers, G key/value heads, K head dim, D model, C prefix embedding width,
E prefix MLP hidden width, B batch, T time.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax.errors import FaJaxError

KINDS = ("prompt_tuning", "prefix_tuning")


def adapter_kind(adapters) -> str | None:
    kinds = [k for k in KINDS if k in (adapters or {})]
    if len(kinds) > 1:
        raise FaJaxError("the adapter tree holds both prompt_tuning and prefix_tuning: use one of them")
    return kinds[0] if kinds else None


def _check_n(num_virtual_tokens) -> int:
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise FaJaxError(f"num_virtual_tokens={num_virtual_tokens!r}: expected an integer >= 1")
    return num_virtual_tokens


def num_virtual_tokens(adapters) -> int:
    """N of the tree's prompt or prefix (0 without one). Static: read from the shapes."""
    kind = adapter_kind(adapters)
    if kind is None:
        return 0
    a = adapters[kind]
    return int((a["embedding"] if "embedding" in a else a["key"][0]).shape[0])


# ---------------------------------------------------------------------------------------------------------------
# Initialisation (PEFT's defaults)


def init_prompt_tuning(config, rng, num_virtual_tokens: int = 20, params=None, init: str = "random",
                       token_ids=None, dtype=jnp.float32):
    """{"prompt_tuning": {"embedding": [N, D]}}.

    init="random": N(0, 1) (torch's nn.Embedding, PEFT's RANDOM); "vocab": the embeddings of N token ids drawn
    uniformly from the vocabulary (PEFT's SAMPLE_VOCAB; needs `params`); "text": the embeddings of `token_ids`
    (a tokenized text) repeated or cut to N (PEFT's TEXT; needs `params`). Vocabulary embeddings are taken as the
    model feeds them to the first layer (times sqrt(D) for Gemma).
    """
    n = _check_n(num_virtual_tokens)
    if init == "random":
        return {"prompt_tuning": {"embedding": jax.random.normal(rng, (n, config.hidden_size), jnp.float32)
                                  .astype(dtype)}}
    if init not in ("vocab", "text"):
        raise FaJaxError(f"prompt tuning init={init!r}: expected 'random', 'vocab' or 'text'")
    if params is None:
        raise FaJaxError(f"init_prompt_tuning(init={init!r}) needs the base params (params=...)")
    if init == "vocab":
        ids = jax.random.randint(rng, (n,), 0, config.vocab_size)
    else:
        ids = [int(t) if isinstance(t, (int, np.integer)) and not isinstance(t, bool) else -1
               for t in (token_ids if token_ids is not None else [])]
        if not ids or not all(0 <= t < config.vocab_size for t in ids):
            raise FaJaxError(f"init_prompt_tuning(init='text') needs token_ids: a non-empty list of token ids in "
                             f"[0, {config.vocab_size}), got {token_ids!r}")
        ids = jnp.asarray((ids * math.ceil(n / len(ids)))[:n])
    emb = jnp.take(params["model"]["embed_tokens"]["embedding"], ids, axis=0).astype(jnp.float32)
    if config.embed_scale:
        emb = emb * math.sqrt(config.hidden_size)
    return {"prompt_tuning": {"embedding": emb.astype(dtype)}}


def init_prefix_tuning(config, rng, num_virtual_tokens: int = 20, prefix_projection: bool = False,
                       encoder_hidden_size: int | None = None, init: str = "random", dtype=jnp.float32):
    """{"prefix_tuning": ...} in the plain form, or with `prefix_projection` the reparametrised one (see the module
    docstring) with an MLP of `encoder_hidden_size` hidden units (default G*K, PEFT's default).

    init="random": embeddings N(0, 1), linear layers U(+-1/sqrt(fan_in)) (torch's defaults, as PEFT);
    init="zero": the keys and values start at zero (PEFT's init_weights="zero": the plain prefix, or the MLP's last
    layer). A zero prefix still takes attention mass (scores 0), so it is not an exact no-op.
    """
    n = _check_n(num_virtual_tokens)
    if init not in ("random", "zero"):
        raise FaJaxError(f"prefix tuning init={init!r}: expected 'random' or 'zero'")
    L, G, K = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    if not prefix_projection:
        if encoder_hidden_size is not None:
            raise FaJaxError("encoder_hidden_size is the width of the prefix MLP: it needs prefix_projection=True")
        kv = jnp.zeros((2, L, n, G, K)) if init == "zero" else jax.random.normal(rng, (2, L, n, G, K))
        return {"prefix_tuning": {"key": kv[0].astype(dtype), "value": kv[1].astype(dtype)}}
    C = G * K
    E = C if encoder_hidden_size is None else encoder_hidden_size
    if isinstance(E, bool) or not isinstance(E, int) or E < 1:
        raise FaJaxError(f"encoder_hidden_size={encoder_hidden_size!r}: expected an integer >= 1")
    k_emb, k1, k2, k3, k4 = jax.random.split(rng, 5)
    uniform = lambda k, shape, fan_in: jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0) / math.sqrt(fan_in)
    out = L * 2 * C
    output = ({"kernel": jnp.zeros((E, out)), "bias": jnp.zeros((out,))} if init == "zero"
              else {"kernel": uniform(k3, (E, out), E), "bias": uniform(k4, (out,), E)})
    tree = {"embedding": jax.random.normal(k_emb, (n, C), jnp.float32),
            "mlp": {"hidden": {"kernel": uniform(k1, (C, E), C), "bias": uniform(k2, (E,), C)}, "output": output}}
    return {"prefix_tuning": jax.tree.map(lambda x: x.astype(dtype), tree)}


# ---------------------------------------------------------------------------------------------------------------
# The per-layer prefix


def _shape_error(what, got, want):
    raise FaJaxError(f"prefix_tuning: {what} has shape {list(got)}, expected {want} for this model")


def prompt_embeddings(config, adapters):
    """The tree's prompt_tuning embeddings [N, D], checked against the model's width."""
    emb = adapters["prompt_tuning"]["embedding"]
    if emb.ndim != 2 or emb.shape[1] != config.hidden_size:
        raise FaJaxError(f"prompt_tuning: embedding has shape {list(emb.shape)}, expected [N, {config.hidden_size}]")
    return emb


def prefix_key_values(config, adapters):
    """(keys, values), each [L, N, G, K], of the tree's prefix_tuning, in either form."""
    a = (adapters or {}).get("prefix_tuning")
    if a is None:
        raise FaJaxError("prefix_key_values: the adapter tree holds no prefix_tuning")
    L, G, K = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    if "key" in a:
        k, v = a["key"], a["value"]
        if k.ndim != 4 or k.shape[0] != L or k.shape[2:] != (G, K) or v.shape != k.shape:
            _shape_error("key / value", k.shape, f"[{L}, N, {G}, {K}] (both)")
        return k, v
    if "embedding" not in a or "mlp" not in a:
        raise FaJaxError(f"prefix_tuning: expected keys key/value or embedding/mlp, got {sorted(a)}")
    emb, hid, out = a["embedding"], a["mlp"]["hidden"], a["mlp"]["output"]
    if emb.ndim != 2 or hid["kernel"].shape[0] != emb.shape[1] or out["kernel"].shape[1] != L * 2 * G * K:
        _shape_error("embedding / mlp", (emb.shape, hid["kernel"].shape, out["kernel"].shape),
                     f"[N, C], [C, E], [E, {L * 2 * G * K}]")
    h = jnp.tanh(emb @ hid["kernel"] + hid["bias"])
    kv = (h @ out["kernel"] + out["bias"]).reshape(emb.shape[0], L, 2, G, K)  # PEFT's layout
    return jnp.moveaxis(kv[:, :, 0], 0, 1), jnp.moveaxis(kv[:, :, 1], 0, 1)


def fold_prefix_projection(config, adapters):
    """The tree with a reparametrised prefix_tuning replaced by its plain keys and values (for inference and
    export; training the folded form trains the prefix directly). Other trees come back unchanged."""
    a = (adapters or {}).get("prefix_tuning")
    if a is None or "key" in a:
        return adapters
    k, v = prefix_key_values(config, adapters)
    return {**adapters, "prefix_tuning": {"key": k, "value": v}}


def prefix_mask(positions, n: int, window: int):
    """Which of the N prefix slots (positions 0..N-1) queries at shifted `positions` [B, T] see: None (all of
    them) without a sliding window, else boolean [B, T, N]."""
    if not window:
        return None
    return positions[:, :, None] - jnp.arange(n)[None, None, :] < window


__all__ = ["init_prompt_tuning", "init_prefix_tuning", "prefix_key_values", "fold_prefix_projection",
           "adapter_kind", "num_virtual_tokens", "prefix_mask"]
