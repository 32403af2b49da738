"""The gradient methods on the compiled engine, beyond `_engine`'s replays.

`_engine` runs the plain solve and the replays of ReverseThroughSolver and
CheckpointedAdjoint in compiled blocks. Here:

- ReverseThroughSolver with an adaptive alg (`through`): the solve's own
  adaptive blocks under autograd, one pass instead of a solve and a replay.
- ForwardMode (`jacobians`): the recorded steps replayed on the state and its
  tangents together, ``z = [y, dy/dx_1, ..., dy/dx_m]``, whose vector field is
  ``[f(y), df . dz_k]`` by ``torch.func.vmap(torch.func.jvp(f))``. A Runge-Kutta
  step is linear in its stages, so stepping ``z`` is forward-mode AD of the
  step: the Jacobian of eager ForwardMode, from the same steps.
- ContinuousAdjoint (`backsolve`) and InterpolatingAdjoint (`interpolating`):
  their backward solves in compiled blocks of `_engine.BLOCK` step attempts
  with the same controller, error norm and landings as `_rk.AdaptiveRK`; the
  vector-Jacobian products by ``torch.func.vjp`` (dynamo traces it; not
  ``torch.autograd.grad``). The eager adjoints solve one interval between
  save times at a time; here one solve runs from t1 to t0 and the jump at each
  save time (its cotangent, and for the backsolve the forward state and a new
  first step) happens inside the block, so a block is not spent on an interval
  of one or two steps (the spiral's InterpolatingAdjoint step: 55 to 13 ms).
  The same steps as eager, so the same gradients to rounding. The
  interpolating adjoint reads the forward dense output inside the block from a
  window of `BLOCK` forward steps (every backward step lands on the forward
  step ends, so one block visits at most `BLOCK` of them): fixed shapes, so a
  solve of a new length never recompiles.

Each returns None where compilation failed (`_engine.EngineFallbackWarning`,
once per problem structure): the caller then runs its eager path. Fixed-step
solves (``adaptive=False``) keep the eager backward passes of the adjoints.
"""

from __future__ import annotations

import bisect
import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..._pytree import tree_map
from ..._solution import Solution
from .._protocol import SolveRequest
from . import _engine
from ._engine import (
    _DONE,
    _RUNNING,
    _STATUS,
    _Coefficients,
    _coefficients,
    _fsal_step,
    _weighted,
)
from ._rk import initial_step, rms_norm
from ._solve import finish, prepare, records_graph, replace_leaves

__all__ = ["backsolve", "interpolating", "jacobians", "through"]

# The kinds of block this module compiles, counted in `_engine.TRACES`.
for _kind in ("tangent", "adjoint", "adjoint_rhs"):
    _engine.TRACES.setdefault(_kind, 0)


def _entry(
    kind: str, alg: str, key: tuple[Any, ...], make: Callable[[], Any]
) -> _engine._Compiled:
    """`_engine._entry` for a block that `make` builds (cached under `key`)."""
    full = (kind, alg, _engine.BLOCK, key)
    entry = _engine._CACHE.entries.get(full)
    if entry is None:
        fn = _engine._own_code(make(), len(_engine._CACHE.entries))
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        entry = _engine._Compiled(kind, fn, compiled)
        _engine._CACHE.entries[full] = entry
    return entry


def _structure(tree: Any) -> str:
    """The shape of a p tree, without its values (part of a cache key: blocks
    rebuild p from its leaves)."""
    return repr(tree_map(lambda x: type(x).__name__, tree))


def _key(req: SolveRequest, backward: bool, p: Any, *extra: Any) -> tuple[Any, ...]:
    return (*extra, _structure(p), *_engine._key(req, backward))


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


# ---------------------------------------------------------------------------------
# ReverseThroughSolver: the adaptive blocks themselves under autograd.
# ---------------------------------------------------------------------------------


