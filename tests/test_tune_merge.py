"""fa-jax tune-merge: per-layer merge scales learned by gradient descent. The objective is checked against
transformers (PyTorch) on the same rows; the learned scales against scales known by construction (the target is
base + 0.3 A + 0.7 B); the merged model and the LoRA written at the learned scales against transformers with the
per-layer deltas added by hand in NumPy."""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fa_jax
from fa_jax import lora as lora_lib
from fa_jax import treemath, tune_merge
from fa_jax.cli import main
from fa_jax.errors import FaJaxError
from fa_jax.evaluate import packed_batches
from fa_jax.tree import get_path

pytestmark = pytest.mark.usefixtures("contained_datasets_cache")

TRUE = (0.3, 0.7)


@pytest.fixture(scope="module")
def setting(teacher_corpus, tmp_path_factory):
    """Base (the shared tiny llama3 with its tokenizer), two rank-4 LoRAs as PEFT directories, and the target
    base + 0.3 A + 0.7 B as an HF directory."""
    root, corpus = teacher_corpus
    base_dir = str(root / "teacher")
    config, params = fa_jax.load_model(base_dir)
    tmp = tmp_path_factory.mktemp("tune_merge")
    trees, dirs = [], []
    for i in range(2):
        ad = lora_lib.init_lora(config, jax.random.PRNGKey(10 + i), rank=4, alpha=8.0)
        ad = jax.tree_util.tree_map_with_path(
            lambda p, x, i=i: jax.random.normal(jax.random.PRNGKey(20 + i), x.shape) * 0.3
            if jax.tree_util.keystr(p).endswith("'lora_B']") else x, ad)
        d = str(tmp / f"adapter{i}")
        fa_jax.save_peft(config, ad, d)
        trees.append(ad)
        dirs.append(d)
    target = str(tmp / "target")
    fa_jax.save_hf(config, treemath.merge(params, list(zip(trees, TRUE))), target)
    return {"base": base_dir, "config": config, "params": params, "trees": trees, "dirs": dirs, "target": target,
            "corpus": corpus, "tmp": tmp}


def _torch_model(base_dir, trees, scales):
    """transformers' base model with scale[i][layer] * delta_i added to each weight, in float64 NumPy."""
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    named = dict(m.named_modules())
    for tree, s in zip(trees, scales):
        for path, ad in lora_lib.iter_modules(tree):
            layer = int(path.split(".")[2])
            d = float(ad["scale"]) * np.asarray(ad["lora_A"], np.float64) @ np.asarray(ad["lora_B"], np.float64)
            with torch.no_grad():
                named[path].weight += torch.tensor(s[layer] * d.T, dtype=torch.float32)
    return m


def _segments(batch):
    """(row, index array of one document's positions) for every document of every row."""
    for r in range(batch["tokens"].shape[0]):
        seg = np.asarray(batch["segment_ids"][r])
        for sid in np.unique(seg[seg > 0]):
            yield r, np.flatnonzero(seg == sid)


def test_objective_equals_transformers(setting):
    """tuner.loss at per-layer scales: KL(target || merged) and the merged model's cross-entropy equal the same
    sums over every document of the rows computed with transformers, the deltas added per layer by hand."""
    tok = fa_jax.load_tokenizer(setting["base"])
    rows = [b for b, _ in zip(packed_batches(tok, setting["corpus"], 24, 4, None, None, "text", "paragraph"), range(2))]
    target = fa_jax.load_model(setting["target"])
    tuner = tune_merge.ScaleTuner(setting["config"], setting["params"], setting["trees"], rows, target=target,
                                  kl_weight=1.0, lm_weight=1.0)
    scales = np.array([[0.1, 0.9], [-0.4, 0.6]], np.float32)
    got = tuner.loss(scales)
    # the models are arguments of the compiled objective, not constants folded into it (the base alone would
    # add about 1 MB of text)
    n_params = sum(x.size for x in jax.tree.leaves(setting["params"]))
    assert len(tuner._value.lower(scales, *tuner._inputs(0)).as_text()) < n_params
    student = _torch_model(setting["base"], setting["trees"], scales)
    import transformers

    teacher = transformers.AutoModelForCausalLM.from_pretrained(setting["target"], dtype=torch.float32).eval()
    kl = ce = n = 0.0
    for b in rows:
        for r, idx in _segments(b):
            ids = torch.tensor(np.asarray(b["tokens"])[r, idx][None])
            with torch.no_grad():
                ls = torch.log_softmax(student(ids).logits[0].double(), -1).numpy()
                lt = torch.log_softmax(teacher(ids).logits[0].double(), -1).numpy()
            m = np.asarray(b["mask"])[r, idx].astype(bool)
            lab = np.asarray(b["labels"])[r, idx]
            kl += float((np.exp(lt) * (lt - ls)).sum(-1)[m].sum())
            ce += float(-ls[np.arange(len(idx)), lab][m].sum())
            n += m.sum()
    assert n > 20
    np.testing.assert_allclose(got["kl"], kl / n, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got["lm"], ce / n, rtol=2e-5)
    np.testing.assert_allclose(got["loss"], (kl + ce) / n, rtol=2e-5)


