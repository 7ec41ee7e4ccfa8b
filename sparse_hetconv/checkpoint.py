"""Reading, writing and converting HetConv checkpoints.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The published VGG-16 script
saves the ``state_dict`` of the masked model (keys ``features.3.gwc.weight``,
``features.3.pwc.weight``, ...), sometimes wrapped in a dict and with DataParallel's ``module.``
prefix; other implementations save their own models (zhang943's ``{'net': DataParallel(vgg)}``,
sxpro's shifted layers). :func:`convert_checkpoint` turns such a file into the sparse model's
``state_dict``, for a registered model or for the user's own factory (docs/conversion.md).
Files are always read with ``torch.load(weights_only=True)``: tensors and plain containers only,
never arbitrary code. Files are written to a temporary name first and renamed, so a failure never
leaves a half-written file behind.
"""

from __future__ import annotations

import errno
import re
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from ._base import _HetConvBase
from ._checks import import_object
from ._files import atomic_write, check_output_file
from .convert import hetconvify, to_sparse
from .counting import count_params
from .models import create_model, list_models
from .permutation import ChannelPermutation
from .shifted import from_shifted

__all__ = ["CheckpointReport", "convert_checkpoint", "read_checkpoint", "state_dict_of", "infer_form",
           "load_model", "resolve_model", "save_atomic", "TRAIN_FORMAT"]

TRAIN_FORMAT = "sparse_hetconv.train"
# Keys under which training scripts commonly nest the model's state_dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
_IGNORABLE_MISSING = ("num_batches_tracked",)