def through(req: SolveRequest, max_blocks: int | None = None) -> Solution | None:
    """ReverseThroughSolver for an adaptive alg: the solve's own compiled blocks
    run under autograd (step sizes held fixed, as the reference driver holds
    them; a rejected or idle attempt is masked out of the gradient), instead
    of a solve without a graph then its steps replayed: one pass, not two.
    None where compilation failed, and with `max_blocks` (CheckpointedAdjoint's
    one pass, `_checkpoint.solve`) where autograd is not recording; the solve
    raises `_engine.TooLongError` where it needs more blocks than that."""
    setup = prepare(req, graph=True)
    if max_blocks is not None and not records_graph(setup):
        return None
    p = tree_map(
        lambda x: x.view_as(x) if isinstance(x, torch.nn.Parameter) else x, setup.p
    )
    y0, du0 = setup.y0, setup.du0
    if records_graph(setup) and not y0.requires_grad:
        # One trace for every solve: the compiled code is guarded on
        # requires_grad (u0's gradient is dropped).
        y0 = y0.detach().requires_grad_()
        du0 = setup.f(y0, p, setup.times[0].to(setup.dtype))
    stats: dict[str, float] = {"compile_s": 0.0}
    try:
        run = _engine._run_adaptive(
            req, setup.f, p, y0, du0, setup.times, setup.backward, None, stats,
            max_blocks,
        )  # fmt: skip
    except _engine._FallbackError:
        return None
    run = run._replace(compile_s=stats["compile_s"])
    return finish(req, setup, run, run.u)


# ---------------------------------------------------------------------------------
# ForwardMode: the state and its tangents, stepped together.
# ---------------------------------------------------------------------------------


def jacobians(
    plan: Any, schedule: Any, inputs: list[Any], wrt: list[int]
) -> list[torch.Tensor] | None:
    """`_forward._jacobians` on the engine: ``d u / d inputs[i]`` for ``i`` in
    `wrt`, each ``(*inputs[i].shape, reached, *u0.shape)``; None where the
    augmented system could not compile."""
    req, setup = plan.req, plan.setup
    y0 = inputs[0].detach()
    values = [_detach(x) for x in inputs[1:]]
    sizes = [inputs[i].numel() for i in wrt]
    total = sum(sizes)
    # One tangent per number in the inputs of `wrt`: the rows of the identity.
    eye = torch.eye(total, dtype=torch.float64, device=y0.device)
    cuts = dict(
        zip(wrt, eye.split(sizes, dim=1) if total else [], strict=True)
    )  # i -> (total, numel)
    y_tangent = (
        cuts[0].reshape(total, *y0.shape).to(y0.dtype)
        if 0 in wrt
        else y0.new_zeros(total, *y0.shape)
    )
    in_p = tuple(i for i in wrt if i > 0)
    p_tangents = [
        cuts[i].reshape(total, *values[i - 1].shape).to(values[i - 1].dtype)
        for i in in_p
    ]
    f, template = setup.f, setup.p

    def augmented(z: torch.Tensor, extra: Any, t: torch.Tensor) -> torch.Tensor:
        local, tangents = extra

        def g(y: torch.Tensor, *xs: torch.Tensor) -> torch.Tensor:
            full = list(local)
            for i, x in zip(in_p, xs, strict=True):
                full[i - 1] = x
            return f(y, replace_leaves(template, full), t)

        primals = (z[0], *(local[i - 1] for i in in_p))

        def one(dy: torch.Tensor, *dxs: torch.Tensor) -> Any:
            return torch.func.jvp(g, primals, (dy, *dxs))

        # f(y) is the same for every tangent: not batched.
        out_dims: Any = (None, 0)
        batched = torch.func.vmap(one, out_dims=out_dims)
        fy, tangent = batched(z[1:], *tangents)
        return torch.cat([fy.unsqueeze(0), tangent])

    z = torch.cat([y0.unsqueeze(0), y_tangent])
    extra = (values, p_tangents)
    steps = schedule.steps[:, : schedule.needed]
    stats: dict[str, float] = {"compile_s": 0.0}
    key = _key(req, setup.backward, template, "tangent", in_p, 0 in wrt)
    kind = "fixed" if req.fixed_step else "replay"
    co = _coefficients(req.alg.name)
    maker = _engine._fixed_block if req.fixed_step else _engine._replay_block
    entry = _entry(kind, req.alg.name, key, lambda: maker(co, augmented))
    padded = _engine._padded(steps)
    n = steps.shape[1]
    chunks = []
    try:
        with torch.no_grad():
            if req.fixed_step:
                for start in range(0, padded.shape[1], _engine.BLOCK):
                    block = padded[:, start : start + _engine.BLOCK].contiguous()
                    states = _engine._call(entry, stats, z, block, extra)
                    chunks.append(states)
                    z = states[-1]
            else:
                t0 = steps[0, 0] if n else schedule.times[0]
                with warnings.catch_warnings():
                    # torch's first jvp of a process loads its forward-AD
                    # rules through the deprecated torch.jit.script.
                    warnings.filterwarnings("ignore", "`torch.jit.script`")
                    fz = augmented(z, extra, t0.to(y0.dtype))
                for start in range(0, padded.shape[1], _engine.BLOCK):
                    block = padded[:, start : start + _engine.BLOCK].contiguous()
                    z, fz, dense = _engine._call(entry, stats, z, fz, block, extra)
                    chunks.append(dense)
    except _engine._FallbackError:
        return None
    z0 = torch.cat([y0.unsqueeze(0), y_tangent])
    rows: dict[int, torch.Tensor] = {0: z0}
    reads = [(row, k) for k in range(n) for row in schedule.reads[k]]
    if reads:
        found = torch.cat(chunks)[:n]
        index = torch.as_tensor([k for _, k in reads], device=y0.device)
        if req.fixed_step:
            values_at = found[index]
        else:
            at = steps[:, index]
            when = schedule.times[torch.as_tensor([row for row, _ in reads])]
            values_at = _engine.interpolate_many(found[index], at[0], at[2], when)
        for j, (row, _) in enumerate(reads):
            rows[row] = values_at[j]
    stacked = torch.stack([rows[r] for r in range(schedule.reached)])
    jac = stacked[:, 1:].movedim(1, 0)  # (total, reached, *u0.shape)
    out_shape = jac.shape[1:]
    return [
        part.reshape(*inputs[i].shape, *out_shape)
        for i, part in zip(wrt, jac.split(sizes), strict=True)
    ]


