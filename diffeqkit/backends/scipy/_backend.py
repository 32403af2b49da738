"""`ScipyBackend`: the plain solve, the sensealg table, `dk.vjp` and its losses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy

from ..._arrays import to_numpy
from ..._sensealg import (
    CheckpointedAdjoint,
    ContinuousAdjoint,
    ForwardMode,
    InterpolatingAdjoint,
)
from ..._solution import Solution
from .._protocol import Pullback, SensealgTable, SolveRequest
from . import _adjoint, _checkpoint, _ensemble, _events, _forward, _solve
from ._autodiff import Job, Layout, Pull, make_engine, value_and_grad

__all__ = ["ScipyBackend"]


# How each gradient method solves and pulls back (the one sensealg contract).
SENSEALGS: SensealgTable[Job, tuple[Solution, Pull]] = {
    ForwardMode: _forward.vjp,
    ContinuousAdjoint: _adjoint.vjp,
    InterpolatingAdjoint: _checkpoint.interpolating,
    CheckpointedAdjoint: _checkpoint.vjp,
}


class ScipyBackend:
    """Solves `SolveRequest`s with `scipy.integrate` (see the package docstring)."""

    name = "scipy"

    def describe(self) -> dict[str, Any]:
        """Versions and devices, for `python -m diffeqkit info`."""
        return {
            "devices": ["cpu"],
            "versions": {"scipy": scipy.__version__, "numpy": np.__version__},
        }

    def solve(self, req: SolveRequest) -> Solution:
        """Integrate `req` and return a `Solution` of NumPy float64 arrays.

        The sensealg plays no part: the solve is the plain one.

        Parameters
        ----------
        req : SolveRequest
            The validated call of `dk.solve`.

        Returns
        -------
        Solution
            ``t`` of shape ``(m,)`` and ``u`` of shape ``(m, *u0.shape)``, float64
            NumPy arrays; rows at save times not reached are NaN.

        Raises
        ------
        UnsupportedError
            The state dtype is float32.
        InvalidProblemError
            `f` (at ``t0``) or `jac` returns the wrong shape, dtype or values.
        SolveError
            The integration failed and ``req.throw``.
        """
        return _solve.solve(_solve.prepare(req))

    def vjp(self, req: SolveRequest) -> tuple[Solution, Pullback]:
        """Solve, and return the pullback by ``req.sensealg`` (`dk.vjp`).

        The engine that differentiates ``f`` is chosen (and checked) before the
        solve. The pullback takes a cotangent of ``sol.u``'s shape (NumPy, or any
        array `to_numpy` reads), with events also ``(t_cots, u_cots)``, those of
        ``sol.t_events`` and ``sol.u_events``, and returns ``du0`` (u0's shape)
        and ``dp`` (p's structure) as NumPy float64 arrays.

        Raises
        ------
        UnsupportedError
            No engine can differentiate ``f`` (see `_autodiff.engine_name`), or
            ``autodiff='jac'`` with parameters in p.
        SolveError
            The forward solve failed and ``req.throw``; from the pullback: the
            backward solve failed.

        With ``throw=False`` a failed forward solve has no derivative: its
        pullback returns gradients of the right shapes filled with NaN (integer
        leaves of p: zeros), as on every backend.
        """
        problem = _solve.prepare(req)
        layout = Layout.of(problem.p)
        job = Job(problem, make_engine(problem, layout), layout)
        method = SENSEALGS[type(req.sensealg)]
        if req.events and method is not _forward.vjp:
            # ForwardMode carries its sensitivities across events itself
            sol, pull = _events.vjp(job, method)
        else:
            sol, pull = method(job)
        rows = (problem.ts.size, problem.n)

        def pullback(cotangent: Any, events: Any = None) -> tuple[Any, Any]:
            if not sol.success:  # no derivative: NaN, as on every backend
                nan = np.full(layout.size, np.nan)
                return np.full(problem.shape, np.nan), layout.gradient(nan)
            cot = np.asarray(to_numpy(cotangent), dtype=np.float64).reshape(rows)
            if events is None:
                return pull(cot)
            t_cots, u_cots = events
            return pull(
                cot,
                (
                    [_numpy(c).reshape(-1) for c in t_cots],
                    [_numpy(c).reshape(-1, problem.n) for c in u_cots],
                ),
            )

        return sol, pullback

    def solve_ensemble(
        self,
        req: SolveRequest,
        u0: Any,
        p: Any,
        size: int,
        *,
        executor: Any = None,
    ) -> Solution:
        """Solve `size` members (see `_ensemble`): in chunks on `executor` (a
        `concurrent.futures.Executor` or a ``dask.distributed.Client``), or here
        one after another when it is None. ``u`` has shape ``(size, m,
        *u0.shape)``; ``status`` one name per member; ``stats`` lists."""
        return _ensemble.solve_ensemble(req, u0, p, size, executor=executor)

    def vjp_ensemble(
        self,
        req: SolveRequest,
        u0: Any,
        p: Any,
        size: int,
        *,
        executor: Any = None,
    ) -> tuple[Solution, Pullback]:
        """Each member's `vjp` by ``req.sensealg``, in chunks as in
        `solve_ensemble`."""
        return _ensemble.vjp_ensemble(req, u0, p, size, executor=executor)

    def loss_grad(
        self, loss: Callable[[Solution], Any], sol: Solution, req: SolveRequest
    ) -> tuple[Any, Any, Any]:
        """``loss(sol)`` as a float and its gradients with respect to ``sol.u``
        and, with events, ``(sol.t_events, sol.u_events)`` as NumPy, by the
        sensealg's ``autodiff`` framework (JAX or PyTorch)."""
        return value_and_grad(loss, sol, getattr(req.sensealg, "autodiff", None))


def _numpy(x: Any) -> Any:
    return np.asarray(to_numpy(x), dtype=np.float64)
