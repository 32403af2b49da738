"""The PyTorch backend: its tables, torchdiffeq as a reference, numerics and adapter.

Tolerances: adaptive solves run at rtol=1e-10, atol=1e-12 (bosh3 at 1e-8, 1e-10;
rosenbrock23 at 1e-7, 1e-9, see `allowed_error`) unless a test says otherwise; on
these short, well-conditioned problems the global error is then a small multiple
of rtol, and we allow 100 * rtol (dopri8's save
values come from an order-5 dense output and use most of that room, see
`test_dense_output_as_accurate_as_step_ends`).
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
from problems import (
    LINEAR_A,
    LINEAR_U0,
    linear_exact,
    lotka_volterra_problem,
    to_numpy,
)

import diffeqkit as dk
from diffeqkit import backends
from diffeqkit._algs import ALGS
from diffeqkit._saveat import step_grid
from diffeqkit._tableaux import get_tableau

torch = pytest.importorskip("torch")
torchdiffeq = pytest.importorskip("torchdiffeq")
from diffeqkit.backends import torch as torch_backend  # noqa: E402

pytestmark = pytest.mark.torch

# Adaptive explicit methods; the implicit ones are tested in test_torch_stiff.py.
ADAPTIVE = [
    a for a in backends.SPECS["torch"].capabilities.algs if ALGS[a].kind == "adaptive"
]
FIXED = [a for a in backends.SPECS["torch"].capabilities.algs if ALGS[a].fixed_step]
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
# bosh3 (3rd order) needs ~3500 steps at 1e-10; 1e-8 keeps this file fast.
# rosenbrock23 (order 2) needs ~4300 steps at 1e-10; 1e-7 keeps this file fast.
TOLERANCES = {
    "bosh3": {"rtol": 1e-8, "atol": 1e-10},
    "rosenbrock23": {"rtol": 1e-7, "atol": 1e-9},
}
# The global error of a fixed-step method is C * dt0**order with C ~ 1 here.
FIXED_DT0 = {"euler": 1e-3, "midpoint": 1e-3, "heun": 1e-3, "rk4": 1e-2}


def solve_kwargs(alg: str) -> dict:
    if ALGS[alg].fixed_step:
        return {"dt0": FIXED_DT0[alg]}
    return dict(TOLERANCES.get(alg, TIGHT))


def allowed_error(alg: str) -> float:
    if ALGS[alg].fixed_step:
        return 10 * FIXED_DT0[alg] ** ALGS[alg].order
    if alg == "rosenbrock23":
        # It propagates its order-2 solution (no local extrapolation), so errors
        # add up over the steps: measured 30-700 x rtol on the linear problem.
        return 1000 * solve_kwargs(alg)["rtol"]
    return 100 * solve_kwargs(alg)["rtol"]


def torch_linear_problem(tspan=(0.0, 2.0)) -> dk.ODEProblem:
    return dk.ODEProblem(
        lambda u, p, t: p @ u,
        torch.tensor(LINEAR_U0),
        tspan,
        torch.tensor(LINEAR_A),
    )


# --- tables and torchdiffeq integration -------------------------------------------


def test_torchdiffeq_is_left_untouched():
    # Importing the backend adds nothing to torchdiffeq's solver table.
    solvers = importlib.import_module("torchdiffeq._impl.odeint").SOLVERS
    assert not [name for name in solvers if "diffeqkit" in name]
    assert all(cls.__module__.startswith("torchdiffeq") for cls in solvers.values())


def _recording(record, f):
    """`f` noting the time and a copy of the state of every call in `record`."""

    def g(t, u):
        record.append((float(t), u.detach().clone()))
        return f(t, u)

    return g


def _lotka_volterra_calls(alg, method, record):
    """dk's eager solve (`method` None) or torchdiffeq's of Lotka-Volterra,
    landing on t1 (every save for dopri8), noting every call of f in `record`;
    returns the values at the save times and, for dk, the solution."""
    import diffeqkit.torch as dkt

    p = torch.tensor([1.5, 1.0, 3.0, 1.0], dtype=torch.float64)

    def lv(t, u):
        x, y = u[0], u[1]
        return torch.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y])

    f = _recording(record, lv)
    u0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    tol = {"rtol": 1e-8, "atol": 1e-10}
    if method is None:
        prob = dk.ODEProblem(lambda u, p, t: f(t, u), u0, (0.0, 2.0))
        with dkt.engine("eager"):
            sol = dk.solve(prob, alg, backend="torch", saveat=SAVES, **tol)
        return sol.u, sol
    landings = SAVES[1:] if alg == "dopri8" else SAVES[-1:]
    times = torch.tensor(SAVES, dtype=torch.float64)
    step_t = torch.tensor(landings, dtype=torch.float64)
    u = torchdiffeq.odeint(
        f, u0, times, method=method, options={"step_t": step_t}, **tol
    )
    return u, None


SAVES = [0.0, 0.5, 1.25, 2.0]


@pytest.mark.parametrize("alg", ["bosh3", "dopri5", "dopri8"])
def test_eager_driver_takes_torchdiffeqs_steps(alg, monkeypatch):
    """The eager driver is torchdiffeq's RK solver class step for step: with the
    shared tableau on torchdiffeq's class, f sees the same states in the same
    order bit for bit, and step-end values agree to rounding. The one difference
    by design: torchdiffeq evaluates the stages at c = 1 at the float just before
    t1 (``Perturb.PREV``), dk at t1, as SciPy and diffrax do (f here is
    autonomous). torchdiffeq's own bosh3 and dopri8 take the same steps (their
    coefficients differ in the last bits); its own dopri5 estimates the error
    with another embedded 4th-order formula than the shared tableau's (SciPy's
    RK45: dk's dopri5 takes SciPy's steps on every backend), so its steps
    differ (248 evaluations of f against 266 here)."""
    from diffeqkit.backends.torch._rk import adaptive_tableau

    rk_common = importlib.import_module("torchdiffeq._impl.rk_common")
    tab, _ = adaptive_tableau(alg, torch.float64, torch.device("cpu"))

    class Shared(rk_common.RKAdaptiveStepsizeODESolver):
        order = get_tableau(alg).error_order + 1
        tableau = rk_common._ButcherTableau(
            alpha=tab.alpha,
            beta=tab.beta,
            c_sol=torch.cat([tab.beta[-1], torch.zeros(1, dtype=torch.float64)]),
            c_error=tab.error,
        )
        # Only torchdiffeq's interpolant uses it; the values compared are at
        # step ends.
        mid = torch.zeros(len(tab.alpha) + 1, dtype=torch.float64)

    solvers = importlib.import_module("torchdiffeq._impl.odeint").SOLVERS
    monkeypatch.setitem(solvers, "shared", Shared)
    ours, theirs = [], []
    u, sol = _lotka_volterra_calls(alg, None, ours)
    ref, _ = _lotka_volterra_calls(alg, "shared", theirs)
    assert sol.stats["engine"] == "eager"
    assert sol.stats["nfev"] == len(ours) == len(theirs)
    for (t, y), (t_ref, y_ref) in zip(ours, theirs, strict=True):
        assert torch.equal(y, y_ref)
        assert t_ref in (t, math.nextafter(t, -math.inf))
    ends = [1, 2, 3] if alg == "dopri8" else [3]
    np.testing.assert_allclose(u[ends].numpy(), ref[ends].numpy(), rtol=1e-14)
    # torchdiffeq's own method.
    own = []
    ref, _ = _lotka_volterra_calls(alg, alg, own)
    if alg == "dopri5":
        assert len(own) != len(ours)
    else:
        assert len(own) == len(ours)
        np.testing.assert_allclose(u[ends].numpy(), ref[ends].numpy(), rtol=1e-12)


def test_continuous_adjoint_matches_closed_form_and_torchdiffeqs_adjoint():
    # d/dk exp(-2k) = -2 exp(-2k); both adjoint solves are accurate to ~rtol.
    k = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=torch.float64)
    prob = dk.ODEProblem(lambda u, p, t: -p * u, y0, (0.0, 2.0), k)
    sol = dk.solve(prob, "tsit5", sensealg=dk.ContinuousAdjoint(), **TIGHT)
    (ours,) = torch.autograd.grad(sol.u[-1].sum(), k)
    u = torchdiffeq.odeint_adjoint(
        lambda t, y: -k * y,
        y0,
        torch.tensor([0.0, 2.0], dtype=torch.float64),
        method="dopri5",
        adjoint_params=(k,),
        **TIGHT,
    )
    (theirs,) = torch.autograd.grad(u[-1].sum(), k)
    exact = -2 * math.exp(-1.4)
    assert float(ours) == pytest.approx(exact, rel=1e-8)
    assert float(theirs) == pytest.approx(exact, rel=1e-8)


def test_describe_lists_devices_and_threads():
    info = torch_backend.BACKEND.describe()
    assert info["devices"][0] == "cpu"
    assert len(info["devices"]) == 1 + torch.cuda.device_count()
    assert info["threads"] == torch.get_num_threads()


# --- numerics ------------------------------------------------------------------------


def test_rk4_is_the_classical_method_not_the_three_eighths_rule():
    # One step of h = 1 on u' = t^4 (quadrature of t^4 over [0, 1]): the classical
    # rule (Simpson) gives 5/24, torchdiffeq's 3/8 rule 11/54.
    prob = dk.ODEProblem(
        lambda u, p, t: torch.ones_like(u) * t**4,
        torch.zeros(1, dtype=torch.float64),
        (0.0, 1.0),
    )
    sol = dk.solve(prob, "rk4", dt0=1.0)
    assert float(sol.u[-1, 0]) == pytest.approx(5 / 24, rel=1e-15)


@pytest.mark.parametrize("alg", FIXED)
def test_fixed_step_stats_count_every_stage(alg):
    # (values on the step grid: tests/test_solve.py, for every backend)
    ts = np.array([0.0, 0.123, 0.5, 0.77, 1.0])
    sol = dk.solve(torch_linear_problem((0.0, 1.0)), alg, saveat=ts, dt0=0.1)
    grid = step_grid(0.0, 1.0, 0.1, ts)
    assert sol.stats == {
        "nfev": get_tableau(alg).n_stages * (grid.size - 1),
        "naccept": grid.size - 1,
        "nreject": 0,
        "engine": "eager",
    }


class _StepEnds:
    """A torchdiffeq func that records the end of every accepted step."""

    def __init__(self, a):
        self.a = a
        self.ends: list[float] = []

    def __call__(self, t, y):
        return self.a @ y

    def callback_accept_step(self, t0, y0, dt):
        self.ends.append(float(t0 + dt))


def _drive(alg: str, rtol: float, ts, ends: list[float] | None = None):
    """Our adaptive driver of `alg` on the linear problem through `ts` (steps
    landing on t = 2), recording the accepted step ends into `ends`."""
    a, y0 = torch.tensor(LINEAR_A), torch.tensor(LINEAR_U0)
    times = torch.tensor(ts, dtype=torch.float64)
    solver = torch_backend.ALGS[alg](
        lambda t, y: a @ y,
        y0,
        rtol,
        rtol * 1e-2,
        step_t=torch.tensor([2.0], dtype=torch.float64),
    )
    if ends is not None:
        solver.on_step = lambda t0, y0, dt: ends.append(float(t0 + dt))
    solver.begin(times[0])
    return torch.stack([y0, *(solver.advance(t) for t in times[1:])])


def _between_step_errors(alg: str, rtol: float) -> tuple[float, float]:
    """Max error at the step ends and at points inside the steps of our driver."""
    tspan = (0.0, 2.0)
    found: list[float] = []
    _drive(alg, rtol, tspan, found)
    ends = np.array([tspan[0], *(t for t in found if t <= tspan[1])])
    return _errors(ends, lambda ts: _drive(alg, rtol, ts))


def _native_between_step_errors(method: str, rtol: float) -> tuple[float, float]:
    """The same for torchdiffeq's own `method`, via odeint."""
    a, y0, tspan = torch.tensor(LINEAR_A), torch.tensor(LINEAR_U0), (0.0, 2.0)
    opts = {"step_t": torch.tensor([tspan[1]], dtype=torch.float64)}
    kw = {"method": method, "rtol": rtol, "atol": rtol * 1e-2, "options": opts}
    func = _StepEnds(a)
    torchdiffeq.odeint(func, y0, torch.tensor(tspan), **kw)
    ends = np.array([tspan[0], *(t for t in func.ends if t <= tspan[1])])
    return _errors(
        ends, lambda ts: torchdiffeq.odeint(_StepEnds(a), y0, torch.tensor(ts), **kw)
    )


