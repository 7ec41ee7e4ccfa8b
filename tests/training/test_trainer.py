"""Tests for the trainer (sparse_hetconv.training.trainer): training, checkpoints, resume, evaluation.

Tiny data sets in the real on-disk formats are written by the tests (``writers.py``); nothing is
downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

np = pytest.importorskip("numpy", reason="the data set readers build numpy arrays")
import torch  # noqa: E402

from sparse_hetconv import cli  # noqa: E402
from sparse_hetconv.models import vgg16_cifar  # noqa: E402
from sparse_hetconv.training import TrainConfig, config_from_checkpoint  # noqa: E402
from sparse_hetconv.training import train  # noqa: E402
from writers import write_cifar10, write_fashion_mnist, write_image_folder  # noqa: E402


def untimed(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in entry.items() if key != "seconds"} for entry in history]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar10(root)


# -- training ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(cifar, tmp_path_factory):
    """One epoch from the command line, resumed for a second; and two epochs straight."""
    root, _ = cifar
    out = tmp_path_factory.mktemp("runs")
    common = ["--data", str(root), "--part", "4", "--form", "masked", "--no-progress", "--checkpoint-every", "1"]
    status = cli.main(["train", *common, "--epochs", "1", "--out", str(out / "a")])
    first = torch.load(out / "a" / "last.pt", weights_only=True)
    resumed = train(data=str(root), epochs=2, resume=str(out / "a" / "last.pt"), out_dir=str(out / "a"),
                          part=4, form="masked", progress=False)
    straight = train(data=str(root), epochs=2, out_dir=str(out / "b"), part=4, form="masked",
                           progress=False, checkpoint_every=5)
    return {"status": status, "out": out, "first": first, "resumed": resumed, "straight": straight, "root": root}


def test_one_epoch_from_the_command_line(runs, capsys):
    assert runs["status"] == 0
    first = runs["first"]
    assert first["epoch"] == 1 and len(first["history"]) == 1
    assert first["config"]["part"] == 4 and first["config"]["lr"] == 0.1 and first["config"]["milestones"] == [
        50, 140, 210, 240, 270, 300], "the published recipe is the default"
    assert set(first) >= {"model", "optimizer", "scheduler", "best_acc"}
    assert "features.3.gwc.weight" in first["model"], "masked form keeps the published layout"


def test_checkpoints_written(runs):
    a, b = runs["out"] / "a", runs["out"] / "b"
    for path in (a / "last.pt", a / "best.pt", a / "model_sparse.pt", b / "last.pt", b / "model_sparse.pt"):
        assert path.is_file(), f"{path} missing"
    assert not list(a.glob("*.tmp")) and not list(b.glob("*.tmp")), "temporary files left behind"
    sparse_state = torch.load(b / "model_sparse.pt", weights_only=True)
    model = vgg16_cifar(part=4, form="sparse")
    model.load_state_dict(sparse_state)  # the final model, in sparse form


def test_resume_gives_the_uninterrupted_run(runs):
    resumed, straight = runs["resumed"], runs["straight"]
    assert [h["epoch"] for h in resumed.history] == [1, 2] == [h["epoch"] for h in straight.history]
    assert untimed(resumed.history) == untimed(straight.history), "a resumed run must repeat the uninterrupted one"
    assert all(h["seconds"] > 0 for h in resumed.history + straight.history), "each epoch's time is recorded"
    for (name, a), b in zip(resumed.model.state_dict().items(), straight.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs between the resumed and the uninterrupted run"


def test_conversion_keeps_accuracy(runs):
    result = runs["straight"]
    assert result.converted_form == "sparse"
    assert result.converted_acc == result.final_acc, "conversion to sparse changed test accuracy"
    assert result.max_logit_diff < 1e-3, f"logits moved by {result.max_logit_diff}"
    assert result.final_acc == result.history[-1]["test_acc"]


def test_eval_only(runs, capsys):
    root, b = runs["root"], runs["out"] / "b"
    result = train(data=str(root), eval_only=True, weights=str(b / "model_sparse.pt"), progress=False)
    assert result.final_acc == runs["straight"].final_acc and result.converted_form == "masked"
    assert result.converted_acc == result.final_acc
    assert cli.main(["train", "--data", str(root), "--eval-only", "--weights", str(b / "last.pt"),
                     "--no-progress"]) == 0
    assert f"test accuracy {100 * runs['straight'].final_acc:.2f}%" in capsys.readouterr().out


def test_command_line_resume_reads_the_recipe(runs):
    from sparse_hetconv.cli.train import config_from_args

    last = runs["out"] / "a" / "last.pt"
    args = cli.build_parser().parse_args(["train", "--resume", str(last), "--epochs", "5", "--lr", "0.1"])
    config = config_from_args(args)
    assert (config.part, config.form, config.epochs, config.seed) == (4, "masked", 5, 0)
    assert config.out_dir == str(last.parent), "a resumed run writes next to its checkpoint by default"
    fresh = config_from_args(cli.build_parser().parse_args(["train", "--milestones", "3,7"]))
    assert (fresh.part, fresh.form, fresh.milestones) == (4, "sparse", (3, 7))


def test_evaluate_takes_any_callable(runs):
    """ONNX Runtime sessions and int8 programs are evaluated as functions of the normalised batch."""
    from sparse_hetconv.training import evaluate, load_cifar10

    data, model = load_cifar10(runs["root"]), runs["straight"].model
    was_training = model.train().training
    accuracy, logits = evaluate(model, data.test_images, data.test_labels, 7, return_logits=True)
    assert model.training == was_training, "evaluate restores a module's train/eval flag"
    model.eval()  # a callable is called as it is: its owner sets the mode
    called = evaluate(lambda x: model(x) * 2, data.test_images, data.test_labels, 7, return_logits=True)
    model.train(was_training)
    assert called[0] == accuracy and torch.allclose(called[1], 2 * logits), "a callable is evaluated like the model"


def test_eval_only_from_a_training_checkpoint(runs):
    result = train(data=str(runs["root"]), eval_only=True, resume=str(runs["out"] / "b" / "last.pt"),
                         progress=False)
    assert result.final_acc == runs["straight"].final_acc == result.converted_acc


def test_resume_with_another_recipe_fails_before_training(runs, tmp_path):
    last = runs["out"] / "a" / "last.pt"
    with pytest.raises(ValueError, match=r"trained with other settings: part=4 \(given 8\)"):
        train(data=str(runs["root"]), resume=str(last), part=8, form="masked", out_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    assert config_from_checkpoint(last)["form"] == "masked"
    weights_only = runs["out"] / "a" / "model_sparse.pt"
    with pytest.raises(ValueError, match="is not a training checkpoint written by sparse_hetconv.train"):
        train(data=str(runs["root"]), resume=str(weights_only), out_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_same_seed_same_run(runs, tmp_path):
    again = train(data=str(runs["root"]), epochs=1, out_dir=str(tmp_path), part=4, form="masked",
                        progress=False)
    assert untimed(again.history) == untimed(runs["first"]["history"]), "the same seed must give the same epoch"


@pytest.mark.parametrize("setting, message", [
    ({"form": "dense"}, r"form \('dense'\) must be one of"),
    ({"part": 0}, r"part \(0\) must be an int >= 1"),
    ({"milestones": (5, 3)}, r"milestones \(\(5, 3\)\) must be increasing"),
    ({"lr": -1.0}, r"lr \(-1.0\) must be a finite number >= 0"),
    ({"model": "alexnet"}, r"model \('alexnet'\) is not registered"),
    ({"eval_only": True}, r"eval_only needs weights"),
    ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "tpu"},
     r"device \('(cuda:0|tpu)'\) is not"),
])
def test_bad_settings(setting, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train(data=str(tmp_path), out_dir=str(tmp_path / "out"), **setting)
    assert not (tmp_path / "out").exists()


def test_unknown_setting_and_missing_data(tmp_path):
    with pytest.raises(TypeError, match=r"unknown settings \['learning_rate'\]"):
        train(learning_rate=0.1)
    with pytest.raises(TypeError, match="config must be a TrainConfig or None, got dict"):
        train({"part": 4})
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        train(TrainConfig(data=str(tmp_path), out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists(), "nothing is written when the data are missing"
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2


def test_eval_only_bad_weights_fail_before_reading_data(tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint"):
        train(data=str(tmp_path / "no_data"), eval_only=True, weights=str(weights))


# -- outputs and resume checkpoints: refused before any work, in one line from the command line --
def _stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparse-hetconv train: error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture
def no_data_read(monkeypatch):
    """Fail the test if the data set is read: the check under test must come first."""
    import sparse_hetconv.training.trainer as train_module

    def load_dataset(*args):
        raise AssertionError("the data set was read although the run was refused")

    monkeypatch.setattr(train_module, "load_dataset", load_dataset)


def test_out_holding_a_run_needs_resume_or_force(runs, capsys, no_data_read):
    a = runs["out"] / "a"
    before = {name: (a / name).read_bytes() for name in ("last.pt", "best.pt", "model_sparse.pt")}
    assert cli.main(["train", "--data", str(runs["root"]), "--out", str(a), "--epochs", "1", "--no-progress"]) == 2
    line = _stderr_line(capsys)
    assert f"{a}: holds a training run (last.pt, best.pt, model_sparse.pt); pass resume (--resume {a / 'last.pt'}) " \
           "to continue it or force=True (--force) to replace it" in line, line
    assert {name: (a / name).read_bytes() for name in before} == before, "the previous run was overwritten"
    with pytest.raises(FileExistsError, match="holds a training run"):
        train(data=str(runs["root"]), out_dir=str(a), epochs=1, progress=False)


def test_resume_into_another_folder_holding_a_run_is_refused(runs, capsys, no_data_read):
    """--resume continues a run in its own folder; into another folder that holds a run it would mix
    the two runs' checkpoints (best.pt of one, last.pt of the other)."""
    a, b = runs["out"] / "a", runs["out"] / "b"
    before = {name: (b / name).read_bytes() for name in ("last.pt", "best.pt", "model_sparse.pt")}
    assert cli.main(["train", "--data", str(runs["root"]), "--resume", str(a / "last.pt"), "--out", str(b),
                     "--epochs", "3", "--no-progress"]) == 2
    assert f"{b}: holds a training run" in _stderr_line(capsys)
    assert {name: (b / name).read_bytes() for name in before} == before, "the other run was overwritten"


