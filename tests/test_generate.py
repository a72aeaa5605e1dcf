"""Generation with a KV cache: the cached decoder against the plain forward, greedy tokens against transformers'
`generate` (every tiny family with left padding, and the embedded SmolLM2-135M-Instruct), LoRA unmerged and
merged, sampling filters and seeds, EOS / stop strings / context limits, compilation counts, bad arguments."""
from __future__ import annotations

import contextlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import fa_jax
from fa_jax import generate as gen
from fa_jax import lora
from fa_jax.errors import FaJaxError
from fa_jax.models import transformer
from fa_jax.tree import flatten
from helpers import FAMILIES, TINY, save_tiny_tokenizer
from jit_counts import jit_counts

PROMPT_LENGTHS = (5, 11, 8)  # left padding of 6, 0 and 3 tokens in transformers' batch


def _prompts(lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, 256, n).tolist() for n in lengths]  # ids 0-2 are pad / bos / eos


def _cut(tokens, eos):
    """Tokens up to (without) the first EOS id."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return list(tokens)


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread inside: with the cores busy elsewhere, its thread pool makes small steps 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def hf_generate(model, prompts, max_new_tokens, eos=None, pad_id=0):
    """transformers' greedy `generate` on the left-padded batch: new tokens per prompt, cut before the first EOS."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    kw = {} if eos is None else {"eos_token_id": list(eos)}
    with one_torch_thread(), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id, **kw)
    if eos is None:
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return [_cut(row, set(eos)) for row in out[:, L:].tolist()]


