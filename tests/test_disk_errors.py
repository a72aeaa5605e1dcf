"""A full disk, a file-size limit, a read-only file system or an output path under a regular file: the writing
commands (`convert`, `diff`, `truncate`, `merge`, `export`, `eval --out`) fail with one line naming the output and
exit status 2, and leave nothing behind (no half-written directory, no `.tmp-` entries; with --overwrite the old
output intact). Output directories and files get the umask's permissions.

A full disk is simulated with a subprocess whose file-size limit (RLIMIT_FSIZE) is small: CPython ignores SIGXFSZ,
so a write past the limit fails with OSError EFBIG, as ENOSPC would. We run as root, so read-only directories are
simulated by monkeypatching os.rename / os.replace / the writers to raise OSError in-process."""
import errno
import os
import shutil
import subprocess
import sys

import jax
import pytest
import torch

import fa_jax
from fa_jax import readapt, runs
from fa_jax.cli import main
from fa_jax.errors import FaJaxError
from fa_jax.io import atomic
from helpers import make_hf_model, save_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 48 << 10  # bytes: config.json and the tokenizer fit, the weights (about 0.5 MB) do not


def tree(d):
    """{relative path: bytes (a file) or None (a directory)} of everything under d, hidden entries included."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), d)] = None
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = f.read()
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base (with a tokenizer), tuned, their RE-Adapter delta and a LoRE of it; the tests only read them and write
    into their own tmp_path."""
    root = tmp_path_factory.mktemp("disk")
    base = make_hf_model("llama", seed=0)
    base.save_pretrained(str(root / "base"))
    save_tiny_tokenizer(root / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    base.save_pretrained(str(root / "tuned"))
    assert main(["diff", "--base", str(root / "base"), "--tuned", str(root / "tuned"),
                 "--out", str(root / "delta")]) == 0
    assert main(["truncate", "--delta", str(root / "delta"), "--tau", "0.5", "--out", str(root / "lore")]) == 0
    return root


def run_limited(argv, limit=LIMIT):
    """`python -m fa_jax ARGV` with a file-size limit of `limit` bytes; (exit status, stderr)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    env["JAX_PLATFORMS"] = "cpu"
    # the limit is set by a small Python that then execs the CLI, not by preexec_fn (which would fork this
    # multithreaded JAX process); CPython ignores SIGXFSZ, so a write past it fails with OSError EFBIG
    start = (f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
             "os.execv(sys.executable, [sys.executable, '-m', 'fa_jax', *sys.argv[1:]])")
    cmd = [sys.executable, "-c", start, *argv] if limit else [sys.executable, "-m", "fa_jax", *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    return r.returncode, r.stderr


def assert_one_line(rc, err, command, path, reason):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fa-jax {command}: error: {path}: {reason}"), err


def test_convert_file_too_large_leaves_nothing(models, tmp_path):
    out = tmp_path / "converted"
    before = tree(tmp_path)
    rc, err = run_limited(["convert", str(models / "base"), str(out)])
    assert_one_line(rc, err, "convert", out, "File too large")
    assert "(errno EFBIG)" in err
    assert tree(tmp_path) == before == {}


def test_diff_overwrite_full_disk_keeps_the_old_output(models, tmp_path):
    out = tmp_path / "delta"
    shutil.copytree(models / "delta", out)
    before = tree(tmp_path)
    rc, err = run_limited(["diff", "--base", str(models / "base"), "--tuned", str(models / "base"), "--out", str(out),
                           "--overwrite"])
    assert_one_line(rc, err, "diff", out, "File too large")
    assert tree(tmp_path) == before  # the old delta byte for byte, nothing beside it


def test_truncate_full_disk_leaves_nothing(models, tmp_path):
    out = tmp_path / "lore"
    rc, err = run_limited(["truncate", "--delta", str(models / "delta"), "--tau", "0.5", "--out", str(out)])
    assert_one_line(rc, err, "truncate", out, "File too large")
    assert tree(tmp_path) == {}


def test_merge_overwrite_full_disk_keeps_the_old_output(models, tmp_path):
    out = tmp_path / "merged"
    shutil.copytree(models / "base", out)
    before = tree(tmp_path)
    rc, err = run_limited(["merge", "--base", str(models / "base"), "--adapter", f"{models / 'lore'}:0.5",
                           "--out", str(out), "--overwrite"])
    assert_one_line(rc, err, "merge", out, "File too large")
    assert tree(tmp_path) == before


def test_output_under_a_regular_file(models, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "merged"
    before = tree(tmp_path)
    rc, err = run_limited(["merge", "--base", str(models / "base"), "--adapter", str(models / "delta"),
                           "--out", str(out)], limit=None)
    assert_one_line(rc, err, "merge", out, "Not a directory")
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# in-process: read-only file systems, no space at the rename, the report and plots of truncate, export, eval --out


def test_read_only_at_the_rename(models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "converted"
    shutil.copytree(models / "tuned", out)
    before = tree(tmp_path)
    real = os.rename

    def rename(src, dst):
        if os.path.basename(str(src)).startswith(".converted.tmp-"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), src, dst)
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    assert main(["convert", str(models / "base"), str(out), "--overwrite", "--no-tokenizer"]) == 2
    assert_one_line(2, capsys.readouterr().err, "convert", out, "Read-only file system (errno EROFS)")
    assert tree(tmp_path) == before


def test_truncate_report_and_plots_are_inside_the_atomic_directory(models, tmp_path, monkeypatch, capsys):
    """A LoRE directory never exists without its report and plots: a failure writing them leaves nothing."""
    def no_space(report, out_dir):
        assert os.path.basename(out_dir).startswith(".lore.tmp-")
        assert os.path.exists(os.path.join(out_dir, "adapter_model.safetensors"))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(readapt, "_plots", no_space)
    out = tmp_path / "lore"
    assert main(["truncate", "--delta", str(models / "delta"), "--tau", "0.5", "--out", str(out)]) == 2
    assert_one_line(2, capsys.readouterr().err, "truncate", out, "No space left on device (errno ENOSPC)")
    assert tree(tmp_path) == {}
    with pytest.raises(OSError) as e:  # Python callers can still catch it as an OSError, with its errno
        readapt.truncate(str(models / "delta"), str(out), tau=0.5)
    assert isinstance(e.value, FaJaxError) and e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    assert tree(tmp_path) == {}


def test_merge_tokenizer_copy_failure_keeps_the_old_output(models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    shutil.copytree(models / "tuned", out)
    before = tree(tmp_path)
    real = shutil.copyfile

    def copyfile(src, dst, **kw):
        if os.path.basename(dst) == "tokenizer_config.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)
        return real(src, dst, **kw)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    assert main(["merge", "--base", str(models / "base"), "--adapter", str(models / "lore"), "--out", str(out),
                 "--overwrite"]) == 2
    assert_one_line(2, capsys.readouterr().err, "merge", out, "No space left on device")
    assert tree(tmp_path) == before


def test_export_failures(models, tmp_path, monkeypatch, capsys):
    """`fa-jax export` (save_adapter: PEFT and fa_jax's bottleneck format) under a regular file and on a full disk."""
    from fa_jax import adapters as adapters_lib
    from fa_jax import run_config, train
    from fa_jax.bottleneck import init_bottleneck
    from fa_jax.io import safetensors

    config = fa_jax.load_config(str(models / "base"))
    cfg = run_config.merge(train.pretrain_defaults(), {"model": {"teacher": str(models / "base")}}, "test")
    lora = fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=2, alpha=4, targets=["q_proj"])
    monkeypatch.setattr(runs, "run_config_of", lambda run: cfg)
    monkeypatch.setattr(runs, "run_adapters", lambda run, config, allow_pruned=False: lora)
    (tmp_path / "file").write_bytes(b"x")
    out = tmp_path / "file" / "sub" / "adapter"
    assert main(["export", "RUN", "--out", str(out)]) == 2
    assert_one_line(2, capsys.readouterr().err, "export", out, "Not a directory (errno ENOTDIR)")
    assert tree(tmp_path) == {"file": b"x"}

    bottleneck = init_bottleneck(config, jax.random.PRNGKey(1), size=4)
    assert adapters_lib.kind_of(bottleneck) == "bottleneck"
    adapters_lib.save_adapter(config, bottleneck, str(tmp_path / "bn"))
    before = tree(tmp_path)
    real = safetensors.write

    def full(path, entries, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors, "write", full)
    with pytest.raises(FaJaxError, match=rf"^{tmp_path / 'bn'}: No space left on device \(errno ENOSPC\)$"):
        adapters_lib.save_adapter(config, bottleneck, str(tmp_path / "bn"), overwrite=True)
    monkeypatch.setattr(safetensors, "write", real)
    assert tree(tmp_path) == before


def test_eval_out_under_a_regular_file(models, tmp_path, capsys, contained_datasets_cache):
    (tmp_path / "file").write_bytes(b"x")
    text = tmp_path / "file.txt"
    text.write_text("the a of and to in is was that it for on with as by at be this from or an are\n" * 4)
    out = tmp_path / "file" / "eval"
    assert main(["eval", "--model", str(models / "base"), "--perplexity", str(text), "--seq-len", "16",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the datasets library's progress lines
    assert_one_line(2, err, "eval", out, "Not a directory")
    assert sorted(os.listdir(tmp_path)) == ["file", "file.txt"]


def test_write_text_failures_leave_nothing(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def replace(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(FaJaxError, match=rf"^{path}: Read-only file system \(errno EROFS\)$"):
        atomic.write_text(str(path), "new")
    monkeypatch.undo()
    assert tree(tmp_path) == {"summary.json": b"old"}
    with pytest.raises(FaJaxError, match=r": Not a directory \(errno ENOTDIR\)$"):
        atomic.write_text(str(path / "x.json"), "new")
    assert tree(tmp_path) == {"summary.json": b"old"}


def test_atomic_dir_removes_the_parents_it_made(tmp_path):
    with pytest.raises(FaJaxError, match="No space left on device"):
        with atomic.atomic_dir(str(tmp_path / "a" / "b" / "out")) as tmp:
            with open(os.path.join(tmp, "f"), "w") as f:
                f.write("x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert tree(tmp_path) == {}


# ---------------------------------------------------------------------------------------------------------------
# permissions


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_umask_permissions(models, tmp_path, mask):
    old = os.umask(mask)
    try:
        config = fa_jax.load_config(str(models / "base"))
        lora = fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=2, alpha=4, targets=["q_proj"])
        fa_jax.save_peft(config, lora, str(tmp_path / "new" / "adapter"))
        fa_jax.save_peft(config, lora, str(tmp_path / "new" / "adapter"), overwrite=True)
        assert main(["merge", "--base", str(models / "base"), "--adapter", str(tmp_path / "new" / "adapter"),
                     "--out", str(tmp_path / "merged")]) == 0
        atomic.write_text(str(tmp_path / "summary.json"), "{}\n")
    finally:
        os.umask(old)
    for root, dirs, files in os.walk(tmp_path):
        for d in dirs:
            assert os.stat(os.path.join(root, d)).st_mode & 0o777 == 0o777 & ~mask, os.path.join(root, d)
        for f in files:
            assert os.stat(os.path.join(root, f)).st_mode & 0o777 == 0o666 & ~mask, os.path.join(root, f)
    assert os.path.exists(tmp_path / "merged" / "tokenizer.json")
    assert not [n for n in os.listdir(tmp_path / "new") if n.startswith(".")]
