"""Placeholder demo: load the embedded SmolLM2-135M-Instruct GGUF with fa_jax, answer one chat question greedily,
and measure perplexity on a page of English prose.

    .venv/bin/python scripts/demo.py [--text FILE] [--new-tokens 24] [--ppl-tokens 1024]

Axis legend: B batch, T time, D model, V vocab.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import fa_jax
from fa_jax.embedded import resolve_model_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.join(ROOT, "data", "text", "jargon.txt")
QUESTION = "What is the capital of France? Answer in one sentence."


class Timer:
    """`with Timer("label"):` prints how long the block took."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        print(f"  [{self.seconds:6.2f} s] {self.label}", flush=True)


def greedy_generate(config, params, prompt: list[int], new_tokens: int, eos_ids):
    """Greedy decoding over a fixed-size buffer: one compiled forward, re-run on the whole buffer each step.

    No KV cache: attention is causal, so the logits at the current position ignore whatever sits after it in the
    buffer, and a fixed shape means a single compilation for every step.
    Returns (new tokens without eos, seconds per step; the first step includes compilation).
    """
    length = len(prompt) + new_tokens
    buf = np.zeros((1, length), np.int32)  # [B=1, T]; the tail is filler until generated
    buf[0, : len(prompt)] = prompt

    @jax.jit
    def step(params, buf, pos):
        """Fill buf[0, pos] with the argmax of the logits at pos - 1."""
        hidden = fa_jax.hidden_states(config, params, buf)  # [1, T, D]
        last = jax.lax.dynamic_index_in_dim(hidden[0], pos - 1, axis=0, keepdims=False)  # [D]
        token = jnp.argmax(fa_jax.lm_logits(config, params, last)).astype(buf.dtype)  # LM head on one row only
        return buf.at[0, pos].set(token), token

    buf = jnp.asarray(buf)
    out, seconds = [], []
    for pos in tqdm(range(len(prompt), length), desc="generating", unit="token", leave=False):
        start = time.perf_counter()
        buf, token = step(params, buf, jnp.int32(pos))
        token = int(token)  # waits for the step
        seconds.append(time.perf_counter() - start)
        if token in eos_ids:
            break
        out.append(token)
    return out, seconds


def prose_tokens(tokenizer, path: str, n_tokens: int) -> np.ndarray:
    """The first n_tokens of the text's prose paragraphs (40+ words: skips titles, contents and headings)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        paragraphs = re.split(r"\n\s*\n", f.read())
    prose = [" ".join(p.split()) for p in paragraphs if len(p.split()) >= 40]  # unwrap the hard line breaks
    ids = tokenizer("\n\n".join(prose), add_special_tokens=False)["input_ids"][:n_tokens]
    if len(ids) < n_tokens:
        sys.exit(f"demo: {path} holds only {len(ids)} tokens of prose paragraphs; {n_tokens} wanted")
    return np.asarray(ids, np.int32)[None]  # [B=1, T]


def mean_nll(config, params, tokens):
    """Mean next-token negative log-likelihood of tokens [B, T] (T - 1 predictions per row)."""
    logits = fa_jax.forward(config, params, tokens[:, :-1])  # [B, T-1, V] float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    return -jnp.mean(target)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=os.environ.get("TEXT") or DEFAULT_TEXT, help="English text for perplexity")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    args = ap.parse_args()
    if not os.path.exists(args.text):
        sys.exit(f"demo: no text at {args.text}; run scripts/fetch_text.sh or pass TEXT=/path/to/file.txt")

    gguf = resolve_model_path("embedded:smollm2-135m-instruct")
    print(f"fa_jax {fa_jax.__version__}, JAX {jax.__version__} on {jax.devices()[0].platform} "
          f"({len(jax.devices())} device(s))")
    print(f"model: {gguf}")
    with Timer("load model (dequantise GGUF, place on device)"):
        config, params = fa_jax.load_model(gguf)
    with Timer("load tokenizer"):
        tokenizer = fa_jax.load_tokenizer(gguf)
    print(f"  {config.num_params / 1e6:.1f}M parameters, {config.num_hidden_layers} layers, "
          f"vocab {config.vocab_size}")

    print(f"\nQ: {QUESTION}")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                         add_generation_prompt=True)
    prompt = tokenizer(chat, add_special_tokens=False)["input_ids"]  # the template already holds the specials
    with Timer(f"greedy generation (prompt {len(prompt)} tokens, up to {args.new_tokens} new)"):
        eos = config.eos_token_id  # an int, or a list/tuple of them in some configs
        eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        answer, seconds = greedy_generate(config, params, prompt, args.new_tokens, eos_ids)
    print(f"A: {tokenizer.decode(answer, skip_special_tokens=True).strip()}")
    rest = f", then {1e3 * np.mean(seconds[1:]):.0f} ms per step" if len(seconds) > 1 else ""
    print(f"  ({len(seconds)} steps incl. eos: the first, with compilation, {seconds[0]:.2f} s{rest})")

    print(f"\nperplexity on {args.text}")
    tokens = prose_tokens(tokenizer, args.text, args.ppl_tokens)
    nll_fn = jax.jit(lambda p, t: mean_nll(config, p, t))
    with Timer(f"compile the forward for [1, {tokens.shape[1] - 1}] tokens"):
        compiled = nll_fn.lower(params, tokens).compile()
    with Timer("forward + cross-entropy"):
        nll = float(compiled(params, tokens))
    print(f"  perplexity {np.exp(nll):.2f} over {tokens.shape[1] - 1} next-token predictions "
          f"(mean NLL {nll:.3f} nats)")


if __name__ == "__main__":
    main()
