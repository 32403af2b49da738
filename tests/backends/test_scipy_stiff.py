"""Stiff problems on the SciPy backend: BDF, Radau and LSODA with Jacobians from
automatic differentiation, and gradients through them.

The plain-solve tests run with SciPy alone (there the Jacobian is SciPy's finite
differences, and the tests that need a framework skip); the gradient tests need
jax or torch (`need_gradients`).
"""

from __future__ import annotations

import contextlib
import importlib.util

import numpy as np
import pytest
from conftest import SCIPY_AUTODIFF, need_gradients

import diffeqkit as dk
from diffeqkit import problems
from diffeqkit._solve import build_request

pytest.importorskip("scipy")
from diffeqkit.backends.scipy import (
    _adjoint,
    _autodiff,
    _checkpoint,
    _forward,
    _solve,
    finite_difference_jacobians,
)

pytestmark = pytest.mark.scipy

IMPLICIT = ["bdf", "radau", "lsoda"]
FD = "finite differences"
HAS_JAX = importlib.util.find_spec("jax") is not None
# The engine the default rule picks here (conftest turns JAX's x64 mode on).
DEFAULT_ENGINE = "jax" if HAS_JAX else "torch"


def needs_autodiff() -> None:
    if not SCIPY_AUTODIFF:
        pytest.skip("autodiff Jacobians need jax or torch installed")


def rober(t1: float, *, jac: bool = False) -> dk.ODEProblem:
    return problems.rober(jac=jac).prob.remake(tspan=(0.0, t1))


