"""Downstream fine-tuning: the response-only mask token by token, chat templates, packing, the initial adapter
(a foundation run's first-step logits are the foundation model's), errors, and a two-step run from the command
line."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax
from fa_jax import losses, sft, train
from fa_jax.cli import main
from fa_jax.errors import FaJaxError
from fa_jax.models import transformer
from helpers import save_hf_model, save_tiny_tokenizer, write_corpus

CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant {% endif %}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    save_hf_model("llama3", root / "model")
    tok = save_tiny_tokenizer(root / "model")
    records = [{"prompt": "the hacker wrote a program", "response": "it was on the system"},
               {"instruction": "name a word", "input": "about data", "output": "file"},
               {"question": "what is the text", "answer": "a line of code"},
               {"messages": [{"role": "user", "content": "the user"}, {"role": "assistant", "content": "the code"},
                             {"role": "user", "content": "and then"}, {"role": "assistant", "content": "a file"}]}]
    path = root / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records * 6) + "\n")
    return root, tok, str(path)


def _words(tok, ids):
    return tok.convert_ids_to_tokens([int(i) for i in ids])


def test_response_only_mask_plain_format(setup):
    root, tok, _ = setup
    msgs = sft.to_messages({"prompt": "the hacker wrote a program", "response": "it was on the system"})
    ids, target = sft.encode(tok, msgs, chat=False)
    words = _words(tok, ids)
    assert words[0] == "<s>" and words[-1] == "</s>"
    # exactly the response words and EOS are targets
    assert [w for w, t in zip(words, target) if t] == ["it", "was", "on", "the", "system", "</s>"]
    row = sft.make_rows([(ids, target)], seq_len=16, pad_id=tok.pad_token_id, pack=False)[0]
    # mask[t] = 1 exactly where labels[t] is a response token (the label of position t is token t + 1)
    want = [int(target[t + 1]) if t + 1 < len(ids) else 0 for t in range(16)]
    assert row["mask"].tolist() == want
    assert _words(tok, row["labels"][row["mask"] > 0]) == ["it", "was", "on", "the", "system", "</s>"]
    assert row["segment_ids"].tolist() == [1] * len(ids) + [0] * (16 - len(ids))


def test_response_only_mask_chat_template_multi_turn(setup):
    root, tok, _ = setup
    tok = fa_jax.load_tokenizer(str(root / "model"))
    tok.chat_template = CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "the user"}, {"role": "assistant", "content": "the code"},
            {"role": "user", "content": "and then"}, {"role": "assistant", "content": "a file"}]
    ids, target = sft.encode(tok, msgs, chat=True)
    words = _words(tok, ids)
    assert " ".join(words).replace("<unk>", "?") == ("<s> user the user </s> <s> ? the code </s> "
                                                     "<s> user and then </s> <s> ? a file </s>")  # ? = assistant
    # both assistant turns (content and end-of-turn) and nothing of the template or the user turns
    assert [w for w, t in zip(words, target) if t] == ["the", "code", "</s>", "a", "file", "</s>"]


def test_packing_keeps_examples_apart(setup):
    root, tok, _ = setup
    ex = [sft.encode(tok, sft.to_messages({"prompt": p, "response": r}), chat=False)
          for p, r in [("the a", "of and"), ("to in", "is"), ("was that it", "for on with")]]
    rows = sft.make_rows(ex, seq_len=16, pad_id=0, pack=True)
    assert len(rows) == 2  # 6 + 5 tokens in the first row, the third (8 tokens) would not fit in 17
    r = rows[0]
    assert r["segment_ids"][:11].tolist() == [1] * 6 + [2] * 5
    assert r["positions"][:11].tolist() == list(range(6)) + list(range(5))
    assert r["mask"][5] == 0  # the last token of example 1 does not predict example 2's BOS
    assert _words(tok, r["labels"][r["mask"] > 0]) == ["of", "and", "</s>", "is", "</s>"]


def test_batches_resume_and_cover_an_epoch(setup):
    root, tok, path = setup
    records = sft.load_records(path)
    a = sft.SFTBatches(records, tok, seq_len=24, global_rows=4, seed=3)
    first = [next(a) for _ in range(3)]
    b = sft.SFTBatches(records, tok, seq_len=24, global_rows=4, seed=3)
    next(b)
    c = sft.SFTBatches(records, tok, seq_len=24, global_rows=4, seed=3)
    c.restore(b.state())
    for want in first[1:]:
        got = next(c)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # 24 records, 4 rows per batch: the first 6 batches are one epoch, each record once
    d = sft.SFTBatches(records, tok, seq_len=24, global_rows=4, seed=3)
    seen = [tuple(r) for _ in range(6) for r in next(d)["tokens"]]
    assert len(seen) == 24 and d.state() == {"epoch": 1, "cursor": 0}


def test_bad_records_name_file_and_line(tmp_path, setup):
    root, tok, _ = setup
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a" "response": "b"}\n')
    with pytest.raises(FaJaxError, match=r"bad.jsonl:2: bad JSON"):
        sft.load_records(str(p))
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "reply": "b"}\n')
    recs = sft.load_records(str(p))
    with pytest.raises(FaJaxError, match=r"bad.jsonl:2: no response field .*fields: prompt, reply"):
        sft.to_messages(recs[1])
    with pytest.raises(FaJaxError, match="init='foundation': expected random, foundation:RUN_DIR or peft:"):
        sft.parse_init("foundation")


def _sft_cfg(root, data, out, **over):
    cfg = sft.sft_defaults()
    cfg = fa_jax.run_config.merge(cfg, {
        "model": {"student": str(root / "model")},
        "adapter": {"rank": 4, "alpha": 8.0},
        "data": {"train": data, "seq_len": 24, "batch_size": 4},
        "optim": {"warmup_steps": 0},
        "mesh": {"shape": [1, 1, 1]},
        "run": {"out_dir": str(out), "steps": 2, "log_every": 1, "save_every": 0, "tensorboard": False,
                "async_checkpoint": False}}, "test")
    return fa_jax.run_config.apply_overrides(cfg, [f"{k}={v}" for k, v in over.items()])


def test_init_from_foundation_run_starts_at_the_foundation_model(tmp_path, setup):
    """A short pre-training run is the foundation; SFT from it starts with exactly its adapter: the first step's
    loss equals the response-token cross-entropy of (student + foundation adapter loaded through PEFT)."""
    root, tok, data = setup
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=40, max_words=20)
    train.pretrain(fa_jax.run_config.merge(train.pretrain_defaults(), {
        "model": {"teacher": str(root / "model")}, "adapter": {"rank": 4, "alpha": 8.0},
        "loss": {"chunk_size": 8}, "data": {"train": corpus, "seq_len": 16, "batch_size": 4},
        "optim": {"lr": 0.05, "warmup_steps": 0}, "mesh": {"shape": [1, 1, 1]},
        "run": {"steps": 3, "out_dir": str(tmp_path / "pre"), "log_every": 1, "save_every": 0,
                "tensorboard": False, "async_checkpoint": False}}, "test"))
    cfg = _sft_cfg(root, data, tmp_path / "sft", init=f"foundation:{tmp_path / 'pre'}")
    config, params = fa_jax.load_model(str(root / "model"))
    foundation = fa_jax.load_peft(config, str(tmp_path / "pre" / "adapter_peft"))
    assert max(float(jnp.abs(m["lora_B"]).max()) for _, m in fa_jax.lora.iter_modules(foundation)) > 0
    loaded = sft.load_initial_adapter(cfg, config)
    toks = np.arange(12)[None] % config.vocab_size
    np.testing.assert_array_equal(np.asarray(fa_jax.forward(config, params, toks, adapters=loaded)),
                                  np.asarray(fa_jax.forward(config, params, toks, adapters=foundation)))

    batch = next(sft.SFTBatches(sft.load_records(data), tok, seq_len=24, global_rows=4, seed=0))

    class Once:
        def __init__(self):
            self.n = 0

        def __next__(self):
            return batch

    summary = sft.finetune(fa_jax.run_config.apply_overrides(cfg, ["run.steps=1"]), batches=Once())
    logits = fa_jax.forward(config, params, batch["tokens"], adapters=foundation, segment_ids=batch["segment_ids"],
                            positions=batch["positions"])
    want, _ = losses.distill_loss(logits, None, batch["labels"], batch["mask"], alpha=0.0)
    first = json.loads((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()[0])
    np.testing.assert_allclose(first["loss"], float(want), rtol=1e-5)
    assert summary["step"] == 1

    bad = _sft_cfg(root, data, tmp_path / "sft2", init=f"foundation:{tmp_path / 'pre'}", **{"adapter.rank": 8})
    with pytest.raises(FaJaxError, match=r"does not match adapter.rank=8.*adapter ranks \[4\]"):
        sft.load_initial_adapter(bad, config)


def test_two_step_sft_from_the_command_line(tmp_path, setup, capsys):
    root, tok, data = setup
    conf = tmp_path / "sft_conf.py"
    conf.write_text("def get_config():\n    return {'adapter': {'rank': 4, 'alpha': 8.0}, 'mesh': {'shape': [1, 1, 1]}}\n")
    rc = main(["sft", "--config", str(conf), f"model.student={root / 'model'}", f"data.train={data}",
               "data.seq_len=24", "data.batch_size=4", "data.pack=true", "run.steps=2", "run.log_every=1",
               f"run.out_dir={tmp_path / 'run'}", "run.tensorboard=false", "optim.warmup_steps=0"])
    assert rc in (0, None)
    out = capsys.readouterr().out
    assert "step 2/2" in out and "adapter_peft" in out
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(np.isfinite(m["loss"]) for m in lines)
    assert (tmp_path / "run" / "adapter_peft" / "adapter_config.json").exists()
    assert (tmp_path / "run" / "loss_curve.png").exists()
    assert main(["sft", "--config", str(conf), "init=peft:/nonexistent", f"model.student={root / 'model'}",
                 f"data.train={data}", f"run.out_dir={tmp_path / 'run2'}"]) == 2
    assert "init=peft:/nonexistent: /nonexistent is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("name,kind", [("pretrain_smollm2", "pretrain"), ("pretrain_llama31_8b_to_llama32_1b", "pretrain"),
                                       ("knowledge_llama3_8b", "pretrain"), ("sft_smollm2", "sft")])
def test_shipped_run_configs_resolve(name, kind):
    """Every key of the shipped run configs exists in the defaults, with the right type."""
    import os

    from fa_jax import run_config

    path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
    defaults = train.pretrain_defaults() if kind == "pretrain" else sft.sft_defaults()
    cfg = run_config.load(path, defaults)
    assert train.remat_setting(cfg) in (False, "full", "dots", "all_dots")
    if kind == "sft":
        assert sft.parse_init(cfg.init)[0] == "foundation"


def test_eval_command_perplexity_and_qa(tmp_path, setup, capsys):
    """`fa-jax eval` on a run directory: the perplexity equals evaluate.perplexity with the run's PEFT adapter."""
    from fa_jax import evaluate

    root, tok, data = setup
    run = tmp_path / "run"
    assert main(["sft", f"model.student={root / 'model'}", f"data.train={data}", "data.seq_len=24",
                 "data.batch_size=4", "run.steps=1", f"run.out_dir={run}", "run.tensorboard=false",
                 "adapter.rank=4", "mesh.shape=[1,1,1]"]) in (0, None)
    corpus = write_corpus(tmp_path / "held.txt", n_docs=6, max_words=12)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "the hacker", "reference": "program"}) + "\n")
    capsys.readouterr()
    assert main(["eval", "--model", str(root / "model"), "--adapter", str(run), "--perplexity", corpus,
                 "--qa", str(qa), "--max-new-tokens", "3", "--seq-len", "16", "--out", str(tmp_path / "ev")]) in (0, None)
    summary = json.loads((tmp_path / "ev" / "eval_summary.json").read_text())
    config, params = fa_jax.load_model(str(root / "model"))
    adapters = fa_jax.load_peft(config, str(run / "adapter_peft"))
    want = evaluate.perplexity(config, params, tok, corpus, adapters=adapters, seq_len=16, batch_size=4)
    np.testing.assert_allclose(summary["perplexity"]["perplexity"], want["perplexity"], rtol=1e-6)
    assert summary["qa"]["n"] == 1 and (tmp_path / "ev" / "predictions.jsonl").exists()
    assert main(["eval", "--model", str(root / "model")]) == 2
    assert "eval: nothing to do" in capsys.readouterr().err


def test_sft_resume_equals_uninterrupted(tmp_path, setup):
    """The SFT data position is part of the checkpoint: stop after 2 steps, resume, and the losses of steps 1-4
    equal an uninterrupted run's (packed rows, 24 records, so the run crosses an epoch)."""
    root, tok, data = setup

    def losses_of(run):
        return {json.loads(x)["step"]: json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()}

    kw = {"data.pack": "true", "data.batch_size": 8, "run.steps": 4, "run.log_every": 1}
    sft.finetune(_sft_cfg(root, data, tmp_path / "straight", **kw))
    first = sft.finetune(_sft_cfg(root, data, tmp_path / "resumed", **kw, **{"run.stop_after": 2}))
    assert first["step"] == 2
    second = sft.finetune(_sft_cfg(root, data, tmp_path / "resumed", **kw))
    assert second["step"] == 4
    straight, resumed = losses_of(tmp_path / "straight"), losses_of(tmp_path / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4]
    np.testing.assert_allclose([resumed[s] for s in range(1, 5)], [straight[s] for s in range(1, 5)], rtol=1e-6)
