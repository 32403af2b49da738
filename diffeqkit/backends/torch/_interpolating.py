"""InterpolatingAdjoint on torch: the adjoint ODE against the forward dense output.

The state ``u(s)`` is read off the forward solve's dense output (the method's own
for adaptive algs, cubic Hermite through the step values for fixed steps) and only
the adjoint ``(a, g)`` is integrated backward, with the forward method: adaptively
(steps landing on every forward step end) or on the forward grid reversed. Stable
on stiff problems, where a backsolve is not; memory O(steps).
"""

from __future__ import annotations

import bisect
import functools
import itertools
from typing import Any, cast

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ..._errors import SolveError
from ..._pytree import leaves
from ..._sensealg import InterpolatingAdjoint, adjoint_atol
from ..._solution import Solution
from .._protocol import SolveRequest
from . import _engine, _engine_adjoint
from ._adjoint import backward_stopped, input_gradients
from ._rk import AdaptiveRK, FixedRK, Rhs, Run, State
from ._solve import Setup, finish, prepare, replace_leaves, run_steps, solver_for

__all__ = ["LAST_BACKWARD", "solve"]

# The last backward pass: counts "naccept", "nreject", "njev", "nfev" (ints) and
# the step ends, in solver time, of the forward solve ("forward_ends") and of the
# backward one ("backward_ends"), as tuples of floats.
LAST_BACKWARD: dict[str, Any] = {}


def solve(req: SolveRequest) -> Solution:
    """A solve whose gradients come from `_InterpolatingAdjoint`."""
    setup = prepare(req, graph=False)
    dense = _DenseOutput()
    with torch.no_grad():
        run = run_steps(req, setup, dense)
    if run.status != "success":
        return finish(req, setup, run, run.u)
    if req.fixed_step:
        dense.hermite(setup, run)
    else:
        dense.freeze()
    u = _InterpolatingAdjoint.apply(
        (req, setup, run, dense), setup.y0, *leaves(setup.p)
    )
    return finish(req, setup, run, cast("torch.Tensor", u))


