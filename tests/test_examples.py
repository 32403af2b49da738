"""The examples run (in their fast --quick mode)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SCIPY_AUTODIFF

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_quick(path):
    out = subprocess.run(
        [sys.executable, str(path), "--quick"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    if path.stem.startswith("fit_") and not SCIPY_AUTODIFF:
        # SciPy alone cannot differentiate f: the example says so and stops.
        assert "gradients need jax or torch to differentiate f" in out.stdout
        return
    assert "tsit5" in out.stdout
