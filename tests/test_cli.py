"""The command line: `fa-jax` and `python -m fa_jax`; user mistakes are one line and exit status 2."""
import os
import subprocess
import sys

import numpy as np

import fa_jax
from fa_jax.cli import main


def test_info_and_convert(hf_dirs, tmp_path, capsys):
    path, _ = hf_dirs["qwen2"]
    assert main(["info", path]) == 0
    config = fa_jax.load_config(path)
    assert f"parameters: {config.num_params:,}" in capsys.readouterr().out
    out = str(tmp_path / "converted")
    assert main(["convert", path, out, "--no-tokenizer"]) == 0
    _, a = fa_jax.load_model(path)
    _, b = fa_jax.load_model(out)
    toks = np.arange(6)[None]
    np.testing.assert_array_equal(np.asarray(fa_jax.forward(config, a, toks)), np.asarray(fa_jax.forward(config, b, toks)))
    assert main(["convert", path, out, "--no-tokenizer"]) == 2  # exists, no --overwrite
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err and out in err


def test_entry_points_run(tmp_path):
    bindir = os.path.dirname(sys.executable)
    for cmd in ([sys.executable, "-m", "fa_jax", "info", str(tmp_path)], [os.path.join(bindir, "fa-jax"), "info", str(tmp_path)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == f"fa-jax info: error: {tmp_path}: no config.json found (expected a Hugging Face model directory)"


def test_convert_keep_layers_loads_a_student_adapter_in_peft(hf_dirs, tmp_path, capsys):
    """`convert --keep-layers` writes the pruned student a keep_layers run trains, so the run's PEFT export loads on
    it in transformers + PEFT with fa_jax's logits."""
    import jax
    import peft
    import torch
    import transformers

    from fa_jax.models import transformer
    from helpers import hf_logits
    from test_lora import _randomize_b

    path, _ = hf_dirs["llama3"]
    out = str(tmp_path / "student")
    assert main(["convert", path, out, "--no-tokenizer", "--keep-layers", "every_other"]) == 0
    config, params = fa_jax.load_model(path)
    s_cfg, student = transformer.select_layers(config, params, "every_other")
    assert fa_jax.load_config(out).num_hidden_layers == s_cfg.num_hidden_layers < config.num_hidden_layers
    ad = _randomize_b(fa_jax.init_lora(s_cfg, jax.random.PRNGKey(0), rank=4, alpha=8))
    fa_jax.save_peft(s_cfg, ad, str(tmp_path / "adapter"), base_model_name_or_path=out)
    base = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    toks = np.random.RandomState(0).randint(0, 256, (2, 10))
    np.testing.assert_allclose(np.asarray(fa_jax.forward(s_cfg, student, toks, adapters=ad)), hf_logits(model, toks),
                               atol=1e-4, rtol=0)
    capsys.readouterr()
    assert main(["convert", path, str(tmp_path / "bad"), "--keep-layers", "0,x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--keep-layers 0,x" in err
    assert not os.path.exists(tmp_path / "bad")


def test_export_an_unfinished_run_as_adapter_and_merged(tmp_path, capsys):
    """`fa-jax export RUN`: the latest checkpoint of a run that stopped before its PEFT export, as a PEFT
    directory (equal logits) and merged into the pruned student (transformers loads it with equal logits)."""
    import jax
    import torch
    import transformers

    from fa_jax.models import transformer
    from helpers import hf_logits, save_hf_model, save_tiny_tokenizer, write_corpus

    save_hf_model("llama3", tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=30, max_words=16)
    run = tmp_path / "run"
    assert main(["pretrain", f"model.teacher={tmp_path / 'model'}", "model.keep_layers=[0]", f"data.train={corpus}",
                 "data.seq_len=16", "data.batch_size=8", "adapter.kind='dora'", "adapter.rank=4", "optim.lr=0.05",
                 "run.steps=4", "run.stop_after=2", f"run.out_dir={run}", "run.tensorboard=false",
                 "run.async_checkpoint=false", "optim.warmup_steps=0"]) == 0
    assert not (run / "adapter_peft").exists()  # stopped after 2 of 4 steps: no export yet
    assert main(["export", str(run), "--out", str(tmp_path / "peft")]) == 0
    config, params = fa_jax.load_model(str(tmp_path / "model"))
    s_cfg, student = transformer.select_layers(config, params, [0])
    ad = fa_jax.load_adapter_dir(s_cfg, str(tmp_path / "peft"))
    assert "magnitude" in ad["model"]["layers"]["0"]["self_attn"]["q_proj"]
    toks = np.random.RandomState(0).randint(3, 256, (2, 9))
    want = np.asarray(fa_jax.forward(s_cfg, student, toks, adapters=ad))
    assert np.abs(want - np.asarray(fa_jax.forward(s_cfg, student, toks))).max() > 1e-4  # trained: not the base

    assert main(["export", str(run), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert hf.config.num_hidden_layers == 1
    np.testing.assert_allclose(hf_logits(hf, toks), want, atol=1e-4, rtol=0)
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "peft")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a fa_jax run directory" in err
