"""Gradients through events on SciPy: the derivative of an event's jump, and the
adjoints composed over the segments between events (docs/design.md, "Events").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from ..._pytree import tree_map
from ..._saveat import step_grid
from ..._solution import Solution
from ._autodiff import Job, Layout, Pull
from ._solve import Problem, solve

__all__ = ["EventDerivatives", "jump_derivatives", "vjp"]

# Relative step of the central differences that differentiate conditions and
# affects (about the cube root of float64's epsilon: truncation and rounding
# errors balance near 1e-11 relative).
_DIFF_STEP = 6e-6


def _differences(fn: Callable[[Any], Any], z: Any) -> Any:
    """The Jacobian of ``fn(z)`` (a 1-D array) at `z` by central differences."""
    columns = []
    for j in range(z.size):
        h = _DIFF_STEP * max(1.0, abs(z[j]))
        up, down = z.copy(), z.copy()
        up[j] += h
        down[j] -= h
        columns.append((fn(up) - fn(down)) / (up[j] - down[j]))
    return np.stack(columns, axis=-1)


def _jacobian(
    fn: Callable[..., Any], z: Any, split: Callable[..., Any], engine: str
) -> Any:
    """The Jacobian of ``fn(*split(z, convert))`` (flattened) with respect to `z`:
    by the engine's framework ("jax", "torch"), or central differences (`_jac`,
    an engine that differentiates nothing but f)."""
    if engine == "torch":
        import torch

        def of_torch(x: Any) -> Any:
            return torch.reshape(fn(*split(x, torch.tensor)), (-1,))

        jac = torch.autograd.functional.jacobian(of_torch, torch.from_numpy(z))
        return np.asarray(jac.detach().numpy(), dtype=np.float64).reshape(-1, z.size)
    if engine == "jax":
        import jax
        import jax.numpy as jnp

        def of_jax(x: Any) -> Any:
            return jnp.reshape(fn(*split(x, jnp.asarray)), (-1,))

        jac = jax.jacfwd(of_jax)(jnp.asarray(z))
        return np.asarray(jac, dtype=np.float64).reshape(-1, z.size)

    def of_numpy(x: Any) -> Any:
        return np.asarray(fn(*split(x, np.asarray)), dtype=np.float64).reshape(-1)

    return _differences(of_numpy, z)


@dataclasses.dataclass(frozen=True)
class EventDerivatives:
    """The derivatives of one event (`jump_derivatives`), with respect to the
    flat state ``u`` before it (at the event's time, held fixed) and to p's
    floating values ``q``.

    `u_plus` is the state the flow restarts from; `M_u` (``(n, n)``) and `M_p`
    (``(n, P)``) its derivatives; the event time moves by ``dt = a . du + b .
    dq``; `f_minus` is ``f(u-)``, at which the state before the jump moves with
    the time: ``dU = du + f_minus dt``.
    """

    u_plus: Any
    M_u: Any
    M_p: Any
    a: Any
    b: Any
    f_minus: Any

    def sensitivities(self, S: Any) -> tuple[Any, Any]:
        """Forward: from ``S = du/dθ`` (``(n, k)``, θ = (u0, q), q last) the
        event time's ``dt/dθ`` (``(k,)``) and the state's ``dU/dθ`` (``(n, k)``)."""
        n = self.a.size
        dt = self.a @ S
        dt[n:] += self.b
        return dt, S + np.outer(self.f_minus, dt)

    def pull_outputs(self, cot_t: float, cot_u: Any) -> tuple[Any, Any]:
        """Reverse: the cotangents ``dL/dt*`` and ``dL/dU`` (``(n,)``) of the event
        time and the state before the jump, as cotangents of the state ``u``
        before it (at the fixed time) and of ``q``: with ``s = dL/dt* + f_minus .
        dL/dU``, ``(dL/dU + a s, b s)``."""
        s = cot_t + self.f_minus @ cot_u
        return cot_u + self.a * s, self.b * s


def jump_derivatives(
    problem: Problem, layout: Layout, engine: str, i: int, t: float, u: Any
) -> EventDerivatives:
    """Event `i` at `t` from the flat state `u` (before it): the state the flow
    restarts from, its derivatives with respect to the state before the event
    and to p's floating values, and how the event time moves (`EventDerivatives`).

    With g the condition and A the affect (identity without one), the event time
    moves by ``dt = a . du + b . dp``, ``a = -g_u / r``, ``b = -g_p / r``, ``r =
    g_u . f(u-) + g_t``; the state at the moving event is ``u- + f(u-) dt``, the
    affect maps it to ``A(.)``, and the flow restarted at the moving time
    subtracts ``f(u+) dt``. So ``M_u = A_u + c a^T`` and ``M_p = A_p + c b^T``,
    ``c = A_u f(u-) + A_t - f(u+)``. The condition and affect are differentiated
    by the `engine`'s framework (as f is; conditions and affects are Array API
    code), or by central differences for the "jac" engine; f is only evaluated.
    """
    n, shape, p, f = problem.n, problem.shape, problem.p, problem.req.f
    event = problem.req.events[i]
    q0 = layout.values()
    size = q0.size
    z = np.concatenate([u, q0, [t]])

    def split(x: Any, convert: Callable[[Any], Any]) -> tuple[Any, Any, Any]:
        q = layout.unflatten(x[n : n + size], convert)
        return x[:n].reshape(shape), q, x[-1]

    def rhs(x: Any) -> Any:
        return np.asarray(f(x.reshape(shape), p, t), dtype=np.float64).reshape(-1)

    dg = _jacobian(event.condition, z, split, engine)[0]
    f_minus = rhs(u)
    rate = dg[:n] @ f_minus + dg[-1]
    a, b = -dg[:n] / rate, -dg[n : n + size] / rate
    if event.affect is None:
        return EventDerivatives(u.copy(), np.eye(n), np.zeros((n, size)), a, b, f_minus)
    affect = cast("Callable[..., Any]", event.affect)
    A = _jacobian(affect, z, split, engine)
    u_plus = np.asarray(affect(u.reshape(shape), p, t), dtype=np.float64).reshape(-1)
    c = A[:, :n] @ f_minus + A[:, -1] - rhs(u_plus)
    return EventDerivatives(
        u_plus,
        A[:, :n] + np.outer(c, a),
        A[:, n : n + size] + np.outer(c, b),
        a,
        b,
        f_minus,
    )


def _flat(layout: Layout, tree: Any) -> Any:
    """A gradient in p's structure as the flat vector of `Layout.values`."""
    found: list[Any] = []
    tree_map(found.append, tree)
    parts = [
        np.asarray(g, dtype=np.float64).reshape(-1)
        for g, off in zip(found, layout.offsets, strict=True)
        if off is not None
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


@dataclasses.dataclass
class _Segment:
    rows: list[int]  # the rows of the solve's save times it saves
    pull: Pull
    event: int | None  # the event at its end (None: it ends at t1)
    firing: int  # which firing of that event (its index in sol.t_events[event])
    t_end: float
    u_end: Any  # the state at its end (flat), before the event


def vjp(
    job: Job, method: Callable[[Job], tuple[Solution, Pull]]
) -> tuple[Solution, Pull]:
    """A solve with events and its pullback by a sensealg's `method`, composed
    over the segments between events: each segment is solved again (from where
    the flow restarted) by `method`, and the cotangent is carried across each
    event backward by ``M_u^T`` (`jump_derivatives`), adding ``M_p^T`` to p's.
    """
    problem, layout = job.problem, job.layout
    sol = solve(problem)  # the solve itself: where the events fired
    n = problem.n
    if not sol.success or sol.t_events is None or sol.u_events is None:
        return sol, _no_pull
    fired = sorted(
        (float(t), i, j)
        for i, times in enumerate(sol.t_events)
        for j, t in enumerate(times)
    )
    ts = problem.ts.tolist()
    t1 = float(problem.t1)
    direction = 1.0 if problem.t1 > problem.t0 else -1.0
    segments: list[_Segment] = []
    jumps: list[EventDerivatives | None] = []  # the event at each segment's end
    t_s, u_s = problem.t0, problem.u0.reshape(-1)
    last_event: int | None = None
    for t_e, i, j in [*fired, (t1, None, None)]:
        if last_event is not None and problem.req.events[last_event].terminal:
            break
        rows = [
            r
            for r, s in enumerate(ts)
            if direction * t_s <= direction * s and direction * s < direction * t_e
        ]
        if t_e == t1 and i is None:
            rows += [r for r, s in enumerate(ts) if s == t1]
        if direction * t_e > direction * t_s:
            sub = _segment(problem, u_s, t_s, t_e, [ts[r] for r in rows])
            sub_sol, seg_pull = method(dataclasses.replace(job, problem=sub))
            if not sub_sol.success:
                return sol, _no_pull
        else:  # an event where the segment starts: nothing to integrate
            seg_pull = _identity_pull(problem, layout)
        u_end = sol.u_events[i][j].reshape(-1) if i is not None else None
        segments.append(_Segment(rows, seg_pull, i, j or 0, t_e, u_end))
        if i is None:
            jumps.append(None)
            break
        jump = jump_derivatives(problem, layout, job.engine.name, i, t_e, u_end)
        jumps.append(jump)
        u_s = jump.u_plus
        t_s, last_event = t_e, i
    # A save time on a terminal event holds the state after its jump.
    tail = [
        r
        for r, s in enumerate(ts)
        if segments[-1].event is not None and s == segments[-1].t_end
    ]

    def pull(cot: Any, events: Any = None) -> tuple[Any, Any]:
        lam = np.zeros(n)  # the cotangent of the state after the current event
        for r in tail:
            lam = lam + cot[r]
        dp = np.zeros(layout.size)
        du0 = np.zeros(n)
        for seg, jump in zip(reversed(segments), reversed(jumps), strict=True):
            end = np.zeros(n)
            if jump is not None:
                end = jump.M_u.T @ lam
                dp += jump.M_p.T @ lam
                if events is not None and seg.event is not None:
                    t_cots, u_cots = events  # (k,) and (k, n) per event
                    d_end, d_q = jump.pull_outputs(
                        float(t_cots[seg.event][seg.firing]),
                        u_cots[seg.event][seg.firing],
                    )
                    end += d_end
                    dp += d_q
            rows = cot[seg.rows] if seg.rows else np.zeros((0, n))
            if not (seg.rows and ts[seg.rows[-1]] == seg.t_end):
                rows = np.concatenate([rows, end[None]])  # `_segment` added t_end
            seg_cot = rows
            du, dq = seg.pull(seg_cot)
            lam = np.asarray(du, dtype=np.float64).reshape(-1)
            dp += _flat(layout, dq)
            du0 = lam
        return du0.reshape(problem.shape), layout.gradient(dp)

    return sol, pull


def _no_pull(cot: Any) -> tuple[Any, Any]:
    raise RuntimeError("no derivative of a failed solve")  # pragma: no cover


def _identity_pull(problem: Problem, layout: Layout) -> Pull:
    """The pullback of a segment of length zero: every row is its start."""

    def pull(cot: Any) -> tuple[Any, Any]:
        return cot.sum(axis=0).reshape(problem.shape), layout.gradient(
            np.zeros(layout.size)
        )

    return pull


def _segment(
    problem: Problem, u: Any, t_s: float, t_e: float, saves: list[float]
) -> Problem:
    """The problem of one segment: from `u` at `t_s` to `t_e`, saving at `saves`
    and at `t_e` (unless it is the last of them)."""
    ts = saves if saves and saves[-1] == t_e else [*saves, t_e]
    req = dataclasses.replace(
        problem.req,
        u0=u.reshape(problem.shape),
        t0=t_s,
        t1=t_e,
        saveat=np.array(ts),
        events=(),
    )
    opts = dict(problem.base_options)
    if "grid" in opts:
        assert req.dt0 is not None  # noqa: S101 - fixed steps have one
        opts["grid"] = step_grid(t_s, t_e, req.dt0, np.array(ts))
    return dataclasses.replace(
        problem,
        req=req,
        u0=u.reshape(problem.shape).copy(),
        t0=t_s,
        t1=t_e,
        ts=np.array(ts, dtype=np.float64),
        base_options=opts,
    )
