"""`fa-jax diff | truncate | merge` on tiny checkpoints, checked against NumPy, PEFT and transformers."""
import os

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import fa_jax
from fa_jax import treemath
from fa_jax.cli import main
from fa_jax.io.hf import CheckpointReader
from fa_jax.tree import flatten
from helpers import hf_logits, make_hf_model
from test_lora import _randomize_b


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("readapt")
    base = make_hf_model("llama", seed=0)
    base.save_pretrained(str(root / "base"))
    torch.manual_seed(7)
    with torch.no_grad():  # "instruction tuning": a low-rank-ish change of every matrix, noise on the rest
        for name, p in base.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.add_(0.02 * torch.randn(p.shape[0], 3) @ torch.randn(3, p.shape[1]) + 1e-3 * torch.randn_like(p))
            else:
                p.add_(0.01 * torch.randn_like(p))
    base.save_pretrained(str(root / "tuned"))
    return root


def test_diff_is_exact(pair, tmp_path):
    out = tmp_path / "delta"
    assert main(["diff", "--base", str(pair / "base"), "--tuned", str(pair / "tuned"), "--out", str(out)]) == 0
    d, b, t = CheckpointReader(str(out)), CheckpointReader(str(pair / "base")), CheckpointReader(str(pair / "tuned"))
    assert set(d.names()) == set(b.names())
    for n in b.names():
        np.testing.assert_array_equal(d.get(n), t.get(n) - b.get(n))


def test_truncate_writes_a_lore_that_peft_loads(pair, tmp_path, capsys):
    delta = tmp_path / "delta"
    main(["diff", "--base", str(pair / "base"), "--tuned", str(pair / "tuned"), "--out", str(delta)])
    out = tmp_path / "lore"
    assert main(["truncate", "--delta", str(delta), "--tau", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LoRE parameters:" in printed and "model.layers.0.self_attn.q_proj" in printed
    for png in ("explained_variance.png", "param_share_vs_tau.png"):
        assert open(out / png, "rb").read(4) == b"\x89PNG"
    config, params = fa_jax.load_model(str(pair / "base"))
    _, tuned = fa_jax.load_model(str(pair / "tuned"))
    lore = fa_jax.load_peft(config, str(out))
    # the same ranks as the in-memory tree math
    _, report = treemath.truncate(treemath.difference(tuned, params, linear_only=True), tau=0.5)
    got = {p: m["lora_A"].shape[1] for p, m in fa_jax.lora.iter_modules(lore)}
    assert got == {p: m["rank"] for p, m in report["modules"].items()}
    assert len(set(got.values())) >= 1 and max(got.values()) < 16
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(pair / "base"), dtype=torch.float32), str(out)).eval()
    toks = np.random.RandomState(0).randint(0, 256, (2, 9))
    np.testing.assert_allclose(np.asarray(fa_jax.forward(config, params, toks, adapters=lore)), hf_logits(model, toks),
                               atol=1e-4, rtol=0)


def test_merge_partial_adaptation(pair, tmp_path):
    delta = tmp_path / "delta"
    main(["diff", "--base", str(pair / "base"), "--tuned", str(pair / "tuned"), "--out", str(delta)])
    config, params = fa_jax.load_model(str(pair / "base"))
    knowledge = _randomize_b(fa_jax.init_lora(config, jax.random.PRNGKey(3), rank=4, alpha=8))
    fa_jax.save_peft(config, knowledge, str(tmp_path / "knowledge"))
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(pair / "base"), "--adapter", f"{tmp_path / 'knowledge'}:0.5",
                 "--adapter", f"{delta}:0.5", "--out", str(out)]) == 0
    _, merged = fa_jax.load_model(str(out))
    _, tuned = fa_jax.load_model(str(pair / "tuned"))
    k = flatten(treemath.to_dense(knowledge))
    for p, b in flatten(params).items():
        want = np.asarray(b) + 0.5 * (np.asarray(flatten(tuned)[p]) - np.asarray(b))
        if p in k:
            want = want + 0.5 * np.asarray(k[p])
        np.testing.assert_allclose(np.asarray(flatten(merged)[p]), want, atol=1e-6, err_msg=p)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    toks = np.random.RandomState(1).randint(0, 256, (1, 11))
    np.testing.assert_allclose(hf_logits(model, toks), np.asarray(fa_jax.forward(config, merged, toks)), atol=1e-4)
    # a = 0, b = 1: the tuned model again
    main(["merge", "--base", str(pair / "base"), "--adapter", str(delta), "--out", str(tmp_path / "again")])
    _, again = fa_jax.load_model(str(tmp_path / "again"))
    for p, t in flatten(tuned).items():
        np.testing.assert_allclose(np.asarray(flatten(again)[p]), np.asarray(t), atol=1e-7, rtol=0)


