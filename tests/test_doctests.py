"""The ``>>>`` examples in the package's docstrings run and print what they say.

Every example sees the top-level names (``SparseHetConv2d``, ``to_sparse``, ...), ``torch``,
``nn`` and the registered models, as a user who ran ``from sparse_hetconv import *`` would.
The opt-in modules whose examples need an extra run where it is installed; the trainer's example
(20 epochs on Fashion-MNIST) is marked ``+SKIP``.
"""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from torch import nn

import sparse_hetconv
from sparse_hetconv import models

MODULES = ["autotune", "batchnorm", "convert", "counting", "functional", "masked", "models.resnet", "models.vgg",
           "pattern", "permutation", "probing", "shifted", "sparse"]
#: opt-in modules and the extra their examples import
OPTIONAL = {"flop_tools": "fvcore", "submanifold": "spconv"}


@pytest.mark.parametrize("name", sorted(OPTIONAL))
def test_optional_docstring_examples_run(name):
    pytest.importorskip(OPTIONAL[name])
    if name == "flop_tools":
        pytest.importorskip("ptflops")
    test_docstring_examples_run(name)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(f"sparse_hetconv.{name}")
    names = {n: getattr(sparse_hetconv, n) for n in sparse_hetconv.__all__}
    names |= {n: getattr(models, n) for n in models.__all__} | {"torch": torch, "nn": nn}
    torch.manual_seed(0)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, extraglobs=names)
    assert tests, f"sparse_hetconv.{name} has no examples: drop it from MODULES"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in sparse_hetconv.{name} failed"
