"""Counting the evaluations of a vector field as they happen, in any framework.

Inside compiled JAX code ``f`` is called once, while tracing, so there the count
is kept by a host callback that runs at every evaluation; eager calls are counted
directly. The framework is told by the state's type, not by the backend (SciPy's
derivative engines trace ``f`` with JAX or torch). Imports no framework.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["EvaluationCounter"]


class EvaluationCounter:
    """``f`` wrapped to count its evaluations; call `read` for the count so far.

    Parameters
    ----------
    f : callable
        The vector field ``f(u, p, t)``.
    """

    def __init__(self, f: Callable[..., Any]) -> None:
        self.f = f
        self._count = 0

    def _tick(self) -> None:
        self._count += 1

    def __call__(self, u: Any, p: Any, t: Any) -> Any:
        jax = sys.modules.get("jax")
        if jax is not None and isinstance(u, jax.core.Tracer):
            jax.debug.callback(self._tick)
        else:
            self._tick()
        return self.f(u, p, t)

    def read(self) -> int:
        """The evaluations so far, after every pending JAX callback has run."""
        jax = sys.modules.get("jax")
        if jax is not None:
            jax.effects_barrier()
        return self._count