def _errors(ends: np.ndarray, solve) -> tuple[float, float]:
    inner = np.sort(
        np.concatenate([ends[:-1] + theta * np.diff(ends) for theta in (0.3, 0.5)])
    )

    def error(ts):
        return np.abs(solve(ts).numpy() - linear_exact(ts)).max()

    return error(ends), error(np.concatenate([[ends[0]], inner]))


# rtol per alg: 1e-10 as in the brief; bosh3 at 1e-8 to keep its ~750 steps fast;
# dopri8 at 1e-12, where its step-end error is ~1e-14.
DENSE_RTOL = {"bosh3": 1e-8, "dopri5": 1e-10, "tsit5": 1e-10, "dopri8": 1e-12}


@pytest.mark.parametrize(
    "alg",
    [
        pytest.param(
            a,
            marks=pytest.mark.xfail(
                a == "dopri8",
                strict=True,
                reason="the shared dopri8 dense output (diffeqkit._tableaux) is of "
                "order 5, not 7: between steps its error is ~6000x the step-end "
                "error at rtol=1e-12 (still ~170x better than torchdiffeq's own); "
                "dk.solve therefore ends dopri8 steps on every save time",
            ),
        )
        for a in ADAPTIVE
    ],
)
def test_dense_output_as_accurate_as_step_ends(alg):
    # Save values come from the tableau's dense output: of the method's order, its
    # error between steps is of the size of the (global) error at the step ends.
    # Measured ratios: bosh3 1.0, dopri5 1.0, tsit5 2.1.
    at_ends, inside = _between_step_errors(alg, DENSE_RTOL[alg])
    assert inside < 5 * at_ends


