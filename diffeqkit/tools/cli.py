"""The ``compare`` command behind `python -m diffeqkit compare`: progress bar,
measurement, table, JSON and figure. `diffeqkit.__main__` parses the command line
and calls `run_compare`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .. import backends as registry
from .compare import (
    DEFAULT_PROBLEM,
    compare,
    format_table,
    plot,
    require_matplotlib,
    require_rich,
)
from .sweep import SWEEP_WIDTHS, format_sweep, plot_sweep, sweep

__all__ = ["run_compare"]


def run_compare(
    *,
    problem: str | None,
    as_sweep: bool,
    widths: Sequence[int] | None,
    budget_s: float,
    backends: Sequence[str] | None,
    sensealgs: Sequence[str] | None,
    alg: str,
    rtol: float | None,
    atol: float | None,
    repeat: int,
    device: str | None,
    count: bool,
    quiet: bool,
    json_path: str | None,
    plot_path: str | None,
) -> None:
    """Measure, print the table and write the JSON and the figure if asked for.

    Without `as_sweep`, `compare` on `problem` (default `DEFAULT_PROBLEM`); with
    it, `sweep` over `widths` (default `SWEEP_WIDTHS`) with `budget_s`.

    Raises
    ------
    UnsupportedError
        rich, or matplotlib with `plot_path`, is not installed (before measuring).
    InvalidProblemError
        A bad name or number, from `compare` or `sweep`.
    """
    require_rich()
    if plot_path:
        require_matplotlib()  # before minutes of measuring, not after
    if registry.installed("jax"):
        # This command is a program, not the library: it asks JAX for float64 so
        # that gradient errors mean something (the library never flips the flag).
        import jax

        jax.config.update("jax_enable_x64", True)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=quiet,
    ) as bar:
        task = bar.add_task("compare", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        common: dict[str, Any] = {
            "backends": backends,
            "sensealgs": sensealgs,
            "alg": alg,
            "rtol": rtol,
            "atol": atol,
            "repeat": repeat,
            "device": device,
            "progress": progress,
        }
        report = (
            compare(problem or DEFAULT_PROBLEM, count=count, **common)
            if not as_sweep
            else sweep(widths or SWEEP_WIDTHS, budget_s=budget_s, **common)
        )
    (format_sweep if as_sweep else format_table)(report)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=2)
    if plot_path:
        (plot_sweep if as_sweep else plot)(report, plot_path)
