"""Tests for CIFAR-10 reading, augmentation and the training loop (sparse_hetconv.cifar).

A tiny CIFAR-10 folder in the real on-disk format (python pickles of uint8 rows and label lists,
64 images) is written by the tests; nothing is downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

np = pytest.importorskip("numpy", reason="the CIFAR-10 reader builds numpy arrays")
import torch  # noqa: E402

from sparse_hetconv import cli  # noqa: E402
from sparse_hetconv.cifar.data import augment, find_cifar10, load_cifar10  # noqa: E402
from sparse_hetconv.models import vgg16_cifar  # noqa: E402
from sparse_hetconv.cifar.train import TrainConfig, config_from_checkpoint, train_cifar  # noqa: E402

TRAIN_PER_BATCH, TEST_IMAGES = 8, 24  # 5 x 8 + 24 = 64 images


def write_cifar10(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write ``root/cifar-10-batches-py`` as CIFAR-10's python version does; return what was written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name, count in [(f"data_batch_{i}", TRAIN_PER_BATCH) for i in range(1, 6)] + [("test_batch", TEST_IMAGES)]:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, count)]
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(count)]}
        with open(folder / name, "wb") as file:
            pickle.dump(entry, file, protocol=2)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}, file, protocol=2)
    return written


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar10(root)


# -- reading ----------------------------------------------------------------------------------------
def test_load_cifar10_reads_the_pickles(cifar):
    root, written = cifar
    data = load_cifar10(root)
    assert data.train_images.shape == (40, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (TEST_IMAGES, 3, 32, 32)
    first, labels = written["data_batch_1"]
    # CIFAR-10 rows are 1024 red, then 1024 green, then 1024 blue values, row-major within a plane
    assert data.train_images[3, 1, 2, 5] == first[3, 1024 + 2 * 32 + 5]
    assert data.train_labels[:8].tolist() == labels
    assert data.test_labels.tolist() == written["test_batch"][1]
    assert find_cifar10(root / "cifar-10-batches-py") == find_cifar10(root), "the folder itself works too"


def test_missing_data_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lacks data_batch_1.*cifar-10-python\.tar\.gz.*tar xzf"):
        load_cifar10(tmp_path)


def test_refuses_a_pickle_with_code(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as file:
        pickle.dump({b"data": Path("x"), b"labels": []}, file)  # any class but numpy's arrays
    with pytest.raises(ValueError, match=r"data_batch_2 is not a CIFAR-10 batch file.*refusing to load pathlib"):
        load_cifar10(tmp_path)


def test_rejects_wrong_shapes(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as file:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, file, protocol=2)
    with pytest.raises(ValueError, match=r"'data' must be a uint8 array of shape \(N, 3072\)"):
        load_cifar10(tmp_path)


def test_augment_crops_and_flips():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augment(images, generator, padding=0, flip=False), images)
    out = augment(images, generator, padding=4, flip=True)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(16):
        windows = [padded[i, :, t:t + 32, l:l + 32] for t in range(9) for l in range(9)]
        found = any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
        assert found, f"image {i} is not a (flipped) 32x32 window of the padded image"
    again = augment(images, torch.Generator().manual_seed(0), padding=0, flip=True)
    flipped = [not torch.equal(again[i], images[i]) for i in range(16)]
    assert 0 < sum(flipped) < 16, "flips happen to some images, not all"


# -- training ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(cifar, tmp_path_factory):
    """One epoch from the command line, resumed for a second; and two epochs straight."""
    root, _ = cifar
    out = tmp_path_factory.mktemp("runs")
    common = ["--data", str(root), "--part", "4", "--form", "masked", "--no-progress", "--checkpoint-every", "1"]
    status = cli.main(["train", *common, "--epochs", "1", "--out", str(out / "a")])
    first = torch.load(out / "a" / "last.pt", weights_only=True)
    resumed = train_cifar(data=str(root), epochs=2, resume=str(out / "a" / "last.pt"), out_dir=str(out / "a"),
                          part=4, form="masked", progress=False)
    straight = train_cifar(data=str(root), epochs=2, out_dir=str(out / "b"), part=4, form="masked",
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
    assert resumed.history == straight.history, "a resumed run must repeat the uninterrupted one exactly"
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
    result = train_cifar(data=str(root), eval_only=True, weights=str(b / "model_sparse.pt"), progress=False)
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


def test_eval_only_from_a_training_checkpoint(runs):
    result = train_cifar(data=str(runs["root"]), eval_only=True, resume=str(runs["out"] / "b" / "last.pt"),
                         progress=False)
    assert result.final_acc == runs["straight"].final_acc == result.converted_acc


def test_resume_with_another_recipe_fails_before_training(runs, tmp_path):
    last = runs["out"] / "a" / "last.pt"
    with pytest.raises(ValueError, match=r"trained with other settings: part=4 \(given 8\)"):
        train_cifar(data=str(runs["root"]), resume=str(last), part=8, form="masked", out_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    assert config_from_checkpoint(last)["form"] == "masked"
    weights_only = runs["out"] / "a" / "model_sparse.pt"
    with pytest.raises(ValueError, match="is not a training checkpoint written by sparse_hetconv.train"):
        train_cifar(data=str(runs["root"]), resume=str(weights_only), out_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_same_seed_same_run(runs, tmp_path):
    again = train_cifar(data=str(runs["root"]), epochs=1, out_dir=str(tmp_path), part=4, form="masked",
                        progress=False)
    assert again.history[0] == runs["first"]["history"][0], "the same seed must give the same epoch"


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
        train_cifar(data=str(tmp_path), out_dir=str(tmp_path / "out"), **setting)
    assert not (tmp_path / "out").exists()


def test_unknown_setting_and_missing_data(tmp_path):
    with pytest.raises(TypeError, match=r"unknown settings \['learning_rate'\]"):
        train_cifar(learning_rate=0.1)
    with pytest.raises(TypeError, match="config must be a TrainConfig or None, got dict"):
        train_cifar({"part": 4})
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        train_cifar(TrainConfig(data=str(tmp_path), out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists(), "nothing is written when the data are missing"
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2


def test_eval_only_bad_weights_fail_before_reading_data(tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint"):
        train_cifar(data=str(tmp_path / "no_data"), eval_only=True, weights=str(weights))


# -- outputs and resume checkpoints: refused before any work, in one line from the command line --
def _stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparse-hetconv train: error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture
def no_data_read(monkeypatch):
    """Fail the test if the data set is read: the check under test must come first."""
    import sparse_hetconv.cifar.train as train_module

    def load_cifar10(data):
        raise AssertionError("CIFAR-10 was read although the run was refused")

    monkeypatch.setattr(train_module, "load_cifar10", load_cifar10)


def test_out_holding_a_run_needs_resume_or_force(runs, capsys, no_data_read):
    a = runs["out"] / "a"
    before = {name: (a / name).read_bytes() for name in ("last.pt", "best.pt", "model_sparse.pt")}
    assert cli.main(["train", "--data", str(runs["root"]), "--out", str(a), "--epochs", "1", "--no-progress"]) == 2
    line = _stderr_line(capsys)
    assert f"{a}: holds a training run (last.pt, best.pt, model_sparse.pt); pass resume (--resume {a / 'last.pt'}) " \
           "to continue it or force=True (--force) to replace it" in line, line
    assert {name: (a / name).read_bytes() for name in before} == before, "the previous run was overwritten"
    with pytest.raises(FileExistsError, match="holds a training run"):
        train_cifar(data=str(runs["root"]), out_dir=str(a), epochs=1, progress=False)


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

    import sparse_hetconv.cifar.train as train_module

    old = tmp_path / "old"
    shutil.copytree(runs["out"] / "a", old)

    def stop(*args, **kwargs):
        raise ValueError("stopped in the first epoch by the test")

    monkeypatch.setattr(train_module, "_train_epoch", stop)
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
        train_cifar(data=str(runs["root"]), resume=str(path), out_dir=str(path.parent), epochs=2, part=4,
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
        train_cifar(**({"data": str(tmp_path), "out_dir": str(tmp_path / "out")} | setting))


def test_weights_that_are_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match="weights is a folder, expected a checkpoint file"):
        train_cifar(data=str(tmp_path), eval_only=True, weights=str(tmp_path))
