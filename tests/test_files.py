"""Atomic writes (sparse_hetconv._files) and the checkpoint reader/writer built on them.

A destination holds its previous content or the whole new one; no temporary file survives a
failure; files get the mode ``open()`` gives; output checks fail before the work. The kill tests
of whole commands are in tests/cli/test_faults.py.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sparse_hetconv._files import atomic_write, check_output_file, check_output_folder
from sparse_hetconv.checkpoint import read_checkpoint, save_atomic

POSIX = pytest.mark.skipif(os.name != "posix", reason="file modes, signals and process ids are POSIX here")


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write into (skips where none can be made: root ignores modes)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "probe").touch()
    except PermissionError:
        return folder
    (folder / "probe").unlink()
    folder.chmod(0o700)
    sys_folder = Path("/sys")
    if sys_folder.is_dir():
        try:
            (sys_folder / ".sparse_hetconv_probe").touch()
        except PermissionError:  # sysfs refuses new files even to root
            return sys_folder
        except OSError:
            pass
    pytest.skip("no folder can be made unwritable for this user (root ignores file modes) and /sys is writable")


# -- atomic_write ---------------------------------------------------------------------------------
def test_writes_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    assert atomic_write(target, lambda file: file.write(b"new content")) == target
    assert target.read_bytes() == b"new content"
    assert not _temporaries(tmp_path), "a temporary file was left behind"


@pytest.mark.parametrize("failure", [ValueError("bad"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_failed_write_keeps_the_previous_file_and_removes_its_temporary(tmp_path, failure):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    seen = []

    def write(file):
        file.write(b"half of the new")
        file.flush()
        seen.extend(_temporaries(tmp_path))
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(target, write)
    assert len(seen) == 1 and seen[0].startswith(f".out.bin.{os.getpid()}."), f"the write went to {seen}"
    assert target.read_bytes() == b"previous", "the destination must keep its previous content"
    assert not _temporaries(tmp_path), "the temporary file must be removed"


def test_an_os_error_inside_torch_save_names_the_destination(tmp_path):
    """torch.save turns a write's OSError into a RuntimeError of its zip writer; the caller gets
    the OSError (a full disk, say), naming the file."""
    target = tmp_path / "out.pt"

    def write(file):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(OSError, match="No space left on device") as raised:
        atomic_write(target, write)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert not target.exists() and not _temporaries(tmp_path)


def test_missing_folder_and_folder_as_target(tmp_path):
    with pytest.raises(FileNotFoundError, match="the folder of this file does not exist"):
        atomic_write(tmp_path / "no" / "out.bin", lambda file: file.write(b"x"))
    with pytest.raises(IsADirectoryError, match="is a folder, expected a file name"):
        atomic_write(tmp_path, lambda file: file.write(b"x"))
    with pytest.raises(TypeError, match="write must be callable, got bytes"):
        atomic_write(tmp_path / "out.bin", b"x")


@POSIX
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_new_file_gets_the_mode_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "ours", lambda file: file.write(b"x"))
        with open(tmp_path / "opens", "wb"):
            pass
    finally:
        os.umask(old)
    ours, theirs = (stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("ours", "opens"))
    assert ours == theirs == 0o666 & ~umask, f"mode {ours:o}, open() gives {theirs:o} (umask {umask:o})"


@POSIX
def test_a_replaced_file_keeps_its_mode(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    target.chmod(0o640)
    atomic_write(target, lambda file: file.write(b"new"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.read_bytes() == b"new"


@POSIX
def test_sigterm_with_the_programs_own_handler_cleans_up_and_keeps_the_handler(tmp_path):
    """A handler the program installed runs inside the write; the exception it raises cleans up
    like any other. (SIGTERM with its default handling ends the process: tests/cli/test_faults.py.)"""

    class Stop(Exception):
        pass

    def handler(signum, frame):
        raise Stop(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        target = tmp_path / "out.bin"
        target.write_bytes(b"previous")

        def write(file):
            file.write(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts the sleep

        with pytest.raises(Stop):
            atomic_write(target, write)
        assert signal.getsignal(signal.SIGTERM) is handler, "the program's handler must be left in place"
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert target.read_bytes() == b"previous" and not _temporaries(tmp_path)


# -- checks before the work -----------------------------------------------------------------------
def test_check_output_file(tmp_path):
    assert check_output_file(tmp_path / "new.json") == tmp_path / "new.json"
    (tmp_path / "old.json").write_text("{}")
    check_output_file(tmp_path / "old.json")  # force=True by default: replacing is fine
    with pytest.raises(FileExistsError, match=r"exists; pass force=True \(--force\) to overwrite it: '.*old.json'"):
        check_output_file(tmp_path / "old.json", force=False)
    with pytest.raises(FileNotFoundError, match="the folder of this output file does not exist"):
        check_output_file(tmp_path / "missing" / "x.json")
    with pytest.raises(IsADirectoryError, match="is a folder, expected a file name"):
        check_output_file(tmp_path)
    with pytest.raises(NotADirectoryError, match="is a file, expected the folder of the output file: '.*old.json'"):
        check_output_file(tmp_path / "old.json" / "x.json")  # was "the folder ... does not exist"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"], "the checks must leave nothing behind"


def test_check_output_folder(tmp_path):
    assert check_output_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists(), "checking a folder to be created must not create it"
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, expected a folder"):
        check_output_folder(tmp_path / "file" / "run")


@POSIX
def test_unwritable_folder_is_a_permission_error_before_the_work(tmp_path):
    locked = _unwritable(tmp_path)
    with pytest.raises(PermissionError, match="cannot write into this folder") as raised:
        check_output_file(locked / "out.json")
    assert raised.value.filename == str(locked)
    with pytest.raises(PermissionError, match="cannot write into this folder"):
        check_output_folder(locked / "run")
    with pytest.raises(PermissionError):
        atomic_write(locked / "out.json", lambda file: file.write(b"x"))


# -- checkpoints ----------------------------------------------------------------------------------
@POSIX
def test_save_atomic_writes_a_checkpoint_with_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        save_atomic({"w": torch.arange(3)}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o644, "mkstemp's 0600 must not leak through"
    assert torch.equal(read_checkpoint(tmp_path / "c.pt")["w"], torch.arange(3))
    assert not _temporaries(tmp_path)


class _Payload:
    """A class torch.load(weights_only=True) refuses to build."""


def test_a_tampered_checkpoint_gives_the_reason_not_torchs_unsafe_advice(tmp_path):
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "module.pt")
    torch.save({"x": _Payload()}, tmp_path / "object.pt")
    for name in ("module.pt", "object.pt"):
        with pytest.raises(ValueError) as raised:
            read_checkpoint(tmp_path / name)
        text = str(raised.value)
        assert "weights_only` set to `False`" not in text and "Re-running" not in text, f"{name}: {text}"
        assert "add_safe_globals" not in text, f"{name}: must not advise allow-listing: {text}"
        assert "holds objects other than tensors and plain containers, which are never loaded" in text, text
        assert ("torch.nn.modules.linear.Linear" if name == "module.pt" else "_Payload") in text, text


@pytest.mark.parametrize("content, reason", [
    (b"", "the file is empty"),
    (b"not a checkpoint\n", r"not a file written by torch.save: it begins with b'not a ch'"),
    (b"hello world\n", r"not a file written by torch.save: it begins with b'hello wo'"),  # was "...failed: 101"
    (b"[1, 2, 3]\n", r"not a file written by torch.save: it begins with b'\[1, 2, 3'"),
])
def test_foreign_files_give_the_reason(tmp_path, content, reason):
    (tmp_path / "f.pt").write_bytes(content)
    with pytest.raises(ValueError, match=rf"f.pt is not a readable PyTorch checkpoint \({reason}\)$"):
        read_checkpoint(tmp_path / "f.pt")


def test_truncated_checkpoint_gives_the_zip_reason(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "full.pt")
    raw = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut.pt is not a readable PyTorch checkpoint \(truncated or damaged: "
                       r"RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central "
                       r"directory\)$"):
        read_checkpoint(tmp_path / "cut.pt")
    legacy = tmp_path / "legacy.pt"  # the format before torch 1.6, cut short: an EOFError with no message
    torch.save(torch.zeros(1000), legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"legacy.pt is not a readable PyTorch checkpoint \(truncated or damaged: "
                       r"EOFError: no reason given\)$"):
        read_checkpoint(legacy)


def test_missing_and_folder_paths_are_file_system_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint does not exist") as raised:
        read_checkpoint(tmp_path / "nope.pt")
    assert raised.value.filename == str(tmp_path / "nope.pt")
    with pytest.raises(IsADirectoryError, match="is a folder, expected a checkpoint file"):
        read_checkpoint(tmp_path)


@POSIX
def test_an_unreadable_checkpoint_is_a_permission_error_not_a_bad_file(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"w": torch.zeros(1)}, path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("this user reads files whatever their mode (root)")
        with pytest.raises(PermissionError):
            read_checkpoint(path)
    finally:
        path.chmod(0o600)