def test_dopri8_dense_output_beats_torchdiffeqs_own_interpolation():
    # torchdiffeq's dopri8 interpolates with a quartic through a midpoint (order
    # 4); ours is the shared order-5 dense output. Measured at rtol=1e-12:
    # ours 8e-11, torchdiffeq's 1.4e-8 between steps (step ends: 1.3e-14 both).
    ours_ends, ours = _between_step_errors("dopri8", 1e-12)
    native_ends, native = _native_between_step_errors("dopri8", 1e-12)
    assert ours_ends == pytest.approx(native_ends, rel=0.5)  # the same method
    assert ours < native / 50


@pytest.mark.parametrize("alg", ["tsit5", "dopri8"])
def test_dense_output_through_dk_solve_between_steps(alg):
    # dk.solve's save values are as accurate as odeint's step ends: from the dense
    # output (tsit5), or because steps end on save times (dopri8, whose dense
    # output is only 5th order: SolveRequest.land_on_saves).
    rtol = DENSE_RTOL[alg]
    at_ends, _ = _between_step_errors(alg, rtol)
    ts = np.linspace(0.0, 2.0, 401)
    sol = dk.solve(torch_linear_problem(), alg, saveat=ts, rtol=rtol, atol=rtol / 100)
    assert np.abs(to_numpy(sol.u) - linear_exact(ts)).max() < 5 * at_ends


