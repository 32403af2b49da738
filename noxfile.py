"""Sessions: tests(backend), tests_all, lint, typecheck, docs (default); bench on
demand.

Each test runs where it means something, once where it can:

- `tests(backend)` installs ONLY that backend's extra (with the integrations that
  need only that framework: equinox and NumPyro with JAX, and what the examples
  use) into a fresh virtualenv and requires its tests to run
  (DIFFEQKIT_REQUIRE_BACKENDS), which proves the other backends optional. It runs
  the tests marked with that backend and the unmarked ones (the core, with only
  that backend present), not those marked slow.
- `tests_all`, with every backend and integration installed, runs what needs them
  together: the slow tests (stiff suites, secondary implicit algs), the SciPy
  tests (whose gradients differentiate f with JAX or PyTorch), the PyMC tests
  (marked pymc; PyMC runs on every backend) and the unmarked ones (cross-backend
  agreement). The fast JAX- and torch-only tests already ran in their own
  sessions.

PyTorch is installed first as the pinned CPU build so pip never resolves a
multi-GB CUDA wheel.

pytest runs on one worker per core (pytest-xdist), a test file per worker, so
a file's module fixtures and JAX's compiled programs are built once; pass
``-n 0`` after ``--`` to run in one process.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "docs", "tests", "tests_all"]
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = True

TORCH = "torch==2.13.0"  # the CPU build; see README
RUFF = "ruff==0.17.6"
PYRIGHT = "basedpyright==1.40.2"
BACKENDS = ["jax", "torch", "scipy"]
# What each backend's session installs beside the backend: the integrations
# that need only that framework (equinox and NumPyro need JAX) and what the
# examples use, so their tests and examples run there.
WITH = {
    "jax": "jax,equinox,numpyro,examples",
    "torch": "torch,plot",  # not examples: optax would bring JAX along
    "scipy": "scipy",
}
# The integrations whose tests run only in tests_all (PyMC works on every backend;
# Dask runs SciPy ensembles on a cluster).
INTEGRATIONS = ["pymc", "dask"]
# One worker per core; a whole test file goes to one worker (see the docstring).
XDIST = ["-n", "auto", "--dist", "loadfile"]
# Tests marked with no backend.
_UNMARKED = "not (" + " or ".join(BACKENDS + INTEGRATIONS) + ")"


def _install(session: nox.Session, extras: str) -> None:
    if "torch" in extras or "all" in extras:
        session.install(TORCH)
    session.install(f".[{extras}]")


@nox.session
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite with only one backend installed."""
    _install(session, f"{WITH[backend]},test,cli")  # cli: the compare command
    session.run(
        "pytest",
        *XDIST,
        *(session.posargs or ["-m", f"({backend} or {_UNMARKED}) and not slow"]),
        env={"DIFFEQKIT_REQUIRE_BACKENDS": backend},
    )


@nox.session
def tests_all(session: nox.Session) -> None:
    """Run the test suite with every backend installed (cross-backend agreement)."""
    # plot: compare --plot is tested here
    _install(session, "all,equinox,numpyro,pymc,dask,examples,test,plot")
    session.run(
        "pytest",
        *XDIST,
        *(
            session.posargs
            or ["-m", "slow or scipy or pymc or dask or not (jax or torch)"]
        ),
        env={"DIFFEQKIT_REQUIRE_BACKENDS": ",".join(BACKENDS)},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff format --check and ruff check (pass paths to narrow them)."""
    session.install(RUFF)
    paths = session.posargs or ["."]
    session.run("ruff", "format", "--check", *paths)
    session.run("ruff", "check", *paths)


@nox.session
def typecheck(session: nox.Session) -> None:
    """basedpyright (standard mode) on diffeqkit/ with every backend and
    integration installed."""
    _install(session, "all,equinox,numpyro,pymc,dask")
    session.install(PYRIGHT)
    session.run("basedpyright", *(session.posargs or ["diffeqkit"]))


@nox.session
def docs(session: nox.Session) -> None:
    """Build the mkdocs site strictly (broken links or references fail)."""
    session.install(".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Run the benchmarks (overhead, sensealg, stiff) into benchmarks/results/.

    Positional arguments go to every script (all take ``--repeat N``)."""
    _install(session, "all")
    session.run("python", "benchmarks/overhead.py", *session.posargs)
    session.run("python", "benchmarks/sensealg.py", *session.posargs)
    session.run("python", "benchmarks/stiff.py", *session.posargs)
