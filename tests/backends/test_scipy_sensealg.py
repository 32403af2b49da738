"""The SciPy backend's gradient methods: ForwardMode, ContinuousAdjoint and
CheckpointedAdjoint, on the engines that differentiate f (jax, torch, prob.jac).

Engine-specific tests skip when their framework is missing (the nox session
``tests(scipy)`` installs SciPy alone); the engine choice and its errors are
tested there too, with the function that finds frameworks monkeypatched.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest
from problems import (
    LINEAR_A,
    LINEAR_U0,
    linear,
    linear_grads,
    linear_problem,
    lotka_volterra,
)

import diffeqkit as dk
from diffeqkit._saveat import step_grid
from diffeqkit._tableaux import get_tableau

pytest.importorskip("scipy")
scipy_backend = pytest.importorskip("diffeqkit.backends.scipy")
from diffeqkit.backends.scipy import _autodiff, _checkpoint  # noqa: E402

pytestmark = pytest.mark.scipy

SENSEALGS = {
    "ForwardMode": dk.ForwardMode,
    "ContinuousAdjoint": dk.ContinuousAdjoint,
    "InterpolatingAdjoint": dk.InterpolatingAdjoint,
    "CheckpointedAdjoint": dk.CheckpointedAdjoint,
}
# The backsolve is refused with implicit algs (tests/test_registry.py).
IMPLICIT_SENSEALGS = [s for s in SENSEALGS if s != "ContinuousAdjoint"]
ENGINES = [
    pytest.param("jax", id="jax", marks=pytest.mark.jax),
    pytest.param("torch", id="torch", marks=pytest.mark.torch),
]
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def engine(name: str) -> str:
    """Skip unless the framework of engine `name` is installed."""
    pytest.importorskip(name)
    return name


def sensealg(name: str, autodiff: str | None = None, **options):
    return SENSEALGS[name](autodiff=autodiff, **options)


def flat(grads) -> np.ndarray:
    return np.concatenate([np.ravel(grads.u0), np.ravel(grads.p)])


# ---------------------------------------------------------------------------------
# The tables.
# ---------------------------------------------------------------------------------


def test_reverse_through_solver_raises_naming_the_alternatives():
    with pytest.raises(
        dk.UnsupportedError,
        match=r"sensealg=dk\.ReverseThroughSolver\(\) is not available on "
        r"backend='scipy'\. scipy offers: dk\.ForwardMode\(\), "
        r"dk\.ContinuousAdjoint\(\), dk\.InterpolatingAdjoint\(\), "
        r"dk\.CheckpointedAdjoint\(\)\. "
        r"dk\.ReverseThroughSolver\(\) is offered by: jax, torch\.",
    ):
        dk.vjp(linear_problem(), backend="scipy", sensealg=dk.ReverseThroughSolver())


@pytest.mark.parametrize("name", list(SENSEALGS))
def test_solve_with_a_sensealg_is_the_plain_solve(name):
    ts = np.linspace(0.0, 2.0, 6)
    plain = dk.solve(linear_problem(), backend="scipy", saveat=ts)
    # autodiff='jac' on a problem without jac would raise if any engine were built
    sol = dk.solve(
        linear_problem(), backend="scipy", saveat=ts, sensealg=sensealg(name, "jac")
    )
    np.testing.assert_array_equal(sol.u, plain.u)
    assert sol.stats == plain.stats
    assert sol.sensealg == sensealg(name, "jac")


# ---------------------------------------------------------------------------------
# Closed forms.
# ---------------------------------------------------------------------------------

# alg -> (extra solve arguments, absolute tolerance on O(1) gradients, why).
ALGS = {
    # Measured <= 4e-11 (tsit5, dopri5) at rtol 1e-10: the sensitivities are
    # solved to the solution's own accuracy; 1e-8 leaves two orders of margin.
    "tsit5": ({}, 1e-8),
    "dopri5": ({}, 1e-8),
    # Measured 1.4e-9 for CheckpointedAdjoint: between its long steps dopri8's
    # dense output (of order 5 only) feeds u(t) to the adjoint; 1e-8 still holds.
    "dopri8": ({}, 1e-8),
    # Fixed step h = 0.01: the global error of rk4 is ~C h^4 (measured 7e-9, the
    # same for the solution and its sensitivities); 1e-7 bounds it with margin.
    "rk4": ({"dt0": 0.01}, 1e-7),
}


@pytest.mark.parametrize("alg", list(ALGS))
@pytest.mark.parametrize("autodiff", ENGINES)
@pytest.mark.parametrize("name", list(SENSEALGS))
def test_linear_gradients_match_the_matrix_exponential(name, autodiff, alg):
    engine(autodiff)
    extra, tol = ALGS[alg]
    ts = np.linspace(0.0, 2.0, 6)
    cot = np.random.default_rng(0).normal(size=(6, 2))
    # Backward tolerances mean nothing with constant steps (and are refused).
    backward = {} if name == "ForwardMode" or "dt0" in extra else TIGHT
    sol, pullback = dk.vjp(
        linear_problem(),
        alg,
        backend="scipy",
        saveat=ts,
        sensealg=sensealg(name, autodiff, **backward),
        **TIGHT,
        **extra,
    )
    grads = pullback(cot)
    du0, dA = linear_grads(ts, cot)
    np.testing.assert_allclose(grads.u0, du0, rtol=0, atol=tol)
    np.testing.assert_allclose(grads.p, dA, rtol=0, atol=tol)
    assert grads.u0.shape == (2,)
    assert grads.p.shape == (2, 2)
    assert sol.sensealg == sensealg(name, autodiff, **backward)
    assert sol.success


# BDF's global error at rtol 1e-10 is several times rtol (variable order, error
# per step not per unit step): measured 1.4e-9; radau and lsoda ~1e-10.
IMPLICIT_TOL = 1e-8


@pytest.mark.parametrize("alg", ["bdf", "radau", "lsoda"])
@pytest.mark.parametrize("name", IMPLICIT_SENSEALGS)
def test_implicit_algs_give_gradients_too(name, alg):
    engine("jax")
    ts = np.linspace(0.0, 2.0, 3)
    cot = np.random.default_rng(1).normal(size=(3, 2))
    # radau is slow in SciPy at rtol 1e-10 (a plain solve takes ~0.7 s); at 1e-9
    # its error is ~1e-10 still.
    tol = {"rtol": 1e-9, "atol": 1e-11} if alg == "radau" else TIGHT
    options = {} if name == "ForwardMode" else tol
    _, pullback = dk.vjp(
        linear_problem(),
        alg,
        backend="scipy",
        saveat=ts,
        sensealg=sensealg(name, "jax", **options),
        **tol,
    )
    grads = pullback(cot)
    du0, dA = linear_grads(ts, cot)
    np.testing.assert_allclose(grads.u0, du0, rtol=0, atol=IMPLICIT_TOL)
    np.testing.assert_allclose(grads.p, dA, rtol=0, atol=IMPLICIT_TOL)


# ---------------------------------------------------------------------------------
# Fixed steps: ForwardMode is the derivative of the computed solution.
# ---------------------------------------------------------------------------------


def rk_replay(alg: str, grid: np.ndarray, u0: np.ndarray, A: np.ndarray) -> dict:
    """`alg`'s steps of u' = A u on `grid` (complex-safe, for complex step)."""
    tab = get_tableau(alg)
    u = u0
    out = {float(grid[0]): u}
    for t, t_next in itertools.pairwise(grid):
        h = t_next - t
        ks: list = []
        for i in range(tab.n_stages):
            ks.append(A @ (u + h * sum(tab.a[i, j] * ks[j] for j in range(i))))
        u = u + h * sum(b * k for b, k in zip(tab.b, ks, strict=True))
        out[float(t_next)] = u
    return out


@pytest.mark.parametrize("alg", ["euler", "midpoint", "heun", "rk4"])
def test_fixed_step_forward_mode_is_the_derivative_of_the_steps(alg):
    engine("jax")
    ts = np.array([0.0, 0.35, 1.0])
    dt0 = 0.1
    cot = np.random.default_rng(6).normal(size=(3, 2))
    _, pullback = dk.vjp(
        linear_problem((0.0, 1.0)),
        alg,
        backend="scipy",
        saveat=ts,
        dt0=dt0,
        sensealg=dk.ForwardMode(autodiff="jax"),
    )
    grads = pullback(cot)
    grid = step_grid(0.0, 1.0, dt0, ts)
    h = 1e-30  # complex step: no subtraction, exact to rounding

    def loss(u0, A):
        steps = rk_replay(alg, grid, u0, A)
        return sum(np.sum(c * steps[float(t)]) for t, c in zip(ts, cot, strict=True))

    u0 = LINEAR_U0.astype(complex)
    A = LINEAR_A.astype(complex)
    du0 = [loss(u0 + 1j * h * e, A).imag / h for e in np.eye(2)]
    dA = np.array(
        [
            [loss(u0, A + 1j * h * np.outer(ei, ej)).imag / h for ej in np.eye(2)]
            for ei in np.eye(2)
        ]
    )
    # Stepping the sensitivity equations with the method is differentiating the
    # method's steps: equal to rounding (O(1) values, ~40 steps).
    np.testing.assert_allclose(grads.u0, du0, rtol=0, atol=1e-13)
    np.testing.assert_allclose(grads.p, dA, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------
# Lotka-Volterra: finite differences, agreement.
# ---------------------------------------------------------------------------------

LV_P = np.array([1.5, 1.0, 3.0, 1.0])
LV_U0 = np.array([1.0, 1.0])
LV_TS = np.linspace(0.0, 5.0, 11)
LV_COT = np.random.default_rng(7).normal(size=(11, 2))


def lv_problem(u0=LV_U0, p=LV_P) -> dk.ODEProblem:
    return dk.ODEProblem(lotka_volterra, u0, (0.0, 5.0), p)


def lv_loss(u0, p) -> float:
    sol = dk.solve(
        lv_problem(u0, p),
        "dopri8",
        backend="scipy",
        saveat=LV_TS,
        rtol=1e-13,
        atol=1e-13,
    )
    return float(np.sum(LV_COT * sol.u))


@pytest.fixture(scope="module")
def lv_fd() -> np.ndarray:
    """Central differences of sum(LV_COT * u) (h = 1e-5 relative: truncation
    ~h^2 = 1e-10, rounding ~1e-13/h = 1e-8), u0 then p."""
    x0 = np.concatenate([LV_U0, LV_P])
    g = np.zeros_like(x0)
    for i in range(x0.size):
        h = 1e-5 * max(1.0, abs(x0[i]))
        up, down = x0.copy(), x0.copy()
        up[i] += h
        down[i] -= h
        g[i] = (lv_loss(up[:2], up[2:]) - lv_loss(down[:2], down[2:])) / (2 * h)
    return g


@pytest.mark.parametrize("autodiff", ENGINES)
@pytest.mark.parametrize("name", list(SENSEALGS))
def test_lotka_volterra_gradient_matches_finite_differences(name, autodiff, lv_fd):
    engine(autodiff)
    _, pullback = dk.vjp(
        lv_problem(),
        "tsit5",
        backend="scipy",
        saveat=LV_TS,
        sensealg=sensealg(name, autodiff, **({} if name == "ForwardMode" else TIGHT)),
        **TIGHT,
    )
    # FD error ~1e-8 (see the fixture) and solver error ~1e-9 on gradients of
    # size 1-10: 1e-6 relative separates right from wrong clearly.
    np.testing.assert_allclose(flat(pullback(LV_COT)), lv_fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(SENSEALGS))
def test_jax_and_torch_engines_agree(name):
    engine("jax")
    engine("torch")
    grads = []
    for autodiff in ("jax", "torch"):
        _, pullback = dk.vjp(
            lv_problem(),
            "tsit5",
            backend="scipy",
            saveat=LV_TS,
            sensealg=sensealg(name, autodiff),
            rtol=1e-8,
            atol=1e-10,
        )
        grads.append(flat(pullback(LV_COT)))
    # The same systems evaluated by two frameworks: the values differ in the
    # last bits only, the step sequences are then identical, and so are the
    # gradients to ~1e-13 (error control amplifies rounding only near a
    # rejected step's threshold).
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(SENSEALGS))
def test_torch_engine_on_a_larger_state_agrees_with_jax(name):
    engine("jax")
    engine("torch")
    n = 10  # 110 sensitivity columns: a batched Jacobian, not column by column
    rng = np.random.default_rng(9)
    A = -np.eye(n) + 0.3 * rng.normal(size=(n, n))
    prob = dk.ODEProblem(linear, np.ones(n), (0.0, 1.0), A)
    cot = rng.normal(size=(2, n))
    grads = []
    for autodiff in ("jax", "torch"):
        _, pullback = dk.vjp(
            prob, backend="scipy", sensealg=sensealg(name, autodiff), **TIGHT
        )
        grads.append(flat(pullback(cot)))
    # As for the small state above: the same steps, gradients equal to rounding
    # (measured 1e-15).
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("checkpoints", [1, 3, None, 1000])
def test_checkpoint_counts_give_the_same_gradient(checkpoints):
    engine("jax")
    _, pullback = dk.vjp(
        lv_problem(),
        "tsit5",
        backend="scipy",
        saveat=LV_TS,
        sensealg=dk.CheckpointedAdjoint(checkpoints=checkpoints, autodiff="jax"),
        **TIGHT,
    )
    _, reference = dk.vjp(
        lv_problem(),
        "tsit5",
        backend="scipy",
        saveat=LV_TS,
        sensealg=dk.CheckpointedAdjoint(checkpoints=1, autodiff="jax"),
        **TIGHT,
    )
    # The forward states are the same to the bit (see the next test); only the
    # backward solve restarts at the segment boundaries: its error, ~1e-10.
    np.testing.assert_allclose(
        flat(pullback(LV_COT)), flat(reference(LV_COT)), rtol=1e-8, atol=1e-9
    )


@pytest.mark.parametrize(
    ("alg", "extra"),
    [("tsit5", {}), ("dopri8", {}), ("rk4", {"dt0": 0.05}), ("bdf", {})],
)
def test_recomputed_segments_repeat_the_forward_solve(alg, extra):
    from diffeqkit._solve import build_request
    from diffeqkit.backends.scipy import _solve

    req = build_request(
        lv_problem(),
        alg,
        backend="scipy",
        saveat=LV_TS,
        sensealg=dk.CheckpointedAdjoint(checkpoints=4),
        **extra,
    )
    problem = _solve.prepare(req)
    recorder = _checkpoint._Recorder(problem, 4)
    sol = _solve.solve(problem, recorder)
    points = recorder.points
    # one state per segment, each the first step ending at or after its cut
    cuts = [0.0, 1.25, 2.5, 3.75]
    assert len(points) == len(cuts)
    assert all(cp.t >= cut for cp, cut in zip(points, cuts, strict=True))
    dense = _checkpoint._recompute(problem, points[1], 5.0)
    later = points[1].t <= LV_TS
    got = np.stack([dense(t) for t in LV_TS[later]])
    if alg == "bdf":
        # BDF's history cannot be restored: a fresh start repeats the solution
        # to the tolerances (rtol 1e-6) only.
        np.testing.assert_allclose(got, sol.u[later], rtol=1e-4)
        return
    # Runge-Kutta restarts with the step size and stops of the forward solve:
    # the same steps, so later checkpoints are step ends of the recomputation...
    assert points[2].t in dense.ts
    assert points[3].t in dense.ts
    # ...and the saved values agree to the rounding of the dense output at a
    # step's end (the forward solve saves the step's state there).
    np.testing.assert_allclose(got, sol.u[later], rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------------------------
# p as a pytree.
# ---------------------------------------------------------------------------------


class Params(NamedTuple):
    rate: np.ndarray
    forcing: tuple
    unused: object
    power: int


def nested(u, p, t):
    return -p.rate * u**p.power + p.forcing[0] * p.forcing[1]["b"]


@pytest.mark.parametrize("autodiff", ENGINES)
@pytest.mark.parametrize("name", list(SENSEALGS))
def test_pytree_p_gets_gradients_in_its_own_structure(name, autodiff):
    engine(autodiff)
    p = Params(
        rate=np.array([0.7, 1.1]),
        forcing=(0.3, {"b": np.array(2.0)}),
        unused=None,
        power=1,
    )
    prob = dk.ODEProblem(nested, np.array([1.0, -1.0]), (0.0, 1.0), p)
    _, pullback = dk.vjp(
        prob, backend="scipy", sensealg=sensealg(name, autodiff), **TIGHT
    )
    cot = np.array([[0.0, 0.0], [1.0, 1.0]])  # L = sum(u(1))
    g = pullback(cot)
    # u_i(1) = e^{-k_i} u0_i + c (1 - e^{-k_i}) / k_i with c = a*b.
    k, a, b, u0 = np.array([0.7, 1.1]), 0.3, 2.0, np.array([1.0, -1.0])
    e = np.exp(-k)
    d_rate = -e * u0 + a * b * (e * k - (1 - e)) / k**2
    dc = np.sum((1 - e) / k)
    assert isinstance(g.p, Params)
    assert isinstance(g.p.forcing, tuple)
    assert isinstance(g.p.forcing[1], dict)
    assert g.p.unused is None
    # an integer leaf is a setting, not a parameter: zeros of its shape
    np.testing.assert_array_equal(g.p.power, np.zeros(()))
    # The solution's relative error at rtol 1e-10 is ~1e-10; O(1) gradients.
    np.testing.assert_allclose(g.u0, e, rtol=1e-8)
    np.testing.assert_allclose(g.p.rate, d_rate, rtol=1e-8)
    assert float(g.p.forcing[0]) == pytest.approx(dc * b, rel=1e-8)
    assert float(g.p.forcing[1]["b"]) == pytest.approx(dc * a, rel=1e-8)


def test_integer_leaves_are_settings_held_constant():
    engine("jax")

    def powered(u, p, t):
        return -p["k"] * u ** p["power"]

    for power, expected in [(1, -np.exp(-1.0)), (2, -0.25)]:
        # u' = -k u^power, u(0) = 1, k = 1: d u(1) / dk = -e^{-1} (power 1) and
        # -1 / (1 + k)^2 = -1/4 (power 2, u = 1 / (1 + k t)).
        prob = dk.ODEProblem(
            powered, np.array([1.0]), (0.0, 1.0), {"k": 1.0, "power": power}
        )
        _, pullback = dk.vjp(
            prob, backend="scipy", sensealg=dk.ForwardMode(autodiff="jax"), **TIGHT
        )
        g = pullback(np.array([[0.0], [1.0]]))
        # ~1e-10 relative solver error on O(1) values.
        assert float(g.p["k"]) == pytest.approx(expected, rel=1e-8)


# ---------------------------------------------------------------------------------
# The engines: choice, caching, prob.jac, errors.
# ---------------------------------------------------------------------------------


@pytest.mark.jax
@pytest.mark.parametrize("name", list(SENSEALGS))
def test_jax_engine_does_not_retrace_f_for_new_p_values(name):
    engine("jax")
    traces = {"n": 0}

    def counted(u, p, t):
        if not isinstance(u, np.ndarray):  # a JAX tracer: the engine traces f
            traces["n"] += 1
        return p @ u

    ts = np.linspace(0.0, 2.0, 3)
    cot = np.ones((3, 2))

    def gradients(A):
        prob = dk.ODEProblem(counted, LINEAR_U0, (0.0, 2.0), A)
        _, pullback = dk.vjp(
            prob, backend="scipy", saveat=ts, sensealg=sensealg(name, "jax")
        )
        # a pullback may be called again
        return flat(pullback(cot)), flat(pullback(cot))

    first, twice = gradients(LINEAR_A)
    traced = traces["n"]
    other, _ = gradients(1.01 * LINEAR_A)
    assert traced > 0
    assert traces["n"] == traced, "a new value of p re-traced f"
    # a second call repeats the first (the backward solves are deterministic)
    np.testing.assert_array_equal(twice, first)
    assert not np.allclose(first, other)


def test_engine_cache_is_bounded_and_least_recently_used_goes_first():
    cache = _autodiff._Cache(2)
    built = []
    for key in ["a", "b", "a", "c", "b"]:
        cache.get(key, lambda key=key: built.append(key) or key)
    # "a" was used after "b", so "c" evicted "b"; "b" was then built again.
    assert built == ["a", "b", "c", "b"]
    assert len(cache) == 2


def linear_closed(u, p, t):
    return LINEAR_A @ u


def linear_jac(u, p, t):
    return LINEAR_A


@pytest.mark.parametrize("name", list(SENSEALGS))
def test_jac_engine_gives_u0_gradients_without_any_framework(name, monkeypatch):
    monkeypatch.setattr(_autodiff, "_installed", lambda module: False)
    prob = dk.ODEProblem(linear_closed, LINEAR_U0, (0.0, 2.0), jac=linear_jac)
    ts = np.linspace(0.0, 2.0, 6)
    cot = np.random.default_rng(8).normal(size=(6, 2))
    # autodiff=None falls back to prob.jac when neither framework can be used.
    _, pullback = dk.vjp(prob, backend="scipy", saveat=ts, sensealg=sensealg(name))
    grads = pullback(cot)
    du0, _ = linear_grads(ts, cot)
    # As in the closed-form tests, at the default rtol 1e-6: gradient error
    # ~1e-6 on O(1) values.
    np.testing.assert_allclose(grads.u0, du0, rtol=0, atol=1e-5)
    assert grads.p is None


def test_jac_engine_refuses_parameters():
    prob = dk.ODEProblem(linear, LINEAR_U0, (0.0, 2.0), LINEAR_A, jac=linear_jac)
    with pytest.raises(
        dk.UnsupportedError,
        match=r"autodiff='jac' gives gradients with respect to u0 only \(prob\.jac "
        r"is df/du; nothing here gives df/dp\), but p has 4 parameter\(s\)\. For "
        r"gradients with respect to p use autodiff='jax' or autodiff='torch' "
        r"\(pip install \"diffeqkit\[jax\]\"",
    ):
        dk.vjp(prob, backend="scipy", sensealg=dk.ForwardMode(autodiff="jac"))


def test_jac_engine_without_jac_raises():
    with pytest.raises(
        dk.UnsupportedError,
        match=r"autodiff='jac' uses prob\.jac for df/du, but this problem has no "
        r"jac\. Pass jac=\.\.\. to dk\.ODEProblem",
    ):
        dk.vjp(
            linear_problem(),
            backend="scipy",
            sensealg=dk.ContinuousAdjoint(autodiff="jac"),
        )


def test_no_engine_raises_with_the_pip_lines(monkeypatch):
    monkeypatch.setattr(_autodiff, "_installed", lambda module: False)
    with pytest.raises(
        dk.UnsupportedError,
        match=r"backend='scipy' differentiates f\(u, p, t\) with JAX or PyTorch, "
        r"and neither can be used here \(jax is not installed; torch is not "
        r"installed\)\. Run: pip install \"diffeqkit\[jax\]\" or pip install "
        r"\"diffeqkit\[torch\]\"; or pass jac=\.\.\. to dk\.ODEProblem",
    ):
        dk.vjp(linear_problem(), backend="scipy", sensealg=dk.CheckpointedAdjoint())


def test_an_engine_asked_for_but_not_installed_raises(monkeypatch):
    monkeypatch.setattr(_autodiff, "_installed", lambda module: False)
    with pytest.raises(
        dk.UnsupportedError,
        match=r"autodiff='torch' needs torch, which is not installed\. Run: pip "
        r"install \"diffeqkit\[torch\]\"",
    ):
        dk.vjp(
            linear_problem(), backend="scipy", sensealg=dk.ForwardMode(autodiff="torch")
        )


def test_value_and_grad_without_a_framework_raises(monkeypatch):
    monkeypatch.setattr(_autodiff, "_installed", lambda module: False)
    prob = dk.ODEProblem(linear_closed, LINEAR_U0, (0.0, 2.0), jac=linear_jac)

    def loss(sol):
        return dk.array_namespace(sol.u).sum(sol.u)

    with pytest.raises(
        dk.UnsupportedError,
        match=r"dk\.value_and_grad on backend='scipy' differentiates loss\(sol\) "
        r"with JAX or PyTorch.*call dk\.vjp and pass the cotangent",
    ):
        dk.value_and_grad(loss, prob, backend="scipy", sensealg=dk.ForwardMode())


@pytest.mark.jax
def test_jax_without_x64_is_refused_and_skipped_by_the_default_rule():
    engine("jax")
    # In a subprocess: conftest turns x64 on in this one.
    code = """
