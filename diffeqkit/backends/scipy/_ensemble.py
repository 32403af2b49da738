"""Ensembles on SciPy: members solved one by one, in chunks, in this process or on
an executor's workers.

``executor=None`` solves the chunks here, one after another. A
`concurrent.futures.Executor` gets one task per chunk (`submit`); a
``dask.distributed.Client`` too, with retries, so that a chunk whose worker died
runs again elsewhere (Dask reschedules the tasks of a lost worker by itself;
``retries`` covers a chunk that raised). Results come back in member order.

Chunks: about `CHUNKS_PER_WORKER` per worker (so a slow chunk does not leave the
others idle at the end), never fewer than `MIN_CHUNK` members (so that scheduling,
a few milliseconds a task on Dask, stays small next to the solves).

Gradients: in-process (None, a `ThreadPoolExecutor`) each member's `vjp` keeps
its pullback; on other executors the member's pullback cannot travel back, so the
ensemble's pullback runs each chunk's member `vjp` again on the workers with its
cotangent (one more forward solve per member). With events, the cotangents of the
padded ``(B, n_k)`` event outputs are cut per member to its own ``n_k`` firings;
those on the NaN padding are dropped (padding is no output of any member).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..._arrays import to_numpy
from ..._errors import invalid
from ..._events import stack_members
from ..._pytree import leaves, tree_map
from ..._solution import Solution
from .._protocol import Pullback, SolveRequest, conclude_ensemble

__all__ = [
    "CHUNKS_PER_WORKER",
    "MIN_CHUNK",
    "RETRIES",
    "chunks",
    "member_events",
    "solve_ensemble",
    "vjp_ensemble",
]

CHUNKS_PER_WORKER = 4
MIN_CHUNK = 8
# Retries of a chunk that raised on a Dask worker (a lost worker is rescheduled
# by Dask itself, up to its `allowed-failures`).
RETRIES = 3

# One member's result: (u of shape (m, *u0.shape), status, stats, t_events,
# u_events) (the last two None without events).
Member = tuple[Any, str, dict[str, Any], Any, Any]


def solve_ensemble(
    req: SolveRequest, u0: Any, p: Any, size: int, *, executor: Any = None
) -> Solution:
    """Solve the members in chunks on `executor` (None: here, serially)."""
    u0, p = _numpy(u0), _numpy(p)
    check_executor(executor)
    parts = chunks(size, workers(executor))
    tasks = [(req, _rows(u0, a, b), _rows(p, a, b), b - a) for a, b in parts]
    results = run(executor, _solve_chunk, tasks)
    return _gather(req, [m for chunk in results for m in chunk])


def vjp_ensemble(
    req: SolveRequest, u0: Any, p: Any, size: int, *, executor: Any = None
) -> tuple[Solution, Pullback]:
    """The members' `vjp`s in chunks; the pullback stacks batched inputs'
    gradients along the member axis and sums those of shared inputs."""
    u0, p = _numpy(u0), _numpy(p)
    check_executor(executor)
    parts = chunks(size, workers(executor))
    tasks = [(req, _rows(u0, a, b), _rows(p, a, b), b - a) for a, b in parts]
    local = executor is None or isinstance(
        executor, concurrent.futures.ThreadPoolExecutor
    )
    if local:
        results = run(executor, _vjp_chunk, tasks)
        members = [m for chunk in results for m, _ in chunk]
        pulls = [pull for chunk in results for _, pull in chunk]
    else:
        members = [m for chunk in run(executor, _vjp_solve_chunk, tasks) for m in chunk]
        pulls = []
    sol = _gather(req, members)
    # how many times each member fired each event (its rows before the padding)
    fired = [[len(t) for t in m[3]] if req.events else [] for m in members]

    def pullback(cotangent: Any, events: Any = None) -> tuple[Any, Any]:
        cot = np.asarray(to_numpy(cotangent), dtype=np.float64)
        # Rows not reached (after a terminal event, or a failure) carry no
        # derivative: their cotangent is unused, as on torch and JAX.
        cot = np.where(np.isnan(sol.u), 0.0, cot)
        ev = [None] * size if events is None else member_events(events, fired)
        if local:
            grads = run(
                executor,
                _pull_chunk,
                [(pulls[a:b], cot[a:b], ev[a:b]) for a, b in parts],
            )
        else:
            grads = run(
                executor,
                _vjp_pull_chunk,
                [
                    (*task, cot[a:b], ev[a:b])
                    for task, (a, b) in zip(tasks, parts, strict=True)
                ],
            )
        flat = [g for chunk in grads for g in chunk]
        du0 = np.stack([g[0] for g in flat])
        dp = _stack_tree(req.p, [g[1] for g in flat])
        return (
            du0 if u0 is not None else du0.sum(axis=0),
            dp if p is not None else tree_map(_sum_members, dp),
        )

    return sol, pullback


# ---------------------------------------------------------------------------------
# Chunks: what runs on a worker. Module-level functions, so that they pickle by
# reference; a chunk carries the template request and its members' rows only.
# ---------------------------------------------------------------------------------


def _member(req: SolveRequest, u0: Any, p: Any, i: int) -> SolveRequest:
    """Member `i` of a chunk as its own request (never raising: the ensemble
    decides)."""
    return dataclasses.replace(
        req,
        u0=req.u0 if u0 is None else u0[i],
        p=req.p if p is None else tree_map(lambda x: None if x is None else x[i], p),
        throw=False,
    )


def _result(sol: Solution) -> Member:
    return np.asarray(sol.u), sol.status, dict(sol.stats), sol.t_events, sol.u_events


def _solve_chunk(req: SolveRequest, u0: Any, p: Any, n: int) -> list[Member]:
    from . import _solve

    return [
        _result(_solve.solve(_solve.prepare(_member(req, u0, p, i)))) for i in range(n)
    ]


def _vjp_chunk(
    req: SolveRequest, u0: Any, p: Any, n: int
) -> list[tuple[Member, Pullback]]:
    from . import BACKEND

    out = []
    for i in range(n):
        sol, pull = BACKEND.vjp(_member(req, u0, p, i))
        out.append((_result(sol), pull))
    return out


def _vjp_solve_chunk(req: SolveRequest, u0: Any, p: Any, n: int) -> list[Member]:
    return [m for m, _ in _vjp_chunk(req, u0, p, n)]


def _pull_chunk(
    pulls: Sequence[Pullback], cot: Any, events: Sequence[Any]
) -> list[tuple[Any, Any]]:
    return [
        pull(c) if e is None else pull(c, e)
        for pull, c, e in zip(pulls, cot, events, strict=True)
    ]


def _vjp_pull_chunk(
    req: SolveRequest, u0: Any, p: Any, n: int, cot: Any, events: Sequence[Any]
) -> list[tuple[Any, Any]]:
    return _pull_chunk([pull for _, pull in _vjp_chunk(req, u0, p, n)], cot, events)


def member_events(events: Any, fired: Sequence[Sequence[int]]) -> list[Any]:
    """The ensemble's event cotangents ``(t_cots, u_cots)`` (per event ``k`` of
    shapes ``(B, n_k)`` and ``(B, n_k, *u0.shape)``) as each member's own: member
    ``i``'s first ``fired[i][k]`` rows of event ``k``. The rows after them are
    the NaN padding, no output of the member: their cotangents are dropped."""
    t_cots, u_cots = (
        [np.asarray(to_numpy(c), dtype=np.float64) for c in cots] for cots in events
    )
    return [
        (
            [c[i, :n] for c, n in zip(t_cots, counts, strict=True)],
            [c[i, :n] for c, n in zip(u_cots, counts, strict=True)],
        )
        for i, counts in enumerate(fired)
    ]


# ---------------------------------------------------------------------------------
# Executors.
# ---------------------------------------------------------------------------------


def is_dask_client(executor: Any) -> bool:
    """Whether `executor` is a ``dask.distributed.Client`` (without importing
    Dask)."""
    return any(
        cls.__name__ == "Client" and cls.__module__.split(".")[0] == "distributed"
        for cls in type(executor).__mro__
    )


def check_executor(executor: Any) -> None:
    if executor is None or is_dask_client(executor):
        return
    if not isinstance(executor, concurrent.futures.Executor):
        raise invalid(
            "executor",
            "must be None, a concurrent.futures.Executor or a dask.distributed.Client",
            executor,
            "Pass e.g. dask.distributed.Client(LocalCluster(n_workers=2)) or "
            "concurrent.futures.ProcessPoolExecutor(); None solves here.",
        )


def workers(executor: Any) -> int:
    """How many tasks `executor` runs at once."""
    if executor is None:
        return 1
    if is_dask_client(executor):
        info = executor.scheduler_info()
        threads = sum(w.get("nthreads", 1) for w in info.get("workers", {}).values())
        return max(1, threads)
    return max(1, int(getattr(executor, "_max_workers", 0) or os.cpu_count() or 1))


def chunks(size: int, n_workers: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(size)`` in order."""
    if n_workers <= 1:
        return [(0, size)]
    n = max(1, min(CHUNKS_PER_WORKER * n_workers, math.ceil(size / MIN_CHUNK)))
    bounds = np.linspace(0, size, n + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def run(executor: Any, fn: Callable[..., Any], tasks: list[tuple[Any, ...]]) -> list:
    """``[fn(*task) for task in tasks]`` on `executor`, in task order."""
    if executor is None:
        return [fn(*task) for task in tasks]
    if is_dask_client(executor):
        futures = [
            executor.submit(fn, *task, retries=RETRIES, pure=False) for task in tasks
        ]
        return list(executor.gather(futures))
    futures = [executor.submit(fn, *task) for task in tasks]
    return [f.result() for f in futures]


# ---------------------------------------------------------------------------------
# Arrays.
# ---------------------------------------------------------------------------------


def _numpy(tree: Any) -> Any:
    if tree is None:
        return None
    return tree_map(lambda x: None if x is None else to_numpy(x), tree)


def _rows(tree: Any, a: int, b: int) -> Any:
    if tree is None:
        return None
    return tree_map(lambda x: None if x is None else x[a:b], tree)


def _gather(req: SolveRequest, members: list[Member]) -> Solution:
    keys = list(members[0][2])
    stats = {k: [m[2].get(k) for m in members] for k in keys}
    t_events = u_events = None
    if req.events:
        t_events, u_events = stack_members(
            [m[3] for m in members], [m[4] for m in members]
        )
    return conclude_ensemble(
        req,
        t=np.asarray(req.saveat, dtype=np.float64),
        u=np.stack([m[0] for m in members]),
        stats=stats,
        status=[m[1] for m in members],
        t_events=t_events,
        u_events=u_events,
    )


def _stack_tree(template: Any, grads: list[Any]) -> Any:
    """Per-member gradient trees stacked leaf by leaf (None leaves stay None)."""
    paths = len(leaves(template))
    flat = [leaves(g) for g in grads]
    stacked = iter(
        [
            None
            if flat[0][k] is None
            else np.stack([np.asarray(f[k], dtype=np.float64) for f in flat])
            for k in range(paths)
        ]
    )
    return tree_map(lambda _: next(stacked), grads[0])


def _sum_members(x: Any) -> Any:
    return None if x is None else x.sum(axis=0)
