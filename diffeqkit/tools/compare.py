"""The gradient-method comparison: `compare()` and the ``compare`` command's table.

Every requested backend x sensealg becomes one row, whatever happens (unsupported,
failed or measured): times of `dk.vjp` plus a pullback of a least-squares loss,
its error against a tight-tolerance reference gradient, its peak memory and its
evaluations of ``f``. What each column means: docs/compare.md.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import array_api_compat as aac
import numpy as np

from .. import backends as registry
from .. import problems
from .._algs import get_alg
from .._arrays import array_namespace, to_numpy
from .._errors import DiffEqKitError, InvalidProblemError, UnsupportedError, listing
from .._gradients import vjp
from .._info import versions
from .._pytree import leaves, tree_map
from .._sensealg import SENSEALGS, SensitivityAlgorithm, input_size
from .._solve import solve
from .counting import EvaluationCounter
from .profiling import peak_memory, synchronize

__all__ = [
    "DEFAULT_PROBLEM",
    "SENSEALG_NAMES",
    "Row",
    "compare",
    "format_table",
    "plot",
    "require_matplotlib",
]

DEFAULT_PROBLEM = "lotka_volterra"
SENSEALG_NAMES: tuple[str, ...] = tuple(c.name for c in SENSEALGS)
_BY_NAME: dict[str, type[SensitivityAlgorithm]] = {c.name: c for c in SENSEALGS}

# Tolerances of the reference solve. dopri8 at 1e-12 leaves gradient errors near
# 1e-11 on the built-in problems, five orders below what rtol=1e-6 gives; implicit
# solvers are run at 1e-10 (lower order: 1e-12 would take minutes on ROBER).
REFERENCE_RTOL = {False: 1e-12, True: 1e-10}
# A gradient counts as accurate when its relative error is at most
# max(SPREAD x the smallest error of any row, FLOOR x rtol). Relative to the best
# row, because what a tolerance allows depends on the problem: at the parameters
# that generated the data the loss's gradient is small (the residuals are noise)
# and every method's relative error is ~500 x rtol on Lotka-Volterra at rtol 1e-6,
# while a drifting backsolve is off by orders of magnitude more. The floor keeps
# an exceptionally lucky best row from condemning the others.
ACCURATE_SPREAD = 10.0
ACCURATE_FLOOR = 100.0
_VERSIONS = (
    "numpy",
    "scipy",
    "jax",
    "jaxlib",
    "diffrax",
    "torch",
    "torchdiffeq",
    "rich",
    "matplotlib",
)


@dataclass
class Row:
    """One backend x sensealg of the comparison (one JSON row).

    Times are in seconds; None means not measured or not measurable.

    Attributes
    ----------
    backend, sensealg : str
        What was compared.
    status : {"ok", "unsupported", "failed", "skipped"}
        ``ok``: measured. ``unsupported``: the backend does not offer the
        combination (or is not installed); ``failed``: it raised while measured;
        ``skipped``: not run (the sweep's time budget).
    reason : str or None
        Why a row is not ``ok`` (the library's message).
    forward_s, forward_iqr_s, forward_first_s : float or None
        The plain forward solve (`dk.solve`) of this backend: median, interquartile
        range, and the first (warm-up) call, which includes JIT compilation.
    gradient_s, gradient_iqr_s, gradient_first_s : float or None
        The gradient (`dk.vjp` plus one pullback): median, IQR, first call.
    ratio : float or None
        ``gradient_s / forward_s``.
    rel_error : float or None
        ``|g - g_ref| / |g_ref|`` over ``u0`` and every parameter.
    accurate : bool or None
        ``rel_error`` at most ``max(ACCURATE_SPREAD * best, ACCURATE_FLOOR *
        rtol)``, ``best`` the smallest error of all rows.
    peak_memory_mb : float or None
        Peak memory of one gradient call, by `memory_method`.
    memory_method : str or None
        ``"tracemalloc"`` (NumPy buffers and Python objects allocated during the
        call, SciPy), ``"cuda allocator"`` (torch on CUDA: peak allocated above
        what was allocated before the call) or ``"xla buffer assignment"`` (JAX:
        the compiled gradient's arguments, outputs and temporaries); see
        `diffeqkit.tools.profiling.peak_memory`.
    forward_steps, forward_rejected : int or None
        Accepted and rejected steps of the gradient's forward pass, as the
        backend reports them in ``sol.stats``.
    forward_nfev, backward_nfev : int or None
        Evaluations of ``f`` counted during the gradient's forward pass
        (`dk.vjp`, including its one check of ``f(u0, p, t0)``) and backward
        pass (the pullback): evaluations, also of ``f`` inside a JVP or VJP, not
        Python calls (a compiled ``f`` is counted at every run).
    repeats : int
        Timed rounds behind the medians.
    """

    backend: str
    sensealg: str
    status: str = "ok"
    reason: str | None = None
    forward_s: float | None = None
    forward_iqr_s: float | None = None
    forward_first_s: float | None = None
    gradient_s: float | None = None
    gradient_iqr_s: float | None = None
    gradient_first_s: float | None = None
    ratio: float | None = None
    rel_error: float | None = None
    accurate: bool | None = None
    peak_memory_mb: float | None = None
    memory_method: str | None = None
    forward_steps: int | None = None
    forward_rejected: int | None = None
    forward_nfev: int | None = None
    backward_nfev: int | None = None
    repeats: int = 0


@dataclass
class _Timer:
    """One timed variant: its callable, warm-up time and timed rounds."""

    fn: Callable[[], Any]
    first_s: float | None = None
    times: list[float] = field(default_factory=list)
    error: str | None = None
    unsupported: bool = False

    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def iqr(self) -> float | None:
        if len(self.times) < 2:
            return None
        q1, _, q3 = statistics.quantiles(self.times, n=4, method="inclusive")
        return q3 - q1


def _message(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    first = text.splitlines()[0]
    if isinstance(err, DiffEqKitError):
        return first
    return f"{type(err).__name__}: {first}"


def _flat(grads: Any) -> np.ndarray:
    parts = [to_numpy(x).ravel() for x in leaves((grads.u0, grads.p)) if x is not None]
    return np.concatenate(parts).astype(np.float64)


def _rel_error(g: np.ndarray, ref: np.ndarray) -> float:
    if g.shape != ref.shape:
        return math.nan
    scale = float(np.linalg.norm(ref))
    err = float(np.linalg.norm(g - ref))
    return err / scale if scale > 0 else err


def _versions() -> dict[str, str]:
    return versions(*_VERSIONS)


class _Problem:
    """The built-in problem, its loss and the cotangent of that loss."""

    def __init__(self, name: str | problems.BuiltinProblem) -> None:
        self.bp = problems.get(name) if isinstance(name, str) else name
        self.prob = self.bp.prob
        self.data = self.bp.data

    def target(self, u: Any) -> Any:
        """The data in `u`'s array type, dtype and device (zeros without data)."""
        xp = array_namespace(u)
        if self.data is None:
            return xp.zeros_like(u)
        return xp.asarray(self.data, dtype=u.dtype, device=aac.device(u))

    def gradient(
        self,
        backend: str,
        sensealg: SensitivityAlgorithm,
        kw: dict[str, Any],
        counter: EvaluationCounter | None = None,
    ) -> Callable[[], tuple[Any, Any]]:
        """A call computing ``(sol, grads)`` of the loss; the cotangent of
        ``0.5 * sum((u - d)**2)`` is ``u - d``. With a `counter` (wrapping this
        problem's ``f``), the call returns ``(forward, backward)``: the
        evaluations of ``f`` in `dk.vjp` and in the pullback."""
        target: list[Any] = []
        prob = self.prob if counter is None else self.prob.remake(f=counter)

        def run() -> tuple[Any, Any]:
            sol, pullback = vjp(
                prob, backend=backend, sensealg=sensealg, saveat=self.bp.saveat, **kw
            )
            if not target:
                target.append(self.target(sol.u))
            before = 0 if counter is None else counter.read()
            grads = pullback(sol.u - target[0])
            synchronize((grads.u0, grads.p))
            if counter is not None:
                return before, counter.read() - before
            return sol, grads

        return run

    def forward(self, backend: str, kw: dict[str, Any]) -> Callable[[], Any]:
        def run() -> Any:
            sol = solve(self.prob, backend=backend, saveat=self.bp.saveat, **kw)
            synchronize(sol.u)
            return sol

        return run

    def memory(
        self,
        run: Callable[[], Any],
        backend: str,
        sensealg: SensitivityAlgorithm,
        kw: dict[str, Any],
        like: Any,
    ) -> tuple[float | None, str | None]:
        """Peak memory of the gradient `run` computes (`profiling.peak_memory`),
        with ``u0`` and ``p`` in the array type, dtype and device of `like` (the
        gradient's ``sol.u``) and the loss as a function of them."""
        xp = array_namespace(like)

        def convert(x: Any) -> Any:
            return xp.asarray(x, dtype=like.dtype, device=aac.device(like))

        target = self.target(like)

        def loss(u0: Any, p: Any) -> Any:
            sol = solve(
                self.prob.remake(u0=u0, p=p),
                backend=backend,
                sensealg=sensealg,
                saveat=self.bp.saveat,
                **kw,
            )
            return array_namespace(sol.u).sum((sol.u - target) ** 2) / 2

        u0 = convert(self.prob.u0)
        p = tree_map(lambda x: x if x is None else convert(x), self.prob.p)
        return peak_memory(run, loss, u0, p)

    def count(
        self, backend: str, sensealg: SensitivityAlgorithm, kw: dict[str, Any]
    ) -> tuple[int, int]:
        """Evaluations of ``f`` in the forward and the backward pass of one
        gradient (an extra, untimed call: on JAX a compilation of its own)."""
        return self.gradient(backend, sensealg, kw, EvaluationCounter(self.prob.f))()


def _reference_candidates(
    available: Iterable[str],
) -> list[tuple[str, tuple[str, str]]]:
    """``(backend, (explicit alg, implicit alg))`` of the backends that can compute
    the reference gradient, most preferred first (the registry's `reference_rank`:
    error-controlled forward sensitivities, which converge to the exact derivative
    of the ODE's solution, before the discrete forward modes)."""
    usable = []
    for backend in available:
        caps = registry.SPECS[backend].capabilities
        if caps.reference_algs is not None and "ForwardMode" in caps.sensealgs:
            usable.append((caps.reference_rank, backend, caps.reference_algs))
    return [(backend, algs) for _, backend, algs in sorted(usable)]


def _reference(
    pb: _Problem, ad_backends: Iterable[str]
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The reference gradient and where it came from; None and the reasons when
    no candidate runs."""
    stiff = pb.bp.stiff
    rtol = REFERENCE_RTOL[stiff]
    atol = min(pb.bp.atol, rtol) * 1e-2
    reasons = []
    for backend, (explicit, implicit) in _reference_candidates(ad_backends):
        alg = implicit if stiff else explicit
        kw = {"alg": alg, "rtol": rtol, "atol": atol, "max_steps": 1_000_000}
        start = time.perf_counter()
        try:
            _, grads = pb.gradient(backend, _BY_NAME["ForwardMode"](), kw)()
            g = _flat(grads)
        except Exception as err:  # any failure: try the next one
            reasons.append(f"{backend}: {_message(err)}")
            continue
        if not np.all(np.isfinite(g)):
            reasons.append(f"{backend}: non-finite reference gradient")
            continue
        return g, {
            "backend": backend,
            "sensealg": "ForwardMode",
            "alg": alg,
            "rtol": rtol,
            "atol": atol,
            "method": (
                "forward sensitivity equations, error-controlled"
                if registry.SPECS[backend]
                .capabilities.sensealgs["ForwardMode"]
                .computes
                == "continuous"
                else "forward-mode AD through the solver"
            ),
            "time_s": time.perf_counter() - start,
            "norm": float(np.linalg.norm(g)),
        }
    return None, {
        "error": "no reference gradient: " + ("; ".join(reasons) or "no backend")
    }


def _check_names(kind: str, given: Sequence[str], known: Sequence[str]) -> None:
    bad = [n for n in given if n not in known]
    if bad:
        raise InvalidProblemError(
            f"{kind} {listing(repr(b) for b in bad)} unknown; choose from "
            f"{listing(known)}."
        )


def compare(
    problem: str = DEFAULT_PROBLEM,
    *,
    backends: Sequence[str] | None = None,
    sensealgs: Sequence[str] | None = None,
    alg: str = "tsit5",
    rtol: float | None = None,
    atol: float | None = None,
    repeat: int = 3,
    device: str | None = None,
    count: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Time every backend x gradient method on a built-in problem and check it.

    Parameters
    ----------
    problem : str
        A name from `dk.problems.names()`.
    backends : sequence of str, optional
        Backends to compare; default every installed one. A named backend that
        is not installed gives rows with status ``"unsupported"`` and its pip line.
    sensealgs : sequence of str, optional
        Class names (``"ForwardMode"``, ...); default every one of the core.
    alg : str
        The solver, as in `dk.solve`.
    rtol, atol : float, optional
        Tolerances; default the problem's suggested ones (``atol``: the
        problem's, or ``rtol / 100`` when only `rtol` is given).
    repeat : int
        Timed rounds (>= 1) after the warm-up.
    device : str, optional
        As in `dk.solve`; backends without it get ``"unsupported"`` rows.
    count : bool
        Count the evaluations of ``f`` in each gradient's forward and backward
        pass (one more, untimed gradient call per row: on JAX a compilation of
        its own, most of this pass's time). False leaves the counts None.
    progress : callable, optional
        ``progress(what, done, total)``, called as the work advances.

    Returns
    -------
    dict
        The report: ``problem``, ``settings``, ``reference``, ``environment``,
        ``rows`` (one `Row` as a dict per backend x sensealg), ``conclusion``
        (sentences) and ``wall_s``. JSON-serialisable.

    Raises
    ------
    InvalidProblemError
        An unknown problem, backend or sensealg name, or a bad number.
    UnsupportedError
        An `alg` no backend knows.

    Notes
    -----
    JAX rows compute in float64 only with ``jax_enable_x64`` on (the command
    turns it on; this function never does); with it off they are
    ``"unsupported"`` with JAX's message.
    """
    wall = time.perf_counter()
    _check_names("problem", [problem], problems.names())
    chosen, names = _selection(backends, sensealgs, alg, repeat)
    pb = _Problem(problem)
    kw = _solve_options(pb, alg, rtol, atol, device)

    installed = [b for b in chosen if registry.installed(b)]
    step = _Steps(
        1 + len(installed) * _backend_steps(names, repeat, count=count), progress
    )
    ref, ref_info = _reference(pb, installed)
    step("reference gradient")

    rows: list[Row] = []
    devices: dict[str, Any] = {}
    for backend in chosen:
        rows.extend(
            _measure_backend(
                pb, backend, names, kw, repeat, ref, step, devices, count=count
            )
        )
    report = {
        "schema": 1,
        "problem": {
            "name": problem,
            "description": pb.bp.description,
            "states": int(np.size(pb.prob.u0)),
            "inputs": input_size(pb.prob.u0, pb.prob.p),
            "saves": len(pb.bp.saveat),
            "tspan": [float(t) for t in pb.prob.tspan],
            "stiff": pb.bp.stiff,
            "loss": (
                "0.5 * sum((sol.u - data)**2)"
                if pb.data is not None
                else "0.5 * sum(sol.u**2)"
            ),
        },
        "settings": {
            **kw,
            "repeat": repeat,
            "device": device,
            "count": count,
            "accurate_if_rel_error_below": None,  # set from the rows below
        },
        "reference": ref_info,
        "environment": environment(devices),
        "rows": [asdict(r) for r in rows],
    }
    limit = _accuracy_limit(rows, kw["rtol"])
    report["settings"]["accurate_if_rel_error_below"] = limit
    for row, out in zip(rows, report["rows"], strict=True):
        if row.rel_error is not None:
            out["accurate"] = bool(row.rel_error <= limit)
    report["conclusion"] = conclusions(report)
    report["wall_s"] = time.perf_counter() - wall
    return report


def _selection(
    backends: Sequence[str] | None,
    sensealgs: Sequence[str] | None,
    alg: str,
    repeat: int,
) -> tuple[list[str], list[str]]:
    """The backends (aliases resolved; default every installed one) and sensealg
    names to measure, after checking every name and `repeat`."""
    known = [*registry.SPECS, *registry.ALIASES]
    chosen = (
        list(backends)
        if backends
        else [b for b in registry.SPECS if registry.installed(b)]
    )
    _check_names("backend", chosen, known)
    chosen = list(dict.fromkeys(registry.ALIASES.get(b, b) for b in chosen))
    names = list(sensealgs) if sensealgs else list(SENSEALG_NAMES)
    _check_names("sensealg", names, SENSEALG_NAMES)
    get_alg(alg)  # an unknown alg is an error of the whole command
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise InvalidProblemError(f"repeat must be an int >= 1; got repeat={repeat!r}.")
    return chosen, names


def _solve_options(
    pb: _Problem,
    alg: str,
    rtol: float | None,
    atol: float | None,
    device: str | None,
) -> dict[str, Any]:
    """The keywords of every solve: the problem's tolerances unless given
    (``atol = rtol / 100`` when only `rtol` is)."""
    rtol = pb.bp.rtol if rtol is None else rtol
    atol = (pb.bp.atol if rtol == pb.bp.rtol else rtol / 100) if atol is None else atol
    for label, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise InvalidProblemError(
                f"{label} must be a positive number; got {label}={value!r}."
            )
    kw: dict[str, Any] = {"alg": alg, "rtol": rtol, "atol": atol}
    if device is not None:
        kw["device"] = device
    return kw


class _Steps:
    """The progress callback's counter: ``step(what)`` reports one more done."""

    def __init__(
        self, total: int, progress: Callable[[str, int, int], None] | None
    ) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def __call__(self, what: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(what, self.done, self.total)


def _backend_steps(
    names: Sequence[str], repeat: int, memory: bool = True, count: bool = True
) -> int:
    """Progress steps of `_measure_backend`: a warm-up per variant, a round per
    repeat and, if asked for, a memory measurement and a count per sensealg."""
    return 1 + len(names) + repeat + len(names) * (int(memory) + int(count))


def environment(devices: dict[str, Any]) -> dict[str, Any]:
    """diffeqkit's and the packages' versions, the platform and the devices."""
    return {
        "diffeqkit": _own_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": _versions(),
        "devices": devices,
    }


def _accuracy_limit(rows: list[Row], rtol: float) -> float:
    """The relative error up to which a gradient counts as accurate."""
    errors = [
        r.rel_error
        for r in rows
        if r.rel_error is not None and math.isfinite(r.rel_error)
    ]
    best = min(errors, default=math.inf)
    return max(ACCURATE_SPREAD * best, ACCURATE_FLOOR * rtol)


def _own_version() -> str:
    from .. import __version__

    return __version__


def _measure_backend(
    pb: _Problem,
    backend: str,
    names: list[str],
    kw: dict[str, Any],
    repeat: int,
    ref: np.ndarray | None,
    step: Callable[[str], None],
    devices: dict[str, Any],
    memory: bool = True,
    count: bool = True,
) -> list[Row]:
    """One row per sensealg in `names`: timed, checked against `ref` (if any)
    and, if asked for, with peak memory and evaluation counts."""
    rows = [Row(backend, name) for name in names]
    if not registry.installed(backend):
        spec = registry.SPECS[backend]
        reason = (
            f"backend '{backend}' is not installed: "
            f'pip install "diffeqkit[{spec.extra}]"'
        )
        for row in rows:
            row.status, row.reason = "unsupported", reason
        return rows
    devices[backend] = registry.load(backend).describe()
    timers: dict[str, _Timer] = {"forward": _Timer(pb.forward(backend, kw))}
    for row in rows:
        sensealg = _BY_NAME[row.sensealg]()
        try:
            registry.check_sensealg(backend, sensealg, get_alg(kw["alg"]))
        except UnsupportedError as err:
            row.status, row.reason = "unsupported", _message(err)
            continue
        timers[row.sensealg] = _Timer(pb.gradient(backend, sensealg, kw))
    results: dict[str, Any] = {}
    for name in ["forward", *names]:
        timer = timers.get(name)
        if timer is not None:
            start = time.perf_counter()
            try:
                results[name] = timer.fn()
                timer.first_s = time.perf_counter() - start
            except UnsupportedError as err:
                timer.error, timer.unsupported = _message(err), True
            except Exception as err:  # reported in the row
                timer.error = _message(err)
        step(f"{backend} {name}: warm-up")
    for round_ in range(repeat):
        for timer in timers.values():
            if timer.error is None:
                start = time.perf_counter()
                try:
                    timer.fn()
                    timer.times.append(time.perf_counter() - start)
                except Exception as err:  # reported in the row
                    timer.error = _message(err)
            step(f"{backend} round {round_ + 1} of {repeat}")
    fwd = timers["forward"]
    for row in rows:
        timer = timers.get(row.sensealg)
        if timer is not None:
            _fill_row(row, timer, fwd, results.get(row.sensealg), ref)
            if row.status == "ok" and memory:
                sol = results[row.sensealg][0]
                sensealg = _BY_NAME[row.sensealg]()
                try:
                    row.peak_memory_mb, row.memory_method = pb.memory(
                        timer.fn, backend, sensealg, kw, sol.u
                    )
                except Exception:  # a memory figure that cannot be had is n/a
                    row.peak_memory_mb = row.memory_method = None
        if memory:
            step(f"{backend} {row.sensealg}: memory")
        if count:
            if row.status == "ok":
                row.forward_nfev, row.backward_nfev = pb.count(
                    backend, _BY_NAME[row.sensealg](), kw
                )
            step(f"{backend} {row.sensealg}: counting evaluations of f")
    return rows


def _fill_row(
    row: Row, timer: _Timer, fwd: _Timer, result: Any, ref: np.ndarray | None
) -> None:
    if fwd.error is not None and timer.error is None:
        timer.error, timer.unsupported = fwd.error, fwd.unsupported
    if timer.error is not None:
        row.status = "unsupported" if timer.unsupported else "failed"
        row.reason = timer.error
        return
    row.forward_s, row.forward_iqr_s = fwd.median(), fwd.iqr()
    row.forward_first_s = fwd.first_s
    row.gradient_s, row.gradient_iqr_s = timer.median(), timer.iqr()
    row.gradient_first_s = timer.first_s
    row.repeats = len(timer.times)
    if row.gradient_s is not None and row.forward_s:
        row.ratio = row.gradient_s / row.forward_s
    sol, grads = result
    row.forward_steps = sol.stats.get("naccept")
    row.forward_rejected = sol.stats.get("nreject")
    if ref is not None:
        row.rel_error = _rel_error(_flat(grads), ref)


# ---------------------------------------------------------------------------------
# What the numbers say.
# ---------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def conclusions(report: dict[str, Any]) -> list[str]:
    """Sentences: the fastest accurate method per backend and overall, and the
    methods whose gradients were not accurate."""
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    limit = report["settings"]["accurate_if_rel_error_below"]
    out: list[str] = []
    if "error" in report["reference"]:
        out.append(
            "No reference gradient, so accuracy is unknown: "
            + report["reference"]["error"]
        )
    good = [r for r in rows if r["accurate"] and r["gradient_s"] is not None]
    best_overall = min(good, key=lambda r: r["gradient_s"], default=None)
    for backend in dict.fromkeys(r["backend"] for r in report["rows"]):
        mine = [r for r in good if r["backend"] == backend]
        best = min(mine, key=lambda r: r["gradient_s"], default=None)
        if best is not None:
            out.append(
                f"{backend}: fastest accurate gradient is {best['sensealg']}, "
                f"{_ms(best['gradient_s'])} ms ({best['ratio']:.1f}x the forward "
                f"solve; relative error {best['rel_error']:.1e})."
            )
    if best_overall is not None and len({r["backend"] for r in good}) > 1:
        out.append(
            f"Fastest accurate overall: {best_overall['sensealg']} on "
            f"{best_overall['backend']}."
        )
    for r in rows:
        if r["accurate"] is False:
            out.append(
                f"{r['sensealg']} on {r['backend']} is not accurate here: relative "
                f"error {r['rel_error']:.1e}, more than {ACCURATE_SPREAD:g} x the "
                f"best row's ({limit:.1e})."
            )
    bad = [r for r in report["rows"] if r["status"] == "failed"]
    if bad:
        out.append(
            "Failed: "
            + ", ".join(f"{r['sensealg']} on {r['backend']}" for r in bad)
            + " (see the notes)."
        )
    return out


# ---------------------------------------------------------------------------------
# Rendering: a rich table; a matplotlib figure.
# ---------------------------------------------------------------------------------


def _sci(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.0e}"


def _pair(a: int | None, b: int | None) -> str:
    return f"{_count(a)}/{_count(b)}"


def _count(x: int | None) -> str:
    return "n/a" if x is None else str(x)


# Short names for the table's narrow method column.
_SHORT = {
    "ForwardMode": "ForwardMode",
    "ReverseThroughSolver": "Reverse",
    "ContinuousAdjoint": "Continuous",
    "InterpolatingAdjoint": "Interp",
    "CheckpointedAdjoint": "Checkpointed",
}


def format_table(report: dict[str, Any], console: Any = None) -> None:
    """Print the report as a table with notes, on `console` (a rich Console;
    default stdout). Columns: docs/compare.md."""
    require_rich()
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    prob, st, ref = report["problem"], report["settings"], report["reference"]
    console.print(
        f"[bold]{prob['name']}[/]: {prob['description']}; {prob['inputs']} inputs "
        f"(u0 and p), {prob['saves']} saves, loss {prob['loss']}"
    )
    console.print(
        f"alg={st['alg']} rtol={st['rtol']:g} atol={st['atol']:g} "
        f"device={st['device'] or 'default'}; times are medians of {st['repeat']} "
        "rounds after a warm-up call"
    )
    if "error" in ref:
        console.print(f"[red]{ref['error']}[/]")
    else:
        console.print(
            f"reference gradient: {ref['backend']} {ref['sensealg']} "
            f"({ref['method']}), {ref['alg']}, rtol={ref['rtol']:g}, "
            f"atol={ref['atol']:g}"
        )
    env = report["environment"]
    shown = {k: v for k, v in env["versions"].items() if v != "not installed"}
    console.print(
        f"diffeqkit {env['diffeqkit']}, Python {env['python']}, {env['cpus']} CPUs; "
        + ", ".join(f"{k} {v}" for k, v in shown.items()),
        style="dim",
    )
    table = Table(
        box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, collapse_padding=True
    )
    for col in (
        "method",
        "ms",
        "±IQR",
        "x fwd",
        "1st s",
        "rel.err",
        "peak\nMB",
        "steps\nacc/rej",
        "f evals\nfwd/bwd",
    ):
        # The method column never wraps: "torch forward" stays one line however
        # narrow the console (other columns fold their headers instead).
        table.add_column(
            col,
            justify="left" if col == "method" else "right",
            no_wrap=col == "method",
        )
    notes: list[str] = []
    previous = None
    for r in report["rows"]:
        if r["backend"] != previous:
            if previous is not None:
                table.add_section()
            previous = r["backend"]
            fwd = next(
                (
                    x
                    for x in report["rows"]
                    if x["backend"] == previous and x["forward_s"]
                ),
                None,
            )
            cells = ["", "", "", ""]
            if fwd is not None:
                cells = [
                    _ms(fwd["forward_s"]),
                    _ms(fwd["forward_iqr_s"]),
                    "1.0",
                    f"{fwd['forward_first_s']:.2f}",
                ]
            table.add_row(f"[bold]{previous}[/] forward", *cells)
        name = " " + str(_SHORT.get(r["sensealg"], r["sensealg"]))
        if r["status"] != "ok":
            note = f"{r['status']}: {r['reason']}"
            if note not in notes:
                notes.append(note)
            colour = "yellow" if r["status"] == "unsupported" else "red"
            mark = f"[{colour}]{name} [{notes.index(note) + 1}][/]"
            table.add_row(mark, *["-"] * 8, style="dim")
            continue
        err = _sci(r["rel_error"])
        if r["accurate"] is False:
            err = f"[red]{err}[/]"
        mem = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.3g}"
        table.add_row(
            name,
            _ms(r["gradient_s"]),
            _ms(r["gradient_iqr_s"]),
            "n/a" if r["ratio"] is None else f"{r['ratio']:.1f}",
            f"{r['gradient_first_s']:.2f}",
            err,
            mem,
            _pair(r["forward_steps"], r["forward_rejected"]),
            _pair(r["forward_nfev"], r["backward_nfev"]),
        )
    console.print(table)
    for i, note in enumerate(notes, 1):
        console.print(f"[{i}] {note}", style="dim", markup=False)
    methods: dict[str, dict[str, None]] = {}  # method -> its backends, in order
    for r in report["rows"]:
        if r["memory_method"]:
            methods.setdefault(r["memory_method"], {})[r["backend"]] = None
    shown = dict.fromkeys(r["sensealg"] for r in report["rows"])
    short = [f"{_SHORT[n]} = {n}" for n in shown if _SHORT.get(n, n) != n]
    console.print(
        (", ".join(short) + ". " if short else "") + "ms: median time of one gradient "
        "(dk.vjp + pullback); 1st s: the first call (JIT compilation on jax); "
        "steps: accepted/rejected steps of the gradient's forward pass; f evals: "
        "evaluations of f counted in its forward/backward pass; "
        "peak MB by "
        + (
            ", ".join(f"{m} ({', '.join(b)})" for m, b in methods.items())
            if methods
            else "no in-process measure"
        )
        + ", n/a elsewhere. Details: docs/compare.md.",
        style="dim",
    )
    for line in report["conclusion"]:
        console.print(f"[bold]{line}[/]")


def require_rich() -> None:
    """Raise a clear error when rich, which prints the tables, is not installed."""
    try:
        importlib.import_module("rich")
    except ImportError as err:
        raise UnsupportedError(
            "python -m diffeqkit compare prints its tables with rich, which is not "
            'installed. Run: pip install "diffeqkit[cli]" (or pip install rich).'
        ) from err


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` with a non-interactive backend, or a clear error."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as err:
        raise UnsupportedError(
            "--plot needs matplotlib, which is not installed. Run: pip install "
            '"diffeqkit[plot]" (or pip install matplotlib).'
        ) from err
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def plot(report: dict[str, Any], path: str) -> None:
    """Save a figure of the report: gradient time (with IQR) and relative error
    per backend x sensealg."""
    plt = require_matplotlib()
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    labels = [
        f"{r['backend']}\n{_SHORT.get(r['sensealg'], r['sensealg'])}" for r in rows
    ]
    fig, (ax_t, ax_e) = plt.subplots(
        2, 1, figsize=(max(6.0, 1.1 * len(rows)), 7), sharex=True
    )
    x = np.arange(len(rows))
    times = [1e3 * r["gradient_s"] for r in rows]
    spread = [1e3 * (r["gradient_iqr_s"] or 0.0) / 2 for r in rows]
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    order = list(dict.fromkeys(r["backend"] for r in rows))
    colours = [palette[order.index(r["backend"]) % len(palette)] for r in rows]
    ax_t.bar(x, times, yerr=spread, color=colours, capsize=3)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("gradient time (ms, median ± IQR/2)")
    errors = [r["rel_error"] if r["rel_error"] else np.nan for r in rows]
    ax_e.bar(x, errors, color=colours)
    ax_e.set_yscale("log")
    ax_e.axhline(
        report["settings"]["accurate_if_rel_error_below"], color="k", ls="--", lw=1
    )
    ax_e.set_ylabel("relative gradient error")
    ax_e.set_xticks(x, labels, rotation=0, fontsize=8)
    st = report["settings"]
    fig.suptitle(
        f"{report['problem']['name']}: {st['alg']}, rtol={st['rtol']:g} "
        f"(dashed: accuracy limit)"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
