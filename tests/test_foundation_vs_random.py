"""scripts/foundation_vs_random.py end to end on a tiny model (so the experiment script cannot rot), and its task
builder on a hand-written glossary."""
import json
import os
import sys

import fa_jax
from fa_jax import run_config, train
from helpers import save_hf_model, save_tiny_tokenizer, write_corpus

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import foundation_vs_random as fvr  # noqa: E402

GLOSSARY = """   :hacker: n.

   [originally, someone who makes furniture with an axe] 1. A person who enjoys exploring the details of
   programmable systems. 2. One who programs enthusiastically.

   :kluge: n.

   (also kludge) A clever programming trick intended to solve a particular nasty case, usu. in an
   expedient way. See {hack}.

   :tiny: adj.

   Small.
"""


def test_task_records_from_a_glossary(tmp_path):
    p = tmp_path / "g.txt"
    p.write_text(GLOSSARY)
    recs = fvr.jargon_records(str(p), min_words=2)
    assert [r["term"] for r in recs] == ["hacker", "kluge"]  # "Small." is below min_words
    assert recs[0]["reference"] == "A person who enjoys exploring the details of programmable systems."
    # etymology and "(also ...)" dropped; the sentence goes on past "usu."; braces of cross-references removed
    assert recs[1]["reference"] == ("A clever programming trick intended to solve a particular nasty case, usu. in an "
                                    "expedient way.")
    assert recs[0]["question"] == 'What does the hacker jargon term "hacker" mean?'


def test_script_runs_end_to_end_on_a_tiny_model(tmp_path):
    save_hf_model("llama3", tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    words = "the a of and to in is was that it for on with as by hacker program system computer".split()
    text = "".join(f"   :{w}{i}: n.\n\n   The {w} of a {words[(i + 3) % len(words)]} is the system.\n\n"
                   for i, w in enumerate(words * 2))
    (tmp_path / "g.txt").write_text(text)
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=30, max_words=16)
    cfg = run_config.merge(train.pretrain_defaults(), {
        "model": {"teacher": str(tmp_path / "model")}, "adapter": {"rank": 8}, "loss": {"chunk_size": 8},
        "data": {"train": corpus, "seq_len": 16, "batch_size": 4}, "mesh": {"shape": [1, 1, 1]},
        "run": {"steps": 2, "out_dir": str(tmp_path / "pre"), "save_every": 0, "tensorboard": False,
                "async_checkpoint": False}}, "test")
    train.pretrain(cfg)
    out = tmp_path / "fvr"
    rc = fvr.main(["--foundation", str(tmp_path / "pre"), "--text", str(tmp_path / "g.txt"), "--ns", "0,4",
                   "--steps", "1", "--batch", "8", "--eval-n", "3", "--max-new-tokens", "3", "--seq-len", "32",
                   "--student", str(tmp_path / "model"), "--keep-layers", "none", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert sorted((r["n"], r["init"]) for r in res) == [(0, "foundation"), (0, "random"), (4, "foundation"),
                                                       (4, "random")]
    assert all(0.0 <= r["rougeL_f1"] <= 1.0 and r["eval_n"] == 3 for r in res)
    assert (out / "score_vs_n.png").exists() and "| 4 |" in (out / "results.md").read_text()