def test_forced_run_replaces_the_old_run_whole(runs, tmp_path, monkeypatch, capsys):
    import shutil

    import sparse_hetconv.training.trainer as train_module

    old = tmp_path / "old"
    shutil.copytree(runs["out"] / "a", old)

    def stop(*args, **kwargs):
        raise ValueError("stopped in the first epoch by the test")

    monkeypatch.setattr(train_module, "train_epoch", stop)
    assert cli.main(["train", "--data", str(runs["root"]), "--out", str(old), "--epochs", "1", "--force",
                     "--no-progress"]) == 2
    assert _stderr_line(capsys) == "sparse-hetconv train: error: stopped in the first epoch by the test"
    left = sorted(p.name for p in old.iterdir())
    assert left == [], f"a forced run must not leave the old run's files beside its own: {left}"


def _damaged(runs, tmp_path, change) -> Path:
    payload = {key: value for key, value in runs["first"].items()}
    change(payload)
    path = tmp_path / "damaged" / "last.pt"
    path.parent.mkdir()
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("optimizer"), r"is a training checkpoint without the entries optimizer \(it has best_acc"),
    (lambda p: [p.pop("scheduler"), p.pop("history")], r"without the entries history, scheduler"),
    (lambda p: p.__setitem__("config", {k: v for k, v in p["config"].items() if k != "part"}),
     r"the checkpoint's config lacks the settings part"),
    (lambda p: p.__setitem__("model", {k: v for k, v in p["model"].items() if "classifier.3" not in k}),
     r"its model entry does not fit the VGG of the stored settings: Error\(s\) in loading state_dict"),
    (lambda p: p.__setitem__("optimizer", {"state": {}, "param_groups": []}),
     r"its optimizer entry does not fit the SGD of the stored settings"),
], ids=["no-optimizer", "no-scheduler-history", "config-without-part", "model-keys", "optimizer-groups"])
def test_resume_of_a_damaged_checkpoint_names_the_file_and_what_is_missing(runs, tmp_path, capsys, change, message,
                                                                          no_data_read):
    path = _damaged(runs, tmp_path, change)  # these were KeyError / RuntimeError tracebacks
    with pytest.raises(ValueError, match=rf"resume \({__import__('re').escape(str(path))}\).*{message}"):
        train(data=str(runs["root"]), resume=str(path), out_dir=str(path.parent), epochs=2, part=4,
                    form="masked", progress=False)
    status = cli.main(["train", "--data", str(runs["root"]), "--resume", str(path), "--epochs", "2", "--no-progress"])
    assert status == 2
    line = _stderr_line(capsys)
    assert str(path) in line, line
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"], "nothing may be written"


