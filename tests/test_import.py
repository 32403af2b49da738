"""Importing diffeqkit imports no framework; a SciPy solve needs none either."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need

ROOT = Path(__file__).resolve().parents[1]

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


def test_solve_and_gradient_load_neither_the_tools_nor_rich():
    need("scipy")
    # The measuring tools and their table printer are never part of a solve.
    code = """
import sys
import numpy as np
import diffeqkit as dk
# prob.jac differentiates f: no framework needed, whichever session runs this.
prob = dk.ODEProblem(
    lambda u, p, t: -0.5 * u, np.array([1.0]), (0.0, 1.0),
    jac=lambda u, p, t: -0.5 * np.eye(1),
)
sol = dk.solve(prob, "tsit5", backend="scipy")
sol, pullback = dk.vjp(
    prob, "tsit5", backend="scipy", sensealg=dk.ForwardMode(autodiff="jac")
)
pullback(np.ones_like(sol.u))
loaded = sorted(
    m for m in sys.modules if m == "rich" or m.startswith(("rich.", "diffeqkit.tools"))
)
print("LOADED", loaded)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


def _imported_modules(path: Path) -> set[str]:
    """The modules a source file imports anywhere (inside functions too), with
    relative imports resolved against its package."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(ROOT).parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


CORE = [
    p
    for p in sorted((ROOT / "diffeqkit").rglob("*.py"))
    if "tools" not in p.relative_to(ROOT).parts and p.name != "__main__.py"
]


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_core_module_imports_the_tools(path):
    # The measuring tools use the core, never the other way round; checked in the
    # source, so that an import inside a function counts as well.
    tools = {m for m in _imported_modules(path) if m.startswith("diffeqkit.tools")}
    assert not tools, f"{path} imports {sorted(tools)}"
