"""The functional face of the decoder: `forward`, `hidden_states`, the key/value cache, parameter helpers.

Each function runs the Flax modules of models/modules.py pure-functionally (`CausalLM(...).apply({"params": base,
"adapters": tree}, ...)`); training, evaluation, prefill and decoding go through the same modules. Parameter paths are
the Hugging Face module names (models/spec.py).

Axis legend: B batch, T time, D model, V vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import checks, quant
from fa_jax.errors import FaJaxError
from fa_jax.models.modules import REMAT_POLICIES, CausalLM, remat_policy, root_site  # noqa: F401  (public here)
from fa_jax.models.spec import count_params, linear_modules, param_specs  # noqa: F401  (public here)
from fa_jax.tree import flatten, unflatten


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


def segment_positions(segment_ids):
    """Position of each token inside its own segment: 0, 1, ... restarting where the segment id changes."""
    T = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T), segment_ids.shape)
    changed = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                               segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(changed, idx, 0), axis=1)
    return idx - start


def _dtype(params, dtype):
    return jnp.dtype(dtype or quant.float_dtype(params["model"]["embed_tokens"]["embedding"]))


def hidden_states(config, params, tokens, adapters=None, *, mask=None, positions=None, segment_ids=None,
                  dtype=None, dropout_rate: float = 0.0, rng=None, remat=False):
    """Final-norm hidden states [B, T, D] in the compute dtype. See `forward` for the arguments."""
    # on the host, before any tracing: dtypes, shapes, adapter paths; the ids' range when the tokens are concrete
    checks.check_tokens(config, tokens, mask=mask, positions=positions, segment_ids=segment_ids)
    checks.check_adapters(config, adapters)
    tokens = jnp.asarray(tokens)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32) if mask is None else jnp.asarray(mask).astype(jnp.int32)
    segment_ids = jnp.asarray(segment_ids)
    if positions is None:
        positions = segment_positions(segment_ids)
    if remat and remat != "none":
        remat_policy(remat)  # a clear error for an unknown name
    if config.scan_layers:
        params = stack_layers(config, params)  # a copy of the layers' weights unless stacked already
        adapters = stack_adapters(config, adapters)  # adapter-sized; gradients flow back to the per-layer tree
    train = bool(dropout_rate) and rng is not None
    model = CausalLM(config, _dtype(params, dtype), dropout_rate if train else 0.0, not train,
                     remat if remat and remat != "none" else False)
    h, _ = model.apply({"params": params, "adapters": adapters or {}}, tokens, positions, segment_ids,
                       rngs={"dropout": rng} if train else None)
    return h


# ---------------------------------------------------------------------------------------------------------------
# Stacked layers (`model.scan_layers`): model.layers holds one decoder layer's tree with every leaf stacked along a
# leading axis of length num_hidden_layers, instead of the per-layer trees "0", "1", ... Files and adapters on
# disk always use the per-layer names; the stacking happens in memory.


def is_stacked(tree) -> bool:
    """Whether a params or adapter tree holds its layers stacked (see `stack_layers`)."""
    layers = (tree or {}).get("model", {}).get("layers", {})
    return bool(layers) and not all(str(k).isdigit() for k in layers)


def stack_layers(config, params):
    """Base params with the decoder layers stacked (for `model.scan_layers`); stacked params come back as they are.
    Under jit with donated input this is the one copy a run makes (train.load_models)."""
    if is_stacked(params):
        return params
    layers = params["model"]["layers"]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[str(i)] for i in range(config.num_hidden_layers)])
    return {**params, "model": {**params["model"], "layers": stacked}}


def unstack_layers(config, params):
    """The inverse of `stack_layers` (per-layer trees "0", "1", ...); per-layer params come back as they are."""
    if not is_stacked(params):
        return params
    layers = params["model"]["layers"]
    per = {str(i): jax.tree.map(lambda x, i=i: x[i], layers) for i in range(config.num_hidden_layers)}
    return {**params, "model": {**params["model"], "layers": per}}


def stack_adapters(config, adapters):
    """An adapter tree with its per-layer parts stacked like `stack_layers`, each leaf zero-padded to the largest
    shape any layer has (LoRA ranks: extra zero columns of lora_A and rows of lora_B) and zero where a layer has
    none (LoRA with scale 0, a bottleneck adapter that adds nothing, a LLaMA-Adapter gate of 0). None of that changes
    a number of the forward pass or a gradient of the real entries. DoRA modules must exist in every layer (a zero
    magnitude is not a no-op). Other parts of the tree (prompt / prefix tuning) are unchanged."""
    layers = (adapters or {}).get("model", {}).get("layers")
    if not layers or is_stacked(adapters):
        return adapters
    n = config.num_hidden_layers
    flats = [flatten(layers.get(str(i), {})) for i in range(n)]
    out = {}
    for path in dict.fromkeys(p for f in flats for p in f):
        present = [f[path] for f in flats if path in f]
        if path.endswith("magnitude") and len(present) < n:
            missing = [i for i, f in enumerate(flats) if path not in f]
            raise FaJaxError(f"model.scan_layers=true: the DoRA module model.layers.*.{path[:-len('.magnitude')]} is "
                             f"missing in layers {missing}; DoRA under scan needs it in every layer")
        shape = tuple(max(np.shape(x)[d] for x in present) for d in range(np.ndim(present[0])))
        zeros = jnp.zeros(shape, present[0].dtype)
        pad = lambda x: jnp.pad(x, [(0, m - k) for k, m in zip(np.shape(x), shape)]) if np.shape(x) != shape else x
        out[path] = jnp.stack([pad(jnp.asarray(f[path])) if path in f else zeros for f in flats])
    return {**adapters, "model": {**adapters["model"], "layers": unflatten(out)}}


def lm_head_kernel(config, params):
    """The output projection as [D, V] (the embedding's transpose when tied); a `quant.QInt8` if quantized."""
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
    return quant.einsum("...d,dv->...v", hidden, lm_head_kernel(config, params), preferred_element_type=jnp.float32)


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
# Key/value cache for generation: the same modules, attending over cache slots; the attention mask comes from the
# cache's own record of which slots hold real tokens and at which positions.


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
                             dtype=None, embeddings=None):
    """Run T new tokens [B, T] through the decoder on top of a cache (see `init_cache`).

    The tokens go into slots [index, index + T) of every row, with `positions` [B, T] and `valid` [B, T] (False
    for padding; default all True); each attends to the real tokens of its row at the same or earlier positions
    (within the layer's sliding window). `index` is a Python int (prefill: slots past index + T are not read) or
    a traced int32 scalar (decoding: the whole cache is read, nothing recompiles per step).
    `embeddings` [B, T, D] replace the tokens' embeddings (virtual tokens, used unscaled; `tokens` is then unused).
    Returns (final-norm hidden states [B, T, D] in the compute dtype, the updated cache).
    """
    if config.scan_layers:  # the cache path runs the layers one by one
        config, params = config.replace(scan_layers=False), unstack_layers(config, params)
    model = CausalLM(config, _dtype(params, dtype))
    tokens = None if tokens is None else jnp.asarray(tokens)
    return model.apply({"params": params, "adapters": adapters or {}}, tokens, positions, cache=cache, index=index,
                       valid=valid, embeddings=embeddings)


