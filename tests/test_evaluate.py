"""fa_jax.evaluate: ROUGE-L / exact match on hand-scored examples, perplexity against transformers, teacher
agreement against a NumPy KL and losses.distill_loss, QA prompts, record files and evaluate_qa outputs."""
import json
import os

import datasets
import jax
import numpy as np
import pytest
import torch

import fa_jax
from fa_jax import evaluate, losses
from fa_jax.data import PackedBatches
from fa_jax.errors import FaJaxError
from helpers import hf_logits, save_hf_model, save_tiny_tokenizer

DOCS = ["the hacker wrote a program for the system", "a computer is a system of code and data",
        "the user had a file with a name", "it was the first time that the program ran on this computer",
        "data"]


pytestmark = pytest.mark.usefixtures("contained_datasets_cache")


# ------------------------------------------------------------------------------------------ metrics, scored by hand


def test_rouge_l_hand_scored():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" is "the cat on the mat": 5 of 6 tokens each side.
    s = evaluate.rouge_l("the cat sat on the mat", "the cat is on the mat", use_stemmer=False)
    assert s == pytest.approx({"f1": 5 / 6, "recall": 5 / 6, "precision": 5 / 6})
    # A long-form answer containing the reference: recall 1, precision 1 / 11 tokens, F1 = 2PR / (P + R) = 1/6.
    s = evaluate.rouge_l("There are a total of 291 episodes in Dragon Ball Z.", "291")
    assert s == pytest.approx({"f1": 1 / 6, "recall": 1.0, "precision": 1 / 11})
    # Partial credit: 1 of the reference's 2 tokens, 1 of the prediction's 4: F1 = 2 (1/8) / (3/4) = 1/3.
    s = evaluate.rouge_l("It docked in Uruguay", "Montevideo Uruguay")
    assert s == pytest.approx({"f1": 1 / 3, "recall": 1 / 2, "precision": 1 / 4})
    # Stemming: "episodes" and "episode" share the stem "episod" only with the stemmer.
    assert evaluate.rouge_l("two episodes", "episode", use_stemmer=False) == {"f1": 0.0, "recall": 0.0,
                                                                             "precision": 0.0}
    assert evaluate.rouge_l("two episodes", "episode") == pytest.approx({"f1": 2 / 3, "recall": 1.0,
                                                                        "precision": 1 / 2})
    assert evaluate.rouge_l("", "291") == {"f1": 0.0, "recall": 0.0, "precision": 0.0}
    with pytest.raises(FaJaxError, match="prediction=None: expected a string"):
        evaluate.rouge_l(None, "291")


@pytest.mark.parametrize("prediction, reference, expected", [
    ("There are 291 episodes.", "291", 1.0),
    ("There are 2910 episodes.", "291", 0.0),           # whole words only
    ("It was The Beatles!", "beatles", 1.0),            # case, punctuation, articles
    ("the U.S. Navy ship", "US navy", 1.0),             # "U.S." -> "us"
    ("Uruguay", "Montevideo, Uruguay", 0.0),            # the whole reference must appear
    ("stranded near Montevideo,   Uruguay.", "Montevideo Uruguay", 1.0),
    ("anything at all", "The.", 0.0),                   # normalises to nothing: never a match
    ("café au lait", "Café", 1.0),                      # non-ASCII letters kept
])
def test_exact_match_hand_scored(prediction, reference, expected):
    assert evaluate.exact_match(prediction, reference) == expected


def test_normalize_answer():
    assert evaluate.normalize_answer("  The U.S.  Navy's «ship»—an  example! ") == "us navys shipan example"


