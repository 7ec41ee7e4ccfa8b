"""Tests for checkpoint conversion (sparse_hetconv.checkpoint, ``sparse-hetconv convert``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sparse_hetconv import cli, convert_checkpoint
from sparse_hetconv.checkpoint import infer_form, load_model, state_dict_of
from sparse_hetconv.models import resnet18, vgg16_cifar

REPO = Path(__file__).resolve().parents[1]


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give a model non-default BatchNorm statistics, as a trained checkpoint has."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(100)
    return model.eval()


@pytest.fixture(scope="module")
def masked():
    torch.manual_seed(0)
    return trained_like(vgg16_cifar(part=4, form="masked"))


def sparse_from(path: Path, part: int = 4, num_classes: int = 10) -> nn.Module:
    model = vgg16_cifar(part=part, form="sparse", num_classes=num_classes)
    model.load_state_dict(torch.load(path, weights_only=True))  # strict: every key, right shapes
    return model.eval()


def assert_same_outputs(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["bare", "wrapped", "dataparallel"])
def test_convert_from_the_command_line(masked, layout, tmp_path, capsys):
    state = masked.state_dict()
    if layout == "wrapped":
        state = {"epoch": 330, "best_acc": 93.9, "state_dict": state}
    elif layout == "dataparallel":
        state = {"net": {f"module.{k}": v for k, v in state.items()}, "acc": 94.0}
    source, target = tmp_path / "masked.pth", tmp_path / "sparse.pt"
    torch.save(state, source)
    assert cli.main(["convert", str(source), str(target)]) == 0
    out = capsys.readouterr().out
    assert "5,590,538 -> sparse 5,181,962" in out, out  # stored parameters, masked vs sparse, P = 4
    assert f"{source.stat().st_size:,} B -> {target.stat().st_size:,} B" in out, out
    assert "max |masked(x) - sparse(x)|" in out
    assert_same_outputs(masked, sparse_from(target))


def test_convert_in_a_fresh_process(masked, tmp_path):
    source, target = tmp_path / "masked.pt", tmp_path / "sparse.pt"
    torch.save(masked.state_dict(), source)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "sparse_hetconv", "convert", str(source), str(target)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "vgg16_cifar(part=4)" in done.stdout
    assert_same_outputs(masked, sparse_from(target))


@pytest.mark.parametrize("part", [2, 8])
def test_part_and_classes_read_from_the_weights(part, tmp_path):
    model = trained_like(vgg16_cifar(part=part, form="masked", num_classes=100))
    source, target = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(model.state_dict(), source)
    report = convert_checkpoint(source, target)
    assert (report.part, report.num_classes) == (part, 100)
    assert report.max_abs_diff < 1e-4
    assert_same_outputs(model, sparse_from(target, part, 100))
    assert infer_form(torch.load(target, weights_only=True)) == ("sparse", part)


def test_other_registered_model(tmp_path):
    model = trained_like(resnet18(part=2, form="masked", num_classes=10))
    torch.save(model.state_dict(), tmp_path / "in.pt")
    report = convert_checkpoint(tmp_path / "in.pt", tmp_path / "out.pt", model="resnet18")
    loaded, info = load_model(tmp_path / "out.pt", "resnet18")
    assert info == {"model": "resnet18", "form": "sparse", "part": 2, "num_classes": 10}
    assert report.sparse_params < report.masked_params
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)


def test_old_checkpoint_without_num_batches_tracked(masked, tmp_path):
    state = {k: v for k, v in masked.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pt")
    convert_checkpoint(tmp_path / "old.pt", tmp_path / "new.pt")
    assert_same_outputs(masked, sparse_from(tmp_path / "new.pt"))


# -- bad files --------------------------------------------------------------------------------------
def _bad_files(masked, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.pt"
    torch.save(masked.state_dict(), good)
    raw = good.read_bytes()
    cases = {}

    def add(name, content, message):
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        cases[name] = (path, message)

    add("truncated.pt", raw[: len(raw) // 2], "is not a readable PyTorch checkpoint")
    add("text.pt", b"this is not a checkpoint\n", "is not a readable PyTorch checkpoint")
    add("empty.pt", b"", "is not a readable PyTorch checkpoint")
    add("code.pt", {"model": nn.Linear(2, 2)}, r"weights_only=True failed")  # a pickled module: refused
    add("list.pt", [torch.zeros(3)], "does not hold a state_dict")
    add("no_tensors.pt", {"epoch": 3, "acc": 0.9}, "does not hold a state_dict")
    wrong_keys = dict(masked.state_dict())
    wrong_keys["classifier.9.weight"] = wrong_keys.pop("classifier.3.weight")
    add("wrong_keys.pt", wrong_keys, r"does not fit vgg16_cifar\(part=4, form='masked'\): missing keys: "
        r"classifier.3.weight \(1\); unexpected keys: classifier.9.weight")
    wrong_shape = dict(masked.state_dict())
    wrong_shape["features.7.pwc.weight"] = torch.zeros(128, 32, 1, 1)
    add("wrong_shape.pt", wrong_shape, r"wrong shapes: features.7.pwc.weight \(128, 32, 1, 1\) "
        r"\(expected \(128, 64, 1, 1\)\)")
    bad_part = dict(masked.state_dict())
    bad_part["features.3.gwc.weight"] = torch.zeros(64, 5, 3, 3)
    add("bad_part.pt", bad_part, r"cannot read the HetConv part from 'features.3.gwc.weight'")
    add("already_sparse.pt", vgg16_cifar(part=4, form="sparse").state_dict(), "already holds a sparse-form")
    return cases


def test_bad_files_give_a_clear_error_and_no_output(masked, tmp_path, capsys):
    for name, (path, message) in _bad_files(masked, tmp_path).items():
        target = tmp_path / f"{name}.out"
        with pytest.raises(ValueError, match=message):
            convert_checkpoint(path, target)
        assert not target.exists(), f"{name}: an output file was written"
        assert cli.main(["convert", str(path), str(target)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("sparse-hetconv convert: error:") and str(path) in err, err
        assert not target.exists(), f"{name}: the command line wrote an output file"
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_existing_output_needs_force(masked, tmp_path, capsys):
    source, target = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(masked.state_dict(), source)
    target.write_bytes(b"keep me")
    assert cli.main(["convert", str(source), str(target)]) == 2
    assert "exists; pass force=True (--force)" in capsys.readouterr().err
    assert target.read_bytes() == b"keep me"
    assert cli.main(["convert", str(source), str(target), "--force"]) == 0
    assert_same_outputs(masked, sparse_from(target))


def test_missing_paths(masked, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(tmp_path / "nope.pt", tmp_path / "out.pt")
    torch.save(masked.state_dict(), tmp_path / "in.pt")
    with pytest.raises(FileNotFoundError, match="folder of the output file"):
        convert_checkpoint(tmp_path / "in.pt", tmp_path / "no" / "out.pt")
    with pytest.raises(ValueError, match=r"model \('vgg19'\) is not registered"):
        convert_checkpoint(tmp_path / "in.pt", tmp_path / "out.pt", model="vgg19")
    assert not (tmp_path / "out.pt").exists()


def test_state_dict_of_unwraps():
    state = {"a.weight": torch.zeros(1)}
    assert state_dict_of(state) == state
    assert state_dict_of({"model_state_dict": {"module.a.weight": torch.zeros(1)}, "epoch": 1}).keys() == {"a.weight"}
    with pytest.raises(ValueError, match="got list"):
        state_dict_of([1, 2])
