"""The JAX backend's own parts: InterpolatingAdjoint on every alg kind, constant
steps of adaptive algs (``adaptive=False``), empty states, and the sensealg table.

Gradients are checked against the closed form of the linear problem
(`problems.linear_grads`), in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from problems import linear_grads, linear_problem

import diffeqkit as dk

jax = pytest.importorskip("jax")
pytest.importorskip("diffrax")

from diffeqkit.backends.jax import _solve  # noqa: E402

pytestmark = pytest.mark.jax

SAVES = np.linspace(0.0, 2.0, 9)
COTANGENT = np.random.default_rng(0).standard_normal((9, 2))


def gradient_error(alg: str, sensealg: dk.SensitivityAlgorithm, **kw) -> float:
    """Largest error of dL/du0 and dL/dA, relative to each one's largest entry,
    for L = sum <COTANGENT_i, u(t_i)> on the linear problem."""
    sol, pullback = dk.vjp(
        linear_problem(), alg, backend="jax", saveat=SAVES, sensealg=sensealg, **kw
    )
    assert sol.status == "success"
    grads = pullback(COTANGENT)
    du0, da = linear_grads(SAVES, COTANGENT)
    got_u0, got_a = np.asarray(grads.u0), np.asarray(grads.p)
    return max(
        np.abs(got_u0 - du0).max() / np.abs(du0).max(),
        np.abs(got_a - da).max() / np.abs(da).max(),
    )


# ---------------------------------------------------------------------------------
# InterpolatingAdjoint.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "kw", "allowed"),
    [
        # Measured: 1.2e-11 (tsit5), 1.2e-9 (dopri8), 5.6e-8 (kvaerno5).
        ("tsit5", {"rtol": 1e-10, "atol": 1e-12}, 1e-9),
        ("dopri8", {"rtol": 1e-10, "atol": 1e-12}, 1e-7),
        ("kvaerno5", {"rtol": 1e-8, "atol": 1e-10}, 1e-6),
    ],
)
def test_interpolating_adjoint_matches_closed_form_adaptive(alg, kw, allowed):
    assert gradient_error(alg, dk.InterpolatingAdjoint(), **kw) < allowed


@pytest.mark.parametrize(
    ("alg", "kw", "order"),
    [
        # The adjoint steps backward over the forward grid, reading the state off
        # the method's interpolant: linear for euler (order 1), rk4's third-order
        # continuous extension (measured order 4.0), tsit5's quartic with
        # constant steps (measured 5.2).
        ("euler", {}, 1),
        ("rk4", {}, 4),
        ("tsit5", {"adaptive": False}, 4),
    ],
)
def test_interpolating_adjoint_on_a_fixed_grid_converges(alg, kw, order):
    coarse = gradient_error(alg, dk.InterpolatingAdjoint(), dt0=0.05, **kw)
    fine = gradient_error(alg, dk.InterpolatingAdjoint(), dt0=0.025, **kw)
    assert fine < 1e-3 or alg == "euler"
    assert np.log2(coarse / fine) > order - 0.3, (coarse, fine)


def test_interpolating_adjoint_rtol_atol_take_effect():
    # The forward solve is tight; the adjoint's own, looser tolerances make its
    # steps larger and its error larger (measured 1.2e-11 with the forward ones,
    # 2.8e-7 with these: rtol 1e-4 on a 5th-order method).
    tight = {"rtol": 1e-10, "atol": 1e-12}
    default = gradient_error("tsit5", dk.InterpolatingAdjoint(), **tight)
    loose = gradient_error(
        "tsit5", dk.InterpolatingAdjoint(rtol=1e-4, atol=1e-6), **tight
    )
    assert default < 1e-9
    assert default < loose < 1e-5


# ---------------------------------------------------------------------------------
# adaptive=False.
# ---------------------------------------------------------------------------------


def test_constant_steps_save_the_step_values_and_have_their_own_program():
    prob = linear_problem()
    kw = {"backend": "jax", "saveat": SAVES, "dt0": 0.125}
    before = set(_solve.PROGRAMS.keys())
    steps = dk.solve(prob, "tsit5", adaptive=False, **kw)
    adaptive = dk.solve(prob, "tsit5", **kw)
    assert len(set(_solve.PROGRAMS.keys()) - before) == 2
    # The saves are step ends: each one is the value a solve ending there reaches.
    for i in (3, 8):
        t = float(SAVES[i])
        alone = dk.solve(
            prob.remake(tspan=(0.0, t)),
            "tsit5",
            adaptive=False,
            **{**kw, "saveat": SAVES[: i + 1]},
        )
        np.testing.assert_array_equal(np.asarray(alone.u[-1]), np.asarray(steps.u[i]))
    assert steps.stats["naccept"] == 16
    assert adaptive.stats["naccept"] != 16


# ---------------------------------------------------------------------------------
# An empty state.
# ---------------------------------------------------------------------------------

EMPTY_SENSEALGS = [
    dk.ForwardMode(),
    dk.ReverseThroughSolver(),
    dk.ContinuousAdjoint(),
    dk.InterpolatingAdjoint(),
    dk.CheckpointedAdjoint(),
]


def empty_decay(u, p, t):
    return -p * u


def test_an_empty_state_without_parameters():
    prob = dk.ODEProblem(lambda u, p, t: -u, np.zeros(0), (0.0, 1.0))
    for sensealg in (dk.ForwardMode(), dk.InterpolatingAdjoint()):
        _, pullback = dk.vjp(prob, backend="jax", saveat=[1.0], sensealg=sensealg)
        grads = pullback(np.zeros((1, 0)))
        assert np.asarray(grads.u0).shape == (0,)


def test_an_empty_state_with_an_implicit_alg():
    rates = np.array([2.0, 3.0])
    prob = dk.ODEProblem(
        lambda u, p, t: -p[0] * p[1] * u, np.zeros(0), (0.0, 1.0), rates
    )
    sol, pullback = dk.vjp(
        prob, "kvaerno5", backend="jax", sensealg=dk.InterpolatingAdjoint()
    )
    assert sol.status == "success"
    grads = pullback(np.zeros((2, 0)))
    np.testing.assert_array_equal(np.asarray(grads.p), np.zeros(2))


# ---------------------------------------------------------------------------------
# A backward solve that fails at run time.
# ---------------------------------------------------------------------------------


def _lorenz(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack(
        [p[0] * (u[1] - u[0]), u[0] * (p[1] - u[2]) - u[1], u[0] * u[1] - p[2] * u[2]]
    )


def test_a_backward_solve_failing_after_a_good_run_raises_solve_error():
    """The continuous adjoint's backward solve of Lorenz over t in [0, 5] leaves
    the trajectory and runs out of steps. When the compiled pullback has already
    run once, XLA reports that failure as a ValueError ("INTERNAL: CpuCallback
    error"), not a JaxRuntimeError; it must still become `dk.SolveError`."""
    p = np.array([10.0, 28.0, 8.0 / 3.0])
    u0 = np.array([-8.0, -8.0, 27.0])  # near the attractor
    sensealg = dk.ContinuousAdjoint()

    def pull(t1):
        prob = dk.ODEProblem(_lorenz, u0, (0.0, t1), p)
        _, pullback = dk.vjp(
            prob,
            "tsit5",
            backend="jax",
            saveat=np.array([t1]),
            sensealg=sensealg,
            max_steps=2000,
        )
        return pullback(np.ones((1, 3)))

    assert np.isfinite(np.asarray(pull(0.5).p)).all()  # same program, succeeds
    with pytest.raises(dk.SolveError, match="backward solve"):
        pull(5.0)
