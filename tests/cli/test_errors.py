"""The command line never shows a traceback for a user's mistake or the environment.

One line ``sparse-hetconv CMD: error: FILE: reason`` and exit status 2; Ctrl-C is status 130,
quietly; bad numbers are refused by the parser; output checks run before the work.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from sparse_hetconv.cli import main

POSIX = pytest.mark.skipif(os.name != "posix", reason="file modes and /sys are POSIX")


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sparse-hetconv {command}: error: "), f"stderr: {err!r}"
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_demo_run(monkeypatch):
    """Fail the test if the demo's work starts: checks must come first."""
    from sparse_hetconv.cli import demo

    def run_demo(**kwargs):
        raise AssertionError("the demo ran although its arguments were refused")

    monkeypatch.setattr(demo, "run_demo", run_demo)


@pytest.mark.parametrize("argv, message", [
    (["demo", "--batch", "0"], r"argument --batch: must be an integer >= 1, got 0"),  # was a traceback
    (["demo", "--repeats", "0"], r"argument --repeats: must be an integer >= 1, got 0"),  # a StatisticsError
    (["demo", "--part", "-4"], r"argument --part: must be an integer >= 1, got -4"),
    (["demo", "--part", "four"], r"argument --part: expected an integer, got 'four'"),
    (["train", "--epochs", "0"], r"argument --epochs: must be an integer >= 1, got 0"),
    (["train", "--batch-size", "-1"], r"argument --batch-size: must be an integer >= 1, got -1"),
    (["train", "--lr", "0"], r"argument --lr: must be a finite number > 0, got 0"),
    (["train", "--lr", "nan"], r"argument --lr: must be a finite number > 0, got nan"),
    (["train", "--momentum", "-0.5"], r"argument --momentum: must be a finite number >= 0, got -0.5"),
    (["train", "--seed", "-1"], r"argument --seed: must be an integer >= 0, got -1"),
    (["train", "--crop-padding", "-2"], r"argument --crop-padding: must be an integer >= 0, got -2"),
    (["train", "--checkpoint-every", "0"], r"argument --checkpoint-every: must be an integer >= 1"),
    (["train", "--eval-batch-size", "0"], r"argument --eval-batch-size: must be an integer >= 1"),
])
def test_bad_numbers_are_refused_by_the_parser(argv, message, capsys, no_demo_run):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"sparse-hetconv {argv[0]}: error: " in err and __import__("re").search(message, err), err
    assert "Traceback" not in err


def test_demo_output_is_checked_before_the_work(tmp_path, capsys, no_demo_run):
    assert main(["demo", "--out", str(tmp_path / "missing" / "x.json")]) == 2
    line = _one_error_line(capsys.readouterr().err, "demo")
    assert line.endswith(f"{tmp_path / 'missing' / 'x.json'}: the folder of this output file does not exist"), line
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert _one_error_line(capsys.readouterr().err, "demo").endswith(f"{tmp_path}: is a folder, expected a file name")


@POSIX
def test_demo_into_an_unwritable_folder_fails_before_the_work(tmp_path, capsys, no_demo_run):
    from test_files import _unwritable  # the same unwritable folder the file tests use

    locked = _unwritable(tmp_path)
    assert main(["demo", "--out", str(locked / "x.json")]) == 2
    line = _one_error_line(capsys.readouterr().err, "demo")
    assert line == f"sparse-hetconv demo: error: {locked}: cannot write into this folder (Permission denied)", line


@pytest.mark.parametrize("error, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/run/best.pt"), "/data/run/best.pt: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "out.pt"), "out.pt: No space left on device"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "x"), "x: Is a directory"),
    (FileExistsError("out.pt exists; pass force=True (--force) to overwrite it"),
     "out.pt exists; pass force=True (--force) to overwrite it"),
    (ValueError("part (3) must divide 64\nsecond line"), "part (3) must divide 64 second line"),
    (TypeError("bias must be a bool"), "bias must be a bool"),
    (MemoryError(), "out of memory"),
], ids=["permission", "disk-full", "is-a-folder", "exists", "value", "type", "memory"])
def test_user_and_environment_errors_are_one_line(error, expected, monkeypatch, tmp_path, capsys):
    from sparse_hetconv.cli import demo

    def fail(**kwargs):
        raise error

    monkeypatch.setattr(demo, "run_demo", fail)
    assert main(["demo", "--out", str(tmp_path / "x.json")]) == 2
    assert _one_error_line(capsys.readouterr().err, "demo") == f"sparse-hetconv demo: error: {expected}"


def test_ctrl_c_is_status_130_and_quiet(monkeypatch, tmp_path, capsys):
    from sparse_hetconv.cli import demo

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert main(["demo", "--out", str(tmp_path / "x.json")]) == 130
    captured = capsys.readouterr()
    assert captured.err == "" and "Traceback" not in captured.out
    assert not (tmp_path / "x.json").exists()


