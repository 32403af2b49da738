"""Importing diffeqkit imports no framework; a SciPy solve needs none either."""

from __future__ import annotations

import subprocess
import sys

from conftest import need

FRAMEWORKS = ("jax", "jaxlib", "diffrax", "equinox", "torch", "torchdiffeq")


def test_import_and_numpy_solve_load_no_framework():
    need("scipy")
    # In a subprocess: in-process, another test may already have imported torch.
    code = f"""
import sys
import numpy as np
import diffeqkit as dk
prob = dk.ODEProblem(lambda u, p, t: -u, np.array([1.0]), (0.0, 1.0))
sol = dk.solve(prob, "tsit5", backend="scipy")
assert abs(sol.u[-1, 0] - np.exp(-1.0)) < 1e-6
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r})
print("LOADED", loaded)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


def test_import_does_not_load_scipy():
    code = "import sys, diffeqkit; print('scipy' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
