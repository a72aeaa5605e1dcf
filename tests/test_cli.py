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