# --- stats ---------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ADAPTIVE)
def test_adaptive_stats_count_real_evaluations(alg):
    calls = []

    def f(u, p, t):
        calls.append(t)
        return p @ u

    prob = dk.ODEProblem(f, torch.tensor(LINEAR_U0), (0.0, 2.0), torch.tensor(LINEAR_A))
    sol = dk.solve(prob, alg, rtol=1e-8, atol=1e-10)
    stats = sol.stats
    # Every call of f is counted once: the check at t0 is reused as the solver's
    # first evaluation. Then one call to choose the first step, and n_stages per
    # step attempt (the FSAL row K[s] = f(t1, y1) is the next step's first stage).
    assert stats["nfev"] == len(calls)
    steps = stats["naccept"] + stats["nreject"]
    assert stats["nfev"] == 2 + get_tableau(alg).n_stages * steps
    assert stats["naccept"] > 0
    assert stats["nreject"] >= 0


def test_dt0_skips_the_initial_step_selection():
    sol = dk.solve(torch_linear_problem(), "dopri5", dt0=0.01, rtol=1e-8, atol=1e-10)
    steps = sol.stats["naccept"] + sol.stats["nreject"]
    assert sol.stats["nfev"] == 1 + 6 * steps


def test_lotka_volterra_close_to_plain_torchdiffeq_dopri5():
    # torchdiffeq's dopri5 embeds a different 4th-order error estimate (its
    # c_error is not SciPy's E) and overshoots t1, so the step counts differ a
    # little (measured: 656 vs 620 evaluations); the solutions agree to tolerance.
    prob = lotka_volterra_problem()
    ts = np.linspace(0.0, 10.0, 101)
    sol = dk.solve(prob, "dopri5", backend="torch", saveat=ts, rtol=1e-6, atol=1e-8)
    p = torch.tensor(prob.p)
    nfev = 0

    def func(t, y):
        nonlocal nfev
        nfev += 1
        return torch.stack(
            [p[0] * y[0] - p[1] * y[0] * y[1], -p[2] * y[1] + p[3] * y[0] * y[1]]
        )

    u = torchdiffeq.odeint(
        func,
        torch.tensor(prob.u0),
        torch.tensor(ts),
        rtol=1e-6,
        atol=1e-8,
        method="dopri5",
    )
    assert abs(sol.stats["nfev"] - nfev) < 0.1 * nfev
    assert torch.allclose(sol.u, u, rtol=1e-4, atol=1e-6)


