"""Writing files so that a reader never sees half of one, and checking outputs before the work.

:func:`atomic_write` writes to a temporary file in the destination's folder and renames it over
the destination (``os.replace``, atomic on POSIX and Windows): the destination holds either its
previous content or the complete new one, never a part. The temporary file is removed on every
failure and on ``KeyboardInterrupt`` (SIGINT). SIGTERM and SIGHUP, whose default handling ends the
process without running any clean-up, are turned into an exception while a file is written (in
the main thread, where they have their default handling): the temporary file is removed, then the
signal is delivered again and ends the process as it would have. A write killed with SIGKILL
cannot clean up: its temporary file is named after the writing process (``.NAME.PID.TOKEN.tmp``),
and the next write into that folder removes those whose process is gone, with a warning.

Files get the mode ``open()`` would give them: ``0o666`` less the umask for a new file, the
existing file's permission bits when one is replaced.

:func:`check_output_file` and :func:`check_output_folder` make the checks that can be made before
a long job (the folder exists and is writable, the file name is not a folder, an existing file is
not overwritten without ``force``), so that a job does not fail after its work is done.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "check_output_file", "check_output_folder", "remove_stale_temporaries",
           "temporary_name"]

# .NAME.PID.TOKEN.tmp: the writer's process id, so that a later process can tell a stale file from
# one another process is writing right now.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\.tmp$")
# 0.1's tempfile.mkstemp names: .NAME.XXXXXXXX.tmp (eight of [a-z0-9_]).
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?P<token>[a-z0-9_]{8})\.tmp$")
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_ACTIVE: set[str] = set()  # temporary files this process is writing now
_STARTED = time.time()  # a lower bound of this process's age, for 0.1's temporary names
_SLACK_S = 2.0  # process start times are known to the clock tick, file times to the file system


def temporary_name(path: str | Path) -> Path:
    """A fresh temporary name beside ``path``: ``.NAME.PID.TOKEN.tmp`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file through a temporary file in its folder and a rename.

    ``write(file)`` gets the temporary file, open for binary writing, and writes the content; the
    file is flushed, synced to disk and renamed over ``path`` when it returns. Stale temporary
    files of killed writers in the folder are removed first (with a warning).

    Args:
        path (str or Path): the destination; its folder must exist.
        write (callable): ``write(file) -> None``.

    Returns:
        Path: ``path``.

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
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, "the folder of this file does not exist", str(path))
    remove_stale_temporaries(folder, path.name)
    mode = _mode_of(path)
    tmp = temporary_name(path)
    key = os.path.abspath(tmp)
    with _signals_raise():
        _ACTIVE.add(key)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            with os.fdopen(fd, "wb") as file:
                if mode is not None:
                    os.chmod(tmp, mode)
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException as error:
            with _signals_blocked():
                tmp.unlink(missing_ok=True)
            cause = _os_error_in(error)
            if cause is not None and not isinstance(error, OSError):
                # torch.save turns an OSError of the file into a RuntimeError of its zip writer
                raise OSError(cause.errno, cause.strerror, str(path)) from error
            if isinstance(error, OSError) and error.errno is not None and error.filename in (str(tmp), None):
                raise type(error)(error.errno, error.strerror, str(path)) from error
            raise
        finally:
            _ACTIVE.discard(key)
    _sync_folder(folder)
    return path


def remove_stale_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove the temporary files in ``folder`` that killed writers left behind.

    A temporary file of :func:`atomic_write` (``.NAME.PID.TOKEN.tmp``) is stale when its process
    has ended, or when the process now holding that id started after the file was last written
    (the id was reused). 0.1's temporary names of the file ``name`` (``.NAME.XXXXXXXX.tmp``, no
    process id) are stale when they are older than this process. Where processes cannot be
    inspected (not POSIX), stale files are reported, not removed.

    Returns:
        list of Path: the files removed. A warning lists them (or the ones found, not removed).
    """
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    stale = []
    for entry in entries:
        if not entry.name.startswith(".") or not entry.name.endswith(".tmp") or os.path.abspath(entry.path) in _ACTIVE:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            modified = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        match = _TEMPORARY.match(entry.name)
        if match:
            if _stale(int(match["pid"]), modified):
                stale.append(Path(entry.path))
        else:
            legacy = _LEGACY.match(entry.name)
            if legacy and legacy["name"] == name and modified < _STARTED - _SLACK_S:
                stale.append(Path(entry.path))
    if not stale:
        return []
    if os.name != "posix":
        warnings.warn(f"{folder} holds {len(stale)} temporary file(s) of interrupted writes: "
                      f"{', '.join(p.name for p in stale)}; remove them if no other program is writing there",
                      stacklevel=3)
        return []
    removed = []
    for tmp in stale:
        with contextlib.suppress(FileNotFoundError):  # another process may have cleaned it first
            tmp.unlink()
            removed.append(tmp)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary file(s) left in {folder} by interrupted writes: "
                      f"{', '.join(p.name for p in removed)}", stacklevel=3)
    return removed


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
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is a file, expected a folder", str(existing))
    _probe(existing)
    return path


# -- helpers ------------------------------------------------------------------------------------
def _probe(folder: Path) -> None:
    """Create and remove a temporary file in ``folder``: the one test of writability that holds
    for every user (root included), ACL and file system (read-only mounts)."""
    tmp = temporary_name(folder / "write-test")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        raise type(error)(error.errno, f"cannot write into this folder ({error.strerror})", str(folder)) from None
    os.close(fd)
    tmp.unlink(missing_ok=True)


def _mode_of(path: Path) -> int | None:
    """The permission bits an existing ``path`` has (kept when it is replaced, as ``open()``
    keeps them); None for a new file, which gets ``0o666`` less the umask from ``os.open``."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _stale(pid: int, modified: float) -> bool:
    if pid == os.getpid():
        return True  # not among this process's active writes (checked by the caller): an old process's
    if os.name != "posix":
        return modified < _STARTED - _SLACK_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: the process exists (another user's)
        pass
    started = _process_start(pid)
    return started is not None and modified < started - _SLACK_S


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where ``/proc`` tells; else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        ticks = int(fields[19])  # field 22 of proc(5), counted after the command name
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _os_error_in(error: BaseException) -> OSError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error = error.__cause__ or error.__context__
    return None


def _sync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); where a folder cannot be opened, the rename stands as is."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Terminated(BaseException):
    """A terminating signal arrived during a write (a BaseException: ``except Exception`` in the
    writer's callback must not swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM / SIGHUP into an exception for the duration of a write, so that ``except``
    blocks run, where their handling is the default (ending the process with no clean-up); then
    deliver the signal again with its default handling. A signal the program ignores or handles
    itself is left alone: its handler runs inside the write, and an exception it raises cleans up
    like any other."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be installed by the main thread
        return
    installed = []
    for signum in _SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _raise_terminated)
            installed.append(signum)
    try:
        yield
    except _Terminated as terminated:
        if terminated.signum not in installed:  # an outer write installed the handler: it re-delivers
            raise
        for signum in installed:
            signal.signal(signum, signal.SIG_DFL)
        installed = []
        sys.stdout.flush()
        sys.stderr.flush()
        signal.raise_signal(terminated.signum)  # ends the process with the signal's status
        raise SystemExit(128 + terminated.signum) from None  # the signal is blocked in this thread
    finally:
        for signum in installed:
            signal.signal(signum, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Defer SIGTERM / SIGHUP / SIGINT while a temporary file is removed (POSIX)."""
    blockable = _SIGNALS + (signal.SIGINT,)
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blockable)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
