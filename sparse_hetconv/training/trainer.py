"""Train a HetConv model on an image data set: the published recipe, checkpoints, resume, evaluation.

:class:`TrainConfig`'s defaults are the published recipe (Table 1, VGG-16 on CIFAR-10;
docs/counting_and_training.md); ``dataset`` also takes Fashion-MNIST and an image folder
(:mod:`.data`). :func:`train` runs it with progress, checkpoints (every ``checkpoint_every`` epochs
and on the best test accuracy), resumption and an evaluation-only mode, and at the end converts the
model to the other form (masked <-> sparse) and checks its accuracy again; :func:`train_epoch` is
one epoch, for loops of one's own. With a seed a run is deterministic (CPU, same thread count;
cuDNN's deterministic algorithms on a GPU): epoch ``e`` shuffles and augments from ``(seed, e)``,
so a resumed run gives the weights of an uninterrupted one bit for bit. Files are written
atomically, and everything that can be checked (settings, resume checkpoint, data, ``out_dir``) is
checked before training.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._files import check_output_folder
from ..checkpoint import TRAIN_FORMAT, load_model, read_checkpoint, save_atomic, state_dict_of
from ..convert import to_masked, to_sparse
from .config import _ADDED, RECIPE, TrainConfig
from .data import (CIFAR10_MEAN, CIFAR10_STD, ImageData, augment, find_dataset, iterate_batches,
                   load_dataset, normalize)
from ..masked import _MaskedHetConvNd
from ..models import create_model
from ..sparse import _SparseHetConvNd

__all__ = ["TrainConfig", "TrainResult", "train", "train_epoch", "evaluate", "config_from_checkpoint"]

logger = logging.getLogger(__name__)

# The files of a run in out_dir, and the entries of a training checkpoint.
RUN_FILES = ("last.pt", "best.pt", "model_sparse.pt")
CHECKPOINT_ENTRIES = ("format", "epoch", "best_acc", "best_epoch", "history", "config", "model", "optimizer",
                      "scheduler")


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        history (list of dict): per epoch ``epoch`` (1-based), ``lr``, ``loss``, ``train_acc``,
            ``test_acc``, ``seconds`` (the training pass, evaluation not included).
        best_acc (float), best_epoch (int): the best test accuracy (in [0, 1]) and its epoch.
        final_acc (float): test accuracy of the final model in the trained form.
        converted_form (str): the other form the model was converted to.
        converted_acc (float): its test accuracy (the same as ``final_acc`` for an exact conversion).
        max_logit_diff (float): largest difference of the two forms' test logits.
        model (nn.Module): the final model in sparse form.
        files (dict): paths written (``last``, ``best``, ``sparse``).
        seed (int): the seed used.
    """

    history: list[dict] = field(default_factory=list)
    best_acc: float = 0.0
    best_epoch: int = 0
    final_acc: float = 0.0
    converted_form: str = ""
    converted_acc: float = 0.0
    max_logit_diff: float = 0.0
    model: nn.Module | None = None
    files: dict[str, Path] = field(default_factory=dict)
    seed: int = 0


def config_from_checkpoint(path: str | Path) -> dict:
    """The :class:`TrainConfig` settings stored in a training checkpoint (``last.pt``/``best.pt``).

    Raises:
        ValueError: ``path`` is not a checkpoint written by :func:`train`, or its settings are
            not valid ones (the message names the file).
    """
    payload = _read(path)
    _check_entries(payload, path, ("config",))
    config = _ADDED | dict(payload["config"])
    try:
        TrainConfig(**{name: config[name] for name in RECIPE + ("epochs", "data") if name in config}).validate()
    except (TypeError, ValueError, OSError) as error:
        raise ValueError(f"{path}: the checkpoint's settings are not valid ({error}); it was damaged or written "
                         "by other code") from error
    return config


