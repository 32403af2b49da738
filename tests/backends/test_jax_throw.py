"""JAX: ``throw=False`` under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

The status is then a traced int32 code (`dk.Solution.STATUS_CODES`), rows not
reached are NaN, and the gradient through a failed solve is NaN (never an
exception), for every sensealg, without retracing f for new parameter values.
The problem is the blow-up ``u' = p u^2``, ``u(0) = 1``: ``u = 1 / (1 - p t)``
is finite on [0, 2] for p < 1/2 and blows up at ``t = 1/p`` otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SENSEALGS

import diffeqkit as dk

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

pytestmark = pytest.mark.jax

SENSEALGS = {**SENSEALGS, "interpolating": dk.InterpolatingAdjoint()}
SAVES = np.linspace(0.0, 2.0, 5)
KW = {"backend": "jax", "saveat": SAVES, "rtol": 1e-10, "atol": 1e-12}
CODES = dk.Solution.STATUS_CODES


class BlowUp:
    """``f(u, p, t) = p u^2``, counting its Python calls (its traces)."""

    def __init__(self) -> None:
        self.traces = 0

    def __call__(self, u, p, t):
        self.traces += 1
        return p * u**2


def problem(f=None, p=0.1):
    return dk.ODEProblem(f or BlowUp(), jnp.array([1.0]), (0.0, 2.0), p)


def test_status_codes_are_the_status_names_in_order():
    assert CODES[0] == "success"
    assert set(CODES) == {
        "success",
        "max_steps_reached",
        "step_size_too_small",
        "nonfinite",
        "solver_failed",
        "terminated",
        "too_many_events",
    }


@pytest.mark.parametrize(
    ("p", "kw"),
    [
        pytest.param(1.0, {}, id="blow-up"),
        pytest.param(0.1, {"max_steps": 3}, id="max_steps"),
        pytest.param(0.1, {}, id="success"),
    ],
)
def test_jit_returns_the_eager_partial_solution_with_a_traced_status(p, kw):
    prob = problem(p=p)
    eager = dk.solve(prob, throw=False, **KW, **kw)

    @jax.jit
    def run(p):
        sol = dk.solve(prob.remake(p=p), throw=False, **KW, **kw)
        return sol.u, sol.status, sol.success

    u, status, success = run(jnp.asarray(p))
    assert status.dtype == jnp.int32
    assert CODES[int(status)] == eager.status
    assert bool(success) == eager.success
    # Rows not reached are NaN in both; the reached ones agree.
    np.testing.assert_array_equal(np.isnan(u), np.isnan(np.asarray(eager.u)))
    np.testing.assert_allclose(u, eager.u, rtol=1e-12)
    if not eager.success:
        assert np.isnan(u[-1]).all()


def test_vmap_gives_each_member_its_own_status():
    prob = problem()

    def run(p):
        sol = dk.solve(prob.remake(p=p), throw=False, **KW)
        return sol.u, sol.status

    u, status = jax.jit(jax.vmap(run))(jnp.array([0.1, 1.0, 0.25]))
    assert [CODES[int(c)] for c in status] == [
        "success",
        "step_size_too_small",
        "success",
    ]
    for i, p in [(0, 0.1), (2, 0.25)]:
        np.testing.assert_allclose(u[i, :, 0], 1 / (1 - p * SAVES), rtol=1e-8)
    assert np.isnan(u[1, -1]).all()
    assert np.isfinite(u[1, 0]).all()


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_grad_through_a_failed_solve_is_nan_and_nothing_retraces(sensealg):
    f = BlowUp()
    prob = problem(f)

    @jax.jit
    @jax.value_and_grad
    def loss(p):
        sol = dk.solve(
            prob.remake(p=p), sensealg=SENSEALGS[sensealg], throw=False, **KW
        )
        # The idiomatic mask: a failed solve is an infinitely bad fit.
        return jnp.where(sol.success, jnp.sum(sol.u), jnp.inf)

    value, grad = loss(jnp.asarray(0.1))
    first = f.traces
    # d/dp sum_k 1/(1 - p t_k) = sum_k t_k / (1 - p t_k)^2.
    np.testing.assert_allclose(value, np.sum(1 / (1 - 0.1 * SAVES)), rtol=1e-9)
    np.testing.assert_allclose(grad, np.sum(SAVES / (1 - 0.1 * SAVES) ** 2), rtol=1e-6)
    value, grad = loss(jnp.asarray(1.0))  # blows up at t = 1
    assert value == np.inf
    assert np.isnan(grad)
    value, grad = loss(jnp.asarray(0.2))  # succeeds again after a failure
    np.testing.assert_allclose(grad, np.sum(SAVES / (1 - 0.2 * SAVES) ** 2), rtol=1e-6)
    assert f.traces == first


def test_throw_true_under_jit_still_raises():
    prob = problem(p=1.0)
    run = jax.jit(lambda p: dk.solve(prob.remake(p=p), **KW).u)
    with pytest.raises(jax.errors.JaxRuntimeError):
        run(jnp.asarray(1.0))
