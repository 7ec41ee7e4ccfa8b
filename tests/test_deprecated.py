"""Every 0.1 name that moved in 0.2 still works, warns with a DeprecationWarning that names the new
spelling and points at the caller's line (CHANGELOG.md lists them)."""

import importlib
import subprocess
import sys

import pytest
import scipy.sparse
import torch
from torch import nn

import sparse_hetconv
from sparse_hetconv import SparseHetConv2d, hetconvify
from sparse_hetconv._deprecated import ATTRIBUTES, MODULES


@pytest.mark.parametrize("old,new", sorted(MODULES.items()))
def test_old_module_paths_import_the_new_module(old, new):
    if "submanifold" in new:
        pytest.importorskip("spconv", reason="the spconv extra is not installed")
    code = (f"import warnings, {new.rpartition('.')[0] or new}\nwarnings.simplefilter('always')\n"
            f"with warnings.catch_warnings(record=True) as caught:\n"
            f"    warnings.simplefilter('always')\n    import {old} as old\n"
            f"import {new} as new\nassert old is new, 'the old path must be the new module'\n"
            f"ours = [w for w in caught if str(w.message).startswith({old!r} + ' ')]\n"  # (an old package warns too)
            "print(ours[0].category.__name__, ours[0].filename, '|', ours[0].message)")
    code += f"\nassert new.__spec__.name == {new!r}, f'the new module got the spec of {{new.__spec__.name}}'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    category, filename, *_ = proc.stdout.split()
    assert category == "DeprecationWarning" and filename == "<string>", proc.stdout
    assert new in proc.stdout, f"the warning must name {new}: {proc.stdout}"


@pytest.mark.parametrize("name", sorted(ATTRIBUTES))
def test_old_top_level_names_resolve_and_warn(name):
    module, attr = ATTRIBUTES[name]
    with pytest.warns(DeprecationWarning, match=module) as caught:
        value = getattr(sparse_hetconv, name)
    target = importlib.import_module(module)
    assert value is (target if attr is None else getattr(target, attr))
    assert caught[0].filename == __file__, "the warning must point at the caller"


def test_renamed_methods_and_arguments_still_work():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    with pytest.warns(DeprecationWarning, match="from_conv"):
        old = SparseHetConv2d.from_dense(conv, part=2)
    with pytest.warns(DeprecationWarning, match="'center'"):
        centre = SparseHetConv2d.from_conv(conv, part=2, reduce="centre")
    new = SparseHetConv2d.from_conv(conv, part=2, reduce="center")
    for layer in (old, centre):
        assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), new.parameters()))
    matrix = scipy.sparse.csr_array(new.to_scipy())
    with pytest.warns(DeprecationWarning, match="load_scipy"):
        assert old.from_scipy(matrix) is old
    with pytest.warns(DeprecationWarning, match="return_report"):
        model, report = hetconvify(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), conv), part=2)
    assert report.replaced == ["1"]


@pytest.mark.parametrize("module, old, new", [
    ("sparse_hetconv.training", "train_cifar", "train"), ("sparse_hetconv.training", "Cifar10", "ImageData"),
    ("sparse_hetconv.training.trainer", "train_cifar", "train"), ("sparse_hetconv.training.data", "Cifar10", "ImageData"),
])
def test_names_renamed_with_the_training_package(module, old, new):
    target = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{old} is deprecated \(renamed\); use {new}") as caught:
        assert getattr(target, old) is getattr(target, new)
    assert caught[0].filename == __file__, "the warning must point at the caller"
    with pytest.raises(AttributeError, match=f"module '{module}' has no attribute 'nothing'"):
        target.nothing


def test_renamed_functions_in_modules():
    from sparse_hetconv import autotune, checkpoint, convert, functional

    with pytest.warns(DeprecationWarning, match="autotune.choose"):
        assert functional.select_backend is autotune.choose
    with pytest.warns(DeprecationWarning, match="infer_form"):
        assert checkpoint.infer_layout is checkpoint.infer_form
    with pytest.warns(DeprecationWarning, match="ConversionReport"):
        assert convert.HetConvifyReport is convert.ConversionReport


@pytest.mark.parametrize("name", sorted(ATTRIBUTES))
def test_a_from_import_of_an_old_name_warns_once(name):
    """``from sparse_hetconv import name``: the import machinery probes the name with hasattr before
    the statement looks it up; only one warning may come of it."""
    with pytest.warns(DeprecationWarning) as caught:
        exec(f"from sparse_hetconv import {name}", {})
    assert len([w for w in caught if name in str(w.message)]) == 1, [str(w.message) for w in caught]
