"""CheckpointedAdjoint on torch: a reverse pass over recomputed segments.

The forward pass is the plain solve, keeping the step schedule and the states at
the starts of at most ``checkpoints`` segments (`_replay.Recorder`). The backward
pass replays each segment from its checkpoint, last to first, with autograd
recording, and differentiates it once: the gradient of `ReverseThroughSolver` to
rounding, with the memory of the checkpoints plus one segment's graph.

With ``checkpoints=None`` and an adaptive explicit alg, the forward pass records
the graph of its first `KEEP_STEPS` steps (`_Keeper`) and then goes on without
one: those steps are not replayed. A solve of at most that many steps (a neural
ODE's typical training solve) is then differentiated at the cost of
`ReverseThroughSolver`, with no recomputation; a longer one replays only the
steps after them, and holds that many steps' graph besides one segment's. On
the compiled engine (`_engine`) a solve first runs as `ReverseThroughSolver`'s
one pass through its adaptive blocks under autograd, for at most
`KEEP_STEPS` attempts (whole blocks): a solve that fits is differentiated from
that graph, with no replay (the spiral's training step: 1.3x faster than the
solve then its replay). A longer one is started again without a graph and
replayed from checkpoints; the structure's next solves skip the first try
until one fits again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
from torch.autograd.function import once_differentiable

from ..._pytree import leaves
from ..._sensealg import CheckpointedAdjoint
from ..._solution import Solution
from .._protocol import SolveRequest
from . import _engine, _engine_adjoint
from ._replay import Plan, Recorder, Replayer, Schedule, make_plan, record
from ._rk import AdaptiveRK, State, interpolate
from ._solve import replace_leaves, solver_for

# Steps whose graph the forward pass keeps (see the module docstring). Measured
# on the spiral neural ODE (benchmarks/neural_torch.py): a 5-step training solve
# went from 1.2x torchdiffeq.odeint + backward to the cost of ReverseThroughSolver.
KEEP_STEPS = 16

# Per problem structure on the compiled engine (`_engine._key`): whether its last
# solve needed more than KEEP_STEPS attempts (see `_one_pass`).
_LONG: dict[tuple[Any, ...], bool] = {}


def solve(req: SolveRequest) -> Solution:
    """A solve whose gradients come from `_Checkpointed`."""
    sensealg = cast("CheckpointedAdjoint", req.sensealg)
    solved = _one_pass(req, sensealg)
    if solved is not None:
        return solved
    # The compiled engine records no graph in its forward pass: it replays.
    keep = (
        sensealg.checkpoints is None
        and not req.alg.implicit
        and issubclass(solver_for(req), AdaptiveRK)
        and not _engine.enabled(req)
    )
    plan = make_plan(req)
    inputs = [plan.setup.y0, *leaves(plan.setup.p)]
    if keep:
        plan = _aliased(plan)
    u = _Checkpointed.apply((plan, keep), *inputs)
    sol = plan.solution(u)
    if (key := _one_pass_key(req, sensealg)) is not None:
        attempts = sol.stats.get("naccept", 0) + sol.stats.get("nreject", 0)
        _LONG[key] = attempts > KEEP_STEPS
    return sol


def _one_pass_key(
    req: SolveRequest, sensealg: CheckpointedAdjoint
) -> tuple[Any, ...] | None:
    """The structure's key where the compiled engine's one pass may serve
    (default checkpoints, an adaptive explicit alg on the engine), else None."""
    if (
        sensealg.checkpoints is not None
        or req.fixed_step
        or not _engine.enabled(req)
        or not _engine.explicit(req)
    ):
        return None
    if len(_LONG) > 1024:  # a new f per call: forget the oldest structures
        _LONG.clear()
    # (The key is by identity, and ignores the direction: a heuristic's.)
    return (req.alg.name, *_engine._key(req, False))


def _one_pass(req: SolveRequest, sensealg: CheckpointedAdjoint) -> Solution | None:
    """The solve differentiated in one pass through its compiled blocks (as
    ReverseThroughSolver), if it takes at most `KEEP_STEPS` attempts: the
    gradient of the replay from the same steps, and at most the graph the
    eager `_Keeper` keeps. None where it does not fit (or the structure's last
    solve did not), records no graph, or the engine does not serve."""
    key = _one_pass_key(req, sensealg)
    if key is None or _LONG.get(key, False):
        return None
    try:
        return _engine_adjoint.through(req, max_blocks=KEEP_STEPS // _engine.BLOCK)
    except _engine.TooLongError:
        _LONG[key] = True
        return None


def _aliased(plan: Plan) -> Plan:
    """`plan` on detached aliases of its inputs, with ``f(u0, p, t0)`` (the first
    stage of step one) recorded from them: the graph that `_Keeper` keeps then
    starts at the aliases, not at whatever computed u0 and p outside the solve,
    which autograd reaches through `_Checkpointed`'s own inputs. (Kept on the
    originals, a p that also computed u0 was counted twice.)"""
    setup = plan.setup

    def alias(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        return x.detach().requires_grad_(x.requires_grad)

    y0 = alias(setup.y0)
    p = replace_leaves(setup.p, [alias(x) for x in leaves(setup.p)])
    with torch.enable_grad():
        du0 = setup.f(y0, p, setup.times[0].to(setup.dtype))
    return Plan(plan.req, dataclasses.replace(setup, y0=y0, p=p, du0=du0))


class _Keeper(Recorder):
    """A `Recorder` for a forward pass run with autograd recording: the graph of
    the first `keep` steps is kept (their dense output, and the state where they
    end); at the start of step `keep` recording stops, and checkpoints are taken
    from there on as `Recorder` takes them from step 0."""

    def __init__(self, keep: int) -> None:
        super().__init__(keep=False)
        self.keep = keep
        self.tail = Recorder(keep=True)
        # (t0, t1, dense coefficients) of each kept step, with their graph.
        self.kept: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = []
        # The state at the start of step `keep`, with its graph (None: the solve
        # ended before it).
        self.boundary: torch.Tensor | None = None

    def step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        n = len(self.t0)
        self.t0.append(float(t0))
        self.dt.append(float(dt))
        if n < self.keep:
            return
        if n == self.keep:
            self.boundary = y0
            # The rest of the forward pass records no graph; the caller's
            # `torch.enable_grad()` block restores the mode when the run ends.
            torch.set_grad_enabled(False)
            y0 = y0.detach()
        self.tail.step(t0, y0, dt)
        self.states = {self.keep + i: y for i, y in self.tail.states.items()}

    def accepted(self, state: State) -> None:
        if len(self.t0) <= self.keep:
            self.kept.append((state.t0, state.t1, state.coeffs))


class _Checkpointed(torch.autograd.Function):
    """``(y0, *p_leaves) -> u`` at every integration time, differentiated by
    replaying checkpointed segments (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, planned: tuple[Plan, bool], *inputs: Any) -> torch.Tensor:
        plan, keep = planned
        sensealg = cast("CheckpointedAdjoint", plan.req.sensealg)
        keeper = None
        if keep:
            keeper = _Keeper(KEEP_STEPS)
            with torch.enable_grad():
                run, schedule = record(plan, recorder=keeper)
        else:
            run, schedule = record(plan, keep=True, checkpoints=sensealg.checkpoints)
            if (
                sensealg.checkpoints is None
                and schedule.needed <= KEEP_STEPS
                and _engine.enabled(plan.req)
            ):
                # The engine's rule for `_Keeper`'s: a short solve is one
                # segment (compiled replays pad segments to whole blocks).
                for step in [i for i in schedule.states if i]:
                    del schedule.states[step]
        ctx.plan = plan
        ctx.schedule = schedule
        # The kept graph starts at the plan's aliases (`_aliased`): its gradients
        # are taken with respect to them.
        ctx.inputs = (plan.setup.y0, *leaves(plan.setup.p)) if keep else inputs
        ctx.keeper = keeper
        return run.u.detach()

    @staticmethod
    @once_differentiable
    def backward(  # pyright: ignore[reportIncompatibleMethodOverride]
        ctx: Any, grad_u: torch.Tensor
    ) -> tuple[Any, ...]:
        plan: Plan = ctx.plan
        schedule: Schedule = ctx.schedule
        needs = ctx.needs_input_grad[1:]
        grads = _backward(plan, schedule, list(ctx.inputs), needs, grad_u, ctx.keeper)
        return (None, *grads)


