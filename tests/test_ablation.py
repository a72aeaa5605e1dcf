"""fa_jax.ablation (what `bash scripts/demo.sh` runs) end to end on a tiny model: the split, the table's numbers
against independent evaluations, the partial-adaptation end points, the LoRE spectrum against NumPy, the outputs."""
import json
import os

import jax
import numpy as np
import pytest

import fa_jax
from fa_jax import ablation, evaluate
from fa_jax.errors import FaJaxError
from fa_jax.models import transformer
from helpers import save_hf_model, save_tiny_tokenizer, write_corpus

pytestmark = pytest.mark.usefixtures("contained_datasets_cache")


def test_run_ablation_on_a_tiny_model(tmp_path):
    save_hf_model("llama3", tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    text = write_corpus(tmp_path / "corpus.txt", n_docs=120, max_words=40)
    out = tmp_path / "demo"
    res = ablation.run_ablation(text, str(out), teacher=str(tmp_path / "model"), steps=3, lr=1e-2, seq_len=16,
                                batch_size=8, eval_rows=64, min_words=5, held_out_fraction=0.1,
                                mesh_shape=(1, 1, 1))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["models"] == json.loads(json.dumps(res["models"]))
    for name in ("training_curves", "ablation", "partial_adaptation", "lore_spectrum"):
        assert os.path.getsize(out / f"{name}.png") > 1000

    # the split is by document, after unwrapping and dropping short paragraphs
    paras = [" ".join(p.split()) for p in open(text).read().split("\n\n") if len(p.split()) >= 5]
    docs = res["setting"]["documents"]
    assert docs["train"] + docs["held_out"] == len(paras) and docs["held_out"] == round(0.1 * len(paras))

    # every row of the table against an independent evaluation of the same model on the same held-out rows
    setup = ablation.prepare(text, teacher=str(tmp_path / "model"), min_words=5, held_out_fraction=0.1,
                             mesh_shape=(1, 1, 1))
    assert set(setup.train_docs["text"]).isdisjoint(setup.held_out_docs["text"])
    assert res["setting"]["held_out_rows"] < 64  # eval_rows covered the whole held-out set: compare on all of it
    held = list(setup.held_out_docs["text"])
    names = list(res["models"])
    kd = fa_jax.load_peft(setup.student_cfg, res["runs"]["kd_peft_adapter"])
    cpt = fa_jax.load_peft(setup.student_cfg, os.path.join(res["runs"]["cpt"], "adapter_peft"))
    for name, adapters in zip(names[:3], (None, cpt, kd)):
        want = evaluate.teacher_agreement(setup.teacher_cfg, setup.teacher, setup.student_cfg, setup.student,
                                          setup.tokenizer, held, adapters=adapters, seq_len=16, batch_size=8)
        got = res["models"][name]
        np.testing.assert_allclose([got["kl"], got["top1_agreement"], got["perplexity"]],
                                   [want["kl"], want["top1_agreement"], want["perplexity"]], rtol=1e-5, err_msg=name)
    teacher_ppl = evaluate.perplexity(setup.teacher_cfg, setup.teacher, setup.tokenizer, held, seq_len=16,
                                      batch_size=8)["perplexity"]
    np.testing.assert_allclose(res["models"][names[3]]["perplexity"], teacher_ppl, rtol=1e-5)
    assert abs(res["models"][names[0]]["kl"] - res["models"][names[2]]["kl"]) > 1e-5  # training moved the student

    # partial adaptation: s = 0 is the pruned student, s = 1 the KD adapter (merged instead of applied)
    sweep = res["partial_adaptation"]
    assert [r["scale"] for r in sweep] == [0.0, 0.25, 0.5, 0.75, 1.0]
    np.testing.assert_allclose(sweep[0]["kl"], res["models"][names[0]]["kl"], rtol=1e-6)
    np.testing.assert_allclose(sweep[-1]["kl"], res["models"][names[2]]["kl"], rtol=1e-4)

    # LoRE spectrum: singular values of scale * A @ B per matrix, as NumPy computes them
    for path, ad in list(fa_jax.lora.iter_modules(kd))[:4]:
        dense = float(ad["scale"]) * np.asarray(ad["lora_A"], np.float64) @ np.asarray(ad["lora_B"], np.float64)
        s = np.linalg.svd(dense, compute_uv=False)[: len(res["lore"]["spectra"][path])]
        np.testing.assert_allclose(res["lore"]["spectra"][path], s, rtol=1e-3, atol=1e-6)
    assert 0 < res["lore"]["taus"]["0.5"]["share_of_lora"] <= res["lore"]["taus"]["0.9"]["share_of_lora"] <= 1


def test_prepare_errors(tmp_path):
    with pytest.raises(FaJaxError, match="no such file"):
        ablation.prepare(str(tmp_path / "missing.txt"))
    (tmp_path / "short.txt").write_text("one line\n\ntwo words\n")
    save_hf_model("llama3", tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    with pytest.raises(FaJaxError, match="20\\+ words"):
        ablation.prepare(str(tmp_path / "short.txt"), teacher=str(tmp_path / "model"), mesh_shape=(1, 1, 1))
