"""Forward solves on every backend x alg against closed forms, and across backends.

Tolerances: adaptive methods run at rtol=1e-10, atol=1e-12, so their global error
on these short, well-conditioned problems is a small multiple of 1e-10; we allow
1e-7 (relative to the solution's scale, ~1) to leave room for error growth and for
the lower-order bosh3. Fixed-step methods run at a dt0 per method; their global
error is C * dt0**order with C ~ 1 here, so we allow 10 * dt0**order.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LOW_ORDER, alg_params, need
from problems import (
    LINEAR_U0,
    linear_exact,
    linear_problem,
    logistic_exact,
    logistic_problem,
    lotka_volterra_problem,
    replay_fixed_steps,
    to_numpy,
)

import diffeqkit as dk
from diffeqkit import backends
from diffeqkit._algs import ALGS
from diffeqkit._saveat import step_grid

TIGHT = {"rtol": 1e-10, "atol": 1e-12}
FIXED_DT0 = {"euler": 5e-4, "midpoint": 1e-3, "heun": 1e-3, "rk4": 1e-2}
IMPLICIT_TOL = 1e-6  # implicit methods' error estimates are looser than explicit RK


def solve_kwargs(alg: str) -> dict:
    if ALGS[alg].fixed_step:
        return {"dt0": FIXED_DT0[alg]}
    return dict(LOW_ORDER[alg][0]) if alg in LOW_ORDER else dict(TIGHT)


def allowed_error(alg: str) -> float:
    info = ALGS[alg]
    if info.fixed_step:
        return 10 * FIXED_DT0[alg] ** info.order
    if alg in LOW_ORDER:
        return LOW_ORDER[alg][1]
    return IMPLICIT_TOL if info.implicit else 1e-7


@pytest.mark.parametrize(("backend", "alg"), alg_params())
def test_linear_system_matches_matrix_exponential(backend, alg):
    need(backend)
    ts = np.linspace(0.0, 2.0, 9)
    sol = dk.solve(
        linear_problem(), alg, backend=backend, saveat=ts, **solve_kwargs(alg)
    )
    assert sol.success
    assert sol.status == "success"
    assert (sol.backend, sol.alg) == (backend, alg)
    np.testing.assert_array_equal(to_numpy(sol.t), ts)
    u = to_numpy(sol.u)
    assert u.shape == (9, 2)
    assert u.dtype == np.float64
    np.testing.assert_allclose(u, linear_exact(ts), rtol=0, atol=allowed_error(alg))


@pytest.mark.parametrize(("backend", "alg"), alg_params())
def test_logistic_growth_matches_closed_form_with_pytree_p(backend, alg):
    need(backend)
    ts = np.array([0.0, 0.37, 1.2, 2.9, 4.0])
    sol = dk.solve(
        logistic_problem(), alg, backend=backend, saveat=ts, **solve_kwargs(alg)
    )
    # logistic values reach K=5: scale the absolute allowance accordingly
    np.testing.assert_allclose(
        to_numpy(sol.u), logistic_exact(ts), rtol=0, atol=5 * allowed_error(alg)
    )


@pytest.mark.parametrize(("backend", "alg"), alg_params("adaptive", "implicit"))
def test_backward_integration_matches_closed_form(backend, alg):
    need(backend)
    prob = linear_problem(tspan=(2.0, -1.0))
    ts = np.array([2.0, 1.1, 0.0, -1.0])
    sol = dk.solve(prob, alg, backend=backend, saveat=ts, **solve_kwargs(alg))
    exact = linear_exact(ts, t0=2.0)
    # backward in time the damped system grows like e^{1.5}: scale the allowance
    np.testing.assert_allclose(
        to_numpy(sol.u), exact, rtol=0, atol=5 * allowed_error(alg)
    )


@pytest.mark.parametrize(("backend", "alg"), alg_params("fixed"))
def test_fixed_step_backward_and_off_grid_save_times(backend, alg):
    need(backend)
    prob = linear_problem(tspan=(2.0, 0.0))
    ts = np.array([2.0, 1.2345, 0.0])  # 1.2345 is not on the dt0 grid
    sol = dk.solve(prob, alg, backend=backend, saveat=ts, dt0=FIXED_DT0[alg])
    np.testing.assert_allclose(
        to_numpy(sol.u), linear_exact(ts, t0=2.0), rtol=0, atol=10 * allowed_error(alg)
    )


@pytest.mark.parametrize(("backend", "alg"), alg_params("fixed"))
def test_fixed_step_saves_are_the_tableau_recursion_on_the_step_grid(backend, alg):
    # Save times off the dt0 grid: the steps land on them (step_grid), so every
    # saved value is a step value. Replaying the tableau in NumPy on that grid
    # gives the same numbers to rounding; an interpolant between steps would be
    # off by ~dt0**2 = 1e-2 and more.
    need(backend)
    ts = np.array([0.0, 0.123, 0.5, 0.77, 1.0])
    grid = step_grid(0.0, 1.0, 0.1, ts)
    sol = dk.solve(linear_problem((0.0, 1.0)), alg, backend=backend, saveat=ts, dt0=0.1)
    replay = replay_fixed_steps(alg, grid)
    expected = np.stack([replay[float(t)] for t in ts])
    np.testing.assert_allclose(to_numpy(sol.u), expected, rtol=1e-12, atol=1e-15)
    assert sol.stats["naccept"] == grid.size - 1
    assert sol.stats["nreject"] == 0


SHARED_EXPLICIT = [
    a for a in backends.SPECS["scipy"].capabilities.algs if not ALGS[a].implicit
]


@pytest.mark.parametrize("alg", SHARED_EXPLICIT)
def test_backends_agree_in_float64(alg):
    names = [b for b in backends.SPECS if backends.installed(b)]
    if len(names) < 2:
        pytest.skip("needs two installed backends")
    prob = lotka_volterra_problem()
    ts = np.linspace(0.0, 10.0, 21)
    # bosh3 is 3rd order: at 1e-10 it would take ~10^4 steps per backend
    rtol = 1e-8 if alg == "bosh3" else 1e-10
    kw = {"dt0": 1e-2} if ALGS[alg].fixed_step else {"rtol": rtol, "atol": rtol / 100}
    sols = {
        b: to_numpy(dk.solve(prob, alg, backend=b, saveat=ts, **kw).u) for b in names
    }
    ref = sols[names[0]]
    for b in names[1:]:
        # Same tableau, tolerances and (for fixed steps) the same steps: fixed-step
        # results agree to rounding; adaptive ones take slightly different steps
        # (each library's step-size controller), so they agree to the tolerance
        # times the growth of errors over t in [0, 10] (2000x leaves ~10x margin).
        atol = 1e-10 if ALGS[alg].fixed_step else 2000 * rtol
        np.testing.assert_allclose(sols[b], ref, rtol=0, atol=atol, err_msg=b)


def test_default_saveat_is_endpoints(backend):
    sol = dk.solve(linear_problem(), backend=backend)
    np.testing.assert_array_equal(to_numpy(sol.t), [0.0, 2.0])
    np.testing.assert_array_equal(to_numpy(sol.u)[0], LINEAR_U0)


def test_float_saveat_saves_every_dt_and_t1(backend):
    sol = dk.solve(linear_problem(), backend=backend, saveat=0.3, **TIGHT)
    t = to_numpy(sol.t)
    np.testing.assert_allclose(t, [0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.0], atol=1e-15)
    np.testing.assert_allclose(to_numpy(sol.u), linear_exact(t), atol=1e-7)


def test_saveat_without_t0_starts_after_t0(backend):
    sol = dk.solve(linear_problem(), backend=backend, saveat=[0.5, 1.5], **TIGHT)
    np.testing.assert_array_equal(to_numpy(sol.t), [0.5, 1.5])
    np.testing.assert_allclose(to_numpy(sol.u), linear_exact([0.5, 1.5]), atol=1e-7)


def test_any_state_shape(backend):
    # u of shape (2, 2): every column decays at its own rate
    rates = np.array([[1.0, 2.0], [0.5, 3.0]])
    prob = dk.ODEProblem(lambda u, p, t: -p * u, np.ones((2, 2)), (0.0, 1.0), rates)
    sol = dk.solve(prob, backend=backend, **TIGHT)
    u = to_numpy(sol.u)
    assert u.shape == (2, 2, 2)
    np.testing.assert_allclose(u[-1], np.exp(-rates), atol=1e-8)


def test_list_u0_becomes_backend_default_float(backend):
    prob = dk.ODEProblem(lambda u, p, t: -u, [1.0, 2.0], (0.0, 1.0))
    sol = dk.solve(prob, backend=backend)
    expected = {"scipy": "float64"}
    if backend == "torch":
        import torch

        expected["torch"] = str(torch.get_default_dtype()).removeprefix("torch.")
    if backend == "jax":
        import jax.numpy as jnp

        expected["jax"] = str(jnp.zeros(()).dtype)  # float64 here: tests enable x64
    assert str(sol.u.dtype).removeprefix("torch.") == expected[backend]


def test_stats_are_honest_ints(backend):
    sol = dk.solve(lotka_volterra_problem(), "dopri5", backend=backend)
    for key in ("nfev", "naccept", "nreject"):
        assert key in sol.stats
    assert isinstance(sol.stats["naccept"], int)
    assert sol.stats["naccept"] > 10
    assert isinstance(sol.stats["nreject"], int)
    assert sol.stats["nreject"] >= 0
    # dopri5 is FSAL with 7 stages: 6 new evaluations per attempted step, plus a
    # few for the start (initial f and step-size selection).
    attempts = sol.stats["naccept"] + sol.stats["nreject"]
    assert 6 * attempts <= sol.stats["nfev"] <= 6 * attempts + 4


def test_support_matrix_lists_installed_backends():
    matrix = dk.support_matrix()
    assert set(matrix) == {b for b in backends.SPECS if backends.installed(b)}
    full = dk.support_matrix(installed_only=False)
    assert set(full) == set(backends.SPECS)
    assert "kvaerno5" in full["jax"]["algs"]
    assert "kvaerno5" not in full["torch"]["algs"]
    assert full["scipy"]["devices"] == ["cpu"]


def test_info_command_prints_backends(capsys):
    from diffeqkit.__main__ import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in backends.SPECS:
        assert name in out
    assert main(["info", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert set(report["backends"]) == set(backends.SPECS)
