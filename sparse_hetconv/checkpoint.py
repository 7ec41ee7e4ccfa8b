"""Reading, writing and converting HetConv checkpoints.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The published VGG-16 script
saves the ``state_dict`` of the masked model (keys ``features.3.gwc.weight``,
``features.3.pwc.weight``, ...), sometimes wrapped in a dict and with DataParallel's ``module.``
prefix. :func:`convert_checkpoint` turns such a file into the sparse model's ``state_dict``.
Files are always read with ``torch.load(weights_only=True)``: tensors and plain containers only,
never arbitrary code. Files are written to a temporary name first and renamed, so a failure never
leaves a half-written file behind.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ._files import atomic_write
from .convert import to_sparse
from .counting import count_params
from .models import create_model, list_models

__all__ = ["ConvertReport", "convert_checkpoint", "read_checkpoint", "state_dict_of", "infer_form",
           "load_model", "save_atomic", "TRAIN_FORMAT"]

TRAIN_FORMAT = "sparse_hetconv.train"
# Keys under which training scripts commonly nest the model's state_dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
_IGNORABLE_MISSING = ("num_batches_tracked",)


def save_atomic(obj: object, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and a rename
    (:func:`sparse_hetconv._files.atomic_write`): ``path`` holds its previous content or the whole
    new one, never a part; no temporary file is left on an error, Ctrl-C or SIGTERM, and those of
    killed writers are removed by the next write into the folder. The file gets the mode
    ``open()`` would give it.

    Raises:
        FileNotFoundError: the folder of ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder.
        OSError: the file cannot be written (``PermissionError``, a full disk); ``filename`` is
            ``path``.
    """
    atomic_write(path, lambda file: torch.save(obj, file))


def read_checkpoint(path: str | Path) -> object:
    """Load a file with ``torch.load(path, map_location="cpu", weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder.
        PermissionError (or another OSError): the file cannot be read.
        ValueError: the file is not a readable PyTorch checkpoint (empty, truncated, not a torch
            file, or holding objects other than tensors and plain containers, which are never
            loaded); the message gives torch's reason, not its advice to load the file unsafely.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, expected a checkpoint file", str(path))
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "checkpoint does not exist", str(path))
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (torch.load with weights_only=True "
                         "failed: the file is empty)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # the file system's error (permissions, I/O), not the file's content
        raise
    except Exception as error:  # torch.load raises many types for a damaged or foreign file
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (torch.load with weights_only=True "
                         f"failed: {_load_failure(error)})") from error


# torch.load's advice around the reason of a weights-only failure (to load the file unsafely, to
# allow-list its classes, to file an issue): none of it is the reason, and the first is unsafe.
_ADVICE = re.compile(r"weights_only|Weights only load failed|torch\.load|safe_globals|file an issue|"
                     r"^\(\d\)|do those steps", re.IGNORECASE)


def _load_failure(error: BaseException) -> str:
    """The reason torch.load gives for refusing a file, without its advice."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    marker = text.find("WeightsUnpickler error:")
    if marker >= 0:
        text = text[marker + len("WeightsUnpickler error:"):]
    for line in text.splitlines():
        line = re.split(r"\. (?=Please use|This is an internal|If you are seeing)", line.strip())[0].rstrip(".")
        if line and not _ADVICE.search(line):
            if "GLOBAL" in line or "global" in line:
                return f"it holds objects other than tensors and plain containers, which are never loaded ({line})"
            if "Unsupported operand" in line:
                return f"not a file written by torch.save ({line})"
            return line
    return type(error).__name__


def state_dict_of(obj: object, path: str | Path = "checkpoint") -> dict[str, Tensor]:
    """The model ``state_dict`` in a loaded checkpoint: bare, or wrapped in a dict under one of
    ``state_dict``, ``model_state_dict``, ``model``, ``net``, ``state``; a ``module.`` prefix on
    every key (DataParallel) is removed.

    Raises:
        ValueError: ``obj`` holds no mapping of names to tensors.
    """
    if isinstance(obj, dict) and obj and not _is_state_dict(obj):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        what = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} does not hold a state_dict: expected a dict of parameter names to tensors "
                         f"(bare or under one of {', '.join(_WRAPPER_KEYS)}), got {what}")
    if all(key.startswith("module.") for key in obj):
        obj = {key[len("module."):]: value for key, value in obj.items()}
    return dict(obj)


