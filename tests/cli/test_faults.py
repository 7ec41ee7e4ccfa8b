"""Fault tests: ``convert`` and ``train`` killed with SIGTERM and SIGKILL in the middle of a write.

The command runs in a child process started with ``python -c HELPER``: the helper (not the
library) reads ``SPARSE_HETCONV_TEST_SLOW_SAVE``, replaces ``torch.save`` by one that writes half
of the file, creates that marker file and sleeps, so the test kills the child exactly mid-write.
Afterwards the previous files must be intact and nothing partial at the destination (what a
killed write leaves is a hidden ``.NAME.*.tmp`` beside it), and the next run into the folder works.
The SIGTERM and the SIGKILL child of a command run side by side, each in its own folder, on a
five-layer VGG the helper registers (VGG-16's first calls into oneDNN would cost seconds a child).
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_hetconv import cli
from sparse_hetconv.models import _registry, create_model

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGTERM, SIGKILL and process ids are POSIX")

MARKER_ENV = "SPARSE_HETCONV_TEST_SLOW_SAVE"
REPO = Path(__file__).resolve().parents[2]
MODEL = "fault_test_vgg"
# A registered model with the VGG layout at a fraction of the layers: the same code as the tests'.
REGISTER = f"""
from sparse_hetconv.models import VGG, register_model


def {MODEL}(part=4, form="sparse", num_classes=10, backend="auto", memory_format=None):
    return VGG((8, "M", 16, "M", 16, "M", 16, "M", 16, "M"), part, form, num_classes, backend, memory_format)


register_model({MODEL})
"""
HELPER = f"""
import io, os, sys, time
import torch
{REGISTER}

marker = os.environ[{MARKER_ENV!r}]
real_save = torch.save


def slow_save(obj, file, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    if isinstance(file, (str, os.PathLike)):
        file = open(file, "wb")
    file.write(data[: len(data) // 2])
    file.flush()
    with open(marker, "w") as note:
        note.write("writing")
    time.sleep(120)  # killed here
    file.write(data[len(data) // 2:])


torch.save = slow_save
from sparse_hetconv.cli import main
raise SystemExit(main(sys.argv[1:]))
"""
SIGNALS = (signal.SIGTERM, signal.SIGKILL)


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.endswith(".tmp")}


def _kill_mid_write(runs: dict[int, tuple[list[str], Path]]) -> dict[int, subprocess.CompletedProcess]:
    """For each ``signum: (argv, marker)``, run ``sparse-hetconv ARGV`` in a child (all at once),
    wait until it is half-way through writing a file, send it ``signum``; return how each ended."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    children = {signum: subprocess.Popen([sys.executable, "-c", HELPER, *argv], env={**env, MARKER_ENV: str(marker)},
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for signum, (argv, marker) in runs.items()}
    done = {}
    try:
        deadline = time.monotonic() + 120
        while len(done) < len(children):
            for signum, child in children.items():
                if signum in done:
                    continue
                if runs[signum][1].exists():
                    child.send_signal(signum)
                    out, err = child.communicate(timeout=180)  # generous: CI machines can be loaded
                    done[signum] = subprocess.CompletedProcess(child.args, child.returncode, out, err)
                elif child.poll() is not None:
                    out, err = child.communicate()
                    pytest.fail(f"the child for signal {signum} ended (status {child.returncode}) before its "
                                f"write: {err[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("a child did not reach its write within 120 s")
            time.sleep(0.02)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.communicate()
    return done


def _check_killed(done: subprocess.CompletedProcess, signum: int) -> None:
    assert done.returncode == -signum, \
        f"expected death by signal {signum}, got status {done.returncode}: {done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.fixture(scope="module", autouse=True)
def small_model():
    """The helper's model, registered in this process too for the runs after a kill."""
    exec(REGISTER, {})
    yield MODEL
    _registry._MODELS.pop(MODEL)  # the registry sweep of tests/models must not see it


# -- convert ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def masked_checkpoint(tmp_path_factory, small_model) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("masked") / "masked.pt"
    torch.save(create_model(small_model, part=4, form="masked").state_dict(), path)
    return path


def test_convert_killed_mid_write_keeps_the_previous_output(masked_checkpoint, tmp_path):
    runs, targets = {}, {}
    for signum in SIGNALS:
        out = tmp_path / signal.Signals(signum).name
        out.mkdir()
        targets[signum] = target = out / "sparse.pt"
        target.write_bytes(b"the previous conversion")
        convert = ["convert", str(masked_checkpoint), str(target), "--force", "--model", MODEL]
        runs[signum] = (convert, tmp_path / f"marker{signum}")
    done = _kill_mid_write(runs)
    for signum, target in targets.items():
        _check_killed(done[signum], signum)
        assert target.read_bytes() == b"the previous conversion", f"{signum}: the destination holds a partial file"
        left = _temporaries(target.parent)
        assert len(left) <= 1 and all(name.startswith(".sparse.pt.") for name in left), f"{signum}: {left}"
    # the next run into the folder works
    target = targets[signal.SIGKILL]
    assert cli.main(["convert", str(masked_checkpoint), str(target), "--force", "--model", MODEL]) == 0
    state = torch.load(target, weights_only=True)
    assert any(key.endswith("weight_kxk") for key in state), f"the new output is not a sparse state_dict: {list(state)}"


# -- train ------------------------------------------------------------------------------------------
def _write_cifar10(root: Path) -> None:
    """A 14-image CIFAR-10 folder in the real format (python pickles of uint8 rows and labels)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 4)]:
        entry = {b"labels": [int(v) for v in rng.integers(0, 10, count)],
                 b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8)}
        with open(folder / name, "wb") as file:
            pickle.dump(entry, file, protocol=2)


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory, small_model) -> tuple[Path, Path]:
    """CIFAR-10 and a finished 1-epoch run (last.pt, best.pt, model_sparse.pt)."""
    root = tmp_path_factory.mktemp("faults")
    _write_cifar10(root / "data")
    status = cli.main(["train", "--data", str(root / "data"), "--model", small_model, "--part", "4", "--form",
                       "masked", "--epochs", "1", "--no-progress", "--out", str(root / "run")])
    assert status == 0, "the previous run failed"
    return root / "data", root / "run"


def test_train_killed_mid_write_keeps_the_previous_checkpoints(previous_run, tmp_path):
    data, run = previous_run
    runs, folders = {}, {}
    for signum in SIGNALS:
        folders[signum] = out = tmp_path / signal.Signals(signum).name
        shutil.copytree(run, out)
        resume = ["train", "--data", str(data), "--resume", str(out / "last.pt"), "--epochs", "2", "--no-progress"]
        runs[signum] = (resume, tmp_path / f"marker{signum}")
    before = _snapshot(run)
    assert set(before) == {"last.pt", "best.pt", "model_sparse.pt"}, before.keys()
    done = _kill_mid_write(runs)
    for signum, out in folders.items():
        _check_killed(done[signum], signum)
        assert _snapshot(out) == before, f"{signum}: a checkpoint of the previous run was changed or left partial"
        assert len(_temporaries(out)) <= 1, f"{signum}: {_temporaries(out)}"
    out, resume = folders[signal.SIGKILL], runs[signal.SIGKILL][0]
    assert cli.main(resume) == 0, "resuming after the kill failed"
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2, "the resumed run finished"
