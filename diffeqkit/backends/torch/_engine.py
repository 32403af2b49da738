"""A compiled engine for the explicit Runge-Kutta methods on torch.

The reference drivers of `_rk` run one Python-level step at a time, a few dozen
small torch operations each. Here a *block* of `BLOCK` steps is one pure function
of tensors, compiled by ``torch.compile(fullgraph=True, dynamic=False)``:

- adaptive methods: `BLOCK` step attempts with the controller in tensors (the
  same error norm, controller, landing and stopping rules as `AdaptiveRK`), a
  rejected or idle attempt masked out by ``torch.where``; Python runs between
  blocks only, to read the saves off the accepted steps' dense output;
- replays of a known schedule (the steps of a recorded adaptive solve, or a
  fixed-step grid): `BLOCK` steps of given start times and sizes, the last block
  padded with steps of size 0 (which leave the state exactly as it is), under
  autograd for ReverseThroughSolver and CheckpointedAdjoint.

Compiled functions are cached per problem structure (``f``, alg, direction); torch
guards them on shapes, dtypes and devices. ``u0``, tensors in ``p``, ``tspan``,
save times and tolerances are tensor inputs and never recompile. `TRACES` counts
traces (compilations), ``stats["compile_s"]`` the seconds a solve spent on them.

Which solves run here is `_policy`'s choice: the option ``"eager"`` (the reference
drivers), ``"compiled"``, or ``"auto"`` (the default: a problem structure compiles
once its eager solves have taken as long as a compile), set by
``diffeqkit.torch.set_engine``, ``diffeqkit.torch.engine`` or the environment
variable ``DIFFEQKIT_TORCH_ENGINE``. Where compilation fails (no compiler,
an operation dynamo cannot trace) the solve runs on the reference driver, with
one `EngineFallbackWarning` per problem structure saying why. Modules in ``p``
are part of the structure (by identity): training one module never recompiles,
a new module instance compiles anew.
"""

from __future__ import annotations

import math
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from ..._pytree import leaves, tree_map
from ..._tableaux import get_tableau
from .._protocol import SolveRequest
from . import _policy
from ._rk import (
    _DFACTOR,
    _IFACTOR,
    _SAFETY,
    Recorder,
    Rhs,
    Run,
    _nan_rows,
    fixed_solver,
    initial_step,
    rms_norm,
    tableau_name,
)

__all__ = ["BLOCK", "COUNTS", "ENV", "TRACES", "EngineFallbackWarning", "enabled"]

# The environment variable selecting the engine (see `_policy`).
ENV = _policy.ENV
# Step attempts (adaptive) or steps (replays) per compiled call.
BLOCK = 8
# Traces of each kind of block ("adaptive", "replay", "fixed"); a trace happens
# only when torch compiles (or, after a fallback, never).
TRACES: dict[str, int] = {"adaptive": 0, "replay": 0, "fixed": 0}
# Running totals: calls of compiled code, and seconds spent compiling.
COUNTS: dict[str, float] = {"calls": 0, "compile_s": 0.0}

# Status codes of an adaptive block.
_RUNNING, _DONE, _MAX_STEPS, _TOO_SMALL, _NONFINITE = 0, 1, 2, 3, 4
_STATUS = {
    _MAX_STEPS: "max_steps_reached",
    _TOO_SMALL: "step_size_too_small",
    _NONFINITE: "nonfinite",
}


# Warnings torch's compiler itself raises while compiling (it imports its own
# deprecated parts, and calls them lowering linear algebra; it reads .grad of
# the non-leaf tensors it traces).
_COMPILER_NOISE = (
    r"`torch\.jit\.",
    r"The \.grad attribute of a Tensor that is not",
    r"`torch\._prims_common\.check` is deprecated",
)


class EngineFallbackWarning(UserWarning):
    """The compiled torch engine could not compile a problem; it runs eagerly."""


def enabled(req: SolveRequest) -> bool:
    """Whether `req` runs on the engine: an alg it has (`supported`), and the
    engine option's choice (`_policy.chosen`)."""
    return supported(req) and _policy.chosen(req)


