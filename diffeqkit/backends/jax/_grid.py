"""Fixed steps whose grid is data: a step-size controller stepping to
``t_s + k*dt0`` merged with the save times (the grid of ``step_grid``, built one
step at a time, so its length need not be known when the program is traced), and
a fixed-step solver whose steps carry the cubic Hermite interpolant through both
ends' values and slopes, on which events are located (as on SciPy and torch).

A solve with events restarts the grid at each event time, which is only known
inside the compiled program; `diffrax.StepTo` needs its grid's length up front.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import diffrax
import jax
import jax.numpy as jnp

from ._solve import RESULTS, all_finite

__all__ = ["Grid", "hermite_solver"]

# As `diffeqkit._saveat.step_grid`: a grid point this close (times dt0) to a save
# time is replaced by the save time.
_CLOSE = 1e-9


class Grid(diffrax.AbstractStepSizeController):
    """Steps to ``start + k*dt0`` merged with `ts` (and the solve's end), the
    points of ``step_grid(start, t1, dt0, ts)``; a step to a non-finite state is
    refused and stops the solve (``nonfinite``), as `StepTo` in ``_solve``.

    `ts` may hold times outside the solve (clipped ones): only those strictly
    after the current time and before the end count.
    """

    start: Any
    dt0: Any  # > 0
    ts: Any
    sign: Any = 1  # of the direction of integration (diffrax's time is its own)

    def wrap(self, direction: Any) -> Any:
        return Grid(start=self.start, dt0=self.dt0, ts=self.ts, sign=direction)

    def _next(self, t: Any, t1: Any) -> Any:
        """The grid point after `t` (in diffrax's time, as `t1`, the end)."""
        start, ts, dt0 = self.sign * self.start, self.sign * self.ts, self.dt0
        k = jnp.floor((t - start) / dt0 + _CLOSE) + 1
        regular = start + dt0 * k
        save = jnp.min(jnp.where(ts > t, ts, jnp.inf), initial=jnp.inf)
        save = jnp.minimum(save, t1)
        return jnp.where(regular >= save - _CLOSE * dt0, save, regular)

    def init(  # pyright: ignore[reportIncompatibleMethodOverride]
        self,
        terms: Any,
        t0: Any,
        t1: Any,
        y0: Any,
        dt0: Any,
        args: Any,
        func: Any,
        error_order: Any,
    ) -> tuple[Any, Any]:
        del terms, y0, dt0, args, func, error_order
        return self._next(t0, t1), t1

    def adapt_step_size(  # pyright: ignore[reportIncompatibleMethodOverride]
        self,
        t0: Any,
        t1: Any,
        y0: Any,
        y1_candidate: Any,
        args: Any,
        y_error: Any,
        error_order: Any,
        controller_state: Any,
    ) -> tuple[Any, Any, Any, Any, Any, Any]:
        del y0, args, y_error, error_order
        end = controller_state
        ok = all_finite(y1_candidate)
        return (
            ok,
            jnp.where(ok, t1, t0),
            jnp.where(ok, self._next(t1, end), t1),
            False,
            end,
            RESULTS.where(ok, RESULTS.successful, RESULTS.nonfinite),
        )


class HermiteStep(diffrax.AbstractLocalInterpolation):
    """The cubic Hermite interpolant of a step through ``y0, f0`` and ``y1, f1``
    (given as ``hf0 = h f0`` and ``hf1 = h f1``, `h` the step)
    (exactly `y0` and `y1` at its ends). Used only to locate events, without
    gradients with respect to the state."""

    t0: Any
    t1: Any
    y0: Any
    y1: Any
    hf0: Any
    hf1: Any

    def evaluate(self, t0: Any, t1: Any = None, left: bool = True) -> Any:
        del left
        if t1 is not None:
            return self.evaluate(t1) - self.evaluate(t0)
        h = self.t1 - self.t0
        x = (t0 - self.t0) / h
        y = (
            (2 * x**3 - 3 * x**2 + 1) * self.y0
            + (x**3 - 2 * x**2 + x) * self.hf0
            + (-2 * x**3 + 3 * x**2) * self.y1
            + (x**3 - x**2) * self.hf1
        )
        # Exactly the step values at its ends, with the polynomial's slope in t
        # there (a root finder iterating from the step's end needs it).
        ends = jnp.where(
            t0 == self.t0, self.y0 - y, jnp.where(t0 == self.t1, self.y1 - y, 0.0)
        )
        return y + jax.lax.stop_gradient(ends)


@functools.cache
def _with_hermite(cls: type[diffrax.AbstractSolver]) -> type[diffrax.AbstractSolver]:
    base = cast("Any", cls)

    def step(
        self: Any,
        terms: Any,
        t0: Any,
        t1: Any,
        y0: Any,
        args: Any,
        solver_state: Any,
        made_jump: Any,
    ) -> Any:
        y1, error, _, state, result = base.step(
            self, terms, t0, t1, y0, args, solver_state, made_jump
        )
        # Two more f calls a step: only the steps of a segment being located pay.
        # The slopes times the step, in diffrax's time (its control carries
        # the direction of integration).
        control = terms.contr(t0, t1)
        dense = {
            "y0": y0,
            "y1": y1,
            "hf0": terms.vf_prod(t0, y0, args, control),
            "hf1": terms.vf_prod(t1, y1, args, control),
        }
        return y1, error, dense, state, result

    return type(
        f"{cls.__name__}Hermite",
        (cls,),
        {
            "step": step,
            "interpolation_cls": HermiteStep,
            "__module__": __name__,
            "__qualname__": f"{cls.__name__}Hermite",
        },
    )


def hermite_solver(solver: diffrax.AbstractSolver) -> diffrax.AbstractSolver:
    """`solver` (built with no arguments) whose steps' interpolant is the cubic
    Hermite one (`HermiteStep`)."""
    return _with_hermite(type(solver))()