class _DenseOutput:
    """The forward solve's dense output, kept step by step by its recorder hooks
    (`step`, `accepted`), then tabulated by `freeze` (adaptive) or `hermite`
    (fixed steps) and read as ``u(s)``, ``s`` in solver time."""

    starts: torch.Tensor
    ends: torch.Tensor
    table: torch.Tensor

    def __init__(self) -> None:
        self.bounds: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.coeffs: list[list[torch.Tensor]] = []
        self.states: list[torch.Tensor] = []
        self.tabulated = False

    def engine_steps(self, steps: torch.Tensor, dense: torch.Tensor) -> None:
        """The accepted steps of a run on the compiled engine: ``(start, size,
        end)`` of shape ``(3, steps)`` and their dense outputs ``(steps,
        degree + 1, *u0.shape)``, tabulated at once (`freeze` then keeps them)."""
        self.starts, self.ends = steps[0], steps[2]
        self.table = dense.movedim(1, 0)
        self.tabulated = True

    def step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        """Every accepted step's start: what fixed steps are read from."""
        self.bounds.append((t0, t0 + dt))
        self.states.append(y0)

    def accepted(self, state: State) -> None:
        """An adaptive step: its dense-output coefficients."""
        self.coeffs.append(list(state.coeffs))
        # Its exact bounds (`step` saw t0 + dt, which may round differently).
        self.bounds[-1] = (state.t0, state.t1)

    def hermite(self, setup: Setup, run: Run) -> None:
        """Tabulate the cubic Hermite interpolant through the fixed steps' values
        and slopes (``f`` evaluated again at every grid point)."""
        # The grid: every step's start, and t1 (`step` saw t0 + dt, which may
        # round differently from the next start).
        grid = [t0 for t0, _ in self.bounds] + [setup.times[-1]]
        ys = [*self.states, run.u[-1]]
        rhs = setup.rhs(first=False)
        with torch.no_grad():
            fs = [rhs(t, y) for t, y in zip(grid, ys, strict=True)]
        self.bounds = list(itertools.pairwise(grid))
        for k, (t0, t1) in enumerate(self.bounds):
            h = (t1 - t0).to(ys[k].dtype)
            y0, y1, f0, f1 = ys[k], ys[k + 1], fs[k], fs[k + 1]
            self.coeffs.append(
                [
                    y0,
                    h * f0,
                    3 * (y1 - y0) - h * (2 * f0 + f1),
                    2 * (y0 - y1) + h * (f0 + f1),
                ]
            )
        self.freeze()

    def freeze(self) -> None:
        """Stack the steps: `starts`, `ends` of shape ``(steps,)`` and `table` of
        shape ``(degree + 1, steps, *u0.shape)``."""
        if self.tabulated:
            del self.bounds, self.coeffs, self.states
            return
        self.starts = torch.stack([t0 for t0, _ in self.bounds])
        self.ends = torch.stack([t1 for _, t1 in self.bounds])
        self.table = torch.stack([torch.stack(c) for c in self.coeffs], dim=1)
        del self.bounds, self.coeffs, self.states

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        """``u(s)``: the polynomial of the step containing `s` (clamped into the
        span), in powers of ``x = (s - start) / (end - start)``. The lookup stays
        on the device: no host round trip per evaluation."""
        s = s.clamp(self.starts[0], self.ends[-1])
        # An s on a step end belongs to the step before it, which the backward
        # solve, running towards t0, steps through next.
        k = torch.searchsorted(self.ends, s.detach().reshape(1))[0]
        k = k.clamp(max=self.ends.numel() - 1)
        start, end = self.starts[k], self.ends[k]
        x = ((s - start) / (end - start)).to(self.table.dtype)
        total = self.table[-1, k]
        for i in range(self.table.shape[0] - 2, -1, -1):
            total = self.table[i, k] + x * total
        return total