def _is_state_dict(obj: object) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))


def infer_form(state_dict: dict[str, Tensor], path: str | Path = "state_dict") -> tuple[str, int]:
    """``(form, part)`` of a HetConv model's ``state_dict``, read from its first HetConv layer.

    Masked layers have ``gwc.weight (N, M/P, k, k)`` and ``pwc.weight (N, M, 1, 1)``; sparse ones
    ``weight_kxk (N, M/P, k, k)`` and ``weight_1x1 (N, M - M/P)``. A model without either has
    standard convolutions only: ``("masked", 1)`` (both forms are the same model at ``P = 1``).

    Raises:
        ValueError: the shapes of a HetConv layer do not fit together.
    """
    for key, value in state_dict.items():
        if key.endswith("gwc.weight"):
            pwc = state_dict.get(key[: -len("gwc.weight")] + "pwc.weight")
            return "masked", _part(path, key, value, None if pwc is None or pwc.dim() < 2 else pwc.shape[1])
        if key.endswith("weight_kxk"):
            ones = state_dict.get(key[: -len("weight_kxk")] + "weight_1x1")
            extra = 0 if ones is None or ones.dim() < 2 else ones.shape[1]
            return "sparse", _part(path, key, value, value.shape[1] + extra if value.dim() >= 2 else None)
    return "masked", 1


def _part(path, key: str, weight: Tensor, channels: int | None) -> int:
    block = weight.shape[1] if weight.dim() >= 2 else 0
    if channels is None or block < 1 or channels % block:
        raise ValueError(f"{path}: cannot read the HetConv part from '{key}' of shape {tuple(weight.shape)}: expected "
                         f"(N, M/P, k, k) beside a 1x1 weight over M input channels (M = {channels})")
    return channels // block


def _last_linear(model: nn.Module) -> str | None:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def load_model(path: str | Path, model: str = "vgg16_cifar", state: dict[str, Tensor] | None = None
               ) -> tuple[nn.Module, dict]:
    """Build a registered model in the form a checkpoint holds and load the checkpoint into it.

    The form and part come from the weights (:func:`infer_form`), the number of classes from the
    model's last ``nn.Linear``. Missing ``num_batches_tracked`` entries (old checkpoints) are allowed.

    Args:
        path (str or Path): the checkpoint (any layout :func:`state_dict_of` accepts).
        model (str): the registered model the weights belong to.
        state (dict, optional): an already extracted ``state_dict`` (``path`` then only names it).

    Returns:
        (nn.Module, dict): the model in eval mode, and ``{"model", "form", "part", "num_classes"}``.

    Raises:
        FileNotFoundError / ValueError: the file is missing, unreadable, or does not fit the model
            (the message lists missing and unexpected keys and wrong shapes).
    """
    if model not in list_models():
        raise ValueError(f"model ({model!r}) is not registered; available: {', '.join(list_models())}")
    if state is None:
        state = state_dict_of(read_checkpoint(path), path)
    form, part = infer_form(state, path)
    try:
        net = create_model(model, part=part, form=form)
    except ValueError as error:
        raise ValueError(f"{path} does not fit {model}: its HetConv layers have part {part} ({error})") from error
    head = _last_linear(net)
    classes = state.get(f"{head}.weight") if head else None
    num_classes = int(classes.shape[0]) if isinstance(classes, Tensor) and classes.dim() == 2 else None
    if num_classes and num_classes != net.get_submodule(head).out_features:
        net = create_model(model, part=part, form=form, num_classes=num_classes)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_IGNORABLE_MISSING)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        problems = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''} ({len(items)})"
                    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("wrong shapes", wrong)) if items]
        raise ValueError(f"{path} does not fit {model}(part={part}, form={form!r}): " + "; ".join(problems))
    net.load_state_dict(state, strict=False)
    info = {"model": model, "form": form, "part": part, "num_classes": net.get_submodule(head).out_features
            if head else None}
    return net.eval(), info


