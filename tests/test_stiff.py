"""Stiff problems on every backend: the IVP test set's reference values, agreement
across backends, and gradients with respect to ROBER's rate constants.

Every backend's implicit algs come from the registry, so a new one is tested here
the day it is declared.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SENSEALGS, need, need_gradients, runs

import diffeqkit as dk
from diffeqkit import backends

# Long stiff solves and a JAX compilation per alg and problem: tests_all runs
# these, the per-backend sessions skip them.
pytestmark = pytest.mark.slow

# Per alg: the rtol each reference solve runs at (atol scales with it as the
# problem's own atol/rtol), and the largest relative error at the reference time
# accepted, over every component. The bounds are the global errors measured on
# the three problems (the worst of them) times a margin of about 3: a global error
# is not bounded by the local tolerance, and on these problems it runs 10 to 400
# times rtol depending on the method.
SETTINGS = {
    "implicit_euler": (1e-4, 0.15),  # order 1: 4e-2 measured on ROBER
    "kvaerno3": (1e-6, 5e-5),  # 1.2e-5 measured (ROBER, HIRES)
    "kvaerno4": (1e-7, 3e-6),  # 6.5e-7 (HIRES)
    "kvaerno5": (1e-8, 3e-6),  # 7.2e-7 (ROBER)
    "kencarp3": (1e-6, 3e-4),  # 8.1e-5 (ROBER)
    "kencarp4": (1e-8, 5e-6),  # 1.5e-6 (ROBER)
    "kencarp5": (1e-8, 1e-6),  # 2.9e-7 (Van der Pol)
    "bdf": (1e-8, 1e-5),  # 2.2e-6 (ROBER)
    "radau": (1e-8, 1e-7),  # 8.6e-9 (ROBER)
    "lsoda": (1e-8, 1e-5),  # 2.3e-6 (ROBER)
    "rosenbrock23": (1e-6, 1e-3),
    "rodas4": (1e-7, 1e-6),  # 1.8e-7 (ROBER); Van der Pol 1e-8, HIRES 7.6e-9
}

# The stiff problems of the collection (the IVP test set's).
STIFF = ("rober", "van_der_pol", "hires")
IMPLICIT = [
    pytest.param(b, a, id=f"{b}-{a}", marks=getattr(pytest.mark, b))
    for b in backends.SPECS
    for a in backends.implicit_algs(b)
]
# Every implicit alg solves ROBER here; Van der Pol and HIRES run with each
# backend's first two (the ones the "looks stiff" hint names): on JAX each alg
# and problem is a compilation of ~6 s. benchmarks/stiff.py compares every alg
# on every problem with the reference.
CASES = [
    pytest.param(*p.values, name, id=f"{p.id}-{name}", marks=p.marks)
    for p in IMPLICIT
    for name in STIFF
    if name == "rober" or p.values[1] in backends.implicit_algs(p.values[0])[:2]
]


def test_every_implicit_alg_has_reference_settings():
    assert {a for _, a in (p.values for p in IMPLICIT)} <= set(SETTINGS)


@pytest.mark.parametrize(("backend", "alg", "name"), CASES)
def test_matches_ivp_test_set_reference(backend, alg, name):
    need(backend)
    bp = dk.problems.get(name)
    assert bp.reference is not None
    rtol, bound = SETTINGS[alg]
    sol = dk.solve(
        bp.prob,
        alg,
        backend=backend,
        saveat=bp.saveat,
        rtol=rtol,
        atol=rtol * bp.atol / bp.rtol,
        max_steps=200_000,
    )
    u = np.asarray(sol.u[-1])
    err = np.max(np.abs(u - bp.reference.u) / np.abs(bp.reference.u))
    assert err < bound, f"{name}: relative error {err:.2e} (bound {bound:.0e})"


# What each backend's solution is compared with: SciPy's Radau with the analytic
# Jacobian at a tolerance far below the compared solves'.
@pytest.fixture(scope="module")
def radau_rober():
    bp = dk.problems.rober(jac=True)
    sol = dk.solve(bp.prob, "radau", saveat=bp.saveat, rtol=1e-11, atol=1e-17)
    return bp, np.asarray(sol.u)


BEST = {"jax": "kvaerno5", "torch": "rosenbrock23", "scipy": "bdf"}


@pytest.mark.parametrize("backend", list(BEST))
def test_rober_trajectory_agrees_with_scipy_radau(backend, radau_rober):
    need(backend)
    bp, ref = radau_rober
    alg = BEST[backend]
    rtol, _ = SETTINGS[alg]
    atol = 1e-6 * rtol
    sol = dk.solve(
        bp.prob, alg, backend=backend, saveat=bp.saveat, rtol=rtol, atol=atol
    )
    # The error in units of the local tolerance (atol + rtol |u|), at every save
    # time from 1e-5 to 1e11: measured at most 49 (rosenbrock23), 15 (bdf), 6
    # (kvaerno5); a global error a few hundred times the local tolerance would be
    # a defect.
    err = np.abs(np.asarray(sol.u) - ref) / (atol + rtol * np.abs(ref))
    assert np.max(err) < 200, f"{np.max(err):.0f} local tolerances"


def test_explicit_solver_stalling_on_rober_says_try_an_implicit_one(backend):
    need(backend)
    bp = dk.problems.rober()
    with pytest.raises(dk.SolveError, match="looks stiff: try alg='") as info:
        dk.solve(bp.prob, "tsit5", backend=backend, max_steps=500)
    # It names one of this backend's own implicit algs.
    assert any(f"alg='{a}'" in str(info.value) for a in backends.implicit_algs(backend))


def test_implicit_solver_failing_suggests_another_implicit_one(backend):
    need(backend)
    bp = dk.problems.rober()
    alg = backends.implicit_algs(backend)[0]
    with pytest.raises(dk.SolveError) as info:
        dk.solve(bp.prob, alg, backend=backend, max_steps=5)
    assert "looks stiff" not in str(info.value)
    others = backends.implicit_algs(backend)[1:]
    if others:
        assert f"try another implicit solver (alg='{others[0]}'" in str(info.value)


# ---------------------------------------------------------------------------------
# Gradients with respect to ROBER's rate constants.
# ---------------------------------------------------------------------------------

# Over the first 0.01 time units: the fast transient of u[1] (k2, k3) and the
# start of the slow decay (k1); short enough for CI, and for a backsolve (see
# REFUSED).
GRAD_TS = np.array([0.0, 1e-4, 1e-3, 1e-2])
# Weights that make each species count: u[1] is about 1e4 times smaller.
WEIGHTS = np.array([1.0, 1e4, 1.0])
GRAD_TOL = {"rtol": 1e-10, "atol": 1e-14}


def _rober_short(p=None) -> dk.ODEProblem:
    prob = dk.problems.rober().prob.remake(tspan=(0.0, float(GRAD_TS[-1])))
    return prob if p is None else prob.remake(p=p)


@pytest.fixture(scope="module")
def rober_fd():
    """Central differences of L = sum_i <WEIGHTS, u(t_i)> in each rate constant,
    by SciPy's Radau with the analytic Jacobian: relative step 1e-6, so the
    truncation error (~1e-12 relative) is far below the solver's noise, which is
    about rtol / step = 1e-4 relative: the bound the gradients are held to."""
    bp = dk.problems.rober(jac=True)
    prob = bp.prob.remake(tspan=(0.0, float(GRAD_TS[-1])))

    def loss(p):
        sol = dk.solve(prob.remake(p=p), "radau", saveat=GRAD_TS, **GRAD_TOL)
        return float(np.sum(np.asarray(sol.u) * WEIGHTS))

    grads = []
    for k in range(3):
        h = 1e-6 * bp.prob.p[k]
        up, down = bp.prob.p.copy(), bp.prob.p.copy()
        up[k] += h
        down[k] -= h
        grads.append((loss(up) - loss(down)) / (2 * h))
    return np.array(grads)


# torch's rosenbrock23 is of order 2: at rtol=1e-10 each gradient takes ~50 s, so
# its check against finite differences is in tests/test_torch_stiff.py, at
# tolerances of its own.
GRAD_CASES = [
    pytest.param(b, s, id=f"{b}-{s}", marks=getattr(pytest.mark, b))
    for b in ("jax", "scipy")
    for s in SENSEALGS
    # The backsolve is refused with implicit algs (tests/test_registry.py).
    if runs(b, s, BEST[b])
]


@pytest.mark.parametrize(("backend", "sensealg"), GRAD_CASES)
def test_rober_rate_constant_gradients_match_finite_differences(
    backend, sensealg, rober_fd
):
    need_gradients(backend)
    sol, pull = dk.vjp(
        _rober_short(),
        BEST[backend],
        backend=backend,
        saveat=GRAD_TS,
        sensealg=SENSEALGS[sensealg],
        **GRAD_TOL,
    )
    grads = pull(np.broadcast_to(WEIGHTS, sol.u.shape).copy())
    np.testing.assert_allclose(np.asarray(grads.p), rober_fd, rtol=1e-4)


def test_jax_interpolating_adjoint_of_implicit_alg_under_jax_grad(rober_fd):
    """The interpolating adjoint also serves jax.grad through dk.solve, and
    refuses gradients with respect to times, which it does not compute."""
    need("jax")
    import jax
    import jax.numpy as jnp

    prob = _rober_short()
    sa = dk.InterpolatingAdjoint()

    def loss(p, t1=GRAD_TS[-1]):
        sol = dk.solve(
            prob.remake(p=p, tspan=(0.0, t1)),
            "kvaerno5",
            saveat=GRAD_TS,
            sensealg=sa,
            **GRAD_TOL,
        )
        return jnp.sum(sol.u * WEIGHTS)

    p = jnp.asarray(prob.p)
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(p)), rober_fd, rtol=1e-4)
    with pytest.raises(dk.UnsupportedError, match="not tspan, saveat"):
        jax.grad(loss, argnums=1)(p, jnp.asarray(GRAD_TS[-1]))
