"""The JAX backend: its alg table, diffrax integration, numerics, no-recompilation,
transformations, failures, dtype and device.

Compiling a diffrax program costs seconds, so the tests share problem functions and
shapes: solutions of the linear test problem are computed once per alg
(`linear_solution`) and read by several tests, and other tests reuse compiled
programs by keeping the problem structure the same (which is itself the property
under test: new values never recompile).

Tolerances: adaptive solves run at rtol=1e-10, atol=1e-12; the global error on the
damped rotation over [0, 2] is then a small multiple of 1e-10 and we allow 1e-8
(bosh3, 3rd order, included). Fixed-step methods have global error C * dt0**order
with C ~ 1 here; we allow 10 * dt0**order.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import LOW_ORDER, secondary_implicit
from problems import LINEAR_A, LINEAR_U0, linear_exact, logistic_exact, to_numpy

import diffeqkit as dk
from diffeqkit import backends
from diffeqkit._algs import ALGS
from diffeqkit._tableaux import get_tableau

jax = pytest.importorskip("jax")
diffrax = pytest.importorskip("diffrax")
import jax.numpy as jnp  # noqa: E402

from diffeqkit.backends import jax as jax_backend  # noqa: E402
from diffeqkit.backends.jax import _solve  # noqa: E402

pytestmark = pytest.mark.jax

ALGS_HERE = list(backends.SPECS["jax"].capabilities.algs)
# The algs tested in every session; the other implicit ones only in tests_all.
QUICK = [a for a in ALGS_HERE if not secondary_implicit("jax", a)]


def params(algs: list[str]) -> list:
    """`algs` as parameters, the secondary implicit ones marked slow."""
    return [
        pytest.param(a, marks=pytest.mark.slow) if secondary_implicit("jax", a) else a
        for a in algs
    ]


ADAPTIVE = [a for a in ALGS_HERE if not ALGS[a].fixed_step]
FIXED = [a for a in ALGS_HERE if ALGS[a].fixed_step]
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
# Divisors of the save spacing 0.25; few steps keep the counted solves fast (the
# by-hand comparison in test_fixed_step_saves_are_the_step_values is the precise
# check of the fixed-step methods).
FIXED_DT0 = {"euler": 1 / 160, "midpoint": 1 / 80, "heun": 1 / 80, "rk4": 1 / 20}
# Nine save times, all multiples of every dt0 above: forward and backward solves
# then have the same structure (and fixed-step grids the same length), so the
# backward solves reuse the forward programs.
SAVES = np.linspace(0.0, 2.0, 9)


def solve_kwargs(alg: str) -> dict:
    if ALGS[alg].fixed_step:
        return {"dt0": FIXED_DT0[alg]}
    return dict(LOW_ORDER[alg][0]) if alg in LOW_ORDER else dict(TIGHT)


def allowed_error(alg: str) -> float:
    if ALGS[alg].fixed_step:
        return 10 * FIXED_DT0[alg] ** ALGS[alg].order
    return LOW_ORDER[alg][1] if alg in LOW_ORDER else 1e-8


# ---------------------------------------------------------------------------------
# Shared solves of the linear problem, with f's real evaluations counted.
# ---------------------------------------------------------------------------------

CALLS = [0]


def _count() -> None:
    CALLS[0] += 1


def counted_linear(u, p, t):
    """u' = A u, counting every evaluation the compiled program really makes."""
    jax.debug.callback(_count)
    return p @ u


@functools.cache
def linear_solution(alg: str, backward: bool = False):
    """(solution, evaluations of f counted) of u' = A u on [0, 2] or [2, 0]."""
    tspan, saves = ((2.0, 0.0), SAVES[::-1]) if backward else ((0.0, 2.0), SAVES)
    u0 = linear_exact([tspan[0]])[0]
    prob = dk.ODEProblem(counted_linear, u0, tspan, LINEAR_A)
    CALLS[0] = 0
    sol = dk.solve(prob, alg, backend="jax", saveat=saves, **solve_kwargs(alg))
    jax.effects_barrier()
    return sol, CALLS[0]


