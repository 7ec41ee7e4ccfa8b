"""Names that moved (0.1 -> 0.2, and ``cifar`` -> ``training`` in 0.3), kept working with a ``DeprecationWarning``.

``CHANGELOG.md`` lists every rename. Old module paths (``import sparse_hetconv.spconv``) are served
by a finder that imports the new module under the old name; old top-level names
(``sparse_hetconv.train_cifar``) by the package's ``__getattr__``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module path -> new module path
MODULES = {
    "sparse_hetconv.spconv": "sparse_hetconv.submanifold",
    "sparse_hetconv.integrations": "sparse_hetconv.flop_tools",
    "sparse_hetconv.data": "sparse_hetconv.training.data",
    "sparse_hetconv.train": "sparse_hetconv.training.trainer",
    "sparse_hetconv.cifar": "sparse_hetconv.training",
    "sparse_hetconv.cifar.data": "sparse_hetconv.training.data",
    "sparse_hetconv.cifar.train": "sparse_hetconv.training.trainer",
    "sparse_hetconv.demo": "sparse_hetconv.cli.demo",
}
#: old top-level attribute -> (module, attribute)
ATTRIBUTES = {
    "TrainConfig": ("sparse_hetconv.training", "TrainConfig"),
    "train_cifar": ("sparse_hetconv.training", "train"),
    "cifar": ("sparse_hetconv.training", None),
    "HetConvifyReport": ("sparse_hetconv.convert", "ConversionReport"),
    "integrations": ("sparse_hetconv.flop_tools", None),
}


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points at the code using the old name: past this module and the
    package's ``__getattr__``, not counting the import machinery's frames (``warnings`` skips them)."""

    def ours(frame) -> bool:
        return frame.f_code.co_filename == __file__ or frame.f_globals.get("__name__") == "sparse_hetconv"

    def internal(frame) -> bool:
        name = frame.f_code.co_filename
        return "importlib" in name and "_bootstrap" in name

    frame, level = sys._getframe(2), 1  # the frame of _warn's caller is level 1
    while frame is not None and ours(frame):
        frame = frame.f_back
        while frame is not None and internal(frame):
            frame = frame.f_back
        level += 1
    return level


def _fromlist_probe() -> bool:
    """Whether the package's ``__getattr__`` was called by the import machinery's ``hasattr`` probe
    of a ``from sparse_hetconv import name`` (the statement then looks the name up itself)."""
    caller = sys._getframe(3)  # attribute <- the package's __getattr__ <- its caller
    return caller.f_code.co_name == "_handle_fromlist" and "importlib" in caller.f_code.co_filename


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated (renamed); use {new}", DeprecationWarning,
                  stacklevel=_caller_stacklevel() + 1)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``import sparse_hetconv.<old>`` with the new module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def __init__(self) -> None:
        self._specs: dict[int, object] = {}

    def create_module(self, spec):
        _warn(spec.name, MODULES[spec.name])
        module = importlib.import_module(MODULES[spec.name])
        self._specs[id(module)] = module.__spec__  # importlib stamps the old name's spec on it next
        return module

    def exec_module(self, module) -> None:  # the new module is already executed
        module.__spec__ = self._specs.pop(id(module), module.__spec__)  # it keeps its own spec


def install() -> None:
    """Put the finder on ``sys.meta_path`` once, first: an old package's submodules
    (``sparse_hetconv.cifar.data``) would otherwise be found again, as new modules, on the path
    of the package it stands for."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())


def renamed(module: str, names: dict[str, str]):
    """A module ``__getattr__`` serving the old ``names`` of that module's objects (old -> new), with a warning."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        _warn(f"{module}.{name}", names[name])
        return getattr(sys.modules[module], names[name])

    return __getattr__


def attribute(name: str):
    """The object an old top-level name stands for (warns), or raise ``AttributeError``."""
    if name not in ATTRIBUTES:
        raise AttributeError(f"module 'sparse_hetconv' has no attribute {name!r}")
    module, attr = ATTRIBUTES[name]
    if not _fromlist_probe():  # (the from-import's own lookup, which follows, warns)
        _warn(f"sparse_hetconv.{name}", module + (f".{attr}" if attr else ""))
    target = importlib.import_module(module)
    return target if attr is None else getattr(target, attr)
