"""ForwardMode, ContinuousAdjoint and InterpolatingAdjoint on the compiled torch
engine (`diffeqkit.backends.torch._engine_adjoint`) against their eager paths.

As in test_torch_engine.py: one small problem (Lotka-Volterra, float64), blocks
of 2 steps, each kind of block compiled once for the module; the traces are
counted to check that new u0, p, tspan and save times never recompile. The
engine takes the same steps as the eager path (its forward solve, and the
backward solve's controller), so gradients agree to rounding: measured below
3e-14 relative; we allow 1e-10.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import diffeqkit as dk

torch = pytest.importorskip("torch")
from diffeqkit.backends.torch import _engine, _interpolating  # noqa: E402

pytestmark = pytest.mark.torch

FIRST = {"u0": (1.0, 1.0), "p": (1.5, 1.0, 3.0, 1.0), "tspan": (0.0, 2.0)}
OTHER = {"u0": (0.8, 1.3), "p": (1.2, 0.9, 2.5, 1.1), "tspan": (0.5, 3.0)}
# Dense saves: several between two forward steps, so one backward block
# crosses save times (their cotangents join the adjoint inside the block).
DENSE = {"u0": (1.0, 1.2), "p": (1.5, 1.0, 3.0, 1.0), "tspan": (0.0, 2.0)}
SAVES = {
    id(FIRST): [0.0, 0.5, 1.25, 2.0],
    id(OTHER): [0.5, 0.7, 3.0],
    id(DENSE): [0.1 * k for k in range(21)],
}


def lotka_volterra(u, p, t):
    x, y = u[0], u[1]
    return torch.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y])


@pytest.fixture(scope="module", autouse=True)
def small_blocks():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_engine, "BLOCK", 2)
        mp.delenv(_engine.ENV, raising=False)
        yield


def gradient(mode, sensealg, case):
    """(u, du0, dp) of ``sum(u**2)`` with the engine `mode`."""
    u0 = torch.tensor(case["u0"], dtype=torch.float64, requires_grad=True)
    p = torch.tensor(case["p"], dtype=torch.float64, requires_grad=True)
    prob = dk.ODEProblem(lotka_volterra, u0, case["tspan"], p)
    os.environ[_engine.ENV] = mode
    try:
        sol = dk.solve(
            prob,
            "dopri5",
            backend="torch",
            saveat=SAVES[id(case)],
            rtol=1e-8,
            atol=1e-10,
            sensealg=sensealg,
        )
        (sol.u**2).sum().backward()
    finally:
        del os.environ[_engine.ENV]
    return sol.u.detach(), u0.grad, p.grad


def close(a, b, rel=1e-10):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rel, atol=rel * np.abs(b).max())


@pytest.mark.parametrize(
    ("sensealg", "kind"),
    [
        (dk.ForwardMode(), "replay"),
        (dk.ContinuousAdjoint(), "adjoint"),
        (dk.InterpolatingAdjoint(), "adjoint"),
    ],
    ids=["ForwardMode", "ContinuousAdjoint", "InterpolatingAdjoint"],
)
def test_gradients_equal_eager_and_never_recompile(sensealg, kind):
    before = dict(_engine.TRACES)
    for case in (FIRST, OTHER, DENSE):
        want = gradient("eager", sensealg, case)
        record = dict(_interpolating.LAST_BACKWARD)
        got = gradient("compiled", sensealg, case)
        for g, w in zip(got, want, strict=True):
            close(g, w)
        if isinstance(sensealg, dk.InterpolatingAdjoint):
            # The same backward steps as the eager adjoint: step sizes follow
            # the error estimates, differences of nearly equal sums whose
            # rounding differs between fused and eager arithmetic (7e-8
            # relative measured).
            for key in ("naccept", "nreject", "nfev"):
                assert _interpolating.LAST_BACKWARD[key] == record[key], key
            np.testing.assert_allclose(
                _interpolating.LAST_BACKWARD["backward_ends"],
                record["backward_ends"],
                rtol=1e-6,
            )
        if case is FIRST:
            # The gradient ran on a compiled block of its own.
            assert _engine.TRACES[kind] > before[kind]
            traces = dict(_engine.TRACES)
    # New u0, p, tspan and save times: no new trace.
    assert traces == _engine.TRACES


@pytest.mark.parametrize(
    "sensealg",
    [dk.ForwardMode(), dk.ContinuousAdjoint(), dk.InterpolatingAdjoint()],
    ids=["ForwardMode", "ContinuousAdjoint", "InterpolatingAdjoint"],
)
def test_failed_compilation_falls_back_to_the_eager_gradient(sensealg):
    """An f dynamo cannot trace: every block warns once and the eager path
    gives the gradient."""

    @torch.compiler.disable
    def opaque(u):
        return u

    def decay(u, p, t):
        return -p * opaque(u)

    def grad(mode):
        p = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        u0 = torch.tensor([1.0], dtype=torch.float64)
        prob = dk.ODEProblem(decay, u0, (0.0, 1.0), p)
        os.environ[_engine.ENV] = mode
        try:
            sol = dk.solve(
                prob, "dopri5", backend="torch", saveat=[0.0, 1.0], sensealg=sensealg
            )
            sol.u[-1].sum().backward()
        finally:
            del os.environ[_engine.ENV]
        return p.grad

    with pytest.warns(_engine.EngineFallbackWarning, match="could not compile"):
        got = grad("compiled")
    close(got, grad("eager"), rel=1e-12)
    # -exp(-p): the gradient itself.
    np.testing.assert_allclose(float(got), -np.exp(-0.5), rtol=1e-5)
