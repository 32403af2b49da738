"""The torch backend's drivers: non-finite trial steps, adaptive=False, the
InterpolatingAdjoint on every alg kind, empty states, and its module structure."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
from problems import LINEAR_A, LINEAR_U0, linear, linear_grads, to_numpy

import diffeqkit as dk
from diffeqkit._solve import build_request

torch = pytest.importorskip("torch")
pytest.importorskip("torchdiffeq")

from diffeqkit.backends.torch import _solve  # noqa: E402

pytestmark = pytest.mark.torch

PACKAGE = Path(_solve.__file__).parent
ADAPTIVE = ["bosh3", "dopri5", "tsit5", "dopri8"]


# --- structure ------------------------------------------------------------------


def _imports(path: Path) -> list[str]:
    """The modules `path` imports, relative ones as ``.name``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            dots = "." * node.level
            found.append(dots + (node.module or ""))
            if node.level == 1 and node.module is None:
                found += ["." + a.name for a in node.names]
    return found


def test_no_module_imports_torchdiffeq():
    for path in PACKAGE.glob("*.py"):
        assert not [m for m in _imports(path) if m.startswith("torchdiffeq")], path


def test_module_imports_have_no_cycle():
    graph = {
        path.stem: {
            m[1:] for m in _imports(path) if m.startswith(".") and m[1:2] != "."
        }
        for path in PACKAGE.glob("*.py")
    }
    graph["__init__"] = set()  # the package imports everything once

    def visit(node: str, trail: tuple[str, ...]) -> None:
        assert node not in trail, " -> ".join((*trail, node))
        for nxt in graph.get(node, ()):
            visit(nxt, (*trail, node))

    for node in graph:
        visit(node, ())


# --- non-finite trial steps ------------------------------------------------------


def nan_from_half(u, p, t):
    return u * 0 + torch.where(t < 0.5, -u, math.nan)


@pytest.mark.parametrize("alg", [*ADAPTIVE, "rosenbrock23", "rodas4"])
def test_nonfinite_trial_steps_are_retried_until_the_step_underflows(alg):
    prob = dk.ODEProblem(nan_from_half, torch.ones(1, dtype=torch.float64), (0.0, 1.0))
    saveat = [0.0, 0.25, 0.75, 1.0]
    req = build_request(prob, alg, saveat=saveat, rtol=1e-6, atol=1e-8, throw=False)
    setup = _solve.prepare(req, graph=False)
    run = _solve.run_steps(req, setup)
    assert run.status == "nonfinite"
    assert run.t_reached is not None
    assert 0.5 - 1e-6 < run.t_reached <= 0.5
    sol = _solve.finish(req, setup, run, run.u)
    u = to_numpy(sol.u)[:, 0]
    assert u[1] == pytest.approx(math.exp(-0.25), rel=1e-4)
    assert np.isnan(u[2:]).all()
    with pytest.raises(dk.SolveError, match=r"stopped at t=0\.5 .*'nonfinite'"):
        dk.solve(prob, alg, saveat=saveat, rtol=1e-6, atol=1e-8)


def test_a_blow_up_shrinks_steps_instead_of_stopping_at_the_first_nan():
    # u' = 1 / (0.5 - t) overflows to inf past the pole, where f is finite again.
    def f(u, p, t):
        return u * 0 + 1 / (0.5 - t)

    prob = dk.ODEProblem(f, torch.zeros(1, dtype=torch.float64), (0.0, 1.0))
    sol = dk.solve(prob, "tsit5", rtol=1e-6, atol=1e-8, throw=False)
    assert sol.status in ("nonfinite", "step_size_too_small")
    reached = float(sol.message.split("t=")[1].split()[0])
    assert reached == pytest.approx(0.5, abs=1e-5)


@pytest.mark.parametrize("alg", ["euler", "rk4"])
def test_fixed_steps_stop_at_the_last_finite_step(alg):
    prob = dk.ODEProblem(nan_from_half, torch.ones(1, dtype=torch.float64), (0.0, 1.0))
    req = build_request(prob, alg, dt0=0.1, saveat=[0.0, 0.3, 0.7, 1.0], throw=False)
    setup = _solve.prepare(req, graph=False)
    run = _solve.run_steps(req, setup)
    assert run.status == "nonfinite"
    # rk4's stages at t0 + h/2 pass 0.5 in the step from 0.4; euler's only at 0.5.
    assert run.t_reached == pytest.approx(0.4 if alg == "rk4" else 0.5)
    u = to_numpy(run.u)[:, 0]
    assert np.isfinite(u[:2]).all()
    assert np.isnan(u[2:]).all()


SENSEALGS = {
    "forward": dk.ForwardMode(),
    "reverse": dk.ReverseThroughSolver(),
    "continuous": dk.ContinuousAdjoint(),
    "interpolating": dk.InterpolatingAdjoint(),
    "checkpointed": dk.CheckpointedAdjoint(),
}


def _grads(alg: str, sensealg, ts, **kw):
    u0 = torch.tensor(LINEAR_U0, requires_grad=True)
    a = torch.tensor(LINEAR_A, requires_grad=True)
    sol = dk.solve(
        dk.ODEProblem(linear, u0, (0.0, 1.0), a),
        alg,
        saveat=ts,
        sensealg=sensealg,
        **kw,
    )
    ct = np.cos(np.arange(2.0 * len(ts))).reshape(len(ts), 2) + 0.5
    (sol.u * torch.tensor(ct)).sum().backward()
    return to_numpy(u0.grad), to_numpy(a.grad), linear_grads(ts, ct)


# --- InterpolatingAdjoint on every kind ---------------------------------------------


@pytest.mark.parametrize(
    ("alg", "kw", "tol"),
    [
        ("bosh3", {"rtol": 1e-9, "atol": 1e-11}, 1e-6),
        ("dopri5", {"rtol": 1e-10, "atol": 1e-12}, 1e-7),
        ("tsit5", {"rtol": 1e-10, "atol": 1e-12}, 1e-7),
        ("dopri8", {"rtol": 1e-10, "atol": 1e-12}, 1e-7),
        ("rosenbrock23", {"rtol": 1e-8, "atol": 1e-10}, 1e-5),
        ("euler", {"dt0": 1e-4}, 1e-3),
        ("midpoint", {"dt0": 1e-3}, 1e-5),
        ("heun", {"dt0": 1e-3}, 1e-5),
        ("rk4", {"dt0": 1e-2}, 1e-7),
    ],
)
def test_interpolating_adjoint_matches_the_closed_form(alg, kw, tol):
    ts = np.array([0.0, 0.3, 1.0])
    du0, da, (exact_u0, exact_a) = _grads(alg, dk.InterpolatingAdjoint(), ts, **kw)
    np.testing.assert_allclose(du0, exact_u0, atol=tol)
    np.testing.assert_allclose(da, exact_a, atol=tol)


@pytest.mark.parametrize("alg", ["rk4", "tsit5"])
def test_interpolating_adjoint_converges_as_the_steps_shrink(alg):
    ts = np.array([0.0, 1.0])
    errors = []
    for dt in (0.1, 0.05):
        du0, da, (exact_u0, exact_a) = _grads(
            alg, dk.InterpolatingAdjoint(), ts, adaptive=False, dt0=dt
        )
        errors.append(max(np.abs(du0 - exact_u0).max(), np.abs(da - exact_a).max()))
    # Order 4: the step is rk4's / tsit5's, the state between steps cubic Hermite.
    assert errors[1] < errors[0] / 10
