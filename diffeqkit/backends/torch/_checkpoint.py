"""CheckpointedAdjoint on torch: a reverse pass over recomputed segments.

The forward pass is the plain solve, keeping the step schedule and the states at
the starts of at most ``checkpoints`` segments (`_replay.Recorder`). The backward
pass replays each segment from its checkpoint, last to first, with autograd
recording, and differentiates it once: the gradient of `ReverseThroughSolver` to
rounding, with the memory of the checkpoints plus one segment's graph.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch.autograd.function import once_differentiable

from ..._pytree import leaves
from ..._sensealg import CheckpointedAdjoint
from ..._solution import Solution
from .._protocol import SolveRequest
from ._replay import Plan, Replayer, Schedule, make_plan, record
from ._solve import replace_leaves


def solve(req: SolveRequest) -> Solution:
    """A solve whose gradients come from `_Checkpointed`."""
    plan = make_plan(req)
    u = _Checkpointed.apply(plan, plan.setup.y0, *leaves(plan.setup.p))
    return plan.solution(u)


class _Checkpointed(torch.autograd.Function):
    """``(y0, *p_leaves) -> u`` at every integration time, differentiated by
    replaying checkpointed segments (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, plan: Plan, *inputs: Any) -> torch.Tensor:
        sensealg = cast("CheckpointedAdjoint", plan.req.sensealg)
        run, schedule = record(plan, keep=True, checkpoints=sensealg.checkpoints)
        ctx.plan = plan
        ctx.schedule = schedule
        ctx.inputs = inputs
        return run.u

    @staticmethod
    @once_differentiable
    def backward(  # pyright: ignore[reportIncompatibleMethodOverride]
        ctx: Any, grad_u: torch.Tensor
    ) -> tuple[Any, ...]:
        plan: Plan = ctx.plan
        schedule: Schedule = ctx.schedule
        needs = ctx.needs_input_grad[1:]
        grads = _backward(plan, schedule, list(ctx.inputs), needs, grad_u)
        return (None, *grads)


def _backward(
    plan: Plan,
    schedule: Schedule,
    inputs: list[Any],
    needs: tuple[bool, ...],
    grad_u: torch.Tensor,
) -> list[Any]:
    """Gradients with respect to `inputs` (None where not needed)."""
    setup = plan.setup
    replayer = Replayer(plan, schedule)
    wrt = [i for i in range(1, len(inputs)) if needs[i]]
    param_grads: list[Any] = [None] * len(inputs)
    adjoint: torch.Tensor | None = None  # cotangent of the state at segment end
    for start, stop in reversed(schedule.segments()):
        with torch.enable_grad():
            y = schedule.states[start].detach().requires_grad_()
            local = list(inputs)
            for i in wrt:
                local[i] = inputs[i].detach().requires_grad_()
            func = setup.rhs(first=False, p=replace_leaves(setup.p, local[1:]))
            reads: dict[int, torch.Tensor] = {}
            y_end = replayer.run(func, y, start, stop, reads)
            outputs = list(reads.values())
            cotangents = [grad_u[row] for row in reads]
            if adjoint is not None:
                outputs.append(y_end)
                cotangents.append(adjoint)
            targets = [y, *(local[i] for i in wrt)]
            found = torch.autograd.grad(outputs, targets, cotangents, allow_unused=True)
        # The graph of this segment is gone; only its gradients are kept.
        del outputs, reads, y_end
        adjoint = found[0] if found[0] is not None else torch.zeros_like(y)
        for i, g in zip(wrt, found[1:], strict=True):
            if g is not None:
                param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
    grads: list[Any] = [None] * len(inputs)
    if needs[0]:
        row0 = grad_u[0]
        grads[0] = row0 if adjoint is None else adjoint + row0
    for i in wrt:
        grads[i] = (
            param_grads[i]
            if param_grads[i] is not None
            else torch.zeros_like(inputs[i])
        )
    return grads
