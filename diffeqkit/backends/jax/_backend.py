"""`JaxBackend`: the eager solve, the solve under a JAX transformation, `dk.vjp`,
and the sensealg table that makes a solve differentiable."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..._errors import (
    InvalidProblemError,
    SolveError,
    UnsupportedError,
    backward_failed,
)
from ..._problem import rhs_nonfinite_error
from ..._saveat import step_grid
from ..._sensealg import (
    CheckpointedAdjoint,
    ContinuousAdjoint,
    ForwardMode,
    InterpolatingAdjoint,
    ReverseThroughSolver,
)
from ..._solution import Solution
from .._protocol import (
    Pullback,
    SensealgTable,
    SolveRequest,
    conclude,
    conclude_ensemble,
    solution,
)
from . import _adjoint, _checkpoint, _ensemble, _events, _forward, _interpolating
from ._inputs import (
    Params,
    concrete_times,
    convert_leaves,
    host,
    is_traced,
    placement,
    signature,
    split_p,
    state_dtype,
    traced_inputs,
    visible_devices,
    x64,
)
from ._solve import (
    ALGS,
    PROGRAMS,
    PULLBACK,
    STATUSES,
    Config,
    Job,
    Method,
    nfev,
    program,
    vjp_program,
)

__all__ = ["SENSEALGS", "JaxBackend"]

# How each gradient method makes a solve differentiable: job -> (ys, counts).
SENSEALGS: SensealgTable[Job, tuple[Any, Any]] = {
    ForwardMode: _forward.solve,
    ReverseThroughSolver: _checkpoint.reverse,
    ContinuousAdjoint: _adjoint.solve,
    InterpolatingAdjoint: _interpolating.solve,
    CheckpointedAdjoint: _checkpoint.checkpointed,
}


def _stats(method: Method, naccept: int, nreject: int) -> dict[str, Any]:
    return {
        "nfev": nfev(method, naccept, nreject),
        "naccept": naccept,
        "nreject": nreject,
    }


class JaxBackend:
    """diffeqkit on JAX, through diffrax.

    Works eagerly and under ``jax.jit``, ``jax.grad`` and ``jax.vmap``: under a
    transformation the cached program inlines into the caller's trace, a failure
    raises when it runs (with ``throw=False`` the status is a traced code
    instead), and stats are None.
    """

    name = "jax"

    def solve(self, req: SolveRequest) -> Solution:
        """Solve `req`; ``t`` and ``u`` of the `Solution` are JAX arrays.

        Raises
        ------
        UnsupportedError
            float64 without JAX's x64 mode; a device JAX does not see; fixed
            steps with traced times under a JAX transformation.
        InvalidProblemError
            ``f(u0, p, t0)`` has the wrong shape or dtype, or is not finite.
        SolveError
            The integration failed and ``req.throw`` is True.
        """
        dtype = state_dtype(req)
        method = ALGS[req.alg.name]
        if req.events:
            return self._solve_events(req, method, dtype)
        if is_traced(req):
            return self._solve_traced(req, method, dtype)

        # Per-call work is kept to NumPy conversions, a dictionary lookup, one
        # compiled call and one transfer back (the eager path is benchmarked).
        inputs, params = split_p(req.p)
        device, put = placement(req, inputs)
        u0 = req.u0 if isinstance(req.u0, jax.Array) else host(req.u0, dtype)
        inputs = convert_leaves(inputs, dtype)
        t0, t1, saveat = concrete_times(req)
        grid = (
            np.asarray(step_grid(t0, t1, req.dt0, saveat), dtype=dtype)
            if req.fixed_step and req.dt0 is not None
            else None
        )
        ts = saveat.astype(dtype, copy=False)
        dt0 = 0.0 if req.dt0 is None else req.dt0
        scalars = np.array([t0, t1, req.rtol, req.atol, dt0], dtype=dtype)
        args = (u0, inputs, scalars, ts, grid)
        run = self._program(req, method, dtype, u0, inputs, params, ts, grid, device)
        t, u, info = run(*(jax.device_put(args, device) if put else args))
        info = np.asarray(info)
        code, naccept, nreject, rhs_finite = (int(v) for v in info[:4])
        if not rhs_finite:
            raise rhs_nonfinite_error(req.t0)
        return conclude(
            req,
            t=t,
            u=u,
            stats=_stats(method, naccept, nreject),
            status=STATUSES[code],
            t_reached=float(info[4:].view(dtype)[0]),
        )

    def _solve_traced(self, req: SolveRequest, method: Method, dtype: str) -> Solution:
        """`solve` under a JAX transformation: the program inlines into the trace.

        With ``throw=True`` a failure raises when the program runs; with
        ``throw=False`` the status is a traced int32 code (`Solution.STATUS_CODES`),
        rows not reached are NaN and gradients through a failed solve are NaN.
        """
        (u0, inputs, scalars, ts, grid), params = traced_inputs(req, dtype)
        run = self._program(
            req, method, dtype, u0, inputs, params, ts, grid, None, "traced"
        )
        t, u, info = run(u0, inputs, scalars, ts, grid)
        stats = {"nfev": None, "naccept": None, "nreject": None}
        if req.throw:
            # Only a successful solve returns at all (diffrax raises at run time).
            return conclude(req, t=t, u=u, stats=stats, status="success")
        return _traced_solution(req, t, u, stats, info[0])

    def _solve_events(self, req: SolveRequest, method: Method, dtype: str) -> Solution:
        """`solve` with ``events=[...]`` (`_events`), eagerly or under a JAX
        transformation. Under one, ``t_events[i]`` has ``max_events`` entries,
        NaN after the events that fired, ``stats["nevents"]`` counts them, and the
        status is a traced code (`Solution.STATUS_CODES`) whatever `throw`."""
        mode = "traced" if is_traced(req) else "eager"
        (u0, inputs, scalars, ts, _), params = traced_inputs(req, dtype)
        if mode == "eager":
            device, put = placement(req, inputs)
        else:
            device, put = None, False
        run = self._events_program(
            req, method, dtype, u0, inputs, params, ts, device, mode
        )
        args = (u0, inputs, scalars, ts)
        t, u, t_ev, u_ev, info, t_end = run(
            *(jax.device_put(args, device) if put else args)
        )
        n = len(req.events)
        if mode == "traced":
            stats = {
                "nfev": None,
                "naccept": None,
                "nreject": None,
                "nevents": jnp.sum(info[3 : 3 + n]),
            }
            # The status is a traced code even with throw=True (a failure then
            # raises when the program runs): "success" and "terminated" are
            # both successes, told apart only at run time.
            return _traced_solution(req, t, u, stats, info[0], list(t_ev), list(u_ev))
        host_info = np.asarray(info)
        code, naccept, nreject = (int(v) for v in host_info[:3])
        per_event = [int(v) for v in host_info[3 : 3 + n]]
        if not host_info[3 + n]:
            raise rhs_nonfinite_error(req.t0)
        stats = _stats(method, naccept, nreject)
        stats["nevents"] = sum(per_event)
        return conclude(
            req,
            t=t,
            u=u,
            stats=stats,
            status=STATUSES[code],
            t_reached=float(t_end),
            t_events=[_first(t_ev, i, k) for i, k in enumerate(per_event)],
            u_events=[_first(u_ev, i, k) for i, k in enumerate(per_event)],
        )

    def vjp(self, req: SolveRequest) -> tuple[Solution, Pullback]:
        """Solve, and return the pullback by ``req.sensealg`` (`dk.vjp`).

        One compiled program (cached like `solve`'s) runs the solve and keeps what
        the reverse pass needs; a second one, compiled once per structure, runs
        the pullback. Gradients are JAX arrays: ``du0`` of u0's shape, ``dp``
        with p's structure.
        """
        dtype = state_dtype(req)
        method = ALGS[req.alg.name]
        if is_traced(req):
            raise UnsupportedError(
                "dk.vjp cannot run under a JAX transformation; inside jax.jit, "
                "jax.grad or jax.vmap call dk.solve and differentiate it with "
                "jax.grad or jax.vjp instead (the sensealg does the work there too)."
            )
        if req.events:
            return self._events_vjp(req, dtype)
        (u0, inputs, scalars, ts, grid), params = traced_inputs(req, dtype)
        device, _ = placement(req, inputs)
        run = self._program(
            req, method, dtype, u0, inputs, params, ts, grid, device, "vjp"
        )
        args = jax.device_put((u0, inputs, scalars, ts, grid), device)
        u, pullback, (t, counts) = run(*args)
        code, naccept, nreject = (int(v) for v in np.asarray(counts))
        sol = conclude(
            req,
            t=t,
            u=u,
            stats=_stats(method, naccept, nreject),
            status=STATUSES[code],
        )

        def pull(cotangent: Any) -> tuple[Any, Any]:
            if not sol.success:  # no derivative (`failure_masked`); nothing to run
                du0, dp = jax.tree_util.tree_map(
                    lambda x: jnp.full(jnp.shape(x), jnp.nan, u.dtype), (u0, inputs)
                )
                return du0, params.grads(dp)
            ct = jax.device_put(jnp.asarray(cotangent, dtype=u.dtype), device)
            try:
                du0, dp = jax.block_until_ready(PULLBACK(pullback, ct))
            except (jax.errors.JaxRuntimeError, ValueError) as err:
                # A run-time failure of the backward solve (diffrax's error
                # callback) surfaces as JaxRuntimeError or, depending on when
                # XLA reports it, as a ValueError "INTERNAL: CpuCallback error".
                if not _runtime_failure(err):
                    raise
                raise SolveError(backward_failed(req.sensealg, str(err))) from err
            return du0, params.grads(dp)

        return sol, pull

    def solve_ensemble(
        self,
        req: SolveRequest,
        u0: Any,
        p: Any,
        size: int,
        *,
        devices: Any = None,
    ) -> Solution:
        """Solve `size` members: ``jax.vmap`` of the compiled solve, each member
        with its own steps (`_ensemble`); ``devices=[...]`` shards them.

        Eagerly, ``status`` is a tuple of names and ``stats`` lists, one per
        member. Under a JAX transformation, stats are None and, with
        ``throw=False``, ``status`` is a traced int32 array of codes (one per
        member); with ``throw=True`` a failed member raises when the program
        runs.

        Raises
        ------
        InvalidProblemError
            ``f(u0, p, t0)`` is not finite for some members (named).
        SolveError
            Members failed and ``req.throw`` is True (the message names them).
        """
        dtype = state_dtype(req)
        method = ALGS[req.alg.name]
        if req.events:
            return self._ensemble_events(req, method, dtype, u0, p, size, devices)
        traced = is_traced(req)
        (tu0, tinputs, scalars, ts, grid), params = traced_inputs(req, dtype)
        bu0, inputs, batch = _ensemble.batch_inputs(
            req, u0, p, dtype, (tu0, tinputs, params)
        )
        if not traced:
            t0, t1, saveat = concrete_times(req)
            ts = saveat.astype(dtype, copy=False)
            dt0 = 0.0 if req.dt0 is None else req.dt0
            scalars = np.array([t0, t1, req.rtol, req.atol, dt0], dtype=dtype)
        args = (bu0, inputs, scalars, ts, grid)
        args, device = _place_batch(req, devices, traced, batch, size, inputs, args)
        mode = "traced" if traced else "eager"
        run = self._program(
            req, method, dtype, tu0, tinputs, params, ts, grid, device, mode, batch
        )
        t, u, info = run(*args)
        u = _ensemble.trim(u, size)
        if traced:
            stats = {"nfev": None, "naccept": None, "nreject": None}
            if req.throw:  # only a successful solve returns (diffrax raises)
                return conclude_ensemble(
                    req, t=t, u=u, stats=stats, status=["success"] * size
                )
            return _traced_solution(req, t, u, stats, _ensemble.trim(info, size)[:, 0])
        info = np.asarray(info)[:size]
        bad = np.flatnonzero(info[:, 3] == 0)
        if bad.size:
            raise rhs_nonfinite_members(req.t0, bad)
        t_reached = info[:, 4:].copy().view(dtype)[:, 0]
        return conclude_ensemble(
            req,
            t=t,
            u=u,
            stats=_member_stats(method, info),
            status=[STATUSES[int(c)] for c in info[:, 0]],
            t_reached=[float(x) for x in t_reached],
        )

    def vjp_ensemble(
        self,
        req: SolveRequest,
        u0: Any,
        p: Any,
        size: int,
        *,
        devices: Any = None,
    ) -> tuple[Solution, Pullback]:
        """`dk.vjp` of an ensemble: the batched program and its pullback, cached
        like `vjp`'s. Batched inputs' gradients keep the member axis; shared
        ones are summed over the members. A failed member's gradients are NaN
        (``throw=False``)."""
        dtype = state_dtype(req)
        method = ALGS[req.alg.name]
        if is_traced(req):
            raise UnsupportedError(
                "dk.vjp cannot run under a JAX transformation; inside jax.jit, "
                "jax.grad or jax.vmap call dk.solve on the ensemble and "
                "differentiate it with jax.grad or jax.vjp instead."
            )
        if req.events:
            return self._events_vjp_ensemble(req, dtype, u0, p, size, devices)
        (tu0, tinputs, scalars, ts, grid), params = traced_inputs(req, dtype)
        bu0, inputs, batch = _ensemble.batch_inputs(
            req, u0, p, dtype, (tu0, tinputs, params)
        )
        args = (bu0, inputs, scalars, ts, grid)
        total, device = size, None
        if devices is not None:
            args, total = _ensemble.shard(_ensemble.mesh_of(devices), batch, size, args)
        else:
            device, _ = placement(req, [x for x in inputs if x is not None])
            args = jax.device_put(args, device)
        run = self._program(
            req, method, dtype, tu0, tinputs, params, ts, grid, device, "vjp", batch
        )
        u, pullback, (t, counts) = run(*args)
        counts = np.asarray(counts)[:size]
        sol = conclude_ensemble(
            req,
            t=t,
            u=_ensemble.trim(u, size),
            stats=_member_stats(method, counts),
            status=[STATUSES[int(c)] for c in counts[:, 0]],
        )
        padding = total - size

        def pull(cotangent: Any) -> tuple[Any, Any]:
            ct = jnp.asarray(cotangent, dtype=u.dtype)
            if padding:
                ct = jnp.concatenate(
                    [ct, jnp.zeros((padding, *ct.shape[1:]), ct.dtype)]
                )
            ct = jax.device_put(ct, u.sharding)
            try:
                du0, dp = jax.block_until_ready(PULLBACK(pullback, ct))
            except (jax.errors.JaxRuntimeError, ValueError) as err:
                if not _runtime_failure(err):
                    raise
                raise SolveError(backward_failed(req.sensealg, str(err))) from err
            if padding:
                du0 = du0 if batch.u0 is None else du0[:size]
                dp = [
                    x if a is None else x[:size]
                    for x, a in zip(dp, batch.p, strict=True)
                ]
            return du0, params.grads(dp)

        return sol, pull

    def _ensemble_events(
        self,
        req: SolveRequest,
        method: Method,
        dtype: str,
        u0: Any,
        p: Any,
        size: int,
        devices: Any,
    ) -> Solution:
        """`solve_ensemble` with events: ``vmap`` of the solve with events
        (`_ensemble.batched_events_program`). ``t_events[k]`` has shape ``(B,
        n_k)`` and ``u_events[k]`` ``(B, n_k, *u0.shape)``, NaN after each
        member's own events: eagerly ``n_k`` is the most any member fired event
        ``k``, under a transformation ``max_events`` (static shapes), with
        ``stats["nevents"]`` a traced count per member and the status traced
        codes whatever `throw` (as for one solve with events)."""
        traced = is_traced(req)
        (tu0, tinputs, scalars, ts, _), params = traced_inputs(req, dtype)
        bu0, inputs, batch = _ensemble.batch_inputs(
            req, u0, p, dtype, (tu0, tinputs, params)
        )
        args = (bu0, inputs, scalars, ts, None)
        args, device = _place_batch(req, devices, traced, batch, size, inputs, args)
        mode = "traced" if traced else "eager"
        run = self._events_program(
            req, method, dtype, tu0, tinputs, params, ts, device, mode, batch
        )
        t, u, t_ev, u_ev, info, t_end = (
            x if i == 0 else _ensemble.trim(x, size)
            for i, x in enumerate(run(*args[:4]))
        )
        n = len(req.events)
        if traced:
            stats = {
                "nfev": None,
                "naccept": None,
                "nreject": None,
                "nevents": jnp.sum(info[:, 3 : 3 + n], axis=1),
            }
            return _traced_solution(
                req,
                t,
                u,
                stats,
                info[:, 0],
                [t_ev[:, k] for k in range(n)],
                [u_ev[:, k] for k in range(n)],
            )
        info = np.asarray(info)
        bad = np.flatnonzero(info[:, 3 + n] == 0)
        if bad.size:
            raise rhs_nonfinite_members(req.t0, bad)
        counts = info[:, 3 : 3 + n]
        stats = _member_stats(method, info)
        stats["nevents"] = [int(c) for c in counts.sum(axis=1)]
        most = counts.max(axis=0)
        return conclude_ensemble(
            req,
            t=t,
            u=u,
            stats=stats,
            status=[STATUSES[int(c)] for c in info[:, 0]],
            t_reached=[float(x) for x in np.asarray(t_end)],
            t_events=[t_ev[:, k, : int(most[k])] for k in range(n)],
            u_events=[u_ev[:, k, : int(most[k])] for k in range(n)],
        )

    def _events_vjp_ensemble(
        self, req: SolveRequest, dtype: str, u0: Any, p: Any, size: int, devices: Any
    ) -> tuple[Solution, Pullback]:
        """`dk.vjp` of an ensemble with events: `jax.vjp` of the batched solve's
        ``u``, ``t_events`` and ``u_events`` (differentiated by the sensealg as
        one solve is; event cotangents on the NaN padding are unused). Batched
        inputs' gradients keep the member axis, shared ones are summed; a
        failed member's rows are NaN (a shared input's whole gradient when any
        member failed)."""
        sol = self.solve_ensemble(req, u0, p, size, devices=devices)
        x_u0 = jnp.asarray(req.u0 if u0 is None else u0, dtype=dtype)
        x_p = req.p if p is None else p
        if not all(
            jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
            for x in jax.tree_util.tree_leaves(x_p)
        ):
            raise UnsupportedError(
                "dk.vjp with events=[...] on backend='jax' needs p's leaves all "
                "floating; differentiate dk.solve with jax.grad instead (static "
                "leaves as equinox does: eqx.filter_grad)."
            )
        x_p = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=dtype), x_p)
        first = functools.partial(jax.tree_util.tree_map, lambda x: x[0])

        def solve_outputs(xu0: Any, xp: Any) -> Any:
            member = dataclasses.replace(
                req,
                u0=xu0 if u0 is None else xu0[0],
                p=xp if p is None else first(xp),
                throw=False,
            )
            # traced: t_events[k] of shape (B, max_events), NaN after the firings
            traced = self.solve_ensemble(
                member,
                None if u0 is None else xu0,
                None if p is None else xp,
                size,
                devices=devices,
            )
            return traced.u, list(traced.t_events), list(traced.u_events)

        (_, t_padded, u_padded), pull_outputs = jax.vjp(solve_outputs, x_u0, x_p)
        zeros = (
            [jnp.zeros_like(x) for x in t_padded],
            [jnp.zeros_like(x) for x in u_padded],
        )
        failed = np.flatnonzero(~np.asarray(sol.success))

        def padded(cots: Any, found: Any, like: Any) -> list[Any]:
            # each member's firings' cotangents; zeros on the NaN padding (no
            # output there), and after the n_k columns eager `sol` shows
            return [
                z.at[:, : np.shape(c)[1]].set(
                    jnp.where(jnp.isnan(x), 0.0, jnp.asarray(c, dtype=dtype))
                )
                for c, x, z in zip(cots, found, like, strict=True)
            ]

        def pull(cotangent: Any, events: Any = None) -> tuple[Any, Any]:
            t_cots, u_cots = zeros
            if events is not None:
                t_cots, u_cots = (
                    padded(c, x, z)
                    for c, x, z in zip(
                        events, (sol.t_events, sol.u_events), zeros, strict=True
                    )
                )
            cot = jnp.asarray(cotangent, dtype=dtype)
            du0, dp = pull_outputs((cot, t_cots, u_cots))
            if failed.size:
                du0 = _nan_failed(du0, failed, u0 is not None)
                dp = jax.tree_util.tree_map(
                    lambda g: _nan_failed(g, failed, p is not None), dp
                )
            return du0, dp

        return sol, pull

    def _events_vjp(self, req: SolveRequest, dtype: str) -> tuple[Solution, Pullback]:
        """`dk.vjp` of a solve with events: `jax.vjp` of the solve's ``u``,
        ``t_events`` and ``u_events`` (their gradients are `_events'`); a failed
        solve's gradients are NaN."""
        sol = self.solve(req)
        floating = [
            jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
            for x in jax.tree_util.tree_leaves(req.p)
        ]
        if not all(floating):
            raise UnsupportedError(
                "dk.vjp with events=[...] on backend='jax' needs p's leaves all "
                "floating; differentiate dk.solve with jax.grad instead (static "
                "leaves as equinox does: eqx.filter_grad)."
            )
        u0 = jnp.asarray(req.u0, dtype=dtype)
        p = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=dtype), req.p)

        def solve_outputs(u0: Any, p: Any) -> Any:
            # traced: t_events[i] has max_events entries, NaN after the firings
            traced = self.solve(dataclasses.replace(req, u0=u0, p=p, throw=False))
            return traced.u, list(traced.t_events), list(traced.u_events)

        (_, t_padded, u_padded), pull_outputs = jax.vjp(solve_outputs, u0, p)
        zeros = (
            [jnp.zeros_like(x) for x in t_padded],
            [jnp.zeros_like(x) for x in u_padded],
        )

        def padded(cots: Any, like: Any) -> list[Any]:
            # the firings' cotangents, zeros after them
            return [
                z.at[: np.shape(c)[0]].set(jnp.asarray(c, dtype=dtype))
                for c, z in zip(cots, like, strict=True)
            ]

        def pull(cotangent: Any, events: Any = None) -> tuple[Any, Any]:
            t_cots, u_cots = zeros
            if events is not None:
                t_cots, u_cots = (
                    padded(c, z) for c, z in zip(events, zeros, strict=True)
                )
            cot = jnp.asarray(cotangent, dtype=dtype)
            du0, dp = pull_outputs((cot, t_cots, u_cots))
            if not sol.success:
                du0, dp = jax.tree_util.tree_map(
                    lambda g: jnp.full_like(g, jnp.nan), (du0, dp)
                )
            return du0, dp

        return sol, pull

    def loss_grad(
        self, loss: Callable[[Solution], Any], sol: Solution, req: SolveRequest
    ) -> tuple[Any, Any, Any]:
        """``loss(sol)`` and its gradients with respect to ``sol.u`` and, with
        events, ``(sol.t_events, sol.u_events)``, by JAX."""
        del req
        if sol.t_events is None:
            value, cot = jax.value_and_grad(
                lambda u: loss(dataclasses.replace(sol, u=u))
            )(sol.u)
            return value, cot, None

        def of_outputs(outputs: Any) -> Any:
            u, t_events, u_events = outputs
            return loss(
                dataclasses.replace(sol, u=u, t_events=t_events, u_events=u_events)
            )

        outputs = (sol.u, list(sol.t_events), list(sol.u_events))
        value, (cot, t_cots, u_cots) = jax.value_and_grad(of_outputs)(outputs)
        return value, cot, (t_cots, u_cots)

    @staticmethod
    def _program(
        req: SolveRequest,
        method: Method,
        dtype: str,
        u0: Any,
        inputs: list[Any],
        params: Params,
        ts: Any,
        grid: Any,
        device: Any,
        mode: str = "eager",
        batch: _ensemble.Batch | None = None,
    ) -> Callable[..., Any]:
        """The cached compiled program for this problem structure: p's `Params`
        and the signatures of its inputs, not their values (for an ensemble, a
        member's signatures, and which inputs are batched: `batch`)."""
        # An eager solve is not differentiated: one program serves every sensealg.
        sensealg = None if mode == "eager" else req.sensealg
        # Only a solve under a transformation raises itself (else the host does).
        throw = req.throw if mode == "traced" else True
        fixed_step = req.fixed_step
        adaptive_dt0 = not fixed_step and req.dt0 is not None
        # The core asks for landing where the shared tableau's dense output is weak;
        # diffrax's interpolants are not the shared ones, so their own orders count.
        land = not fixed_step and (method.lands_on_saves or req.land_on_saves)
        key = (
            req.f,
            req.jac,
            req.alg.name,
            signature(u0),
            params,
            tuple(signature(x) for x in inputs),
            len(ts),
            None if grid is None else len(grid),
            req.max_steps,
            fixed_step,
            adaptive_dt0,
            land,
            device,
            mode,
            sensealg,
            dtype,
            throw,
            batch,
        )
        cfg = Config(
            params.bind(req.f),
            method,
            dtype,
            req.max_steps,
            fixed_step,
            adaptive_dt0,
            land,
            mode,
            sensealg,
            None if sensealg is None else SENSEALGS[type(sensealg)],
            throw,
        )
        if batch is not None:
            run = (
                _ensemble.batched_vjp_program
                if mode == "vjp"
                else _ensemble.batched_program
            )
            return PROGRAMS.get(key, functools.partial(run, cfg, batch))
        run = vjp_program if mode == "vjp" else program
        return PROGRAMS.get(key, functools.partial(run, cfg))

    @staticmethod
    def _events_program(
        req: SolveRequest,
        method: Method,
        dtype: str,
        u0: Any,
        inputs: list[Any],
        params: Params,
        ts: Any,
        device: Any,
        mode: str,
        batch: _ensemble.Batch | None = None,
    ) -> Callable[..., Any]:
        """The cached compiled program of a solve with events (`_events`); for
        an ensemble, `batch` says which inputs carry the member axis."""
        sensealg = None if mode == "eager" else req.sensealg
        throw = req.throw if mode == "traced" else True
        adaptive_dt0 = req.dt0 is not None and not req.fixed_step
        land = method.lands_on_saves or req.land_on_saves
        key = (
            "events",
            req.events,
            req.max_events,
            req.f,
            req.alg.name,
            signature(u0),
            params,
            tuple(signature(x) for x in inputs),
            len(ts),
            req.max_steps,
            req.fixed_step,
            adaptive_dt0,
            land,
            device,
            mode,
            sensealg,
            dtype,
            throw,
            batch,
        )
        cfg = Config(
            params.bind(req.f),
            method,
            dtype,
            req.max_steps,
            req.fixed_step,
            adaptive_dt0,
            land,
            mode,
            sensealg,
            None if sensealg is None else SENSEALGS[type(sensealg)],
            throw,
        )
        ev = _events.EventConfig(
            req.events, req.max_events, params.bind, batched=batch is not None
        )
        if batch is not None:
            run = functools.partial(_ensemble.batched_events_program, cfg, ev, batch)
            return PROGRAMS.get(key, run)
        return PROGRAMS.get(key, functools.partial(_events.program, cfg, ev))

    def describe(self) -> dict[str, Any]:
        """Visible devices, JAX's default platform and whether x64 is on."""
        return {
            "devices": visible_devices(),
            "default_backend": jax.default_backend(),
            "x64": x64(),
        }