# --- failures ------------------------------------------------------------------------


def test_max_steps_returns_partial_solution():
    ts = np.linspace(0.0, 2.0, 5)
    sol = dk.solve(
        torch_linear_problem(), "dopri5", saveat=ts, max_steps=5, throw=False
    )
    assert sol.status == "max_steps_reached"
    assert not sol.success
    assert sol.stats["naccept"] + sol.stats["nreject"] == 5
    assert sol.u.shape == (5, 2)
    u = to_numpy(sol.u)
    assert np.isnan(u[-1]).all()
    assert np.isfinite(u[0]).all()
    with pytest.raises(dk.SolveError, match="max_steps_reached"):
        dk.solve(torch_linear_problem(), "dopri5", saveat=ts, max_steps=5)


def blow_up(u, p, t):
    return u**2  # u(t) = 1 / (1 - t): a singularity at t = 1


@pytest.mark.parametrize("alg", ADAPTIVE)
def test_blow_up_stops_with_a_failure_status(alg):
    prob = dk.ODEProblem(blow_up, torch.tensor([1.0], dtype=torch.float64), (0.0, 2.0))
    ts = np.array([0.0, 0.5, 1.5, 2.0])
    # Loose tolerances: fewer steps on the way to the singularity.
    kw = {"saveat": ts, "rtol": 1e-4, "atol": 1e-6}
    sol = dk.solve(prob, alg, throw=False, **kw)
    assert sol.status in ("step_size_too_small", "nonfinite")
    u = to_numpy(sol.u)[:, 0]
    assert u[1] == pytest.approx(2.0, rel=1e-2)
    assert np.isnan(u[2:]).all()
    with pytest.raises(dk.SolveError, match=r"stopped at t=1\b"):
        dk.solve(prob, alg, **kw)