def _read(path) -> object:
    """:func:`read_checkpoint`, without torch's advice about the file's pickle protocol (a
    ``UserWarning`` printed beside the error it comes with)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
        return read_checkpoint(path)


def _check_entries(payload: object, path, needed: tuple[str, ...]) -> None:
    """Require a training checkpoint with the entries ``needed`` (and a config with the recipe)."""
    if not isinstance(payload, dict) or payload.get("format") != TRAIN_FORMAT:
        raise ValueError(f"{path} is not a training checkpoint written by sparse_hetconv.train "
                         "(to evaluate a model's weights use eval_only with weights)")
    missing = [key for key in needed if key not in payload]
    if missing:
        raise ValueError(f"{path} is a training checkpoint without the entries {', '.join(missing)} "
                         f"(it has {', '.join(sorted(map(str, payload)))}); it cannot be used: it was "
                         "damaged or written by other code")
    if "config" in needed:
        config = payload["config"]
        lacking = [key for key in RECIPE if key not in _ADDED and (not isinstance(config, dict) or key not in config)]
        if lacking:
            raise ValueError(f"{path}: the checkpoint's config lacks the settings {', '.join(lacking)}; it "
                             "cannot be used: it was damaged or written by other code")


def evaluate(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             device: torch.device | str = "cpu", return_logits: bool = False, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """Test accuracy of ``model`` in eval mode (the train/eval flag is restored).

    Args:
        model (nn.Module or callable): a classifier on the device (any callable from inputs to
            logits: an ONNX Runtime session's ``run``, an int8 program).
        images (Tensor[N, C, 32, 32] uint8), labels (Tensor[N] int64): the test set.
        batch_size (int): evaluation batch size.
        device: where to compute.
        return_logits (bool): also return the logits ``Tensor[N, classes]`` (on the CPU).
        mean, std: the data set's normalisation (:attr:`ImageData.mean`; default CIFAR-10's).

    Returns:
        float in [0, 1], or (float, Tensor) with ``return_logits``.
    """
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    correct, outputs = 0, []
    with torch.no_grad():
        for index in iterate_batches(len(labels), batch_size):
            logits = model(normalize(images[index].to(device), mean, std))
            correct += int((logits.argmax(1).cpu() == labels[index]).sum())
            if return_logits:
                outputs.append(logits.float().cpu())
    if isinstance(model, nn.Module):
        model.train(was_training)
    accuracy = correct / max(len(labels), 1)
    return (accuracy, torch.cat(outputs)) if return_logits else accuracy


@contextlib.contextmanager
def _deterministic(enabled: bool):
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: ImageData, epoch: int, seed: int = 0,
                batch_size: int = 128, crop_padding: int = 4, flip: bool = True, device: torch.device | str = "cpu",
                after_backward=None, progress: bool = False, desc: str | None = None) -> tuple[float, float]:
    """One epoch of SGD-style training with the recipe's augmentation: what :func:`train` runs.

    The order and augmentation come from a generator seeded with ``(seed, epoch)``, so two models
    given the same arguments see the same batches.

    Args:
        model (nn.Module): the classifier, on ``device``; it is put in train mode.
        optimizer (torch.optim.Optimizer): stepped once per batch.
        data (ImageData): its training split is used.
        epoch (int): the epoch's index (from 0). seed (int): the run's seed.
        batch_size, crop_padding, flip: as in :class:`TrainConfig`.
        after_backward (callable, optional): called with ``model`` after each ``backward()``,
            before the step (the published code masks its gradients there).
        progress (bool): a tqdm bar. desc (str, optional): its label.

    Returns:
        (float, float): mean training loss and training accuracy (in [0, 1]) over the epoch.
    """
    model.train()
    generator = _epoch_generator(seed, epoch)
    total = len(data.train_labels)
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(iterate_batches(total, batch_size, generator), total=math.ceil(total / batch_size), leave=False,
               desc=desc or f"epoch {epoch + 1}", disable=not progress)
    for index in bar:
        images = augment(data.train_images[index], generator, crop_padding, flip)
        inputs, targets = normalize(images.to(device), data.mean, data.std), data.train_labels[index].to(device)
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        optimizer.step()
        loss_sum += float(loss.detach()) * len(index)
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(index)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _payload(model, optimizer, scheduler, config, seed, epoch, best_acc, best_epoch, history, classes) -> dict:
    settings = asdict(config)
    settings.update(seed=seed, milestones=list(config.milestones))
    return {"format": TRAIN_FORMAT, "version": 1, "epoch": epoch, "best_acc": best_acc, "best_epoch": best_epoch,
            "history": history, "config": settings, "classes": list(classes), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def _check_resume(payload: object, config: TrainConfig, seed: int | None, recipe: bool = True) -> None:
    if not isinstance(payload, dict) or payload.get("format") != TRAIN_FORMAT:
        raise ValueError(f"resume ({config.resume}) is not a training checkpoint written by sparse_hetconv.train")
    _check_entries(payload, f"resume ({config.resume})", CHECKPOINT_ENTRIES if recipe else ("config", "model"))
    if not recipe:
        return
    stored = _ADDED | payload["config"]
    given = asdict(config)
    given["milestones"] = list(config.milestones)
    diffs = [f"{name}={stored.get(name)!r} (given {given[name]!r})" for name in RECIPE
             if name != "seed" and stored.get(name) != given[name]]
    if seed is not None and stored.get("seed") != seed:
        diffs.append(f"seed={stored.get('seed')!r} (given {seed!r})")
    if diffs:
        raise ValueError(f"resume ({config.resume}) was trained with other settings: {', '.join(diffs)}; "
                         "pass the same ones (the command line fills them in from the checkpoint)")
    if isinstance(payload["epoch"], bool) or not isinstance(payload["epoch"], int) or payload["epoch"] < 0:
        raise ValueError(f"resume ({config.resume}): its epoch entry ({payload['epoch']!r}) is not a number of epochs")
    if payload["epoch"] > config.epochs:
        raise ValueError(f"epochs ({config.epochs}) is less than the {payload['epoch']} epochs the resumed "
                         "checkpoint has already trained")


def _recheck(model, data, config, device, result: TrainResult) -> nn.Module:
    """Evaluate the model, convert it to the other form and evaluate again; return the sparse one."""
    result.final_acc, logits = evaluate(model, data.test_images, data.test_labels, config.eval_batch_size,
                                        device, True, data.mean, data.std)
    is_sparse = not any(isinstance(m, _MaskedHetConvNd) for m in model.modules())
    if not any(isinstance(m, (_MaskedHetConvNd, _SparseHetConvNd)) for m in model.modules()):
        # part 1: standard convolutions only, both forms are the same model
        result.converted_form, result.converted_acc = "sparse", result.final_acc
        return model
    other = to_masked(model) if is_sparse else to_sparse(model)
    result.converted_form = "masked" if is_sparse else "sparse"
    result.converted_acc, other_logits = evaluate(other, data.test_images, data.test_labels,
                                                  config.eval_batch_size, device, True, data.mean, data.std)
    result.max_logit_diff = float((logits - other_logits).abs().max()) if len(logits) else 0.0
    if result.converted_acc != result.final_acc:
        logger.warning("test accuracy changed in conversion: %s %.4f -> %s %.4f", "sparse" if is_sparse else
                       "masked", result.final_acc, result.converted_form, result.converted_acc)
    return model if is_sparse else other


def _eval_model(config: TrainConfig, payload: dict | None) -> nn.Module:
    """The model to evaluate in ``eval_only`` mode, with its weights loaded (form from the file)."""
    if config.weights:
        stored = _read(config.weights)
        name = config.model
        if isinstance(stored, dict) and stored.get("format") == TRAIN_FORMAT:
            _check_entries(stored, config.weights, ("config", "model"))
            name = stored["config"]["model"]
        return load_model(config.weights, name, state=state_dict_of(stored, config.weights))[0]
    stored = payload["config"]
    model = create_model(stored["model"], part=stored["part"], form=stored["form"],
                         **_classes(len(payload.get("classes", range(10)))))
    _load_entry(model, state_dict_of(payload, config.resume), config.resume, "model")
    return model


def _load_entry(target, state, path, entry: str) -> None:
    """``target.load_state_dict(state)``; a checkpoint entry that does not fit is a ValueError
    naming the file and the entry."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        lines = str(error).strip().splitlines()
        raise ValueError(f"resume ({path}): its {entry} entry does not fit the {type(target).__name__} of the "
                         f"stored settings: {lines[0] if lines else type(error).__name__}") from error


