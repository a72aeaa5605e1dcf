"""Write a directory under a temporary name and rename it into place, so a failure leaves nothing half-written."""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil

from fa_jax.errors import FaJaxError


class OutputError(FaJaxError, OSError):
    """Writing an output failed (disk full, file too large, read-only file system, no permission, a path under a
    regular file, ...): a FaJaxError (the command line prints it as one line) that is still an OSError with the
    original errno / strerror / filename for Python callers. str() is the one-line message naming the output."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def output_error(path: str, e: OSError, tmp: str | None = None) -> OutputError:
    """An OutputError for OSError `e` raised while writing the output `path`: "<path>: <strerror> (errno NAME)".

    The path named is `path`, unless `e.filename` is some other file (one being read, not the output, its
    temporary copy `tmp` or a directory above it), then that one."""
    if isinstance(e, OutputError):
        return e
    name = e.filename if isinstance(e.filename, str) else None
    if name is not None:
        name = os.path.abspath(name)
        target = os.path.abspath(path)
        ours = [target] + ([os.path.abspath(tmp)] if tmp else [])
        if any(name == p or name.startswith(p + os.sep) or p.startswith(name.rstrip(os.sep) + os.sep) for p in ours):
            name = None
    code = errno.errorcode.get(e.errno) if isinstance(e.errno, int) else None
    reason = e.strerror or str(e) or type(e).__name__
    err = OutputError(f"{name or path}: {reason}" + (f" (errno {code})" if code else ""))
    err.errno, err.strerror, err.filename = e.errno, e.strerror, name or path
    return err


@contextlib.contextmanager
def output_errors(path: str, tmp: str | None = None):
    """Re-raise an OSError from the block as `output_error(path, e, tmp)` (a one-line FaJaxError naming `path`);
    other exceptions pass through. The caller cleans up first (or its own `finally` does)."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise output_error(path, e, tmp) from e


def _unique(parent: str, prefix: str, make) -> str:
    """make(path) on a fresh `parent/prefix<random>` name (mkdtemp / mkstemp without their 0700 / 0600 modes: the
    result gets the usual permissions from the umask)."""
    for _ in range(100):
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            make(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", os.path.join(parent, prefix + "*"))


def _rename_new(src: str, dst: str) -> None:
    """os.rename, but FileExistsError where `dst` exists (rename would replace an empty directory or a file)."""
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _make_parent(parent: str) -> list[str]:
    """Create `parent` and the directories above it that are missing; returns those created (deepest first), for
    removal after a failure. A regular file where a directory should be is ENOTDIR."""
    created, d = [], parent
    while not os.path.isdir(d):
        if os.path.lexists(d):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), d)
        created.append(d)
        up = os.path.dirname(d)
        if up == d:
            break
        d = up
    made = []
    for d in reversed(created):
        try:
            os.mkdir(d)  # mode 0777 less the umask, as makedirs
            made.insert(0, d)
        except FileExistsError:  # made meanwhile by another process: not ours to remove
            if not os.path.isdir(d):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), d) from None
    return made


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False):
    """Yields a fresh temporary directory beside `out_dir`; on success it replaces `out_dir`.

    An existing `out_dir` is refused unless `overwrite`; with `overwrite` the old one is removed only after the
    new one is complete. On any error the temporary directory (and any parent directory made for it) is deleted
    and `out_dir` is untouched; an OSError (disk full, read-only file system, ...) is raised as an `OutputError`,
    a one-line FaJaxError naming `out_dir`. The directory gets the umask's permissions (0755 at umask 022).
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FaJaxError(f"{out_dir}: output directory already exists (pass overwrite=True / --overwrite)")
    parent = os.path.dirname(out_dir)
    base = os.path.basename(out_dir)
    created, tmp, old = [], None, None
    try:
        with output_errors(out_dir):
            created = _make_parent(parent)
            tmp = _unique(parent, f".{base}.tmp-", os.mkdir)
        with output_errors(out_dir, tmp):
            yield tmp
            if os.path.lexists(out_dir):
                old = _unique(parent, f".{base}.old-", lambda p: _rename_new(out_dir, p))
            os.rename(tmp, out_dir)
    except BaseException:
        if old is not None and not os.path.lexists(out_dir):
            with contextlib.suppress(OSError):
                os.rename(old, out_dir)  # put the previous output back under its own name
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    if old is not None:
        _remove(old)


def write_text(path: str, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (never a half-written file).

    The file gets the umask's permissions (0644 at umask 022); an OSError is raised as an `OutputError` naming
    `path`, with the temporary file removed."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    fds, tmp = [], None
    try:
        tmp = _unique(directory, f".{os.path.basename(path)}.tmp-",
                      lambda p: fds.append(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
        with os.fdopen(fds[0], "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if isinstance(e, OSError):
            raise output_error(path, e, tmp) from e
        raise
