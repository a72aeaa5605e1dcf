"""Runs that cannot be corrupted: the run's identity checked on resume, checkpoint fallback, the run lock, SIGINT /
SIGTERM exit status, finished runs left alone, nothing partial after an early failure, metrics.jsonl after a resume,
and kill -9 at a random step followed by a resume that reproduces the uninterrupted run bit for bit."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fa_jax import rundir, run_config, train
from fa_jax.errors import FaJaxError

STEPS = 6


def _base(root, corpus, out):
    return {"model": {"teacher": str(root / "teacher"), "keep_layers": [0]},
            "adapter": {"rank": 4, "alpha": 8.0},
            "loss": {"chunk_size": 8},
            "data": {"train": str(corpus), "seq_len": 16, "batch_size": 8},
            "optim": {"lr": 1e-2, "warmup_steps": 2},
            "run": {"steps": STEPS, "out_dir": str(out), "log_every": 1, "save_every": 2, "async_checkpoint": False,
                    "tensorboard": False, "export_peft": False}}


def _cfg(root, corpus, out, **over):
    cfg = run_config.merge(train.pretrain_defaults(), _base(root, corpus, out), "test")
    return run_config.apply_overrides(cfg, [f"{k}={v!r}" for k, v in over.items()])


def _losses(out) -> dict:
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"metrics.jsonl holds steps more than once: {steps}"
    return {r["step"]: r["loss"] for r in records}


def snapshot(path) -> dict:
    """Every file and directory under `path` with its size, mtime and content digest."""
    out = {}
    if not os.path.exists(path):
        return out
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), path) + "/"] = None
        for n in filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, path)] = (os.path.getsize(p), os.stat(p).st_mtime_ns, open(p, "rb").read())
    return out


@pytest.fixture(scope="module")
def runs(teacher_corpus, tmp_path_factory):
    """The uninterrupted run, and one stopped at step 5 with checkpoints 2, 4, 5 (to copy and corrupt)."""
    root, corpus = teacher_corpus
    base = tmp_path_factory.mktemp("runs")
    summary = train.pretrain(_cfg(root, corpus, base / "straight", **{"run.export_peft": True,
                                                                       "run.tensorboard": True}))
    first = train.pretrain(_cfg(root, corpus, base / "stopped", **{"run.stop_after": 5}))
    assert first["status"] == "stopped" and "peft_adapter" not in first
    return base / "straight", base / "stopped", summary


def test_finished_run_exports_its_adapter_and_curves(teacher_corpus, runs):
    import jax

    import fa_jax
    from fa_jax.models import transformer

    root, _ = teacher_corpus
    straight, _, summary = runs
    s_cfg, _ = transformer.select_layers(*fa_jax.load_model(str(root / "teacher")), [0])
    ad = fa_jax.load_peft(s_cfg, str(straight / "adapter_peft"))
    for x, y in zip(jax.tree.leaves(ad), jax.tree.leaves(summary["adapters"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    assert os.path.exists(straight / "loss_curve.png") and os.listdir(straight / "tensorboard")
    assert json.load(open(straight / "summary.json"))["status"] == "finished"


# --------------------------------------------------------------------------------------- 1. identity


def test_run_json_records_what_defines_the_run(runs):
    _, stopped, _ = runs
    ident = json.load(open(stopped / "run.json"))
    assert ident["models"]["teacher"]["sha256"] and ident["tokenizer"]
    assert ident["data"]["format"] == "file" and ident["data"]["bytes"] > 0
    assert ident["settings"]["adapter"]["rank"] == 4 and ident["settings"]["data"]["seq_len"] == 16
    assert rundir.key_class("settings.run.steps") == "safe"
    assert rundir.key_class("settings.adapter.rank") == "structural"
    assert rundir.key_class("settings.run.log_every") == "free"
    assert rundir.key_class("models.teacher.sha256") == "structural"


@pytest.mark.parametrize("over,named", [
    ({"adapter.rank": 8}, "adapter.rank: 4 -> 8"),
    ({"model.keep_layers": [1]}, "model.keep_layers"),
    ({"data.seq_len": 24}, "data.seq_len: 16 -> 24"),
    ({"data.batch_size": 16}, "data.batch_size"),
])
def test_resume_with_a_structural_change_is_refused_and_changes_nothing(teacher_corpus, runs, tmp_path, over, named):
    root, corpus = teacher_corpus
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    before = snapshot(run)
    with pytest.raises(FaJaxError, match="cannot resume") as e:
        train.pretrain(_cfg(root, corpus, run, **over, **{"run.force_resume": True}))
    assert named in str(e.value) and "\n" not in str(e.value)
    assert snapshot(run) == before


def test_resume_with_another_teacher_or_data_is_refused(teacher_corpus, runs, tmp_path):
    root, corpus = teacher_corpus
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    other = tmp_path / "teacher2"
    shutil.copytree(root / "teacher", other)
    cfg = json.load(open(other / "config.json"))
    cfg["rms_norm_eps"] = 1e-3  # same shapes, another model
    json.dump(cfg, open(other / "config.json", "w"))
    before = snapshot(run)
    with pytest.raises(FaJaxError, match=r"models\.teacher\.sha256"):
        train.pretrain(_cfg(root, corpus, run, **{"model.teacher": str(other)}))
    text = tmp_path / "corpus2.txt"
    text.write_text(open(corpus).read() + "\n\none more document here\n")
    with pytest.raises(FaJaxError, match=r"data\.bytes"):
        train.pretrain(_cfg(root, corpus, run, **{"data.train": str(text)}))
    # a copy of the same teacher elsewhere is the same model: only the path differs
    shutil.copytree(root / "teacher", tmp_path / "teacher3")
    assert rundir.model_fingerprint(str(tmp_path / "teacher3")) == rundir.model_fingerprint(str(root / "teacher"))
    assert snapshot(run) == before


def test_safe_changes_need_force_resume(teacher_corpus, runs, tmp_path, capsys):
    root, corpus = teacher_corpus
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    before = snapshot(run)
    with pytest.raises(FaJaxError, match=r"optim\.lr: 0\.01 -> 0\.005.*--force-resume"):
        train.pretrain(_cfg(root, corpus, run, **{"optim.lr": 5e-3}))
    assert snapshot(run) == before
    summary = train.pretrain(_cfg(root, corpus, run, **{"optim.lr": 5e-3, "run.force_resume": True,
                                                        "run.log_every": 3}))  # (log_every: free)
    assert summary["step"] == STEPS and summary["status"] == "finished"
    assert "--force-resume: resuming" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- 2. fallback


def _corrupt(run, how):
    ckpt = run / "checkpoints" / "5"
    state = ckpt / "state"
    data_files = sorted(p for p in state.rglob("*") if p.is_file() and p.parent.name == "d")
    if how == "truncated _METADATA":
        m = state / "_METADATA"
        m.write_bytes(m.read_bytes()[: m.stat().st_size // 2])
    elif how == "missing state/":
        shutil.rmtree(state)
    elif how == "bad bytes":
        p = max(data_files, key=lambda p: p.stat().st_size)
        b = bytearray(p.read_bytes())
        for i in range(0, len(b), 7):
            b[i] ^= 0x5A
        p.write_bytes(bytes(b))
    elif how == "truncated data files":
        for p in data_files:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    elif how == "missing data position":
        os.remove(run / "checkpoints" / "data_state" / "step_5.process_0.json")
    elif how == "missing state/, no integrity record":  # orbax or the data reader must notice on their own
        shutil.rmtree(state)
        os.remove(run / "checkpoints" / "integrity" / "step_5.json")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated _METADATA", "missing state/", "bad bytes", "truncated data files",
                                 "missing data position", "missing state/, no integrity record"])
def test_corrupt_latest_checkpoint_falls_back_and_matches_the_uninterrupted_run(teacher_corpus, runs, tmp_path,
                                                                                 capsys, how):
    root, corpus = teacher_corpus
    straight, stopped, _ = runs
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    assert sorted(n for n in os.listdir(run / "checkpoints") if n.isdigit()) == ["2", "4", "5"]
    _corrupt(run, how)
    os.makedirs(run / "checkpoints" / "6.orbax-checkpoint-tmp-1234")  # an interrupted save
    summary = train.pretrain(_cfg(root, corpus, run))
    out = capsys.readouterr().out
    assert "checkpoint 5 skipped:" in out and "resumed from step 4" in out
    assert "removed 6.orbax-checkpoint-tmp-1234" in out
    assert not os.path.exists(run / "checkpoints" / "6.orbax-checkpoint-tmp-1234")
    assert os.path.isdir(run / "checkpoints_skipped" / "5")
    assert summary["step"] == STEPS
    want, got = _losses(straight), _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([got[s] for s in got], [want[s] for s in got])  # bit for bit


def test_no_intact_checkpoint_is_one_line(teacher_corpus, runs, tmp_path):
    root, corpus = teacher_corpus
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    for s in ("2", "4", "5"):
        shutil.rmtree(run / "checkpoints" / s / "state")
    with pytest.raises(FaJaxError, match="no checkpoint restores") as e:
        train.pretrain(_cfg(root, corpus, run))
    assert "\n" not in str(e.value)


def test_failed_checkpoint_save_is_one_line_and_keeps_the_previous(teacher_corpus, tmp_path, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    root, corpus = teacher_corpus
    real = ocp.CheckpointManager.save

    def save(self, step, *a, **k):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints"))
        return real(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(FaJaxError, match=r"checkpoint 4 could not be written .*No space left.*checkpoint 2 is "
                                         r"intact"):
        train.pretrain(_cfg(root, corpus, tmp_path / "run"))
    monkeypatch.setattr(ocp.CheckpointManager, "save", real)
    assert train.pretrain(_cfg(root, corpus, tmp_path / "run"))["step"] == STEPS  # resumes from 2


# ---------------------------------------------------------------------------------------- 3. lock


def test_busy_directory_is_refused_and_a_stale_lock_taken_over(teacher_corpus, runs, tmp_path, capsys):
    import socket

    root, corpus = teacher_corpus
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid,
                                                  "started": "2026-12-02T10:00:00"}))
        before = snapshot(run)
        with pytest.raises(FaJaxError, match=f"another run is writing into this directory \\(process {sleeper.pid}"):
            train.pretrain(_cfg(root, corpus, run))
        assert snapshot(run) == before
        (run / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
        with pytest.raises(FaJaxError, match="locked by process 1 on host elsewhere"):
            train.pretrain(_cfg(root, corpus, run))
    finally:
        sleeper.kill()
        sleeper.wait()
    (run / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "started": "x"}))
    assert train.pretrain(_cfg(root, corpus, run))["step"] == STEPS
    assert f"taking over a stale lock (process {sleeper.pid} is gone)" in capsys.readouterr().out
    assert not os.path.exists(run / "run.lock")  # released at the end


# ---------------------------------------------------------------------------- 4. finished, early failure


def test_a_finished_run_rerun_changes_nothing(teacher_corpus, runs, tmp_path, capsys):
    from fa_jax.cli import main

    root, corpus = teacher_corpus
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    before = snapshot(run)
    summary = train.pretrain(_cfg(root, corpus, run))
    assert summary["status"] == "already finished" and summary["step"] == STEPS
    assert "already finished" in capsys.readouterr().out
    conf = tmp_path / "conf.py"
    conf.write_text(f"def get_config():\n    return {_base(root, corpus, run)!r}\n")
    assert main(["pretrain", "--config", str(conf)]) == 0
    assert snapshot(run) == before


def test_a_run_failing_before_its_first_checkpoint_leaves_nothing(teacher_corpus, tmp_path):
    root, corpus = teacher_corpus
    shutil.copytree(root / "teacher", tmp_path / "no_tok", ignore=shutil.ignore_patterns("tokenizer*", "special*"))
    with pytest.raises(Exception):
        train.pretrain(_cfg(root, corpus, tmp_path / "new", **{"model.teacher": str(tmp_path / "no_tok")}))
    assert not os.path.exists(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception):
        train.pretrain(_cfg(root, corpus, tmp_path / "empty", **{"model.teacher": str(tmp_path / "no_tok")}))
    assert os.listdir(tmp_path / "empty") == []


# ------------------------------------------------------------------- 5. signals, kill -9, metrics.jsonl


def _cli(root, corpus, run, tmp_path, *extra):
    conf = tmp_path / "conf.py"
    base = _base(root, corpus, run)
    base["run"].update(save_every=1)
    conf.write_text(f"def get_config():\n    return {base!r}\n")
    return subprocess.Popen([sys.executable, "-m", "fa_jax", "pretrain", "--config", str(conf), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, run, step, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        p = os.path.join(run, "metrics.jsonl")
        if os.path.exists(p) and any(json.loads(line)["step"] >= step for line in open(p) if line.strip()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stdout.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("the run did not reach step %d" % step)


def test_sigint_saves_exit_75_then_kill_9_and_resume_is_bit_identical(teacher_corpus, runs, tmp_path):
    root, corpus = teacher_corpus
    run = tmp_path / "run"
    proc = _cli(root, corpus, run, tmp_path)
    _wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == train.EXIT_INTERRUPTED, out[-2000:]
    assert "SIGINT: checkpoint saved at step" in out
    saved = max(int(n) for n in os.listdir(run / "checkpoints") if n.isdigit())
    assert saved >= 2
    # kill -9 at a random later step: the lock and perhaps a half-written save stay behind
    proc = _cli(root, corpus, run, tmp_path)
    _wait_for_step(proc, run, random.Random(os.getpid()).randint(saved + 1, STEPS - 1))
    proc.kill()
    proc.wait()
    assert os.path.exists(run / "run.lock")
    summary = train.pretrain(_cfg(root, corpus, run, **{"run.save_every": 1}))
    assert summary["status"] == "finished"
    want, got = _losses(runs[0]), _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([got[s] for s in got], [want[s] for s in got])


def test_metrics_history_covers_the_whole_run_after_a_resume(tmp_path):
    from fa_jax.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4, 5)) + '{"step": 6, ')
    logger = MetricsLogger(str(tmp_path), 8, start_step=3, tensorboard=False)
    logger.log(4, {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in logger.history] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3, 4]
    assert os.path.exists(tmp_path / "loss_curve.png")


def test_too_few_documents_for_the_batch_rows_names_the_source(teacher_corpus, tmp_path):
    import fa_jax
    from fa_jax import data

    root, _ = teacher_corpus
    (tmp_path / "three.txt").write_text("one document\n\ntwo documents\n\nthree documents\n")
    docs = data.load_documents(str(tmp_path / "three.txt"))
    with pytest.raises(FaJaxError, match=r"data.train=mine: 3 document\(s\) for 8 batch rows \(data.batch_size\)"):
        train.RowStreams(docs, fa_jax.load_tokenizer(str(root / "teacher")), seq_len=16, global_rows=8, seed=0,
                         name="data.train=mine")
