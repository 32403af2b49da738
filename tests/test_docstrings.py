"""The Examples sections of the public docstrings, and the docs' worked examples,
run and print (or assert) what they claim."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest
from conftest import need, need_gradients

ROOT = Path(__file__).parent.parent


# module -> the backend its examples solve on (None: no solve)
MODULES = {
    "diffeqkit._problem": None,
    "diffeqkit._arrays": None,
    "diffeqkit._solve": "scipy",
    "diffeqkit._info": "scipy",
    "diffeqkit._gradients": "scipy",
    "diffeqkit.equinox": "jax",
}
# Modules whose examples take gradients on SciPy.
GRADIENTS = {"diffeqkit._gradients"}


@pytest.mark.parametrize("name", list(MODULES))
def test_docstring_examples_run(name):
    if MODULES[name] is not None:
        need(MODULES[name])
    if name in GRADIENTS:
        need_gradients("scipy")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def runnable_blocks(page: str) -> list[str]:
    """The self-contained Python blocks of a docs page (those importing diffeqkit)."""
    text = (ROOT / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    return [b for b in blocks if "import diffeqkit as dk" in b]


@pytest.mark.parametrize("page", ["docs/gradients.md", "docs/index.md", "README.md"])
def test_docs_worked_examples_run(page):
    need("scipy")
    blocks = runnable_blocks(page)
    assert blocks, f"{page} has no self-contained example"
    if "value_and_grad" in "".join(blocks) or "vjp" in "".join(blocks):
        need_gradients("scipy")
    for block in blocks:
        exec(compile(block, page, "exec"), {})