def test_output_folder_is_checked_before_the_work(runs, tmp_path, capsys, no_data_read):
    (tmp_path / "file").write_text("not a folder")
    assert cli.main(["train", "--data", str(runs["root"]), "--out", str(tmp_path / "file" / "run")]) == 2
    assert _stderr_line(capsys).endswith(f"{tmp_path / 'file'}: is a file, expected a folder")
    (tmp_path / "run" / "best.pt").mkdir(parents=True)
    assert cli.main(["train", "--data", str(runs["root"]), "--out", str(tmp_path / "run")]) == 2
    assert _stderr_line(capsys).endswith(f"{tmp_path / 'run' / 'best.pt'}: is a folder, but training writes a file "
                                         "of that name")


@pytest.mark.skipif(__import__("os").name != "posix", reason="file modes and /sys are POSIX")
def test_unwritable_output_folder_is_refused_before_the_work(runs, tmp_path, capsys, no_data_read):
    from test_files import _unwritable  # the unwritable folder the file tests use

    locked = _unwritable(tmp_path)  # this was a PermissionError traceback after the whole run
    assert cli.main(["train", "--data", str(runs["root"]), "--out", str(locked / "run")]) == 2
    assert _stderr_line(capsys) == f"sparse-hetconv train: error: {locked}: cannot write into this folder " \
                                   "(Permission denied)"