def _check_outputs(config: TrainConfig) -> None:
    """Before any work: ``out_dir`` can be written, its file names are free of folders, and it
    holds no run unless ``resume`` or ``force``."""
    out_dir = Path(config.out_dir)
    check_output_folder(out_dir)
    for name in RUN_FILES:
        if (out_dir / name).is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder, but training writes a file of that name",
                                    str(out_dir / name))
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    # Resuming continues the run in the resumed checkpoint's own folder; into another folder that
    # holds a run it would mix two runs' checkpoints.
    continues = config.resume is not None and Path(config.resume).resolve().parent == out_dir.resolve()
    if existing and not continues and not config.force:
        raise FileExistsError(errno.EEXIST, f"holds a training run ({', '.join(existing)}); pass resume (--resume "
                              f"{out_dir / 'last.pt'}) to continue it or force=True (--force) to replace it",
                              str(out_dir))


def _classes(count: int) -> dict:
    """``num_classes`` for the model, left to its default for 10 classes (a registered model of one's
    own for CIFAR-10 need not take the argument)."""
    return {} if count == 10 else {"num_classes": count}


def _build(config: TrainConfig, device: torch.device, payload: dict | None, classes: int):
    """The model, optimizer and scheduler of the run, with the resume checkpoint's state loaded."""
    model = create_model(config.model, part=config.part, form=config.form, **_classes(classes)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), config.gamma)
    if payload is not None:
        _load_entry(model, payload["model"], config.resume, "model")
        _load_entry(optimizer, payload["optimizer"], config.resume, "optimizer")
        _load_entry(scheduler, payload["scheduler"], config.resume, "scheduler")
    return model, optimizer, scheduler


