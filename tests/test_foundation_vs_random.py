"""scripts/foundation_vs_random.py: the test entries split off before anything trains and absent from the
foundation adapter's pre-training text; the experiment end to end on a tiny model, its table recomputed from the
written runs and its reference NLLs against PyTorch."""
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

from helpers import make_hf_model, save_hf_model, save_tiny_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import foundation_vs_random as fvr  # noqa: E402

WORDS = "the a of and to in is was that it for on with as by hacker program system computer".split()


def _glossary(path, n=40):
    """Entries ":wordK: n." whose definitions differ, after an introduction that quotes the definition of entry 3."""
    quoted = f"The {WORDS[3]} of a {WORDS[6]} number 3 is on the system."
    text = f"   Introduction. As the glossary says, {quoted} So it goes.\n\n"
    for i, w in enumerate((WORDS * 3)[:n]):
        text += (f"   :{w}{i}: n.\n\n   [from {WORDS[i % 5]}] The {w} of a {WORDS[(i + 3) % len(WORDS)]} number {i} "
                 f"is on the system.\n   It was {WORDS[(i + 7) % len(WORDS)]}.\n\n")
    path.write_text(text)
    return str(path)


def _plain(text):  # an independent normalisation: lower case, letters and digits only
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def test_test_entries_never_reach_the_pretraining_text(tmp_path):
    path = _glossary(tmp_path / "g.txt")
    records = fvr.jargon_records(path)
    test, pool = fvr.split_task(records, 8, seed=3)
    assert len(test) == 8 and {r["term"] for r in test}.isdisjoint(r["term"] for r in pool)
    assert len(test) + len(pool) == len(records)
    # entry 3 is quoted by another entry: make sure it is a test entry, so the quoting paragraph must go too
    test, pool = test + [r for r in pool if r["term"] == "and3"], [r for r in pool if r["term"] != "and3"]
    docs, counts = fvr.pretraining_documents(path, test)
    assert counts["dropped_reference"] == 1  # the introduction, which quotes entry 3
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(docs))
    from fa_jax import data

    text = " ".join(_plain(d["text"]) for d in data.load_documents(str(corpus)))
    for r in test:
        assert _plain(r["reference"]) not in text, r["term"]
    for r in pool:  # the training entries stay
        assert _plain(r["reference"]) in text, r["term"]
    assert fvr.leaked([r["reference"] for r in test], docs) == []
    assert len(fvr.leaked([r["reference"] for r in test], open(path).read().split("\n\n"))) == len(test)


@pytest.mark.slow  # 30 s; the split, leak and scoring pieces above are checked in the default suite
def test_script_end_to_end_on_a_tiny_model(tmp_path):
    save_hf_model("llama3", tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    glossary = _glossary(tmp_path / "g.txt")
    out = tmp_path / "fvr"

    # a foundation run trained on text that holds the test entries is refused (checked before it is loaded)
    (tmp_path / "leaky" / "adapter_peft").mkdir(parents=True)
    (tmp_path / "leaky" / "adapter_peft" / "adapter_config.json").write_text("{}")
    (tmp_path / "leaky" / "config.json").write_text(json.dumps({"data": {"train": glossary}}))
    common = ["--text", glossary, "--eval-n", "6", "--max-new-tokens", "3", "--seq-len", "32", "--batch", "8",
              "--student", str(tmp_path / "model"), "--keep-layers", "none", "--steps", "2"]
    assert fvr.main(common + ["--foundation", str(tmp_path / "leaky"), "--ns", "0,4", "--seeds", "0,1",
                              "--out", str(out)]) == 2

    # the foundation adapter pre-trained here on the clean text (a tiny teacher: the student itself)
    assert fvr.main(common + ["--ns", "0,4", "--seeds", "0,1", "--out", str(out), "--pretrain-steps", "2",
                              "--pretrain-seq-len", "16", "--pretrain-batch", "8", "--teacher", str(tmp_path / "model")]) == 0
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    assert [(r["init"], r["n"], r["seed"]) for r in runs] == [
        ("shared", 0, None), ("foundation, no fine-tuning", 0, None), ("foundation", 4, 0), ("random", 4, 0),
        ("foundation", 4, 1), ("random", 4, 1)]
    split = json.loads((out / "task_split.json").read_text())
    pre = open(json.loads((out / "foundation" / "config.json").read_text())["data"]["train"]).read()
    assert all(_plain(t["reference"]) not in _plain(pre) for t in split["test"])

    # the table from the runs: mean and sample std across seeds, N = 0 one shared point for both arms
    rep = res["report"]
    for arm in ("foundation", "random"):
        for k in ("nll", "rougeL_recall", "exact_match"):
            vals = [r[k] for r in runs if r["init"] == arm and r["n"] == 4]
            assert rep["arms"][arm]["4"][k]["mean"] == pytest.approx(np.mean(vals))
            assert rep["arms"][arm]["4"][k]["std"] == pytest.approx(np.std(vals, ddof=1))
            assert rep["arms"][arm]["0"][k]["mean"] == pytest.approx(runs[0][k])
    diffs = [f["nll"] - r["nll"] for f, r in zip(runs[2::2], runs[3::2])]
    assert rep["difference"]["4"]["nll"]["mean"] == pytest.approx(np.mean(diffs))
    md = (out / "results.md").read_text()
    assert f"{rep['arms']['random']['4']['nll']['mean']:.3f} ± {rep['arms']['random']['4']['nll']['std']:.3f}" in md
    assert os.path.getsize(out / "score_vs_n.png") > 1000
    # ROUGE-L recall per run = the mean over its written predictions
    preds = [json.loads(line) for line in open(out / "random_n4_seed1" / "eval" / "predictions.jsonl")]
    assert runs[5]["rougeL_recall"] == pytest.approx(np.mean([p["rougeL_recall"] for p in preds]))

    # the shared N = 0 point: the student's NLL of each reference answer, as PyTorch computes it
    from transformers import AutoTokenizer

    from fa_jax import sft

    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    model = make_hf_model("llama3")
    for rec, nll_sum, n_tok in list(zip(split["test"], runs[0]["nll_per_item"], runs[0]["tokens_per_item"]))[:3]:
        q = f"What does the hacker jargon term \"{rec['term']}\" mean?"
        ids, target = sft.encode(tok, sft.to_messages({"prompt": q, "response": rec["reference"]}, 0),
                                 chat=bool(tok.chat_template))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor(ids[None].astype(np.int64))).logits[0].double(), -1)
        want = -sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if target[t])
        assert n_tok == int(target[1:].sum())
        np.testing.assert_allclose(nll_sum, want, rtol=2e-4)
