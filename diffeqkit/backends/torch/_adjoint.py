"""ContinuousAdjoint on torch: the backsolve adjoint, as a `torch.autograd.Function`.

The forward pass is the plain solve. The backward pass integrates the state, its
adjoint and the parameter adjoint backward from each integration time to the one
before with the forward method (Chen et al. 2018; torchdiffeq's
``odeint_adjoint``, whose augmented system, tolerances and error norm this keeps):
the state restarts from the forward value and the cotangent joins there.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, cast

import torch
from torch.autograd.function import once_differentiable

from ..._errors import SolveError, backward_failed, solve_failed
from ..._pytree import leaves
from ..._sensealg import ContinuousAdjoint
from ..._solution import Solution
from .._protocol import SolveRequest
from . import _engine, _engine_adjoint
from ._rk import AdaptiveRK, FixedRK, Run, rms_norm
from ._solve import Setup, finish, prepare, replace_leaves, run_steps, solver_for

__all__ = ["backward_stopped", "solve"]


def solve(req: SolveRequest) -> Solution:
    """A solve whose gradients come from `_Backsolve`. A failed solve returns its
    partial solution, with no gradient."""
    setup = prepare(req, graph=False)
    with torch.no_grad():
        run = run_steps(req, setup)
    if run.status != "success":
        return finish(req, setup, run, run.u)
    u = _Backsolve.apply((req, setup, run), setup.y0, *leaves(setup.p))
    return finish(req, setup, run, cast("torch.Tensor", u))


def backward_stopped(
    req: SolveRequest, backward: bool, status: str, t: float, steps: int
) -> SolveError:
    """The error of a backward (adjoint) solve that cannot go on. It runs in
    negated time, unless the forward solve already did (``t1 < t0``)."""
    reason = solve_failed(t if backward else -t, (req.t1, req.t0), status, steps, "")
    return SolveError(backward_failed(req.sensealg, reason))


class _Backsolve(torch.autograd.Function):
    """``(y0, *p_leaves) -> u`` at every integration time, differentiated by the
    backsolve (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any, solved: tuple[SolveRequest, Setup, Run], *inputs: Any
    ) -> torch.Tensor:
        ctx.solved = solved
        ctx.inputs = inputs
        return solved[2].u

    @staticmethod
    @once_differentiable
    def backward(  # pyright: ignore[reportIncompatibleMethodOverride]
        ctx: Any, grad_u: torch.Tensor
    ) -> tuple[Any, ...]:
        req, setup, run = ctx.solved
        return input_gradients(
            ctx,
            lambda inputs, wrt: _backsolve(req, setup, run, inputs, wrt, grad_u),
        )


def input_gradients(ctx: Any, integrate: Any) -> tuple[Any, ...]:
    """The return of an adjoint Function's backward: `integrate(inputs, wrt)`
    gives ``(du0, [dp_i for i in wrt])`` for the p leaves `wrt` that need one;
    placed in the Function's input order (its first input gets None)."""
    inputs = list(ctx.inputs)
    needs = ctx.needs_input_grad[1:]
    wrt = [i for i in range(1, len(inputs)) if needs[i]]
    du0, dps = integrate(inputs, wrt)
    grads: list[Any] = [None] * len(inputs)
    if needs[0]:
        grads[0] = du0
    for i, g in zip(wrt, dps, strict=True):
        grads[i] = g
    return (None, *grads)


def _backsolve(
    req: SolveRequest,
    setup: Setup,
    run: Run,
    inputs: list[Any],
    wrt: list[int],
    grad_u: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(dL/dy0, [dL/d inputs[i] for i in wrt])``.

    The backward state is ``z = (t-adjoint, u, a, g)`` flattened, integrated in
    ``tau = -s``: ``dz/dtau = -(-(df/dt)^T a, f, -(df/du)^T a, -(df/dp)^T a)``. Its
    error norm is the largest RMS norm of the four parts.
    """
    sensealg = cast("ContinuousAdjoint", req.sensealg)
    dtype, shape = setup.dtype, setup.y0.shape
    n = setup.y0.numel()
    params = [inputs[i].detach() for i in wrt]
    sizes = [x.numel() for x in params]
    fixed = [x.detach() if isinstance(x, torch.Tensor) else x for x in inputs[1:]]
    bounds = [0, 1, 1 + n, 1 + 2 * n]
    for size in sizes:
        bounds.append(bounds[-1] + size)

    def dynamics(tau: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            s = (-tau).to(z.dtype).detach().requires_grad_()
            y = z[1 : 1 + n].reshape(shape).detach().requires_grad_()
            ps = [x.detach().requires_grad_() for x in params]
            local = list(fixed)
            for i, x in zip(wrt, ps, strict=True):
                local[i - 1] = x
            fy = setup.f(y, replace_leaves(setup.p, local), s.to(dtype))
            a = z[1 + n : 1 + 2 * n].reshape(shape)
            found = torch.autograd.grad(fy, (s, y, *ps), -a, allow_unused=True)
        # torchdiffeq's order: (t-adjoint, f, u-adjoint, p-adjoints).
        parts = [found[0], fy, *found[1:]]
        like = [s, fy, y, *params]
        out = [
            (torch.zeros_like(x) if g is None else g).reshape(-1).to(z.dtype)
            for g, x in zip(parts, like, strict=True)
        ]
        return -torch.cat(out)

    def norm(z: torch.Tensor) -> torch.Tensor:
        pieces = [
            rms_norm(z[lo:hi]) for lo, hi in itertools.pairwise(bounds) if hi > lo
        ]
        return torch.stack(pieces).max()

    solver = solver_for(req)
    rtol = req.rtol if sensealg.rtol is None else sensealg.rtol
    atol = req.atol if sensealg.atol is None else sensealg.atol
    stop = functools.partial(backward_stopped, req, setup.backward)
    if _engine.explicit(req) and not req.fixed_step:
        found = _engine_adjoint.backsolve(
            req, setup, run, inputs, wrt, grad_u, rtol, atol, stop
        )
        if found is not None:
            return found
    times = setup.times
    rows = run.u.reshape(run.u.shape[0], -1)
    cot = grad_u.reshape(grad_u.shape[0], -1).to(rows.dtype)
    z = torch.cat([rows.new_zeros(1), rows[-1], cot[-1], rows.new_zeros(sum(sizes))])
    for i in range(times.shape[0] - 1, 0, -1):
        taus = torch.stack([-times[i], -times[i - 1]])
        if issubclass(solver, FixedRK):
            if req.dt0 is None:  # pragma: no cover - the core checks it
                raise ValueError("a fixed-step solve needs dt0")
            grid, _ = solver.grid(taus, req.dt0)
            z = solver.march(dynamics, z, grid)[-1]
        else:
            stepper = cast("type[AdaptiveRK]", solver)(
                dynamics,
                z,
                rtol,
                atol,
                max_steps=req.max_steps,
                step_t=taus[1:],
                stop=stop,
                norm=norm,
            )
            stepper.begin(taus[0])
            z = stepper.advance(taus[1])
        # The state restarts from the forward one; the cotangent joins in.
        z = torch.cat(
            [z[:1], rows[i - 1], z[1 + n : 1 + 2 * n] + cot[i - 1], z[1 + 2 * n :]]
        )
    du0 = z[1 + n : 1 + 2 * n].reshape(shape)
    dps = [
        g.reshape(x.shape).to(x.dtype)
        for g, x in zip(z[1 + 2 * n :].split(sizes), params, strict=True)
    ]
    return du0, dps