def fill_cache(config, params, adapters, cache, dtype):
    """The cache (`init_cache`, at least N slots) with the tree's prompt or prefix (prompts.py) in slots [0, N) of
    every row and layer, valid, at positions 0..N-1. The prompt's tokens then go into the slots from N on, at
    positions from N on. Prompt tuning runs its N virtual tokens through the model (with the tree's other adapters)
    as a prefill of the cache; prefix tuning writes its keys and values."""
    what, value = root_site(config, adapters, dtype)
    B = cache["valid"].shape[0]
    if what is None:
        return cache
    if what == "prompt":
        emb = value
        n = emb.shape[0]
        positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, n))
        _, cache = hidden_states_with_cache(config, params, None, cache, 0, positions, None, adapters, dtype=dtype,
                                            embeddings=jnp.broadcast_to(emb, (B,) + emb.shape))
        return cache
    keys, values = value
    n = keys.shape[1]
    put = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, jnp.broadcast_to(x, (B,) + x.shape).astype(c.dtype),
                                                           0, axis=1)
    new_layers = {str(i): {"k": put(c["k"], keys[i].astype(dtype)), "v": put(c["v"], values[i].astype(dtype))}
                  for i, c in ((i, cache["layers"][str(i)]) for i in range(config.num_hidden_layers))}
    return {"layers": new_layers, "positions": put(cache["positions"], jnp.arange(n, dtype=jnp.int32)),
            "valid": put(cache["valid"], jnp.ones(n, bool))}