# ---------------------------------------------------------------------------------
# The alg table and diffrax's tableaux.
# ---------------------------------------------------------------------------------


DIFFRAX_SOLVERS = {
    "midpoint": diffrax.Midpoint,
    "heun": diffrax.Heun,
    "rk4": _solve.RK4,
    "bosh3": diffrax.Bosh3,
    "dopri5": diffrax.Dopri5,
    "tsit5": diffrax.Tsit5,
    "dopri8": diffrax.Dopri8,
}


def _diffrax_abc(solver) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """diffrax's tableau as full (a, b, c), FSAL stage included."""
    tab = solver.tableau
    s = tab.num_stages
    a = np.zeros((s, s))
    for i, row in enumerate(tab.a_lower, start=1):
        a[i, :i] = row
    return a, np.asarray(tab.b_sol), np.concatenate([[0.0], tab.c])


def _shared_abc(name: str, stages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shared tableau as (a, b, c); with one more stage than it has, that stage
    is K[s] = f(t + h, y1) (a row b, node 1, weight 0): diffrax's FSAL layout."""
    tab = get_tableau(name)
    s = tab.n_stages
    if stages == s:
        return np.asarray(tab.a), np.asarray(tab.b), np.asarray(tab.c)
    assert stages == s + 1
    a = np.zeros((s + 1, s + 1))
    a[:s, :s] = tab.a
    a[s, :s] = tab.b
    return a, np.append(tab.b, 0.0), np.append(tab.c, 1.0)


@pytest.mark.parametrize("alg", list(DIFFRAX_SOLVERS))
def test_diffrax_tableaux_equal_the_shared_ones(alg):
    solver = DIFFRAX_SOLVERS[alg]
    ours = _shared_abc(alg, solver.tableau.num_stages)
    for theirs, shared in zip(_diffrax_abc(solver), ours, strict=True):
        np.testing.assert_allclose(theirs, shared, rtol=0, atol=1e-15)


def test_euler_is_one_evaluation_per_step():
    # diffrax's Euler has no tableau; check its step against the shared one.
    tab = get_tableau("euler")
    assert (tab.a.tolist(), tab.b.tolist(), tab.c.tolist()) == ([[0.0]], [1.0], [0.0])
    term = diffrax.ODETerm(lambda t, y, args: -2.0 * y)
    y1, *_ = diffrax.Euler().step(term, 0.0, 0.1, jnp.array([1.0]), None, None, False)
    np.testing.assert_allclose(to_numpy(y1), [0.8], rtol=1e-15)


@pytest.mark.parametrize("alg", ["bosh3", "tsit5", "dopri8"])
def test_error_estimates_equal_the_shared_ones_up_to_sign(alg):
    tab = get_tableau(alg)
    theirs = np.asarray(DIFFRAX_SOLVERS[alg].tableau.b_error)
    # diffrax's error weights are b - b_hat over its stages; ours (SciPy's sign)
    # are b_hat - b over s + 1 rows, the last being diffrax's FSAL stage.
    ours = tab.e if theirs.size == tab.e.size else tab.e[:-1]
    np.testing.assert_allclose(theirs, -ours, rtol=0, atol=1e-15)


def test_dopri5_error_estimate_is_two_thirds_of_scipys():
    # diffrax's Dopri5 embeds a different 4th-order formula: its error estimate is
    # -2/3 of SciPy's RK45 (the shared tableau), so at the same rtol it takes
    # slightly larger steps. Pinned here so a change is noticed.
    theirs = np.asarray(diffrax.Dopri5.tableau.b_error)
    np.testing.assert_allclose(theirs, -2 / 3 * get_tableau("dopri5").e, atol=1e-15)


@pytest.mark.parametrize("alg", ["bosh3", "dopri5", "tsit5", "dopri8"])
def test_interpolant_orders_are_what_the_table_says(alg):
    """One step of u' = A u from u0; the interpolant's error at theta = 0.3, 0.5,
    0.7 falls as h**(dense_order + 1) when h halves."""
    a = jnp.asarray(LINEAR_A)
    term = diffrax.ODETerm(lambda t, y, args: a @ y)
    solver = jax_backend.ALGS[alg].solver()
    y0 = jnp.asarray(LINEAR_U0)
    errors = []
    for h in (0.2, 0.1, 0.05):
        t0, t1 = jnp.asarray(0.0), jnp.asarray(h)
        state = solver.init(term, t0, t1, y0, None)
        _, _, dense, _, _ = solver.step(term, t0, t1, y0, None, state, False)
        interp = solver.interpolation_cls(t0=t0, t1=t1, **dense)
        thetas = (0.3, 0.5, 0.7)
        exact = linear_exact([th * h for th in thetas])
        got = np.stack([to_numpy(interp.evaluate(th * h)) for th in thetas])
        errors.append(np.abs(got - exact).max())
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:])) - 1
    expected = jax_backend.ALGS[alg].dense_order
    # Measured orders approach the asymptotic one from above (by up to ~0.7 here).
    assert np.all(orders > expected - 0.3), orders
    assert np.all(orders < expected + 1), orders


