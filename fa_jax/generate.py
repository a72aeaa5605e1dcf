"""Batched generation with a key/value cache: left-padded prompts, greedy or sampled decoding (temperature, top-k,
top-p), stopping on EOS ids, on stop strings or after `max_new_tokens`.

    tokens = generate_tokens(config, params, [[1, 42, 7], [1, 9]], max_new_tokens=16)
    tokens = fa_jax.generate(config, params, [[1, 42, 7]], max_new_tokens=16)   # the same (the module is callable)
    texts = generate_text(config, params, tokenizer, ["Hello"], chat=True, temperature=0.7, top_p=0.9)

How it runs: the prompts are left-padded to a common length P and the batch to a power of two, so every row's
last prompt token sits in slot P - 1 and every generated token of a step goes into the same slot P + step - 1.
One jitted call (prefill) runs the prompts through the decoder, fills the cache and returns the logits of the
first new token; a second jitted call (decode) runs a `jax.lax.while_loop` of steps (sample a token, run it
through the decoder) until every row is done or a step bound is reached. Shapes depend only on the buckets (P and the new-token budget rounded up to a multiple of
`BUCKET`, the batch to a power of two), and the sampling settings, EOS ids and step bounds are traced values, so
calls that fall in the same buckets reuse both compilations and no step ever recompiles. With stop strings the
decode call runs in chunks of `STOP_CHECK_EVERY` steps and the host checks the text between chunks.

Positions count from 0 at each row's first real token (as transformers' `generate` does with left padding); a
row stops at its first EOS, after `max_new_tokens`, or when it reaches the model's context
(`max_position_embeddings`). Sampling draws row i's token at step t from a key derived from (seed, i, t), so a
prompt's sample does not depend on the other prompts of the batch.

Axis legend: B batch, P prompt slots, N new-token slots, S cache slots (P + N), V vocab, E EOS ids.
"""
from __future__ import annotations

import functools
import math
import sys
import types
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import checks
from fa_jax import prompts as prompts_lib
from fa_jax.errors import FaJaxError
from fa_jax.models import transformer

BUCKET = 64  # prompt slots and new-token slots are rounded up to a multiple of this
STOP_CHECK_EVERY = 16  # decode steps between two host-side checks of the stop strings


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def sample(logits, keys, step, temperature, top_k, top_p):
    """Next tokens int32 [B] from float32 logits [B, V].

    temperature == 0 is greedy (argmax). Otherwise the logits are divided by the temperature, then only the
    top_k largest are kept (top_k == 0: all), then the smallest set of the most likely tokens whose probability
    reaches top_p (the most likely token always stays), and a token is drawn with the key of its row `keys` [B]
    folded with `step`. All four settings are traced values: changing them does not recompile.
    """
    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        V = logits.shape[-1]
        scaled = logits / jnp.maximum(temperature, 1e-6)
        ordered = -jnp.sort(-scaled, axis=-1)  # [B, V], largest first
        rank = jnp.arange(V)[None, :]
        ordered = jnp.where((top_k > 0) & (rank >= top_k), -jnp.inf, ordered)
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
        in_p = (before < top_p) | (top_p >= 1)  # top_p = 1 keeps everything, whatever the rounding of the sum
        kept = jnp.sum(in_p & (rank < jnp.where(top_k > 0, top_k, V)), axis=-1)  # >= 1
        threshold = jnp.take_along_axis(ordered, (jnp.maximum(kept, 1) - 1)[:, None], axis=-1)
        filtered = jnp.where(scaled < threshold, -jnp.inf, scaled)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        return jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sampled, greedy)


# ---------------------------------------------------------------------------------------------------------------
# The two jitted calls. `state` is a dict of arrays:
#   cache      the key/value cache (transformer.init_cache), S = P + N slots
#   logits     float32 [B, V]: the distribution of the next token
#   out        int32 [B, N]: token sampled at each step (meaningful up to n)
#   n          int32 [B]: tokens kept per row (EOS excluded)
#   last       int32 [B]: the token sampled last
#   done       bool [B]
#   step       int32 []: tokens sampled so far
#   lens       int32 [B]: prompt lengths (row b's token of step t sits at position lens[b] + t)
#   limit      int32 [B]: most tokens row b may produce (max_new_tokens, or less near the context's end)
#   eos        int32 [E]: EOS ids, padded with -1
#   keys       [B] PRNG keys of the rows
#   sampling   {"temperature", "top_k", "top_p"} scalars


def _advance(state, tok):
    """Record the tokens sampled at `state["step"]` and update which rows are done."""
    active = ~state["done"]
    is_eos = jnp.any(tok[:, None] == state["eos"][None, :], axis=-1)
    n = state["n"] + (active & ~is_eos).astype(jnp.int32)
    out = jax.lax.dynamic_update_slice_in_dim(state["out"], tok[:, None], state["step"], axis=1)
    done = state["done"] | (active & (is_eos | (n >= state["limit"])))
    return {**state, "out": out, "n": n, "last": tok, "done": done, "step": state["step"] + 1}