# ---------------------------------------------------------------------------------
# The plain solve's Jacobian: prob.jac, else autodiff, else finite differences.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", IMPLICIT)
def test_implicit_algs_use_an_autodiff_jacobian_and_say_so(alg):
    needs_autodiff()
    prob = rober(100.0)
    tol = {"rtol": 1e-8, "atol": 1e-14}
    ad = dk.solve(prob, alg, **tol)
    with finite_difference_jacobians():
        fd = dk.solve(prob, alg, **tol)
    exact = dk.solve(rober(100.0, jac=True), alg, **tol)
    assert ad.stats["jacobian"] == DEFAULT_ENGINE
    assert fd.stats["jacobian"] == FD
    assert exact.stats["jacobian"] == "prob.jac"
    assert ad.stats["njev"] > 0
    assert ad.stats["nlu"] > 0
    # nfev counts f only: the difference quotients' columns are gone with AD
    assert ad.stats["nfev"] < fd.stats["nfev"]
    # Exact Jacobians (AD, prob.jac) agree to rounding, so their solutions differ
    # only by rounding amplified over ~1000 steps; FD Jacobians change Newton's
    # iterates and so the steps: agreement to the tolerance (rtol=1e-8; 1e-6
    # leaves room for the global error of ~100 rtol measured on ROBER).
    np.testing.assert_allclose(ad.u, exact.u, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(ad.u, fd.u, rtol=1e-6, atol=1e-13)


def test_without_a_framework_scipy_builds_the_jacobian_by_differences(monkeypatch):
    monkeypatch.setattr(_autodiff, "_installed", lambda module: False)
    sol = dk.solve(rober(1.0), "bdf", rtol=1e-6, atol=1e-10)
    assert sol.success
    assert sol.stats["jacobian"] == FD


def test_prob_jac_comes_first_even_with_a_framework():
    sol = dk.solve(rober(1.0, jac=True), "radau", rtol=1e-6, atol=1e-10)
    assert sol.stats["jacobian"] == "prob.jac"


def test_finite_differences_can_be_forced_over_prob_jac_and_end_with_the_block():
    with finite_difference_jacobians():
        inside = dk.solve(rober(1.0, jac=True), "bdf", rtol=1e-6, atol=1e-10)
    after = dk.solve(rober(1.0, jac=True), "bdf", rtol=1e-6, atol=1e-10)
    assert inside.stats["jacobian"] == FD
    assert after.stats["jacobian"] == "prob.jac"


def test_explicit_algs_report_no_jacobian():
    sol = dk.solve(rober(1e-4), "tsit5", rtol=1e-6, atol=1e-10)
    assert "jacobian" not in sol.stats


def test_the_sensealgs_autodiff_option_picks_the_plain_solves_engine():
    pytest.importorskip("torch")
    sol = dk.solve(
        rober(1.0), "bdf", rtol=1e-6, atol=1e-10, sensealg=dk.ForwardMode("torch")
    )
    assert sol.stats["jacobian"] == "torch"


def test_an_autodiff_option_naming_a_missing_framework_raises(monkeypatch):
    monkeypatch.setattr(_autodiff, "_installed", lambda module: False)
    with pytest.raises(dk.UnsupportedError, match=r"autodiff='torch' needs torch"):
        dk.solve(rober(1.0), "bdf", sensealg=dk.ForwardMode("torch"))


@pytest.mark.jax
def test_jax_jacobian_is_traced_once_per_problem_structure():
    pytest.importorskip("jax")
    traces = {"n": 0}
    rhs = problems.rober_rhs

    def f(u, p, t):
        if not isinstance(u, np.ndarray):  # a JAX tracer: the Jacobian is traced
            traces["n"] += 1
        return rhs(u, p, t)

    base = problems.rober().prob
    prob = dk.ODEProblem(f, base.u0, (0.0, 1.0), base.p)
    first = dk.solve(prob, "bdf", rtol=1e-6, atol=1e-10)
    traced = traces["n"]
    dk.solve(prob.remake(p=1.1 * base.p), "bdf", rtol=1e-6, atol=1e-10)
    dk.solve(prob, "radau", rtol=1e-6, atol=1e-10)
    assert first.stats["jacobian"] == "jax"
    assert traced > 0
    assert traces["n"] == traced, "a new p, solve or alg re-traced the Jacobian"


# ---------------------------------------------------------------------------------
# The IVP test set's stiff problems against their reference values.
# ---------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------
# Gradients of a loss of ROBER w.r.t. its rate constants, against finite
# differences of dk.solve.
# ---------------------------------------------------------------------------------

# The loss weights u2 (~1e-5) by 1e4 so that all three species count.
WEIGHTS = np.array([1.0, 1e4, 1.0])
# Over [0, 1] the whole stiff transient is inside: u2 rises to its peak by 1e-3
# and the fast rate grows from 0.04 to ~1e4.
LONG = (1.0, np.array([1e-2, 0.1, 1.0]))


def loss(prob: dk.ODEProblem, ts: np.ndarray) -> float:
    # LSODA at rtol=1e-12 agrees with Radau at the same tolerance to 2e-8
    # relative on these gradients, at a hundredth of the time
    sol = dk.solve(prob, "lsoda", saveat=ts, rtol=1e-12, atol=1e-20)
    return float(np.sum(sol.u * WEIGHTS))


def fd_gradient(span: tuple[float, np.ndarray]) -> np.ndarray:
    """p * dL/dp by central differences in log p (relative step 1e-4: truncation
    ~1e-8 relative, solver noise at rtol=1e-12 ~1e-8 / 1e-4 = 1e-8 too)."""
    t1, ts = span
    prob = rober(t1)
    out = np.empty(3)
    for j in range(3):
        up, down = prob.p.copy(), prob.p.copy()
        up[j] *= 1 + 1e-4
        down[j] *= 1 - 1e-4
        out[j] = (loss(prob.remake(p=up), ts) - loss(prob.remake(p=down), ts)) / 2e-4
    return out


@pytest.fixture(scope="module")
def fd_long() -> np.ndarray:
    return fd_gradient(LONG)


def rober_gradient(span, alg: str, sensealg: dk.SensitivityAlgorithm):
    t1, ts = span
    prob = rober(t1)
    sol, pullback = dk.vjp(
        prob, alg, saveat=ts, rtol=1e-8, atol=1e-14, sensealg=sensealg
    )
    grads = pullback(np.tile(WEIGHTS, (ts.size, 1)))
    return sol, grads.p * prob.p


# The scaled gradients are O(0.5) but for k3 (~5e-2 over [0, 1], ~6e-4 on the
# onset); measured errors against the FD reference are <= 5e-7 relative
# (CheckpointedAdjoint with bdf, k3) and ~5e-9 for ForwardMode, the reference's
# own ~2e-8: 1e-5 relative is 20x the worst; atol only guards exact zeros.
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-12

LONG_CASES = [
    pytest.param("bdf", dk.ForwardMode(), id="ForwardMode-bdf"),
    pytest.param("radau", dk.ForwardMode(), id="ForwardMode-radau"),
    pytest.param("lsoda", dk.ForwardMode(), id="ForwardMode-lsoda"),
    # Default adjoint tolerances: lambda is O(1e4), so the adjoint's atol is the
    # forward 1e-14 scaled by the cotangent's magnitude (`adjoint_atol`); the
    # forward atol itself made BDF stall.
    pytest.param("bdf", dk.CheckpointedAdjoint(), id="Checkpointed-bdf"),
    pytest.param("lsoda", dk.CheckpointedAdjoint(), id="Checkpointed-lsoda"),
    # The interpolating adjoint; a backsolve (refused with implicit algs) failed
    # past t ~ 0.1 here.
    pytest.param("bdf", dk.InterpolatingAdjoint(), id="Interpolating-bdf"),
    pytest.param("radau", dk.InterpolatingAdjoint(), id="Interpolating-radau"),
]


@pytest.mark.parametrize(("alg", "sensealg"), LONG_CASES)
def test_rober_rate_constant_gradients_match_finite_differences(alg, sensealg, fd_long):
    need_gradients("scipy")
    sol, scaled = rober_gradient(LONG, alg, sensealg)
    np.testing.assert_allclose(scaled, fd_long, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert sol.stats["jacobian"] in ("jax", "torch")


class _Spy:
    """Records the engine's Jacobian calls and the backward solvers built."""

    def __init__(self) -> None:
        self.jacobians: list[float] = []
        self.solvers: list = []


def test_interpolating_adjoint_solves_backward_implicitly_with_autodiff_jacobians(
    monkeypatch,
):
    need_gradients("scipy")
    spy = _Spy()
    method = _solve.ALGS["bdf"]

    class Spied(method.solver):
        def __init__(self, fun, t0, y0, t_bound, **options):
            super().__init__(fun, t0, y0, t_bound, **options)
            if t_bound < t0:  # a backward piece
                spy.solvers.append(self)

    jacobian = _checkpoint._jacobian

    def spied_jacobian(problem, engine, state):
        jac = jacobian(problem, engine, state)

        def wrapped(t, y):
            spy.jacobians.append(t)
            return jac(t, y)

        return wrapped

    monkeypatch.setitem(_solve.ALGS, "bdf", _replace_solver(method, Spied))
    monkeypatch.setattr(_checkpoint, "_jacobian", spied_jacobian)
    rober_gradient(LONG, "bdf", dk.InterpolatingAdjoint())
    assert spy.solvers, "no backward solve used BDF"
    njev = sum(s.njev for s in spy.solvers)
    # every Jacobian of the backward BDF solves is the engine's: none by SciPy's
    # differences (which would not pass through the spy)
    assert njev > 0
    assert len(spy.jacobians) == njev


def _replace_solver(method, solver):
    import dataclasses

    return dataclasses.replace(method, solver=solver)


# ---------------------------------------------------------------------------------
# The augmented systems' Jacobians.
# ---------------------------------------------------------------------------------

ENGINES = [
    pytest.param("jax", id="jax", marks=pytest.mark.jax),
    pytest.param("torch", id="torch", marks=pytest.mark.torch),
]


def numerical_jacobian(fun, t, y):
    """Central differences of fun(t, .) at y (relative step 1e-6)."""
    cols = []
    for j in range(y.size):
        h = 1e-6 * max(1.0, abs(y[j]))
        up, down = y.copy(), y.copy()
        up[j] += h
        down[j] -= h
        cols.append((fun(t, up) - fun(t, down)) / (2 * h))
    return np.stack(cols, axis=1)


def engine_for(name: str, alg: str = "bdf"):
    pytest.importorskip(name)
    bp = problems.rober()
    prob = bp.prob.remake(tspan=(0.0, 1.0))
    req = build_request(prob, alg, backend="scipy", sensealg=dk.ForwardMode(name))
    problem = _solve.prepare(req)
    layout = _autodiff.Layout.of(problem.p)
    return problem, _autodiff.make_engine(problem, layout)


# A state past ROBER's onset, with sensitivities / adjoints of realistic size.
U = np.array([0.96, 3.5e-5, 0.04])


@pytest.mark.parametrize("name", ENGINES)
def test_forward_sensitivity_jacobian_is_the_exact_block_triangular_one(name):
    problem, engine = engine_for(name)
    n, k = 3, 6
    S = np.random.default_rng(0).normal(size=(n, k))
    y = np.concatenate([U, S.reshape(-1)])
    J = np.asarray(_forward._jacobian(problem, engine, k)(0.5, y))
    # torch's coupling block is a forward difference (error ~1e-8 relative of
    # entries up to ~6e7); the reference's central differences ~1e-9 relative
    np.testing.assert_allclose(
        J, numerical_jacobian(engine.forward, 0.5, y), rtol=1e-5, atol=1e-3
    )


@pytest.mark.parametrize("name", ENGINES)
def test_backsolve_jacobian_is_the_exact_block_triangular_one(name):
    problem, engine = engine_for(name)
    lam = np.array([1.0, 1e4, 1.0])
    y = np.concatenate([U, lam, np.zeros(3)])
    J = _adjoint._jacobian(problem, engine)(0.5, y)
    J = J.toarray() if hasattr(J, "toarray") else np.asarray(J)
    # as above: the entries reach ~6e11 (k2 * lambda), so atol is relative to that
    np.testing.assert_allclose(
        J, numerical_jacobian(engine.backsolve, 0.5, y), rtol=1e-5, atol=1e-2
    )


@pytest.mark.parametrize(
    "forced", [False, True], ids=["autodiff", "finite-differences"]
)
def test_forward_mode_reports_what_built_the_augmented_jacobian(forced):
    need_gradients("scipy")
    block = finite_difference_jacobians() if forced else contextlib.nullcontext()
    with block:
        sol, _ = dk.vjp(
            rober(1.0),
            "bdf",
            saveat=LONG[1],
            rtol=1e-6,
            atol=1e-10,
            sensealg=dk.ForwardMode(),
        )
    assert sol.stats["jacobian"] == (FD if forced else DEFAULT_ENGINE)


def branchy(u, p, t):
    if t > 0.5:  # a Python branch on t: JAX cannot trace it
        return -2.0 * u
    return -u


def test_an_f_autodiff_cannot_trace_falls_back_to_finite_differences():
    needs_autodiff()
    sol = dk.solve(dk.ODEProblem(branchy, np.ones(2), (0.0, 1.0)), "bdf")
    assert sol.success
    # torch runs f eagerly (t a float) and so differentiates it
    assert sol.stats["jacobian"] == (FD if HAS_JAX else "torch")
    # exp(-0.5 - 2 * 0.5); BDF at the default rtol=1e-6 is within ~1e-5 of it
    np.testing.assert_allclose(sol.u[-1], np.exp(-1.5), rtol=1e-4)
