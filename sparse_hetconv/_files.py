"""Writing files so that a reader never sees half of one, and checking outputs before the work.

:func:`atomic_write` writes to a temporary file in the destination's folder and renames it over
the destination (``os.replace``, atomic on POSIX and Windows): the destination holds either its
previous content or the complete new one, never a part. The temporary file is removed when the
write fails (an error, Ctrl-C); a process killed mid-write leaves it behind (a hidden
``.NAME.PID.TOKEN.tmp``) and the destination untouched. Files get the mode ``open()`` would give
them: ``0o666`` less the umask for a new file, the existing file's permission bits when one is
replaced.

:func:`check_output_file` and :func:`check_output_folder` make the checks that can be made before
a long job (the folder exists and is writable, the file name is not a folder, an existing file is
not overwritten without ``force``), so that a job does not fail after its work is done.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "check_output_file", "check_output_folder"]


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file through a temporary file in its folder and a rename.

    ``write(file)`` gets the temporary file, open for binary writing, and writes the content; the
    file is flushed, synced to disk and renamed over ``path`` when it returns.

    Raises:
        FileNotFoundError: the folder does not exist.
        IsADirectoryError: ``path`` is a folder.
        OSError: the file cannot be written (``PermissionError``, a full disk, ...); ``filename``
            is ``path``. ``path`` keeps its previous content and no temporary file is left.
    """
    path = Path(path)
    if not callable(write):
        raise TypeError(f"write must be callable, got {type(write).__name__}")
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, expected a file name", str(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "the folder of this file does not exist", str(path))
    try:
        mode = stat.S_IMODE(path.stat().st_mode)  # kept when the file is replaced, as open() keeps it
    except OSError:
        mode = None
    tmp = _temporary(path)
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), "wb") as file:
            if mode is not None:
                os.chmod(tmp, mode)
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        cause = error
        while cause is not None and not (isinstance(cause, OSError) and cause.errno is not None):
            cause = cause.__cause__ or cause.__context__  # torch.save wraps the file's OSError in a RuntimeError
        if cause is not None and (cause is not error or cause.filename in (str(tmp), None)):
            raise type(cause)(cause.errno, cause.strerror, str(path)) from error
        raise
    return path


def check_output_file(path: str | Path, force: bool = True) -> Path:
    """Check, before the work, that ``path`` can be written: its folder exists and is writable,
    ``path`` is not a folder, and (unless ``force``) does not exist. Nothing is left behind.

    Raises:
        FileNotFoundError: the folder does not exist.
        NotADirectoryError: the "folder" is a file.
        IsADirectoryError: ``path`` is a folder.
        FileExistsError: ``path`` exists and ``force`` is False.
        PermissionError (or another OSError): the folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, expected a file name", str(path))
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is a file, expected the folder of the output file", str(path.parent))
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "the folder of this output file does not exist", str(path))
    if path.exists() and not force:
        raise FileExistsError(errno.EEXIST, "exists; pass force=True (--force) to overwrite it", str(path))
    _probe(path.parent)  # replacing a file needs the folder's write permission, not the file's
    return path


def check_output_folder(path: str | Path) -> Path:
    """Check, before the work, that files can be written in folder ``path``: it is a writable
    folder, or it can be created (its nearest existing parent is a writable folder). Creates
    nothing.

    Raises:
        NotADirectoryError: ``path`` or one of its parents is a file.
        PermissionError (or another OSError): the folder (or the parent it would be created in)
            is not writable.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is a file, expected a folder", str(existing))
    _probe(existing)
    return path


def _probe(folder: Path) -> None:
    """Create and remove a temporary file in ``folder``: the one test of writability that holds
    for every user (root included), ACL and file system (read-only mounts)."""
    tmp = _temporary(folder / "write-test")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        raise type(error)(error.errno, f"cannot write into this folder ({error.strerror})", str(folder)) from None
    tmp.unlink(missing_ok=True)
