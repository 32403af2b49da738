"""ContinuousAdjoint on JAX: diffrax's `BacksolveAdjoint`, the adjoint ODE and the
state integrated backward together, with the sensealg's tolerances (else the
forward ones). The core refuses it with implicit algs (`InterpolatingAdjoint`)."""

from __future__ import annotations

from typing import Any

import diffrax
import jax.numpy as jnp

from ._solve import Job, solve_with

__all__ = ["solve"]


def solve(job: Job) -> tuple[Any, Any]:
    """The backsolve. Its backward solve raises when it fails (one that drifts off
    the forward trajectory can hit max_steps), even where the forward one reports
    a status instead (`dk.vjp`): a silently truncated adjoint would be a wrong
    gradient. Only ``throw=False`` under a transformation lets it go on, where a
    failed forward solve makes the gradient NaN anyway (`failure_masked`) and a
    raise would stop the caller's program (a sampler's proposal)."""
    _, _, rtol, atol, dt0 = job.times
    if job.grid is not None:
        # Fixed steps: diffrax solves the adjoint between consecutive save times,
        # stepping by dt0 backward from each save time (a grid of its own).
        backward = jnp.where(job.grid[-1] > job.grid[0], -dt0, dt0)
        adjoint = diffrax.BacksolveAdjoint(
            stepsize_controller=diffrax.ConstantStepSize(),
            dt0=backward,
            throw=job.cfg.throw,
        )
    else:
        sensealg = job.sensealg
        adjoint = diffrax.BacksolveAdjoint(
            stepsize_controller=job.cfg.method.controller(
                rtol if sensealg.rtol is None else sensealg.rtol,
                atol if sensealg.atol is None else sensealg.atol,
            ),
            throw=job.cfg.throw,
        )
    # diffrax's backsolve refuses a given solver state: it initialises its own.
    return solve_with(job, adjoint, own_init=True)
