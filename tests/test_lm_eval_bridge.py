"""fa_jax.lm_eval_bridge: lm-eval requests scored by fa_jax equal transformers' log-probabilities of the same tokens,
through direct requests and through lm_eval.simple_evaluate on a local multiple-choice task."""
import json

import jax
import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

import fa_jax  # noqa: E402
from fa_jax.errors import FaJaxError  # noqa: E402
from fa_jax.lm_eval_bridge import FaJaxLM  # noqa: E402
from helpers import hf_logits, save_hf_model, save_tiny_tokenizer  # noqa: E402

QUESTIONS = [
    {"question": "the hacker wrote a", "choices": ["program", "computer", "file of data"], "answer": 0},
    {"question": "a computer is a", "choices": ["system", "user", "name"], "answer": 0},
    {"question": "the user had a file with", "choices": ["a name", "the code", "data", "people"], "answer": 0},
    {"question": "it was the first time that the", "choices": ["program ran", "man", "world"], "answer": 1},
    {"question": "data", "choices": ["is", "was", "of the system"], "answer": 2},
]


pytestmark = pytest.mark.usefixtures("contained_datasets_cache")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_llama")
    hf = save_hf_model("llama", d, seed=3)
    save_tiny_tokenizer(d)
    return str(d), hf, fa_jax.load_tokenizer(str(d))


@pytest.fixture(scope="module")
def lm(tiny):
    return FaJaxLM(tiny[0], batch_size=3, chunk_size=8)


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def torch_continuation(hf, tok, context, continuation, max_length=128):
    """(sum log p, is_greedy) of the continuation's tokens, from the PyTorch model on the unpadded sequence.

    Token boundaries as lm-eval documents them: trailing spaces of the context belong to the continuation, the
    continuation's tokens are those the concatenation adds after the context's; an empty context is the BOS."""
    if context:
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        ctx = tok(stripped)["input_ids"]
        cont = tok(stripped + continuation)["input_ids"][len(ctx):]
    else:
        ctx, cont = [tok.bos_token_id], tok(continuation, add_special_tokens=False)["input_ids"]
    seq = (ctx + cont)[-(max_length + 1):]
    lp = torch.log_softmax(torch.tensor(hf_logits(hf, [seq[:-1]])[0], dtype=torch.float64), -1).numpy()
    rows = np.arange(len(seq) - 1 - len(cont), len(seq) - 1)
    return lp[rows, cont].sum(), bool((lp[rows].argmax(-1) == np.array(cont)).all())


def test_registered():
    from lm_eval.api.registry import get_model

    assert get_model("fa_jax") is FaJaxLM


def test_loglikelihood_matches_transformers(tiny, lm):
    _, hf, tok = tiny
    pairs = [("the hacker wrote a", " program"), ("a computer is a ", "system"),  # trailing space moves
             ("", "the user had a file"),                                        # empty context: BOS
             ("it was the first time that the program ran on this computer and the", " data of the system"),
             ("data", " is"), ("the", " the the the the")]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    assert len(got) == len(pairs)
    for (c, x), (logprob, greedy) in zip(pairs, got):
        ref, ref_greedy = torch_continuation(hf, tok, c, x)
        np.testing.assert_allclose(logprob, ref, rtol=1e-4, atol=1e-4)
        assert greedy == ref_greedy
    # a greedy continuation: the model's own argmax token after a context
    ids = tok("the hacker wrote a")["input_ids"]
    best = int(hf_logits(hf, [ids])[0, -1].argmax())
    assert lm.loglikelihood([_req("loglikelihood", "the hacker wrote a", " " + tok.decode([best]))],
                            disable_tqdm=True)[0][1] is True


def test_long_contexts_are_left_truncated(tiny):
    path, hf, tok = tiny
    short = FaJaxLM(path, batch_size=2, max_length=6)
    pairs = [("the hacker wrote a program for the system and the user had", " a file"), ("data", " is")]
    got = short.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    for (c, x), (logprob, greedy) in zip(pairs, got):
        ref, ref_greedy = torch_continuation(hf, tok, c, x, max_length=6)
        np.testing.assert_allclose(logprob, ref, rtol=1e-4, atol=1e-4)
        assert greedy == ref_greedy
    with pytest.raises(FaJaxError, match="longer than max_length=6"):
        short.loglikelihood([_req("loglikelihood", "the", " a b c d e f g h i j")], disable_tqdm=True)