import numpy as np
import diffeqkit as dk
from diffeqkit.backends.scipy import _autodiff

prob = dk.ODEProblem(lambda u, p, t: -p * u, np.array([1.0]), (0.0, 1.0), np.array(2.0))
try:
    dk.vjp(prob, backend="scipy", sensealg=dk.ForwardMode(autodiff="jax"))
except dk.UnsupportedError as err:
    print("EXPLICIT", err)
_autodiff._installed = lambda module: module == "jax"
try:
    dk.vjp(prob, backend="scipy", sensealg=dk.ForwardMode())
except dk.UnsupportedError as err:
    print("DEFAULT", err)
import jax
print("X64", jax.config.jax_enable_x64)
"""
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout
    assert (
        "EXPLICIT autodiff='jax' needs JAX's 64-bit mode (backend='scipy' "
        "integrates in float64), but jax_enable_x64 is off, so JAX would compute "
        "in float32. Enable it once at the start of your program with jax.config."
        "update(\"jax_enable_x64\", True), or pass autodiff='torch'."
    ) in lines
    assert (
        "DEFAULT backend='scipy' differentiates f(u, p, t) with JAX or PyTorch, "
        "and neither can be used here (jax is installed but its 64-bit mode is "
        'off (enable it with jax.config.update("jax_enable_x64", True)); torch '
        "is not installed)."
    ) in lines
    assert "X64 False" in lines  # diffeqkit never turned it on


def test_importing_the_backend_and_a_jac_gradient_import_no_framework():
    code = """