@functools.partial(jax.jit, static_argnames=("config", "dtype", "new_slots"))
def _prefill(config, dtype, new_slots, params, adapters, tokens, valid, state):
    """Prompts [B, P] (left-padded, `valid` False on padding) -> the state holding the cache and the logits of
    the first new token. A prompt / prefix tuning adapter's N virtual tokens take the first N slots (positions
    0..N-1): the prompts then go into slots N..N+P-1 and their positions, like `lens`, are shifted by N."""
    B, P = tokens.shape
    n = prompts_lib.num_virtual_tokens(adapters)
    cache = transformer.init_cache(config, B, n + P + new_slots, dtype)
    if n:
        cache = transformer.fill_cache(config, params, adapters, cache, dtype)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32) + n
    hidden, cache = transformer.hidden_states_with_cache(config, params, tokens, cache, n, positions, valid,
                                                         adapters, dtype=dtype)
    logits = transformer.lm_logits(config, params, hidden[:, -1])  # [B, V]: every row's last token is in P - 1
    return {**state, "cache": cache, "logits": logits, "out": jnp.zeros((B, new_slots), jnp.int32),
            "lens": state["lens"] + n}


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("state",))
def _decode(config, dtype, params, adapters, state, stop_at):
    """Steps until every row is done or `stop_at` tokens have been sampled (a traced bound). A step samples a
    token from the pending logits, then runs it through the model for the next logits (sampling lives only here:
    the prefill compiles without it)."""
    P = state["cache"]["valid"].shape[1] - state["out"].shape[1]

    def cond(st):
        return (st["step"] < stop_at) & ~jnp.all(st["done"])

    def body(st):
        st = _advance(st, sample(st["logits"], st["keys"], st["step"], **st["sampling"]))
        index = P + st["step"] - 1  # the token sampled at step t goes into slot P + t, at position lens + t
        positions = (st["lens"] + st["step"] - 1)[:, None]
        hidden, cache = transformer.hidden_states_with_cache(config, params, st["last"][:, None], st["cache"],
                                                             index, positions, None, adapters, dtype=dtype)
        return {**st, "cache": cache, "logits": transformer.lm_logits(config, params, hidden[:, 0])}

    return jax.lax.while_loop(cond, body, state)


# ---------------------------------------------------------------------------------------------------------------
# Checks and the host-side loop


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise FaJaxError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise FaJaxError(f"temperature={temperature!r}: expected a finite number >= 0 (0 means greedy)")
    if not _is_int(top_k) or top_k < 0:
        raise FaJaxError(f"top_k={top_k!r}: expected an integer >= 0 (0 keeps every token)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.number)) or not 0 < top_p <= 1:
        raise FaJaxError(f"top_p={top_p!r}: expected a number in (0, 1] (1 keeps every token)")


def _id_list(value, name: str) -> list[int]:
    """None -> [], an int -> [it], a list/tuple of ints -> the list."""
    if value is None:
        return []
    values = list(value) if isinstance(value, (list, tuple, set, frozenset, np.ndarray)) else [value]
    if not all(_is_int(v) for v in values):
        raise FaJaxError(f"{name}={value!r}: expected a token id or a list of token ids")
    return [int(v) for v in values]


def _check_prompts(config, prompt_ids, name: str = "prompt_ids") -> list[list[int]]:
    """The prompts as lists of ints, each non-empty, in the vocabulary, and leaving room for a new token."""
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, (Sequence, np.ndarray)):
        raise FaJaxError(f"{name}: expected a list of token id lists, got {type(prompt_ids).__name__}")
    context = config.max_position_embeddings
    out = []
    for i, ids in enumerate(prompt_ids):
        if _is_int(ids) or isinstance(ids, (str, bytes)):
            raise FaJaxError(f"{name}[{i}]={ids!r}: expected a list of token ids ({name} is a list of them)")
        ids = list(ids)
        if not ids:
            raise FaJaxError(f"{name}[{i}] is empty: a prompt needs at least one token")
        bad = [t for t in ids if not _is_int(t) or not 0 <= t < config.vocab_size]
        if bad:
            raise FaJaxError(f"{name}[{i}] holds {bad[0]!r}: token ids must be integers in "
                             f"[0, {config.vocab_size}) (vocab_size)")
        if len(ids) >= context:
            raise FaJaxError(f"{name}[{i}] has {len(ids)} tokens: longer than the cache can hold with a new "
                             f"token (the model's context is max_position_embeddings={context})")
        out.append([int(t) for t in ids])
    return out