# ---------------------------------------------------------------------------------------------------------------
# The cached decoder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decoding_matches_forward(family, hf_dirs):
    """Prefill of left-padded prompts, then one token at a time: the logits of every real position equal those of
    `forward` over the whole padded sequences (sliding windows and Gemma's scaling included)."""
    config, params = fa_jax.load_model(hf_dirs[family][0])
    prompts, P, extra = _prompts(), 12, 4
    B = len(prompts)
    rng = np.random.RandomState(1)
    full = np.zeros((B, P + extra), np.int32)
    mask = np.zeros((B, P + extra), np.int32)
    for b, p in enumerate(prompts):
        full[b, P - len(p):P] = p
        mask[b, P - len(p):] = 1
    full[:, P:] = rng.randint(3, 256, (B, extra))
    want = np.asarray(fa_jax.forward(config, params, full, mask=mask))
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    cache = transformer.init_cache(config, B, P + extra + 3)  # a few slots that are never written
    h, cache = transformer.hidden_states_with_cache(config, params, full[:, :P], cache, 0, positions[:, :P],
                                                    mask[:, :P].astype(bool))
    got = [np.asarray(transformer.lm_logits(config, params, h))]
    step = jax.jit(lambda c, tok, i, pos: transformer.hidden_states_with_cache(config, params, tok, c, i, pos))
    for t in range(P, P + extra):
        h, cache = step(cache, full[:, t:t + 1], jnp.int32(t), positions[:, t:t + 1])
        got.append(np.asarray(transformer.lm_logits(config, params, h)))
    got = np.concatenate(got, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Greedy parity with transformers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers(family, hf_dirs):
    """Three prompts of different lengths, left-padded, 16 new tokens: the config's EOS, then an EOS id the
    greedy output of row 0 contains (so that row really stops early, as transformers' does)."""
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    prompts = _prompts()
    got = gen.generate_tokens(config, params, prompts, max_new_tokens=16)
    assert got == hf_generate(model, prompts, 16)
    assert len(got[1]) + len(prompts[1]) > 5  # beyond Mistral's sliding window of 5
    eos = got[0][4]
    cut = gen.generate_tokens(config, params, prompts, max_new_tokens=16, eos_token_ids=[eos, 255])
    assert cut == hf_generate(model, prompts, 16, eos=[eos, 255])
    assert cut == [_cut(row, {eos, 255}) for row in got] and len(cut[0]) <= 4


def test_per_layer_sliding_window_matches_transformers(tmp_path):
    """Qwen2 with one full and one sliding-window layer (window 4), longer than the window."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4,
                                   layer_types=["full_attention", "sliding_attention"])
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(str(tmp_path))
    config, params = fa_jax.load_model(str(tmp_path))
    assert config.sliding_windows == (0, 4)
    prompts = _prompts((3, 9), seed=2)
    assert gen.generate_tokens(config, params, prompts, max_new_tokens=12) == hf_generate(model, prompts, 12)


# ---------------------------------------------------------------------------------------------------------------
# Compilation


def test_decoding_compiles_once(hf_dirs):
    """One trace of prefill and of the decode loop per bucket: not per token, nor per change of prompts within
    the bucket, max_new_tokens, sampling settings, EOS ids or seed."""
    config, params = fa_jax.load_model(hf_dirs["llama3"][0])
    config = config.replace(rope_theta=12345.0)  # a model no other test compiled for
    jitted = ("_prefill", "_decode")
    with jit_counts() as n:
        first = gen.generate_tokens(config, params, _prompts(), max_new_tokens=20, eos_token_ids=[])
    assert [len(t) for t in first] == [20, 20, 20]
    assert [(n.traces[f], n.compiles[f]) for f in jitted] == [(1, 1), (1, 1)], n
    with jit_counts() as n:
        gen.generate_tokens(config, params, _prompts((30, 2, 7, 1), seed=3), max_new_tokens=9, temperature=0.7,
                            top_k=5, top_p=0.9, eos_token_ids=[7, 8, 9], seed=4)
        gen.generate_tokens(config.replace(eos_token_id=(5, 6)), params, _prompts((64, 1, 1)), max_new_tokens=64)
    assert [(n.traces[f], n.compiles[f]) for f in jitted] == [(0, 0), (0, 0)], n
    with jit_counts() as n:
        gen.generate_tokens(config, params, _prompts((65, 1, 1)), max_new_tokens=3)  # next prompt bucket: once more
    assert (n.traces["_prefill"], n.compiles["_prefill"]) == (1, 1), n


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_unmerged_equals_merged(hf_dirs):
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    ad = lora.init_lora(config, jax.random.PRNGKey(0), rank=4, alpha=8)
    rng = np.random.RandomState(1)
    ad = jax.tree_util.tree_map_with_path(  # non-zero B: the adapters change the model
        lambda p, x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32) if p[-1].key == "lora_B" else x, ad)
    prompts = _prompts()
    base = gen.generate_tokens(config, params, prompts, max_new_tokens=12, eos_token_ids=[])
    unmerged = gen.generate_tokens(config, params, prompts, adapters=ad, max_new_tokens=12, eos_token_ids=[])
    merged = gen.generate_tokens(config, lora.merge_into(params, ad), prompts, max_new_tokens=12, eos_token_ids=[])
    assert unmerged == merged
    assert unmerged != base
    # each token is the argmax of the unmerged forward pass over the prompt and the tokens before it
    seqs = [p + new[:-1] for p, new in zip(prompts, unmerged)]
    T = max(map(len, seqs))
    tokens = np.array([s + [0] * (T - len(s)) for s in seqs])
    mask = np.array([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    logits = np.asarray(jax.jit(lambda p, a, t, m: fa_jax.forward(config, p, t, a, mask=m))(params, ad, tokens, mask))
    for b, (p, new) in enumerate(zip(prompts, unmerged)):
        assert logits[b, len(p) - 1:len(seqs[b])].argmax(-1).tolist() == new


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def test_sample_filters():
    """top-k and top-p keep exactly the tokens they should; temperature 0 is argmax."""
    probs = np.array([0.05, 0.5, 0.15, 0.3, 0.0])
    logits = jnp.asarray(np.log(np.maximum(probs, 1e-30)), jnp.float32)[None].repeat(4000, 0)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draw = jax.jit(gen.sample)

    def freq(temperature=1.0, top_k=0, top_p=1.0):
        t = np.asarray(draw(logits, keys, 3, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)))
        return np.bincount(t, minlength=5) / len(t)

    assert (freq(temperature=0.0) == [0, 1, 0, 0, 0]).all()
    np.testing.assert_allclose(freq(), probs, atol=0.025)
    np.testing.assert_allclose(freq(top_k=2), [0, 0.5 / 0.8, 0, 0.3 / 0.8, 0], atol=0.025)
    np.testing.assert_allclose(freq(top_p=0.8), [0, 0.5 / 0.8, 0, 0.3 / 0.8, 0], atol=0.025)  # 0.5 + 0.3 reach it
    np.testing.assert_allclose(freq(top_p=0.81), [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95, 0], atol=0.025)
    np.testing.assert_allclose(freq(top_k=3, top_p=0.5), [0, 1, 0, 0, 0])  # the most likely token always stays
    np.testing.assert_allclose(freq(top_k=1), [0, 1, 0, 0, 0])
    hot = freq(temperature=4.0)  # flatter than the distribution itself
    assert hot[1] < 0.4 and hot[0] > 0.1


def test_sampling_is_seeded_and_per_prompt(hf_dirs):
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    prompts = _prompts()
    kw = dict(max_new_tokens=12, temperature=1.5, eos_token_ids=[])
    a = gen.generate_tokens(config, params, prompts, seed=1, **kw)
    assert a == gen.generate_tokens(config, params, prompts, seed=1, **kw)
    assert a != gen.generate_tokens(config, params, prompts, seed=2, **kw)
    # prompt i draws from the same stream whatever else is in the batch
    assert gen.generate_tokens(config, params, prompts[:1], seed=1, **kw) == a[:1]
    # top_k=1 and a tiny top_p leave only the most likely token: greedy
    greedy = gen.generate_tokens(config, params, prompts, max_new_tokens=12, eos_token_ids=[])
    assert gen.generate_tokens(config, params, prompts, top_k=1, **kw) == greedy
    assert gen.generate_tokens(config, params, prompts, top_p=1e-6, **kw) == greedy


# ---------------------------------------------------------------------------------------------------------------
# Stopping


def test_eos_from_config_tuple_and_context_limit(hf_dirs):
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    prompts = _prompts()
    full = gen.generate_tokens(config, params, prompts, max_new_tokens=16, eos_token_ids=[])
    a, b = full[0][6], full[2][3]
    two = config.replace(eos_token_id=(a, b))  # as in Llama-3.1-Instruct's config
    assert gen.generate_tokens(two, params, prompts, max_new_tokens=16) == [_cut(t, {a, b}) for t in full]
    # a row stops when it fills the model's context (max_position_embeddings = 128)
    long = _prompts((125, 4), seed=5)
    out = gen.generate_tokens(config, params, long, max_new_tokens=10, eos_token_ids=[])
    assert [len(t) for t in out] == [3, 10]
    assert out[1] == gen.generate_tokens(config, params, long[1:], max_new_tokens=10, eos_token_ids=[])[0]


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory, hf_dirs):
    """The tiny llama3 checkpoint with a word-level tokenizer and a chat template, in one directory."""
    import shutil

    d = tmp_path_factory.mktemp("tiny_text")
    shutil.copytree(hf_dirs["llama3"][0], d, dirs_exist_ok=True)
    tok = save_tiny_tokenizer(d)
    tok.chat_template = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<s> {% endif %}")
    tok.save_pretrained(str(d))
    return str(d)


def test_generate_text_and_stop_strings(tiny_text, monkeypatch):
    config, params = fa_jax.load_model(tiny_text)
    tok = fa_jax.load_tokenizer(tiny_text)
    prompts = ["the hacker wrote a program", "data", "time and the system"]
    texts = gen.generate_text(config, params, tok, prompts, max_new_tokens=40)
    ids = [tok(p)["input_ids"] for p in prompts]
    want = gen.generate_tokens(config, params, ids, max_new_tokens=40, eos_token_ids=[2])
    assert texts == [tok.decode(t, skip_special_tokens=True) for t in want]
    assert gen.generate_text(config, params, tok, prompts, max_new_tokens=40, batch_size=1) == texts

    words = texts[0].split()
    stop = " " + words[3] + " "  # cut before the first occurrence of this word in row 0
    runs = []
    real = gen._generate

    def spy(*args, **kw):
        tokens, steps = real(*args, **kw)
        runs.append(steps)
        return tokens, steps

    monkeypatch.setattr(gen, "_generate", spy)
    monkeypatch.setattr(gen, "STOP_CHECK_EVERY", 2)
    stopped = gen.generate_text(config, params, tok, prompts[:1], max_new_tokens=40, stop=[stop, "never there"])
    assert stopped == [texts[0][:texts[0].index(stop)]]
    assert runs[-1] < 12  # decoding ended a chunk after the stop string showed up, not after 40 tokens
    # the stop string ends only its own row: the others run on
    both = gen.generate_text(config, params, tok, prompts, max_new_tokens=40, stop=stop)
    assert both == [t[:t.index(stop)] if stop in t else t for t in texts]

    chat = gen.generate_text(config, params, tok, ["the system"], chat=True, max_new_tokens=8)
    chat_ids = tok("<s> the system </s> <s>", add_special_tokens=False)["input_ids"]
    assert chat == [tok.decode(gen.generate_tokens(config, params, [chat_ids], max_new_tokens=8,
                                                   eos_token_ids=[2])[0], skip_special_tokens=True)]


def test_chat_without_template_is_a_clear_error(hf_dirs, tmp_path):
    config, params = fa_jax.load_model(hf_dirs["llama3"][0])
    tok = save_tiny_tokenizer(tmp_path)
    with pytest.raises(FaJaxError, match="^chat=True: the tokenizer cannot format a chat"):
        gen.generate_text(config, params, tok, ["hello"], chat=True)


def test_bfloat16_runs(hf_dirs):
    config, params = fa_jax.load_model(hf_dirs["gemma"][0])
    out = gen.generate_tokens(config, params, _prompts(), max_new_tokens=6, eos_token_ids=[], dtype="bfloat16")
    assert [len(t) for t in out] == [6, 6, 6]
    f32 = gen.generate_tokens(config, params, _prompts(), max_new_tokens=6, eos_token_ids=[])
    assert sum(x == y for a, b in zip(out, f32) for x, y in zip(a, b)) >= 9  # mostly the same tokens


# ---------------------------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("kw,message", [
    (dict(top_p=0.0), "top_p=0.0: expected a number in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5: expected a number in (0, 1]"),
    (dict(top_k=-1), "top_k=-1: expected an integer >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens=0: expected an integer >= 1"),
    (dict(temperature=-0.5), "temperature=-0.5: expected a finite number >= 0"),
    (dict(prompt_ids=[[5] * 128]), "prompt_ids[0] has 128 tokens: longer than the cache can hold with a new token "
                                   "(the model's context is max_position_embeddings=128)"),
    (dict(prompt_ids=[[5], []]), "prompt_ids[1] is empty"),
    (dict(prompt_ids=[[5, 256]]), "prompt_ids[0] holds 256: token ids must be integers in [0, 256)"),
    (dict(prompt_ids=[5, 6]), "prompt_ids[0]=5: expected a list of token ids"),
    (dict(pad_id=-1), "pad_id=-1: expected a token id in [0, 256)"),
])
def test_bad_arguments_are_clear_errors(kw, message, hf_dirs):
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    kw = {"prompt_ids": [[5, 6]], **kw}
    with pytest.raises(FaJaxError, match="^" + re.escape(message)) as e:
        gen.generate_tokens(config, params, kw.pop("prompt_ids"), **kw)
    assert "\n" not in str(e.value)


def test_bad_text_arguments_are_clear_errors(tiny_text):
    config, params = fa_jax.load_model(tiny_text)
    tok = fa_jax.load_tokenizer(tiny_text)
    for kw, message in [(dict(stop=[""]), "stop=['']: expected a non-empty string"),
                        (dict(batch_size=0), "batch_size=0: expected an integer >= 1"),
                        (dict(prompts="the"), "prompts: expected a list of strings"),
                        (dict(prompts=["data", "the " * 200]), "prompts[1] has 20")]:  # 200 words (+ BOS)
        kw = {"prompts": ["the"], **kw}
        with pytest.raises(FaJaxError, match="^" + re.escape(message)):
            gen.generate_text(config, params, tok, kw.pop("prompts"), **kw)


# ---------------------------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M-Instruct against transformers


@pytest.fixture(scope="module")
def smollm2(embedded_smollm2):
    return embedded_smollm2  # (path, config, params, tokenizer), loaded once per session (conftest)


def _torch_model(config, params):
    """transformers' model class holding fa_jax's weights. test_gguf checks that these are bit for bit the weights
    transformers' own GGUF loader produces (which takes 15 s here; the slow test below uses it)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is overwritten below
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config.to_hf_dict()))
    state = {}
    for path, value in flatten(params).items():
        w = torch.from_numpy(np.array(value))
        state[path.rsplit(".", 1)[0] + ".weight"] = w.T if path.endswith(".kernel") else w
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    return model.eval()


