"""InterpolatingAdjoint on JAX: the adjoint ODE integrated backward against the
forward solve's dense output (SciMLSensitivity's InterpolatingAdjoint), with the
forward method, for every alg kind.

Only ``(a, g)`` is integrated backward: ``a' = -(df/du)^T a``, ``g' = -(df/dp)^T a``
from each save time to the one before, the cotangent added at each, so that
``a(t0) = dL/du0`` and ``g(t0) = dL/dp``; the state comes from the forward pass's
interpolant (kept in memory: O(steps)), so stiff problems stay stable backward
(docs/stiff.md). Adaptive algs integrate the adjoint under error control; solves
on a fixed grid step the adjoint backward over the same grid.
"""

from __future__ import annotations

from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from ..._sensealg import adjoint_atol
from ._solve import Job, counts, diffeqsolve, fixed_inputs, vector_field

__all__ = ["solve"]

_TIMES = (
    "sensealg=dk.InterpolatingAdjoint() on backend='jax' differentiates with "
    "respect to u0 and p only, not tspan, saveat, rtol or atol. Use "
    "sensealg=dk.ReverseThroughSolver() or dk.CheckpointedAdjoint() for gradients "
    "with respect to times."
)


class _PresortedClip(diffrax.ClipStepSizeController):
    """`diffrax.ClipStepSizeController` whose `step_ts` are already in the order
    of the direction it will be wrapped for. diffrax sorts them in `wrap`, once
    per solve: with one solve per interval between save times and ``max_steps``
    entries that sort dominated the pullback (Lotka-Volterra, 101 saves: 1.4 s,
    growing linearly with max_steps)."""

    def wrap(self, direction: Any) -> Any:
        # `step_ts` holds the times already multiplied by `direction` and sorted.
        controller = self.controller.wrap(direction)
        return eqx.tree_at(lambda s: s.controller, self, controller)


