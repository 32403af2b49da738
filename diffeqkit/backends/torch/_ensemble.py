"""An ensemble on torch: many members of one problem in one batched solve.

`solve_ensemble` integrates a batch of members (per-member ``u0`` and/or ``p``)
with the explicit Runge-Kutta tableaux of `_rk`. Adaptive algs give every member
its own time, step size, error norm, accept/reject decision, step count and
status, with the controller of `_rk.AdaptiveRK`, so each member takes the steps
its own `dk.solve` takes. The user's single-member ``f(u, p, t)`` is evaluated
on the batch by `torch.func.vmap` (a Python loop over members where ``f`` cannot
be vmapped). Members that finish or fail leave the batch: later steps evaluate
``f`` only on the members still running. Fixed-step algs step the whole batch on
the shared grid. Gradients flow by autograd through the steps (the discrete
derivative, as ReverseThroughSolver gives for one solve; step sizes held
fixed); `vjp_ensemble` wraps that as a pullback. ``devices=[...]`` splits the
members into one chunk per device. Implicit algs, events (a batched event
solver is not needed: each member locates its own), and the continuous adjoints
while autograd records, solve the members one by one instead (`one_by_one`),
each by the backend's own solve, so every alg, sensealg and event works on
ensembles.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..._errors import InvalidProblemError, UnsupportedError
from ..._events import stack_members
from ..._pytree import leaves, tree_map
from ..._solution import STATUSES, Solution
from .._protocol import SolveRequest, conclude_ensemble
from ._params import has_modules, param_view
from ._rk import (
    _DFACTOR,
    _IFACTOR,
    _SAFETY,
    adaptive_solver,
    adaptive_tableau,
    fixed_solver,
    next_step_size,
    tensor,
)
from ._solve import (
    Setup,
    grad_input,
    prepare,
    replace_leaves,
    solve_device,
    state_dtype,
    to_param,
    to_state,
)

__all__ = ["BatchRhs", "EnsembleRun", "integrate", "solve_ensemble", "vjp_ensemble"]


# ---------------------------------------------------------------------------------
# The vector field on a batch.
# ---------------------------------------------------------------------------------


class BatchRhs:
    """``func(t, y, batched)`` over the user's single-member ``f(u, p, t)``: ``t``
    of shape ``(A,)``, ``y`` of shape ``(A, *u0.shape)``, `batched` the batched
    leaves of p for those ``A`` members; returns ``f`` stacked, ``(A,
    *u0.shape)``.

    ``shared`` is p's view when p is the same for every member; otherwise
    ``struct`` is p's structure and the leaves come per call. `calls` counts
    batched evaluations and `member_evals` the members they evaluated (the sum
    of the batch sizes): the cost in evaluations of a single-member ``f``.
    """

    def __init__(
        self, f: Callable[..., Any], shared: Any, struct: Any, dtype: torch.dtype
    ) -> None:
        self.f = f
        self.shared = shared
        self.struct = struct
        self.dtype = dtype
        self.calls = 0
        self.member_evals = 0
        self.vectorized = True
        self._vmapped: Callable[..., Any] | None = None

    def member(self, y: torch.Tensor, t: torch.Tensor, *batched: torch.Tensor) -> Any:
        """``f`` of one member."""
        p = self.shared if self.struct is None else _rebuild(self.struct, batched)
        return self.f(y, p, t)

    def __call__(
        self, t: torch.Tensor, y: torch.Tensor, batched: list[torch.Tensor]
    ) -> torch.Tensor:
        self.calls += 1
        self.member_evals += y.shape[0]
        ts = t.to(self.dtype)
        if self.vectorized:
            args = (y, ts, *batched)
            try:
                if self._vmapped is not None and _LEAN:
                    return _lean_vmap(self.member, args)
                if self._vmapped is None:
                    self._vmapped = torch.func.vmap(
                        self.member, in_dims=(0,) * len(args)
                    )
                return self._vmapped(*args)
            except (RuntimeError, ValueError, TypeError, NotImplementedError):
                # f does something vmap cannot batch (data-dependent control
                # flow, .item(), in-place writes into a new tensor): loop. If f
                # itself is broken, the loop raises its error.
                self.vectorized = False
        return torch.stack(
            [
                torch.as_tensor(self.member(y[i], ts[i], *(b[i] for b in batched)))
                for i in range(y.shape[0])
            ]
        )


# vmap's own primitives: after a first call through `torch.func.vmap` (which
# checks f's inputs and outputs and loads its batching rules), later calls skip
# its argument handling, most of its cost for a small f. None where this torch
# lacks them: then every call goes through `torch.func.vmap`.
_FT: Any = getattr(torch._C, "_functorch", None)
_LEAN = _FT is not None and all(
    hasattr(_FT, name)
    for name in (
        "_add_batch_dim",
        "_remove_batch_dim",
        "_vmap_increment_nesting",
        "_vmap_decrement_nesting",
    )
)


def _lean_vmap(fn: Callable[..., Any], args: tuple[torch.Tensor, ...]) -> Any:
    """``torch.func.vmap(fn)(*args)``, every argument batched on axis 0."""
    size = args[0].shape[0]
    level = _FT._vmap_increment_nesting(size, "error")
    try:
        out = fn(*(_FT._add_batch_dim(a, 0, level) for a in args))
        if not isinstance(out, torch.Tensor):
            raise TypeError("f must return a tensor")
        return _FT._remove_batch_dim(out, level, size, 0)
    finally:
        _FT._vmap_decrement_nesting()


def _rms(x: torch.Tensor) -> torch.Tensor:
    """The root mean square of each member (the first axis)."""
    return x.abs().pow(2).flatten(1).mean(1).sqrt()


def _per_member(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`x` of shape ``(A,)`` shaped to broadcast against ``like``, ``(A, ...)``."""
    return x.reshape(x.shape[0], *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------------------------
# The drivers.
# ---------------------------------------------------------------------------------


@dataclass
class EnsembleRun:
    """A driven ensemble: the state at every integration time per member (NaN
    where not reached), and per-member outcomes (lists in member order)."""

    u: torch.Tensor  # (B, n_times, *u0.shape)
    status: list[str]
    t_reached: list[float | None]  # solver time where a member stopped
    nfev: list[int]
    naccept: list[int]
    nreject: list[int]


def _assemble(
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    size: int,
    n: int,
    like: torch.Tensor,
) -> torch.Tensor:
    """``(B, n, *shape)`` from pieces ``(member ids, time indices, values)``, NaN
    elsewhere; one differentiable write."""
    ids = torch.cat([r[0] for r in rows])
    where = torch.cat([r[1] for r in rows])
    values = torch.cat([r[2] for r in rows])
    out = torch.full(
        (size, n, *like.shape[1:]), math.nan, dtype=like.dtype, device=like.device
    )
    return out.index_put((ids, where), values)


def _adaptive(
    req: SolveRequest,
    rhs: BatchRhs,
    y0: torch.Tensor,
    batched: list[torch.Tensor],
    times: torch.Tensor,
) -> EnsembleRun:
    """Every member under its own error control, dropping finished ones."""
    size = y0.shape[0]
    device, dtype = y0.device, y0.dtype
    alg = req.alg.name
    order = adaptive_solver(alg).order
    tab, dense_p = adaptive_tableau(alg, dtype, device)
    alphas = [float(a) for a in tab.alpha]
    # Stage weights as vectors (a product with the stacked stages) and the
    # first stage's weight alone.
    betas = list(tab.beta)
    first_beta = float(betas[0][0])
    error_w = tab.error
    n_stages = len(alphas)

    def f64(x: Any) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.float64, device=device)

    rtol, atol = f64(req.rtol), f64(req.atol)
    safety, ifactor, dfactor = f64(_SAFETY), f64(_IFACTOR), f64(_DFACTOR)
    inf = f64(math.inf)
    n = times.shape[0]
    step_t = times[1:] if req.land_on_saves else times[-1:]
    last_land = step_t.shape[0] - 1
    max_steps = req.max_steps

    ids = torch.arange(size, device=device)
    t = times[0].expand(size).clone()
    f = rhs(t, y0, batched)
    first_evals = 1
    if req.dt0 is None:
        dt = _initial_step(rhs, t, y0, f, batched, order - 1, rtol, atol)
        first_evals = 2
    else:
        dt = f64(req.dt0).expand(size).clone()

    def zeros(dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(size, dtype=dtype, device=device)

    # Per active member: id, time, next step size, state, f there, the next
    # landing time's index, the next save's index, steps tried and accepted, and
    # whether the last trial was not finite; then p's batched leaves.
    state = [
        ids,
        t,
        dt,
        y0,
        f,
        zeros(torch.long),
        zeros(torch.long) + 1,
        zeros(torch.long),
        zeros(torch.long),
        zeros(torch.bool),
        *batched,
    ]
    rows = [(ids, torch.zeros_like(ids), y0)]
    status: list[str] = ["success"] * size
    t_reached: list[float | None] = [None] * size
    steps_of = [0] * size
    accepted_of = [0] * size

    def retire(gone: torch.Tensor, why: list[str] | None) -> None:
        """Record the outcome of the members at positions `gone`."""
        who = state[0][gone].tolist()
        tried, accepted = state[7][gone].tolist(), state[8][gone].tolist()
        reached = state[1][gone].tolist()
        for k, i in enumerate(who):
            steps_of[i] = tried[k]
            accepted_of[i] = accepted[k]
            if why is not None:
                status[i] = why[k]
                t_reached[i] = reached[k]

    while state[0].shape[0] > 0:
        ids, t, dt, y, f, land, save, nsteps, naccept, nonfinite = state[:10]
        # Members that cannot take another step stop here.
        over = nsteps >= max_steps
        tiny = ~(dt >= 10 * (torch.nextafter(t, inf) - t))
        stop = over | tiny
        if bool(stop.any()):
            gone = stop.nonzero().squeeze(1)
            why = [
                "max_steps_reached"
                if o
                else ("nonfinite" if nf else "step_size_too_small")
                for o, nf in zip(
                    over[gone].tolist(), nonfinite[gone].tolist(), strict=True
                )
            ]
            retire(gone, why)
            keep = ~stop
            state = [x[keep] for x in state]
            continue
        batched = state[10:]

        # The trial step, ending on the next landing time if it would pass it.
        target = step_t[land]
        t1 = t + dt
        landing = (t < target) & (target < t1)
        t1 = torch.where(landing, target, t1)
        h = t1 - t
        hb = _per_member(h.to(dtype), y)
        ks = [f]
        yi = y
        for i, alpha in enumerate(alphas):
            ti = t1 if alpha == 1.0 else t + alpha * h
            if i == 0:
                step = f * first_beta
            else:
                step = torch.matmul(torch.stack(ks, dim=-1), betas[i])
            yi = torch.addcmul(y, hb, step)
            ks.append(rhs(ti, yi, batched))
        y1, f1 = yi, ks[-1]
        k_all = torch.stack(ks, dim=-1)
        with torch.no_grad():
            error = hb * torch.matmul(k_all, error_w)
            scale = atol + rtol * torch.max(y.abs(), y1.abs())
            ratio = _rms(error / scale)
            finite = torch.isfinite(ratio) & torch.isfinite(y1).flatten(1).all(1)
            ratio = torch.where(finite, ratio, inf)
        dt = next_step_size(h, ratio, order, safety, ifactor, dfactor)
        accept = ratio <= 1
        n_acc = int(accept.sum())
        nsteps = nsteps + 1
        if n_acc == 0:
            state[2], state[7], state[9] = dt, nsteps, ~finite
            continue
        everyone = n_acc == accept.shape[0]
        a = None if everyone else accept.nonzero().squeeze(1)

        # Saves in (t, t1] of the accepted steps, off their dense output.
        coeffs = torch.matmul(_pick(k_all, a), dense_p) * _pick(hb, a).unsqueeze(-1)
        at = _pick(save, a)
        t1_a = _pick(t1, a)
        # Save times <= t1 not yet written, per accepted member.
        count = torch.searchsorted(times, t1_a, right=True) - at
        total = int(count.sum())
        if total:
            who = torch.repeat_interleave(
                torch.arange(at.shape[0], device=device), count
            )
            first = torch.cumsum(count, 0) - count
            k = at[who] + torch.arange(total, device=device) - first[who]
            x = ((times[k] - _pick(t, a)[who]) / _pick(h, a)[who]).to(dtype)
            values = _dense(_pick(y, a)[who], coeffs[who], x)
            rows.append((_pick(ids, a)[who], k, values))
            at = at + count
        passed = accept & (step_t[land] <= t1) & (land < last_land)
        land = land + passed.long()
        if everyone:
            y, f, t, save = y1, f1, t1, at
        else:
            save = save.index_copy(0, a, at)  # pyright: ignore[reportArgumentType]
            mask = _per_member(accept, y)
            y = torch.where(mask, y1, y)
            f = torch.where(mask, f1, f)
            t = torch.where(accept, t1, t)
        state[:10] = [
            ids,
            t,
            dt,
            y,
            f,
            land,
            save,
            nsteps,
            naccept + accept.long(),
            ~accept & ~finite,
        ]
        done = save >= n
        if bool(done.any()):
            retire(done.nonzero().squeeze(1), None)
            keep = ~done
            state = [x[keep] for x in state]

    return EnsembleRun(
        u=_assemble(rows, size, n, y0),
        status=status,
        t_reached=t_reached,
        nfev=[first_evals + s * n_stages for s in steps_of],
        naccept=accepted_of,
        nreject=[s - a for s, a in zip(steps_of, accepted_of, strict=True)],
    )


def _pick(x: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
    """`x` at the positions `where` (all of it for None)."""
    return x if where is None else x[where]


def _dense(y0: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y0 + sum_j coeffs[..., j] x^(j+1)`` per member (`x` of shape ``(A,)``)."""
    xb = _per_member(x, y0)
    total = y0
    power = torch.ones_like(xb)
    for c in coeffs.unbind(-1):
        power = power * xb
        total = total + power * c
    return total


@torch.no_grad()
def _initial_step(
    rhs: BatchRhs,
    t0: torch.Tensor,
    y0: torch.Tensor,
    f0: torch.Tensor,
    batched: list[torch.Tensor],
    order: int,
    rtol: torch.Tensor,
    atol: torch.Tensor,
) -> torch.Tensor:
    """`_rk.initial_step` for each member: Hairer, Norsett & Wanner's rule."""
    scale = atol + torch.abs(y0) * rtol
    d0 = _rms(y0 / scale)
    d1 = _rms(f0 / scale)
    small = torch.full_like(d0, 1e-6)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), small, 0.01 * d0 / d1).abs()
    hb = _per_member(h0, y0)
    f1 = rhs(t0 + h0.to(t0.dtype), y0 + hb * f0, batched)
    d2 = torch.abs(_rms((f1 - f0) / scale) / h0)
    flat = (d1 <= 1e-15) & (d2 <= 1e-15)
    h1 = torch.where(
        flat,
        torch.max(small, h0 * 1e-3),
        (0.01 / torch.max(d1, d2)) ** (1.0 / float(order + 1)),
    )
    return torch.min(100 * h0, h1.abs()).to(t0.dtype)


def _fixed(
    req: SolveRequest,
    rhs: BatchRhs,
    y0: torch.Tensor,
    batched: list[torch.Tensor],
    times: torch.Tensor,
) -> EnsembleRun:
    """The batch stepped together on the shared grid; a member whose state turns
    non-finite stops at its last finite step (its later rows NaN)."""
    if req.dt0 is None:
        raise ValueError("a fixed-step solve needs dt0")  # the core checks it
    size = y0.shape[0]
    solver = fixed_solver(req.alg.name)
    grid, grid_np = solver.grid(times, req.dt0)

    def func(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return rhs(t.expand(size), y, batched)

    before = rhs.member_evals
    states = solver.march(func, y0, grid)
    per_member = (rhs.member_evals - before) // size
    where = np.searchsorted(grid_np, times.detach().cpu().numpy())
    u = torch.stack([y0, *(states[k - 1] for k in where[1:])], dim=1)
    nsteps = len(states)
    if nsteps:
        finite = torch.stack([torch.isfinite(s).flatten(1).all(1) for s in states])
        bad = (~finite).long()
        # Finite steps before the first bad one, per member (nsteps if none).
        good = torch.where(bad.any(0), bad.argmax(0), torch.full_like(bad[0], nsteps))
    else:
        good = torch.zeros(size, dtype=torch.long, device=y0.device)
    step_of_row = torch.as_tensor(where, device=y0.device)
    lost = step_of_row.unsqueeze(0) > good.unsqueeze(1)  # (B, n)
    u = torch.where(_per_member_rows(lost, u), torch.full_like(u, math.nan), u)
    goods = good.tolist()
    return EnsembleRun(
        u=u,
        status=["success" if g == nsteps else "nonfinite" for g in goods],
        t_reached=[None if g == nsteps else float(grid_np[g]) for g in goods],
        nfev=[per_member] * size,
        naccept=goods,
        nreject=[0] * size,
    )


def _per_member_rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(B, n)`` mask shaped to broadcast against ``(B, n, *shape)``."""
    return mask.reshape(*mask.shape, *([1] * (like.dim() - 2)))


# ---------------------------------------------------------------------------------
# Inputs and the entry point.
# ---------------------------------------------------------------------------------


def _batch_inputs(
    req: SolveRequest, setup: Setup, u0: Any, p: Any, size: int
) -> tuple[torch.Tensor, BatchRhs, list[torch.Tensor]]:
    """The batched initial state, the batched field and p's batched leaves."""
    dtype, device = setup.dtype, setup.device
    if u0 is None:
        y0 = setup.y0.unsqueeze(0).expand(size, *setup.y0.shape)
    else:
        y0 = to_state(u0, dtype, device)
        if tuple(y0.shape) != (size, *setup.y0.shape):
            raise InvalidProblemError(
                f"the ensemble's u0 has shape {tuple(y0.shape)}, but {size} members "
                f"of u0 shape {tuple(setup.y0.shape)} need {(size, *setup.y0.shape)}. "
                "Stack one u0 per member on a new leading axis."
            )
    if p is None:
        return y0, BatchRhs(setup.f, setup.p, None, dtype), []
    if has_modules(p):
        raise InvalidProblemError(
            "the ensemble's p holds a torch.nn.Module; a batched p holds one "
            "tensor per parameter with a leading member axis. Put the module in "
            "the problem's p (shared by every member), or pass its parameters "
            "stacked per member as tensors."
        )
    batched = []
    for leaf in leaves(p):
        if leaf is None:
            continue
        x = to_param(leaf, dtype, device)
        if x.dim() == 0 or x.shape[0] != size:
            raise InvalidProblemError(
                f"a leaf of the ensemble's p has shape {tuple(x.shape)}; every "
                f"leaf needs a leading axis of length {size} (one value per member)."
            )
        batched.append(x)
    return y0, BatchRhs(setup.f, None, p, dtype), batched


def _rebuild(struct: Any, batched: tuple[torch.Tensor, ...]) -> Any:
    """`struct` (p) with its non-None leaves replaced by `batched`, in order."""
    it = iter(batched)
    return tree_map(lambda x: None if x is None else next(it), struct)


def one_by_one(req: SolveRequest, u0: Any, p: Any) -> bool:
    """Whether the members are solved one by one (each its own `dk.solve`) rather
    than in one batch: with events (each member's located on its own steps), for
    an implicit alg, and for a continuous adjoint while autograd records (the
    batch is differentiated through its steps, which is what the discrete
    sensealgs compute, not what a continuous adjoint does)."""
    from .. import spec_of

    if req.alg.implicit or req.events:
        return True
    if req.sensealg is None or not torch.is_grad_enabled():
        return False
    inputs = [req.u0, u0, *leaves(param_view(req.p)), *leaves(p)]
    if not any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
        return False
    support = spec_of(req.backend).capabilities.sensealgs.get(req.sensealg.name)
    return support is None or support.computes != "discrete"


def _members(
    req: SolveRequest,
    u0: Any,
    p: Any,
    size: int,
    solve_one: Callable[[SolveRequest], Solution] | None,
) -> Solution:
    """The ensemble as `size` solves of one member each, by `solve_one` (the
    backend's own `solve`, so every sensealg and alg it offers), stacked."""
    if solve_one is None:
        raise UnsupportedError(
            f"alg='{req.alg.name}' with sensealg=dk.{req.sensealg.name}() solves "
            "an ensemble's members one by one; call it through dk.solve."
        )
    sols = []
    for i in range(size):
        member = dataclasses.replace(
            req,
            u0=req.u0 if u0 is None else u0[i],
            p=req.p if p is None else tree_map(lambda x, i=i: x[i], p),
            throw=False,
        )
        sols.append(solve_one(member))
    names = ("nfev", "naccept", "nreject", "njev", "nlu", "nevents")
    stats = {k: [s.stats.get(k) for s in sols] for k in names if k in sols[0].stats}
    t_events = u_events = None
    if req.events:
        t_events, u_events = stack_members(
            [s.t_events for s in sols], [s.u_events for s in sols]
        )
    return conclude_ensemble(
        req,
        t=sols[0].t,
        u=torch.stack([s.u for s in sols]),
        stats=stats,
        status=[s.status for s in sols],
        t_events=t_events,
        u_events=u_events,
    )


def integrate(
    req: SolveRequest, u0: Any, p: Any, size: int
) -> tuple[Setup, EnsembleRun, BatchRhs]:
    """Integrate the ensemble: its template `Setup`, the run, and the field (for
    its evaluation counts)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidProblemError(
            f"the ensemble's size must be a positive int, got {size!r}."
        )
    setup = prepare(req, graph=True)
    y0, rhs, batched = _batch_inputs(req, setup, u0, p, size)
    if setup.y0.numel() == 0:
        n = setup.times.shape[0]
        run = EnsembleRun(
            u=y0.unsqueeze(1).expand(size, n, *setup.y0.shape),
            status=["success"] * size,
            t_reached=[None] * size,
            nfev=[1] * size,
            naccept=[0] * size,
            nreject=[0] * size,
        )
        return setup, run, rhs
    driver = _fixed if req.fixed_step else _adaptive
    return setup, driver(req, rhs, y0, batched, setup.times), rhs


def solve_ensemble(
    req: SolveRequest,
    u0: Any,
    p: Any,
    size: int,
    *,
    devices: Sequence[str] | None = None,
    solve_one: Callable[[SolveRequest], Solution] | None = None,
) -> Solution:
    """Solve `size` members of the problem of `req` in one batch.

    Parameters
    ----------
    req : SolveRequest
        One member's request (its ``u0`` and ``p`` a member's, as a template).
    u0 : tensor or array, shape ``(size, *u0.shape)``, or None
        Each member's initial state; None: every member starts at ``req.u0``.
    p : pytree or None
        ``req.p``'s structure with a leading axis of length `size` on every
        leaf; None: every member has ``req.p``.
    size : int
        The number of members.
    devices : list of str, optional
        Split the members into one contiguous chunk per device (``"cpu"``,
        ``"cuda:0"``, ...), each solved on its device in its own thread; the
        result lands on the first device. None: one batch on ``req.device``.
    solve_one : callable, optional
        One member's solve (the backend's `solve`), for what runs the members
        one by one (`one_by_one`).

    Returns
    -------
    Solution
        ``u`` of shape ``(size, n_saves, *u0.shape)``; ``status`` a tuple of
        per-member status names; ``stats`` ``nfev``, ``naccept``, ``nreject`` as
        per-member lists. With ``req.throw``, a `SolveError` naming the failing
        members when any fails (its ``solution`` has every member's result).
    """
    if one_by_one(req, u0, p):
        if devices is not None:
            why = (
                "events=[...] solve"
                if req.events
                else f"alg='{req.alg.name}' with sensealg=dk.{req.sensealg.name}() "
                "solves"
            )
            raise UnsupportedError(
                f"backend='torch' splits an ensemble over devices when it runs as "
                f"one batch; {why} the members one by one. Drop devices= (or pass "
                "device= for the one device to solve on)"
                + (
                    "."
                    if req.events
                    else ", or use an explicit alg with a discrete sensealg."
                )
            )
        return _members(req, u0, p, size, solve_one)
    if devices is None:
        setup, run, _ = integrate(req, u0, p, size)
    else:
        setup, run = _split(req, u0, p, size, devices)
    m = len(req.saveat)
    reached = [
        math.nan if t is None else (-t if setup.backward else t) for t in run.t_reached
    ]
    return conclude_ensemble(
        req,
        t=tensor(req.saveat, setup.dtype, setup.device),
        u=run.u[:, setup.lead : setup.lead + m],
        stats={"nfev": run.nfev, "naccept": run.naccept, "nreject": run.nreject},
        status=run.status,
        t_reached=reached,
    )


def _split(
    req: SolveRequest, u0: Any, p: Any, size: int, devices: Sequence[str]
) -> tuple[Setup, EnsembleRun]:
    """The members in one contiguous chunk per device, solved concurrently (one
    thread each: a GPU's kernels run while the others' threads launch theirs);
    the first device's `Setup` and the runs joined there."""
    if isinstance(devices, str) or not devices:
        raise InvalidProblemError(
            f"devices must be a non-empty list of device names, got {devices!r}. "
            "Pass e.g. devices=['cuda:0', 'cuda:1']."
        )
    reqs = [dataclasses.replace(req, device=str(d)) for d in devices]
    for r in reqs:
        solve_device(r)  # an unavailable device is refused before any work
    chunks = np.array_split(np.arange(size), min(len(reqs), size))
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in chunks]

    def rows(x: Any, lo: int, hi: int) -> Any:
        if x is None:
            return None
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x)
        return x[lo:hi] if x.ndim else x

    def part(j: int) -> tuple[Setup, EnsembleRun, BatchRhs]:
        lo, hi = bounds[j]
        cu0 = None if u0 is None else rows(u0, lo, hi)
        cp = None if p is None else tree_map(lambda x: rows(x, lo, hi), p)
        return integrate(reqs[j], cu0, cp, hi - lo)

    with concurrent.futures.ThreadPoolExecutor(len(bounds)) as pool:
        parts = list(pool.map(part, range(len(bounds))))
    setup = parts[0][0]

    def joined(name: str) -> list[Any]:
        return [x for _, run, _ in parts for x in getattr(run, name)]

    run = EnsembleRun(
        u=torch.cat([run.u.to(setup.device) for _, run, _ in parts]),
        status=joined("status"),
        t_reached=joined("t_reached"),
        nfev=joined("nfev"),
        naccept=joined("naccept"),
        nreject=joined("nreject"),
    )
    return setup, run


