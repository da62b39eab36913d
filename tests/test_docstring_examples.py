"""The examples in featmix's docstrings run and print what they show (doctest)."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import featmix

MODULES = sorted(m.name for m in pkgutil.walk_packages(featmix.__path__, "featmix."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, one_thread):
    module = importlib.import_module(name)
    torch.manual_seed(0)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, globs={"featmix": featmix, "torch": torch}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (run with -s to see them)"

