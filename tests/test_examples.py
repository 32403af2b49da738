"""The examples run (in their fast --quick mode).

An example that needs more than SciPy says so in a comment line near its top,
``# requires: jax equinox optax``. It is marked with the backends it names (so it
runs in that backend's nox session, which installs the rest) and skipped, with
the missing module named, where something it needs is not installed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SCIPY_AUTODIFF, need

from diffeqkit import backends

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


def requirements(path: Path) -> list[str]:
    """The modules an example's ``# requires:`` line names (none: SciPy only)."""
    head = path.read_text().splitlines()[:40]
    for line in head:
        match = re.match(r"#\s*requires:\s*(.*)", line)
        if match:
            return match.group(1).split()
    return []


def _param(path: Path):
    needs = requirements(path)
    marks = [getattr(pytest.mark, b) for b in backends.SPECS if b in needs]
    return pytest.param(path, needs, id=path.stem, marks=marks)


@pytest.mark.parametrize(("path", "needs"), [_param(p) for p in EXAMPLES])
def test_example_runs_quick(path, needs, tmp_path):
    for module in needs:
        if module in backends.SPECS:
            need(module)
        elif importlib.util.find_spec(module) is None:
            pytest.skip(f"{path.name} needs {module}: pip install {module}")
    out = subprocess.run(
        [sys.executable, str(path), "--quick"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # figures an example saves land here, not in the checkout
    )
    assert out.returncode == 0, out.stdout + out.stderr
    if path.stem.startswith("fit_") and not SCIPY_AUTODIFF:
        # SciPy alone cannot differentiate f: the example says so and stops.
        assert "gradients need jax or torch to differentiate f" in out.stdout
        return
    if not needs:
        assert "tsit5" in out.stdout


def test_requirements_are_read(tmp_path):
    example = tmp_path / "ex.py"
    example.write_text('"""Doc."""\n\n# requires: jax equinox optax\nimport jax\n')
    assert requirements(example) == ["jax", "equinox", "optax"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_an_example_declares_the_modules_it_imports_at_top_level(path):
    """A `# requires:` line past the lines read (or a missing one) would run the
    example as SciPy-only, in the wrong session; this catches that."""
    imported = set(re.findall(r"^(?:import|from) (\w+)", path.read_text(), re.M))
    optional = {"jax", "torch", "optax", "equinox", "matplotlib", "numpyro", "pymc"}
    assert imported & optional <= set(requirements(path))
