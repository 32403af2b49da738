"""`ScipyBackend`: the plain solve, the sensealg table, `dk.vjp` and its losses."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import scipy

from ..._arrays import to_numpy
from ..._errors import SolveError
from ..._sensealg import (
    CheckpointedAdjoint,
    ContinuousAdjoint,
    ForwardMode,
    SensitivityAlgorithm,
)
from ..._solution import Solution
from .. import check_sensealg
from .._protocol import Pullback, SolveRequest
from . import _adjoint, _checkpoint, _forward, _solve
from ._autodiff import Engine, Layout, make_engine, value_and_grad

__all__ = ["ScipyBackend"]


# How each gradient method solves and pulls back: (problem, engine, p layout) ->
# (solution, pullback on NumPy cotangents of shape (m, n)).
def _continuous_adjoint(
    problem: _solve.Problem, engine: Engine, layout: Layout
) -> tuple[Solution, Callable[[Any], tuple[Any, Any]]]:
    """ContinuousAdjoint: the backsolve, except with an implicit alg, where it is
    the interpolating adjoint (`_checkpoint` with one segment: the forward
    solution recomputed once with dense output, the state never integrated
    backward). A backsolve re-integrates the state backward, where a stiff
    problem's fast decaying modes grow: on ROBER it failed past t ~ 0.1."""
    if problem.req.alg.implicit:
        return _checkpoint.vjp(problem, engine, layout, 1, _INTERPOLATING_HINT)
    return _adjoint.vjp(problem, engine, layout)


_INTERPOLATING_HINT = "Raise max_steps or loosen ContinuousAdjoint(rtol=..., atol=...)."

_SENSEALGS: Mapping[
    type[SensitivityAlgorithm],
    Callable[
        [_solve.Problem, Engine, Layout],
        tuple[Solution, Callable[[Any], tuple[Any, Any]]],
    ],
] = {
    ForwardMode: _forward.vjp,
    ContinuousAdjoint: _continuous_adjoint,
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

    def synchronize(self, tree: Any) -> None:
        """Nothing to wait for: NumPy computes synchronously."""

    def peak_memory(
        self, fn: Callable[[], Any], like: Any
    ) -> tuple[float | None, str | None]:
        """Peak of the NumPy buffers and Python objects allocated during the call,
        by tracemalloc (memory a JAX or torch derivative engine allocates is not
        seen)."""
        tracemalloc.start()
        try:
            fn()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return peak / 2**20, "tracemalloc"

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
        array `to_numpy` reads) and returns ``du0`` (u0's shape) and ``dp`` (p's
        structure) as NumPy float64 arrays.

        Raises
        ------
        UnsupportedError
            No engine can differentiate ``f`` (see `_autodiff.engine_name`), or
            ``autodiff='jac'`` with parameters in p.
        SolveError
            The forward solve failed and ``req.throw``; from the pullback: the
            forward solve failed (``throw=False``) or the backward one did.
        """
        check_sensealg(self.name, req.sensealg)
        problem = _solve.prepare(req)
        layout = Layout.of(problem.p)
        engine = make_engine(problem, layout)
        sol, pull = _SENSEALGS[type(req.sensealg)](problem, engine, layout)
        rows = (problem.ts.size, problem.n)

        def pullback(cotangent: Any) -> tuple[Any, Any]:
            if not sol.success:
                raise SolveError(
                    f"the forward solve failed (status '{sol.status}'), so it has "
                    f"no gradient. {sol.message}",
                    sol,
                )
            cot = np.asarray(to_numpy(cotangent), dtype=np.float64).reshape(rows)
            return pull(cot)

        return sol, pullback

    def loss_grad(
        self, loss: Callable[[Solution], Any], sol: Solution, req: SolveRequest
    ) -> tuple[Any, Any]:
        """``loss(sol)`` as a float and its gradient with respect to ``sol.u`` as
        NumPy, by the sensealg's ``autodiff`` framework (JAX or PyTorch)."""
        return value_and_grad(loss, sol, getattr(req.sensealg, "autodiff", None))