def test_weak_interpolants_make_steps_land_on_save_times():
    landing = {a for a in ADAPTIVE if jax_backend.ALGS[a].lands_on_saves}
    # dopri8's interpolant is of order 5; every implicit method lands (their
    # interpolants are cubic at best, and stiff problems have few saves).
    assert landing == {"dopri8"} | {a for a in ADAPTIVE if ALGS[a].implicit}


# ---------------------------------------------------------------------------------
# Numerics.
# ---------------------------------------------------------------------------------


def test_backward_solves_reuse_the_forward_programs():
    for alg in QUICK:
        linear_solution(alg, False)
    compiled = set(_solve.PROGRAMS.keys())
    for alg in QUICK:
        linear_solution(alg, True)
    assert set(_solve.PROGRAMS.keys()) == compiled


@pytest.mark.parametrize("alg", params(ADAPTIVE))
def test_save_values_between_steps_as_accurate_as_step_ends(alg):
    # t1 always ends a step: its error is the method's own. Saves fall between
    # steps (unless the alg lands on them) and come from diffrax's interpolant;
    # they must not be much worse. (Without landing, dopri8's would be ~1000x.)
    sol, _ = linear_solution(alg)
    err = np.abs(to_numpy(sol.u) - linear_exact(SAVES)).max(axis=1)
    assert err[1:-1].max() <= 3 * err[-1] + 1e-13, err


def test_logistic_with_pytree_p_and_integer_leaf():
    seen = {}

    def logistic(u, p, t):
        seen["n"] = p["n"]
        return p["r"] * u * (1 - u / p["K"]) * p["n"]

    ts = np.array([0.0, 0.37, 1.2, 2.9, 4.0])
    p = {"r": 1.3, "K": np.array(5.0), "n": 1}
    u0 = np.array([0.2, 1.0])
    prob = dk.ODEProblem(logistic, u0, (0.0, 4.0), p)
    sol = dk.solve(prob, "tsit5", backend="jax", saveat=ts, **TIGHT)
    assert jnp.issubdtype(seen["n"].dtype, jnp.integer)
    # logistic values reach K=5: scale the allowance accordingly
    np.testing.assert_allclose(to_numpy(sol.u), logistic_exact(ts), rtol=0, atol=5e-8)


