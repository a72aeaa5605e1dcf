"""fa_jax.ablation (what `bash scripts/demo.sh` runs) end to end on a tiny model: the split, every number of the table
recomputed with NumPy from predictions.json and checked against an independent evaluation, the multiple-choice items
(held-out entries only), the partial-adaptation end points, the LoRE spectrum against NumPy, the outputs; the
aggregation across seeds, keep_layers and the demo's option errors."""
import json
import math
import os
import sys

import jax
import numpy as np
import pytest

import fa_jax
from fa_jax import ablation, jargon, stats
from fa_jax.errors import FaJaxError
from fa_jax.models import transformer
from helpers import save_hf_model, save_tiny_tokenizer, write_corpus

pytestmark = pytest.mark.usefixtures("contained_datasets_cache")

# glossary terms: words of the tiny tokenizer, so every option has its own tokens
TERMS = ("hacker program system computer word text line user code data file name state world life work people day "
         "year man time way good great old right first last long little own other new men").split()


def _corpus(path):
    """Prose paragraphs and then a glossary in the Jargon File's layout (definitions of 8-15 words)."""
    prose = open(write_corpus(str(path) + ".prose", n_docs=80, max_words=40)).read()
    rng = np.random.RandomState(1)
    words = "the a of and to in is was that it for on with as by hacker program system computer".split()
    glossary = "".join(f"   :{t}: n.\n\n   {' '.join(rng.choice(words, rng.randint(8, 16)))}.\n\n" for t in TERMS)
    path.write_text(prose + "\n" + glossary)
    return str(path)


def _bootstrap(values, weights, n_resamples, seed=0, level=0.95):
    """The textbook percentile bootstrap of sum(values) / sum(weights) over resampled documents, drawn as
    fa_jax.stats draws (numpy default_rng(seed), one [n_resamples, n] array of indices for these small n)."""
    idx = np.random.default_rng(seed).integers(0, len(values), size=(n_resamples, len(values)))
    draws = values[idx].sum(1) / weights[idx].sum(1)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return values.sum() / weights.sum(), lo, hi


_forward = jax.jit(transformer.forward, static_argnums=0)


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _padded(seqs):
    """Right-padded int32 [N, W] tokens and their mask."""
    tokens = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    mask = np.zeros_like(tokens)
    for i, q in enumerate(seqs):
        tokens[i, :len(q)], mask[i, :len(q)] = q, 1
    return tokens, mask


def _doc_sums(setup, docs, seq_len, students):
    """{name: per document (nll, KL(teacher || student), agreement, tokens) sums [docs, 4]} from full logits in
    float64, for each (name, config, params, adapters) in students: every document alone as [BOS] + tokens + [EOS],
    cut every seq_len tokens (the context restarting in each piece), as the ablation promises."""
    tok = setup.tokenizer
    pieces, owner = [], []
    for d, text in enumerate(docs):
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for s in range(0, len(ids) - 1, seq_len):
            pieces.append(ids[s:s + seq_len + 1])
            owner.append(d)
    tokens, mask = _padded(pieces)
    real = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    lt = _log_softmax(_forward(setup.teacher_cfg, setup.teacher, tokens, mask=mask))[:, :-1]
    out = {}
    for name, cfg, params, adapters in students:
        ls = _log_softmax(_forward(cfg, params, tokens, adapters, mask=mask))[:, :-1]
        terms = np.stack([-np.take_along_axis(ls, tokens[:, 1:, None], -1)[..., 0],
                          (np.exp(lt) * (lt - ls)).sum(-1), lt.argmax(-1) == ls.argmax(-1), np.ones(real.shape)], -1)
        sums = np.zeros((len(docs), 4))
        np.add.at(sums, np.array(owner), (terms * real[..., None]).sum(1))
        out[name] = sums
    return out