def nan_after_half(u, p, t):
    return u * torch.log(0.5 - t)  # NaN for t > 0.5


@pytest.mark.parametrize("alg", ["tsit5", "rk4"])
def test_nonfinite_f_stops_with_status_nonfinite(alg):
    prob = dk.ODEProblem(nan_after_half, torch.ones(1, dtype=torch.float64), (0.0, 1.0))
    ts = np.linspace(0.0, 1.0, 5)
    sol = dk.solve(prob, alg, saveat=ts, dt0=0.1, throw=False)
    assert sol.status == "nonfinite"
    u = to_numpy(sol.u)[:, 0]
    assert np.isfinite(u[:2]).all()
    assert np.isnan(u[3:]).all()


def test_fixed_step_overflow_is_nonfinite():
    prob = dk.ODEProblem(blow_up, torch.ones(1, dtype=torch.float64), (0.0, 3.0))
    ts = np.linspace(0.0, 3.0, 7)
    sol = dk.solve(prob, "euler", dt0=0.1, saveat=ts, throw=False)
    assert sol.status == "nonfinite"
    u = to_numpy(sol.u)[:, 0]
    assert np.isfinite(u[:4]).all()
    assert np.isnan(u[-1])


def test_bad_rhs_output_is_rejected_at_t0():
    prob = dk.ODEProblem(
        lambda u, p, t: u[:1], torch.ones(2, dtype=torch.float64), (0.0, 1.0)
    )
    with pytest.raises(dk.InvalidProblemError, match=r"returned shape \(1,\)"):
        dk.solve(prob, "tsit5")


# --- dtype, shape, device, parameters, autograd ---------------------------------------


