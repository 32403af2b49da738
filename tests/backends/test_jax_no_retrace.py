"""JAX: new values of u0 and p never retrace f, for every sensealg.

Issue 6's requirement "no retracing when only p changes between calls", for the
two ways a gradient is taken: `dk.vjp` and its pullback (eager, one cached
compiled program per problem structure), and ``jax.jit(jax.grad(loss))`` of a
loss through `dk.solve` (traced once per structure, like any jitted function).
f counts its Python calls, which happen only while JAX traces it (a compiled
program runs without calling Python). Each test builds its own f, so its first
call compiles (a few seconds each: the problem is the smallest there is,
exponential decay ``u' = -p u`` of two states) and the count starts from zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import SENSEALGS

import diffeqkit as dk

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from diffeqkit.backends.jax import _solve  # noqa: E402

pytestmark = pytest.mark.jax

# Every sensealg the JAX backend runs, InterpolatingAdjoint included.
SENSEALGS = {**SENSEALGS, "interpolating": dk.InterpolatingAdjoint()}

U0 = np.array([1.0, 2.0])
T1 = 1.0
SAVES = np.linspace(0.0, T1, 5)
# Tight tolerances, so that gradients can be checked against the closed form.
KW = {"backend": "jax", "saveat": SAVES, "rtol": 1e-10, "atol": 1e-12}
# New values of u0 and p, one call each.
CHANGES = [
    (np.array([0.5, -1.0]), 0.7),
    (np.array([3.0, 0.25]), 1.9),
    (np.array([-2.0, 1.5]), 0.2),
]
# Traces of f by the first call of jax.jit(jax.grad(loss)): diffrax traces the
# vector field a few times per solve (shapes, the solver's init and step, the
# step-size controller's first step), the adjoints again for the backward pass
# (ContinuousAdjoint's backward solve, ForwardMode's batched tangents). Measured
# with diffrax 0.7.2: 5 to 17 (ForwardMode 10, ContinuousAdjoint 17); the bound
# allows for other versions while
# still catching a trace per step or per save time.
FIRST_CALL_TRACES = 40


class Counter:
    """``f(u, p, t) = -p u``, counting its Python calls (its traces under JAX)."""

    def __init__(self) -> None:
        self.traces = 0

    def __call__(self, u: Any, p: Any, t: Any) -> Any:
        self.traces += 1
        return -p * u


def loss_grads(u0: np.ndarray, p: float) -> tuple[np.ndarray, float]:
    """Closed form of the gradient of ``L = sum(u(t_i)^2)`` over the save times,
    ``u(t) = u0 exp(-p t)``: ``dL/du0 = 2 u0 sum(exp(-2 p t_i))`` and ``dL/dp =
    -2 sum(t_i exp(-2 p t_i)) |u0|^2``."""
    decay = np.exp(-2 * p * SAVES)
    return 2 * u0 * decay.sum(), float(-2 * (SAVES * decay).sum() * (u0 @ u0))


def check_grads(du0: Any, dp: Any, u0: np.ndarray, p: float) -> None:
    want_u0, want_p = loss_grads(u0, p)
    # rtol 1e-10 per solve; 1e-7 leaves room for the continuous adjoint's
    # backward solve, whose error is of the same order but not the same sign.
    np.testing.assert_allclose(np.asarray(du0), want_u0, rtol=1e-7)
    np.testing.assert_allclose(float(dp), want_p, rtol=1e-7)


@pytest.mark.parametrize("sensealg", list(SENSEALGS.values()), ids=list(SENSEALGS))
def test_vjp_with_new_u0_and_p_reuses_the_compiled_program(sensealg):
    f = Counter()
    prob = dk.ODEProblem(f, U0, (0.0, T1), 1.3)
    sol, pullback = dk.vjp(prob, sensealg=sensealg, **KW)
    pullback(2 * np.asarray(sol.u))
    traces, programs = f.traces, set(_solve.PROGRAMS.keys())
    assert traces > 0  # a fresh f: the first call traced it
    for u0, p in CHANGES:
        sol, pullback = dk.vjp(prob.remake(u0=u0, p=p), sensealg=sensealg, **KW)
        grads = pullback(2 * np.asarray(sol.u))  # L = sum(u**2)
        check_grads(grads.u0, grads.p, u0, p)
    assert f.traces == traces
    assert set(_solve.PROGRAMS.keys()) == programs


def jitted_grad(prob: dk.ODEProblem, sensealg: Any) -> Callable[..., Any]:
    def loss(u0: Any, p: Any) -> Any:
        sol = dk.solve(prob.remake(u0=u0, p=p), sensealg=sensealg, **KW)
        return jnp.sum(sol.u**2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("sensealg", list(SENSEALGS.values()), ids=list(SENSEALGS))
def test_jitted_grad_traces_f_on_its_first_call_only(sensealg):
    f = Counter()
    prob = dk.ODEProblem(f, U0, (0.0, T1), 1.3)
    grad = jitted_grad(prob, sensealg)
    grad(jnp.asarray(U0), jnp.asarray(1.3))
    first = f.traces
    assert 0 < first <= FIRST_CALL_TRACES
    for u0, p in CHANGES:
        du0, dp = grad(jnp.asarray(u0), jnp.asarray(p))
        check_grads(du0, dp, u0, p)
    assert f.traces == first
