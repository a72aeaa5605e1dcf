"""Write a directory under a temporary name and rename it into place, so a failure leaves nothing half-written."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from fa_jax.errors import FaJaxError


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False):
    """Yields a fresh temporary directory beside `out_dir`; on success it replaces `out_dir`.

    An existing `out_dir` is refused unless `overwrite`; with `overwrite` the old one is removed only after the
    new one is complete. On any error the temporary directory is deleted and `out_dir` is untouched.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FaJaxError(f"{out_dir}: output directory already exists (pass overwrite=True / --overwrite)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    old = None
    try:
        yield tmp
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None and not os.path.exists(out_dir):
            os.rename(old, out_dir)  # put the previous output back under its own name
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: str, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (never a half-written file)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