def decay(u, p, t):
    return -p * u


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_dtype_is_kept(dtype):
    prob = dk.ODEProblem(decay, torch.tensor([1.0, 2.0], dtype=dtype), (0.0, 1.0), 2.0)
    sol = dk.solve(prob, "tsit5", rtol=1e-5, atol=1e-7)
    assert sol.u.dtype == dtype
    assert sol.t.dtype == dtype
    # float32: the error is set by rounding (~1e-7), not by the tolerances.
    expected = np.array([1.0, 2.0]) * math.exp(-2.0)
    assert np.allclose(to_numpy(sol.u[-1]), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_dtype_is_kept(dtype):
    prob = dk.ODEProblem(decay, np.array([1.0], dtype=dtype), (0.0, 1.0), 2.0)
    sol = dk.solve(prob, "tsit5", backend="torch")
    assert sol.u.dtype == getattr(torch, dtype)


def test_lists_become_torchs_default_dtype():
    prob = dk.ODEProblem(decay, [1.0, 2.0], (0.0, 1.0), 2.0)
    sol = dk.solve(prob, "tsit5", backend="torch")
    assert isinstance(sol.u, torch.Tensor)
    assert sol.u.dtype == torch.get_default_dtype()


def test_dtype_argument_casts():
    prob = dk.ODEProblem(decay, torch.ones(1, dtype=torch.float32), (0.0, 1.0), 2.0)
    sol = dk.solve(prob, "tsit5", dtype="float64")
    assert sol.u.dtype == torch.float64


def test_f_sees_tensors_in_the_state_dtype():
    seen = {}
    p = torch.tensor(2.0, dtype=torch.float32)

    def f(u, q, t):
        seen.update(u=u, q=q, t=t)
        return -q * u

    prob = dk.ODEProblem(f, torch.ones(3, dtype=torch.float32), (0.0, 1.0), p)
    dk.solve(prob, "dopri5")
    assert seen["q"] is p  # torch tensors in p are used as they are
    assert seen["u"].shape == (3,)
    assert seen["t"].shape == ()
    assert seen["t"].dtype == torch.float32


def test_pytree_p_keeps_structure_and_integer_leaves():
    seen = {}

    def f(u, p, t):
        seen.update(p)
        return -p["k"] * u * p["n"][0]

    p = {"k": np.array(0.5), "n": [np.array(2)]}
    prob = dk.ODEProblem(f, torch.ones(1, dtype=torch.float32), (0.0, 1.0), p)
    sol = dk.solve(prob, "tsit5")
    assert seen["k"].dtype == torch.float32  # floats follow the state
    assert seen["n"][0].dtype == torch.int64  # integers stay integer
    assert float(sol.u[-1, 0]) == pytest.approx(math.exp(-1.0), rel=1e-5)


def test_matrix_state_keeps_its_shape():
    # U' = A U for a 2x2 U: U(t) = exp(A t) U0, column by column.
    u0 = np.array([[1.0, 0.0], [0.5, 2.0]])
    prob = dk.ODEProblem(
        lambda u, p, t: p @ u, torch.tensor(u0), (0.0, 1.0), torch.tensor(LINEAR_A)
    )
    ts = np.linspace(0.0, 1.0, 3)
    sol = dk.solve(prob, "tsit5", saveat=ts, **TIGHT)
    assert sol.u.shape == (3, 2, 2)
    a, b = LINEAR_A[0, 0], LINEAR_A[0, 1]
    for i, t in enumerate(ts):
        c, s = math.cos(b * t), math.sin(b * t)
        exact = math.exp(a * t) * np.array([[c, s], [-s, c]]) @ u0
        assert np.allclose(to_numpy(sol.u[i]), exact, rtol=0, atol=1e-9)


def test_saveat_without_t0_still_integrates_to_t1():
    prob = torch_linear_problem()
    full = dk.solve(prob, "tsit5", saveat=[0.5, 1.0, 2.0], **TIGHT)
    partial = dk.solve(prob, "tsit5", saveat=[0.5, 1.0], **TIGHT)
    assert partial.u.shape == (2, 2)
    assert torch.equal(partial.u, full.u[:2])
    assert partial.stats == full.stats  # both ran to t1


def test_gradient_flows_through_the_steps():
    # u' = -k u, u(0) = 1: u(T) = exp(-k T), du(T)/dk = -T exp(-k T). Plain autograd
    # through dk.solve (discretise-then-optimise) matches it and central finite
    # differences to ~1e-6 (relative).
    def loss(k):
        prob = dk.ODEProblem(decay, torch.ones(1, dtype=torch.float64), (0.0, 2.0), k)
        return dk.solve(prob, "tsit5", **TIGHT).u[-1, 0]

    k = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    loss(k).backward()
    assert k.grad is not None
    grad = float(k.grad)
    eps = 1e-5
    with torch.no_grad():
        up = float(loss(torch.tensor(0.7 + eps, dtype=torch.float64)))
        down = float(loss(torch.tensor(0.7 - eps, dtype=torch.float64)))
    fd = (up - down) / (2 * eps)
    assert grad == pytest.approx(fd, rel=1e-6)
    assert grad == pytest.approx(-2.0 * math.exp(-1.4), rel=1e-6)


def test_unavailable_cuda_is_unsupported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    prob = dk.ODEProblem(decay, torch.ones(1), (0.0, 1.0), 2.0)
    with pytest.raises(dk.UnsupportedError, match=r"device='cuda:1' is not available"):
        dk.solve(prob, "tsit5", device="cuda:1")


@pytest.mark.gpu
def test_solves_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    prob = dk.ODEProblem(decay, [1.0, 2.0], (0.0, 1.0), 2.0)
    sol = dk.solve(prob, "tsit5", device="cuda", dtype="float64", **TIGHT)
    assert sol.u.device.type == "cuda"
    assert sol.t.device.type == "cuda"
    expected = np.array([1.0, 2.0]) * math.exp(-2.0)
    assert np.allclose(to_numpy(sol.u[-1]), expected, rtol=1e-9)
    fixed = dk.solve(prob, "rk4", device="cuda", dt0=0.01)
    assert fixed.u.device.type == "cuda"