def test_loglikelihood_rolling(tiny, lm):
    path, hf, tok = tiny
    text = "the hacker wrote a program for the system and the user had a file with a name that was not there " * 2
    ids = tok(text, add_special_tokens=False)["input_ids"]
    lp = torch.log_softmax(torch.tensor(hf_logits(hf, [[tok.bos_token_id] + ids])[0], dtype=torch.float64),
                           -1).numpy()
    full = lp[np.arange(len(ids)), ids].sum()  # every token given all before it, the first given BOS
    assert lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)], disable_tqdm=True)[0] == \
        pytest.approx(full, rel=1e-4)
    # windows of 16: each token scored once, in lm-eval's disjoint windows
    small = FaJaxLM(path, batch_size=2, max_length=16)
    ref = 0.0
    windows = list(map(make_disjoint_window, get_rolling_token_windows(ids, tok.bos_token_id, 16, 1)))
    assert sum(len(p) for _, p in windows) == len(ids) and len(windows) > 2
    for ctx, pred in windows:
        seq = ctx + pred
        lpw = torch.log_softmax(torch.tensor(hf_logits(hf, [seq[:-1]])[0], dtype=torch.float64), -1).numpy()
        ref += lpw[np.arange(len(ctx) - 1, len(seq) - 1), pred].sum()
    got = small.loglikelihood_rolling([_req("loglikelihood_rolling", text), _req("loglikelihood_rolling", "data")],
                                      disable_tqdm=True)
    assert got[0] == pytest.approx(ref, rel=1e-4)
    assert abs(got[0] - full) > 1e-3  # shorter contexts do change the number
    assert got[1] == pytest.approx(torch_continuation(hf, tok, "", "data")[0], rel=1e-4)


