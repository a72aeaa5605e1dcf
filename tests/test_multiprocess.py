"""Two JAX processes on 127.0.0.1 with 4 CPU devices each train exactly like one process with 8 devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from fa_jax import run_config, train
from fa_jax import teacher_cache as tc
from fa_jax.io.load import load_model_config
from test_train import _cfg, _losses

HERE = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outputs(procs, timeout=300) -> list[str]:
    """The output of each process, once it exited successfully (killed after `timeout` seconds)."""
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        finally:
            p.kill()
        assert p.returncode == 0, out[-3000:]
        outs.append(out)
    return outs


def test_two_processes_equal_one(teacher_corpus, tmp_path):
    """Two processes train like one; then they write a teacher cache (each its own rows, k = vocabulary) and train
    from it like the live teacher; one process with 8 devices reads their cache as well."""
    root, corpus = teacher_corpus
    vocab = load_model_config(str(root / "teacher")).vocab_size
    over = {"run.steps": 3, "run.save_every": 2, "mesh.shape": [2, 4, 1], "teacher.top_k": vocab,
            "teacher.cache_dtype": "float32"}
    train.pretrain(_cfg(root, corpus, tmp_path / "one", **over))
    cfg = _cfg(root, corpus, tmp_path / "two", **over)
    cfg_path, cached_path, cache = tmp_path / "cfg.json", tmp_path / "cached.json", str(tmp_path / "cache")
    run_config.dump(cfg, str(cfg_path))
    run_config.dump(_cfg(root, corpus, tmp_path / "two_cached", **over, **{"teacher.cache": cache}), str(cached_path))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_pretrain.py"), str(i), str(port),
                               str(cfg_path), cache, str(cached_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    outs = _outputs(procs)
    assert all(f"DONE {i} 3 1" in o and f"CACHED {i} 3" in o for i, o in enumerate(outs)), outs
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in two] == [1, 2, 3]
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=1e-5)
    assert sorted(os.listdir(cache)) == ["cache.json", "rows-000000-000004", "rows-000004-000008"]
    np.testing.assert_allclose([l for _, l in _losses(tmp_path / "two_cached")], [l for _, l in one], rtol=2e-5)
    # another process count reads across the writers' row ranges: rows 2..5 of the step are theirs, joined
    reader = tc.Cache(cache)
    whole = {k: np.concatenate([reader.read(2, 0, 4)[k], reader.read(2, 4, 8)[k]]) for k in ("ids", "tokens")}
    for k, v in reader.read(2, 2, 6).items():
        if k in whole:
            np.testing.assert_array_equal(v, whole[k][2:6])
    # each process saved its own data position
    states = sorted(os.listdir(tmp_path / "two" / "checkpoints" / "data_state"))
    assert "step_3.process_0.json" in states and "step_3.process_1.json" in states
    assert json.load(open(tmp_path / "two" / "checkpoints" / "data_state" / "step_3.process_1.json"))["rows"]


@pytest.mark.slow  # the same two-process equality through the CLI (the default suite runs test_two_processes_equal_one)
def test_two_processes_from_the_command_line(teacher_corpus, tmp_path):
    """`fa-jax pretrain --distributed` in two processes (FA_JAX_* variables, 127.0.0.1) trains like one process."""
    root, corpus = teacher_corpus
    over = {"run.steps": 2, "run.save_every": 0, "mesh.shape": [2, 4, 1]}
    train.pretrain(_cfg(root, corpus, tmp_path / "one", **over))
    cfg = _cfg(root, corpus, tmp_path / "two", **over)
    conf = tmp_path / "conf.py"
    conf.write_text(f"import json\n\n\ndef get_config():\n    return json.loads({json.dumps(cfg)!r})\n")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", FA_JAX_COORDINATOR=f"127.0.0.1:{port}",
               FA_JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, "-m", "fa_jax", "pretrain", "--distributed", "--config", str(conf)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "FA_JAX_PROCESS_ID": str(i)}) for i in range(2)]
    assert all("step 2/2" in out for out in _outputs(procs))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=1e-5)


def test_distributed_env_must_be_complete(monkeypatch):
    import pytest

    from fa_jax import distributed
    from fa_jax.errors import FaJaxError

    monkeypatch.setenv("FA_JAX_COORDINATOR", "127.0.0.1:1")
    monkeypatch.delenv("FA_JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("FA_JAX_PROCESS_ID", raising=False)
    with pytest.raises(FaJaxError, match="FA_JAX_COORDINATOR set but FA_JAX_NUM_PROCESSES, FA_JAX_PROCESS_ID not"):
        distributed.initialize()


def test_tpu_pod_launcher_runs_the_command_on_every_worker(tmp_path):
    """scripts/launch_tpu_pod.sh with a stand-in `gcloud` that prints its arguments."""
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do echo \"ARG:$a\"; done\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "TPU_NAME": "pod", "ZONE": "z"}
    script = os.path.join(HERE, "..", "scripts", "launch_tpu_pod.sh")
    out = subprocess.run(["bash", script, "pretrain", "--config", "configs/x.py", "data.train=a b.txt"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:8] == ["ARG:compute", "ARG:tpus", "ARG:tpu-vm", "ARG:ssh", "ARG:pod", "ARG:--zone", "ARG:z",
                       "ARG:--worker=all"]
    remote = out[-1]
    assert remote.endswith("-m fa_jax pretrain --distributed --config configs/x.py data.train=a\\ b.txt")
    bad = subprocess.run(["bash", script, "merge"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "only pretrain and sft" in bad.stderr
