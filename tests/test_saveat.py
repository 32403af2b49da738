"""saveat semantics and fixed-step grids (core, no backend needed)."""

from __future__ import annotations

import numpy as np
import pytest

from diffeqkit._saveat import save_times, step_grid


def test_default_is_endpoints():
    np.testing.assert_array_equal(save_times(None, 0.0, 2.0), [0.0, 2.0])


def test_float_dt_saves_every_dt_plus_t1():
    np.testing.assert_allclose(save_times(0.3, 0.0, 1.0), [0.0, 0.3, 0.6, 0.9, 1.0])


def test_float_dt_that_divides_span_has_no_duplicate_endpoint():
    ts = save_times(0.1, 0.0, 1.0)
    assert ts.size == 11
    assert ts[-1] == 1.0


def test_float_dt_backward():
    np.testing.assert_allclose(save_times(0.5, 2.0, 0.75), [2.0, 1.5, 1.0, 0.75])


def test_array_is_kept_as_float64():
    ts = save_times([0.5, 1], 0.0, 1.0)
    assert ts.dtype == np.float64
    np.testing.assert_array_equal(ts, [0.5, 1.0])


def test_fixed_grid_steps_on_save_times():
    grid = step_grid(0.0, 1.0, 0.3, np.array([0.45, 1.0]))
    np.testing.assert_allclose(grid, [0.0, 0.3, 0.45, 0.6, 0.9, 1.0])


def test_fixed_grid_merges_save_times_close_to_steps():
    # 0.3 + 1e-12 is a save time: it replaces the grid point 0.3 rather than
    # leaving a step of length 1e-12.
    grid = step_grid(0.0, 0.6, 0.3, np.array([0.3 + 1e-12]))
    np.testing.assert_array_equal(grid, [0.0, 0.3 + 1e-12, 0.6])


def test_fixed_grid_backward():
    grid = step_grid(1.0, 0.0, 0.4, np.array([0.5]))
    np.testing.assert_allclose(grid, [1.0, 0.6, 0.5, 0.2, 0.0])


@pytest.mark.parametrize("dt0", [0.1, 0.25, 0.3, 1.0, 5.0])
def test_fixed_grid_steps_never_exceed_dt0(dt0):
    grid = step_grid(0.0, 1.0, dt0, None)
    assert grid[0] == 0.0
    assert grid[-1] == 1.0
    assert np.all(np.diff(grid) <= dt0 * (1 + 1e-12))