def solve(job: Job) -> tuple[Any, Any]:
    """``(ys, counts)`` as a custom VJP whose backward pass is the adjoint solve."""
    cfg = job.cfg
    method = cfg.method
    sensealg = job.sensealg
    vf = vector_field(cfg.f)

    def run(y0: Any, p: Any, times: Any, ts: Any, grid: Any, dense: bool) -> Any:
        sol, _ = diffeqsolve(Job(cfg, y0, p, times, ts, grid), dense=dense)
        return sol

    @jax.custom_vjp
    def solve(y0: Any, p: Any, times: Any, ts: Any, grid: Any) -> tuple[Any, Any]:
        sol = run(y0, p, times, ts, grid, False)
        return sol.ys, counts(sol)

    def fwd(y0: Any, p: Any, times: Any, ts: Any, grid: Any) -> Any:
        times, ts, grid = fixed_inputs((times, ts, grid), _TIMES)
        y0, p = jax.tree_util.tree_map(lambda x: x.value, (y0, p))
        sol = run(y0, p, times, ts, grid, True)
        return (sol.ys, counts(sol)), (sol, p, times, ts, grid)

    def adjoint_rhs(t: Any, state: Any, args: Any) -> Any:
        a, _ = state
        sol, p, lo, hi = args
        # Stage times can fall a rounding error outside the forward solve, where
        # the interpolant is garbage (ROBER: every step onto t0 = 0 was rejected,
        # until max_steps).
        u = sol.evaluate(jnp.clip(t, lo, hi))
        _, pull = jax.vjp(lambda u, p: vf(t, u, p), u, p)
        du, dp = pull(a)
        return (
            jax.tree_util.tree_map(jnp.negative, du),
            jax.tree_util.tree_map(jnp.negative, dp),
        )

    term = method.term(lambda a, args, t: adjoint_rhs(t, a, args))

    def adaptive(res: Any, ct: Any, g0: Any) -> tuple[Any, Any]:
        """Between consecutive save times, under error control."""
        sol, p, times, ts, _ = res
        t0, t1, rtol, atol, _ = times
        lo, hi = jnp.minimum(t0, t1), jnp.maximum(t0, t1)
        # The times to integrate between: t0, then the save times.
        grid = jnp.concatenate([t0[None], ts])
        cts_all = jnp.concatenate([jnp.zeros_like(ct[:1]), ct])
        pid = method.controller(
            rtol if sensealg.rtol is None else sensealg.rtol,
            adjoint_atol(atol, ct, sol.ys) if sensealg.atol is None else sensealg.atol,
        )
        controller: Any = pid
        if method.implicit:
            # Steps end on the forward steps' ends: the interpolant's higher
            # derivatives jump there, which an implicit method's error estimate
            # straddling one reads as error (ROBER over [0, 1e-3]: max_steps
            # without, the forward count with). Carrying max_steps step times
            # costs O(max_steps) per interval (Lotka-Volterra with tsit5: 99 ms
            # against 5 ms per pullback), which explicit algs, whose estimates
            # cope, are spared. The times are direction-multiplied and sorted
            # here, once, not in every interval.
            backward = jnp.where(t1 > t0, -1, 1).astype(t0.dtype)
            # (pyright reads equinox's dataclass fields, not diffrax's __init__.)
            clip: Any = _PresortedClip
            controller = clip(pid, step_ts=sol.interpolation.ts * backward)

        def interval(state: Any, k: Any) -> tuple[Any, None]:
            a, g = state
            a = a + cts_all[k]
            start, end = grid[k], grid[k - 1]
            # An empty interval (t0 saved, or a repeated save time) has no steps.
            span = jnp.where(start == end, end + 0.0, start)
            out = diffrax.diffeqsolve(
                term,
                method.build(),
                span,
                end,
                None,
                (a, g),
                args=(sol, p, lo, hi),
                stepsize_controller=controller,
                max_steps=cfg.max_steps,
                # throw=False only under a transformation (see _adjoint.solve):
                # a failed interval then makes the gradient NaN, not wrong.
                throw=cfg.throw,
                saveat=diffrax.SaveAt(t1=True),
            )
            ok = out.result == diffrax.RESULTS.successful
            a1, g1 = jax.tree_util.tree_map(
                lambda x: jnp.where(ok, x[-1], jnp.nan), out.ys
            )
            return (a1, g1), None

        m = grid.shape[0]
        (a, g), _ = jax.lax.scan(
            interval, (jnp.zeros_like(ct[0]), g0), jnp.arange(m - 1, 0, -1)
        )
        return a + cts_all[0], g

    def on_grid(res: Any, ct: Any, g0: Any) -> tuple[Any, Any]:
        """One step of the method per forward step, backward over the same grid."""
        sol, p, _, ts, grid = res
        lo, hi = jnp.minimum(grid[0], grid[-1]), jnp.maximum(grid[0], grid[-1])
        # The save times are grid points: each grid point's cotangent is the sum
        # of those of the save times equal to it.
        hits = (grid[:, None] == ts[None, :]).astype(ct.dtype)
        ct_grid = jnp.tensordot(hits, ct, axes=1)
        solver = method.build(True)
        args = (sol, p, lo, hi)

        def step(state: Any, k: Any) -> tuple[Any, None]:
            a, g = state
            y = (a + ct_grid[k], g)
            start, end = grid[k], grid[k - 1]
            init = solver.init(term, start, end, y, args)
            y, *_ = solver.step(term, start, end, y, args, init, True)
            return y, None

        n = grid.shape[0]
        (a, g), _ = jax.lax.scan(
            step, (jnp.zeros_like(ct[0]), g0), jnp.arange(n - 1, 0, -1)
        )
        return a + ct_grid[0], g

    def bwd(res: Any, cts: Any) -> Any:
        sol, p, _, _, grid = res
        ct = cts[0]
        if isinstance(ct, SymbolicZero):
            ct = jnp.zeros_like(sol.ys)
        ct = ct.astype(sol.ys.dtype)
        g0 = jax.tree_util.tree_map(jnp.zeros_like, p)
        if sol.ys.size == 0:  # an empty state: nothing depends on u0 or p
            return (jnp.zeros(ct.shape[1:], ct.dtype), g0, None, None, None)
        a, g = (adaptive if grid is None else on_grid)(res, ct, g0)
        return (a, g, None, None, None)

    solve.defvjp(fwd, bwd, symbolic_zeros=True)
    return solve(job.y0, job.p, job.times, job.ts, job.grid)
