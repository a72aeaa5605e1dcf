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


def _sizes(path, keep=lambda name: True):
    """{tensor name: element count} of a safetensors file, from its header (NumPy, independent of fa_jax)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return {n: int(np.prod(f.get_slice(n).get_shape())) for n in f.keys() if keep(n)}


def test_truncate_writes_a_lore_that_peft_loads(pair, tmp_path, capsys):
    import json

    delta = tmp_path / "delta"
    main(["diff", "--base", str(pair / "base"), "--tuned", str(pair / "tuned"), "--out", str(delta)])
    out = tmp_path / "lore"
    assert main(["truncate", "--delta", str(delta), "--tau", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LoRE parameters:" in printed and "model.layers.0.self_attn.q_proj" in printed
    assert "share_of_model" in printed and "share_of_linear" in printed
    for png in ("explained_variance.png", "param_share_vs_tau.png"):
        assert open(out / png, "rb").read(4) == b"\x89PNG"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # written under a temporary name, renamed
    config, params = fa_jax.load_model(str(pair / "base"))
    _, tuned = fa_jax.load_model(str(pair / "tuned"))
    with pytest.warns(UserWarning, match="non-matrix tensor"):  # embeddings, head, norms: not a LoRA tree's
        lore = fa_jax.load_peft(config, str(out))
    # the same ranks as the in-memory tree math
    _, report = treemath.truncate(treemath.difference(tuned, params), tau=0.5)
    got = {p: m["lora_A"].shape[1] for p, m in fa_jax.lora.iter_modules(lore)}
    assert got == {p: m["rank"] for p, m in report["modules"].items()}
    assert len(set(got.values())) >= 1 and max(got.values()) < 16
    # the shares, against a count from the safetensors headers: the whole model's (RE-Adapt's) and the linear layers'
    model_n = _sizes(pair / "base" / "model.safetensors")
    linear_n = sum(v for n, v in model_n.items() if n.endswith("_proj.weight"))
    lora_n = sum(_sizes(out / "adapter_model.safetensors", lambda n: ".lora_" in n).values())
    kept_n = sum(_sizes(out / "adapter_model.safetensors", lambda n: ".lora_" not in n).values())
    assert kept_n == sum(model_n.values()) - linear_n  # every non-matrix tensor changed, so every one is kept
    written = json.load(open(out / "lore_report.json"))
    for rep in (written, report):
        assert rep["share_of_model"] == pytest.approx((lora_n + kept_n) / sum(model_n.values()), rel=1e-12)
        assert rep["share_of_linear"] == pytest.approx(lora_n / linear_n, rel=1e-12)
    assert f"{100 * written['share_of_model']:.2f}% of the model's {sum(model_n.values()):,}" in printed
    # PEFT (LoRA + modules_to_save) gives the logits of fa-jax merge's model
    assert main(["merge", "--base", str(pair / "base"), "--adapter", str(out), "--out", str(tmp_path / "m")]) == 0
    _, merged = fa_jax.load_model(str(tmp_path / "m"))
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(pair / "base"), dtype=torch.float32), str(out)).eval()
    toks = np.random.RandomState(0).randint(0, 256, (2, 9))
    np.testing.assert_allclose(np.asarray(fa_jax.forward(config, merged, toks)), hf_logits(model, toks),
                               atol=1e-4, rtol=0)


def test_lore_keeps_every_delta(tmp_path, capsys):
    """diff -> truncate at tau 1 -> merge gives the tuned model back in every tensor: embeddings, head, norms and
    (Qwen2) attention biases too; at scale 0.5 each is base + 0.5 * delta. Without the base the non-matrix deltas
    go to the side file instead, and merge applies them the same way."""
    import json
    import shutil

    base = make_hf_model("qwen2", seed=1)
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(8)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    base.save_pretrained(str(tmp_path / "tuned"))
    b, t = CheckpointReader(str(tmp_path / "base")), CheckpointReader(str(tmp_path / "tuned"))
    assert main(["diff", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"),
                 "--out", str(tmp_path / "delta")]) == 0
    assert main(["truncate", "--delta", str(tmp_path / "delta"), "--tau", "1", "--out", str(tmp_path / "lore")]) == 0
    cfg = json.load(open(tmp_path / "lore" / "adapter_config.json"))
    assert {"model.embed_tokens", "lm_head", "model.norm", "model.layers.1.post_attention_layernorm"} <= \
        set(cfg["modules_to_save"])
    biases = sorted(n for n in b.names() if n.endswith(".bias"))
    assert len(biases) == 6 and sorted(_sizes(tmp_path / "lore" / "lore_extra.safetensors")) == biases

    no_base = tmp_path / "delta_no_base"  # the base moved away: everything non-matrix goes to the side file
    shutil.copytree(tmp_path / "delta", no_base)
    (no_base / "readapt.json").write_text(json.dumps({"kind": "re-adapter", "base": str(tmp_path / "gone")}))
    capsys.readouterr()
    assert main(["truncate", "--delta", str(no_base), "--tau", "1", "--out", str(tmp_path / "lore2")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not there" in err and "lore_extra.safetensors" in err
    assert json.load(open(tmp_path / "lore2" / "adapter_config.json"))["modules_to_save"] is None
    assert len(_sizes(tmp_path / "lore2" / "lore_extra.safetensors")) == len(b.names()) - 14

    for lore in ("lore", "lore2"):
        for scale in (1.0, 0.5):
            out = tmp_path / f"m_{lore}_{scale}"
            assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", f"{tmp_path / lore}:{scale}",
                         "--out", str(out)]) == 0
            m = CheckpointReader(str(out))
            assert set(m.names()) == set(b.names())
            for n in b.names():
                want = b.get(n) + scale * (t.get(n) - b.get(n))
                np.testing.assert_allclose(m.get(n), want, rtol=1e-6, atol=2e-6, err_msg=f"{lore} {scale} {n}")


def test_lore_of_a_tied_model(tmp_path):
    """Tied embeddings (Llama-3.2 style): the embedding delta is saved for PEFT with ensure_weight_tying, so at
    tau 1 PEFT gives the tuned model's logits, and merge the tuned model's tensors."""
    import json

    base = make_hf_model("llama3", seed=2)
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(9)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    base.save_pretrained(str(tmp_path / "tuned"))
    main(["diff", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--out", str(tmp_path / "d")])
    assert main(["truncate", "--delta", str(tmp_path / "d"), "--tau", "1", "--out", str(tmp_path / "lore")]) == 0
    cfg = json.load(open(tmp_path / "lore" / "adapter_config.json"))
    assert cfg["ensure_weight_tying"] and "model.embed_tokens" in cfg["modules_to_save"]
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "lore"),
                 "--out", str(tmp_path / "m")]) == 0
    m, t = CheckpointReader(str(tmp_path / "m")), CheckpointReader(str(tmp_path / "tuned"))
    assert set(m.names()) == set(t.names())
    for n in t.names():
        np.testing.assert_allclose(m.get(n), t.get(n), rtol=1e-6, atol=2e-6, err_msg=n)
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "base"), dtype=torch.float32), str(tmp_path / "lore")).eval()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "tuned"), dtype=torch.float32).eval()
    toks = np.random.RandomState(2).randint(0, 256, (2, 7))
    np.testing.assert_allclose(hf_logits(model, toks), hf_logits(tuned, toks), atol=1e-5, rtol=0)


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
    wrong = tmp_path / "wrong_base"  # an RE-Adapter whose readapt.json names a base of another architecture
    main(["diff", "--base", str(pair / "base"), "--tuned", str(pair / "tuned"), "--out", str(wrong)])
    (wrong / "readapt.json").write_text(f'{{"kind": "re-adapter", "base": "{other}"}}')
    capsys.readouterr()
    cases = [
        (["truncate", "--delta", str(wrong), "--tau", "0.5", "--out", str(tmp_path / "x")],
         "has a different architecture than the delta"),
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


def test_merge_takes_the_instruct_tokenizer(pair, tmp_path, capsys):
    """--tokenizer DIR copies DIR's tokenizer files (chat template, generation config) into the merged model;
    without it a base lacking a chat template gets a one-line note naming the instruct model; a DIR without
    tokenizer files is a one-line error and nothing is written."""
    import json

    from fa_jax import readapt
    from helpers import save_tiny_tokenizer

    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    inst = tmp_path / "instruct"
    tok = save_tiny_tokenizer(inst)
    tok.chat_template = template
    tok.save_pretrained(str(inst))
    (inst / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    delta = tmp_path / "delta"
    assert main(["diff", "--base", str(pair / "base"), "--tuned", str(pair / "tuned"), "--out", str(delta)]) == 0
    capsys.readouterr()
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(pair / "base"), "--adapter", f"{delta}:0.5", "--tokenizer", str(inst),
                 "--out", str(out)]) == 0
    assert "note:" not in capsys.readouterr().err
    assert fa_jax.load_tokenizer(str(out)).chat_template == template
    copied = [n for n in readapt.TOKENIZER_FILES if (inst / n).exists()]
    assert "tokenizer.json" in copied and "generation_config.json" in copied
    assert all((out / n).read_bytes() == (inst / n).read_bytes() for n in copied)
    assert readapt.has_chat_template(str(out)) and not readapt.has_chat_template(str(pair / "base"))

    assert main(["merge", "--base", str(pair / "base"), "--adapter", f"{delta}:0.5", "--out",
                 str(tmp_path / "plain")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "note: the base's tokenizer has no chat template" in err
    assert f"--tokenizer {pair / 'tuned'}" in err  # the instruct model the RE-Adapter came from
    assert not (tmp_path / "plain" / "tokenizer.json").exists()

    for bad, match in ((pair / "base", "no tokenizer files"), (tmp_path / "nope", "no such directory")):
        before = sorted(os.listdir(tmp_path))
        assert main(["merge", "--base", str(pair / "base"), "--adapter", f"{delta}:0.5", "--tokenizer", str(bad),
                     "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert f"--tokenizer {bad}: {match}" in err and err.count("\n") == 1, err
        assert sorted(os.listdir(tmp_path)) == before