def explicit(req: SolveRequest) -> bool:
    """Whether `req` runs on the engine with an explicit Runge-Kutta alg (the
    paths of `_engine_adjoint`; the Rosenbrock algs have `_engine_rosenbrock`)."""
    return enabled(req) and not req.alg.implicit and req.alg.name in _EXPLICIT


def supported(req: SolveRequest) -> bool:
    """Whether the engine has the alg of `req`: an explicit one from a shared
    tableau, or a Rosenbrock alg (`_engine_rosenbrock`)."""
    name = req.alg.name
    return (not req.alg.implicit and name in _EXPLICIT) or name in _ROSENBROCK


_EXPLICIT = frozenset(
    ("euler", "midpoint", "heun", "rk4", "bosh3", "dopri5", "tsit5", "dopri8")
)
# The linearly implicit algs (`_engine_rosenbrock`).
_ROSENBROCK = frozenset(("rosenbrock23", "rodas4"))


# ---------------------------------------------------------------------------------
# The tableau as Python floats (constants folded into the compiled code).
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Coefficients:
    c: tuple[float, ...]  # c[1:], one per evaluated stage
    a: tuple[tuple[float, ...], ...]  # a[i, :i] for i = 1..s-1, then b (FSAL row)
    b: tuple[float, ...]
    e: tuple[float, ...] | None  # error weights over the s + 1 stages
    p: tuple[tuple[float, ...], ...] | None  # dense output, (s + 1) x q
    order: int  # the controller's: error order + 1


def _coefficients(alg: str) -> _Coefficients:
    tab = get_tableau(tableau_name(alg))
    s = tab.n_stages
    rows = tuple(tuple(float(x) for x in tab.a[i, :i]) for i in range(1, s))
    b = tuple(float(x) for x in tab.b)
    order = tab.order if tab.error_order is None else tab.error_order + 1
    return _Coefficients(
        c=tuple(float(x) for x in tab.c[1:]),
        a=rows,
        b=b,
        e=None if tab.e is None else tuple(float(x) for x in tab.e),
        p=None if tab.p is None else tuple(tuple(float(x) for x in r) for r in tab.p),
        order=order,
    )


def _weighted(weights: tuple[float, ...], ks: list[torch.Tensor]) -> torch.Tensor:
    """``sum_j w_j ks[j]`` over the nonzero weights (at least one)."""
    total: torch.Tensor | None = None
    for w, k in zip(weights, ks, strict=False):
        if w == 0.0:
            continue
        term = k * w
        total = term if total is None else total + term
    if total is None:
        return torch.zeros_like(ks[0])
    return total