# Empty event outputs, per shape, dtype and device: an event that did not fire
# costs no dispatch of a slice (a shared JAX array: they are immutable).
_EMPTY: dict[tuple[Any, ...], Any] = {}


def _first(padded: Any, i: int, k: int) -> Any:
    """``padded[i, :k]``, the `k` entries of event `i` in the padded buffer."""
    if k:
        return padded[i, :k]
    key = (padded.shape[2:], padded.dtype, padded.sharding)
    if key not in _EMPTY:
        _EMPTY[key] = padded[i, :0]
    return _EMPTY[key]


def _place_batch(
    req: SolveRequest,
    devices: Any,
    traced: bool,
    batch: Any,
    size: int,
    inputs: list[Any],
    args: tuple[Any, ...],
) -> tuple[tuple[Any, ...], Any]:
    """An ensemble's program arguments where they run: sharded over `devices`,
    else (eager) on the inputs' device; and that device (None: sharded or
    traced, where JAX places them)."""
    if devices is not None:
        args, _total = _ensemble.shard(_ensemble.mesh_of(devices), batch, size, args)
        return args, None
    if traced:
        return args, None
    device, put = placement(req, [x for x in inputs if x is not None])
    return (jax.device_put(args, device) if put else args), device


def _member_stats(method: Method, info: Any) -> dict[str, Any]:
    """Per-member lists of `_stats` from the rows ``(code, naccept, nreject, ...)``."""
    rows = [_stats(method, int(r[1]), int(r[2])) for r in info]
    return {k: [r[k] for r in rows] for k in ("nfev", "naccept", "nreject")}


