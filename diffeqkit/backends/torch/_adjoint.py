"""ContinuousAdjoint on torch: torchdiffeq's ``odeint_adjoint`` on our solvers.

Requirements met here:

- Explicit algs only: with an implicit alg, `solve` hands over to
  `_interpolating` (the interpolating adjoint), since a backsolve of a stiff
  problem re-integrates fast decaying modes backward, where they grow.
- ``torchdiffeq.odeint_adjoint`` runs the forward solve with method
  ``"diffeqkit_<alg>"`` and the options `solve` uses (``first_step``,
  ``max_steps``, the landing times ``step_t``; ``step_size`` for fixed-step
  algs), so its forward pass is the plain solve, step for step. The backward
  solve of the adjoint ODE runs the same method between consecutive integration
  times at the sensealg's ``rtol``/``atol`` (None: the forward ones), its steps
  landing on every integration time; fixed-step algs step by ``dt0`` backward
  from each of them.
- ``adjoint_params`` are exactly p's tensors that require grad (leaves that were
  Python numbers cannot). u0 gets its gradient as the adjoint state at t0.
- Stats are those of the forward pass: the solver object reports itself to a
  sink passed through ``options`` (torchdiffeq builds it inside ``odeint``), and
  ``nfev`` is read from the vector field before any backward pass; the backward
  solve is given its own options without that sink, so it counts nothing here.
- A backward solve that cannot go on (max_steps, a step size that underflows, a
  non-finite adjoint: the re-integrated state has left the forward trajectory,
  as on chaotic problems) raises `SolveError` saying so, from ``loss.backward()``
  or `dk.vjp`'s pullback; its ``max_steps`` is the forward solve's, per interval
  between integration times.
- A forward solve that fails (torchdiffeq has no partial results; a fixed-step
  solver steps on through a blow-up to inf/NaN) is solved again plainly to
  return the partial `Solution` with its status (or raise `SolveError`); that
  partial solution carries no gradient (`dk.vjp` gives zeros).
- Only u0 and the tensors in p are differentiated; tensors that ``f`` closes
  over get no gradient (pass them in p).
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
import torchdiffeq

from ..._errors import SolveError, backward_failed, solve_failed
from ..._pytree import leaves
from ..._sensealg import ContinuousAdjoint
from ..._solution import Solution
from .._protocol import SolveRequest
from ._solve import Run, Setup, _StoppedError, finish, prepare, run_steps


def solve(req: SolveRequest) -> Solution:
    """A solve whose gradients come from the backward adjoint ODE (for implicit
    algs, the interpolating adjoint of `_interpolating`)."""
    if req.alg.implicit:
        from . import _interpolating  # it imports this module

        return _interpolating.solve(req)
    sensealg = cast("ContinuousAdjoint", req.sensealg)
    setup = prepare(req, graph=False)
    rhs = setup.rhs()
    params = tuple(
        x for x in leaves(setup.p) if isinstance(x, torch.Tensor) and x.requires_grad
    )
    method = f"diffeqkit_{req.alg.name}"
    times = setup.times
    if req.alg.fixed_step:
        options: dict[str, Any] = {"step_size": req.dt0}
        adjoint_options: dict[str, Any] = {"step_size": req.dt0}
    else:
        options = {
            "first_step": req.dt0,
            "max_steps": req.max_steps,
            "step_t": times[1:] if req.land_on_saves else times[-1:],
        }
        adjoint_options = {
            "max_steps": req.max_steps,
            "step_t": times,
            "stop": functools.partial(_backward_stopped, req, setup.backward),
        }
    sink: list[Any] = []
    options["sink"] = sink
    try:
        u = torchdiffeq.odeint_adjoint(
            rhs,
            setup.y0,
            times,
            rtol=req.rtol,
            atol=req.atol,
            method=method,
            options=options,
            adjoint_rtol=req.rtol if sensealg.rtol is None else sensealg.rtol,
            adjoint_atol=req.atol if sensealg.atol is None else sensealg.atol,
            adjoint_method=method,
            adjoint_options=adjoint_options,
            adjoint_params=params,
        )
        u = cast("torch.Tensor", u)
    except _StoppedError:
        return _failed(req, setup)
    # Fixed-step solvers step on through a blow-up; the plain run tells where.
    if not bool(torch.isfinite(u).all()):
        return _failed(req, setup)
    (solver,) = sink
    naccept = solver.naccept
    run = Run(
        u=u,
        status="success",
        t_reached=None,
        naccept=naccept,
        nreject=solver.nsteps - naccept,
        nfev=rhs.nfev,
        reached=int(times.shape[0]),
        t_end=float(times[-1]),
    )
    return finish(req, setup, run, u)


def _failed(req: SolveRequest, setup: Setup) -> Solution:
    """The partial solution of a failed solve, by the plain run (no gradient)."""
    with torch.no_grad():
        run = run_steps(req, setup)
    return finish(req, setup, run, run.u)


def _backward_stopped(
    req: SolveRequest, backward: bool, status: str, t: float, steps: int
) -> SolveError:
    """The error of a backward (adjoint) solve that cannot go on. It runs in
    negated time, unless the forward solve already did (``t1 < t0``)."""
    reason = solve_failed(t if backward else -t, (req.t1, req.t0), status, steps, "")
    return SolveError(backward_failed(req.sensealg, reason))