def _check_smollm2(config, params, tok, model):
    """Two chat prompts of different lengths, 12 new tokens, float32: same tokens and text as transformers."""
    questions = ["What is the capital of France?", "Write a haiku about the sea."]
    texts = gen.generate_text(config, params, tok, questions, chat=True, max_new_tokens=12)
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for q in questions]
    assert len(set(map(len, ids))) == 2  # the batch really is padded
    want = hf_generate(model, ids, 12, pad_id=tok.pad_token_id)
    assert gen.generate_tokens(config, params, ids, max_new_tokens=12) == want
    assert texts == [tok.decode(t, skip_special_tokens=True) for t in want]
    assert texts[0] == "The capital of France is Paris."  # stopped at <|im_end|>


def test_smollm2_greedy_matches_transformers(smollm2):
    _, config, params, tok = smollm2
    _check_smollm2(config, params, tok, _torch_model(config, params))


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_gguf_loader(smollm2):
    path, config, params, tok = smollm2
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              dtype=torch.float32).eval()
    _check_smollm2(config, params, tok, model)


# ---------------------------------------------------------------------------------------------------------------
# README


def test_readme_generation_example(tiny_text):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = re.search(r"## Generation\n.*?```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace("path/to/hf_dir", tiny_text)
    exec(compile(code, "README.md", "exec"), {})


def test_design_call_form(hf_dirs):
    """`fa_jax.generate(config, params, prompts, ...)` (the design's surface) is generate_tokens; the module's
    functions stay reachable."""
    import fa_jax.generate as gen_module

    config, params = fa_jax.load_model(hf_dirs["llama3"][0])
    prompts = [[1, 41, 29, 90], [1, 28]]
    want = gen_module.generate_tokens(config, params, prompts, max_new_tokens=5, eos_token_ids=[])
    assert fa_jax.generate(config, params, prompts, max_new_tokens=5, eos_id=[]) == want
    assert fa_jax.generate(config, params, prompts, 5, top_k=None, top_p=None, eos_id=[]) == want
    assert gen_module is fa_jax.generate