def test_jax_array_times_are_read_and_checked():
    # tspan and saveat as (concrete) JAX arrays; the structure of the tsit5
    # solve in `linear_solution`, so nothing new is compiled.
    prob = dk.ODEProblem(
        counted_linear, LINEAR_U0, (jnp.asarray(0.0), jnp.asarray(2.0)), LINEAR_A
    )
    sol = dk.solve(prob, backend="jax", saveat=jnp.asarray(SAVES), **TIGHT)
    np.testing.assert_allclose(to_numpy(sol.u), linear_exact(SAVES), atol=1e-8)
    with pytest.raises(dk.InvalidProblemError, match="saveat must lie inside"):
        dk.solve(prob, backend="jax", saveat=jnp.asarray(SAVES + 1.0), **TIGHT)


# ---------------------------------------------------------------------------------
# stats.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", [a for a in ALGS_HERE if not ALGS[a].implicit])
def test_nfev_counts_real_evaluations(alg):
    """The nfev formula against f's evaluations counted by a host callback inside
    the compiled program (`jax.disable_jit` is no use here: diffrax also calls f
    to trace shapes, which a Python counter would count)."""
    sol, counted = linear_solution(alg)
    fsal = jax_backend.ALGS[alg].fsal
    # Without FSAL, our own check of f(u0, p, t0) is the one evaluation the
    # solver does not use; with FSAL it is the first step's first stage.
    assert sol.stats["nfev"] == counted - (0 if fsal else 1)
    stages = jax_backend.ALGS[alg].stages
    assert sol.stats["naccept"] > 0
    assert sol.stats["nfev"] >= (stages - fsal) * sol.stats["naccept"]


def test_nfev_counts_rejected_steps_and_a_given_dt0():
    prob = dk.ODEProblem(traced_decay, np.array([1.0, 2.0]), (0.0, 3.0), 2.0)
    CALLS[0] = 0
    # the same structure as test_new_values_never_retrace_or_recompile
    sol = dk.solve(
        prob,
        backend="jax",
        saveat=np.linspace(0.0, 3.0, 5),
        dt0=2.5,  # far too long a first step: rejected
        rtol=1e-3,
        atol=1e-6,
    )
    jax.effects_barrier()
    assert sol.stats["nreject"] > 0
    assert sol.stats["nfev"] == CALLS[0]


@pytest.mark.parametrize("alg", params([a for a in ALGS_HERE if ALGS[a].implicit]))
def test_implicit_nfev_is_unknown_but_steps_are_counted(alg):
    # Newton iterations make the count of evaluations unknowable here.
    sol, _ = linear_solution(alg)
    assert sol.stats["nfev"] is None
    assert sol.stats["naccept"] >= len(SAVES) - 1  # it lands on every save time
    assert sol.stats["nreject"] >= 0


# ---------------------------------------------------------------------------------
# No recompilation.
# ---------------------------------------------------------------------------------

TRACES = [0]


def traced_decay(u, p, t):
    TRACES[0] += 1  # runs only while JAX traces f
    jax.debug.callback(_count)  # runs at every evaluation
    return -p * u


def test_new_values_never_retrace_or_recompile():
    prob = dk.ODEProblem(traced_decay, np.array([1.0, 2.0]), (0.0, 1.0), 2.0)
    kw = {"backend": "jax", "saveat": np.linspace(0.0, 1.0, 5), "dt0": 0.1}
    dk.solve(prob, **kw)
    traces, programs = TRACES[0], set(_solve.PROGRAMS.keys())
    changes = [
        {"u0": np.array([3.0, -1.0])},
        {"p": 0.5},
        {"tspan": (1.0, 3.0)},
        {"tspan": (2.0, -1.0)},
    ]
    for i, change in enumerate(changes):
        new = prob.remake(**change)
        t0, t1 = new.tspan
        sol = dk.solve(
            new,
            rtol=10.0 ** -(5 + i),
            atol=10.0 ** -(7 + i),
            **{**kw, "saveat": np.linspace(t0, t1, 5), "dt0": 0.05 * (i + 1)},
        )
        p = change.get("p", 2.0)
        u0 = new.u0
        np.testing.assert_allclose(
            to_numpy(sol.u),
            np.exp(-p * (to_numpy(sol.t) - t0))[:, None] * u0,
            rtol=1e-4,
        )
    assert TRACES[0] == traces
    assert set(_solve.PROGRAMS.keys()) == programs


