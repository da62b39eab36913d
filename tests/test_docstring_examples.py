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



def _public_callables():
    names = [(f"featmix.{n}", getattr(featmix, n)) for n in featmix.__all__ if n != "functional"]
    names += [(f"featmix.functional.{n}", getattr(featmix.functional, n)) for n in featmix.functional.__all__]
    return [(name, obj) for name, obj in names if callable(obj)]


@pytest.mark.parametrize("name,obj", _public_callables(), ids=[n for n, _ in _public_callables()])
def test_every_public_name_states_its_contract_with_an_example(name, obj):
    doc = obj.__doc__ or ""
    assert ">>>" in doc, f"{name} has no example (doctested by test_docstring_examples_run)"
    record_like = hasattr(obj, "__dataclass_fields__") or hasattr(obj, "_fields")  # fields in the class body
    if not record_like and name != "featmix.MixedBatch":
        assert "Args:" in doc, f"{name} documents no Args:"