def test_simple_evaluate_multiple_choice(tiny, lm, tmp_path):
    _, hf, tok = tiny
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "fa_jax_tiny_mc.yaml").write_text(json.dumps({  # JSON is YAML
        "task": "fa_jax_tiny_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    out = lm_eval.simple_evaluate(model=lm, tasks=["fa_jax_tiny_mc"], log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                           include_defaults=False))
    samples = sorted(out["samples"]["fa_jax_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(QUESTIONS)
    correct = []
    for q, s in zip(QUESTIONS, samples):
        refs = [torch_continuation(hf, tok, q["question"], " " + c) for c in q["choices"]]
        got = [r[0] for r in s["resps"]]  # one (logprob, is_greedy) per choice
        assert len(got) == len(refs)
        for (lp, greedy), (ref, ref_greedy) in zip(got, refs):
            np.testing.assert_allclose(float(lp), ref, rtol=1e-4, atol=1e-4)
            assert bool(greedy) == ref_greedy
        correct.append(float(np.argmax([r[0] for r in refs]) == q["answer"]))
    assert out["results"]["fa_jax_tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))


def test_peft_adapter_and_loaded_objects(tiny, tmp_path):
    path, _, tok = tiny
    config, params = fa_jax.load_model(path)
    lora = fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4, alpha=8)
    lora = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 else x, lora)
    fa_jax.save_peft(config, lora, str(tmp_path / "adapter"))
    reqs = [_req("loglikelihood", "the hacker wrote a", " program"), _req("loglikelihood", "data", " is")]
    with_peft = FaJaxLM(path, peft=str(tmp_path / "adapter"), batch_size=2).loglikelihood(reqs, disable_tqdm=True)
    merged = FaJaxLM(config=config, params=fa_jax.merge_lora(params, lora), tokenizer=tok, batch_size=2)
    base = FaJaxLM(config=config, params=params, tokenizer=tok).loglikelihood(reqs, disable_tqdm=True)
    for a, b, c in zip(with_peft, merged.loglikelihood(reqs, disable_tqdm=True), base):
        assert a[0] == pytest.approx(b[0], rel=1e-5) and abs(a[0] - c[0]) > 1e-3
    # lm-eval's string form, as its command line builds the model
    made = FaJaxLM.create_from_arg_string(f"pretrained={path},batch_size=2,max_length=64",
                                          {"batch_size": None, "max_batch_size": None, "device": "cpu"})
    assert made.batch_size == 2 and made.max_length == 64


def test_bad_arguments(tiny):
    path, _, tok = tiny
    with pytest.raises(FaJaxError, match="expected pretrained=PATH"):
        FaJaxLM()
    with pytest.raises(FaJaxError, match="not both"):
        FaJaxLM(path, config=object(), params={})
    with pytest.raises(FaJaxError, match="batch_size='auto': expected an integer >= 1 \\(fa_jax has no automatic"):
        FaJaxLM(path, batch_size="auto")
    with pytest.raises(FaJaxError, match="max_length=0"):
        FaJaxLM(path, max_length=0)
    with pytest.raises(FaJaxError, match="no such file"):
        FaJaxLM(str(path) + "_missing")


def test_generate_until_with_injected_generator(tiny):
    path, _, tok = tiny
    calls = []

    def fake(config, params, tokenizer, prompts, *, adapters=None, max_new_tokens=32, temperature=0.0, top_k=0,
             top_p=1.0, stop=None, chat=False, batch_size=8, dtype=None, **kw):
        calls.append(dict(prompts=list(prompts), max_new_tokens=max_new_tokens, temperature=temperature,
                          stop=stop, chat=chat, batch_size=batch_size))
        return [p.split()[-1] + " answer\nmore text" for p in prompts]

    lm = FaJaxLM(path, batch_size=2, max_length=10, max_gen_toks=4, generate_fn=fake)
    reqs = [_req("generate_until", "the hacker wrote a", {"until": ["\n"], "max_gen_toks": 3}),
            _req("generate_until", "a computer is", {"until": "answer", "do_sample": True, "temperature": 0.5}),
            _req("generate_until", "the user had a", {"until": ["\n"], "max_gen_toks": 3}),
            _req("generate_until", "it was the first time that the program had been on this computer", {})]
    with pytest.warns(UserWarning, match="ignoring generation_kwargs \\['repetition_penalty'\\]"):
        extra = lm.generate_until([_req("generate_until", "data", {"repetition_penalty": 1.1})])
    out = lm.generate_until(reqs)
    assert out == ["a answer", "is ", "a answer", "computer answer\nmore text"]
    assert extra == ["data answer\nmore text"]
    calls = calls[1:]
    # grouped by generation_kwargs; the long context keeps its last max_length - max_gen_toks = 10 - 4 = 6 tokens
    assert [c["prompts"] for c in calls] == [["the hacker wrote a", "the user had a"], ["a computer is"],
                                             ["program had been on this computer"]]
    assert calls[0]["max_new_tokens"] == 3 and calls[0]["temperature"] == 0.0 and calls[0]["stop"] == ["\n", "</s>"]
    assert calls[1]["temperature"] == 0.5 and calls[1]["stop"] == ["answer", "</s>"]
    assert calls[2]["max_new_tokens"] == 4 and all(c["chat"] is False and c["batch_size"] == 2 for c in calls)


def test_generate_until_with_generate_text(tiny, lm):
    generate = pytest.importorskip("fa_jax.generate")
    config, params = fa_jax.load_model(tiny[0])
    tok = tiny[2]
    contexts = ["the hacker wrote a", "a computer is a system of"]
    plain = generate.generate_text(config, params, tok, contexts, max_new_tokens=6)
    got = lm.generate_until([_req("generate_until", c, {"until": ["\n\n"], "max_gen_toks": 6}) for c in contexts])
    assert got == plain
    words = plain[0].split()
    if len(words) > 1:  # stop at the second generated word
        cut = lm.generate_until([_req("generate_until", contexts[0], {"until": [words[1]], "max_gen_toks": 6})])
        assert cut[0] == plain[0].split(words[1], 1)[0]
