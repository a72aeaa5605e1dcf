"""Two JAX processes on 127.0.0.1 with 4 CPU devices each train exactly like one process with 8 devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from fa_jax import run_config, train
from test_train import _cfg, _losses, setup  # noqa: F401  (the module fixture)

HERE = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(setup, tmp_path):
    root, corpus = setup
    over = {"run.steps": 3, "run.save_every": 2, "mesh.shape": [2, 4, 1]}
    train.pretrain(_cfg(root, corpus, tmp_path / "one", **over))
    cfg = _cfg(root, corpus, tmp_path / "two", **over)
    cfg_path = tmp_path / "cfg.json"
    run_config.dump(cfg, str(cfg_path))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_pretrain.py"), str(i), str(port),
                               str(cfg_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        finally:
            p.kill()
        outs.append(out)
        assert p.returncode == 0, out[-3000:]
    assert all(f"DONE {i} 3 1" in o for i, o in enumerate(outs)), outs
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in two] == [1, 2, 3]
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=1e-5)
    # each process saved its own data position
    states = sorted(os.listdir(tmp_path / "two" / "checkpoints" / "data_state"))
    assert "step_3.process_0.json" in states and "step_3.process_1.json" in states
    assert json.load(open(tmp_path / "two" / "checkpoints" / "data_state" / "step_3.process_1.json"))["rows"]
