"""The Rosenbrock methods (``rosenbrock23``, ``rodas4``) on the compiled engine.

As `_engine` does for the explicit tableaux: a block of `_engine.BLOCK` step
attempts is one compiled function, with `_implicit`'s own trial step inside it
(the Jacobian by one ``torch.func.jacrev`` call or ``prob.jac``, ``W``
factorised by ``torch.linalg.lu_factor`` and solved by ``lu_solve``) and
`AdaptiveRK`'s controller in tensors; a rejected or idle attempt (size 0) is
masked out by ``torch.where``. The steps, counts (``nfev``, ``njev``, ``nlu``)
and values are the eager driver's, to rounding.

Replays of recorded steps (ReverseThroughSolver, CheckpointedAdjoint) run whole
blocks compiled under autograd, and the steps after the last whole block
eagerly with the same step function: a padded step of size 0 divides by ``h``
(the ``C_ij / h`` terms), and its NaNs would reach the gradient.

Compiled blocks share `_engine`'s cache, keyed by ``f``, ``prob.jac``, the alg
and the direction; compilation failures fall back as there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..._pytree import leaves, tree_map
from .._protocol import SolveRequest
from . import _engine
from ._implicit import IMPLICIT_SOLVERS
from ._rk import (
    Recorder,
    Run,
    no_lift,
)

__all__ = ["ROSENBROCK", "replay", "run"]

# The algs run here.
ROSENBROCK = frozenset(IMPLICIT_SOLVERS)

_ADAPTIVE, _REPLAY = "rosenbrock", "rosenbrock_replay"
for _kind in (_ADAPTIVE, _REPLAY):
    _engine.TRACES.setdefault(_kind, 0)


def _calls_per_step(alg: str) -> int:
    """Evaluations of ``f`` in one trial step (``f`` at its start is known)."""
    constants = IMPLICIT_SOLVERS[alg]._constants(
        torch.float64, torch.device("cpu"), no_lift
    )
    stages = getattr(constants, "stages", None)
    # rosenbrock23: f at the midpoint and at the end; a tableau: f at each stage
    # after the first, and at the end.
    return 2 if stages is None else len(stages)


class _Field:
    """The vector field as `_implicit`'s steps call it, ``func(t, y)``, over the
    user's ``f(u, p, t)`` (and ``prob.jac``), counting nothing (the driver
    counts per attempt)."""

    def __init__(
        self, f: Callable[..., Any], p: Any, dtype: torch.dtype, jac: Any
    ) -> None:
        self.f, self.p, self.dtype, self.jac = f, p, dtype, jac

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> Any:
        return self.f(y, self.p, t.to(self.dtype))

    raw = __call__

    def jacobian(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = y.numel()
        return self.jac(y, self.p, t.to(self.dtype)).reshape(n, n).to(y.dtype)


def _adaptive_block(alg: str, f: Callable[..., Any], jac: Any) -> Callable[..., Any]:
    """`_engine.BLOCK` Rosenbrock step attempts (`_engine.attempts_block` with
    `_implicit`'s own trial step)."""
    solver = IMPLICIT_SOLVERS[alg]
    step_fn = solver._step_fn

    def prepare(y: torch.Tensor, p: Any) -> Any:
        return _Field(f, p, y.dtype, jac), solver._constants(y.dtype, y.device, no_lift)

    def attempt(context: Any, y: Any, fy: Any, t: Any, h: Any, t1: Any) -> Any:
        func, constants = context
        y1, f1, error, coeffs = step_fn(func, y, fy, t, h, t1, constants)
        return y1, f1, error, torch.stack(coeffs)

    return _engine.attempts_block(_ADAPTIVE, 1.0 / solver.order, prepare, attempt)


def _replay_block(alg: str, f: Callable[..., Any], jac: Any) -> Callable[..., Any]:
    """`_engine.BLOCK` Rosenbrock steps of given times: ``(y, f(t, y), dense)``."""
    step_fn = IMPLICIT_SOLVERS[alg]._step_fn
    size = _engine.BLOCK

    def block(
        y: torch.Tensor, fy: torch.Tensor, steps: torch.Tensor, p: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _engine._traced(_REPLAY)
        constants = IMPLICIT_SOLVERS[alg]._constants(y.dtype, y.device, no_lift)
        func = _Field(f, p, y.dtype, jac)
        dense = []
        for n in range(size):
            t0, h, t1 = steps[0, n], steps[1, n], steps[2, n]
            y1, fy, _, coeffs = step_fn(
                func, y, fy, t0, h, t1, constants, estimate=False
            )
            dense.append(torch.stack(coeffs))
            y = y1
        return y, fy, torch.stack(dense)

    return block


_MAKERS = {_ADAPTIVE: _adaptive_block, _REPLAY: _replay_block}


def _entry(
    kind: str, alg: str, f: Callable[..., Any], jac: Any, key: Any
) -> _engine._Compiled:
    full = (kind, alg, _engine.BLOCK, jac, key)
    entry = _engine._CACHE.entries.get(full)
    if entry is None:
        fn = _engine._own_code(_MAKERS[kind](alg, f, jac), len(_engine._CACHE.entries))
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        entry = _engine._Compiled(kind, fn, compiled)
        _engine._CACHE.entries[full] = entry
    return entry


def run(
    req: SolveRequest,
    f: Callable[..., Any],
    p: Any,
    y0: torch.Tensor,
    du0: torch.Tensor,
    times: torch.Tensor,
    backward: bool,
    recorder: Recorder | None,
    jac: Any,
) -> _engine.EngineRun | None:
    """`_engine.run` for a Rosenbrock alg (`jac`: ``prob.jac`` in solver time, or
    None); None where compilation failed (the caller then runs the eager
    driver)."""
    stats: dict[str, float] = {"compile_s": 0.0}
    y0, du0, p = y0.detach(), du0.detach(), _engine._detached(p)
    try:
        with torch.no_grad():
            out = _run(req, f, p, y0, du0, times, backward, recorder, stats, jac)
    except _engine._FallbackError:
        return None
    return _engine.EngineRun(out, stats)


def _run(
    req: SolveRequest,
    f: Callable[..., Any],
    p: Any,
    y0: torch.Tensor,
    du0: torch.Tensor,
    times: torch.Tensor,
    backward: bool,
    recorder: Recorder | None,
    stats: dict[str, float],
    jac: Any,
) -> Run:
    """`_Rosenbrock.run` on compiled blocks: the same steps, saves and stops."""
    alg = req.alg.name
    entry = _entry(_ADAPTIVE, alg, f, jac, _engine._key(req, backward))
    order = IMPLICIT_SOLVERS[alg].order
    d = _engine.drive(req, entry, f, p, y0, du0, times, recorder, stats, order, False)
    return d.run(_calls_per_step(alg), d.total, d.total)


def replay(
    req: SolveRequest,
    f: Callable[..., Any],
    p: Any,
    y: torch.Tensor,
    fy: torch.Tensor | None,
    steps: torch.Tensor,
    backward: bool,
    stats: dict[str, float],
    jac: Any,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`_engine.replay` for a Rosenbrock alg (`jac` as in `run`): ``(state at
    the end, dense outputs (n, 4, *shape))``; None where compilation failed."""
    try:
        return _replay(req, f, p, y, fy, steps, backward, stats, jac)
    except _engine._FallbackError:
        return None


def _replay(
    req: SolveRequest,
    f: Callable[..., Any],
    p: Any,
    y: torch.Tensor,
    fy: torch.Tensor | None,
    steps: torch.Tensor,
    backward: bool,
    stats: dict[str, float],
    jac: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    alg = req.alg.name
    n = steps.shape[1]
    if n == 0:
        return y, None
    whole = n - n % _engine.BLOCK
    p = tree_map(lambda x: x.view_as(x) if isinstance(x, torch.nn.Parameter) else x, p)
    if (
        torch.is_grad_enabled()
        and not y.requires_grad
        and any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves(p))
    ):
        y = y.detach().requires_grad_()
    first: torch.Tensor = f(y, p, steps[0, 0].to(y.dtype)) if fy is None else fy
    if torch.is_grad_enabled() and not first.requires_grad and y.requires_grad:
        first = first.detach().requires_grad_()
    fy = first
    chunks = []
    if whole:
        entry = _entry(_REPLAY, alg, f, jac, _engine._key(req, backward))
        for start in range(0, whole, _engine.BLOCK):
            y, fy, dense = _engine._call(
                entry,
                stats,
                y,
                fy,
                steps[:, start : start + _engine.BLOCK].contiguous(),
                p,
            )
            chunks.append(dense)
    if whole < n:
        solver = IMPLICIT_SOLVERS[alg]
        constants = solver._constants(y.dtype, y.device, no_lift)
        func = _Field(f, p, y.dtype, jac)
        for k in range(whole, n):
            y, fy, _, coeffs = solver._step_fn(
                func, y, fy, steps[0, k], steps[1, k], steps[2, k], constants,
                estimate=False,
            )  # fmt: skip
            chunks.append(torch.stack(coeffs).unsqueeze(0))
    return y, torch.cat(chunks)
