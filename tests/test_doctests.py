"""Every docstring example (``>>>``) of the package runs and prints what it shows.

The examples are found with :mod:`doctest` in every module of ``pyro_subnet`` (each module is
imported; its docstrings, and those of its classes, functions and methods, are searched). Each
docstring's examples run as one test in a namespace of only ``torch``, ``pyro``, ``nn``
(``torch.nn``) and ``ps`` (``pyro_subnet``), the names the examples take as imported, and not in
the module's own namespace: what an example needs beyond them it imports or reaches as ``ps.``,
as a reader who copies it must. Output is compared with ``ELLIPSIS`` and
``NORMALIZE_WHITESPACE``. No example may be skipped: an example that cannot run here is not an
example.

Examples whose output depends on random draws seed themselves (``pyro.set_rng_seed``); the test
seeds the global generators with a seed of its own first, so an example that only passes under
the suite's usual seed 0 fails here.
"""

import doctest
import importlib
import pkgutil

import pyro
import pytest
import torch
from torch import nn

import pyro_subnet as ps

NAMESPACE = {"torch": torch, "pyro": pyro, "nn": nn, "ps": ps}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
MODULES = ["pyro_subnet"] + sorted(m.name for m in pkgutil.walk_packages(ps.__path__, "pyro_subnet."))


def _collect():
    finder = doctest.DocTestFinder()
    tests, errors = [], []
    for name in MODULES:
        try:
            found = finder.find(importlib.import_module(name), globs=dict(NAMESPACE))
        except ValueError as e:           # a docstring doctest cannot parse (e.g. a stray directive)
            errors.append(f"{name}: {e}")
            continue
        tests += [t for t in found if t.examples]
    return sorted(tests, key=lambda t: t.name), errors


TESTS, PARSE_ERRORS = _collect()


def test_every_docstring_parses():
    assert not PARSE_ERRORS, "\n".join(PARSE_ERRORS)


def test_no_example_is_skipped():
    skipped = [f"{t.name} (line {t.lineno + e.lineno + 1}): {e.source.strip()}"
               for t in TESTS for e in t.examples if e.options.get(doctest.SKIP)]
    assert not skipped, "examples marked +SKIP:\n" + "\n".join(skipped)


def test_the_public_classes_have_examples():
    """The classes users start from end their docstrings with a runnable example."""
    names = {t.name for t in TESTS}
    for obj in (ps.nn.BayesianNet, ps.nn.ModelBridge, ps.infer.AutoSubnetLaplace, ps.infer.AutoSampledLaplace,
                ps.infer.AutoDiagonalLaplace, ps.infer.SGHMC, ps.infer.SpikeSlabSGHMC, ps.infer.AnnealedSMC,
                ps.infer.AnalyticPredictive, ps.to_inference_data):
        assert f"{obj.__module__}.{obj.__qualname__}" in names or obj.__module__ in names, obj


@pytest.mark.parametrize("test", TESTS, ids=[t.name for t in TESTS])
def test_docstring_example(test):
    pyro.set_rng_seed(20240601)
    report = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)
