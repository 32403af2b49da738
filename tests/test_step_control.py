"""Step control on every backend: constant steps for adaptive algs
(``adaptive=False``), non-finite trial steps rejected and retried smaller, and
the trivial solve of an empty state."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SENSEALGS, need, need_gradients, runs
from problems import logistic_exact, logistic_grads, logistic_problem, to_numpy

import diffeqkit as dk
from diffeqkit import backends

# (alg, its order, the step pair (dt, dt/2) at which the error is in the
# asymptotic regime and well above rounding on the logistic problem: measured
# on SciPy, errors 7e-4 -> 1e-4 for bosh3, 4e-10 -> 1e-12 for dopri8).
ORDERS = [("bosh3", 3, 0.1), ("dopri5", 5, 0.2), ("tsit5", 5, 0.2), ("dopri8", 8, 0.4)]
SAVES = np.array([0.0, 2.0, 4.0])


def _max_error(backend: str, alg: str, dt: float) -> float:
    sol = dk.solve(
        logistic_problem(), alg, backend=backend, adaptive=False, dt0=dt, saveat=SAVES
    )
    return float(np.max(np.abs(to_numpy(sol.u) - logistic_exact(SAVES))))


@pytest.mark.parametrize(("alg", "order", "dt"), ORDERS)
def test_constant_steps_show_the_methods_order_by_step_halving(backend, alg, order, dt):
    ratio = _max_error(backend, alg, dt) / _max_error(backend, alg, dt / 2)
    # The observed order log2(ratio) approaches `order` as dt -> 0; at these
    # steps it is within 0.2 of it on SciPy (2.88, 5.06, 4.97, 8.00).
    assert np.log2(ratio) == pytest.approx(order, abs=0.25)


def test_constant_steps_take_exactly_the_grid(backend):
    sol = dk.solve(
        logistic_problem(), "tsit5", backend=backend, adaptive=False, dt0=0.25
    )
    assert sol.stats["naccept"] == 16
    assert sol.stats["nreject"] in (0, None)


@pytest.mark.parametrize("name", list(SENSEALGS))
def test_every_sensealg_differentiates_constant_steps(backend, name):
    need_gradients(backend)
    if not runs(backend, name, "tsit5"):
        pytest.skip(f"{backend} does not offer {name} (tests/test_gradients.py)")
    ts = np.linspace(0.0, 4.0, 5)
    cot = np.random.default_rng(4).normal(size=(5, 2))
    _, pull = dk.vjp(
        logistic_problem(),
        "tsit5",
        backend=backend,
        adaptive=False,
        dt0=0.01,
        saveat=ts,
        sensealg=SENSEALGS[name],
    )
    grads = pull(cot)
    du0, dp = logistic_grads(ts, cot)
    # tsit5 with dt 0.01 has a global error ~1e-11 on this problem; the
    # gradients, O(1), are held to 1e-7, well above it and far below a mistake.
    np.testing.assert_allclose(to_numpy(grads.u0), du0, rtol=1e-7, atol=1e-9)
    for k in dp:
        assert float(to_numpy(grads.p[k])) == pytest.approx(dp[k], rel=1e-7, abs=1e-9)


def test_adaptive_false_needs_dt0_and_an_explicit_alg():
    prob = logistic_problem()
    with pytest.raises(dk.InvalidProblemError, match=r"dt0 is required with adaptive"):
        dk.solve(prob, "tsit5", backend="scipy", adaptive=False)
    with pytest.raises(dk.InvalidProblemError, match=r"adaptive=False .*implicit"):
        dk.solve(prob, "bdf", backend="scipy", adaptive=False, dt0=0.1)
    with pytest.raises(dk.InvalidProblemError, match=r"adaptive must be True or False"):
        dk.solve(prob, "tsit5", backend="scipy", adaptive="no", dt0=0.1)


# -- non-finite trial steps ----------------------------------------------------------

T_BAD = 0.5


def finite_until_half(u, p, t):
    """-u, and -inf from t = 0.5 on: every step that reaches past 0.5 is bad.
    (Division by a 0/1 mask, not ``where(t < 0.5, -u, nan)``: reverse-mode AD of
    that gives a NaN Jacobian everywhere, which rosenbrock23's steps need.)"""
    xp = dk.array_namespace(u)
    return -u / xp.asarray(t < T_BAD, dtype=u.dtype)


def _nonfinite_params() -> list:
    # LSODA steps inside Fortran, where a failed step cannot be retried: it stops
    # at its last finite step (docs/stiff.md).
    return [
        pytest.param(name, alg, id=f"{name}-{alg}", marks=getattr(pytest.mark, name))
        for name in backends.SPECS
        for alg in ("tsit5", backends.implicit_algs(name)[0])
    ]


# NumPy warns when f divides by zero and when SciPy's steps then combine the
# infinities, as it should: non-finite values are the point here.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize(("name", "alg"), _nonfinite_params())
def test_nonfinite_trial_steps_are_retried_smaller_until_they_underflow(name, alg):
    need(name)
    prob = dk.ODEProblem(finite_until_half, np.array([1.0]), (0.0, 1.0))
    saves = np.linspace(0.0, 1.0, 11)
    sol = dk.solve(prob, alg, backend=name, saveat=saves, throw=False)
    assert sol.status == "nonfinite"
    assert not sol.success
    u = to_numpy(sol.u)[:, 0]
    # Every save before 0.5 was reached (the solve got as close to 0.5 as steps
    # allow), none after it; 0.5 itself may or may not be.
    before = saves < T_BAD
    assert np.all(np.isfinite(u[before]))
    np.testing.assert_allclose(u[before], np.exp(-saves[before]), rtol=1e-3)
    assert np.all(np.isnan(u[saves > T_BAD]))
    with pytest.raises(dk.SolveError, match=r"stopped at t=0\.5 .*'nonfinite'"):
        dk.solve(prob, alg, backend=name, saveat=saves)


# -- an empty state ------------------------------------------------------------------


def test_empty_state_solves_trivially(backend):
    prob = dk.ODEProblem(lambda u, p, t: -p * u, np.zeros(0), (0.0, 1.0), 2.0)
    sol = dk.solve(prob, "tsit5", backend=backend, saveat=np.linspace(0.0, 1.0, 3))
    assert sol.success
    assert tuple(sol.u.shape) == (3, 0)
    np.testing.assert_allclose(to_numpy(sol.t), [0.0, 0.5, 1.0])


@pytest.mark.parametrize("name", list(SENSEALGS))
def test_empty_state_has_empty_and_zero_gradients(backend, name):
    need_gradients(backend)
    if not runs(backend, name, "tsit5"):
        pytest.skip(f"{backend} does not offer {name} (tests/test_gradients.py)")
    prob = dk.ODEProblem(lambda u, p, t: -p * u, np.zeros(0), (0.0, 1.0), 2.0)
    _, pull = dk.vjp(prob, "tsit5", backend=backend, sensealg=SENSEALGS[name])
    grads = pull(np.zeros((2, 0)))
    assert tuple(grads.u0.shape) == (0,)
    assert float(to_numpy(grads.p)) == 0.0
