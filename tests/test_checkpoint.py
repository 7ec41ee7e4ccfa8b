"""Tests for checkpoint conversion (sparse_hetconv.checkpoint, ``sparse-hetconv convert``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from published import HetConv, sxpro_vgg, train_briefly, zhang_vgg
from sparse_hetconv import MaskedHetConv2d, SparseHetConv2d, cli, convert_checkpoint, hetconvify
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
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")  # tiny probes: one thread is faster
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

    add("truncated.pt", raw[: len(raw) // 2], r"is not a readable PyTorch checkpoint \(truncated or damaged: "
        "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory\\)")
    # cut inside its first record, torch raised a bare OSError "[Errno 22] Invalid argument" naming no file
    add("cut_early.pt", raw[: len(raw) // 1000], r"cut_early.pt is not a readable PyTorch checkpoint \(truncated or "
        r"damaged: OSError: \[Errno 22\] Invalid argument\)")
    add("text.pt", b"this is not a checkpoint\n", r"text.pt is not a readable PyTorch checkpoint \(not a file written "
        r"by torch.save: it begins with b'this is '\)")  # was "torch.load with weights_only=True failed: 101"
    add("empty.pt", b"", r"is not a readable PyTorch checkpoint \(the file is empty\)")
    add("code.pt", {"model": nn.Linear(2, 2)}, r"weights_only=True failed: .*; save model.state_dict\(\) instead")
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
    with pytest.raises(FileNotFoundError, match="checkpoint does not exist: '.*nope.pt'"):
        convert_checkpoint(tmp_path / "nope.pt", tmp_path / "out.pt")
    with pytest.raises(IsADirectoryError, match="is a folder, expected a checkpoint file"):  # was "does not exist"
        convert_checkpoint(tmp_path, tmp_path / "out.pt")
    torch.save(masked.state_dict(), tmp_path / "in.pt")
    with pytest.raises(FileNotFoundError, match="folder of this output file does not exist"):
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


# -- any architecture: the user's model factory ------------------------------------------------------
@pytest.fixture(autouse=True)
def isolated(monkeypatch, one_thread):
    """One thread for the tiny conversion probes; the command line puts the current folder on
    sys.path, which must not outlive the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def zhang_checkpoint(path: Path, cfg: str = "A", dtype=torch.float32, seed: int = 0) -> nn.Module:
    """zhang943's VGG (8x narrower), trained a few steps and saved the way train_cifar10.py does."""
    torch.manual_seed(seed)
    model = train_briefly(zhang_vgg(cfg, p=4, width=8), (4, 3, 32, 32), steps=2).to(dtype)
    torch.save({"net": nn.DataParallel(model).state_dict(), "acc": 93.74, "epoch": 199}, path)
    return model


def assert_same_function(source: nn.Module, converted: nn.Module, shape, rtol: float) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted.double()(x), source.double()(x), rtol=rtol, atol=rtol,
                                   msg=lambda m: f"converted checkpoint vs its source model: {m}")