def rhs_nonfinite_members(t0: Any, members: Any) -> InvalidProblemError:
    ids = ", ".join(str(int(i)) for i in members[:10])
    more = f", ... ({len(members)} in all)" if len(members) > 10 else ""
    return InvalidProblemError(
        f"f(u0, p, t0) is not finite at t0={t0!r} (NaN or inf) for members "
        f"[{ids}{more}]. Check their u0 and p, and f near the initial time."
    )


def _nan_failed(grad: Any, failed: Any, batched: bool) -> Any:
    """NaN for failed members: their rows of a batched input's gradient, the
    whole gradient of a shared one (no derivative, as for one failed solve)."""
    if batched:
        return grad.at[failed].set(jnp.nan)
    return jnp.full_like(grad, jnp.nan)


def _runtime_failure(err: Exception) -> bool:
    """Whether `err` is a compiled program failing at run time (not a bug of ours)."""
    return isinstance(err, jax.errors.JaxRuntimeError) or str(err).startswith(
        "INTERNAL:"
    )


def _traced_solution(
    req: SolveRequest,
    t: Any,
    u: Any,
    stats: dict[str, Any],
    code: Any,
    t_events: Any = None,
    u_events: Any = None,
) -> Solution:
    """The `Solution` of a solve under a JAX transformation: its status the traced
    code (`Solution.STATUS_CODES`), known only when the program runs."""
    return solution(
        req, t=t, u=u, stats=stats, status=code, t_events=t_events, u_events=u_events
    )