def _backward(
    plan: Plan,
    schedule: Schedule,
    inputs: list[Any],
    needs: tuple[bool, ...],
    grad_u: torch.Tensor,
    keeper: _Keeper | None = None,
) -> list[Any]:
    """Gradients with respect to `inputs` (None where not needed): the replayed
    segments last to first, then the steps `keeper` kept the graph of."""
    setup = plan.setup
    replayer = Replayer(plan, schedule)
    wrt = [i for i in range(1, len(inputs)) if needs[i]]
    param_grads: list[Any] = [None] * len(inputs)
    adjoint: torch.Tensor | None = None  # cotangent of the state at segment end
    segments = schedule.segments()
    if keeper is not None:
        segments = [(a, b) for a, b in segments if a >= keeper.keep]
    for start, stop in reversed(segments):
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
    if keeper is not None:
        adjoint = _kept_backward(
            keeper, schedule, inputs, needs, wrt, grad_u, adjoint, param_grads
        )
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


def _kept_backward(
    keeper: _Keeper,
    schedule: Schedule,
    inputs: list[Any],
    needs: tuple[bool, ...],
    wrt: list[int],
    grad_u: torch.Tensor,
    adjoint: torch.Tensor | None,
    param_grads: list[Any],
) -> torch.Tensor | None:
    """Differentiate the kept steps' graph: the rows read off them (recomputed
    from their dense output, with its graph) and, if later steps were replayed,
    the state where they end with the replay's cotangent. Adds the parameters'
    gradients to `param_grads`; returns the cotangent of y0 (None if none)."""
    outputs: list[torch.Tensor] = []
    cotangents: list[torch.Tensor] = []
    with torch.enable_grad():
        for n, (t0, t1, coeffs) in enumerate(keeper.kept[: schedule.needed]):
            for row in schedule.reads[n]:
                outputs.append(interpolate(coeffs, t0, t1, schedule.times[row]))
                cotangents.append(grad_u[row])
        if adjoint is not None and keeper.boundary is not None:
            outputs.append(keeper.boundary)
            cotangents.append(adjoint)
    targets = [inputs[i] for i in ([0] if needs[0] else []) + wrt]
    live = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
    if not targets or not live:
        return None
    # Kept for a second backward through the same solve (dk.vjp's pullback).
    found = torch.autograd.grad(
        [o for o, _ in live],
        targets,
        [c for _, c in live],
        allow_unused=True,
        retain_graph=True,
    )
    du0 = found[0] if needs[0] else None
    for i, g in zip(wrt, found[1:] if needs[0] else found, strict=True):
        if g is not None:
            param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
    return du0