def _compile_key(config):
    """The config as the jitted calls see it (a static argument): token ids and the context length matter only
    here on the host, and the cache path always computes attention with XLA (layers.attention_with_cache), so
    configs that differ in nothing else share their compilations."""
    return config.replace(bos_token_id=None, eos_token_id=None, pad_token_id=None, max_position_embeddings=0,
                          attention_impl="xla")


def _default_pad(config, eos: list[int]) -> int:
    pad = config.pad_token_id
    if _is_int(pad):
        return int(pad)
    return eos[0] if eos and 0 <= eos[0] < config.vocab_size else 0


def _generate(config, params, prompts: list[list[int]], *, adapters, max_new_tokens: int, temperature: float,
              top_k: int, top_p: float, eos: list[int], pad_id: int, seed: int, dtype, row_ids: Sequence[int],
              should_stop: Callable[[int, list[int]], bool] | None = None):
    """New tokens per prompt (EOS excluded) and the number of decode steps run.

    `should_stop(row, tokens)` (optional) is asked between decode chunks about every row not yet done; True ends
    that row's decoding (stop strings).
    """
    B = len(prompts)
    rows = 1 << (B - 1).bit_length()  # the batch rounded up to a power of two; extra rows start done
    P = _round_up(max(len(p) for p in prompts), BUCKET)
    N = _round_up(max_new_tokens, BUCKET)
    tokens = np.full((rows, P), pad_id, np.int32)
    valid = np.zeros((rows, P), bool)
    lens = np.zeros(rows, np.int32)
    for b, ids in enumerate(prompts):
        tokens[b, P - len(ids):] = ids
        valid[b, P - len(ids):] = True
        lens[b] = len(ids)
    limit = np.zeros(rows, np.int32)
    context = config.max_position_embeddings - prompts_lib.num_virtual_tokens(adapters)  # virtual tokens' positions
    limit[:B] = np.minimum(max_new_tokens, np.maximum(context - lens[:B], 1))
    eos_arr = np.full(max(8, 1 << max(len(eos) - 1, 0).bit_length()), -1, np.int32)
    eos_arr[:len(eos)] = eos
    ids = np.zeros(rows, np.uint32)
    ids[:B] = np.asarray(row_ids, np.uint32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(seed % (1 << 32)), jnp.asarray(ids))
    state = {"n": jnp.zeros(rows, jnp.int32), "last": jnp.zeros(rows, jnp.int32),
             "done": jnp.asarray(np.arange(rows) >= B), "step": jnp.int32(0), "lens": jnp.asarray(lens),
             "limit": jnp.asarray(limit), "eos": jnp.asarray(eos_arr), "keys": keys,
             "sampling": {"temperature": jnp.float32(temperature), "top_k": jnp.int32(top_k),
                          "top_p": jnp.float32(top_p)}}
    dtype = jnp.dtype(dtype or params["model"]["embed_tokens"]["embedding"].dtype)
    adapters = adapters or None
    key = _compile_key(config)
    state = _prefill(key, dtype, N, params, adapters, jnp.asarray(tokens), jnp.asarray(valid), state)
    chunk = STOP_CHECK_EVERY if should_stop is not None else max_new_tokens
    while True:
        if should_stop is not None:
            out, n, done = (np.asarray(state[k]) for k in ("out", "n", "done"))
            stopped = [b for b in range(B) if not done[b] and should_stop(b, out[b, :n[b]].tolist())]
            if stopped:
                state["done"] = state["done"].at[np.asarray(stopped)].set(True)
        step = int(state["step"])
        if step >= max_new_tokens or bool(np.all(np.asarray(state["done"]))):
            break
        state = _decode(key, dtype, params, adapters, state, jnp.int32(min(step + chunk, max_new_tokens)))
    out, n = np.asarray(state["out"]), np.asarray(state["n"])
    return [out[b, :n[b]].tolist() for b in range(B)], step


# ---------------------------------------------------------------------------------------------------------------
# Public API


