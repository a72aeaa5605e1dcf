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