@dataclass
class ConvertReport:
    """What :func:`convert_checkpoint` did."""

    source: Path
    target: Path
    model: str
    part: int
    num_classes: int | None
    masked_params: int  # stored by the masked model (zeros included)
    sparse_params: int  # stored by the sparse model
    useful_params: int  # the same in both forms
    source_bytes: int
    target_bytes: int
    max_abs_diff: float
    batch: int

    def __str__(self) -> str:
        return "\n".join([
            f"{self.model}(part={self.part}): {self.source} (masked) -> {self.target} (sparse)",
            f"parameters stored: masked {self.masked_params:,} -> sparse {self.sparse_params:,} "
            f"({1 - self.sparse_params / self.masked_params:.1%} fewer; {self.useful_params:,} useful in both)",
            f"file size: {self.source_bytes:,} B -> {self.target_bytes:,} B "
            f"({self.source_bytes / 2**20:.2f} MiB -> {self.target_bytes / 2**20:.2f} MiB)",
            f"max |masked(x) - sparse(x)| on a random batch of {self.batch}: {self.max_abs_diff:.3g}",
        ])


def convert_checkpoint(source: str | Path, target: str | Path, model: str = "vgg16_cifar", force: bool = False,
                       batch: int = 8, seed: int = 0) -> ConvertReport:
    """Convert a masked checkpoint into the sparse model's ``state_dict`` (exact).

    Args:
        source (str or Path): a ``state_dict`` of ``model(form="masked")``: bare or wrapped in a
            dict, with or without a ``module.`` prefix; part and classes are read from the weights.
        target (str or Path): where to write the sparse ``state_dict``; its folder must exist.
        model (str): the registered model (default ``"vgg16_cifar"``).
        force (bool): overwrite an existing ``target``.
        batch (int): size of the random 3x32x32 batch on which both forms are compared.
        seed (int): seed of that batch.

    Returns:
        ConvertReport: parameter counts, file sizes and the largest output difference.

    Raises:
        FileNotFoundError: ``source`` or ``target``'s folder is missing.
        FileExistsError: ``target`` exists and ``force`` is False.
        ValueError: ``source`` is not a masked checkpoint of ``model`` (nothing is written).
    """
    source, target = Path(source), Path(target)
    if not isinstance(force, bool):
        raise TypeError(f"force must be a bool, got {type(force).__name__}")
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"the folder of the output file {target} does not exist")
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass force=True (--force) to overwrite it")
    if target.is_dir():
        raise ValueError(f"the output {target} is a folder, expected a file name")
    state = state_dict_of(read_checkpoint(source), source)
    form, _ = infer_form(state, source)
    if form == "sparse":
        raise ValueError(f"{source} already holds a sparse-form state_dict (keys like '*.weight_kxk'); "
                         "nothing to convert")
    masked, info = load_model(source, model, state=state)
    sparse = to_sparse(masked).eval()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=generator)
    with torch.no_grad():
        diff = float((masked(x) - sparse(x)).abs().max())
    save_atomic(sparse.state_dict(), target)
    return ConvertReport(source, target, model, info["part"], info["num_classes"],
                         count_params(masked, stored=True), count_params(sparse, stored=True),
                         count_params(sparse), source.stat().st_size, target.stat().st_size, diff, batch)


def __getattr__(name: str):
    if name == "infer_layout":  # 0.1 name ("layout" also meant memory format and torch.layout)
        import warnings

        warnings.warn("sparse_hetconv.checkpoint.infer_layout is deprecated; use infer_form", DeprecationWarning,
                      stacklevel=2)
        return infer_form
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