def generate_tokens(config, params, prompt_ids: list[list[int]], *, adapters=None, max_new_tokens: int = 32,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_token_ids=None,
                    pad_id: int | None = None, seed: int = 0, dtype=None) -> list[list[int]]:
    """The new tokens of each prompt (token id lists of any lengths), cut before the first EOS.

    adapters: a LoRA tree applied unmerged (as in `forward`), or a prompt / prefix tuning tree (fa_jax/prompts.py:
    its virtual tokens fill the first cache slots). temperature 0 is greedy; otherwise top_k (0: off)
    and top_p (1: off) filter the distribution before sampling with `seed`. eos_token_ids: an id or a list of
    them; None takes config.eos_token_id (an id or a tuple of them), [] never stops early. pad_id only fills the
    padding (which no token attends to); None takes config.pad_token_id, else the first EOS id, else 0.
    dtype: compute dtype (e.g. "bfloat16"; default the parameters' dtype).
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    checks.check_adapters(config, adapters)
    prompts = _check_prompts(config, prompt_ids)
    if not prompts:
        return []
    eos = _id_list(config.eos_token_id if eos_token_ids is None else eos_token_ids, "eos_token_ids")
    if pad_id is None:
        pad_id = _default_pad(config, eos)
    elif not _is_int(pad_id) or not 0 <= pad_id < config.vocab_size:
        raise FaJaxError(f"pad_id={pad_id!r}: expected a token id in [0, {config.vocab_size})")
    if not _is_int(seed):
        raise FaJaxError(f"seed={seed!r}: expected an integer")
    tokens, _ = _generate(config, params, prompts, adapters=adapters, max_new_tokens=int(max_new_tokens),
                          temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), eos=eos,
                          pad_id=int(pad_id), seed=int(seed), dtype=dtype, row_ids=range(len(prompts)))
    return tokens


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def generate_text(config, params, tokenizer, prompts: list[str], *, adapters=None, max_new_tokens: int = 32,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop=None, seed: int = 0,
                  chat: bool = False, batch_size: int = 8, dtype=None, add_special_tokens: bool = True) -> list[str]:
    """The generated text of each prompt (special tokens skipped), in batches of `batch_size` prompts.

    chat=True formats each prompt as a user turn with `tokenizer.apply_chat_template(add_generation_prompt=True)`;
    otherwise the prompt is tokenized as the tokenizer does by default (BOS where it adds one), or, with
    add_special_tokens=False, as it is: for prompts a chat template already rendered (their BOS and turn markers
    are in the text, so none is added twice; `fa_jax.evaluate.evaluate_qa` does this). Decoding stops at
    the EOS ids of the config and the tokenizer; `stop` (a string or a list of them) cuts each text before the
    first occurrence of any of them and ends that row's decoding (the batch ends when every row is done or
    stopped). Prompts are batched in order of length; the texts come back in the order of `prompts`. Sampling
    settings as in `generate_tokens`; prompt i uses the same random stream whatever the batch.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    checks.check_adapters(config, adapters)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise FaJaxError("prompts: expected a list of strings")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise FaJaxError(f"stop={stop!r}: expected a non-empty string or a list of them")
    if not _is_int(batch_size) or batch_size < 1:
        raise FaJaxError(f"batch_size={batch_size!r}: expected an integer >= 1")
    if not _is_int(seed):
        raise FaJaxError(f"seed={seed!r}: expected an integer")
    ids = []
    for p in prompts:
        if chat:
            try:
                text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True)
            except ValueError as e:  # transformers: no chat template
                raise FaJaxError(f"chat=True: the tokenizer cannot format a chat ({str(e).splitlines()[0]})") from None
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template holds the specials
        else:
            ids.append(tokenizer(p, add_special_tokens=bool(add_special_tokens))["input_ids"])
    ids = _check_prompts(config, ids, "prompts")  # e.g. prompts[3] has 9000 tokens
    eos = _id_list(config.eos_token_id, "config.eos_token_id")
    if _is_int(tokenizer.eos_token_id) and tokenizer.eos_token_id not in eos:
        eos.append(int(tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id if _is_int(tokenizer.pad_token_id) else None
    pad = pad if pad is not None and 0 <= pad < config.vocab_size else _default_pad(config, eos)

    def decode(tokens):
        return tokenizer.decode(tokens, skip_special_tokens=True)

    def should_stop(row, tokens):
        return _cut_at_stop(decode(tokens), stops)[1]

    # batches of similar lengths (less padding, fewer prompt buckets); each prompt keeps its own random stream
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    texts: list = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        tokens, _ = _generate(config, params, [ids[i] for i in rows], adapters=adapters,
                              max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
                              top_p=float(top_p), eos=eos, pad_id=int(pad), seed=int(seed), dtype=dtype, row_ids=rows,
                              should_stop=should_stop if stops else None)
        for i, t in zip(rows, tokens):
            texts[i] = _cut_at_stop(decode(t), stops)[0]
    return texts


__all__ = ["generate_tokens", "generate_text", "sample"]


def generate(config, params, prompts, max_new_tokens: int = 32, adapters=None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id=None, seed: int = 0, **kw):
    """The design's call form, `fa_jax.generate(config, params, prompts, ...)`: `generate_tokens` with top_k /
    top_p None meaning off and `eos_id` (an id or a list) for `eos_token_ids`; other keywords pass through."""
    return generate_tokens(config, params, prompts, adapters=adapters, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_k=0 if top_k is None else top_k,
                           top_p=1.0 if top_p is None else top_p, eos_token_ids=eos_id, seed=seed, **kw)


class _CallableModule(types.ModuleType):
    """`fa_jax.generate` is this module and, called, the function `generate` above."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
