"""The SciPy backend: shared tableaux on SciPy's Runge-Kutta machinery, SciPy's
implicit solvers, our own step loop (statuses, stats, save times).

Tolerances: adaptive solves run at rtol=1e-10, atol=1e-12 unless said otherwise;
on these short, well-conditioned problems (|u| ~ 1) the global error is a small
multiple of the tolerance, so 1e-8 leaves room for error growth and bosh3's low
order; SciPy's implicit methods control their error more loosely (1e-7).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import diffeqkit as dk
from diffeqkit import backends
from diffeqkit._algs import ALGS
from diffeqkit._saveat import step_grid
from diffeqkit._tableaux import get_tableau

scipy = pytest.importorskip("scipy")
solve_ivp = pytest.importorskip("scipy.integrate").solve_ivp
expm = pytest.importorskip("scipy.linalg").expm
scipy_backend = pytest.importorskip("diffeqkit.backends.scipy")
finite_difference_jacobians = scipy_backend.finite_difference_jacobians

pytestmark = pytest.mark.scipy

ALL_ALGS = list(backends.SPECS["scipy"].capabilities.algs)
FIXED = [a for a in ALL_ALGS if ALGS[a].fixed_step]
ADAPTIVE = [a for a in ALL_ALGS if ALGS[a].kind == "adaptive"]
IMPLICIT = [a for a in ALL_ALGS if ALGS[a].implicit]
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
# dt0 per fixed-step method, small enough that C * dt0**order stays ~1e-6 or below
FIXED_DT0 = {"euler": 1e-4, "midpoint": 1e-3, "heun": 1e-3, "rk4": 1e-2}

# A 3x3 system whose matrix exponential SciPy gives to rounding: a damped rotation
# coupled to a decaying mode.
A3 = np.array([[-0.5, 2.0, 0.0], [-2.0, -0.5, 0.3], [0.1, 0.0, -0.2]])
U3 = np.array([1.0, 0.5, -0.25])


def linear(u, p, t):
    return p @ u


def linear_exact(ts, t0=0.0):
    return np.stack([expm(A3 * (t - t0)) @ U3 for t in ts])


def solve_kwargs(alg):
    return {"dt0": FIXED_DT0[alg]} if ALGS[alg].fixed_step else dict(TIGHT)


def allowed_error(alg):
    info = ALGS[alg]
    if info.fixed_step:
        # global error C * dt0**order with C <= ~2 on this problem
        return 10 * FIXED_DT0[alg] ** info.order
    return 1e-7 if info.implicit else 1e-8


def nan_after_one(u, p, t):
    # f turns NaN at t > 1 without a floating-point warning (nan * x is quiet)
    return -u if t <= 1.0 else u * np.nan


# -- the backend object -----------------------------------------------------------


def test_describe_lists_cpu_only():
    info = scipy_backend.BACKEND.describe()
    assert info["devices"] == ["cpu"]
    assert info["versions"]["scipy"] == scipy.__version__


@pytest.mark.parametrize("alg", ADAPTIVE + FIXED)
def test_explicit_solvers_run_the_shared_tableau(alg):
    tab = get_tableau(alg)
    cls = scipy_backend.ALGS[alg].solver
    np.testing.assert_array_equal(cls.A, tab.a)
    np.testing.assert_array_equal(cls.B, tab.b)
    np.testing.assert_array_equal(cls.P, tab.p)
    assert cls.n_stages == tab.n_stages


# -- accuracy against closed forms ------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "dt0"), [("euler", 0.02), ("midpoint", 0.02), ("heun", 0.02), ("rk4", 0.1)]
)
def test_fixed_step_error_shrinks_at_the_method_order(alg, dt0):
    prob = dk.ODEProblem(linear, U3, (0.0, 2.0), A3)
    errors = [
        abs(dk.solve(prob, alg, dt0=h).u[-1] - linear_exact([2.0])[0]).max()
        for h in (dt0, dt0 / 2)
    ]
    # halving dt0 divides the global error by 2**order, up to O(dt0) corrections
    observed = math.log2(errors[0] / errors[1])
    assert abs(observed - ALGS[alg].order) < 0.15


@pytest.mark.parametrize("alg", ADAPTIVE)
def test_save_times_between_steps_are_as_accurate_as_step_ends(alg):
    prob = dk.ODEProblem(linear, U3, (0.0, 2.0), A3)
    ts = np.linspace(0.0, 2.0, 401)  # many save times inside every step
    sol = dk.solve(prob, alg, saveat=ts, **TIGHT)
    err = np.abs(sol.u - linear_exact(ts)).max(axis=1)
    # t1 is a step end; an interpolant of the method's own order keeps the error
    # between steps at the level of the error at step ends and of the tolerance.
    # dopri8's dense output is only 5th order: its steps end on every save time
    # instead (SolveRequest.land_on_saves), which this checks too.
    assert err.max() <= 10 * max(err[-1], TIGHT["rtol"])


# -- the same methods as SciPy's ----------------------------------------------------


def lotka_volterra(u, p, t):
    xp = dk.array_namespace(u)
    a, b, c, d = p[0], p[1], p[2], p[3]
    return xp.stack([a * u[0] - b * u[0] * u[1], -c * u[1] + d * u[0] * u[1]])


LV_P = np.array([1.5, 1.0, 3.0, 1.0])
LV_PROB = dk.ODEProblem(lotka_volterra, np.array([1.0, 1.0]), (0.0, 10.0), LV_P)


@pytest.mark.parametrize(("alg", "method"), [("bosh3", "RK23"), ("dopri5", "RK45")])
def test_bosh3_and_dopri5_take_scipys_rk23_and_rk45_steps(alg, method):
    ts = np.linspace(0.0, 10.0, 101)
    kw = {"rtol": 1e-6, "atol": 1e-8}
    sol = dk.solve(LV_PROB, alg, backend="scipy", saveat=ts, **kw)

    def fun(t, y):
        return lotka_volterra(y, LV_P, t)

    steps = solve_ivp(fun, (0.0, 10.0), [1.0, 1.0], method=method, **kw)
    dense = solve_ivp(fun, (0.0, 10.0), [1.0, 1.0], method=method, t_eval=ts, **kw)
    assert sol.stats["naccept"] == steps.t.size - 1
    assert sol.stats["nfev"] == steps.nfev
    # the step ends are bit for bit SciPy's
    np.testing.assert_array_equal(sol.u[-1], steps.y[:, -1])
    # between steps both evaluate the same interpolant (solve_ivp also at t1, where
    # we take the step's state): equal to rounding
    np.testing.assert_allclose(sol.u, dense.y.T, rtol=1e-13, atol=0)


# -- fixed steps ------------------------------------------------------------------


@pytest.mark.parametrize("alg", FIXED)
def test_fixed_steps_land_exactly_on_the_grid(alg):
    times = []

    def f(u, p, t):
        times.append(t)
        return -u

    ts = np.array([0.0, 0.0137, 0.5, 1.0])
    sol = dk.solve(
        dk.ODEProblem(f, np.array([1.0]), (0.0, 1.0)), alg, saveat=ts, dt0=0.1
    )
    grid = step_grid(0.0, 1.0, 0.1, ts)
    s = get_tableau(alg).n_stages
    assert sol.stats == {
        "nfev": 1 + s * (grid.size - 1),
        "naccept": grid.size - 1,
        "nreject": 0,
    }
    assert all(isinstance(t, float) for t in times)
    # every step's last evaluation is f(t_{n+1}, u_{n+1}) at a grid point exactly
    assert set(grid.tolist()) <= set(times)


def test_euler_is_the_euler_recurrence_bit_for_bit():
    grid = step_grid(0.0, 1.0, 0.1, np.array([0.0, 1.0]))
    u = np.array([1.0, -2.0])
    for t, t_next in itertools.pairwise(grid):
        u = u + (t_next - t) * (-0.7 * u)
    prob = dk.ODEProblem(lambda u, p, t: -p * u, np.array([1.0, -2.0]), (0.0, 1.0), 0.7)
    sol = dk.solve(prob, "euler", dt0=0.1)
    np.testing.assert_array_equal(sol.u[-1], u)


# -- stats ------------------------------------------------------------------------


def counted(f):
    calls = []

    def g(u, p, t):
        calls.append(t)
        return f(u, p, t)

    return g, calls


@pytest.mark.parametrize("alg", ADAPTIVE)
@pytest.mark.parametrize("dt0", [None, 0.01])
def test_adaptive_stats_count_every_evaluation_and_attempt(alg, dt0):
    f, calls = counted(lotka_volterra)
    prob = dk.ODEProblem(f, np.array([1.0, 1.0]), (0.0, 10.0), LV_P)
    sol = dk.solve(prob, alg, rtol=1e-6, atol=1e-8, dt0=dt0)
    stats = sol.stats
    assert len(calls) == stats["nfev"] + 1  # the t0 validation call is not counted
    assert stats["naccept"] > 10
    assert stats["nreject"] > 0  # Lotka-Volterra at these tolerances rejects some
    # f(t0) at construction, one call to choose the first step unless dt0 is given,
    # then n_stages calls per attempted step (the last stage is the next step's
    # first)
    start = 1 if dt0 is not None else 2
    attempts = stats["naccept"] + stats["nreject"]
    assert stats["nfev"] == start + get_tableau(alg).n_stages * attempts


@pytest.mark.parametrize("alg", IMPLICIT)
def test_implicit_stats_are_honest(alg):
    f, calls = counted(lotka_volterra)
    prob = dk.ODEProblem(f, np.array([1.0, 1.0]), (0.0, 10.0), LV_P)
    # SciPy's differences: an autodiff Jacobian would trace f outside the count
    with finite_difference_jacobians():
        stats = dk.solve(prob, alg, rtol=1e-6, atol=1e-8).stats
    # every real call of f counts, finite-difference Jacobian columns included
    assert len(calls) == stats["nfev"] + 1
    assert stats["naccept"] > 10
    assert stats["nreject"] is None  # SciPy's implicit solvers do not report it
    assert isinstance(stats["njev"], int)
    assert isinstance(stats["nlu"], int)


# -- Jacobians and stiff problems -------------------------------------------------


def robertson(u, p, t):
    xp = dk.array_namespace(u)
    k1, k2, k3 = p
    return xp.stack(
        [
            -k1 * u[0] + k3 * u[1] * u[2],
            k1 * u[0] - k2 * u[1] ** 2 - k3 * u[1] * u[2],
            k2 * u[1] ** 2,
        ]
    )


def robertson_jac(u, p, t):
    k1, k2, k3 = p
    return np.array(
        [
            [-k1, k3 * u[2], k3 * u[1]],
            [k1, -2 * k2 * u[1] - k3 * u[2], -k3 * u[1]],
            [0.0, 2 * k2 * u[1], 0.0],
        ]
    )


ROBER = dk.ODEProblem(
    robertson, np.array([1.0, 0.0, 0.0]), (0.0, 1e5), (0.04, 3e7, 1e4)
)
# ROBER at t = 1e5, computed with Radau and the analytic Jacobian at rtol=1e-13,
# atol=1e-20; BDF and LSODA at rtol=1e-12 agree to 1e-10 relative.
ROBER_1E5 = np.array([1.7865921142e-2, 7.2747514688e-8, 9.8213400611e-1])


@pytest.mark.parametrize("alg", IMPLICIT)
def test_stiff_robertson_to_1e5_matches_reference(alg):
    sol = dk.solve(ROBER, alg, rtol=1e-8, atol=1e-14)
    assert sol.success
    # at rtol=1e-8 the three solvers land within ~2e-7 relative of the reference
    np.testing.assert_allclose(sol.u[-1], ROBER_1E5, rtol=2e-6)
    np.testing.assert_allclose(sol.u[-1].sum(), 1.0, rtol=1e-10)  # mass conserved


@pytest.mark.parametrize("alg", IMPLICIT)
def test_user_jacobian_is_used_when_given(alg):
    calls = []

    def jac(u, p, t):
        assert isinstance(u, np.ndarray)
        assert u.shape == (3,)
        assert isinstance(t, float)
        calls.append(t)
        return robertson_jac(u, p, t)

    prob = ROBER.remake(tspan=(0.0, 100.0), jac=jac)
    sol = dk.solve(prob, alg, rtol=1e-8, atol=1e-14)
    assert calls
    with finite_difference_jacobians():  # (without jac, f is differentiated by AD)
        without = dk.solve(ROBER.remake(tspan=(0.0, 100.0)), alg, rtol=1e-8, atol=1e-14)
    # the same answer to the tolerance, and no finite-difference columns in nfev
    np.testing.assert_allclose(sol.u, without.u, rtol=1e-6, atol=1e-13)
    assert sol.stats["nfev"] < without.stats["nfev"]


def test_jacobian_of_a_matrix_state_has_shape_u_shape_plus_u_shape():
    a = np.array([[-1.0, 0.5], [0.0, -2.0]])  # u' = a u for u of shape (2, 2)

    def jac(u, p, t):
        return np.einsum("ik,jl->ijkl", p, np.eye(2))  # d(a u)_ij / du_kl

    prob = dk.ODEProblem(linear, np.eye(2), (0.0, 1.0), a, jac=jac)
    sol = dk.solve(prob, "radau", **TIGHT)
    assert sol.u.shape == (2, 2, 2)
    np.testing.assert_allclose(sol.u[-1], expm(a), rtol=0, atol=1e-8)


def test_jacobian_of_wrong_shape_raises():
    prob = ROBER.remake(jac=lambda u, p, t: np.zeros(3))
    with pytest.raises(
        dk.InvalidProblemError, match=r"jac\(u, p, t\) returned shape \(3,\).*\(3, 3\)"
    ):
        dk.solve(prob, "bdf")


# -- dtypes, inputs and what f receives -------------------------------------------


@pytest.mark.parametrize(
    ("u0", "dtype", "source"),
    [
        pytest.param(np.ones(2, dtype=np.float32), None, "u0", id="float32-u0"),
        pytest.param(np.ones(2), "float32", "dtype='float32'", id="dtype-float32"),
    ],
)
def test_float32_is_unsupported(u0, dtype, source):
    prob = dk.ODEProblem(lambda u, p, t: -u, u0, (0.0, 1.0))
    with pytest.raises(
        dk.UnsupportedError,
        match=rf"backend='scipy' integrates in float64 only, but {source} asks for "
        r"float32\. Pass dtype='float64', or use backend='torch' or backend='jax'",
    ):
        dk.solve(prob, backend="scipy", dtype=dtype)


def test_float32_u0_with_dtype_float64_is_integrated_in_float64():
    prob = dk.ODEProblem(lambda u, p, t: -u, np.ones(2, dtype=np.float32), (0.0, 1.0))
    sol = dk.solve(prob, backend="scipy", dtype="float64")
    assert sol.u.dtype == np.float64


def test_f_gets_numpy_float64_state_p_leaves_and_float_t():
    seen = []

    def f(u, p, t):
        seen.append((u, p, t))
        return -p["rate"] * u * p["scale"][0]

    p = {"rate": 0.5, "scale": (np.array([2.0], dtype=np.float32),), "n": np.arange(3)}
    prob = dk.ODEProblem(f, [[1.0, 2.0]], (0.0, 1.0), p)
    sol = dk.solve(prob, backend=None, **TIGHT)
    assert sol.backend == "scipy"
    u, q, t = seen[-1]
    assert isinstance(u, np.ndarray)
    assert (u.shape, u.dtype) == ((1, 2), np.float64)
    assert isinstance(t, float)
    assert set(q) == {"rate", "scale", "n"}
    assert isinstance(q["scale"], tuple)
    assert q["rate"].dtype == np.float64
    assert q["scale"][0].dtype == np.float64  # floats take the state dtype
    assert q["n"].dtype.kind == "i"  # integer arrays stay integers
    assert sol.u.shape == (2, 1, 2)
    np.testing.assert_allclose(sol.u[-1], np.exp(-1.0) * np.array([[1.0, 2.0]]))


def test_scalar_state():
    prob = dk.ODEProblem(lambda u, p, t: -u, np.array(1.0), (0.0, 1.0))
    sol = dk.solve(prob, "tsit5", saveat=[0.5, 1.0], **TIGHT)
    assert sol.u.shape == (2,)
    np.testing.assert_allclose(sol.u, np.exp([-0.5, -1.0]), rtol=1e-9)


# -- failures ---------------------------------------------------------------------


def test_max_steps_reached_raises_with_time_and_status():
    with pytest.raises(
        dk.SolveError,
        match=r"integration stopped at t=\S+ of tspan=\(0\.0, 10\.0\) with status "
        r"'max_steps_reached'",
    ) as info:
        dk.solve(LV_PROB, "dopri5", max_steps=5)
    assert info.value.solution.stats["naccept"] == 5


@pytest.mark.parametrize("alg", ADAPTIVE + IMPLICIT)
def test_max_steps_partial_solution_has_nan_rows(alg):
    ts = np.linspace(0.0, 10.0, 11)
    sol = dk.solve(LV_PROB, alg, saveat=ts, max_steps=5, throw=False)
    assert not sol.success
    assert sol.status == "max_steps_reached"
    assert sol.stats["naccept"] == 5
    assert sol.u.shape == (11, 2)
    np.testing.assert_array_equal(sol.u[0], [1.0, 1.0])
    assert np.isnan(sol.u[-1]).all()


# u' = u^2, u(0) = 1 is 1 / (1 - t): it blows up at t = 1. The overflow of u * u in
# f, and inf * 0 in the Runge-Kutta stage sums (as in SciPy's own solvers) warn on
# the way; the status reports the failure.
BLOW_UP_WARNINGS = (
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:invalid value encountered:RuntimeWarning",
)


@pytest.mark.filterwarnings(*BLOW_UP_WARNINGS)
@pytest.mark.parametrize(
    "alg",
    # LSODA creeps towards the singularity with ever tinier steps until max_steps
    [a for a in ALL_ALGS if a != "lsoda"],
)
def test_blow_up_stops_with_a_failure_and_nan_rows(alg):
    ts = np.array([0.0, 0.5, 0.9, 1.5, 2.0])
    prob = dk.ODEProblem(lambda u, p, t: u * u, np.array([1.0]), (0.0, 2.0))
    fixed = ALGS[alg].fixed_step
    kw = {"dt0": 1e-3} if fixed else {"rtol": 1e-8, "atol": 1e-10}
    sol = dk.solve(prob, alg, saveat=ts, throw=False, **kw)
    assert sol.status in ("step_size_too_small", "nonfinite")
    assert sol.u.shape == (5, 1)
    # before the singularity the rows are right (Euler's O(dt0) error is ~1e-3 at
    # t = 0.5 and grows fast near t = 1); after it they are NaN
    rows = 2 if fixed else 3
    np.testing.assert_allclose(sol.u[:rows, 0], 1 / (1 - ts[:rows]), rtol=1e-2)
    assert np.isnan(sol.u[3:]).all()


@pytest.mark.parametrize("alg", ALL_ALGS)
@pytest.mark.parametrize("n", [2, 100])  # both paths of the state's finiteness test
def test_nonfinite_f_gives_status_nonfinite(alg, n):
    prob = dk.ODEProblem(nan_after_one, np.ones(n), (0.0, 2.0))
    kw = {"dt0": 0.01} if ALGS[alg].fixed_step else {}
    sol = dk.solve(prob, alg, saveat=[0.5, 2.0], throw=False, **kw)
    assert sol.status == "nonfinite"
    np.testing.assert_allclose(sol.u[0], np.exp(-0.5), rtol=1e-2)  # Euler: ~3e-3
    assert np.isnan(sol.u[1]).all()
    with pytest.raises(dk.SolveError, match=r"status 'nonfinite'.*Check f"):
        dk.solve(prob, alg, **kw)


@pytest.mark.parametrize("alg", ["dopri5", "bdf"])
def test_errors_raised_by_f_propagate(alg):
    def f(u, p, t):
        if t > 0.5:
            raise ValueError("boom from f")
        return -u

    with pytest.raises(ValueError, match="boom from f"):
        dk.solve(dk.ODEProblem(f, np.ones(2), (0.0, 1.0)), alg)