import sys
import numpy as np
import diffeqkit as dk
from diffeqkit.backends.scipy import _autodiff
A = np.array([[-0.5, 2.0], [-2.0, -0.5]])
prob = dk.ODEProblem(lambda u, p, t: A @ u, np.array([1.0, 0.5]), (0.0, 1.0),
                     jac=lambda u, p, t: A)
_, pullback = dk.vjp(prob, backend="scipy",
                     sensealg=dk.CheckpointedAdjoint(autodiff="jac"))
pullback(np.ones((2, 2)))
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "torch")))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------------------------
# Failures.
# ---------------------------------------------------------------------------------


def test_pullback_of_a_failed_solve_is_nan():
    engine("jax")
    sol, pullback = dk.vjp(
        linear_problem(),
        backend="scipy",
        max_steps=2,
        throw=False,
        sensealg=dk.ContinuousAdjoint(),
    )
    assert sol.status == "max_steps_reached"
    grads = pullback(np.ones((2, 2)))  # no derivative, no exception
    assert grads.u0.shape == (2,)
    assert np.isnan(grads.u0).all()
    assert np.isnan(grads.p).all()


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("ContinuousAdjoint", r"use sensealg=dk\.CheckpointedAdjoint\(\)"),
        ("CheckpointedAdjoint", r"loosen CheckpointedAdjoint\(rtol=\.\.\., atol"),
    ],
)
def test_a_failing_backward_solve_raises_naming_the_sensealg(name, hint):
    engine("jax")
    # The forward solve needs ~10 steps at rtol 1e-4; the backward one at rtol
    # 1e-12 needs many more than max_steps=30.
    _, pullback = dk.vjp(
        linear_problem(),
        backend="scipy",
        rtol=1e-4,
        atol=1e-6,
        max_steps=30,
        sensealg=sensealg(name, rtol=1e-12, atol=1e-14),
    )
    with pytest.raises(
        dk.SolveError,
        match=rf"the backward solve of sensealg=dk\.{name}\(\): integration "
        # a piece of the backward pass: between save times or checkpoints
        rf"stopped at t=.* of tspan=\(.*\) with status "
        rf"'max_steps_reached' \(30 steps\)\. .*{hint}",
    ):
        pullback(np.ones((2, 2)))