def test_jit_of_solve_traces_f_once():
    prob = dk.ODEProblem(traced_decay, jnp.array([1.0, 2.0]), (0.0, 1.0), 2.0)

    @jax.jit
    def final(p):
        return dk.solve(prob.remake(p=p), backend="jax").u[-1]

    before = TRACES[0]
    final(1.0)
    after_first = TRACES[0]
    assert after_first > before
    for p in (0.5, 1.5, 3.0):
        np.testing.assert_allclose(
            to_numpy(final(p)), np.exp(-p) * np.array([1.0, 2.0]), rtol=1e-5
        )
    assert TRACES[0] == after_first


def test_the_program_cache_is_a_bounded_lru():
    cache = _solve.Programs(2)
    fn = jnp.sin
    first = cache.get("a", fn)
    cache.get("b", fn)
    assert cache.get("a", fn) is first
    cache.get("c", fn)  # evicts "b"
    assert len(cache) == 2
    assert cache.get("a", fn) is first
    assert _solve.CACHE_SIZE == 128


# ---------------------------------------------------------------------------------
# Transformations.
# ---------------------------------------------------------------------------------


def decay(u, p, t):
    return -p * u


DECAY_TS = np.linspace(0.0, 1.0, 5)


def decay_loss(k, u0=2.0):
    prob = dk.ODEProblem(decay, jnp.array([u0]), (0.0, 1.0), k)
    sol = dk.solve(prob, backend="jax", saveat=DECAY_TS, **TIGHT)
    return jnp.sum(sol.u**2)


def test_grad_matches_finite_differences_and_closed_form():
    k, u0 = 1.3, 2.0
    grad_k, grad_u0 = jax.grad(decay_loss, argnums=(0, 1))(k, u0)
    # loss = sum u0^2 exp(-2 k t): d/dk = sum -2 t u0^2 exp(-2 k t)
    exact_k = np.sum(-2 * DECAY_TS * u0**2 * np.exp(-2 * k * DECAY_TS))
    exact_u0 = np.sum(2 * u0 * np.exp(-2 * k * DECAY_TS))
    eps = 1e-6  # central differences: error ~ eps**2 * |loss'''| ~ 1e-12
    fd_k = (decay_loss(k + eps, u0) - decay_loss(k - eps, u0)) / (2 * eps)
    np.testing.assert_allclose(float(grad_k), float(fd_k), rtol=1e-6)
    np.testing.assert_allclose(float(grad_k), exact_k, rtol=1e-7)
    np.testing.assert_allclose(float(grad_u0), exact_u0, rtol=1e-7)


def test_vmap_over_p():
    ks = jnp.array([0.5, 1.0, 2.0])

    def final(k):
        prob = dk.ODEProblem(decay, jnp.array([1.0]), (0.0, 1.0), k)
        return dk.solve(prob, backend="jax", saveat=DECAY_TS, **TIGHT).u

    us = jax.vmap(final)(ks)
    assert us.shape == (3, 5, 1)
    expected = np.exp(-np.asarray(ks)[:, None] * DECAY_TS)[..., None]
    np.testing.assert_allclose(to_numpy(us), expected, rtol=1e-8)


def test_failure_under_jit_raises_when_the_program_runs():
    prob = dk.ODEProblem(decay, jnp.array([1.0]), (0.0, 1.0), 2.0)
    run = jax.jit(lambda k: dk.solve(prob.remake(p=k), backend="jax", max_steps=3).u)
    with pytest.raises(jax.errors.JaxRuntimeError, match="maximum number of solver"):
        run(2.0)


def test_fixed_step_with_traced_tspan_is_unsupported():
    prob = dk.ODEProblem(decay, jnp.array([1.0]), (0.0, 1.0), 2.0)
    run = jax.jit(
        lambda t1: dk.solve(prob.remake(tspan=(0.0, t1)), "rk4", backend="jax", dt0=0.1)
    )
    with pytest.raises(dk.UnsupportedError, match="concrete values"):
        run(1.0)


