"""The parameter-count sweep (``python -m diffeqkit compare --sweep``): gradient
time against the number of inputs on neural ODEs of growing width, measured as
`compare` measures a problem, and where forward mode stops winning.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from .. import backends as registry
from .. import problems
from .._errors import InvalidProblemError
from .compare import (
    _SHORT,
    Row,
    _backend_steps,
    _measure_backend,
    _ms,
    _Problem,
    _selection,
    _solve_options,
    _Steps,
    environment,
    require_matplotlib,
    require_rich,
)

__all__ = ["SWEEP_WIDTHS", "crossovers", "format_sweep", "plot_sweep", "sweep"]

# Widths of the 2 -> w -> w -> 2 tanh MLP: 9 to 9,794 parameters
# (``neural_ode_size(w, 2, 2) = w^2 + 6w + 2``).
SWEEP_WIDTHS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 96)
SWEEP_DEPTH = 2
SWEEP_DIM = 2
DEFAULT_BUDGET_S = 2.0


def sweep(
    widths: Sequence[int] = SWEEP_WIDTHS,
    *,
    backends: Sequence[str] | None = None,
    sensealgs: Sequence[str] | None = None,
    alg: str = "tsit5",
    rtol: float | None = None,
    atol: float | None = None,
    repeat: int = 3,
    device: str | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Time every backend x sensealg on neural ODEs of growing width.

    Parameters
    ----------
    widths : sequence of int
        Hidden widths of the ``2 -> w -> w -> 2`` MLP (`dk.problems.neural_ode`
        with ``depth=2``), each >= 1; default `SWEEP_WIDTHS` (9 to 9,794
        parameters).
    backends, sensealgs, alg, rtol, atol, repeat, device
        As in `diffeqkit.tools.compare.compare`.
    budget_s : float
        A method whose median gradient takes longer than this is not run at
        larger widths (its rows there are ``"skipped"``).
    progress : callable, optional
        ``progress(what, done, total)``.

    Returns
    -------
    dict
        ``kind = "sweep"``, ``problem``, ``settings``, ``environment``,
        ``points`` (per width: ``width``, ``parameters``, ``inputs`` and the
        rows, as in `compare`, without errors, memory or counts), ``crossover``
        (per backend, see `crossovers`), ``conclusion`` and ``wall_s``.

    Raises
    ------
    InvalidProblemError
        A bad width, budget, name or number.
    """
    wall = time.perf_counter()
    widths = [_width(w) for w in widths]
    if not widths:
        raise InvalidProblemError("widths must name at least one width; got none.")
    if not (isinstance(budget_s, int | float) and budget_s > 0):
        raise InvalidProblemError(
            f"budget_s must be a positive number of seconds; got {budget_s!r}."
        )
    chosen, names = _selection(backends, sensealgs, alg, repeat)
    installed = [b for b in chosen if registry.installed(b)]
    bare = {"memory": False, "count": False}  # the plain comparison's job
    per_width = len(installed) * _backend_steps(names, repeat, **bare)
    step = _Steps(len(widths) * per_width, progress)
    over: dict[tuple[str, str], str] = {}
    points: list[dict[str, Any]] = []
    devices: dict[str, Any] = {}
    kw: dict[str, Any] = {}
    for width in widths:
        net = problems.neural_ode(width=width, depth=SWEEP_DEPTH, dim=SWEEP_DIM)
        pb = _Problem(net)
        kw = _solve_options(pb, alg, rtol, atol, device)
        rows: list[Row] = []
        for backend in chosen:
            run = [n for n in names if (backend, n) not in over]
            if registry.installed(backend):
                step.total -= len(names) - len(run)  # skipped: no warm-up
            measured = iter(
                _measure_backend(
                    pb, backend, run, kw, repeat, None, step, devices, **bare
                )
            )
            for name in names:
                if (backend, name) in over:
                    rows.append(Row(backend, name, "skipped", over[backend, name]))
                    continue
                row = next(measured)
                rows.append(row)
                if row.gradient_s is not None and row.gradient_s > budget_s:
                    over[backend, name] = (
                        f"over the budget: {_ms(row.gradient_s)} ms at width "
                        f"{width}, more than {budget_s:g} s"
                    )
        points.append(
            {
                "width": width,
                "parameters": problems.neural_ode_size(width, SWEEP_DEPTH, SWEEP_DIM),
                "inputs": problems.neural_ode_size(width, SWEEP_DEPTH, SWEEP_DIM)
                + SWEEP_DIM,
                "rows": [asdict(r) for r in rows],
            }
        )
    report: dict[str, Any] = {
        "schema": 1,
        "kind": "sweep",
        "problem": {
            "name": "neural_ode",
            "description": f"neural ODE, tanh MLP {SWEEP_DIM} -> w x {SWEEP_DEPTH} "
            f"-> {SWEEP_DIM}, t in [0, 1], 21 saves",
            "loss": "0.5 * sum((sol.u - data)**2)",
        },
        "settings": {
            **kw,
            "widths": widths,
            "repeat": repeat,
            "device": device,
            "budget_s": budget_s,
        },
        "environment": environment(devices),
        "points": points,
    }
    report["crossover"] = crossovers(report)
    report["conclusion"] = sweep_conclusions(report)
    report["wall_s"] = time.perf_counter() - wall
    return report


def _width(w: Any) -> int:
    if isinstance(w, bool) or not isinstance(w, int | np.integer) or w < 1:
        raise InvalidProblemError(f"widths must be ints >= 1; got {w!r}.")
    return int(w)