@pytest.mark.parametrize("cfg", ["A", "D", "E"])  # VGG-11, VGG-16, VGG-19
def test_zhang943_checkpoints_convert_with_one_command(cfg, tmp_path, capsys):
    source, target = tmp_path / f"vgg_{cfg}.pth", tmp_path / "sparse.pt"
    model = zhang_checkpoint(source, cfg)
    kwargs = {"cfg": cfg, "p": 4, "width": 8}
    assert cli.main(["convert", str(source), str(target), "--model", "published:zhang_vgg",
                     "--model-kwargs", json.dumps(kwargs)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    layers = sum(isinstance(m, HetConv) for m in model.modules())
    assert f"published:zhang_vgg(part=4): {source} (source) -> {target} (sparse, float32)" in out, out
    assert f"converted {layers} layers; channel permutations left at run time: none" in out, out
    loaded, info = load_model(target, "published:zhang_vgg", model_kwargs=kwargs)
    assert info == {"model": "published:zhang_vgg", "form": "sparse", "part": 4, "num_classes": 10}, info
    assert sum(isinstance(m, SparseHetConv2d) for m in loaded.modules()) == layers
    assert_same_function(model.eval(), loaded, (2, 3, 32, 32), rtol=1e-5)


def test_sxpro_shifted_layers_convert_from_the_command_line(tmp_path, capsys):
    torch.manual_seed(0)
    model = train_briefly(sxpro_vgg("HetConv2d"), (4, 3, 8, 8), steps=2)
    source, target = tmp_path / "sxpro.pt", tmp_path / "sparse.pt"
    torch.save({"state_dict": model.state_dict()}, source)
    assert cli.main(["convert", str(source), str(target), "--model", "published:sxpro_vgg", "--model-arg",
                     "layer=HetConv2d", "--model-arg", "p=4", "--input-size", "3,8,8"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "converted 3 layers; channel permutations left at run time: none" in out and "3x8x8" in out, out
    loaded, info = load_model(target, "published:sxpro_vgg", model_kwargs={"layer": "HetConv2d", "p": 4})
    assert info["form"] == "sparse" and info["part"] == 4
    assert_same_function(model, loaded, (2, 3, 8, 8), rtol=1e-5)


def test_a_float16_checkpoint_stays_float16(tmp_path):
    source, target = tmp_path / "half.pt", tmp_path / "out.pt"
    model = zhang_checkpoint(source, dtype=torch.float16)
    report = convert_checkpoint(source, target, model="published:zhang_vgg", model_kwargs={"width": 8, "cfg": "A"})
    written = torch.load(target, weights_only=True)
    floating = {v.dtype for v in written.values() if v.is_floating_point()}
    assert floating == {torch.float16} and report.dtype == "float16", f"the output became {floating}"
    loaded, _ = load_model(target, "published:zhang_vgg", model_kwargs={"width": 8, "cfg": "A"})
    assert next(loaded.parameters()).dtype == torch.float16
    assert_same_function(model, loaded, (2, 3, 32, 32), rtol=2e-3)  # folded centre taps rounded once to float16


ZHANG_PLAIN = {"cfg": "A", "p": 1, "width": 8}  # zhang943's VGG-11 with standard convolutions (p = 1), 8x narrower


def hetconvified_zhang() -> nn.Module:
    """hetconvify applied twice to a plain CNN: part 2 (masked form) at features.4, part 4 (sparse)
    at the other convolutions but the stem; trained a few steps."""
    torch.manual_seed(0)
    model = hetconvify(zhang_vgg(**ZHANG_PLAIN), part=2, form="masked", include=lambda path, _: path == "features.4",
                       return_report=False)
    model = hetconvify(model, part=4, return_report=False)
    return train_briefly(model, (4, 3, 32, 32), steps=2)


def test_hetconvify_checkpoints_load_with_the_original_factory(tmp_path, capsys):
    """The state_dict says what hetconvify did (which layers: the keys; part: the shapes; form:
    the key names): load_model re-applies it to the factory's plain model, prefixes and wrappers
    as for any checkpoint; convert converts the masked layer and its output loads back too."""
    model = hetconvified_zhang()
    source = tmp_path / "het.pt"
    torch.save({"net": nn.DataParallel(model).state_dict(), "epoch": 3}, source)
    loaded, info = load_model(source, "published:zhang_vgg", model_kwargs=ZHANG_PLAIN)
    assert info["form"] == "hetconvify" and info["part"] is None, info  # two parts
    layers = {name: (type(m).__name__, m.part) for name, m in loaded.named_modules()
              if isinstance(m, (SparseHetConv2d, MaskedHetConv2d))}
    assert layers == {name: (type(m).__name__, m.part) for name, m in model.named_modules()
                      if isinstance(m, (SparseHetConv2d, MaskedHetConv2d))}, layers
    assert layers["features.4"] == ("MaskedHetConv2d", 2) and layers["features.8"] == ("SparseHetConv2d", 4), layers
    assert_same_outputs(model, loaded)
    args = ["--model", "published:zhang_vgg"] + [f"--model-arg={k}={v}" for k, v in ZHANG_PLAIN.items()]
    assert cli.main(["convert", str(source), str(tmp_path / "sparse.pt"), *args]) == 0, capsys.readouterr().err
    assert "converted 1 layers" in capsys.readouterr().out
    converted, info = load_model(tmp_path / "sparse.pt", "published:zhang_vgg", model_kwargs=ZHANG_PLAIN)
    assert info["form"] == "hetconvify" and isinstance(converted.features[4], SparseHetConv2d), info
    assert_same_outputs(model, converted)


def test_hetconvify_checkpoints_that_do_not_fit_say_what_to_do(tmp_path):
    state = hetconvified_zhang().state_dict()
    torch.save(state, tmp_path / "het.pt")
    # width 4 doubles the channels: the parts read from the shapes double too, and the shapes do not fit
    with pytest.raises(ValueError, match=r"het.pt does not fit hetconvify\(published:zhang_vgg\(\), part=4, "
                       r"form='masked' at 1 layer, part=8, form='sparse' at 6 layers\): wrong shapes: .*pass the "
                       r"factory and model_kwargs it was saved with"):
        load_model(tmp_path / "het.pt", "published:zhang_vgg", model_kwargs={**ZHANG_PLAIN, "width": 4})
    stem = state.pop("features.0.weight")  # the stem (3 -> 8 channels) as a HetConv of part 3: 8 filters do not split
    state.update({"features.0.weight_kxk": stem[:, :1], "features.0.weight_1x1": stem[:, 1:, 1, 1]})
    torch.save(state, tmp_path / "stem.pt")
    with pytest.raises(ValueError, match=r"stem.pt holds HetConv layers where the model has convolutions hetconvify "
                       r"cannot replace: features.0: .*out_channels \(8\)"):
        load_model(tmp_path / "stem.pt", "published:zhang_vgg", model_kwargs=ZHANG_PLAIN)


def test_common_wrappers_and_prefixes_are_read(tmp_path):
    torch.manual_seed(0)
    model = zhang_vgg("A", p=4, width=8).eval()
    source = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, source)
    report = convert_checkpoint(source, tmp_path / "out.pt", model="published:zhang_vgg",
                                model_kwargs={"width": 8, "cfg": "A"})
    assert report.relative_diff < 1e-9 and len(report.converted) == 7, report


def test_non_finite_weights_are_refused_unless_allowed(tmp_path, capsys):
    source, target = tmp_path / "nan.pt", tmp_path / "out.pt"
    zhang_checkpoint(source)
    state = torch.load(source, weights_only=True)
    state["net"]["module.features.4.gwc.weight"][0, 0, 1, 1] = float("nan")
    torch.save(state, source)
    args = ["convert", str(source), str(target), "--model", "published:zhang_vgg", "--model-arg", "width=8",
            "--model-arg", "cfg=A"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparse-hetconv convert: error:") and "non-finite values (inf or NaN) in 1 tensors: " \
        "features.4.gwc.weight (1 of" in err and "--allow-nonfinite" in err, err
    assert not target.exists()
    assert cli.main(args + ["--allow-nonfinite"]) == 0
    err = capsys.readouterr().err  # the command line shows warnings as one line each
    assert "sparse-hetconv convert: warning:" in err and "converting anyway" in err, err
    assert target.exists()


def test_output_checks_come_before_any_work(tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    taken = tmp_path / "taken.pt"
    taken.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="exists; pass force=True"):  # not "not a readable checkpoint"
        convert_checkpoint(garbage, taken, model="published:zhang_vgg")
    with pytest.raises(ValueError, match=r"model \('nope:f'\): cannot import 'nope'"):
        convert_checkpoint(garbage, tmp_path / "new.pt", model="nope:f")  # before reading the file
    def unwritable(path, *args, **kwargs):  # (as root os.access and file modes say nothing)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", unwritable)  # the write probe of the output's folder fails
    with pytest.raises(PermissionError, match="cannot write into this folder"):
        convert_checkpoint(garbage, tmp_path / "new.pt")
    monkeypatch.undo()
    assert taken.read_bytes() == b"keep me"


@pytest.mark.parametrize("extra, message", [
    (["--model", "nosuchmodule:build"], r"cannot import 'nosuchmodule' .*PYTHONPATH"),
    (["--model", "published:nope"], r"'published' has no attribute 'nope'"),
    (["--model", "published:ZHANG_CFG"], r"names a dict, expected a function or class"),
    (["--model", "published:zhang_vgg", "--model-kwargs", "[1]"], r"--model-kwargs \('\[1\]'\) must be a JSON object"),
    (["--model", "published:zhang_vgg", "--model-kwargs", "{bad"], r"is not valid JSON"),
    (["--model", "published:zhang_vgg", "--model-arg", "width"], r"--model-arg \('width'\) must be KEY=VALUE"),
    (["--model", "published:zhang_vgg", "--model-arg", "cfg=Z"], r"published:zhang_vgg with arguments \{'cfg': 'Z'\} "
                                                                 r"failed: KeyError"),
    (["--model", "published:zhang_vgg", "--model-arg", "width=8", "--model-arg", "p=1"],
     r"published:zhang_vgg has no HetConv layer to convert"),
    (["--model", "published:zhang_vgg"], r"does not fit published:zhang_vgg: .*wrong shapes: features.0.weight"),
    (["--model", "published:zhang_vgg", "--model-arg", "width=8", "--input-size", "3,x"], r"--input-size"),
])
def test_model_mistakes_are_one_line_errors(extra, message, tmp_path, capsys):
    source, target = tmp_path / "in.pt", tmp_path / "out.pt"
    zhang_checkpoint(source)
    if "p=1" in extra:  # a checkpoint of the standard VGG that p=1 builds: nothing to convert
        torch.save(zhang_vgg("A", p=1, width=8).state_dict(), source)
    if "--model-arg" in extra and "width=8" in extra and "cfg=A" not in extra:
        extra = extra + ["--model-arg", "cfg=A"]
    assert cli.main(["convert", str(source), str(target)] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparse-hetconv convert: error:") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not target.exists()