def test_score_records_hand_scored():
    records = [{"question": "how many episodes are there in dragon ball z", "reference": "291", "id": "q0"},
               {"question": "where was the cruise stranded", "reference": ["Paris", "Montevideo Uruguay"]},
               {"prompt": "Summarise: the sky.", "reference": "blue"}]
    preds = ["There are a total of 291 episodes in Dragon Ball Z.", "It docked in Uruguay", "green"]
    per, summary = evaluate.score_records(records, preds)
    assert per[0]["id"] == "q0" and per[1]["index"] == 1 and per[2]["prediction"] == "green"
    assert per[0]["exact_match"] == 1.0 and per[1]["exact_match"] == 0.0
    assert per[1]["rougeL_recall"] == pytest.approx(1 / 2)  # the best of the two references
    # means over the three examples, from the per-example values worked out in test_rouge_l_hand_scored
    assert summary == pytest.approx({"n": 3, "rougeL_f1": (1 / 6 + 1 / 3 + 0) / 3, "rougeL_recall": (1 + 1 / 2) / 3,
                                     "rougeL_precision": (1 / 11 + 1 / 4) / 3, "exact_match": 1 / 3})
    with pytest.raises(FaJaxError, match="expected a list of 3 strings"):
        evaluate.score_records(records, preds[:2])
    with pytest.raises(FaJaxError, match=r"predictions\[1\]: a int"):
        evaluate.score_records(records, ["a", 3, "b"])


# ------------------------------------------------------------------------------------------ prompts and records


def test_qa_prompts():
    r = {"question": "how many episodes are there in dragon ball z", "reference": "291",
         "context": "Dragon Ball Z has 291 episodes."}
    assert evaluate.qa_prompt(r) == "how many episodes are there in dragon ball z?"
    assert evaluate.qa_prompt({**r, "question": "Who? "}) == "Who?"  # no second question mark
    assert evaluate.qa_prompt(r, with_context=True) == (
        "Answer the following question given this context: Dragon Ball Z has 291 episodes.\n"
        "Question: how many episodes are there in dragon ball z?")
    assert evaluate.qa_messages(r) == [{"role": "system", "content": "Answer the following question."},
                                       {"role": "user", "content": "how many episodes are there in dragon ball z?"}]
    assert evaluate.qa_messages(r, with_context=True)[0]["content"] == (
        "Answer the following question given this context: Dragon Ball Z has 291 episodes.")
    p = {"prompt": "Summarise the meeting:\n...", "reference": "A summary.", "context": "ignored"}
    assert evaluate.qa_prompt(p, with_context=True) == p["prompt"]
    with pytest.raises(FaJaxError, match="with_context=True needs a non-empty 'context'"):
        evaluate.qa_prompt({"question": "q", "reference": "a"}, with_context=True)


def test_load_records_and_bad_lines(tmp_path):
    good = tmp_path / "qa.jsonl"
    good.write_text('{"question": "q1", "reference": "a"}\n\n{"prompt": "p", "reference": ["x", "y"], "id": 7}\n')
    assert evaluate.load_records(str(good)) == [{"question": "q1", "reference": "a"},
                                                {"prompt": "p", "reference": ["x", "y"], "id": 7}]
    cases = {
        '{"question": "q", "reference": "a"}\n{"question": "q", "reference": "a"\n': ":2: bad JSON",
        '["q", "a"]\n': ":1: a JSON list; expected an object",
        '{"question": "q"}\n': ":1: field 'reference' must be a string or a non-empty list of strings",
        '{"question": "q", "reference": []}\n': ":1: field 'reference' must be",
        '{"question": "q", "reference": ["a", 3]}\n': ":1: field 'reference' must be",
        '{"reference": "a"}\n': ":1: expected exactly one of 'question' and 'prompt'",
        '{"question": "q", "prompt": "p", "reference": "a"}\n': ":1: expected exactly one of",
        '{"question": "  ", "reference": "a"}\n': ":1: field 'question' must be a non-empty string",
        '{"question": "q", "reference": "a", "context": 3}\n': ":1: field 'context' must be a string",
        "\n\n": ": no records",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(text)
        with pytest.raises(FaJaxError, match=f"^{path}{message}"):
            evaluate.load_records(str(path))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"question": "caf\xe9", "reference": "a"}\n')
    with pytest.raises(FaJaxError, match=f"^{bad}:1: not valid UTF-8"):
        evaluate.load_records(str(bad))
    with pytest.raises(FaJaxError, match="no such file"):
        evaluate.load_records(str(tmp_path / "missing.jsonl"))