# ---------------------------------------------------------------------------------
# Failures.
# ---------------------------------------------------------------------------------


def test_max_steps_returns_partial_solution_with_nan_rows():
    prob = dk.ODEProblem(decay, jnp.array([1.0]), (0.0, 10.0), 2.0)
    kw = {"backend": "jax", "saveat": np.linspace(0.0, 10.0, 11), "max_steps": 5}
    with pytest.raises(dk.SolveError, match="max_steps_reached") as info:
        dk.solve(prob, **kw)
    sol = dk.solve(prob, throw=False, **kw)
    assert info.value.solution.status == sol.status == "max_steps_reached"
    assert not sol.success
    u = to_numpy(sol.u)
    assert u.shape == (11, 1)
    assert sol.stats["naccept"] + sol.stats["nreject"] == 5
    # The message names the time reached; rows before it hold the solution,
    # rows after it are NaN.
    reached = float(str(info.value).split("stopped at t=")[1].split()[0])
    assert 0.0 < reached < 10.0
    before = to_numpy(sol.t) <= reached
    assert np.all(np.isnan(u[~before]))
    np.testing.assert_allclose(
        u[before, 0], np.exp(-2.0 * to_numpy(sol.t)[before]), rtol=1e-5
    )


def blow_up(u, p, t):
    return u * u


def test_blow_up_stops_with_a_failure_status():
    # u' = u^2, u(0) = 1 is 1 / (1 - t): it blows up at t = 1.
    prob = dk.ODEProblem(blow_up, jnp.array([1.0]), (0.0, 2.0))
    sol = dk.solve(prob, backend="jax", saveat=np.linspace(0, 2, 9), throw=False)
    assert sol.status in ("step_size_too_small", "nonfinite")
    reached = float(sol.message.split("stopped at t=")[1].split()[0])
    # the numerical solution blows up within rounding-and-tolerance of t = 1
    assert reached == pytest.approx(1.0, abs=1e-3)
    u = to_numpy(sol.u)[:, 0]
    np.testing.assert_allclose(u[:4], 1 / (1 - np.linspace(0, 2, 9)[:4]), rtol=1e-5)
    assert np.all(np.isnan(u[5:]))
    # far fewer than max_steps: the guard stops it, diffrax alone would spin on
    assert sol.stats["naccept"] + sol.stats["nreject"] < 10_000


def test_fixed_step_overflow_is_nonfinite():
    # Euler's u_{n+1} = u_n + dt0 u_n^2 from 1e10 overflows at the 6th step.
    prob = dk.ODEProblem(blow_up, jnp.array([1e10]), (0.0, 2.0))
    sol = dk.solve(
        prob,
        "euler",
        backend="jax",
        saveat=np.linspace(0, 2, 9),
        dt0=0.25,
        throw=False,
    )
    assert sol.status == "nonfinite"
    u = to_numpy(sol.u)[:, 0]
    finite = np.isfinite(u)
    assert finite[0]
    assert not finite[-1]
    # finite rows come first, then NaN rows; the state is never inf
    assert np.all(np.isnan(u[~finite]))
    assert np.all(finite[: np.argmin(finite)])
    assert "stopped at t=1.25 " in sol.message


def test_bad_rhs_output_is_rejected_at_t0():
    u0 = jnp.array([1.0, 2.0])
    wrong_shape = dk.ODEProblem(lambda u, p, t: u[:1], u0, (0.0, 1.0))
    with pytest.raises(dk.InvalidProblemError, match="shape"):
        dk.solve(wrong_shape, backend="jax")
    wrong_dtype = dk.ODEProblem(lambda u, p, t: u.astype(jnp.float32), u0, (0.0, 1.0))
    with pytest.raises(dk.InvalidProblemError, match="dtype"):
        dk.solve(wrong_dtype, backend="jax")