def test_run_ablation_on_a_tiny_model(tmp_path):
    save_hf_model("llama3", tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    text = _corpus(tmp_path / "corpus.txt")
    out = tmp_path / "demo"
    R = 2000
    res = ablation.run_ablation(text, str(out), teacher=str(tmp_path / "model"), steps=3, lr=1e-2, seq_len=16,
                                batch_size=8, sweep_rows=64, min_words=5, held_out_fraction=0.1, seeds=(3,),
                                n_resamples=R, mesh_shape=(1, 1, 1), cache_k=256, merge_steps=3, merge_rows=8)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["seeds"] == json.loads(json.dumps(res["seeds"]))
    for name in ("training_curves", "ablation", "partial_adaptation", "lore_spectrum", "merge_scales"):
        assert os.path.getsize(out / f"{name}.png") > 1000
    assert (out / "results.md").read_text() == ablation.format_markdown(res)
    assert res["setting"]["student_layers"] == 1 and res["setting"]["keep_layers"] == "every_other"

    # the split is by document, after unwrapping and dropping short paragraphs
    paras = [" ".join(p.split()) for p in open(text).read().split("\n\n") if len(p.split()) >= 5]
    docs = res["setting"]["documents"]
    assert docs["train"] + docs["held_out"] == len(paras) and docs["held_out"] == round(0.1 * len(paras))
    setup = ablation.prepare(text, teacher=str(tmp_path / "model"), min_words=5, held_out_fraction=0.1,
                             mesh_shape=(1, 1, 1))
    held, train_docs = list(setup.held_out_docs["text"]), list(setup.train_docs["text"])
    assert set(train_docs).isdisjoint(held)

    # every number of the table from predictions.json, with NumPy
    preds = json.loads((out / "predictions.json").read_text())
    assert preds["held_out_documents"] == held
    (seed,), (p,) = res["seeds"], preds["seeds"]
    names = list(seed["models"])
    sums = {}
    for name in names:
        d = {k: np.asarray(v, np.float64) for k, v in p["documents"][name].items()}
        sums[name] = d
        row, n = seed["models"][name], d["tokens"].sum()
        nll = d["nll_sum"].sum() / n
        np.testing.assert_allclose([row["nll"], row["perplexity"], row["kl"], row["top1_agreement"]],
                                   [nll, math.exp(nll), d["kl_sum"].sum() / n, d["agreement_sum"].sum() / n],
                                   rtol=1e-12, err_msg=name)
        assert row["tokens"] == n and row["documents"] == len(held)
        np.testing.assert_allclose([row["nll_ci"][k] for k in ("estimate", "lo", "hi")],
                                   _bootstrap(d["nll_sum"], d["tokens"], R), rtol=1e-9, err_msg=name)
    for label, a, b in (("KD - CPT", 2, 1), ("CPT - pruned", 1, 0), ("KD - pruned", 2, 0), ("KD cache - KD", 3, 2),
                        ("KD cache - pruned", 3, 0)):
        diff = sums[names[a]]["nll_sum"] - sums[names[b]]["nll_sum"]
        est, lo, hi = _bootstrap(diff, sums[names[a]]["tokens"], R)
        got = seed["differences"][label]
        np.testing.assert_allclose([got["estimate"], got["lo"], got["hi"]], [est, lo, hi], rtol=1e-9, atol=1e-12)
        assert got["excludes_zero"] == (lo > 0 or hi < 0)

    # ... against an independent evaluation: full logits of each model on each held-out document alone
    kd = fa_jax.load_peft(setup.student_cfg, seed["runs"]["kd_peft_adapter"])
    cpt = fa_jax.load_peft(setup.student_cfg, os.path.join(seed["runs"]["cpt"], "adapter_peft"))
    kd_cache = fa_jax.load_peft(setup.student_cfg, seed["runs"]["kd_cache_peft_adapter"])
    assert names[3] == ablation.cached_name(256)
    want = _doc_sums(setup, held, 16, [(n, c, p_, a) for n, (c, p_, a) in zip(names, (
        (setup.student_cfg, setup.student, None), (setup.student_cfg, setup.student, cpt),
        (setup.student_cfg, setup.student, kd), (setup.student_cfg, setup.student, kd_cache),
        (setup.teacher_cfg, setup.teacher, None)))])
    for name in names:
        got = np.stack([sums[name][k] for k in ("nll_sum", "kl_sum", "agreement_sum", "tokens")], 1)
        np.testing.assert_allclose(got[:, [0, 3]], want[name][:, [0, 3]], rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(got[:, 1], want[name][:, 1], rtol=1e-3, atol=1e-5, err_msg=name)
        assert np.abs(got[:, 2] - want[name][:, 2]).sum() <= 1, name  # an argmax may flip on a float32 near-tie
    assert abs(seed["models"][names[0]]["kl"] - seed["models"][names[2]]["kl"]) > 1e-5  # training moved the student
    # a cache of every token (k = the vocabulary, float16 log-probabilities) trains like the live teacher
    kls = [seed["models"][names[i]]["kl"] for i in (2, 3)]
    assert abs(kls[1] - kls[0]) < 0.02 * kls[0], kls

    # the multiple-choice test: items only from held-out entries, accuracy and its interval from the predictions
    items = preds["mc_items"]
    assert res["multiple_choice"]["items"] == len(items) >= 2
    held_norm = {jargon.normalize(h) for h in held}
    train_text = "\n".join(jargon.normalize(t) for t in train_docs)
    for it in items:
        assert jargon.normalize(it["definition"]) not in train_text  # no MC definition occurs in a train document
        assert any(jargon.normalize(it["definition"]) in h for h in held_norm)
        assert len(set(it["options"])) == 4 and it["options"][it["answer"]] == it["term"]
    answer = np.array([it["answer"] for it in items])
    for name in names:
        m = p["mc"][name]
        chosen = np.argmax(np.asarray(m["logprob"]), 1)
        assert chosen.tolist() == m["chosen"]
        correct = (chosen == answer).astype(np.float64)
        ci = seed["models"][name]["mc_accuracy"]
        np.testing.assert_allclose([ci["estimate"], ci["lo"], ci["hi"]], _bootstrap(correct, np.ones_like(correct), R),
                                   rtol=1e-9, err_msg=name)
        per_token = np.argmax(np.asarray(m["logprob"]) / np.asarray(m["tokens"]), 1)
        assert seed["models"][name]["mc_accuracy_per_token"] == np.mean(per_token == answer)
    # the teacher's option log-likelihoods against full logits of prompt + option
    tok = setup.tokenizer
    seqs, spans = [], []
    for it in items:
        prompt = [tok.bos_token_id] + tok(it["prompt"], add_special_tokens=False)["input_ids"]
        for option in it["options"]:
            seqs.append(prompt + tok(option + jargon.MC_CLOSE, add_special_tokens=False)["input_ids"])
            spans.append(range(len(prompt), len(seqs[-1])))
    tokens, mask = _padded(seqs)
    lt = _log_softmax(_forward(setup.teacher_cfg, setup.teacher, tokens, mask=mask))
    want = [sum(lt[i, t - 1, tokens[i, t]] for t in span) for i, span in enumerate(spans)]
    np.testing.assert_allclose(np.ravel(p["mc"][names[-1]]["logprob"]), want, rtol=1e-4)

    # one seed: the aggregate is that seed, standard deviation 0
    agg = res["aggregate"]
    for name in names:
        for metric in ("nll", "perplexity", "kl", "top1_agreement", "mc_accuracy"):
            value = seed["models"][name][metric]
            assert agg["models"][name][metric]["mean"] == (value["estimate"] if isinstance(value, dict) else value)
            assert agg["models"][name][metric]["std"] == 0.0

    # partial adaptation (on every held-out row here): s = 0 is the pruned student, s = 1 the KD adapter (merged)
    sweep = res["partial_adaptation"]
    assert [r["scale"] for r in sweep] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert res["partial_adaptation_rows"]["tokens"] == seed["models"][names[0]]["tokens"]
    np.testing.assert_allclose(sweep[0]["kl"], seed["models"][names[0]]["kl"], rtol=1e-6)
    np.testing.assert_allclose(sweep[-1]["kl"], seed["models"][names[2]]["kl"], rtol=1e-4)

    # merging: KD 1 + CPT 0 is the s = 1 merge; the scales are learned on train documents only, one per layer
    merge = res["merging"]
    kd_alone = [r for r in merge["fixed"] if (r["kd"], r["cpt"]) == (1.0, 0.0)][0]
    np.testing.assert_allclose(kd_alone["kl"], sweep[-1]["kl"], rtol=1e-6)
    assert [len(v) for v in merge["learned"]["scales"].values()] == [1, 1]
    assert merge["learned"]["history"][0]["loss"] > 0 and merge["learned"]["probe_rows"] >= 8
    assert set(ablation.tuning_documents(setup, 32)["text"]) <= set(train_docs)
    for name in ("fixed 0.5/0.5", "learned"):
        assert 0 < merge["as_lora"][name]["params"] <= merge["as_lora"]["budget"]
    assert {"learned - fixed 0.5/0.5", "learned as one LoRA - learned"} <= set(merge["differences"])

    # LoRE spectrum: singular values of scale * A @ B per matrix, as NumPy computes them
    for path, ad in list(fa_jax.lora.iter_modules(kd))[:4]:
        dense = float(ad["scale"]) * np.asarray(ad["lora_A"], np.float64) @ np.asarray(ad["lora_B"], np.float64)
        s = np.linalg.svd(dense, compute_uv=False)[: len(res["lore"]["spectra"][path])]
        np.testing.assert_allclose(res["lore"]["spectra"][path], s, rtol=1e-3, atol=1e-6)
    assert 0 < res["lore"]["taus"]["0.5"]["share_of_lora"] <= res["lore"]["taus"]["0.9"]["share_of_lora"] <= 1

    # keep_layers reaches the student: layer 1 alone is the teacher's layer 1 (the same arrays)
    one = ablation.prepare(text, teacher=str(tmp_path / "model"), keep_layers=[1], min_words=5,
                           held_out_fraction=0.1, mesh_shape=(1, 1, 1))
    assert one.student_cfg.num_hidden_layers == 1
    assert one.student["model"]["layers"]["0"] is one.teacher["model"]["layers"]["1"]


def test_aggregate_across_seeds_and_the_markdown_table():
    """Several seeds, from made-up per-document sums: the aggregate is NumPy's mean and sample std of each seed's
    numbers, and the table shows them."""
    rng = np.random.default_rng(0)
    names = ["pruned student (1 of 2 layers)", "+ CPT adapter (alpha 0)", "+ CPT+KD adapter (alpha 0.5)", "teacher"]
    tokens = rng.integers(5, 40, 12)
    per_seed = []
    for seed in (0, 1, 2):
        docs = {n: {"nll_sum": tokens * rng.uniform(2, 6), "kl_sum": tokens * rng.uniform(0, 2),
                    "agreement_sum": np.floor(tokens * rng.uniform(0, 1)), "tokens": tokens} for n in names}
        mc = {n: {"correct": rng.integers(0, 2, 9).astype(float), "chosen_per_token": np.zeros(9, int),
                  "answer": np.zeros(9, int)} for n in names}
        rows = {n: ablation.model_row(docs[n], mc[n], n_resamples=200) for n in names}
        per_seed.append({"seed": seed, "models": rows, "differences": ablation.differences(
            docs, [("KD - CPT", names[2], names[1]), ("CPT - pruned", names[1], names[0]),
                   ("KD - pruned", names[2], names[0])], n_resamples=200),
            "kl_gap_closed": {n: 1 - rows[n]["kl"] / rows[names[0]]["kl"] for n in names[1:3]}})
    agg = ablation.aggregate(per_seed)
    for n in names:
        for metric in ("nll", "perplexity", "kl", "top1_agreement", "mc_accuracy"):
            v = [s["models"][n][metric] for s in per_seed]
            v = np.array([x["estimate"] if isinstance(x, dict) else x for x in v])
            assert agg["models"][n][metric]["mean"] == pytest.approx(v.mean(), rel=1e-12)
            assert agg["models"][n][metric]["std"] == pytest.approx(v.std(ddof=1), rel=1e-12)
    kd_cpt = np.array([s["differences"]["KD - CPT"]["estimate"] for s in per_seed])
    assert agg["differences"]["KD - CPT"]["mean"] == pytest.approx(kd_cpt.mean())
    results = {"seeds": per_seed, "aggregate": agg, "multiple_choice": {"items": 9},
               "setting": {"documents": {"held_out": 12}, "bootstrap": {"level": 0.95, "n_resamples": 200}}}
    md = ablation.format_markdown(results)
    assert "3 seeds (0, 1, 2)" in md and md.count("\n| ") == 6  # header, separator and 4 models
    assert stats.format_spread(agg["models"][names[2]]["kl"]).split(" (")[0] in md
    assert f"{-kd_cpt.mean():+.3f} ± {kd_cpt.std(ddof=1):.3f}" in md  # the CPT row: CPT - KD
    kd_cpt_2 = stats.format_interval(per_seed[2]["differences"]["KD - CPT"], signed=True)
    assert f"- seed 2: ΔNLL KD - CPT {kd_cpt_2}; " in md


def test_option_errors(tmp_path, monkeypatch, capsys):
    assert ablation.parse_keep_layers("every_other") == "every_other"
    assert ablation.parse_keep_layers("none") is None
    assert ablation.parse_keep_layers("0, 1,2") == [0, 1, 2]
    assert ablation.parse_seeds("3,1") == [3, 1] and ablation.parse_seeds(0) == [0]
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import demo

    for argv, message in ((["--seeds", "a"], "demo: seeds='a': expected distinct integers"),
                          (["--seeds", "1,1"], "demo: seeds='1,1'"),
                          (["--keep-layers", "x"], "demo: keep_layers='x': expected 'every_other', 'none' or "
                                                   "layer indices")):
        monkeypatch.setattr(sys, "argv", ["demo.py", *argv])
        with pytest.raises(SystemExit, match=message):
            demo.main()


def test_prepare_errors(tmp_path):
    with pytest.raises(FaJaxError, match="no such file"):
        ablation.prepare(str(tmp_path / "missing.txt"))
    (tmp_path / "short.txt").write_text("one line\n\ntwo words\n")
    save_hf_model("llama3", tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    with pytest.raises(FaJaxError, match="20\\+ words"):
        ablation.prepare(str(tmp_path / "short.txt"), teacher=str(tmp_path / "model"), mesh_shape=(1, 1, 1))
    with pytest.raises(FaJaxError, match="mc_items=0"):
        ablation.run_ablation(str(tmp_path / "short.txt"), str(tmp_path / "o"), mc_items=0)
