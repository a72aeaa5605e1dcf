"""fa_jax models inside EleutherAI's lm-evaluation-harness: an `lm_eval` LM registered as "fa_jax".

    import lm_eval
    from fa_jax.lm_eval_bridge import FaJaxLM
    lm = FaJaxLM("embedded:smollm2-135m-instruct", peft="runs/pretrain/adapter_peft", batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

    # or lm-eval's own command line, with the model registered first:
    python -m fa_jax.lm_eval_bridge --model fa_jax --model_args pretrained=PATH,peft=DIR --batch_size 8 \
        --tasks arc_easy

Needs `pip install -e .[eval]` (lm-eval). The argument names follow lm-eval's "hf" model (`pretrained`, `peft`,
`max_length`, `add_bos_token`), so model_args strings carry over; on the command line the batch size is lm-eval's
own --batch_size option (it is passed to the model separately, so not inside --model_args).

What each request type computes:
- `loglikelihood` (multiple choice, cloze): lm-eval's own `TemplateLM` turns (context, continuation) into tokens
  (trailing spaces of the context move to the continuation; the continuation is what encoding the concatenation
  adds after the context's tokens; an empty context is replaced by the prefix token, BOS or else EOS). The bridge
  scores sum log p(continuation | context) and whether every continuation token is the argmax (is_greedy), left-
  truncating the context so that at most `max_length` tokens are fed. Requests are sorted by length and run in
  right-padded batches of `batch_size` rows whose length is rounded up to a power of two (at least 16, at most
  `max_length`), so a whole evaluation compiles a handful of shapes.
- `loglikelihood_rolling` (perplexity tasks): the text's tokens (no special tokens added) in lm-eval's disjoint
  rolling windows of `max_length` (`lm_eval.utils.get_rolling_token_windows`, context length 1), the first
  conditioned on the prefix token; returns the total log-probability per text. (lm-eval's "hf" model tokenizes the
  text with the tokenizer's default special tokens, so for a tokenizer that adds BOS it also scores that BOS
  after the prefix BOS; fa_jax scores only the text.)
- `generate_until`: `fa_jax.generate.generate_text` (greedy unless the task sets do_sample), stopping at the
  task's `until` strings and EOS, at most `max_gen_toks` new tokens; contexts longer than
  `max_length - max_gen_toks` tokens keep their last tokens (decoded back to text).

`max_length` defaults to the config's max_position_embeddings, as lm-eval's "hf" model does. Everything runs on
JAX's default device; lm-eval's `device` argument is accepted and ignored.
"""
from __future__ import annotations

import json
import sys
import warnings

import jax
import numpy as np
from tqdm import tqdm

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fa_jax.lm_eval_bridge needs lm-evaluation-harness: pip install -e .[eval] "
                      f"(or pip install lm-eval) ({e})") from e

from fa_jax.embedded import resolve_model_path
from fa_jax.errors import FaJaxError
from fa_jax.evaluate import target_logprobs
from fa_jax.generate import generate_text
from fa_jax.io.load import load_model, load_tokenizer
from fa_jax.io.peft import load_peft

_MIN_BUCKET = 16
_GEN_KEYS = ("until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p")


def _positive_int(value, name: str) -> int:
    """value (an int, or a string of one, as lm-eval's command line passes them) as an int >= 1."""
    try:
        n = int(value) if not isinstance(value, bool) and str(value).strip().lstrip("+").isdigit() else None
    except (TypeError, ValueError):
        n = None
    if n is None or n < 1:
        raise FaJaxError(f"{name}={value!r}: expected an integer >= 1"
                         + (" (fa_jax has no automatic batch size)" if str(value).startswith("auto") else ""))
    return n