def test_learned_scales_recover_known_ones(setting):
    """The target is base + 0.3 A + 0.7 B: from 0.5 / 0.5, the learned scale of every layer comes back to 0.3 and
    0.7 and the KL to ~0. The merged model written at the learned scales (out/merged) equals transformers with
    the deltas added per layer; `fa-jax merge --scales out --as-lora` gives a PEFT LoRA that PEFT runs to the
    same logits."""
    from peft import PeftModel
    import transformers

    out = str(setting["tmp"] / "tuned")
    a, b = setting["dirs"]
    assert main(["tune-merge", "--base", setting["base"], "--adapter", a, "--adapter", b, "--probe",
                 setting["corpus"], "--target", setting["target"], "--steps", "150", "--lr", "0.05", "--seq-len", "32",
                 "--batch-size", "8", "--max-rows", "8", "--out", out]) == 0
    res = json.load(open(os.path.join(out, "scales.json")))
    learned = np.array([ad["layers"] for ad in res["adapters"]])
    np.testing.assert_allclose(learned, np.array([[TRUE[0]] * 2, [TRUE[1]] * 2]), atol=0.02)
    assert res["before"]["kl"] > 100 * res["after"]["kl"]
    assert res["history"][0]["loss"] > res["history"][-1]["loss"]
    assert os.path.getsize(os.path.join(out, "scales.png")) > 1000

    tokens = np.random.default_rng(0).integers(4, 256, (2, 11))
    want = _torch_model(setting["base"], setting["trees"], learned)(torch.tensor(tokens)).logits.detach().numpy()
    merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(tokens)).logits.numpy(), want, rtol=1e-4, atol=1e-4)

    lora_dir = str(setting["tmp"] / "as_lora")
    assert main(["merge", "--base", setting["base"], "--scales", out, "--as-lora", "--rank", "8", "--out",
                 lora_dir]) == 0
    base_model = transformers.AutoModelForCausalLM.from_pretrained(setting["base"]).eval()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), lora_dir).eval()
    with torch.no_grad():
        np.testing.assert_allclose(peft_model(torch.tensor(tokens)).logits.numpy(), want, rtol=1e-4, atol=1e-4)


def test_per_layer_scales_in_treemath(setting):
    """treemath.merge and treemath.combine with {"layers": [...]} scales equal NumPy's per-layer sums."""
    params, trees = setting["params"], setting["trees"]
    scales = [{"layers": [0.2, -1.0], "other": 3.0}, {"layers": [0.5, 0.25]}]
    merged = treemath.merge(params, list(zip(trees, scales)))
    combined, _ = treemath.combine(list(zip(trees, scales)), rank=8)
    for path, _ in lora_lib.iter_modules(trees[0]):
        layer = int(path.split(".")[2])
        want = np.asarray(get_path(params, f"{path}.kernel"), np.float64)
        for tree, s in zip(trees, scales):
            ad = get_path(tree, path)
            want = want + s["layers"][layer] * float(ad["scale"]) * np.asarray(ad["lora_A"], np.float64) @ \
                np.asarray(ad["lora_B"], np.float64)
        np.testing.assert_allclose(np.asarray(get_path(merged, f"{path}.kernel")), want, atol=1e-5)
        c = get_path(combined, path)
        got = np.asarray(get_path(params, f"{path}.kernel"), np.float64) + float(c["scale"]) * \
            np.asarray(c["lora_A"], np.float64) @ np.asarray(c["lora_B"], np.float64)
        np.testing.assert_allclose(got, want, atol=1e-5)
    back = treemath.unmerge(merged, list(zip(trees, scales)))
    np.testing.assert_allclose(np.asarray(back["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"]),
                               np.asarray(params["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"]), atol=1e-5)


def test_errors(setting, capsys):
    base, (a, b) = setting["base"], setting["dirs"]
    for bad, msg in (({"layers": []}, "expected a number or"), ("0.5", "expected a number or"),
                     (float("nan"), "not finite"), ({"layers": [1.0], "other": 2.0, "x": 1}, "expected a number")):
        with pytest.raises(FaJaxError, match=msg):
            treemath.check_scale(bad)
    with pytest.raises(FaJaxError, match="layer 1, but the per-layer scale has 1 layers"):
        treemath.merge(setting["params"], [(setting["trees"][0], {"layers": [0.5]})])
    tok = fa_jax.load_tokenizer(base)
    rows = [next(iter(packed_batches(tok, setting["corpus"], 16, 2, None, None, "text", "paragraph")))]
    with pytest.raises(FaJaxError, match="kl_weight and lm_weight are both 0"):
        tune_merge.ScaleTuner(setting["config"], setting["params"], setting["trees"], rows,
                              target=fa_jax.load_model(setting["target"]), kl_weight=0.0, lm_weight=0.0)
    with pytest.raises(FaJaxError, match=r"scales of shape \[2\]; expected \[2, 2\]"):
        tune_merge.ScaleTuner(setting["config"], setting["params"], setting["trees"], rows).loss([0.5, 0.5])
    out = str(setting["tmp"] / "err")
    cases = [
        (["tune-merge", "--base", base, "--adapter", a, "--probe", "/nonexistent.txt", "--out", out],
         "--probe /nonexistent.txt: no such file"),
        (["tune-merge", "--base", base, "--adapter", a, "--probe", setting["corpus"], "--lm-weight", "0", "--out",
          out], "nothing to minimize"),
        (["tune-merge", "--base", base, "--adapter", a, "--probe", setting["corpus"], "--rank", "4", "--out", out],
         "apply with --as-lora"),
        (["merge", "--base", base, "--adapter", a, "--scales", out, "--out", out], "instead of --adapter"),
        (["merge", "--base", base, "--scales", setting["corpus"], "--out", out], "not a tune-merge scales.json"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out)