def vjp_ensemble(
    req: SolveRequest,
    u0: Any,
    p: Any,
    size: int,
    *,
    devices: Sequence[str] | None = None,
    solve_one: Callable[[SolveRequest], Solution] | None = None,
) -> tuple[Solution, Callable[..., tuple[Any, Any]]]:
    """`solve_ensemble` and its pullback ``cotangent -> (dL/du0, dL/dp)``.

    The cotangent has ``sol.u``'s shape ``(size, m, *u0.shape)``; with events the
    pullback also takes ``(t_cots, u_cots)``, those of ``sol.t_events[k]`` ``(size,
    n_k)`` and ``sol.u_events[k]`` (autograd through the stacked members'
    events; the cotangent on their NaN padding is unused). Batched inputs
    (`u0`, `p` given) get gradients with the member axis; shared ones (None:
    ``req.u0``, ``req.p``) the sum over members. Gradients come from autograd
    through the batched steps (the discrete derivative); the pullback may be
    called repeatedly. A leaf ``f`` does not use gets zeros, integer and None
    leaves None. A failed member has no derivative: its rows of batched
    gradients are NaN, and a shared input's gradient is NaN when any member
    failed, as for `dk.vjp` of a failed solve. `devices` as in `solve_ensemble`
    (gradients land where the inputs are).
    """
    dtype = state_dtype(req)
    device = solve_device(req)

    def tree_input(tree: Any, convert: Callable[..., torch.Tensor]) -> Any:
        return tree_map(
            lambda x: (
                x
                if x is None or isinstance(x, torch.nn.Module)
                else grad_input(x, convert, dtype, device)
            ),
            tree,
        )

    if u0 is None:
        base_u0, ens_u0 = grad_input(req.u0, to_state, dtype, device), None
        x_u0 = base_u0
    else:
        base_u0, ens_u0 = req.u0, grad_input(u0, to_state, dtype, device)
        x_u0 = ens_u0
    if p is None:
        base_p, ens_p = tree_input(req.p, to_param), None
        p_leaves = leaves(param_view(base_p))
        p_struct = param_view(req.p)
    else:
        base_p, ens_p = req.p, tree_input(p, to_param)
        p_leaves = leaves(ens_p)
        p_struct = p
    inputs = [x for x in (x_u0, *p_leaves) if x is not None and x.requires_grad]
    with torch.enable_grad():
        sol = solve_ensemble(
            dataclasses.replace(req, u0=base_u0, p=base_p),
            ens_u0,
            ens_p,
            size,
            devices=devices,
            solve_one=solve_one,
        )
    u = sol.u
    failed = [i for i, s in enumerate(sol.status) if not STATUSES[s].success]
    batched = {id(x) for x in (ens_u0, *(leaves(ens_p) if p is not None else ()))}

    def pull(cotangent: Any, events: Any = None) -> tuple[Any, Any]:
        ct = _like(cotangent, u)
        if tuple(ct.shape) != tuple(u.shape):
            raise InvalidProblemError(
                f"cotangent must have the shape of sol.u, {tuple(u.shape)}; got "
                f"shape {tuple(ct.shape)}. Pass dL/d(sol.u): one entry per member, "
                "saved time and state component."
            )
        # The outputs that carry a graph, with their cotangents. NaN entries (rows
        # not reached, events' padding) carry no derivative: their cotangent is
        # unused.
        kept = [(u, _unless_nan(ct, u))] if u.requires_grad else []
        if events is not None:
            for found_k, given_k in zip(
                (sol.t_events, sol.u_events), events, strict=True
            ):
                kept += [
                    (x, _unless_nan(_like(c, x), x))
                    for x, c in zip(found_k, given_k, strict=True)
                    if x.requires_grad
                ]
        found = (
            torch.autograd.grad(
                [x for x, _ in kept],
                inputs,
                [c for _, c in kept],
                retain_graph=True,
                allow_unused=True,
            )
            if kept
            else (None,) * len(inputs)
        )
        grads = {}
        for x, g in zip(inputs, found, strict=True):
            g = torch.zeros_like(x) if g is None else g
            if failed and id(x) in batched:
                g = g.clone()
                g[failed] = math.nan
            elif failed:
                g = torch.full_like(g, math.nan)
            grads[id(x)] = g
        dp = [None if x is None else grads.get(id(x)) for x in p_leaves]
        return grads.get(id(x_u0)), replace_leaves(p_struct, dp)

    return _detached(sol), pull


def _like(x: Any, like: torch.Tensor) -> torch.Tensor:
    """`x` (a tensor or NumPy-readable) as a tensor of `like`'s dtype and device."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype=like.dtype, device=like.device)
    return torch.as_tensor(np.asarray(x), dtype=like.dtype, device=like.device)


def _unless_nan(cot: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`cot` with zeros where the output `out` is NaN (no value there)."""
    return torch.where(torch.isnan(out), torch.zeros_like(cot), cot)


def _detached(sol: Solution) -> Solution:
    """`sol` without autograd history (the pullback keeps it)."""

    def off(xs: Any) -> Any:
        return None if xs is None else [x.detach() for x in xs]

    return dataclasses.replace(
        sol, u=sol.u.detach(), t_events=off(sol.t_events), u_events=off(sol.u_events)
    )
