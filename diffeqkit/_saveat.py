"""Save times and fixed-step grids, computed once in the core for every backend
(docs/design.md, "Save times").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._arrays import is_array, is_concrete, is_real_number, to_numpy
from ._errors import invalid

__all__ = ["MAX_SAVE_POINTS", "save_times", "step_grid"]

# A guard, not a tuning knob: more points than this is almost surely a typo in
# saveat=dt and would otherwise allocate gigabytes or appear to hang.
MAX_SAVE_POINTS = 10_000_000


def save_times(saveat: Any, t0: Any, t1: Any) -> Any:
    """Normalise `saveat` against ``tspan=(t0, t1)``; see the module docstring."""
    if not (is_concrete(t0) and is_concrete(t1)):
        if saveat is None:
            return None  # the backend saves at (t0, t1) itself
        if is_array(saveat) and not is_concrete(saveat):
            return saveat
    if saveat is None:
        return np.array([t0, t1], dtype=np.float64)
    if is_real_number(saveat) or (
        is_array(saveat) and len(saveat.shape) == 0 and is_concrete(saveat)
    ):
        return _every_dt(float(saveat), t0, t1)
    if is_array(saveat) and not is_concrete(saveat):
        return saveat
    fix = (
        "Pass a 1-D array of times inside tspan ordered in the direction of "
        "integration, or a float dt."
    )
    try:
        ts = np.asarray(to_numpy(saveat), dtype=np.float64)
    except (TypeError, ValueError):
        raise invalid(
            "saveat", "must be a float dt or 1-D array", saveat, fix
        ) from None
    if ts.ndim != 1 or ts.size == 0:
        raise invalid("saveat", "must be a non-empty 1-D array", saveat, fix)
    if not np.all(np.isfinite(ts)):
        raise invalid("saveat", "must be finite", saveat, fix)
    lo, hi = min(t0, t1), max(t0, t1)
    if ts.min() < lo or ts.max() > hi:
        raise invalid("saveat", f"must lie inside tspan=({t0!r}, {t1!r})", saveat, fix)
    steps = np.diff(ts) * (1.0 if t1 > t0 else -1.0)
    if np.any(steps <= 0):
        way = "increasing" if t1 > t0 else "decreasing (t1 < t0)"
        raise invalid("saveat", f"must be strictly {way}", saveat, fix)
    return ts


def _every_dt(dt: float, t0: float, t1: float) -> np.ndarray:
    fix = "Pass a positive spacing, e.g. saveat=0.1; the direction comes from tspan."
    if not math.isfinite(dt) or dt <= 0:
        raise invalid("saveat", "as a float must be a positive, finite dt", dt, fix)
    span = abs(t1 - t0)
    n = math.floor(span / dt * (1 + 1e-12))
    if n + 2 > MAX_SAVE_POINTS:
        raise invalid(
            "saveat",
            f"asks for {n + 2} save points, more than {MAX_SAVE_POINTS}",
            dt,
            "Pass a larger dt.",
        )
    direction = 1.0 if t1 > t0 else -1.0
    ts = t0 + direction * dt * np.arange(n + 1, dtype=np.float64)
    if abs(ts[-1] - t1) <= 1e-10 * span:
        ts[-1] = t1
    else:
        ts = np.append(ts, t1)
    return ts


def step_grid(t0: float, t1: float, dt0: float, ts: np.ndarray | None) -> np.ndarray:
    """The step endpoints of a fixed-step method: ``t0 + k*dt0`` merged with `ts`.

    A grid point within ``1e-9*dt0`` of a save time is replaced by the save time,
    so no step is shorter than rounding. Ends at `t1`.
    """
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    n = math.ceil(span / dt0 * (1 - 1e-12))
    grid = t0 + direction * dt0 * np.arange(n + 1, dtype=np.float64)
    grid[-1] = t1
    if ts is not None:
        grid = np.union1d(grid, ts)
        if direction < 0:
            grid = grid[::-1]
        keep = np.ones(grid.size, dtype=bool)
        gaps = np.abs(np.diff(grid))
        close = np.flatnonzero(gaps <= 1e-9 * dt0)
        saved = set(ts.tolist())
        for i in close:  # drop whichever of the pair is not a save time
            keep[i + 1 if grid[i] in saved else i] = False
        grid = grid[keep]
    return grid