def test_nonfinite_rhs_at_t0_is_rejected():
    # (1e200)^2 overflows; the structure of test_blow_up_stops_with_a_failure_status
    prob = dk.ODEProblem(blow_up, jnp.array([1e200]), (0.0, 2.0))
    with pytest.raises(dk.InvalidProblemError, match=r"not finite at t0=0\.0"):
        dk.solve(prob, backend="jax", saveat=np.linspace(0, 2, 9), throw=False)


# ---------------------------------------------------------------------------------
# dtype and device.
# ---------------------------------------------------------------------------------


def test_lists_follow_jax_default_float_and_dtype_casts():
    prob = dk.ODEProblem(decay, [1.0], (0.0, 1.0), 2.0)
    sol = dk.solve(prob, backend="jax", saveat=DECAY_TS, **TIGHT)
    assert sol.u.dtype == jnp.float64  # x64 is on in the test session
    sol32 = dk.solve(prob, backend="jax", saveat=DECAY_TS, dtype="float32")
    assert sol32.u.dtype == sol32.t.dtype == jnp.float32
    np.testing.assert_allclose(
        to_numpy(sol32.u)[:, 0], np.exp(-2.0 * DECAY_TS), rtol=1e-5
    )


def test_float64_without_x64_is_unsupported():
    prob = dk.ODEProblem(decay, np.array([1.0]), (0.0, 1.0), 2.0)
    with jax.enable_x64(False):
        assert not jax.config.jax_enable_x64
        with pytest.raises(dk.UnsupportedError, match='"jax_enable_x64", True'):
            dk.solve(prob, backend="jax")  # a float64 NumPy u0
        with pytest.raises(dk.UnsupportedError, match="dtype='float32'"):
            dk.solve(prob.remake(u0=[1.0]), backend="jax", dtype="float64")
        # a list (here a matrix state): JAX's default float
        eye = [[1.0, 0.0], [0.0, 1.0]]
        ts = np.array([0.5, 1.0])
        sol = dk.solve(prob.remake(u0=eye), "rk4", backend="jax", saveat=ts, dt0=0.05)
        assert sol.u.dtype == sol.t.dtype == jnp.float32
        assert sol.u.shape == (2, 2, 2)
        expected = np.exp(-2.0 * ts)[:, None, None] * np.eye(2)
        np.testing.assert_allclose(to_numpy(sol.u), expected, rtol=1e-5)
    assert jax.config.jax_enable_x64  # the flag is back as the session set it


def test_device_cpu_and_unavailable_device():
    sol, _ = linear_solution("tsit5")
    assert sol.u.devices() == {jax.devices()[0]}
    prob = dk.ODEProblem(counted_linear, LINEAR_U0, (0.0, 2.0), LINEAR_A)
    cpu = dk.solve(prob, backend="jax", saveat=SAVES, device="cpu", **TIGHT)
    assert cpu.u.devices() == {jax.devices("cpu")[0]}
    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(dk.UnsupportedError, match="JAX sees: cpu:0"):
            dk.solve(prob, backend="jax", device="cuda:0")


@pytest.mark.gpu
def test_solve_on_cuda_stays_on_the_gpu():
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("no GPU visible to JAX")
    prob = dk.ODEProblem(decay, np.array([1.0]), (0.0, 1.0), 2.0)
    sol = dk.solve(prob, backend="jax", saveat=DECAY_TS, device="cuda", **TIGHT)
    gpu = jax.devices("gpu")[0]
    assert sol.u.devices() == {gpu}
    assert sol.t.devices() == {gpu}
    np.testing.assert_allclose(to_numpy(sol.u)[:, 0], np.exp(-2.0 * DECAY_TS), 1e-8)


def test_describe_lists_devices_backend_and_x64():
    info = jax_backend.BACKEND.describe()
    assert "cpu:0" in info["devices"]
    assert info["default_backend"] == jax.default_backend()
    assert info["x64"] is True
