"""ForwardMode on torch: the Jacobian of the saved states by forward-mode AD.

The forward pass records the step schedule, then replays it under
``torch.func.vmap(torch.func.jvp(...))`` with one tangent per input number (a loop
of ``jvp`` where vmap refuses ``f``); the backward pass contracts that Jacobian
with the cotangent. Constants of the replay are "lifted" to carry zero tangents,
which keeps torch's forward-mode AD on its fast path.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..._errors import UnsupportedError
from ..._pytree import leaves
from ..._solution import Solution
from .._protocol import SolveRequest
from . import _engine, _engine_adjoint
from ._replay import Plan, Replayer, Schedule, make_plan, record
from ._rk import Lift
from ._solve import replace_leaves


def solve(req: SolveRequest) -> Solution:
    """A solve whose gradients come from `_ForwardMode`."""
    plan = make_plan(req)
    u = _ForwardMode.apply(plan, plan.setup.y0, *leaves(plan.setup.p))
    return plan.solution(u)


class _ForwardMode(torch.autograd.Function):
    """``(y0, *p_leaves) -> u`` at every integration time, with its Jacobian
    computed forward (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, plan: Plan, *inputs: Any) -> torch.Tensor:
        run, schedule = record(plan)
        wrt = [i for i, need in enumerate(ctx.needs_input_grad[1:]) if need]
        ctx.wrt = wrt
        ctx.shapes = [(inputs[i].shape, inputs[i].dtype) for i in wrt]
        ctx.reached = schedule.reached
        ctx.jacobians = _jacobians(plan, schedule, list(inputs), wrt)
        ctx.ninputs = len(inputs)
        return run.u

    @staticmethod
    @once_differentiable
    def backward(  # pyright: ignore[reportIncompatibleMethodOverride]
        ctx: Any, grad_u: torch.Tensor
    ) -> tuple[Any, ...]:
        grads: list[Any] = [None] * ctx.ninputs
        cotangent = grad_u[: ctx.reached]
        for i, jac, (shape, dtype) in zip(
            ctx.wrt, ctx.jacobians, ctx.shapes, strict=True
        ):
            ct = cotangent.to(jac.dtype)
            grad = torch.tensordot(jac, ct, dims=ct.dim())
            grads[i] = grad.reshape(shape).to(dtype)
        return (None, *grads)


def _jacobians(
    plan: Plan, schedule: Schedule, inputs: list[Any], wrt: list[int]
) -> list[torch.Tensor]:
    """``d u / d inputs[i]`` for ``i`` in `wrt`, each of shape
    ``(*inputs[i].shape, reached, *u0.shape)``.

    Every floating input is a primal of the jvp, those not in `wrt` with zero
    tangents, and every constant of the steps is lifted (`_lifter`): torch's
    forward-mode AD of an operation between a tensor with a tangent and one
    without (or a Python number) goes through Python reference implementations
    (torch 2.13, measured: ~300 us against ~10 us per multiplication), which
    made the replay 3x slower.
    """
    if _engine.explicit(plan.req):
        found = _engine_adjoint.jacobians(plan, schedule, inputs, wrt)
        if found is not None:
            return found
    setup = plan.setup
    primal_at = [
        i
        for i, x in enumerate(inputs)
        if isinstance(x, torch.Tensor) and x.is_floating_point()
    ]
    primals = tuple(inputs[i] for i in primal_at)
    sizes = [inputs[i].numel() for i in wrt]
    total = sum(sizes)

    def rows(*xs: torch.Tensor) -> torch.Tensor:
        full = list(inputs)
        for i, x in zip(primal_at, xs, strict=True):
            full[i] = x
        y0 = full[0]
        replayer = Replayer(plan, schedule, _lifter(y0))
        func = setup.rhs(first=False, p=replace_leaves(setup.p, full[1:]))
        out: dict[int, torch.Tensor] = {}
        replayer.run(func, y0, 0, schedule.needed, out)
        return torch.stack([y0, *(out[j] for j in range(1, schedule.reached))])

    def tangent(*ts: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(rows, primals, ts)[1]

    # One basis direction per number in the inputs of `wrt`: row k of the
    # identity, cut into their shapes and dtypes; zeros for the other primals.
    basis = []
    offset = 0
    for i in primal_at:
        x = inputs[i]
        if i in wrt:
            eye = torch.eye(total, dtype=x.dtype, device=x.device)
            basis.append(eye[:, offset : offset + x.numel()].reshape(total, *x.shape))
            offset += x.numel()
        else:
            basis.append(x.new_zeros(total, *x.shape))
    try:
        with _quiet_jit():
            jac = torch.func.vmap(tangent)(*basis)
    except RuntimeError:
        # f cannot be batched: push the tangents one at a time.
        try:
            with _quiet_jit():
                jac = torch.stack(
                    [tangent(*(b[k] for b in basis)) for k in range(total)]
                )
        except RuntimeError as err:
            raise UnsupportedError(
                "sensealg=dk.ForwardMode() on backend='torch' differentiates f by "
                f"forward-mode AD (torch.func.jvp), which failed on this f: {err}. "
                "Use sensealg=dk.ReverseThroughSolver() or dk.CheckpointedAdjoint(), "
                "which need only reverse-mode autograd."
            ) from err
    # (total, reached, *u0.shape) -> one (*x.shape, reached, *u0.shape) per input.
    out_shape = jac.shape[1:]
    return [
        part.reshape(*inputs[i].shape, *out_shape)
        for i, part in zip(wrt, jac.split(sizes), strict=True)
    ]


def _lifter(y0: torch.Tensor) -> Lift:
    """A `Lift` that makes constants take part in y0's forward-mode AD: each is
    multiplied by an exact 1 derived from y0 (a 1x1 matrix product, which
    forward-mode AD runs on its fast path), so it gets a zero tangent and keeps
    its value bit for bit."""
    if y0.numel() == 0:
        return lambda c: c
    zeros = torch.zeros(1, 1, dtype=y0.dtype, device=y0.device)
    # y0 is finite (checked by ODEProblem), so this is exactly 0, then 1.
    one = (y0.reshape(-1)[:1] @ zeros).reshape(1, 1) + 1.0

    def lift(c: torch.Tensor) -> torch.Tensor:
        return (one.to(c.dtype) @ c.reshape(1, -1)).reshape(c.shape)

    return lift


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch loads its forward-AD decompositions on the first jvp of a process
    through ``torch.jit.script``, which warns that it is deprecated: torch's own
    business, nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "`torch.jit.script` is deprecated", DeprecationWarning
        )
        yield