def test_evaluate_qa_with_injected_generator(tmp_path):
    records = [{"question": "how many episodes are there in dragon ball z", "reference": "291",
                "context": "Dragon Ball Z has 291 episodes."},
               {"question": "where was the cruise stranded?", "reference": ["Montevideo Uruguay"],
                "context": "The ship was stranded off Uruguay."}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    answers = {"how many episodes": "There are a total of 291 episodes in Dragon Ball Z.",
               "where was the cruise": "It docked in Uruguay"}
    calls = []

    def fake_generate(config, params, tokenizer, prompts, *, adapters=None, max_new_tokens=32, chat=False,
                      batch_size=8, dtype=None, **kw):
        calls.append(dict(prompts=prompts, adapters=adapters, max_new_tokens=max_new_tokens, chat=chat,
                          add_special_tokens=kw.get("add_special_tokens", True)))
        return [next(a for k, a in answers.items() if k in p) for p in prompts]

    class Tok:  # a chat template without a system role (Gemma, Mistral)
        chat_template = "no system role"

        def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
            if messages[0]["role"] == "system":
                raise ValueError("System role not supported")
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<model>" * add_generation_prompt

    out = tmp_path / "eval"
    summary = evaluate.evaluate_qa("cfg", "params", Tok(), str(path), adapters="lora", generate_fn=fake_generate,
                                   max_new_tokens=16, with_context=True, out_dir=str(out))
    assert calls == [dict(prompts=[f"<user>{evaluate.qa_prompt(r, True)}<model>" for r in records], adapters="lora",
                          max_new_tokens=16, chat=False, add_special_tokens=False)]  # rendered once, no second BOS
    expected = {"n": 2, "rougeL_f1": (1 / 6 + 1 / 3) / 2, "rougeL_recall": (1 + 1 / 2) / 2,
                "rougeL_precision": (1 / 11 + 1 / 4) / 2, "exact_match": 1 / 2}
    assert {k: summary[k] for k in expected} == pytest.approx(expected)
    assert summary["with_context"] is True and summary["chat"] is True and summary["max_new_tokens"] == 16
    assert summary["prompt_format"] == "user"
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == list(answers.values())
    assert rows[0]["prompt"].startswith("<user>Answer the following question given this context:")
    assert rows[1]["reference"] == ["Montevideo Uruguay"] and rows[1]["rougeL_recall"] == pytest.approx(0.5)
    assert sorted(os.listdir(out)) == ["predictions.jsonl", "summary.json"]  # no temporary files left

    summary = evaluate.evaluate_qa("cfg", "params", object(), records, generate_fn=fake_generate)
    assert calls[-1]["chat"] is False and calls[-1]["max_new_tokens"] == 64  # no chat template: plain prompts
    assert calls[-1]["add_special_tokens"] is True and summary["prompt_format"] == "user"
    assert calls[-1]["prompts"][0] == "how many episodes are there in dragon ball z?"
    with pytest.raises(FaJaxError, match=r"records\[0\]: with_context=True needs"):
        evaluate.evaluate_qa("cfg", "params", object(), [{"question": "q", "reference": "a"}], with_context=True,
                             generate_fn=fake_generate)
    with pytest.raises(FaJaxError, match="max_new_tokens=0"):
        evaluate.evaluate_qa("cfg", "params", object(), records, max_new_tokens=0, generate_fn=fake_generate)


# ------------------------------------------------------------------------------------------ model-based metrics


# The chat templates of Meta-Llama-3-8B-Instruct (system, user and assistant headers) and gemma-7b-it (no system
# role), as their tokenizer_config.json files give them.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
QA = {"question": "how many episodes are there in dragon ball z", "reference": "291",
      "context": "Dragon Ball Z has 291 episodes."}


def test_evaluate_qa_prompts_follow_the_chat_template(tmp_path):
    """RE-Adapt, Appendix B: a Llama-3 template gets the system-turn form, rendered by the tokenizer's own
    apply_chat_template; a template that rejects a system role (Gemma) gets the one-user-turn form."""
    tok = save_tiny_tokenizer(tmp_path)
    fed = []

    def fake_generate(config, params, tokenizer, prompts, **kw):
        fed.append((list(prompts), kw))
        return ["There are 291 episodes."] * len(prompts)

    tok.chat_template = LLAMA3_TEMPLATE
    question = "how many episodes are there in dragon ball z?"
    for ctx, system in ((False, "Answer the following question."),
                        (True, "Answer the following question given this context: Dragon Ball Z has 291 episodes.")):
        summary = evaluate.evaluate_qa(None, None, tok, [QA], with_context=ctx, generate_fn=fake_generate)
        want = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                       add_generation_prompt=True, tokenize=False)
        assert want == (f"<s><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|><|start_header_id|>user"
                        f"<|end_header_id|>\n\n{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        assert fed[-1][0] == [want]
        assert fed[-1][1]["chat"] is False and fed[-1][1]["add_special_tokens"] is False  # rendered once
        assert (summary["chat"], summary["prompt_format"], summary["exact_match"]) == (True, "system", 1.0)
    summary = evaluate.evaluate_qa(None, None, tok, [QA], prompt_format="user", generate_fn=fake_generate)
    assert fed[-1][0] == [tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                  tokenize=False)] and summary["prompt_format"] == "user"

    tok.chat_template = GEMMA_TEMPLATE
    for ctx, user in ((False, question), (True, "Answer the following question given this context: Dragon Ball Z "
                                                f"has 291 episodes.\nQuestion: {question}")):
        summary = evaluate.evaluate_qa(None, None, tok, [QA], with_context=ctx, generate_fn=fake_generate)
        want = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
        assert want == f"<s><start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"
        assert fed[-1][0] == [want] and summary["prompt_format"] == "user"
    with pytest.raises(FaJaxError, match=r"^records\[0\]: the chat template rejects the 'system' prompt format "
                                         r"\(System role not supported\)"):
        evaluate.evaluate_qa(None, None, tok, [QA], prompt_format="system", generate_fn=fake_generate)
    with pytest.raises(FaJaxError, match="prompt_format='chat': expected one of auto, system, user"):
        evaluate.evaluate_qa(None, None, tok, [QA], prompt_format="chat", generate_fn=fake_generate)
    tok.chat_template = None
    with pytest.raises(FaJaxError, match="the tokenizer has no chat template"):
        evaluate.evaluate_qa(None, None, tok, [QA], chat=True, generate_fn=fake_generate)
    with pytest.raises(FaJaxError, match="prompt_format='system' needs the tokenizer's chat template"):
        evaluate.evaluate_qa(None, None, tok, [QA], prompt_format="system", generate_fn=fake_generate)