def _fsal_step(
    co: _Coefficients,
    f: Callable[..., Any],
    p: Any,
    y0: torch.Tensor,
    f0: torch.Tensor,
    t0: torch.Tensor,
    h: torch.Tensor,
    t1: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One FSAL step: ``(y1, f(t1, y1), stages K)``; times float64, 0-d."""
    dtype = y0.dtype
    hy = h.to(dtype)
    ks = [f0]
    y1 = y0
    for ci, row in zip([*co.c, 1.0], [*co.a, co.b], strict=True):
        ti = t1 if ci == 1.0 else t0 + ci * h
        yi = y0 + hy * _weighted(row, ks)
        ks.append(f(yi, p, ti.to(dtype)))
        y1 = yi
    return y1, ks[-1], ks


def _dense(
    co: _Coefficients, y0: torch.Tensor, ks: list[torch.Tensor], h: torch.Tensor
) -> torch.Tensor:
    """The dense-output coefficients ``[y0, c_1, ..., c_q]`` stacked on axis 0."""
    if co.p is None:  # pragma: no cover - every adaptive tableau has one
        raise ValueError("no dense output")
    hy = h.to(y0.dtype)
    q = len(co.p[0])
    cols = [hy * _weighted(tuple(r[j] for r in co.p), ks) for j in range(q)]
    return torch.stack([y0, *cols])


# ---------------------------------------------------------------------------------
# The compiled blocks, cached per problem structure.
# ---------------------------------------------------------------------------------


@dataclass
class _Compiled:
    """A block function and its compiled version (None after a fallback)."""

    kind: str
    eager: Callable[..., Any]
    compiled: Callable[..., Any] | None = None
    failed: str | None = None


@dataclass
class _Cache:
    entries: dict[tuple[Any, ...], _Compiled] = field(default_factory=dict)


_CACHE = _Cache()


def _begin(
    status: torch.Tensor,
    t: torch.Tensor,
    dt: torch.Tensor,
    target: torch.Tensor,
    nsteps: torch.Tensor,
    max_steps: torch.Tensor,
    nonfinite: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The start of one masked step attempt of a compiled block: the status
    (a step too small, max_steps, a non-finite state stop the block's solve),
    whether this attempt is `active`, the step count, and the attempt's end `t1`
    and size `h`, landing on `target` where the step would pass it (an idle
    attempt has ``h = 0`` at ``t1 = t``: f is never evaluated beyond t1).
    Returns ``(status, active, nsteps, t1, h, land)``."""
    inf = torch.full_like(t, math.inf)
    running = status == _RUNNING
    ulp = torch.nextafter(t, inf) - t
    # `not dt >= 10 ulp` is True for a NaN step too.
    tiny = running & ~(dt >= 10 * ulp)
    over = running & (nsteps >= max_steps)
    stop = torch.where(nonfinite, torch.full_like(status, _NONFINITE), _TOO_SMALL)
    status = torch.where(over, _MAX_STEPS, torch.where(tiny, stop, status))
    active = status == _RUNNING
    nsteps = nsteps + active.to(nsteps.dtype)
    t1 = t + dt
    land = (t < target) & (target < t1)
    t1 = torch.where(land, target, t1)
    h = torch.where(land, target - t, dt)
    h = torch.where(active, h, torch.zeros_like(h))
    t1 = torch.where(active, t1, t)
    return status, active, nsteps, t1, h, land


def _judge(
    y: torch.Tensor,
    y1: torch.Tensor,
    error: torch.Tensor,
    rtol: torch.Tensor,
    atol: torch.Tensor,
    active: torch.Tensor,
    exponent: float,
    norm: Callable[[torch.Tensor], torch.Tensor] = rms_norm,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The controller's verdict on an attempt (`AdaptiveRK`'s error norm and
    factor): ``(ok, finite, factor)``, accepted where active with an error ratio
    of at most 1, the next step ``h * factor``. No gradient flows through the
    step sizes (under autograd, `_engine_adjoint.through`), as in the reference
    driver."""
    scale = atol + rtol * torch.maximum(y.abs(), y1.abs())
    ratio = norm(error / scale).abs().to(torch.float64).detach()
    finite = torch.isfinite(ratio) & torch.isfinite(y1).all()
    ratio = torch.where(finite, ratio, torch.full_like(ratio, math.inf))
    lowest = torch.where(ratio < 1, 1.0, _DFACTOR)
    factor = torch.clamp(torch.maximum(_SAFETY / ratio**exponent, lowest), max=_IFACTOR)
    return active & (ratio <= 1), finite, factor


def _commit(
    active: torch.Tensor,
    ok: torch.Tensor,
    finite: torch.Tensor,
    factor: torch.Tensor,
    h: torch.Tensor,
    new: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    old: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, ...]:
    """The end of a masked attempt: ``(y, f(y), t)`` move to `new` where it was
    accepted, the next step is ``h * factor`` where it was active, and a
    non-finite verdict is kept. Returns ``(y, fy, t, dt, nonfinite)``."""
    y1, f1, t1 = new
    y, fy, t, dt, nonfinite = old
    return (
        torch.where(ok, y1, y),
        torch.where(ok, f1, fy),
        torch.where(ok, t1, t),
        torch.where(active, h * factor, dt),
        torch.where(active, ~finite, nonfinite),
    )


def attempts_block(
    kind: str,
    exponent: float,
    prepare: Callable[[torch.Tensor, Any], Any],
    attempt: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]],
) -> Callable[..., Any]:
    """A compiled block of `BLOCK` masked step attempts with the controller in
    tensors (see `AdaptiveRK._step`), for any one-step method: ``context =
    prepare(y, p)`` once per block, then per attempt ``attempt(context, y, f(t,
    y), t, h, t1) -> (y1, f(t1, y1), error estimate, dense output)``. `kind`
    names its traces in `TRACES`; `exponent` is one over the error's order."""

    def block(
        y: torch.Tensor,
        fy: torch.Tensor,
        t: torch.Tensor,
        dt: torch.Tensor,
        target: torch.Tensor,
        rtol: torch.Tensor,
        atol: torch.Tensor,
        nsteps: torch.Tensor,
        max_steps: torch.Tensor,
        nonfinite: torch.Tensor,
        p: Any,
    ) -> tuple[Any, ...]:
        _traced(kind)
        context = prepare(y, p)
        status = torch.zeros_like(nsteps)
        starts, ends, sizes, accepted, dense = [], [], [], [], []
        for _ in range(BLOCK):
            status, active, nsteps, t1, h, _ = _begin(
                status, t, dt, target, nsteps, max_steps, nonfinite
            )
            y1, f1, error, coeffs = attempt(context, y, fy, t, h, t1)
            ok, finite, factor = _judge(y, y1, error, rtol, atol, active, exponent)
            starts.append(t)
            ends.append(t1)
            sizes.append(h)
            accepted.append(ok)
            dense.append(coeffs)
            y, fy, t, dt, nonfinite = _commit(
                active, ok, finite, factor, h, (y1, f1, t1), (y, fy, t, dt, nonfinite)
            )
            status = torch.where(ok & (t >= target), _DONE, status)
        return (
            y,
            fy,
            t,
            dt,
            nsteps,
            nonfinite,
            status,
            torch.stack(accepted),
            torch.stack([torch.stack(starts), torch.stack(sizes), torch.stack(ends)]),
            torch.stack(dense),
        )

    return block


def _adaptive_block(co: _Coefficients, f: Callable[..., Any]) -> Callable[..., Any]:
    """`BLOCK` step attempts of an explicit tableau (see `attempts_block`)."""
    e = co.e
    if e is None:  # pragma: no cover - adaptive algs have error weights
        raise ValueError("no error weights")

    def attempt(p: Any, y: Any, fy: Any, t: Any, h: Any, t1: Any) -> Any:
        y1, f1, ks = _fsal_step(co, f, p, y, fy, t, h, t1)
        return y1, f1, h.to(y.dtype) * _weighted(e, ks), _dense(co, y, ks, h)

    return attempts_block("adaptive", 1.0 / co.order, lambda y, p: p, attempt)


def _replay_block(co: _Coefficients, f: Callable[..., Any]) -> Callable[..., Any]:
    """`BLOCK` FSAL steps of given times: ``(y, f(t, y), dense outputs)``."""

    def block(
        y: torch.Tensor, fy: torch.Tensor, steps: torch.Tensor, p: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _traced("replay")
        dense = []
        for n in range(BLOCK):
            t0, h, t1 = steps[0, n], steps[1, n], steps[2, n]
            y1, fy, ks = _fsal_step(co, f, p, y, fy, t0, h, t1)
            dense.append(_dense(co, y, ks, h))
            y = y1
        return y, fy, torch.stack(dense)

    return block


def _fixed_block(co: _Coefficients, f: Callable[..., Any]) -> Callable[..., Any]:
    """`BLOCK` steps of a fixed-step tableau on given grid points: the states at
    their ends (see `_rk.fixed_step`: a stage at c = 1 is evaluated at t1)."""

    def block(y: torch.Tensor, steps: torch.Tensor, p: Any) -> torch.Tensor:
        _traced("fixed")
        states = []
        dtype = y.dtype
        for n in range(BLOCK):
            t0, h, t1 = steps[0, n], steps[1, n], steps[2, n]
            hy = h.to(dtype)
            ks = [f(y, p, t0.to(dtype))]
            for ci, row in zip(co.c, co.a, strict=True):
                ti = t1 if ci == 1.0 else t0 + ci * h
                ks.append(f(y + hy * _weighted(row, ks), p, ti.to(dtype)))
            y = y + hy * _weighted(co.b, ks)
            states.append(y)
        return torch.stack(states)

    return block


_MAKERS = {"adaptive": _adaptive_block, "replay": _replay_block, "fixed": _fixed_block}


@torch.compiler.assume_constant_result
def _traced(kind: str) -> int:
    """Count a trace of a `kind` block: torch runs this while tracing only (its
    result is a constant of the compiled code; no guard depends on it)."""
    TRACES[kind] += 1
    return 0


def _entry(kind: str, alg: str, f: Callable[..., Any], key: Any) -> _Compiled:
    full = (kind, alg, BLOCK, key)
    entry = _CACHE.entries.get(full)
    if entry is None:
        fn = _own_code(_MAKERS[kind](_coefficients(alg), f), len(_CACHE.entries))
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        entry = _Compiled(kind, fn, compiled)
        _CACHE.entries[full] = entry
    return entry


def _own_code(fn: Any, number: int) -> Callable[..., Any]:
    """`fn` with a code object of its own: torch keeps compiled code per code
    object (guarded on the closure), so each problem structure gets its own
    cache and its own limit on recompilations."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{number}")
    return types.FunctionType(
        code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__
    )


class _FallbackError(Exception):
    """Compilation failed: run the reference path."""


class TooLongError(Exception):
    """The solve needed more blocks than the caller's ``max_blocks``."""


def _call(entry: _Compiled, stats: dict[str, float], *args: Any) -> Any:
    """Call the compiled block, timing compilations into ``stats["compile_s"]``;
    on a compilation failure, warn once and raise `_FallbackError`."""
    if entry.compiled is None:
        raise _FallbackError(entry.failed)
    before = TRACES[entry.kind]
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            for message in _COMPILER_NOISE:
                warnings.filterwarnings("ignore", message=message)
            out = entry.compiled(*args)
    except Exception as exc:
        if TRACES[entry.kind] == before:  # a run-time error, not the compiler's
            raise
        entry.compiled = None
        entry.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        warnings.warn(
            f"diffeqkit's compiled torch engine could not compile this problem "
            f"({entry.failed}); it runs on the eager reference driver. Set "
            f"{ENV}=eager or diffeqkit.torch.set_engine('eager') to skip the "
            "attempt.",
            EngineFallbackWarning,
            stacklevel=4,
        )
        raise _FallbackError(entry.failed) from exc
    COUNTS["calls"] += 1
    if TRACES[entry.kind] != before:
        seconds = time.perf_counter() - start
        stats["compile_s"] = stats.get("compile_s", 0.0) + seconds
        COUNTS["compile_s"] += seconds
    return out


def _key(req: SolveRequest, backward: bool) -> tuple[Any, ...]:
    """The problem structure: f, the direction, and the modules in p (a bound f
    calls them; `_params.bind`), by identity (a bound method f by its function
    and object: `_policy.identity`; the entry's code keeps them alive)."""
    modules = tuple(x for x in leaves(req.p) if isinstance(x, torch.nn.Module))
    return (*map(id, _policy.identity(req.f)), backward, *modules)


# ---------------------------------------------------------------------------------
# The plain solve.
# ---------------------------------------------------------------------------------


@dataclass
class EngineRun:
    """A `Run`, and the engine's own stats."""

    run: Run
    stats: dict[str, float]


def run(
    req: SolveRequest,
    f: Callable[..., Any],
    p: Any,
    y0: torch.Tensor,
    du0: torch.Tensor,
    times: torch.Tensor,
    backward: bool,
    recorder: Recorder | None = None,
) -> EngineRun | None:
    """Integrate on the engine under ``no_grad``; None where compilation failed
    (the caller then runs the reference driver)."""
    stats: dict[str, float] = {"compile_s": 0.0}
    # Detached: the compiled code is guarded on requires_grad.
    y0, du0, p = y0.detach(), du0.detach(), _detached(p)
    try:
        with torch.no_grad():
            if req.fixed_step:
                out = _run_fixed(req, f, p, y0, times, backward, recorder, stats)
            else:
                out = _run_adaptive(
                    req, f, p, y0, du0, times, backward, recorder, stats
                )
    except _FallbackError:
        return None
    return EngineRun(out, stats)


def _detached(p: Any) -> Any:
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, p)


def _run_adaptive(
    req: SolveRequest,
    f: Callable[..., Any],
    p: Any,
    y0: torch.Tensor,
    du0: torch.Tensor,
    times: torch.Tensor,
    backward: bool,
    recorder: Recorder | None,
    stats: dict[str, float],
    max_blocks: int | None = None,
) -> Run:
    """`AdaptiveRK.run` on compiled blocks: the same steps, saves and stops
    (`TooLongError` past `max_blocks` blocks)."""
    entry = _entry("adaptive", req.alg.name, f, _key(req, backward))
    co = _coefficients(req.alg.name)
    d = drive(
        req, entry, f, p, y0, du0, times, recorder, stats, co.order, True, max_blocks
    )
    return d.run(len(co.c) + 1)


class Driven(NamedTuple):
    """What `drive` found: the saves `u` (NaN rows past a failure), the status
    and time it stopped at, accepted and all attempts, f calls before the first
    block, rows saved, and the end of the last accepted step."""

    u: torch.Tensor
    status: str
    t_reached: float | None
    naccept: int
    total: int
    nfev: int
    saved: int
    t_end: float

    def run(self, calls: int, *implicit: int) -> Run:
        """The `Run`, with `calls` evaluations of f per attempt; `implicit`:
        its njev and nlu."""
        return Run(
            self.u,
            self.status,
            self.t_reached,
            self.naccept,
            self.total - self.naccept,
            self.nfev + calls * self.total,
            self.saved,
            self.t_end,
            *implicit,
        )


def drive(
    req: SolveRequest,
    entry: _Compiled,
    f: Callable[..., Any],
    p: Any,
    y0: torch.Tensor,
    du0: torch.Tensor,
    times: torch.Tensor,
    recorder: Recorder | None,
    stats: dict[str, float],
    order: int,
    hand_dense: bool,
    max_blocks: int | None = None,
) -> Driven:
    """The Python loop around compiled blocks of attempts (`attempts_block`),
    for any one-step method: the first step (`initial_step`, or ``dt0``), blocks
    until t1 or a stop, the saves read off the accepted steps' dense output as
    `AdaptiveRK.advance` reads them. With `hand_dense`, a recorder with
    ``engine_steps`` gets the accepted steps' times and dense output. A solve
    that needs more than `max_blocks` blocks raises `TooLongError`."""
    device = y0.device

    def scalar(x: Any, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.as_tensor(x, dtype=dtype, device=device)

    rtol, atol = scalar(req.rtol), scalar(req.atol)
    t = times[0]
    rhs = Rhs(f, p, y0.dtype, du0)
    fy = rhs(t, y0)
    if req.dt0 is None:
        dt = initial_step(rhs, t, y0, fy, order - 1, rtol, atol, rms_norm)
    else:
        dt = scalar(req.dt0)
    nfev = rhs.nfev
    # Steps land on every save time, or only on t1 (see `AdaptiveRK.run`).
    targets = times[1:] if req.land_on_saves else times[-1:]
    save_times = times.tolist()
    y, dt = y0, dt.detach().to(torch.float64)
    nsteps = scalar(0, torch.int64)
    max_steps = scalar(min(req.max_steps, 2**62), torch.int64)
    nonfinite = scalar(False, torch.bool)
    # Each save time after t0 is read off the accepted step that first ends at
    # or after it, as `AdaptiveRK.advance` reads it.
    read_from: list[int] = []  # per save row: its step's attempt number
    blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
    accepted_masks: list[torch.Tensor] = []
    which, naccept, attempt = 0, 0, 0
    status, t_reached, t_end = "success", None, save_times[0]
    while True:
        if max_blocks is not None and len(blocks) >= max_blocks:
            raise TooLongError
        out = _call(
            entry, stats, y, fy, t, dt, targets[which], rtol, atol, nsteps,
            max_steps, nonfinite, p,
        )  # fmt: skip
        y, fy, t, dt, nsteps, nonfinite, code, acc, steps, dense = out
        blocks.append((steps, dense))
        accepted_masks.append(acc)
        ends = steps[2].tolist()
        for n, ok in enumerate(acc.tolist()):
            if ok:
                naccept += 1
                t_end = ends[n]
                if recorder is not None:
                    recorder.step(steps[0, n], dense[n, 0], steps[1, n])
                while (
                    len(read_from) + 1 < len(save_times)
                    and save_times[len(read_from) + 1] <= t_end
                ):
                    read_from.append(attempt + n)
        attempt += len(ends)
        code_value = int(code)
        if code_value == _DONE:
            if which + 1 < targets.shape[0]:
                which += 1
                continue
            break
        if code_value != _RUNNING:
            status, t_reached = _STATUS[code_value], float(t)
            break
    take = getattr(recorder, "engine_steps", None) if hand_dense else None
    if take is not None and blocks:
        # The accepted steps' times and dense output, for a recorder that keeps
        # them (`_interpolating._DenseOutput`).
        mask = torch.cat(accepted_masks)
        take(torch.cat([b[0] for b in blocks], dim=1)[:, mask],
             torch.cat([b[1] for b in blocks])[mask])  # fmt: skip
    rows = [y0.unsqueeze(0)]
    if read_from:
        all_steps = torch.cat([b[0] for b in blocks], dim=1)
        all_dense = torch.cat([b[1] for b in blocks])
        index = torch.as_tensor(read_from, device=device)
        at = all_steps[:, index]
        reached = times[1 : len(read_from) + 1]
        rows.append(interpolate_many(all_dense[index], at[0], at[2], reached))
    u = torch.cat(rows)
    if u.shape[0] < len(save_times):
        nan = torch.full_like(y0, math.nan).expand(
            len(save_times) - u.shape[0], *y0.shape
        )
        u = torch.cat([u, nan])
    total = int(nsteps)
    return Driven(u, status, t_reached, naccept, total, nfev, len(read_from) + 1, t_end)


def interpolate_many(
    dense: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """`interpolate` of ``m`` steps at once: `dense` ``(m, q + 1, *shape)``, the
    times ``(m,)``; the same arithmetic in the same order."""
    x = ((t - t0) / (t1 - t0)).to(dense.dtype)
    x = x.reshape(-1, *([1] * (dense.dim() - 2)))
    total = dense[:, 0] + x * dense[:, 1]
    power = x
    for j in range(2, dense.shape[1]):
        power = power * x
        total = total + power * dense[:, j]
    return total


def _padded(steps: torch.Tensor) -> torch.Tensor:
    """`steps` ``(3, n)`` padded with steps of size 0 at the last end time to a
    multiple of `BLOCK` columns."""
    n = steps.shape[1]
    pad = -n % BLOCK
    if pad == 0:
        return steps
    last = steps[2, -1] if n else steps.new_zeros(())
    filler = torch.stack([last, torch.zeros_like(last), last]).unsqueeze(1)
    return torch.cat([steps, filler.expand(3, pad)], dim=1)


def _run_fixed(
    req: SolveRequest,
    f: Callable[..., Any],
    p: Any,
    y0: torch.Tensor,
    times: torch.Tensor,
    backward: bool,
    recorder: Recorder | None,
    stats: dict[str, float],
) -> Run:
    """`FixedRK.run` on compiled blocks of the step grid."""
    if req.dt0 is None:
        raise ValueError("a fixed-step solve needs dt0")  # the core checks it
    solver = fixed_solver(req.alg.name)
    grid, grid_np = solver.grid(times, req.dt0)
    n = grid.shape[0] - 1
    steps = torch.stack([grid[:-1], grid[1:] - grid[:-1], grid[1:]])
    padded = _padded(steps)
    entry = _entry("fixed", req.alg.name, f, _key(req, backward))
    chunks = []
    y = y0
    for start in range(0, padded.shape[1], BLOCK):
        states = _call(
            entry, stats, y, padded[:, start : start + BLOCK].contiguous(), p
        )
        chunks.append(states)
        y = states[-1]
    states = torch.cat(chunks)[:n] if chunks else y0.new_zeros((0, *y0.shape))
    if recorder is not None:
        starts = torch.cat([y0.unsqueeze(0), states[:-1]])
        for k in range(n):
            recorder.step(steps[0, k], starts[k], steps[1, k])
    stages = len(_coefficients(req.alg.name).c) + 1
    where = np.searchsorted(grid_np, times.cpu().numpy())
    finite = torch.isfinite(states.reshape(n, -1)).all(dim=1).tolist()
    good = finite.index(False) if False in finite else n
    rows = [y0, *(states[k - 1] for k in where[1:] if k <= good)]
    ok = good == n
    t_good = float(grid_np[good])
    return Run(
        _nan_rows(rows, y0, len(where)),
        "success" if ok else "nonfinite",
        None if ok else t_good,
        n if ok else good,
        0,
        stages * n,
        len(rows),
        t_good,
    )


# ---------------------------------------------------------------------------------
# Replays under autograd (ReverseThroughSolver, CheckpointedAdjoint).
# ---------------------------------------------------------------------------------


def replay(
    req: SolveRequest,
    f: Callable[..., Any],
    p: Any,
    y: torch.Tensor,
    fy: torch.Tensor | None,
    steps: torch.Tensor,
    backward: bool,
    stats: dict[str, float],
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Replay the steps ``(3, n)`` (start, size, end) from `y` in compiled blocks,
    in the caller's grad mode: ``(state at the end, dense outputs (n, q + 1,
    *shape))`` for an adaptive alg, ``(states at the step ends (n, *shape),
    None)`` for a fixed-step one; None where compilation failed. `fy` is
    ``f(start, y)`` (evaluated here if None; adaptive algs only)."""
    n = steps.shape[1]
    padded = _padded(steps)
    # One trace for every block: the compiled code is guarded on requires_grad
    # and on the type of each input (a Parameter is not a Tensor to it).
    p = tree_map(lambda x: x.view_as(x) if isinstance(x, torch.nn.Parameter) else x, p)
    if (
        torch.is_grad_enabled()
        and not y.requires_grad
        and any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves(p))
    ):
        y = y.detach().requires_grad_()
    try:
        if req.fixed_step:
            entry = _entry("fixed", req.alg.name, f, _key(req, backward))
            chunks = []
            for start in range(0, padded.shape[1], BLOCK):
                states = _call(
                    entry, stats, y, padded[:, start : start + BLOCK].contiguous(), p
                )
                chunks.append(states)
                y = states[-1]
            if not chunks:
                return y, None
            states = torch.cat(chunks)[:n]
            return states, None
        entry = _entry("replay", req.alg.name, f, _key(req, backward))
        first: torch.Tensor = (
            f(y, p, steps[0, 0].to(y.dtype) if n else y.new_zeros(()))
            if fy is None
            else fy
        )
        if torch.is_grad_enabled() and not first.requires_grad and y.requires_grad:
            first = first.detach().requires_grad_()
        fy = first
        chunks = []
        for start in range(0, padded.shape[1], BLOCK):
            y, fy, dense = _call(
                entry, stats, y, fy, padded[:, start : start + BLOCK].contiguous(), p
            )
            chunks.append(dense)
    except _FallbackError:
        return None
    return y, torch.cat(chunks)[:n] if chunks else None