def save_atomic(obj: object, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and a rename
    (:func:`sparse_hetconv._files.atomic_write`): ``path`` holds its previous content or the whole
    new one, never a part; no temporary file is left on an error or Ctrl-C (a killed process
    leaves a hidden ``.NAME.*.tmp``). The file gets the mode ``open()`` would give it.

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
        ValueError: the file is not a readable PyTorch checkpoint (empty, truncated or damaged, not
            written by ``torch.save``, or holding objects other than tensors and plain containers,
            which are never loaded); the message names the file and gives the reason, not torch's
            advice to load the file unsafely.
    """
    path = _existing_file(path)
    with open(path, "rb") as file:  # the file system's errors (permissions, I/O) name the file
        head = file.read(8)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged or foreign file
        if isinstance(error, OSError) and error.filename is not None:
            raise
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({_load_failure(error, head)})") from error


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, expected a checkpoint file", str(path))
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "checkpoint does not exist", str(path))
    return path


# torch.load's advice around the reason of a weights-only failure (to load the file unsafely, to
# allow-list its classes, to file an issue): none of it is the reason, and the first is unsafe.
_ADVICE = re.compile(r"weights_only|Weights only load failed|torch\.load|safe_globals|file an issue|"
                     r"^\(\d\)|do those steps", re.IGNORECASE)


def _load_failure(error: BaseException, head: bytes) -> str:
    """Why torch.load refused a file that begins with ``head``, without torch's advice."""
    if not head:
        return "the file is empty"
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip file (a pickle before 1.6)
        return f"not a file written by torch.save: it begins with {head!r}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if isinstance(error, OSError) or "PytorchStreamReader" in text or isinstance(error, (EOFError, LookupError)):
        first = re.split(r"\.\s", text.strip())[0] or "no reason given"
        return f"truncated or damaged: {type(error).__name__}: {first}"
    marker = text.find("WeightsUnpickler error:")
    if marker >= 0:
        text = text[marker + len("WeightsUnpickler error:"):]
    for line in text.splitlines():
        line = re.split(r"\. (?=Please use|This is an internal|If you are seeing)", line.strip())[0].rstrip(".")
        if line and not _ADVICE.search(line):
            if "GLOBAL" in line or "global" in line:
                return (f"torch.load with weights_only=True failed: it holds objects other than tensors and plain "
                        f"containers, which are never loaded ({line}); save model.state_dict() instead")
            return f"torch.load with weights_only=True failed: {line}"
    return f"torch.load with weights_only=True failed: {type(error).__name__}"


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
    if channels is None or block < 1 or channels % block or channels < block:
        raise ValueError(f"{path}: cannot read the HetConv part from '{key}' of shape {tuple(weight.shape)}: expected "
                         f"(N, M/P, k, k) beside a 1x1 weight over M input channels (M = {channels})")
    return channels // block


def _last_linear(model: nn.Module) -> str | None:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


# -- the model a checkpoint belongs to: a registered name or the user's factory --------------------
def resolve_model(model: str):
    """The constructor named by ``model``: a registered model (``"vgg16_cifar"``) or a factory
    ``"package.module:function"`` (any callable returning an ``nn.Module``; ``"pkg.mod:Class"``
    and ``"pkg.mod:obj.method"`` work too), imported here.

    Raises:
        TypeError: ``model`` is not a string, or names something that is not callable.
        ValueError: an unknown registered name, a module that cannot be imported or an attribute
            it does not have (the message says which).
    """
    if not isinstance(model, str):
        raise TypeError(f"model must be a str (a registered name or 'package.module:function'), got "
                        f"{type(model).__name__}")
    if ":" not in model:
        if model not in list_models():
            raise ValueError(f"model ({model!r}) is not registered; available: {', '.join(list_models())}; "
                             "or give your own factory as 'package.module:function'")
        return partial(create_model, model)
    target = import_object(model, "model")
    if not callable(target):
        raise TypeError(f"model ({model!r}) names a {type(target).__name__}, expected a function or class that "
                        "returns an nn.Module")
    return target


def _build(factory, model: str, kwargs: dict) -> nn.Module:
    try:
        net = factory(**kwargs)
    except Exception as error:  # the user's factory: its failure is a mistake in the arguments
        raise ValueError(f"model {model} with arguments {kwargs} failed: {type(error).__name__}: {error}") from error
    if not isinstance(net, nn.Module):
        raise TypeError(f"model {model} returned a {type(net).__name__}, expected an nn.Module")
    return net


def _fit(net: nn.Module, state: dict[str, Tensor], path, label: str) -> dict[str, Tensor]:
    """``state`` with the keys ``net`` expects (a prefix all keys share dropped where that makes
    them fit), or a ``ValueError`` listing missing and unexpected keys and wrong shapes."""
    expected = net.state_dict()
    for prefix in ("", "module.", "model.", "net.", "_orig_mod."):
        if prefix and not all(key.startswith(prefix) for key in state):
            continue
        candidate = {key[len(prefix):]: value for key, value in state.items()}
        if set(candidate) <= set(expected) and all(k in candidate or k.endswith(_IGNORABLE_MISSING) for k in expected):
            state = candidate
            break
    missing = [k for k in expected if k not in state and not k.endswith(_IGNORABLE_MISSING)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        problems = [f"{what}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''} ({len(items)})"
                    for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("wrong shapes", wrong)) if items]
        raise ValueError(f"{path} does not fit {label}: " + "; ".join(problems))
    return state


def _load(net: nn.Module, state: dict[str, Tensor], path, label: str) -> nn.Module:
    net.load_state_dict(_fit(net, state, path, label), strict=False)
    return net


def _checkpoint_dtype(state: dict[str, Tensor], path) -> torch.dtype:
    """The floating dtype of a checkpoint (the most common one, with a warning, if it mixes them)."""
    sizes: dict[torch.dtype, int] = {}
    for value in state.values():
        if value.is_floating_point():
            sizes[value.dtype] = sizes.get(value.dtype, 0) + value.numel()
    if not sizes:
        return torch.float32
    dtype = max(sizes, key=sizes.get)
    if len(sizes) > 1:
        names = ", ".join(str(d).replace("torch.", "") for d in sizes)
        warnings.warn(f"{path} mixes floating dtypes ({names}); the converted checkpoint is "
                      f"{str(dtype).replace('torch.', '')} throughout", stacklevel=3)
    return dtype


def _check_finite(state: dict[str, Tensor], path, allow: bool) -> bool:
    """Refuse (or, with ``allow``, warn about) non-finite values; True if there are any."""
    bad = [(k, int((~torch.isfinite(v)).sum())) for k, v in state.items() if v.is_floating_point()]
    bad = [(k, n) for k, n in bad if n]
    if not bad:
        return False
    listed = ", ".join(f"{k} ({n} of {state[k].numel()})" for k, n in bad[:4]) + (" ..." if len(bad) > 4 else "")
    message = f"{path} holds non-finite values (inf or NaN) in {len(bad)} tensors: {listed}"
    if not allow:
        raise ValueError(f"{message}; pass allow_nonfinite=True (--allow-nonfinite) to convert it anyway")
    warnings.warn(f"{message}; converting anyway (allow_nonfinite=True)", stacklevel=3)
    return True


def _to_sparse_form(net: nn.Module, probe=None):
    """The pipeline a checkpoint goes through: shifted-pattern layers to block ones (their
    permutations absorbed), then every block HetConv, and the modules ``probe`` names, to the
    sparse form. Returns the model, the paths converted, the permutations left, the paths skipped
    (and why) and the paths read by probing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(from_shifted|to_sparse): the model has no layer to convert")
        net, shifted = from_shifted(net, memory_format=None, return_report=True)
        net, sparse = to_sparse(net, memory_format=None, inplace=True, return_report=True, probe=probe)  # a copy
    left = [path for path, m in net.named_modules() if isinstance(m, ChannelPermutation) and not m.is_identity()]
    return net, shifted.replaced + sparse.replaced, left, {**shifted.skipped, **sparse.skipped}, sparse.probed


def _parts(net: nn.Module) -> list[int]:
    return sorted({m.part for m in net.modules() if isinstance(m, _HetConvBase)})


def load_model(path: str | Path, model: str = "vgg16_cifar", state: dict[str, Tensor] | None = None,
               model_kwargs: dict | None = None, probe=None) -> tuple[nn.Module, dict]:
    """Build the model a checkpoint belongs to, in the form it holds, and load the checkpoint.

    A registered ``model``: the form and part come from the weights (:func:`infer_form`), the
    number of classes from the model's last ``nn.Linear``. A factory ``"package.module:function"``
    (called with ``model_kwargs``): the checkpoint holds either what the factory builds, or what
    ``sparse-hetconv convert`` wrote for it (the factory's model converted to the sparse form).
    Missing ``num_batches_tracked`` entries (old checkpoints) are allowed; the model takes the
    checkpoint's floating dtype.

    Args:
        path (str or Path): the checkpoint (any layout :func:`state_dict_of` accepts).
        model (str): the registered model, or a factory, the weights belong to.
        state (dict, optional): an already extracted ``state_dict`` (``path`` then only names it).
        model_kwargs (dict, optional): keyword arguments of the constructor.
        probe (optional): the modules :func:`convert_checkpoint` read by probing (its ``probe``).

    Returns:
        (nn.Module, dict): the model in eval mode, and ``{"model", "form", "part", "num_classes"}``
        (for a factory, ``form`` is ``"source"`` or ``"sparse"`` and ``part`` the HetConv layers'
        part, None if they have several or there are none).

    Raises:
        FileNotFoundError / ValueError / TypeError: the file is missing or unreadable, ``model``
            cannot be built, or the checkpoint does not fit it (the message lists missing and
            unexpected keys and wrong shapes).
    """
    kwargs = _check_kwargs(model_kwargs)
    factory = resolve_model(model)
    if state is None:
        state = state_dict_of(read_checkpoint(path), path)
    dtype = _checkpoint_dtype(state, path)
    if ":" not in model:
        net, info = _load_registered(path, model, state, kwargs)
        return net.to(dtype).eval(), info
    net, form = _factory_model(_build(factory, model, kwargs), state, path, model, probe)
    net = _load(net.to(dtype), state, path, model)
    parts = _parts(net)
    head = _last_linear(net)
    info = {"model": model, "form": form, "part": parts[0] if len(parts) == 1 else None,
            "num_classes": net.get_submodule(head).out_features if head else None}
    return net.eval(), info


def _factory_model(net: nn.Module, state: dict[str, Tensor], path, model: str, probe=None) -> tuple[nn.Module, str]:
    """The factory's model in the structure ``state`` was saved from, and how it got there:
    ``"source"`` (as built), ``"hetconvify"`` (:func:`hetconvify` re-applied where ``state`` holds
    a HetConv layer at a dense convolution's path) or ``"sparse"`` (converted to the sparse form, ``probe`` naming the modules read by probing).

    Raises:
        ValueError: ``state`` fits none of these; the message lists what does not fit the closest.
    """
    try:
        _fit(net, state, path, model)
        return net, "source"
    except ValueError as error:
        as_source = error
    hint = ("; a checkpoint loads into the model the factory builds, hetconvify(factory(), ...) of it or either "
            "converted to the sparse form (sparse-hetconv convert): pass the factory and model_kwargs it was saved "
            "with")
    replaced = _hetconvify_as_saved(net, state, path)
    try:
        if replaced is not None:
            _fit(replaced[0], state, path, f"hetconvify({model}(), {replaced[1]})")
            return replaced[0], "hetconvify"
        converted, *_ = _to_sparse_form(net.eval(), probe)
        _fit(converted, state, path, f"{model} converted to the sparse form")
    except ValueError as error:
        raise ValueError(f"{as_source if replaced is None else error}{hint}") from None
    return converted, "sparse"


_HETCONV_KEYS = {"weight_kxk": "sparse", "gwc.weight": "masked"}  # the k x k weight's key in each form


def _hetconvify_as_saved(net: nn.Module, state: dict[str, Tensor], path) -> tuple[nn.Module, str] | None:
    """Re-apply :func:`hetconvify` to ``net`` as it was applied before ``state`` was saved: a
    ``state_dict`` holds everything it did (which convolutions became HetConv layers: their key
    names; their part: the k x k weight's shape beside the convolution's input channels; the
    form: ``weight_kxk`` or ``gwc.weight``). None if ``state`` holds no HetConv layer where ``net``
    has a dense convolution; else the model (changed in place) and what was applied, e.g.
    ``"part=4, form='sparse' at 12 layers"``."""
    convs = {name: m for name, m in net.named_modules() if type(m) in (nn.Conv2d, nn.Conv3d)}
    for prefix in ("", "module.", "model.", "net.", "_orig_mod."):
        groups: dict[tuple[int, str], set[str]] = {}
        for key, value in state.items():
            key = key[len(prefix):] if key.startswith(prefix) else None
            for suffix, form in _HETCONV_KEYS.items():
                layer = key[: -len(suffix) - 1] if key and key.endswith("." + suffix) else None
                if layer in convs:
                    groups.setdefault((_part(path, key, value, convs[layer].in_channels), form), set()).add(layer)
        if groups:
            break
    if not groups:
        return None
    skipped = {}
    for (part, form), layers in groups.items():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="hetconvify: no convolution could be replaced")  # said below
            net, report = hetconvify(net, part, form, skip_first=False, include=lambda p, _, layers=layers: p in layers,
                                     inplace=True, memory_format=None, return_report=True)
        skipped.update({p: why for p, why in report.skipped.items() if p in layers})
    if skipped:
        raise ValueError(f"{path} holds HetConv layers where the model has convolutions hetconvify cannot replace: "
                         + "; ".join(f"{p}: {why}" for p, why in skipped.items()))
    done = ", ".join(f"part={part}, form={form!r} at {len(layers)} layer{'s' * (len(layers) > 1)}"
                     for (part, form), layers in sorted(groups.items()))
    return net, done


def _load_registered(path, model: str, state: dict[str, Tensor], kwargs: dict) -> tuple[nn.Module, dict]:
    form, part = infer_form(state, path)
    kwargs = {"part": part, "form": form, **kwargs}
    try:
        net = create_model(model, **kwargs)
    except ValueError as error:
        raise ValueError(f"{model} with arguments {kwargs} (part and form read from {path}) cannot be built: "
                         f"{error}") from error
    head = _last_linear(net)
    classes = state.get(f"{head}.weight") if head else None
    num_classes = int(classes.shape[0]) if isinstance(classes, Tensor) and classes.dim() == 2 else None
    if num_classes and num_classes != net.get_submodule(head).out_features and "num_classes" not in kwargs:
        net = create_model(model, **kwargs, num_classes=num_classes)
    _load(net, state, path, f"{model}(part={part}, form={form!r})")
    info = {"model": model, "form": form, "part": part, "num_classes": net.get_submodule(head).out_features
            if head else None}
    return net.eval(), info


def _check_kwargs(model_kwargs) -> dict:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, dict) or not all(isinstance(k, str) for k in model_kwargs):
        raise TypeError(f"model_kwargs must be a dict of keyword arguments, got {type(model_kwargs).__name__}")
    return dict(model_kwargs)


@dataclass
class CheckpointReport:
    """What :func:`convert_checkpoint` did.

    ``masked_params`` are the parameters the source model stores (for a registered model its
    masked form, zeros included), ``sparse_params`` those of the converted model, and
    ``useful_params`` the useful ones (the same in both). ``max_abs_diff`` and ``relative_diff``
    compare the two models' outputs on a random batch, computed in float64. ``converted`` lists the
    layers converted, ``probed`` those of them read by probing.
    """

    source: Path
    target: Path
    model: str
    part: int | None
    num_classes: int | None
    masked_params: int
    sparse_params: int
    useful_params: int
    source_bytes: int
    target_bytes: int
    max_abs_diff: float
    batch: int
    relative_diff: float = 0.0
    dtype: str = "float32"
    source_form: str = "masked"
    converted: list[str] = field(default_factory=list)
    permutations: list[str] = field(default_factory=list)
    probed: list[str] = field(default_factory=list)
    input_size: tuple[int, ...] = (3, 32, 32)

    def __str__(self) -> str:
        name = self.model if self.part is None else f"{self.model}(part={self.part})"
        src = self.source_form
        lines = [
            f"{name}: {self.source} ({src}) -> {self.target} (sparse, {self.dtype})",
            f"converted {len(self.converted)} layers{f' ({len(self.probed)} by probing)' * bool(self.probed)}; "
            "channel permutations left at run time: "
            f"{', '.join(self.permutations) or 'none'}",
            f"parameters stored: {src} {self.masked_params:,} -> sparse {self.sparse_params:,} "
            f"({1 - self.sparse_params / max(self.masked_params, 1):.1%} fewer; {self.useful_params:,} useful in both)",
            f"file size: {self.source_bytes:,} B -> {self.target_bytes:,} B "
            f"({self.source_bytes / 2**20:.2f} MiB -> {self.target_bytes / 2**20:.2f} MiB)",
            f"max |{src}(x) - sparse(x)| on a random batch of {self.batch} x {'x'.join(map(str, self.input_size))}: "
            f"{self.max_abs_diff:.3g} (relative {self.relative_diff:.3g}, float64)",
        ]
        return "\n".join(lines)


def _input_size(net: nn.Module, input_size) -> tuple[int, ...]:
    if input_size is not None:
        if not isinstance(input_size, (tuple, list)) or not 2 <= len(input_size) <= 4 \
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in input_size):
            raise ValueError(f"input_size ({input_size!r}) must be (channels, height, width) or (channels, depth, "
                             "height, width) of positive ints")
        return tuple(input_size)
    first = next((m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    if first is None:
        raise ValueError("the model has no convolution to read its input channels from; pass input_size "
                         "(--input-size C,H,W)")
    return (first.in_channels,) + (32, 32) if isinstance(first, nn.Conv2d) else (first.in_channels, 16, 16, 16)


def _outputs_on(x: Tensor, model: str, *nets: nn.Module) -> list[Tensor]:
    """Each model's output on ``x`` (no grad), or a ValueError naming the input's shape when the
    user's model cannot take it (wrong channels, too small)."""
    try:
        with torch.no_grad():
            return [net(x) for net in nets]
    except Exception as error:  # the user's model on an input of the wrong size
        raise ValueError(f"model {model} failed on a random input of shape {tuple(x.shape)} "
                         f"({type(error).__name__}: {error}); pass input_size (--input-size C,H,W) that it takes") \
            from error


def _compare(source: nn.Module, converted: nn.Module, shape: tuple[int, ...], seed: int, model: str,
             nonfinite: bool) -> tuple[float, float]:
    """Both models on one random float64 batch: ``(max |a - b|, relative difference)``."""
    generator = torch.Generator().manual_seed(seed)
    expected, got = _outputs_on(torch.randn(shape, generator=generator, dtype=torch.float64), model, source, converted)
    finite = torch.isfinite(expected) & torch.isfinite(got)
    diff = (got - expected).where(finite, torch.zeros((), dtype=got.dtype))
    scale = float(expected.where(finite, torch.zeros((), dtype=got.dtype)).norm())
    relative = float(diff.norm()) / scale if scale else float(diff.norm())
    if not nonfinite and (not bool(finite.all()) or relative > 1e-9):
        raise ValueError(f"the converted model's outputs differ from {model}'s by {relative:.3g} (relative) on a "
                         "random batch; nothing was written (this is a bug in sparse_hetconv: please report it)")
    return float(diff.abs().max()) if diff.numel() else 0.0, relative


def convert_checkpoint(source: str | Path, target: str | Path, model: str = "vgg16_cifar", force: bool = False,
                       batch: int = 8, seed: int = 0, *, model_kwargs: dict | None = None, input_size=None,
                       allow_nonfinite: bool = False, probe=None) -> CheckpointReport:
    """Convert a checkpoint of any HetConv model into the sparse model's ``state_dict`` (exact).

    The source model is built from ``model`` (a registered name, whose part, form and classes are
    read from the weights, or your factory ``"package.module:function"`` called with
    ``model_kwargs``) and the checkpoint loaded into it; every HetConv layer is converted
    (shifted-pattern layers by :func:`~sparse_hetconv.shifted.from_shifted`, then every block one
    by :func:`~sparse_hetconv.to_sparse`), in float64, and the converted model is checked against
    the source on a random batch before anything is written. The output keeps the checkpoint's
    floating dtype. To load it: :func:`load_model` with the same ``model`` and ``model_kwargs``.

    Args:
        source (str or Path): the checkpoint: a bare ``state_dict`` or one wrapped in a dict under
            ``state_dict``, ``model_state_dict``, ``model``, ``net`` or ``state``, its keys with or
            without a ``module.`` (DataParallel), ``model.``, ``net.`` or ``_orig_mod.`` prefix.
        target (str or Path): where to write the sparse ``state_dict``; its folder must exist and
            be writable.
        model (str): a registered model (default ``"vgg16_cifar"``) or ``"package.module:function"``.
        force (bool): overwrite an existing ``target``.
        batch (int): size of the random batch on which both models are compared.
        seed (int): seed of that batch.
        model_kwargs (dict, optional): keyword arguments of the model's constructor.
        input_size (tuple, optional): ``(C, H, W)`` (``(C, D, H, W)``) of that batch; default the
            first convolution's input channels at 32 x 32 (16^3).
        allow_nonfinite (bool): convert a checkpoint holding inf or NaN (with a warning) instead of
            refusing it.
        probe (optional): modules to convert by probing, as for :func:`~sparse_hetconv.to_sparse`
            (a class, ``"package.module:Class"``, a module path or a
            :class:`~sparse_hetconv.probing.Probe`, or a list of them).

    Returns:
        CheckpointReport: what was converted, parameter counts, file sizes, the output difference.

    Raises:
        FileNotFoundError: ``source`` or ``target``'s folder is missing.
        FileExistsError: ``target`` exists and ``force`` is False.
        PermissionError: ``target``'s folder is not writable.
        TypeError / ValueError: bad arguments, a model that cannot be built, a checkpoint that does
            not fit it, non-finite values, nothing to convert. All of these are checked before the
            work that can be skipped, and nothing is written.
    """
    source, target = Path(source), Path(target)
    for name, value in (("force", force), ("allow_nonfinite", allow_nonfinite)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    for name, value in (("batch", batch), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "batch" else 0):
            raise ValueError(f"{name} ({value!r}) must be an int >= {1 if name == 'batch' else 0}")
    kwargs = _check_kwargs(model_kwargs)
    _existing_file(source)
    check_output_file(target, force)  # before any work
    factory = resolve_model(model)
    state = state_dict_of(read_checkpoint(source), source)
    nonfinite = _check_finite(state, source, allow_nonfinite)
    dtype = _checkpoint_dtype(state, source)
    if ":" in model:
        net, source_form = _factory_model(_build(factory, model, kwargs), state, source, model, probe)
        net = _load(net.double(), state, source, model)
        info = {"part": None, "num_classes": None}
    else:
        if infer_form(state, source)[0] == "sparse":
            raise ValueError(f"{source} already holds a sparse-form state_dict (keys like '*.weight_kxk'); "
                             "nothing to convert")
        net, info = _load_registered(source, model, state, kwargs)  # float32 holds float16 / bfloat16 exactly
        net = net.double()
        source_form = "masked"
    net.eval()
    shape = (batch,) + _input_size(net, input_size)
    converted, paths, permutations, skipped, probed = _to_sparse_form(net, probe)
    if not paths and _parts(converted):
        raise ValueError(f"{source} already holds the sparse form of model {model}: nothing to convert; load it with "
                         "load_model or export it as it is")
    if not paths:
        why = "".join(f"; {p or '<root>'}: {reason}" for p, reason in skipped.items())
        raise ValueError(f"{source}: model {model} has no HetConv layer to convert{why}")
    max_abs, relative = _compare(net, converted.eval(), shape, seed, model, nonfinite)
    converted = converted.to(dtype)
    save_atomic(converted.state_dict(), target)
    parts = _parts(converted)
    head = _last_linear(converted)
    return CheckpointReport(
        source, target, model, info["part"] or (parts[0] if len(parts) == 1 else None),
        info["num_classes"] or (converted.get_submodule(head).out_features if head else None),
        count_params(net, stored=True), count_params(converted, stored=True), count_params(converted),
        source.stat().st_size, target.stat().st_size, max_abs, batch, relative,
        str(dtype).replace("torch.", ""), source_form, paths, permutations, probed, shape[1:])