@pytest.mark.parametrize("setting, error, message", [
    ({"force": "yes"}, TypeError, r"force must be a bool, got str \('yes'\)"),
    ({"flip": 1}, TypeError, r"flip must be a bool, got int \(1\)"),
    ({"out_dir": 5}, TypeError, r"out_dir must be a path \(str or os.PathLike\), got int"),
    ({"weights": 3, "eval_only": True}, TypeError, r"weights must be a path \(str or os.PathLike\) or None"),
    ({"device": 0}, TypeError, r"device must be a str, a torch.device or None, got int"),
    ({"model": ["vgg16_cifar"]}, ValueError, r"model \(\['vgg16_cifar'\]\) is not registered"),
])
def test_settings_of_the_wrong_type(setting, error, message, tmp_path):
    with pytest.raises(error, match=message):
        train(**({"data": str(tmp_path), "out_dir": str(tmp_path / "out")} | setting))


def test_weights_that_are_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match="weights is a folder, expected a checkpoint file"):
        train(data=str(tmp_path), eval_only=True, weights=str(tmp_path))


# -- the run's length and data come back with --resume; damaged files are one line -------------------
def test_command_line_resume_continues_the_runs_length(cifar, tmp_path, monkeypatch, caplog):
    """A 2-epoch run interrupted after its first epoch resumes as epoch 2/2 (it resumed as 3/330:
    --epochs, --data and the rest of the recipe were not read from the checkpoint)."""
    import logging

    import sparse_hetconv.training.trainer as train_module

    root, out = cifar[0], tmp_path / "run"
    real = train_module.train_epoch

    def interrupted(model, optimizer, data, epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(model, optimizer, data, epoch, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", interrupted)
    assert cli.main(["train", "--data", str(root), "--epochs", "2", "--lr", "0.05", "--checkpoint-every", "1",
                     "--out", str(out), "--no-progress"]) == 130
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train_module, "train_epoch", real)
    caplog.set_level(logging.INFO, logger=train_module.__name__)
    assert cli.main(["train", "--resume", str(out / "last.pt"), "--no-progress"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 1 and lines[0].startswith("epoch 2/2 "), lines
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["epoch"], last["config"]["epochs"], last["config"]["lr"]) == (2, 2, 0.05)


def _bad_files(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir()
    raw = good.read_bytes()
    files = {"truncated": raw[: len(raw) // 2], "text": b"epoch 1\n", "empty": b"",
             "pickle": pickle.dumps({"epoch": 1}, protocol=4)}  # torch warned about the protocol on a 2nd line
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(content)
    payload = torch.load(good, weights_only=True)
    payload["config"] = dict(payload["config"], milestones=5)
    paths["bad-config"] = folder / "bad-config.pt"
    torch.save(payload, paths["bad-config"])
    return paths


@pytest.mark.parametrize("option", ["--resume", "--weights"])
def test_damaged_or_foreign_files_are_one_line(runs, tmp_path, capsys, option, no_data_read):
    paths = _bad_files(tmp_path / "files", runs["out"] / "a" / "last.pt")
    for name, path in paths.items():
        if name == "bad-config" and option == "--weights":
            continue  # weights are read for their model only: its settings do not matter
        argv = ["train", "--data", str(runs["root"]), option, str(path), "--no-progress"]
        argv += ["--eval-only"] if option == "--weights" else []
        assert cli.main(argv) == 2, name
        line = _stderr_line(capsys)
        assert str(path) in line, f"{name}: the message must name the file: {line}"
        if name == "bad-config" and option == "--resume":
            assert "the checkpoint's settings are not valid (milestones must be a list or tuple of epochs, got " \
                   "int (5))" in line, line
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == sorted(p.name for p in paths.values()), \
        "nothing may be written"


def test_old_checkpoints_resume_as_cifar10(runs, tmp_path):
    """Checkpoints written before the data set settings existed trained on all of CIFAR-10."""
    payload = dict(runs["first"])
    payload["config"] = {k: v for k, v in payload["config"].items()
                         if k not in ("dataset", "train_subset", "test_subset", "data")}
    path = tmp_path / "old" / "last.pt"
    path.parent.mkdir()
    torch.save(payload, path)
    result = train(data=str(runs["root"]), resume=str(path), out_dir=str(path.parent), epochs=2, part=4,
                         form="masked", progress=False)
    assert untimed(result.history) == untimed(runs["straight"].history)


# -- other data sets -------------------------------------------------------------------------------------
def test_trains_on_fashion_mnist_files(tmp_path):
    write_fashion_mnist(tmp_path / "fm", train=40, test=24)
    result = train(dataset="fashion_mnist", data=str(tmp_path / "fm"), out_dir=str(tmp_path / "run"), epochs=1,
                         train_subset=30, test_subset=20, progress=False)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["config"]["dataset"] == "fashion_mnist" and last["config"]["train_subset"] == 30
    assert last["classes"][0] == "T-shirt/top" and len(last["classes"]) == 10
    assert round(result.final_acc * 20) == pytest.approx(result.final_acc * 20), "tested on the 20 images asked for"
    with pytest.raises(ValueError, match=r"trained with other settings: train_subset=30 \(given 40\)"):
        train(dataset="fashion_mnist", data=str(tmp_path / "fm"), resume=str(tmp_path / "run" / "last.pt"),
                    out_dir=str(tmp_path / "run"), epochs=2, train_subset=40, test_subset=20)


def test_trains_on_an_image_folder_with_its_classes(tmp_path, capsys):
    pytest.importorskip("PIL", reason="the image folder is read with Pillow")
    write_image_folder(tmp_path / "images", classes=("cat", "dog", "emu"), per_class=10)
    assert cli.main(["train", "--dataset", "folder", "--data", str(tmp_path / "images"), "--epochs", "1",
                     "--part", "8", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["classes"] == ["cat", "dog", "emu"] and last["model"]["classifier.3.weight"].shape[0] == 3
    from sparse_hetconv.cli.train import config_from_args

    args = cli.build_parser().parse_args(["train", "--resume", str(tmp_path / "run" / "last.pt"), "--epochs", "2"])
    config = config_from_args(args)
    assert (config.dataset, config.data, config.part, config.epochs) == ("folder", str(tmp_path / "images"), 8, 2)
    assert cli.main(["train", "--resume", str(tmp_path / "run" / "last.pt"), "--eval-only", "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_missing_fashion_mnist_is_one_line(tmp_path, capsys):
    assert cli.main(["train", "--dataset", "fashion_mnist", "--data", str(tmp_path / "none"), "--out",
                     str(tmp_path / "out"), "--no-progress"]) == 2
    line = _stderr_line(capsys)
    assert "Fashion-MNIST not found" in line and "apt-get install dataset-fashion-mnist" in line, line
    assert not (tmp_path / "out").exists(), "nothing is written when the data are missing"


# -- real data -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_short_sparse_run_learns_real_fashion_mnist():
    """512 real Fashion-MNIST images (apt-get install dataset-fashion-mnist; .ci/run installs it): a
    VGG-style net whose four HetConv layers are in the sparse form (P = 4), trained for eight short
    epochs with the trainer's epoch, is far above chance (10 %) on 500 test images, and its masked
    form scores the same. (VGG-16 itself needs more steps than a test can afford: benchmarks/reproduce.py.)"""
    from sparse_hetconv import SparseHetConv2d, to_masked
    from sparse_hetconv.models import VGG
    from sparse_hetconv.training import FASHION_MNIST_DEFAULT, evaluate, load_fashion_mnist, train_epoch

    try:
        data = load_fashion_mnist().subset(train=512, test=500)
    except FileNotFoundError:
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_MNIST_DEFAULT} (apt-get install "
                    "dataset-fashion-mnist)")
    torch.manual_seed(0)
    model = VGG((64, "M", 64, "M", 128, "M", 128, "M", 128, "M"), part=4, form="sparse")
    assert sum(isinstance(m, SparseHetConv2d) for m in model.modules()) == 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    accuracies = []
    for epoch in range(8):
        train_epoch(model, optimizer, data, epoch, batch_size=32)
        accuracies.append(evaluate(model, data.test_images, data.test_labels, mean=data.mean, std=data.std))
    assert accuracies[-1] >= 0.5, f"test accuracy per epoch {accuracies}: the sparse form did not learn"
    masked = evaluate(to_masked(model), data.test_images, data.test_labels, mean=data.mean, std=data.std)
    assert masked == accuracies[-1], f"the masked form of the trained model scores {masked}, not {accuracies[-1]}"