def _series(report: dict[str, Any], backend: str, name: str) -> dict[int, float]:
    """``{inputs: median gradient seconds}`` of one backend x sensealg."""
    out = {}
    for point in report["points"]:
        for r in point["rows"]:
            if (r["backend"], r["sensealg"]) == (backend, name) and r["gradient_s"]:
                out[point["inputs"]] = r["gradient_s"]
    return out


def crossovers(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per backend: where ForwardMode stops being the fastest method.

    ``crossover_inputs``: the smallest input count from which the fastest adjoint
    (the fastest non-ForwardMode method at each size) beats ForwardMode at every
    larger size where both were measured; None if ForwardMode is fastest at the
    largest such size. ``forward_wins_up_to``: the largest size below it at which
    ForwardMode was fastest (None if it never was). ``sizes``: the sizes where
    both were measured.
    """
    out: dict[str, dict[str, Any]] = {}
    rows = [r for p in report["points"] for r in p["rows"]]
    for backend in dict.fromkeys(r["backend"] for r in rows):
        fwd = _series(report, backend, "ForwardMode")
        others = [
            _series(report, backend, n)
            for n in dict.fromkeys(r["sensealg"] for r in rows)
            if n != "ForwardMode"
        ]
        sizes = sorted(k for k in fwd if any(k in o for o in others))
        best = {k: min(o[k] for o in others if k in o) for k in sizes}
        wins = [fwd[k] <= best[k] for k in sizes]
        cross = None
        if sizes and not wins[-1]:
            i = len(wins)
            while i > 0 and not wins[i - 1]:
                i -= 1
            cross = sizes[i]
        won = [k for k, w in zip(sizes, wins, strict=True) if w]
        out[backend] = {
            "crossover_inputs": cross,
            "forward_wins_up_to": max(
                (k for k in won if cross is None or k < cross), default=None
            ),
            "sizes": sizes,
        }
    return out


def sweep_conclusions(report: dict[str, Any]) -> list[str]:
    """One sentence per backend on where forward mode stops winning."""
    out = []
    for backend, c in report["crossover"].items():
        sizes, cross, won = c["sizes"], c["crossover_inputs"], c["forward_wins_up_to"]
        if not sizes:
            out.append(f"{backend}: ForwardMode and an adjoint were never both timed.")
        elif cross is None:
            out.append(
                f"{backend}: ForwardMode was fastest at every size measured, up to "
                f"{sizes[-1]} inputs."
            )
        elif won is None:
            out.append(
                f"{backend}: an adjoint method beat ForwardMode at every size "
                f"measured, from {sizes[0]} inputs."
            )
        else:
            out.append(
                f"{backend}: ForwardMode wins up to {won} inputs; from {cross} "
                "inputs on, an adjoint method is faster."
            )
    return out


def format_sweep(report: dict[str, Any], console: Any = None) -> None:
    """Print the sweep as a table: median gradient ms per method and size."""
    require_rich()
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    st = report["settings"]
    console.print(
        f"[bold]sweep[/]: {report['problem']['description']}; alg={st['alg']} "
        f"rtol={st['rtol']:g} atol={st['atol']:g}; median ms of one gradient "
        f"({st['repeat']} rounds after a warm-up call) per number of inputs"
    )
    table = Table(
        box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, collapse_padding=True
    )
    table.add_column("method \\ inputs", no_wrap=True)
    for point in report["points"]:
        table.add_column(str(point["inputs"]), justify="right", no_wrap=True)
    rows = report["points"][0]["rows"]
    previous = None
    for key in [(r["backend"], r["sensealg"]) for r in rows]:
        if key[0] != previous and previous is not None:
            table.add_section()
        previous = key[0]
        cells = []
        for point in report["points"]:
            r = next(x for x in point["rows"] if (x["backend"], x["sensealg"]) == key)
            cells.append(
                _ms(r["gradient_s"])
                if r["status"] == "ok"
                else {"skipped": "skip"}.get(r["status"], "-")
            )
        table.add_row(f"{key[0]} {_SHORT.get(key[1], key[1])}", *cells)
    console.print(table)
    console.print(
        f"skip: over the {st['budget_s']:g} s budget at a smaller width; "
        "-: unsupported or failed (the JSON has the reason).",
        style="dim",
    )
    for line in report["conclusion"]:
        console.print(f"[bold]{line}[/]")


def plot_sweep(report: dict[str, Any], path: str) -> None:
    """Save a log-log figure of gradient time against inputs, a panel per
    backend, a line per sensealg, the crossover marked."""
    plt = require_matplotlib()
    backends = list(report["crossover"])
    names = list(dict.fromkeys(r["sensealg"] for r in report["points"][0]["rows"]))
    fig, axes = plt.subplots(
        1, len(backends), figsize=(4.2 * len(backends), 4), squeeze=False
    )
    for ax, backend in zip(axes[0], backends, strict=True):
        for colour, name in enumerate(names):
            series = _series(report, backend, name)
            if series:
                xs = sorted(series)
                ax.plot(
                    xs,
                    [1e3 * series[x] for x in xs],
                    marker="o",
                    ms=3,
                    lw=2.2 if name == "ForwardMode" else 1.2,
                    color=f"C{colour}",  # one colour per method in every panel
                    label=_SHORT.get(name, name),
                )
        c = report["crossover"][backend]
        if c["crossover_inputs"] is not None and c["forward_wins_up_to"] is not None:
            ax.axvline(c["crossover_inputs"], color="k", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(backend)
        ax.set_xlabel("inputs (u0 and parameters)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("gradient time (ms, median)")
    axes[0][0].legend(fontsize=8)
    st = report["settings"]
    fig.suptitle(
        f"{report['problem']['description']}: {st['alg']}, rtol={st['rtol']:g} "
        "(dashed: ForwardMode stops winning)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
