"""One suite, every backend.

`backend` is parametrised over the registry's names (ids ``jax``, ``torch``,
``scipy``; marks of the same names). A backend that is not installed skips with
its pip line, unless ``DIFFEQKIT_REQUIRE_BACKENDS`` (comma-separated) names it:
then the skip becomes a failure, so a CI job cannot go green by losing its backend.
Correctness tests run in float64: JAX's x64 flag is turned on here, in the test
setup, never by the library. The torch engine is "eager" unless the environment
says otherwise (``DIFFEQKIT_TORCH_ENGINE``).
"""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

from diffeqkit import backends
from diffeqkit._sensealg import SENSEALGS as CLASSES

# The torch engine's default, "auto", compiles a problem once its eager solves
# have taken as long as a compile (seconds to minutes here): in a suite that
# would land compiles in the middle of unrelated tests. The suite runs eagerly;
# tests of the engine choose their engine themselves. Set the variable to run
# the suite on another engine.
os.environ.setdefault("DIFFEQKIT_TORCH_ENGINE", "eager")

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)

REQUIRED = {
    name.strip()
    for name in os.environ.get("DIFFEQKIT_REQUIRE_BACKENDS", "").split(",")
    if name.strip()
}
unknown = REQUIRED - set(backends.SPECS)
if unknown:
    raise RuntimeError(f"DIFFEQKIT_REQUIRE_BACKENDS names unknown backends {unknown}")


# Every gradient method by short name (the first word of its class name:
# "forward", "reverse", "continuous", "interpolating", "checkpointed"), with its
# default options, for parametrised tests.
SENSEALGS = {
    re.sub(r"(?<=[a-z])[A-Z].*", "", cls.__name__).lower(): cls() for cls in CLASSES
}
# The methods that differentiate the computed solution with the steps held fixed.
DISCRETE = ["forward", "reverse", "checkpointed"]


def need(name: str) -> str:
    """Skip (or fail, when required) unless backend `name` is installed."""
    if not backends.installed(name):
        spec = backends.SPECS[name]
        reason = (
            f'backend {name} is not installed: pip install "diffeqkit[{spec.extra}]"'
        )
        if name in REQUIRED:
            pytest.fail(f"{reason} (DIFFEQKIT_REQUIRE_BACKENDS={name})")
        pytest.skip(reason)
    return name


# What SciPy's gradients differentiate f with: JAX or PyTorch (the tests(scipy)
# session has neither; there the "no engine" error is what gets tested).
SCIPY_AUTODIFF = any(importlib.util.find_spec(m) for m in ("jax", "torch"))


def need_gradients(backend: str) -> str:
    """`need(backend)`, and on SciPy a framework to differentiate f with."""
    need(backend)
    if backend == "scipy" and not SCIPY_AUTODIFF:
        pytest.skip("SciPy gradients need jax or torch installed to differentiate f")
    return backend


# The same by class name ("ForwardMode", ...).
BY_NAME = {cls.name: cls() for cls in CLASSES}


def sensealg_params() -> list:
    """(backend, sensealg class name) for every sensealg each backend declares."""
    return [
        pytest.param(b, name, id=f"{b}-{name}", marks=getattr(pytest.mark, b))
        for b, spec in backends.SPECS.items()
        for name in spec.capabilities.sensealgs
    ]


def as_backend(backend: str, x):
    """`x` as the backend's array (float64) so that backend=None would pick it."""
    import numpy as np

    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x, dtype=jnp.float64)
    if backend == "torch":
        import torch

        return torch.as_tensor(np.asarray(x), dtype=torch.float64)
    return np.asarray(x, dtype=np.float64)


def runs(backend: str, sensealg: str, alg: str) -> bool:
    """Whether the registry declares that `backend` runs the sensealg (by short
    name) with `alg`."""
    from diffeqkit._algs import ALGS

    support = backends.SPECS[backend].capabilities.sensealgs.get(
        SENSEALGS[sensealg].name
    )
    return support is not None and ALGS[alg].kind in support.kinds


def backend_params() -> list:
    return [
        pytest.param(name, id=name, marks=getattr(pytest.mark, name))
        for name in backends.SPECS
    ]


# Low-order implicit methods cannot reach the tight tolerances the closed-form
# tests use for the others (implicit Euler at rtol=1e-10 would take ~1e8 steps):
# their solve options and the error allowed against a closed form, on the
# linear problem over [0, 2] (measured: implicit Euler 7.9e-4, and 1.5e-2 over
# [2, -1] backward where the allowance is 5 times this; rosenbrock23 1.6e-6).
LOW_ORDER = {
    "implicit_euler": ({"rtol": 1e-6, "atol": 1e-8}, 5e-3),
    "rosenbrock23": ({"rtol": 1e-8, "atol": 1e-10}, 1e-5),
}


def secondary_implicit(backend: str, alg: str) -> bool:
    """Whether `alg` is one of `backend`'s implicit algs other than its first (the
    one the "looks stiff" hint names first). Tests of those are marked slow: the
    per-backend nox sessions skip them and tests_all runs them (on JAX each is a
    compilation of several seconds)."""
    implicit = backends.implicit_algs(backend)
    return alg in implicit[1:]


def alg_params(*kinds: str) -> list:
    """(backend, alg) pairs for every alg each backend declares, of the given kinds."""
    from diffeqkit._algs import ALGS

    return [
        pytest.param(
            name,
            alg,
            id=f"{name}-{alg}",
            marks=[getattr(pytest.mark, name)]
            + ([pytest.mark.slow] if secondary_implicit(name, alg) else []),
        )
        for name, spec in backends.SPECS.items()
        for alg in spec.capabilities.algs
        if not kinds or ALGS[alg].kind in kinds
    ]


@pytest.fixture(params=backend_params())
def backend(request: pytest.FixtureRequest) -> str:
    return need(request.param)
