"""The Rosenbrock algs on the compiled torch engine
(`diffeqkit.backends.torch._engine_rosenbrock`) against their eager driver.

One small stiff problem (ROBER on [0, 1], float64) and blocks of 2 attempts;
each kind of block compiles once for the module (a Rosenbrock block costs
about a minute to compile on two loaded cores; its replay under autograd two).
The engine takes the eager driver's steps: the same counts, and values and
gradients equal to rounding (measured below 6e-13 relative, component by
component; we allow 1e-11).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import diffeqkit as dk
from diffeqkit import problems

torch = pytest.importorskip("torch")
from diffeqkit.backends.torch import _engine  # noqa: E402

pytestmark = pytest.mark.torch

SAVES = [0.0, 0.3, 1.0]
WEIGHTS = (1.0, 1e4, 1.0)


@pytest.fixture(scope="module", autouse=True)
def small_blocks():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_engine, "BLOCK", 2)
        mp.delenv(_engine.ENV, raising=False)
        yield


def rober(jac: bool = False, **changes) -> dk.ODEProblem:
    prob = problems.rober(1e11, jac=jac).prob
    prob = prob.remake(u0=torch.tensor(prob.u0), p=torch.tensor(prob.p))
    return prob.remake(**{"tspan": (0.0, 1.0), **changes})


def on(mode, call, *args, **kwargs):
    """`call` with the engine `mode`."""
    old = os.environ.get(_engine.ENV)
    os.environ[_engine.ENV] = mode
    try:
        return call(*args, **kwargs)
    finally:
        if old is None:
            del os.environ[_engine.ENV]
        else:
            os.environ[_engine.ENV] = old


def close(a, b, rel=1e-11):
    """Equal to `rel` relative, component by component."""
    a, b = np.asarray(a.detach()), np.asarray(b.detach())
    np.testing.assert_allclose(a, b, rtol=rel, atol=0.0)


KW = {"saveat": SAVES, "rtol": 1e-6, "atol": 1e-10}
COUNTS = ("nfev", "naccept", "nreject", "njev", "nlu")


def test_rodas4_takes_the_eager_steps_and_never_recompiles():
    prob = rober()
    ref = on("eager", dk.solve, prob, "rodas4", **KW)
    sol = on("compiled", dk.solve, prob, "rodas4", **KW)
    close(sol.u, ref.u)
    for key in COUNTS:
        assert sol.stats[key] == ref.stats[key], key
    assert "compile_s" in sol.stats
    traces = dict(_engine.TRACES)
    # New u0, p, tspan, save times and tolerances: the same compiled code.
    other = rober(
        u0=torch.tensor([0.9, 1e-5, 0.1], dtype=torch.float64),
        p=torch.tensor([0.05, 2e7, 1.2e4], dtype=torch.float64),
        tspan=(0.5, 40.0),
    )
    kw = {"saveat": [0.5, 0.7, 3.0, 40.0], "rtol": 1e-5, "atol": 1e-9}
    ref2 = on("eager", dk.solve, other, "rodas4", **kw)
    sol2 = on("compiled", dk.solve, other, "rodas4", **kw)
    close(sol2.u, ref2.u)
    for key in COUNTS:
        assert sol2.stats[key] == ref2.stats[key], key
    assert traces == _engine.TRACES
    assert sol2.stats["compile_s"] == 0.0


def loss(sol):
    return (sol.u[1:] * torch.tensor(WEIGHTS, dtype=sol.u.dtype)).sum()


@pytest.mark.parametrize(
    "sensealg",
    [
        dk.ReverseThroughSolver(),
        dk.CheckpointedAdjoint(),
        dk.CheckpointedAdjoint(checkpoints=3),
        dk.ForwardMode(),
        dk.InterpolatingAdjoint(),
    ],
    ids=["RTS", "Checkpointed", "Checkpointed-3", "ForwardMode", "Interpolating"],
)
def test_rodas4_gradients_equal_eager(sensealg):
    # Measured: values 4e-15, dL/du0 5.9e-13, dL/dp 4.4e-13 relative (RTS,
    # CheckpointedAdjoint and ForwardMode; the interpolating adjoint's forward
    # pass records dense output per step, so it runs eagerly: equal bit for bit).
    got = {
        mode: on(
            mode, dk.value_and_grad, loss, rober(), "rodas4", sensealg=sensealg, **KW
        )
        for mode in ("eager", "compiled")
    }
    (value, grads), (ref_value, ref_grads) = got["compiled"], got["eager"]
    close(value, ref_value)
    close(grads.u0, ref_grads.u0)
    close(grads.p, ref_grads.p)


def test_failed_compilation_falls_back_once_with_a_warning():
    @torch.compiler.disable
    def opaque(u):
        return u

    def decay(u, p, t):
        return -p * opaque(u)

    prob = dk.ODEProblem(
        decay,
        torch.tensor([1.0], dtype=torch.float64),
        (0.0, 1.0),
        torch.tensor(0.5, dtype=torch.float64),
    )
    with pytest.warns(_engine.EngineFallbackWarning, match="could not compile"):
        sol = on("compiled", dk.solve, prob, "rodas4", saveat=[0.0, 1.0])
    np.testing.assert_allclose(sol.u[-1].item(), np.exp(-0.5), rtol=1e-5)
    assert "njev" in sol.stats
    on("compiled", dk.solve, prob, "rodas4", saveat=[0.0, 1.0])  # quiet


@pytest.mark.slow
def test_prob_jac_on_the_engine_takes_the_eager_steps():
    # Measured: 2.3e-13 relative (ROBER to 1e5).
    prob = rober(jac=True)
    ref = on("eager", dk.solve, prob, "rodas4", **KW)
    sol = on("compiled", dk.solve, prob, "rodas4", **KW)
    close(sol.u, ref.u)
    for key in COUNTS:
        assert sol.stats[key] == ref.stats[key], key


@pytest.mark.slow
def test_rosenbrock23_on_the_engine_takes_the_eager_steps():
    # Measured: 3e-14 relative (ROBER to 1e5).
    prob = rober()
    ref = on("eager", dk.solve, prob, "rosenbrock23", **KW)
    sol = on("compiled", dk.solve, prob, "rosenbrock23", **KW)
    close(sol.u, ref.u)
    for key in COUNTS:
        assert sol.stats[key] == ref.stats[key], key