def test_warnings_are_one_line_too(monkeypatch, tmp_path, capsys):
    from sparse_hetconv.cli import demo

    def warns(**kwargs):
        warnings.warn("something to know\nabout")
        raise ValueError("stop here")

    monkeypatch.setattr(demo, "run_demo", warns)
    assert main(["demo", "--out", str(tmp_path / "x.json")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["sparse-hetconv demo: warning: something to know about",
                     "sparse-hetconv demo: error: stop here"], lines


def test_a_bug_still_shows_its_traceback(monkeypatch, tmp_path):
    from sparse_hetconv.cli import demo

    def bug(**kwargs):
        raise RuntimeError("a bug, not the user's mistake")

    monkeypatch.setattr(demo, "run_demo", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["demo", "--out", str(tmp_path / "x.json")])


def test_train_resume_of_a_missing_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "runs" / "last.pt"
    assert main(["train", "--resume", str(missing)]) == 2
    assert _one_error_line(capsys.readouterr().err, "train") == \
        f"sparse-hetconv train: error: {missing}: checkpoint does not exist"


def test_help_is_status_0(capsys):
    assert main(["--help"]) == 0 and "demo" in capsys.readouterr().out


def test_installed_entry_point_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sparse_hetconv", "convert", str(tmp_path / "nope.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("sparse-hetconv convert: error: ") and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    import platform

    import sparse_hetconv

    assert out == f"sparse-hetconv {sparse_hetconv.__version__} (torch {__import__('torch').__version__}, Python " \
                  f"{platform.python_version()})", out


def _damaged_checkpoints(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files a user may pass by mistake, and the reason each error line must give."""
    import torch

    from sparse_hetconv.models import vgg16_cifar

    torch.save(vgg16_cifar(part=4, form="masked").state_dict(), folder / "good.pt")
    raw = (folder / "good.pt").read_bytes()
    cases = {
        "cut_early.pt": (raw[: len(raw) // 1000], r"truncated or damaged: OSError: \[Errno 22\] Invalid argument"),
        "cut_half.pt": (raw[: len(raw) // 2], r"truncated or damaged: RuntimeError: PytorchStreamReader failed "
                                              r"reading zip archive: failed finding central directory\)$"),
        "notes.txt": (b"hello world\n", r"not a file written by torch.save: it begins with b'hello wo'\)$"),
        "empty.pt": (b"", r"the file is empty\)$"),
    }
    for name, (content, _) in cases.items():
        (folder / name).write_bytes(content)
    return {name: (folder / name, reason) for name, (_, reason) in cases.items()}


@pytest.mark.parametrize("command", ["convert", "export"])
def test_damaged_checkpoints_are_one_line_naming_the_file(command, tmp_path, capsys):
    """A truncated checkpoint gave a bare "[Errno 22] Invalid argument" naming no file, a text
    file "torch.load with weights_only=True failed: 101"."""
    import re

    for name, (path, reason) in _damaged_checkpoints(tmp_path).items():
        out = tmp_path / "out.pt2"
        argv = [command, str(path), str(out)] if command == "convert" else [command, str(path), "--out", str(out)]
        assert main(argv) == 2, name
        line = _one_error_line(capsys.readouterr().err, command)
        assert re.search(re.escape(f"{path} is not a readable PyTorch checkpoint (") + reason, line), line
        assert not out.exists(), f"{name}: something was written"


@pytest.mark.parametrize("size, message", [
    ("1,32,32", r"model vgg16_cifar failed on a random input of shape \(8, 1, 32, 32\) \(RuntimeError: .*\); pass "
                r"input_size \(--input-size C,H,W\) that it takes"),
    ("3,1,1", r"failed on a random input of shape \(8, 3, 1, 1\) \(RuntimeError: .*Output size is too small\)"),
    ("3,-1,32", r"--input-size \(3,-1,32\) must be C,H,W \(or C,D,H,W\): comma-separated ints >= 1, e.g. 3,32,32"),
    ("3,32", r"--input-size \(3,32\) must be C,H,W"),
])
def test_convert_input_size_mistakes(size, message, tmp_path, capsys):
    import re

    import torch

    from sparse_hetconv.models import vgg16_cifar

    torch.save(vgg16_cifar(part=4, form="masked").state_dict(), tmp_path / "in.pt")
    assert main(["convert", str(tmp_path / "in.pt"), str(tmp_path / "out.pt"), "--input-size", size]) == 2
    assert re.search(message, _one_error_line(capsys.readouterr().err, "convert"))
    assert not (tmp_path / "out.pt").exists()