def test_bad_input_writes_nothing(pair, tmp_path, capsys):
    other = tmp_path / "other"
    make_hf_model("qwen2").save_pretrained(str(other))
    capsys.readouterr()
    cases = [
        (["diff", "--base", str(pair / "base"), "--tuned", str(other), "--out", str(tmp_path / "x")],
         "different architectures"),
        (["diff", "--base", str(tmp_path / "nope"), "--tuned", str(pair / "tuned"), "--out", str(tmp_path / "x")],
         "no such directory"),
        (["truncate", "--delta", str(pair / "base"), "--tau", "1.5", "--out", str(tmp_path / "x")],
         r"--tau 1.5 is outside \(0, 1\]"),
        (["truncate", "--delta", str(pair / "base"), "--rank", "0", "--out", str(tmp_path / "x")],
         "--rank 0 is below 1"),
        (["merge", "--base", str(pair / "base"), "--adapter", str(other), "--out", str(tmp_path / "x")],
         "different architecture"),
        (["diff", "--base", str(pair / "base"), "--tuned", str(pair / "tuned"), "--out", str(pair / "tuned")],
         "already exists"),
    ]
    import re
    for argv, match in cases:
        before = sorted(os.listdir(tmp_path))
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(match, err) and err.count("\n") == 1, err
        assert sorted(os.listdir(tmp_path)) == before


def test_row_blocks_give_the_same_files(pair, tmp_path, monkeypatch):
    """Large tensors are streamed in row blocks; tiny blocks here must give byte-identical outputs."""
    from fa_jax import readapt

    config, _ = fa_jax.load_model(str(pair / "base"))
    fa_jax.save_peft(config, _randomize_b(fa_jax.init_lora(config, jax.random.PRNGKey(3), rank=4, alpha=8)),
                     str(tmp_path / "k"))
    outs = {}
    for name, block in (("whole", readapt.BLOCK_BYTES), ("blocks", 600)):
        monkeypatch.setattr(readapt, "BLOCK_BYTES", block)
        readapt.diff(str(pair / "base"), str(pair / "tuned"), str(tmp_path / f"d_{name}"))
        readapt.merge(str(pair / "base"), [(str(tmp_path / "k"), 0.5), (str(tmp_path / f"d_{name}"), 0.5)],
                      str(tmp_path / f"m_{name}"))
        outs[name] = (open(tmp_path / f"d_{name}" / "model.safetensors", "rb").read(),
                      CheckpointReader(str(tmp_path / f"m_{name}")))
    assert readapt._row_blocks((64, 128))[:2] == [(0, 1), (1, 2)]
    assert outs["whole"][0] == outs["blocks"][0]  # the difference is exact either way
    whole, blocks = outs["whole"][1], outs["blocks"][1]  # BLAS may round a column block's matmul differently
    for n in whole.names():
        np.testing.assert_allclose(blocks.get(n), whole.get(n), rtol=0, atol=1e-7)


def test_merge_from_a_run_checkpoint(tmp_path):
    """An unfinished pre-training run (orbax checkpoint, no PEFT export yet) merges by its latest checkpoint."""
    from fa_jax import run_config, train
    from helpers import save_hf_model, save_tiny_tokenizer, write_corpus

    save_hf_model("llama", tmp_path / "base")
    save_tiny_tokenizer(tmp_path / "base")
    corpus = write_corpus(tmp_path / "c.txt", n_docs=40, max_words=20)
    cfg = run_config.merge(train.pretrain_defaults(), {
        "model": {"teacher": str(tmp_path / "base")}, "adapter": {"rank": 4, "alpha": 8.0},
        "data": {"train": corpus, "seq_len": 16, "batch_size": 8}, "optim": {"lr": 1e-2, "warmup_steps": 0},
        "mesh": {"shape": [1, 1, 1]},
        "run": {"steps": 5, "stop_after": 2, "out_dir": str(tmp_path / "run"), "async_checkpoint": False}}, "test")
    summary = train.pretrain(cfg)
    assert "peft_adapter" not in summary
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "run"),
                 "--out", str(tmp_path / "merged")]) == 0
    config, params = fa_jax.load_model(str(tmp_path / "base"))
    _, merged = fa_jax.load_model(str(tmp_path / "merged"))
    want = fa_jax.merge_lora(params, jax.device_get(summary["adapters"]))
    q = "model.layers.0.self_attn.q_proj.kernel"
    assert np.abs(np.asarray(flatten(want)[q]) - np.asarray(flatten(params)[q])).max() > 1e-4  # it trained
    for p, w in flatten(want).items():
        np.testing.assert_allclose(np.asarray(flatten(merged)[p]), np.asarray(w), atol=1e-6, err_msg=p)