class FaJaxLM(TemplateLM):
    """An lm-eval language model backed by fa_jax (`fa_jax.forward` with optional LoRA adapters).

    Either a model to load:
      pretrained: a Hugging Face directory, a .gguf file or embedded:NAME (`fa_jax.embedded.resolve_model_path`);
      peft: optional PEFT LoRA directory (`fa_jax.load_peft`), e.g. a pre-training run's adapter_peft/;
      dtype: storage dtype of the loaded weights ("float32" default, "bfloat16");
    or objects already loaded: config, params, tokenizer (a transformers tokenizer) and optionally adapters.

    batch_size: rows per forward pass (loglikelihood) and prompts per generate batch. max_length: the longest
    token sequence fed to the model (default: config.max_position_embeddings). max_gen_toks: default limit of new
    tokens for generate_until (a task's generation_kwargs may override it). compute_dtype: e.g. "bfloat16" for
    the matmuls (logits stay float32). add_bos_token: None (the tokenizer's default), True or False for encoding
    contexts. chunk_size: time steps per LM-head chunk. generate_fn: a replacement for
    `fa_jax.generate.generate_text` with its signature (tests). max_batch_size and device come from lm-eval's
    simple_evaluate and are ignored.
    """

    def __init__(self, pretrained: str | None = None, peft: str | None = None, *, config=None, params=None,
                 tokenizer=None, adapters=None, batch_size=8, max_length=None, max_gen_toks=256,
                 dtype: str = "float32", compute_dtype=None, add_bos_token: bool | None = None,
                 chunk_size=128, generate_fn=None, max_batch_size=None, device=None):
        super().__init__()
        if pretrained is not None:
            if config is not None or params is not None:
                raise FaJaxError("FaJaxLM: give either pretrained=PATH or config= and params=, not both")
            path = resolve_model_path(str(pretrained))
            config, params = load_model(path, dtype=dtype)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
        elif config is None or params is None or tokenizer is None:
            raise FaJaxError("FaJaxLM: expected pretrained=PATH (HF directory, .gguf or embedded:NAME), or config=, "
                             "params= and tokenizer=")
        if peft is not None:
            if adapters is not None:
                raise FaJaxError("FaJaxLM: give either peft=DIR or adapters=, not both")
            adapters = load_peft(config, str(peft))
        self.config, self.params, self.adapters, self.tokenizer = config, params, adapters, tokenizer
        self._batch_size = _positive_int(batch_size, "batch_size")
        self._max_length = _positive_int(max_length if max_length is not None else config.max_position_embeddings,
                                         "max_length")
        self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self._chunk_size = _positive_int(chunk_size, "chunk_size")
        if add_bos_token not in (None, True, False):
            raise FaJaxError(f"add_bos_token={add_bos_token!r}: expected None, true or false")
        self.add_bos_token = add_bos_token
        if tokenizer.eos_token_id is None and tokenizer.bos_token_id is None:
            raise FaJaxError("FaJaxLM: the tokenizer has neither an EOS nor a BOS token; lm-eval needs one to "
                             "condition on when a context is empty")
        self.compute_dtype = compute_dtype
        self._generate_fn = generate_fn

        def score(params, adapters, tokens, targets, mask):
            return target_logprobs(config, params, tokens, targets, mask, adapters, dtype=compute_dtype,
                                   chunk_size=self._chunk_size)

        self._score = jax.jit(score)

    # -- what lm-eval asks of a model ---------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.tokenizer.bos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context or a rolling window starts from: BOS if the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> str:
        return str(jax.devices()[0])

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "fa_jax")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`. add_special_tokens None: `add_bos_token` if set, else the tokenizer's default,
        except that a string that already starts with the BOS text (a rendered chat template) gets no second one."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = getattr(self.tokenizer, "bos_token", None)
            if bos and string.startswith(bos):
                add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": bool(add_special_tokens)}
        return list(self.tokenizer(string, **kw)["input_ids"])

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)
        except ValueError as e:  # transformers: no chat template
            raise FaJaxError(f"apply_chat_template: the tokenizer cannot format a chat "
                             f"({str(e).splitlines()[0]})") from None

    # -- scoring ------------------------------------------------------------------------------------------------
    def _bucket(self, n: int) -> int:
        t = _MIN_BUCKET
        while t < n:
            t *= 2
        return min(t, self.max_length)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), is_greedy) per request ((key, context ids, continuation ids))."""
        results: list = [None] * len(requests)
        todo = []
        for i, (key, context, continuation) in enumerate(requests):
            context, continuation = list(context), list(continuation)
            if not continuation:
                results[i] = (0.0, True)
                continue
            if len(continuation) > self.max_length:
                raise FaJaxError(f"a continuation of {len(continuation)} tokens is longer than max_length="
                                 f"{self.max_length}; expected at most max_length tokens to score")
            if not context:
                raise FaJaxError("a request with an empty context token list; expected at least one token "
                                 "(lm-eval gives the prefix token)")
            seq = (context + continuation)[-(self.max_length + 1):]
            todo.append((i, key, seq[:-1], seq[1:], len(continuation)))
        todo.sort(key=lambda item: -len(item[2]))  # similar lengths share a batch; longest first
        B = self.batch_size
        for start in tqdm(range(0, len(todo), B), desc="fa_jax loglikelihood", disable=disable_tqdm or not todo):
            batch = todo[start:start + B]
            T = self._bucket(max(len(item[2]) for item in batch))
            tokens, targets, mask = (np.zeros((B, T), np.int32) for _ in range(3))
            for row, (_, _, inp, tgt, _) in enumerate(batch):
                tokens[row, :len(inp)], targets[row, :len(tgt)], mask[row, :len(inp)] = inp, tgt, 1
            lp, greedy = jax.device_get(self._score(self.params, self.adapters, tokens, targets, mask))
            for row, (i, key, inp, _, n) in enumerate(batch):
                span = slice(len(inp) - n, len(inp))
                answer = (float(np.sum(lp[row, span], dtype=np.float64)), bool(np.all(greedy[row, span])))
                results[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-probability of each request's text, in disjoint windows of max_length (module docstring)."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            ids = self.tok_encode(text, add_special_tokens=False)
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generated continuation of each (context, gen_kwargs) request, cut before the first `until` string."""
        generate = self._generate_fn or generate_text
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        for indices in groups.values():
            kw = dict(requests[indices[0]].args[1] or {})
            unknown = sorted(set(kw) - set(_GEN_KEYS))
            if unknown:
                warnings.warn(f"fa_jax generate_until: ignoring generation_kwargs {unknown} (supported: "
                              f"{', '.join(_GEN_KEYS)})", stacklevel=2)
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else [u for u in until if u]
            eos_text = self.tokenizer.decode([self.eot_token_id])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = _positive_int(kw.get("max_gen_toks", kw.get("max_new_tokens", self.max_gen_toks)),
                                    "max_gen_toks")
            sample = bool(kw.get("do_sample", False))
            temperature = float(kw.get("temperature", 1.0) or 0.0) if sample else 0.0  # greedy unless sampling
            keep = max(1, self.max_length - max_new)
            contexts = []
            for i in indices:
                context = requests[i].args[0]
                ids = self.tok_encode(context)
                if len(ids) > keep:  # keep the end of an over-long context
                    context = self.tokenizer.decode(ids[-keep:], skip_special_tokens=False)
                contexts.append(context)
            texts = generate(self.config, self.params, self.tokenizer, contexts, adapters=self.adapters,
                             max_new_tokens=max_new, temperature=temperature, top_k=int(kw.get("top_k") or 0),
                             top_p=float(kw.get("top_p") or 1.0), stop=until or None, chat=False,
                             batch_size=self.batch_size, dtype=self.compute_dtype)
            for i, text in zip(indices, texts):
                for u in until:  # in case the generator returns text past a stop string
                    text = text.split(u, 1)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main(argv=None) -> int:
    """lm-eval's command line with the "fa_jax" model registered (`python -m fa_jax.lm_eval_bridge ...`)."""
    from lm_eval.__main__ import cli_evaluate  # lazy: lm-eval's command line, only for this entry point

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    # Run as a script this file is the module __main__; the importable module registers its own class once.
    from fa_jax.lm_eval_bridge import main as _main

    sys.exit(_main())
else:
    register_model("fa_jax")(FaJaxLM)