class _InterpolatingAdjoint(torch.autograd.Function):
    """``(y0, *p_leaves) -> u`` at every integration time, differentiated by the
    adjoint ODE against the forward dense output (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any, solved: tuple[SolveRequest, Setup, Run, _DenseOutput], *inputs: Any
    ) -> torch.Tensor:
        ctx.solved = solved
        ctx.inputs = inputs
        return solved[2].u.clone()

    @staticmethod
    @once_differentiable
    def backward(  # pyright: ignore[reportIncompatibleMethodOverride]
        ctx: Any, grad_u: torch.Tensor
    ) -> tuple[Any, ...]:
        req, setup, run, dense = ctx.solved
        return input_gradients(
            ctx,
            lambda inputs, wrt: _adjoint(req, setup, run, dense, inputs, wrt, grad_u),
        )


def _adjoint(
    req: SolveRequest,
    setup: Setup,
    run: Run,
    dense: _DenseOutput,
    inputs: list[Any],
    wrt: list[int],
    grad_u: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(dL/dy0, [dL/d inputs[i] for i in wrt])`` by the backward solve."""
    sensealg = cast("InterpolatingAdjoint", req.sensealg)
    dtype, shape = setup.dtype, setup.y0.shape
    n = setup.y0.numel()
    params = [inputs[i].detach() for i in wrt]
    sizes = [x.numel() for x in params]
    fixed = [x.detach() if isinstance(x, torch.Tensor) else x for x in inputs[1:]]

    def dynamics(z: torch.Tensor, _: Any, tau: torch.Tensor) -> torch.Tensor:
        s = -tau
        a = z[:n].reshape(shape)

        def f(u: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
            local = list(fixed)
            for i, x in zip(wrt, ps, strict=True):
                local[i - 1] = x
            return setup.f(u, replace_leaves(setup.p, local), s.to(dtype))

        pull = torch.func.vjp(f, dense(s), *params)[1]
        au, *aps = pull(a)
        return torch.cat([au.reshape(-1), *(x.reshape(-1).to(dtype) for x in aps)])

    # Solver time stays float64 here (the interpolant is read at it); f gets it
    # in the state's dtype, as in the forward solve.
    rhs = Rhs(dynamics, None, torch.float64)
    solver_class = solver_for(req)
    rtol = req.rtol if sensealg.rtol is None else sensealg.rtol
    atol = (
        float(adjoint_atol(req.atol, grad_u, run.u))
        if sensealg.atol is None
        else sensealg.atol
    )
    stop = functools.partial(backward_stopped, req, setup.backward)
    if dense.tabulated and not req.fixed_step and _engine.explicit(req):
        found = _engine_adjoint.interpolating(
            req, setup, dense, inputs, wrt, grad_u, rtol, atol, stop
        )
        if found is not None:
            du0, dps, record = found
            LAST_BACKWARD.clear()
            LAST_BACKWARD.update(record)
            return du0, dps
    times = setup.times.to(dtype=torch.float64).tolist()
    # Where the backward steps land, in tau: every forward step end.
    forward_ends = dense.ends.tolist()
    landings = sorted({-s for s in forward_ends} | {-s for s in times})
    cot = grad_u.reshape(grad_u.shape[0], -1).to(dtype)
    z = torch.cat([cot[-1], cot.new_zeros(sum(sizes))])
    counts = {"naccept": 0, "nreject": 0, "njev": 0}
    backward_ends: list[float] = []

    def accepted(state: Any) -> None:
        backward_ends.append(-float(state.t1))

    first_step = None
    on_grid = issubclass(solver_class, FixedRK)
    grid = np.array([float(dense.starts[0]), *forward_ends]) if on_grid else None
    # Integration times are strictly increasing in solver time (`build_request`
    # checks saveat; t0 and t1 are not repeated).
    for i in range(len(times) - 1, 0, -1):
        start, end = -times[i], -times[i - 1]
        if grid is not None:
            # The forward steps of this interval, backward.
            lo, hi = np.searchsorted(grid, [times[i - 1], times[i]])
            taus = torch.as_tensor(-grid[lo : hi + 1][::-1], device=z.device)
            z = cast("type[FixedRK]", solver_class).march(rhs, z, taus)[-1]
            counts["naccept"] += int(hi - lo)
            backward_ends.extend(-float(t) for t in taus[1:])
        else:
            lo = bisect.bisect_right(landings, start)
            hi = bisect.bisect_right(landings, end)
            solver = cast("type[AdaptiveRK]", solver_class)(
                rhs,
                z,
                rtol,
                atol,
                first_step=first_step,
                max_steps=req.max_steps,
                step_t=torch.tensor(
                    landings[lo:hi], dtype=torch.float64, device=z.device
                ),
                stop=stop,
                n_implicit=n,
            )
            solver.on_accept = accepted
            taus = torch.tensor([start, end], dtype=torch.float64, device=z.device)
            solver.begin(taus[0])
            z = solver.advance(taus[1])
            # The next interval starts where this one's controller left off.
            first_step = solver.state.dt
            counts["naccept"] += solver.naccept
            counts["nreject"] += solver.nsteps - solver.naccept
            counts["njev"] += getattr(solver, "njev", 0)
        # The cotangent of this row joins in.
        z = torch.cat([z[:n] + cot[i - 1], z[n:]])
    LAST_BACKWARD.clear()
    LAST_BACKWARD.update(
        counts,
        nfev=rhs.nfev,
        forward_ends=tuple(forward_ends),
        backward_ends=tuple(sorted(backward_ends)),
    )
    if not bool(torch.isfinite(z).all()):  # pragma: no cover - the solver stops first
        raise SolveError(f"{req.sensealg!r}: the adjoint is not finite")
    du0 = z[:n].reshape(shape)
    dps = [
        g.reshape(x.shape).to(x.dtype)
        for g, x in zip(z[n:].split(sizes), params, strict=True)
    ]
    return du0, dps