def test_evaluate_qa_feeds_generate_text_one_bos(tmp_path, monkeypatch):
    """The rendered prompt (BOS from the template) reaches the model with one BOS even where the tokenizer adds one
    by default; without a chat template the tokenizer's own BOS is kept. Then the same through `fa-jax eval`."""
    from tokenizers import processors

    from fa_jax import generate

    save_hf_model("llama", tmp_path)
    config = fa_jax.load_config(str(tmp_path))
    tok = save_tiny_tokenizer(tmp_path)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                 special_tokens=[("<s>", tok.bos_token_id)])
    seen = []
    monkeypatch.setattr(generate, "_generate", lambda config, params, prompts, **kw: (
        seen.extend(prompts) or [[] for _ in prompts], 0))
    for template in (LLAMA3_TEMPLATE, GEMMA_TEMPLATE, None):
        tok.chat_template = template
        evaluate.evaluate_qa(config, None, tok, [QA], max_new_tokens=1)
        ids = seen.pop()
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, (template, ids)
    assert tok("<s> the")["input_ids"][:2] == [tok.bos_token_id] * 2  # what a second tokenizer BOS would look like

    # `fa-jax eval --qa` on a model directory whose tokenizer has the Llama-3 template (as `fa-jax merge --tokenizer`
    # leaves it): the system-turn form, recorded in the summary
    from fa_jax.cli import main

    tok.chat_template = LLAMA3_TEMPLATE
    tok.save_pretrained(str(tmp_path))
    (tmp_path / "qa.jsonl").write_text(json.dumps(QA) + "\n")
    assert main(["eval", "--model", str(tmp_path), "--qa", str(tmp_path / "qa.jsonl"), "--max-new-tokens", "1",
                 "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert (summary["chat"], summary["prompt_format"]) == (True, "system")
    row = json.loads((tmp_path / "ev" / "predictions.jsonl").read_text())
    assert row["prompt"].startswith("<s><|start_header_id|>system<|end_header_id|>\n\nAnswer the following question.")
    assert main(["eval", "--model", str(tmp_path), "--qa", str(tmp_path / "qa.jsonl"), "--prompt-format", "user",
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["prompt_format"] == "user"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{name: (config, params, torch model)} of tiny models sharing one word-level tokenizer, and the tokenizer."""
    models = {}
    for name, family, seed in (("llama", "llama", 0), ("llama_b", "llama", 1), ("tied", "llama3", 2)):
        d = tmp_path_factory.mktemp(name)
        hf = save_hf_model(family, d, seed=seed)
        tok = save_tiny_tokenizer(d)
        models[name] = (*fa_jax.load_model(str(d)), hf)
    return models, fa_jax.load_tokenizer(str(d))


def _torch_nll(model, tokenizer, docs):
    """Sum and count of -log p(next token) over [BOS] + doc + [EOS], one document at a time, float64."""
    total, count = 0.0, 0
    for doc in docs:
        ids = [tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"] + \
            [tokenizer.eos_token_id]
        lp = torch.log_softmax(torch.tensor(hf_logits(model, [ids])[0], dtype=torch.float64), -1).numpy()
        total -= sum(lp[t, ids[t + 1]] for t in range(len(ids) - 1))
        count += len(ids) - 1
    return total, count


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("name", ["llama", "tied"])
def test_perplexity_matches_transformers(tiny, name):
    models, tok = tiny
    config, params, hf = models[name]
    # all documents fit in one row of 256: every token sees its whole document, as in the one-document reference
    out = evaluate.perplexity(config, params, tok, DOCS, seq_len=256, batch_size=2, chunk_size=32)
    total, count = _torch_nll(hf, tok, DOCS)
    assert out["tokens"] == count
    np.testing.assert_allclose(out["nll"], total / count, rtol=2e-5)
    np.testing.assert_allclose(out["perplexity"], np.exp(total / count), rtol=2e-5)


def test_perplexity_short_rows_and_adapters(tiny):
    """Rows of 16 (documents straddle rows, several batches, padding rows): the same sums as full logits over the
    same packed rows; a non-zero LoRA gives the perplexity of the merged weights."""
    models, tok = tiny
    config, params, _ = models["llama"]
    out = evaluate.perplexity(config, params, tok, DOCS, seq_len=16, batch_size=3, chunk_size=5)
    total, count = 0.0, 0
    for b in PackedBatches(datasets.Dataset.from_dict({"text": DOCS}), tok, 16, 3, process_index=0,
                           process_count=1, num_epochs=1):
        lp = _np_log_softmax(fa_jax.forward(config, params, b["tokens"], segment_ids=b["segment_ids"],
                                            positions=b["positions"]))
        picked = np.take_along_axis(lp, b["labels"][..., None], -1)[..., 0]
        total -= (picked * b["mask"]).sum()
        count += int(b["mask"].sum())
    assert out["tokens"] == count == _torch_nll(models["llama"][2], tok, DOCS)[1]  # every pair counted once
    np.testing.assert_allclose(out["nll"], total / count, rtol=2e-5)

    lora = fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4, alpha=8)
    lora = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 else x, lora)  # B != 0: the adapter changes the model
    with_lora = evaluate.perplexity(config, params, tok, DOCS, adapters=lora, seq_len=16, batch_size=3)
    merged = evaluate.perplexity(config, fa_jax.merge_lora(params, lora), tok, DOCS, seq_len=16, batch_size=3)
    assert abs(with_lora["nll"] - out["nll"]) > 1e-3
    np.testing.assert_allclose(with_lora["nll"], merged["nll"], rtol=1e-5)
    with pytest.raises(FaJaxError, match=r"documents\[1\]: a int"):
        evaluate.perplexity(config, params, tok, ["text", 3])
    with pytest.raises(FaJaxError, match="documents=\\[\\]"):
        evaluate.perplexity(config, params, tok, [])


def test_perplexity_reads_files(tiny, tmp_path):
    models, tok = tiny
    config, params, hf = models["llama"]
    path = tmp_path / "held_out.txt"
    path.write_text("\n\n".join(DOCS) + "\n")
    out = evaluate.perplexity(config, params, tok, str(path), seq_len=256, batch_size=1)
    total, count = _torch_nll(hf, tok, DOCS)
    assert out["tokens"] == count
    np.testing.assert_allclose(out["nll"], total / count, rtol=2e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_teacher_agreement_matches_full_logits(tiny, temperature):
    models, tok = tiny
    t_cfg, teacher, _ = models["llama"]
    s_cfg, student, _ = models["llama_b"]
    lora = fa_jax.init_lora(s_cfg, jax.random.PRNGKey(1), rank=4, alpha=8)
    lora = jax.tree.map(lambda x: x - 0.03 if x.ndim == 2 else x, lora)
    out = evaluate.teacher_agreement(t_cfg, teacher, s_cfg, student, tok, DOCS, adapters=lora, seq_len=16,
                                     batch_size=2, temperature=temperature, chunk_size=4)
    kl, agree, n, ref_kd, ref_agree = 0.0, 0.0, 0, 0.0, 0.0
    for b in PackedBatches(datasets.Dataset.from_dict({"text": DOCS}), tok, 16, 2, process_index=0,
                           process_count=1, num_epochs=1):
        kw = dict(segment_ids=b["segment_ids"], positions=b["positions"])
        s = np.asarray(fa_jax.forward(s_cfg, student, b["tokens"], adapters=lora, **kw))
        t = np.asarray(fa_jax.forward(t_cfg, teacher, b["tokens"], **kw))
        ls, lt = _np_log_softmax(s / temperature), _np_log_softmax(t / temperature)
        m = b["mask"].astype(bool)
        kl += (np.exp(lt) * (lt - ls)).sum(-1)[m].sum()
        agree += (s.argmax(-1) == t.argmax(-1))[m].sum()
        n += m.sum()
        _, metrics = losses.distill_loss(s, t, b["labels"], b["mask"], alpha=1.0, temperature=temperature,
                                         normalizer=1.0)
        ref_kd, ref_agree = ref_kd + float(metrics["kd"]), ref_agree + float(metrics["agreement"])
    assert out["tokens"] == n
    np.testing.assert_allclose(out["kl"], kl / n, rtol=1e-4)
    np.testing.assert_allclose(out["kl"], ref_kd / n, rtol=1e-4)
    np.testing.assert_allclose(out["top1_agreement"], agree / n, atol=1e-7)
    np.testing.assert_allclose(out["top1_agreement"], ref_agree / n, atol=1e-7)
    assert out["kl"] > 1e-3 and 0 <= out["top1_agreement"] < 1


def test_teacher_agreement_with_itself(tiny):
    models, tok = tiny
    cfg, params, _ = models["tied"]
    out = evaluate.teacher_agreement(cfg, params, cfg, params, tok, DOCS, seq_len=32, batch_size=2)
    assert abs(out["kl"]) < 1e-6 and out["top1_agreement"] == 1.0
    np.testing.assert_allclose(out["student_nll"],
                               evaluate.perplexity(cfg, params, tok, DOCS, seq_len=32, batch_size=2)["nll"],
                               rtol=1e-6)
    with pytest.raises(FaJaxError, match="temperature=0"):
        evaluate.teacher_agreement(cfg, params, cfg, params, tok, DOCS, temperature=0)


def test_target_logprobs_left_and_right_padding(tiny):
    models, tok = tiny
    config, params, hf = models["tied"]
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(4, 200, n)) for n in (9, 5)]
    for left in (False, True):
        T = 10
        tokens, targets, mask = np.zeros((2, T), np.int32), np.zeros((2, T), np.int32), np.zeros((2, T), np.int32)
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if left else slice(0, len(s))
            tokens[i, sl], mask[i, sl] = s, 1
            targets[i, sl] = s[1:] + [7]
        lp, greedy = jax.jit(lambda p, *a: evaluate.target_logprobs(config, p, *a, chunk_size=3))(
            params, tokens, targets, mask)
        for i, s in enumerate(seqs):
            ref = _np_log_softmax(hf_logits(hf, [s])[0])
            want = ref[np.arange(len(s)), s[1:] + [7]]
            got = np.asarray(lp[i])[mask[i] > 0]
            np.testing.assert_allclose(got, want, atol=2e-4)
            assert (np.asarray(greedy[i])[mask[i] > 0] == (ref.argmax(-1) == np.array(s[1:] + [7]))).all()
            assert (np.asarray(lp[i])[mask[i] == 0] == 0).all()


def test_evaluate_qa_with_generate_text(tiny, tmp_path):
    pytest.importorskip("fa_jax.generate")
    models, tok = tiny
    config, params, _ = models["llama"]
    records = [{"question": "the hacker wrote a", "reference": "program"},
               {"question": "a computer is a", "reference": ["system", "computer"]}]
    summary = evaluate.evaluate_qa(config, params, tok, records, max_new_tokens=4, chat=False,
                                   out_dir=str(tmp_path / "qa"))
    assert summary["n"] == 2 and 0 <= summary["rougeL_recall"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "qa" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["prediction"], str) for r in rows)


def test_teacher_reference_scores_like_teacher_agreement(tiny):
    """One teacher pass, several students: each score equals teacher_agreement on the same rows, and the teacher's
    own perplexity equals `perplexity` of the teacher."""
    models, tok = tiny
    t_cfg, teacher, _ = models["llama"]
    s_cfg, student, _ = models["llama_b"]
    lora = fa_jax.init_lora(s_cfg, jax.random.PRNGKey(1), rank=4, alpha=8)
    lora = jax.tree.map(lambda x: x - 0.03 if x.ndim == 2 else x, lora)
    ref = evaluate.TeacherReference(t_cfg, teacher, tok, DOCS, seq_len=16, batch_size=2, chunk_size=4)
    for adapters in (None, lora):
        got = ref.score(s_cfg, student, adapters=adapters)
        want = evaluate.teacher_agreement(t_cfg, teacher, s_cfg, student, tok, DOCS, adapters=adapters, seq_len=16,
                                          batch_size=2, chunk_size=4)
        assert got["tokens"] == want["tokens"]
        for k in ("kl", "top1_agreement", "student_nll", "perplexity"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)
    assert len(ref._steps) == 1  # the same student config: one compiled step for both
    own = evaluate.perplexity(t_cfg, teacher, tok, DOCS, seq_len=16, batch_size=2)
    np.testing.assert_allclose(ref.teacher_metrics["nll"], own["nll"], rtol=1e-6)
    assert ref.teacher_metrics["tokens"] == own["tokens"]
    # max_rows keeps the first rows only
    small = evaluate.TeacherReference(t_cfg, teacher, tok, DOCS, seq_len=16, batch_size=2, max_rows=2)
    assert small.rows == 2 and small.teacher_metrics["tokens"] < own["tokens"]
    with pytest.raises(FaJaxError, match="max_rows=0"):
        evaluate.TeacherReference(t_cfg, teacher, tok, DOCS, max_rows=0)


def test_per_document_reference_scores_each_document_alone(tiny):
    """per_document: every document scored whole and on its own (packed as separate segments of one row shape, a
    long one cut every seq_len tokens), so its sums are those of `teacher_agreement` / `perplexity` of it alone."""
    models, tok = tiny
    t_cfg, teacher, _ = models["llama"]
    s_cfg, student, _ = models["llama_b"]
    docs = DOCS + [" ".join(DOCS[:4]), ""]  # a long document (three pieces at seq_len 16) and an empty one
    ref = evaluate.TeacherReference(t_cfg, teacher, tok, docs, seq_len=16, batch_size=2, chunk_size=4,
                                    per_document=True)
    assert {tuple(b["tokens"].shape) for b in ref.batches} == {(2, 16)} and ref.documents == len(docs)
    got = ref.score(s_cfg, student)
    per = got["per_document"]
    assert per["tokens"][-1] == 0 and per["tokens"].sum() == got["tokens"] == ref.teacher_metrics["tokens"]
    np.testing.assert_allclose(got["student_nll"], per["nll_sum"].sum() / per["tokens"].sum(), rtol=1e-12)
    for i in (1, 4, 5):
        want = evaluate.teacher_agreement(t_cfg, teacher, s_cfg, student, tok, [docs[i]], seq_len=16, batch_size=2,
                                          chunk_size=4)
        n = want["tokens"]
        assert per["tokens"][i] == n
        np.testing.assert_allclose([per["nll_sum"][i], per["kl_sum"][i], per["agreement_sum"][i]],
                                   [want["student_nll"] * n, want["kl"] * n, want["top1_agreement"] * n], rtol=1e-5)
        own = evaluate.perplexity(t_cfg, teacher, tok, [docs[i]], seq_len=16, batch_size=2)
        np.testing.assert_allclose(ref.teacher_documents["nll_sum"][i], own["nll"] * own["tokens"], rtol=1e-5)
    # subset: every k-th batch, sharing the compiled steps
    sub = ref.subset(20)
    assert sub.rows < ref.rows and sub._steps is ref._steps
    assert 0 < sub.teacher_metrics["tokens"] < ref.teacher_metrics["tokens"]
    assert sub.score(s_cfg, student)["tokens"] == sub.teacher_metrics["tokens"] and len(ref._steps) == 1
    assert ref.subset(10 ** 6) is ref
    with pytest.raises(FaJaxError, match="per_document"):
        evaluate.TeacherReference(t_cfg, teacher, tok, docs, max_rows=2, per_document=True)


def test_multiple_choice_matches_target_logprobs(tiny):
    """Each choice's summed log-probability after its prompt (the prompt's cache shared by the choices) equals
    target_logprobs on prompt + choice, with and without an adapter; padding items change nothing."""
    models, tok = tiny
    cfg, params, _ = models["tied"]
    lora = fa_jax.init_lora(cfg, jax.random.PRNGKey(2), rank=4, alpha=8)
    lora = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 else x, lora)
    prompts = ["the hacker wrote a", "a computer is", "data", "the user had a file with the"]
    choices = [["program", "system of code"], ["a system", "the"], ["file", "name name"], ["name", "data"]]
    mc = evaluate.MultipleChoice(tok, prompts, choices, batch_size=3)
    assert mc.batch_size == 2  # two batches are needed; filled evenly
    seqs, spans = [], []
    for p, cs in zip(prompts, choices):
        ids = [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
        for c in cs:
            seqs.append(ids + tok(c, add_special_tokens=False)["input_ids"])
            spans.append((len(ids), len(seqs[-1])))
    width = max(map(len, seqs))
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros_like(tokens)
    for i, q in enumerate(seqs):
        tokens[i, :len(q)], mask[i, :len(q)] = q, 1
    f = jax.jit(lambda t, g, m, a: evaluate.target_logprobs(cfg, params, t, g, m, a)[0])
    for adapters in (None, lora):
        got = mc.score(cfg, params, adapters=adapters)
        lp = np.asarray(f(tokens[:, :-1], tokens[:, 1:], mask[:, 1:], adapters))
        want = [lp[i, a - 1:b - 1].sum() for i, (a, b) in enumerate(spans)]
        np.testing.assert_allclose(got["logprob"].ravel(), want, rtol=1e-5)
        assert got["tokens"].ravel().tolist() == [b - a for a, b in spans]
    with pytest.raises(FaJaxError, match="same number of choices"):
        evaluate.MultipleChoice(tok, prompts[:2], [["a", "b"], ["a"]])
    with pytest.raises(FaJaxError, match="no tokens"):
        evaluate.MultipleChoice(tok, prompts[:1], [["a", ""]])
