"""``throw=False`` with gradients, on every backend and sensealg.

A failed forward solve gives the partial solution (``success=False``, the status
saying why, rows not reached NaN) and a pullback that returns NaN gradients of
the right shapes, never an exception (API.md section 7): a sampler then rejects
the proposal. Two cheap, reliable failures: ``max_steps`` too small for
``u' = -p u``, and ``u' = p u^2`` (``u = 1 / (1 - p t)``) past its singularity at
``t = 1``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BY_NAME, as_backend, need, need_gradients, sensealg_params

import diffeqkit as dk
from diffeqkit._arrays import to_numpy

SAVES = np.linspace(0.0, 2.0, 5)

# name -> (f, solve options, the status it ends with)
FAILURES = {
    "max_steps": (lambda u, p, t: -p[0] * u, {"max_steps": 3}, "max_steps_reached"),
    "blow-up": (lambda u, p, t: p[0] * u**2, {}, "step_size_too_small"),
}


def problem(backend, f):
    return dk.ODEProblem(
        f, as_backend(backend, [1.0]), (0.0, 2.0), as_backend(backend, [1.0])
    )


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize(("backend", "sensealg"), sensealg_params())
def test_vjp_of_a_failed_solve_returns_nan_gradients(backend, sensealg, failure):
    need_gradients(backend)
    f, kw, status = FAILURES[failure]
    sol, pullback = dk.vjp(
        problem(backend, f),
        "tsit5",
        backend=backend,
        saveat=SAVES,
        sensealg=BY_NAME[sensealg],
        throw=False,
        **kw,
    )
    assert not sol.success
    assert sol.status == status
    u = to_numpy(sol.u)
    assert u.shape == (5, 1)
    assert u[0, 0] == 1.0  # u0 itself is always reached
    assert np.isnan(u[-1]).all()  # t = 2 never is
    grads = pullback(np.ones(u.shape))
    for g in (grads.u0, grads.p):
        g = to_numpy(g)
        assert g.shape == (1,)
        assert np.isnan(g).all()
    # A cotangent that ignores the rows not reached changes nothing: the failed
    # solve has no derivative at all.
    ct = np.zeros(u.shape)
    ct[0] = 1.0
    assert np.isnan(to_numpy(pullback(ct).u0)).all()


@pytest.mark.parametrize("backend", ["jax", "torch", "scipy"])
def test_value_and_grad_of_a_failed_solve(backend):
    need_gradients(backend)
    f, kw, _ = FAILURES["blow-up"]

    def loss(sol):
        xp = dk.array_namespace(sol.u)
        return xp.sum(sol.u[:1])  # only u0's row: finite even when failed

    value, grads = dk.value_and_grad(
        loss,
        problem(backend, f),
        backend=backend,
        saveat=SAVES,
        sensealg=dk.ForwardMode(),
        throw=False,
        **kw,
    )
    assert float(to_numpy(value)) == 1.0
    assert np.isnan(to_numpy(grads.p)).all()


@pytest.mark.parametrize("backend", ["jax", "torch", "scipy"])
def test_throw_true_still_raises(backend):
    need_gradients(backend)
    f, kw, _ = FAILURES["max_steps"]
    with pytest.raises(dk.SolveError, match="max_steps"):
        dk.vjp(problem(backend, f), backend=backend, saveat=SAVES, **kw)


@pytest.mark.torch
def test_torch_checkpointed_backward_when_only_u0_was_reached():
    """Regression: the replay's checkpoint segments were built for one step too
    many when no step was needed (``zip() argument 2 is longer``)."""
    need("torch")
    import torch

    u0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    prob = dk.ODEProblem(lambda u, p, t: -p[0] * u, u0, (0.0, 2.0), p)
    sol = dk.solve(
        prob,
        "bosh3",
        saveat=SAVES,
        sensealg=dk.CheckpointedAdjoint(),
        max_steps=3,
        throw=False,
    )
    assert sol.status == "max_steps_reached"
    assert torch.isnan(sol.u[1:]).all()
    sol.u[0].sum().backward()  # only u0's row, which is u0
    assert u0.grad is not None
    assert p.grad is not None
    assert float(u0.grad) == 1.0
    assert float(p.grad) == 0.0