def train(config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Train (or evaluate) a HetConv model; the defaults are the published CIFAR-10 recipe.

    Args:
        config (TrainConfig, optional): the settings; defaults to the published recipe.
        **overrides: fields of :class:`TrainConfig` to change, e.g. ``part=8, epochs=2``.

    Returns:
        TrainResult: history, best and final accuracy, the converted form's accuracy, the files.

    Raises:
        TypeError / ValueError: a bad setting, a resume checkpoint of another recipe or without
            the entries a resumed run needs (the message names the file and the entries), weights
            that do not fit the model; all before any training.
        FileNotFoundError: the data set or a checkpoint is missing (the message says where the
            data set's files go and how to get them; nothing is downloaded).
        FileExistsError: ``out_dir`` holds a run, ``resume`` is not one of its checkpoints and
            ``force`` is not given.
        PermissionError (or another OSError): ``out_dir`` cannot be written; checked before
            training, and a failure while writing leaves the previous files whole.

    Example:
        >>> result = train(dataset="fashion_mnist", part=4, epochs=20, milestones=(10, 15))  # doctest: +SKIP
        >>> result.best_acc, result.converted_acc  # doctest: +SKIP
    """
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or None, got {type(config).__name__}")
    config = TrainConfig(**asdict(config)) if config is not None else TrainConfig()
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown settings {unknown}; TrainConfig has {sorted(names)}")
    for name, value in overrides.items():
        setattr(config, name, value)
    config.validate()
    if not config.eval_only:
        _check_outputs(config)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    payload = _read(config.resume) if config.resume else None
    if payload is not None:  # eval_only takes model, part and form from the checkpoint
        _check_resume(payload, config, None if config.eval_only else config.seed, recipe=not config.eval_only)
    seed = config.seed if config.seed is not None else (
        payload["config"]["seed"] if payload is not None else random.randrange(2**31))
    result = TrainResult(seed=seed)
    out_dir = Path(config.out_dir)

    def data() -> ImageData:
        return load_dataset(config.dataset, config.data).subset(config.train_subset, config.test_subset)

    with _deterministic(config.seed is not None):
        if config.eval_only:
            model = _eval_model(config, payload)  # bad weights fail here, before the data are read
            result.model = _recheck(model.to(device), data(), config, device, result)
            result.best_acc = result.final_acc
            return result

        _, classes = find_dataset(config.dataset, config.data)  # a missing data set fails here, before the work
        torch.manual_seed(seed)
        model, optimizer, scheduler = _build(config, device, payload, len(classes))  # a resume that does not fit
        images = data()
        start = 0
        if payload is not None:
            start, result.history = payload["epoch"], list(payload["history"])
            result.best_acc, result.best_epoch = payload["best_acc"], payload["best_epoch"]
        elif config.force:  # a new run replaces the old one whole, never file by file
            for name in RUN_FILES:
                if (out_dir / name).exists():
                    (out_dir / name).unlink()
                    logger.info("removed %s of the previous run (force)", out_dir / name)
        out_dir.mkdir(parents=True, exist_ok=True)
        for epoch in range(start, config.epochs):
            lr = optimizer.param_groups[0]["lr"]
            began = time.perf_counter()
            loss, train_acc = train_epoch(model, optimizer, images, epoch, seed, config.batch_size,
                                          config.crop_padding, config.flip, device, progress=config.progress,
                                          desc=f"epoch {epoch + 1}/{config.epochs}")
            seconds = time.perf_counter() - began
            scheduler.step()
            test_acc = evaluate(model, images.test_images, images.test_labels, config.eval_batch_size, device,
                                mean=images.mean, std=images.std)
            result.history.append({"epoch": epoch + 1, "lr": lr, "loss": loss, "train_acc": train_acc,
                                   "test_acc": test_acc, "seconds": seconds})
            logger.info("epoch %d/%d  lr %.4g  loss %.4f  train %.2f%%  test %.2f%%  %.1f s", epoch + 1,
                        config.epochs, lr, loss, 100 * train_acc, 100 * test_acc, seconds)
            best = test_acc > result.best_acc or result.best_epoch == 0
            if best:
                result.best_acc, result.best_epoch = test_acc, epoch + 1
            last = epoch + 1 == config.epochs or (epoch + 1) % config.checkpoint_every == 0
            if best or last:
                state = _payload(model, optimizer, scheduler, config, seed, epoch + 1, result.best_acc,
                                 result.best_epoch, result.history, classes)
                if best:
                    save_atomic(state, out_dir / "best.pt")
                    result.files["best"] = out_dir / "best.pt"
                if last:
                    save_atomic(state, out_dir / "last.pt")
                    result.files["last"] = out_dir / "last.pt"
        result.model = _recheck(model, images, config, device, result)
        save_atomic(result.model.state_dict(), out_dir / "model_sparse.pt")
        result.files["sparse"] = out_dir / "model_sparse.pt"
    return result