# ---------------------------------------------------------------------------------
# The backward solves: an adaptive block with landings and a norm of pieces.
# ---------------------------------------------------------------------------------


def _norm(bounds: tuple[int, ...] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`rms_norm`, or the largest RMS norm of the pieces between `bounds`."""
    if bounds is None:
        return rms_norm
    pieces = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]

    def norm(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([rms_norm(x[lo:hi]) for lo, hi in pieces]).max()

    return norm


def _backward_block(
    co: _Coefficients,
    f: Callable[..., Any],
    bounds: tuple[int, ...] | None,
    restart: bool,
) -> Callable[..., Any]:
    """`BLOCK` attempts of `AdaptiveRK._step` towards ``end``, landing on the
    window ``landings`` (the next `BLOCK` landing times, the last repeated).
    A step that lands on ``landings[k]`` jumps to ``keep * z + jumps[k]`` (a
    save time's cotangent joins the adjoint) and evaluates f there afresh, as
    the eager adjoint starts a new interval there: one block runs across save
    times. With `restart`, the step size after a jump is the first-step rule's,
    as a new interval of the eager backsolve takes it."""
    exponent = 1.0 / co.order
    e = co.e
    if e is None:  # pragma: no cover - adaptive algs have error weights
        raise ValueError("no error weights")
    norm = _norm(bounds)
    size = _engine.BLOCK

    def block(
        y: torch.Tensor,
        fy: torch.Tensor,
        t: torch.Tensor,
        dt: torch.Tensor,
        landings: torch.Tensor,
        jumps: torch.Tensor,
        keep: torch.Tensor,
        end: torch.Tensor,
        rtol: torch.Tensor,
        atol: torch.Tensor,
        nsteps: torch.Tensor,
        max_steps: torch.Tensor,
        nonfinite: torch.Tensor,
        p: Any,
    ) -> tuple[Any, ...]:
        _engine._traced("adjoint")
        status = torch.zeros_like(nsteps)
        landed = torch.zeros_like(nsteps)
        accepted, ends = [], []
        for _ in range(size):
            k = landed.clamp(max=size - 1)
            target = _pick(landings, k)
            status, active, nsteps, t1, h, _ = _engine._begin(
                status, t, dt, target, nsteps, max_steps, nonfinite
            )
            y1, f1, ks = _fsal_step(co, f, p, y, fy, t, h, t1)
            error = h.to(y.dtype) * _weighted(e, ks)
            ok, finite, factor = _engine._judge(
                y, y1, error, rtol, atol, active, exponent, norm
            )
            # (A step that ends on the target exactly lands too.)
            reach = ok & (t1 == target)
            accepted.append(ok)
            ends.append(t1)
            y, fy, t, dt, nonfinite = _engine._commit(
                active, ok, finite, factor, h, (y1, f1, t1), (y, fy, t, dt, nonfinite)
            )
            y = torch.where(reach, keep * y + _pick(jumps, k), y)
            fy = torch.where(reach, f(y, p, t), fy)
            if restart:

                def probe(tt: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
                    return f(yy, p, tt)

                fresh = initial_step(probe, t, y, fy, co.order - 1, rtol, atol, norm)
                dt = torch.where(reach, fresh.to(dt.dtype), dt)
            landed = landed + reach.to(landed.dtype)
            status = torch.where(ok & (t >= end), _DONE, status)
        return (
            y,
            fy,
            t,
            dt,
            nsteps,
            nonfinite,
            status,
            landed,
            torch.stack(accepted),
            torch.stack(ends),
        )

    return block


def _pick(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``x[k]`` for a 0-d integer tensor `k`, as compiled code reads it (no
    host value of `k`)."""
    return x.index_select(0, k.reshape(1))[0]


def _rhs_block(f: Callable[..., Any]) -> Callable[..., Any]:
    """One evaluation of the backward vector field (its first stage, and the
    first-step rule's probe)."""

    def rhs(z: torch.Tensor, p: Any, t: torch.Tensor) -> torch.Tensor:
        _engine._traced("adjoint_rhs")
        return f(z, p, t)

    return rhs


class _Backward:
    """A backward solve's compiled pieces and its Python loop over blocks."""

    def __init__(
        self,
        req: SolveRequest,
        key: tuple[Any, ...],
        dynamics: Callable[..., Any],
        bounds: tuple[int, ...] | None,
        stop: Callable[[str, float, int], Exception],
        restart: bool,
    ) -> None:
        alg = req.alg.name
        self.co = _coefficients(alg)
        self.block = _entry(
            "adjoint", alg, (*key, bounds, restart),
            lambda: _backward_block(self.co, dynamics, bounds, restart),
        )  # fmt: skip
        self.rhs = _entry("adjoint_rhs", alg, key, lambda: _rhs_block(dynamics))
        self.norm = _norm(bounds)
        self.stop = stop
        self.max_steps = min(req.max_steps, 2**62)
        self.stats: dict[str, float] = {"compile_s": 0.0}
        self.nfev = 0
        self.naccept = 0
        self.nsteps = 0
        self.ends: list[float] = []

    def evaluate(self, z: torch.Tensor, p: Any, t: torch.Tensor) -> torch.Tensor:
        self.nfev += 1
        return _engine._call(self.rhs, self.stats, z, p, t.to(z.dtype))

    def integrate(
        self,
        z: torch.Tensor,
        p: Any,
        start: float,
        landings: Sequence[float],
        rtol: torch.Tensor,
        atol: torch.Tensor,
        jumps: torch.Tensor,
        keep: torch.Tensor,
        window: Callable[[torch.Tensor], Any] | None = None,
    ) -> torch.Tensor:
        """From `z` at time `start` to ``landings[-1]``, landing on each of
        `landings` (increasing, all after `start`) and jumping there to
        ``keep * z + jumps[k]`` (`_backward_block`); the first step the
        first-step rule's. `window(t)` gives the part of p that depends on
        where the block starts. Returns z at the end. (The f calls after a
        jump are not counted here: the caller knows which were new intervals
        of the eager adjoint.)"""
        device = z.device
        t = torch.tensor(start, dtype=torch.float64, device=device)
        end = torch.tensor(landings[-1], dtype=torch.float64, device=device)
        full = p if window is None else (*p, window(t))
        fz = self.evaluate(z, full, t)

        def probe(tt: torch.Tensor, zz: torch.Tensor) -> torch.Tensor:
            at = p if window is None else (*p, window(tt))
            return self.evaluate(zz, at, tt)

        order = self.co.order - 1
        dt = initial_step(probe, t, z, fz, order, rtol, atol, self.norm)
        dt = dt.to(torch.float64)
        nsteps = torch.zeros((), dtype=torch.int64, device=device)
        max_steps = torch.tensor(self.max_steps, dtype=torch.int64, device=device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        stages = len(self.co.c) + 1
        size = _engine.BLOCK
        at = 0  # landings reached
        last = len(landings) - 1
        while True:
            ahead = list(landings[at : at + size])
            ahead += [ahead[-1]] * (size - len(ahead))
            window_now = torch.tensor(ahead, dtype=torch.float64, device=device)
            index = torch.arange(at, at + size, device=device).clamp(max=last)
            full = p if window is None else (*p, window(t))
            out = _engine._call(
                self.block, self.stats, z, fz, t, dt, window_now, jumps[index], keep,
                end, rtol, atol, nsteps, max_steps, nonfinite, full,
            )  # fmt: skip
            z, fz, t, dt, nsteps, nonfinite, code, landed, acc, t1s = out
            at = min(at + int(landed), last)
            for ok, t1 in zip(acc.tolist(), t1s.tolist(), strict=True):
                if ok:
                    self.naccept += 1
                    self.ends.append(t1)
            code_value = int(code)
            if code_value == _DONE:
                break
            if code_value != _RUNNING:
                self.nfev += stages * int(nsteps)
                self.nsteps += int(nsteps)
                raise self.stop(_STATUS[code_value], float(t), int(nsteps))
        self.nfev += stages * int(nsteps)
        self.nsteps += int(nsteps)
        return z


def _tolerances(z: torch.Tensor, rtol: Any, atol: Any) -> tuple[Any, Any]:
    def scalar(x: Any) -> torch.Tensor:
        return torch.as_tensor(float(x), dtype=torch.float64, device=z.device)

    return scalar(rtol), scalar(atol)


def backsolve(
    req: SolveRequest,
    setup: Any,
    run: Any,
    inputs: list[Any],
    wrt: list[int],
    grad_u: torch.Tensor,
    rtol: Any,
    atol: Any,
    stop: Callable[[str, float, int], Exception],
) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """`_adjoint._backsolve` on the engine (adaptive algs): the same augmented
    system ``(t-adjoint, u, a, g)``, norm and steps; None where it could not
    compile."""
    dtype, shape = setup.dtype, setup.y0.shape
    n = setup.y0.numel()
    params = [inputs[i].detach() for i in wrt]
    sizes = [x.numel() for x in params]
    fixed = [_detach(x) for x in inputs[1:]]
    bounds = [0, 1, 1 + n, 1 + 2 * n]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    f, template, at = setup.f, setup.p, tuple(wrt)

    def dynamics(z: torch.Tensor, p: Any, tau: torch.Tensor) -> torch.Tensor:
        local, ps = p
        s = (-tau).to(z.dtype)
        y = z[1 : 1 + n].reshape(shape)
        a = z[1 + n : 1 + 2 * n].reshape(shape)

        def g(s_: torch.Tensor, y_: torch.Tensor, *xs: torch.Tensor) -> torch.Tensor:
            full = list(local)
            for i, x in zip(at, xs, strict=True):
                full[i - 1] = x
            return f(y_, replace_leaves(template, full), s_.to(dtype))

        fy, pull = torch.func.vjp(g, s, y, *ps)[:2]
        found = pull(-a)
        parts = [found[0], fy, *found[1:]]
        return -torch.cat([x.reshape(-1).to(z.dtype) for x in parts])

    key = _key(req, setup.backward, template, "backsolve", at)
    times = setup.times.tolist()
    rows = run.u.reshape(run.u.shape[0], -1)
    cot = grad_u.reshape(grad_u.shape[0], -1).to(rows.dtype)
    z = torch.cat([rows.new_zeros(1), rows[-1], cot[-1], rows.new_zeros(sum(sizes))])
    # One backward solve from t1 to t0 (see `interpolating`): at each earlier
    # save time the state restarts from the forward one and its cotangent
    # joins the adjoint; the step size restarts too, as each interval of the
    # eager backsolve starts with the first-step rule.
    keep = torch.ones_like(z)
    keep[1 : 1 + n] = 0
    jumps = z.new_zeros(len(times) - 1, z.numel())
    for k, i in enumerate(range(len(times) - 2, -1, -1)):
        jumps[k, 1 : 1 + n] = rows[i]
        jumps[k, 1 + n : 1 + 2 * n] = cot[i]
    landings = [-t for t in reversed(times[:-1])]
    tol = _tolerances(z, rtol, atol)
    p = (fixed, params)
    try:
        solver = _Backward(req, key, dynamics, tuple(bounds), stop, restart=True)
        if landings:
            with torch.no_grad():
                z = solver.integrate(z, p, -times[-1], landings, *tol, jumps, keep)
    except _engine._FallbackError:
        return None
    du0 = z[1 + n : 1 + 2 * n].reshape(shape)
    dps = [
        g.reshape(x.shape).to(x.dtype)
        for g, x in zip(z[1 + 2 * n :].split(sizes), params, strict=True)
    ]
    return du0, dps


def interpolating(
    req: SolveRequest,
    setup: Any,
    dense: Any,
    inputs: list[Any],
    wrt: list[int],
    grad_u: torch.Tensor,
    rtol: Any,
    atol: Any,
    stop: Callable[[str, float, int], Exception],
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, Any]] | None:
    """`_interpolating._adjoint` on the engine (adaptive algs): ``(dL/dy0,
    [dL/d inputs[i] for i in wrt], counts for LAST_BACKWARD)``; None where it
    could not compile."""
    dtype, shape = setup.dtype, setup.y0.shape
    n = setup.y0.numel()
    params = [inputs[i].detach() for i in wrt]
    sizes = [x.numel() for x in params]
    fixed = [_detach(x) for x in inputs[1:]]
    f, template, at = setup.f, setup.p, tuple(wrt)
    size = _engine.BLOCK

    def dynamics(z: torch.Tensor, p: Any, tau: torch.Tensor) -> torch.Tensor:
        local, ps, (table, starts, ends, lo, hi) = p
        s = (-tau).to(torch.float64)
        a = z[:n].reshape(shape)
        # `_DenseOutput.__call__` on the window of forward steps.
        s = s.clamp(lo, hi)
        k = (ends < s).sum().clamp(max=size - 1)
        start = _pick(starts, k)
        x = ((s - start) / (_pick(ends, k) - start)).to(table.dtype)
        rows = _pick(table.movedim(1, 0), k)
        u = rows[-1]
        for i in range(table.shape[0] - 2, -1, -1):
            u = rows[i] + x * u

        def g(u_: torch.Tensor, *xs: torch.Tensor) -> torch.Tensor:
            full = list(local)
            for i, x_ in zip(at, xs, strict=True):
                full[i - 1] = x_
            return f(u_, replace_leaves(template, full), s.to(dtype))

        pull = torch.func.vjp(g, u, *ps)[1]
        au, *aps = pull(a)
        return torch.cat([au.reshape(-1), *(v.reshape(-1).to(dtype) for v in aps)])

    starts_all, ends_all, table_all = dense.starts, dense.ends, dense.table
    count = ends_all.shape[0]
    lo, hi = starts_all[0], ends_all[-1]

    def window(t: torch.Tensor) -> Any:
        """The forward steps a block starting at tau `t` may visit."""
        s = (-t).to(ends_all.dtype).clamp(lo, hi).reshape(1)
        first = min(int(torch.searchsorted(ends_all, s)[0]), count - 1)
        index = torch.arange(first - size + 1, first + 1, device=ends_all.device)
        index = index.clamp(min=0)
        return (
            table_all[:, index],
            starts_all[index],
            ends_all[index],
            lo,
            hi,
        )

    key = _key(req, setup.backward, template, "interpolating", at)
    times = setup.times.to(dtype=torch.float64).tolist()
    forward_ends = ends_all.tolist()
    landings = sorted({-s for s in forward_ends} | {-s for s in times})
    cot = grad_u.reshape(grad_u.shape[0], -1).to(dtype)
    z = torch.cat([cot[-1], cot.new_zeros(sum(sizes))])
    # One backward solve from t1 to t0 across the save times (integration times
    # are strictly increasing: `build_request`): at each earlier save time its
    # cotangent joins the adjoint, inside the compiled blocks.
    landings = landings[bisect.bisect_right(landings, -times[-1]) :]
    jumps = z.new_zeros(len(landings), z.numel())
    for i in range(len(times) - 1):
        jumps[bisect.bisect_left(landings, -times[i]), :n] = cot[i]
    tol = _tolerances(z, rtol, atol)
    p = (fixed, params)
    try:
        solver = _Backward(req, key, dynamics, None, stop, restart=False)
        if landings:
            with torch.no_grad():
                z = solver.integrate(
                    z, p, -times[-1], landings, *tol, jumps, torch.ones_like(z),
                    window,
                )  # fmt: skip
            # Each save time before t0 began a new interval of the eager
            # adjoint, with a call to f (in the block, after the jump).
            solver.nfev += len(times) - 2
    except _engine._FallbackError:
        return None
    counts = {
        "naccept": solver.naccept,
        "nreject": solver.nsteps - solver.naccept,
        "njev": 0,
        "nfev": solver.nfev,
        "forward_ends": tuple(forward_ends),
        "backward_ends": tuple(sorted(-t for t in solver.ends)),
    }
    du0 = z[:n].reshape(shape)
    dps = [
        g.reshape(x.shape).to(x.dtype)
        for g, x in zip(z[n:].split(sizes), params, strict=True)
    ]
    return du0, dps, counts
