"""The PyTorch backend's implicit (Rosenbrock) method on stiff problems, and its
gradients by every sensealg.

Tolerances: rosenbrock23 is of order 2 and propagates that solution, so its global
error is a multiple of rtol that grows with the number of steps (measured 30-700 x
rtol on the linear problem, 60 x on ROBER); each test says what it allows and why.
The three methods that differentiate the discrete solution with the steps held
fixed (ForwardMode, ReverseThroughSolver, CheckpointedAdjoint) agree to rounding
(measured < 1e-13 relative); we allow 1e-11.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from conftest import SENSEALGS as ALL_SENSEALGS
from problems import LINEAR_A, LINEAR_U0, linear, linear_grads, to_numpy

import diffeqkit as dk
from diffeqkit import problems
from diffeqkit._solve import build_request

torch = pytest.importorskip("torch")
pytest.importorskip("torchdiffeq")
from diffeqkit.backends.torch import _implicit, _interpolating, _replay  # noqa: E402
from diffeqkit.backends.torch._rk import no_lift  # noqa: E402

# With an implicit alg the continuous adjoint is the interpolating one: the core
# refuses the backsolve (ContinuousAdjoint).
SENSEALGS = {
    **{k: v for k, v in ALL_SENSEALGS.items() if k != "continuous"},
    "interpolating": dk.InterpolatingAdjoint(),
}

# Long stiff solves (order 2 in Python, ~3 ms a step): tests_all runs these,
# the torch session skips them.
pytestmark = [pytest.mark.torch, pytest.mark.slow]

ALG = "rosenbrock23"
ROBER_P = np.array([0.04, 3e7, 1e4])
# ROBER's onset: the fast species approaches its quasi-steady state by t ~ 1e-3.
# It keeps these tests fast (~150 steps at rtol=1e-8); the continuous adjoint
# also gets a test over [0, 1] (test_interpolating_adjoint_over_rober_...).
ONSET = np.array([0.0, 1e-4, 3e-4, 1e-3])
# Weights that make every species count in a loss (u[1] is ~3e-5).
WEIGHTS = np.array([1.0, 1e4, 1.0])


def rober_problem(tspan=(0.0, 1e-3), p=ROBER_P) -> dk.ODEProblem:
    return problems.rober(1e11).prob.remake(tspan=tspan, p=p)


def rober_loss(sol):
    return (sol.u[1:] * torch.as_tensor(WEIGHTS, dtype=sol.u.dtype)).sum()


def rober_value(p, **kwargs) -> float:
    sol = dk.solve(rober_problem(p=p), ALG, backend="torch", saveat=ONSET, **kwargs)
    return float((to_numpy(sol.u)[1:] * WEIGHTS).sum())


# ---------------------------------------------------------------------------------
# The method.
# ---------------------------------------------------------------------------------


def _nonautonomous(t, y):
    # u' = lam (u - sin t) + cos t: u = sin t + (u0 - 0) e^(lam t). Its
    # time derivative is what a Rosenbrock method needs T = df/dt for.
    return -5.0 * (y - torch.sin(t)) + torch.cos(t)


def _fixed_step_error(n: int, companion: bool) -> float:
    consts = _implicit._ros23_constants(torch.float64, torch.device("cpu"), no_lift)
    h, y, t = 1.0 / n, torch.tensor([0.3], dtype=torch.float64), None
    t = torch.tensor(0.0, dtype=torch.float64)
    for i in range(n):
        t1 = torch.tensor((i + 1) * h, dtype=torch.float64)
        f0 = _nonautonomous(t, y)
        y1, _, err, _ = _implicit._ros23_step(
            _nonautonomous, y, f0, t, torch.tensor(h, dtype=torch.float64), t1, consts
        )
        assert err is not None
        y, t = (y1 + err if companion else y1), t1
    return abs(float(y[0]) - (math.sin(1.0) + 0.3 * math.exp(-5.0)))


@pytest.mark.parametrize(
    ("companion", "order"), [(False, 2), (True, 3)], ids=["solution", "estimate"]
)
def test_rosenbrock23_converges_at_its_order_on_a_nonautonomous_problem(
    companion, order
):
    # Fixed steps h = 1/20 ... 1/160: the propagated solution is of order 2, and
    # adding the error estimate gives the order-3 companion, which needs the
    # h*d*T terms to be right. Measured log2 ratios: 1.994-1.998 and 2.996-2.999;
    # 0.05 leaves room and still tells 2 from 3.
    errors = [_fixed_step_error(n, companion) for n in (20, 40, 80, 160)]
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    np.testing.assert_allclose(rates, order, atol=0.05)


# The IVP test set's reference values: tests/test_stiff.py, for every backend.


def test_stats_count_jacobians_and_factorisations():
    prob = rober_problem().remake(u0=torch.tensor([1.0, 0.0, 0.0]))
    sol = dk.solve(prob, ALG, rtol=1e-6, atol=1e-10)
    s = sol.stats
    attempts = s["naccept"] + s["nreject"]
    # One Jacobian and one LU per attempt; two f per attempt, plus the check at
    # t0 (reused) and one for the first step size. Jacobians evaluate f by AD and
    # are not counted in nfev.
    assert s["njev"] == s["nlu"] == attempts
    assert s["nfev"] == 2 + 2 * attempts


def test_prob_jac_replaces_automatic_differentiation():
    calls = []

    def jac(u, p, t):
        calls.append(t)
        return problems.rober_jac(u, p, t)

    u0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    with_jac = rober_problem().remake(u0=u0, jac=jac)
    sol = dk.solve(with_jac, ALG, rtol=1e-6, atol=1e-10)
    assert len(calls) == sol.stats["njev"]
    ad = dk.solve(rober_problem().remake(u0=u0), ALG, rtol=1e-6, atol=1e-10)
    # The same Jacobian up to rounding, so the same steps and values to ~1e-15.
    np.testing.assert_allclose(to_numpy(sol.u), to_numpy(ad.u), rtol=1e-12)


def test_jac_of_the_wrong_shape_is_rejected():
    bad = rober_problem().remake(
        u0=torch.tensor([1.0, 0.0, 0.0]), jac=lambda u, p, t: torch.zeros(2, 2)
    )
    with pytest.raises(dk.InvalidProblemError, match=r"jac must return df/du"):
        dk.solve(bad, ALG)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    prob = rober_problem().remake(u0=torch.tensor([1.0, 0.0, 0.0], dtype=dtype))
    sol = dk.solve(prob, ALG, rtol=1e-4, atol=1e-8)
    assert sol.u.dtype == dtype
    assert sol.success


def test_max_steps_returns_a_partial_solution():
    prob = rober_problem((0.0, 1e5)).remake(u0=torch.tensor([1.0, 0.0, 0.0]))
    sol = dk.solve(prob, ALG, max_steps=20, throw=False, saveat=[0.0, 1.0, 1e5])
    assert sol.status == "max_steps_reached"
    assert np.isnan(to_numpy(sol.u)[-1]).all()
    with pytest.raises(dk.SolveError, match=r"max_steps_reached.*\(20 steps\)"):
        dk.solve(prob, ALG, max_steps=20)


def test_nonfinite_f_stops_with_status_nonfinite():
    def f(u, p, t):
        return torch.where(t < 0.5, -u, math.nan)  # NaN from t = 0.5 on

    prob = dk.ODEProblem(f, torch.tensor([1.0], dtype=torch.float64), (0.0, 2.0))
    sol = dk.solve(prob, ALG, throw=False)
    # Trial steps with a stage past t = 0.5 are rejected and retried smaller
    # until the step underflows just short of 0.5 (tests/backends: within 1e-6).
    assert sol.status == "nonfinite"
    assert float(sol.message.split("t=")[1].split()[0]) == 0.5


def test_explicit_solver_stalling_on_rober_suggests_rosenbrock23():
    prob = rober_problem((0.0, 1e5)).remake(u0=torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(
        dk.SolveError, match=r"the problem looks stiff: try alg='rosenbrock23'"
    ):
        dk.solve(prob, "tsit5", max_steps=200)


def test_replay_reproduces_the_forward_states_bit_for_bit():
    prob = rober_problem().remake(u0=torch.tensor([1.0, 0.0, 0.0]))
    req = build_request(prob, ALG, saveat=ONSET, rtol=1e-6, atol=1e-10)
    plan = _replay.make_plan(req)
    run, schedule = _replay.record(plan)
    replayer = _replay.Replayer(plan, schedule)
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        replayer.run(
            plan.setup.rhs(first=False), plan.setup.y0, 0, schedule.needed, out
        )
    replayed = torch.stack([plan.setup.y0, *(out[r] for r in range(1, len(out) + 1))])
    assert torch.equal(replayed, run.u)


# ---------------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------------


@functools.cache
def rober_grads(sensealg: str) -> tuple[np.ndarray, np.ndarray]:
    """(dL/du0, dL/dp) at rtol=1e-8, once per sensealg for the whole module."""
    _, grads = dk.value_and_grad(
        rober_loss,
        rober_problem(),
        ALG,
        backend="torch",
        saveat=ONSET,
        sensealg=SENSEALGS[sensealg],
        rtol=1e-8,
        atol=1e-12,
    )
    return to_numpy(grads.u0), to_numpy(grads.p)


@pytest.fixture(scope="module")
def reverse_rober_grads():
    return rober_grads("reverse")


@pytest.fixture(scope="module")
def finite_differences():
    """Central differences of dk.solve itself (steps chosen afresh each time) at
    rtol=1e-9, relative step 1e-4."""
    kw = {"rtol": 1e-9, "atol": 1e-13}
    fd = []
    for j in range(3):
        h = 1e-4 * ROBER_P[j]
        e = np.eye(3)[j] * h
        fd.append(
            (rober_value(ROBER_P + e, **kw) - rober_value(ROBER_P - e, **kw)) / (2 * h)
        )
    return np.array(fd)


@pytest.mark.parametrize("sensealg", ["forward", "checkpointed"])
def test_discrete_methods_give_the_same_gradient(sensealg, reverse_rober_grads):
    du0, dp = rober_grads(sensealg)
    np.testing.assert_allclose(du0, reverse_rober_grads[0], rtol=1e-11)
    np.testing.assert_allclose(dp, reverse_rober_grads[1], rtol=1e-11)


def test_gradient_is_the_derivative_of_the_discrete_solution(reverse_rober_grads):
    # Central differences of the replayed steps (the recorded schedule held
    # fixed): the derivative the discrete methods compute, Jacobian J(u, p) of
    # every step included. Compared as p_j dL/dp_j (the loss's change per
    # relative change of p_j, ~0.6, 0.4 and 7e-4): relative step 1e-6 gives
    # truncation ~1e-12 and rounding ~1e-15 / 1e-6 = 1e-9; allow 1e-8 + 1e-7
    # relative.
    prob = rober_problem()
    req = build_request(prob, ALG, backend="torch", saveat=ONSET, rtol=1e-8, atol=1e-12)
    plan = _replay.make_plan(req)
    _, schedule = _replay.record(plan)
    replayer = _replay.Replayer(plan, schedule)

    def loss(p: np.ndarray) -> float:
        func = plan.setup.rhs(first=False, p=torch.tensor(p))
        out: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            replayer.run(func, plan.setup.y0, 0, schedule.needed, out)
        return float(sum((to_numpy(out[r]) * WEIGHTS).sum() for r in out))

    fd = []
    for j in range(3):
        h = 1e-6 * ROBER_P[j]
        e = np.eye(3)[j] * h
        fd.append((loss(ROBER_P + e) - loss(ROBER_P - e)) / (2 * h))
    np.testing.assert_allclose(
        reverse_rober_grads[1] * ROBER_P, np.array(fd) * ROBER_P, rtol=1e-7, atol=1e-8
    )


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_rober_rate_constant_gradients_match_finite_differences(
    sensealg, finite_differences
):
    # The FD truncation error is ~1e-8 relative; the solutions at rtol=1e-9 carry
    # errors ~100 x rtol that change smoothly with p (the steps do too), so the
    # FD noise is far below 1e-7 / 1e-4 = 1e-3 of the gradient; the gradients at
    # rtol=1e-8 differ from the exact ones by ~1e-6 relative (order 2). Allow
    # 1e-3 relative: a wrong J, T or adjoint is off by O(1).
    du0, dp = rober_grads(sensealg)
    np.testing.assert_allclose(dp, finite_differences, rtol=1e-3)
    assert np.isfinite(du0).all()


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_linear_gradients_match_closed_form(sensealg):
    ts = np.linspace(0.0, 1.0, 3)
    u0 = torch.tensor(LINEAR_U0, requires_grad=True)
    a = torch.tensor(LINEAR_A, requires_grad=True)
    sol = dk.solve(
        dk.ODEProblem(linear, u0, (0.0, 1.0), a),
        ALG,
        saveat=ts,
        rtol=1e-8,
        atol=1e-10,
        sensealg=SENSEALGS[sensealg],
    )
    ct = np.cos(np.arange(6.0)).reshape(3, 2) + 0.5
    (sol.u * torch.tensor(ct)).sum().backward()
    du0, da = linear_grads(ts, ct)
    # The solution's global error at rtol=1e-8 is ~1.5e-6 (measured); its
    # derivative's is of the same order. Allow 1e-5.
    assert u0.grad is not None
    assert a.grad is not None
    np.testing.assert_allclose(to_numpy(u0.grad), du0, atol=1e-5)
    np.testing.assert_allclose(to_numpy(a.grad), da, atol=1e-5)


def _backward_landed_on_forward_steps() -> None:
    """The last backward pass ran the Rosenbrock method (one Jacobian per step
    attempt) and ended a step on every forward step end below t1 (its start)."""
    record = _interpolating.LAST_BACKWARD
    assert record["njev"] == record["naccept"] + record["nreject"] > 0
    forward = set(record["forward_ends"][:-1])
    assert forward <= set(record["backward_ends"])
    assert record["naccept"] >= len(forward)


def test_backsolve_with_an_implicit_alg_is_refused():
    with pytest.raises(dk.UnsupportedError, match=r"dk\.InterpolatingAdjoint\(\)"):
        dk.value_and_grad(
            rober_loss,
            rober_problem(),
            ALG,
            backend="torch",
            saveat=ONSET,
            sensealg=dk.ContinuousAdjoint(),
        )


def test_interpolating_adjoint_integrates_the_adjoint_implicitly(reverse_rober_grads):
    _interpolating.LAST_BACKWARD.clear()
    du0, dp = rober_grads.__wrapped__("interpolating")
    _backward_landed_on_forward_steps()
    # The continuous adjoint at rtol=1e-8 against the discrete derivative: both
    # are within ~1e-6 relative of the exact gradient (order 2 at these
    # tolerances).
    np.testing.assert_allclose(dp, reverse_rober_grads[1], rtol=1e-4)
    np.testing.assert_allclose(du0, reverse_rober_grads[0], rtol=1e-4, atol=1e-8)


def test_interpolating_adjoint_over_rober_onset_and_decay_matches_discrete():
    # Over [0, 1] a backsolve fails (the re-integrated state's fast modes grow
    # backward like exp(1e4 t)); the interpolating adjoint reads the state off
    # the forward dense output and integrates only the adjoint, which is stable.
    kwargs = {"backend": "torch", "saveat": [0.0, 1.0], "rtol": 1e-6, "atol": 1e-10}
    prob = rober_problem((0.0, 1.0))
    _, reverse = dk.value_and_grad(
        rober_loss, prob, ALG, sensealg=dk.ReverseThroughSolver(), **kwargs
    )
    _interpolating.LAST_BACKWARD.clear()
    _, continuous = dk.value_and_grad(
        rober_loss, prob, ALG, sensealg=dk.InterpolatingAdjoint(), **kwargs
    )
    _backward_landed_on_forward_steps()
    # Each is within its global error (up to ~60 x rtol on ROBER, see the
    # module docstring) of the exact gradient: the p gradients agree to 1e-7
    # relative (measured), allow 1e-5. dL/du0 carries the adjoint's absolute
    # error: its atol is 1e-10 scaled by the cotangent (1e4) to 1e-6, and
    # dL/du0[1:] ~ 3.5e-3 differ by 9e-7 (measured); allow 1e-5 absolute.
    np.testing.assert_allclose(to_numpy(continuous.p), to_numpy(reverse.p), rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(continuous.u0), to_numpy(reverse.u0), rtol=1e-5, atol=1e-5
    )


def test_interpolating_adjoint_backward_failure_raises_solve_error():
    # Over ROBER's onset at rtol=1e-6 the forward solve takes 33 steps and the
    # backward one 64 (measured): max_steps=40 stops only the backward solve.
    with pytest.raises(
        dk.SolveError,
        match=r"backward solve of sensealg=dk\.InterpolatingAdjoint.*"
        r"'max_steps_reached' \(40 steps\)",
    ):
        dk.value_and_grad(
            rober_loss,
            rober_problem(),
            ALG,
            backend="torch",
            saveat=[0.0, 1e-3],
            rtol=1e-6,
            atol=1e-10,
            max_steps=40,
            sensealg=dk.InterpolatingAdjoint(),
        )
