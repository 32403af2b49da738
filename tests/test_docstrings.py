"""The Examples sections of the public docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest
from conftest import need

# module -> the backend its examples solve on (None: no solve)
MODULES = {
    "diffeqkit._problem": None,
    "diffeqkit._arrays": None,
    "diffeqkit._solve": "scipy",
    "diffeqkit._info": "scipy",
}


@pytest.mark.parametrize("name", list(MODULES))
def test_docstring_examples_run(name):
    if MODULES[name] is not None:
        need(MODULES[name])
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
