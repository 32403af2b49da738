"""`NeuralODE`: a neural ODE layer as an ``equinox.Module``, on the JAX backend.

Imported on demand (``import diffeqkit.equinox``); it imports JAX and equinox,
``import diffeqkit`` does not. The layer's vector field is ``p`` of an ordinary
`dk.ODEProblem`, so every sensealg, the program cache (new weights never
recompile) and the input checks are those of `dk.solve`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np

from ._arrays import dtype_name, is_array
from ._errors import InvalidProblemError, invalid, short
from ._problem import ODEProblem
from ._sensealg import SensitivityAlgorithm, check_sensealg
from ._solution import Solution
from ._solve import solve

__all__ = ["NeuralODE"]

# The keywords of dk.solve a NeuralODE takes as **solve_kwargs: the others are its
# own arguments, or fixed (it runs on JAX).
_OWN = ("prob", "alg", "backend", "saveat", "sensealg")
_SOLVE_KWARGS = tuple(k for k in inspect.signature(solve).parameters if k not in _OWN)


class NeuralODE(eqx.Module):
    """A neural ODE ``du/dt = vector_field(u)`` as an ``equinox.Module``.

    Parameters
    ----------
    vector_field : callable
        An ``equinox.Module`` (or any callable JAX pytree; a plain function is
        wrapped in ``eqx.nn.Lambda``) mapping the state ``u`` to du/dt of the
        same shape, called as ``vector_field(u)``. Its arrays are
        the layer's trainable parameters; its other fields (activation
        functions, sizes) are static. ``u`` has the shape of ``u0``, a leading
        batch axis included: the vector field maps a batch itself (with
        ``jax.vmap`` inside, or matrix products over the last axis).
    tspan : (t0, t1)
        The time interval, two numbers (static: part of the compiled program).
    alg : str, default "tsit5"
        The solver, as in `dk.solve`.
    saveat : None, float or 1-D array, optional
        The save times, as in `dk.solve` (default ``[t0, t1]``); kept as a tuple
        of floats, static like `tspan`.
    sensealg : SensitivityAlgorithm, optional
        How gradients are computed (`dk.ForwardMode`, `dk.ReverseThroughSolver`,
        `dk.ContinuousAdjoint`, `dk.InterpolatingAdjoint`,
        `dk.CheckpointedAdjoint`); None: `dk.default_sensealg` for the model's
        size (`dk.CheckpointedAdjoint` above 32 inputs).
    **solve_kwargs
        Other keywords of `dk.solve`: ``rtol``, ``atol``, ``dt0``, ``adaptive``,
        ``max_steps``, ``device``, ``dtype``, ``throw``.

    Raises
    ------
    InvalidProblemError
        A bad argument; at the first call, a vector field returning an array of
        another shape or dtype than ``u``.

    Notes
    -----
    ``node(u0)`` returns the states at the save times, shape
    ``(n_saves, *u0.shape)``; ``node.solve(u0)`` the whole `dk.Solution`. Both
    work eagerly and under ``jax.jit``, ``jax.grad``, ``jax.vmap``,
    ``eqx.filter_jit``, ``eqx.filter_grad`` and with optax: differentiate with
    respect to the layer (its vector field's arrays) and ``u0``. A vector field
    whose fields are all arrays passes through ``jax.jit`` and ``jax.grad``
    directly; one with activation functions among its fields (``eqx.nn.MLP``)
    goes through ``eqx.filter_jit`` / ``eqx.filter_grad`` as usual in equinox.
    The dtype follows ``u0`` (keep the model's arrays in the same dtype); the
    device follows the inputs.

    The vector field is autonomous, ``vector_field(u)``. For one that depends on
    time, or on physical parameters next to a network, write the problem
    directly: ``dk.ODEProblem(lambda u, p, t: p["nn"](u) - p["k"] * u, u0,
    tspan, p={"nn": model, "k": k})`` (any JAX pytree is a valid ``p``).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> from diffeqkit.equinox import NeuralODE
    >>> field = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    >>> node = NeuralODE(field, (0.0, 1.0), saveat=[0.0, 0.5, 1.0])
    >>> node(jnp.array([1.0, 0.0])).shape
    (3, 2)
    """

    vector_field: Any
    tspan: tuple[float, float] = eqx.field(static=True)
    alg: str = eqx.field(static=True)
    saveat: tuple[float, ...] | float | None = eqx.field(static=True)
    sensealg: SensitivityAlgorithm | None = eqx.field(static=True)
    solve_kwargs: tuple[tuple[str, Any], ...] = eqx.field(static=True)

    def __init__(
        self,
        vector_field: Any,
        tspan: Any,
        alg: str = "tsit5",
        *,
        saveat: Any = None,
        sensealg: SensitivityAlgorithm | None = None,
        **solve_kwargs: Any,
    ) -> None:
        if not callable(vector_field):
            raise invalid(
                "vector_field",
                "must be callable as vector_field(u)",
                vector_field,
                "Pass an equinox.Module mapping the state u to du/dt.",
            )
        unknown = sorted(set(solve_kwargs) - set(_SOLVE_KWARGS))
        if unknown:
            raise InvalidProblemError(
                f"NeuralODE got unknown keyword(s) {', '.join(unknown)}. It takes "
                f"alg, saveat, sensealg and the solve keywords "
                f"{', '.join(_SOLVE_KWARGS)}; it always runs on backend='jax'."
            )
        if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(vector_field)):
            # A plain function (no parameters): p must be a pytree, not a leaf.
            vector_field = eqx.nn.Lambda(vector_field)
        self.vector_field = vector_field
        self.tspan = _static_tspan(tspan)
        self.alg = alg
        self.saveat = _static_saveat(saveat)
        self.sensealg = check_sensealg(sensealg)
        self.solve_kwargs = tuple(sorted(solve_kwargs.items()))

    def __call__(self, u0: Any) -> Any:
        """The states at the save times, shape ``(n_saves, *u0.shape)``."""
        return self.solve(u0).u

    def solve(self, u0: Any) -> Solution:
        """The `dk.Solution` from `u0` (shape of the state, a batch axis
        included)."""
        saveat = np.asarray(self.saveat) if isinstance(self.saveat, tuple) else None
        prob = ODEProblem(_rhs, u0, self.tspan, self.vector_field)
        return solve(
            prob,
            self.alg,
            backend="jax",
            saveat=self.saveat if saveat is None else saveat,
            sensealg=self.sensealg,
            **dict(self.solve_kwargs),
        )

    def __repr__(self) -> str:
        field = eqx.tree_pformat(self.vector_field, short_arrays=True)
        parts = [
            f"vector_field={field}",
            f"tspan={self.tspan!r}",
            f"alg={self.alg!r}",
            f"saveat={_saveat_repr(self.saveat)}",
            f"sensealg={self.sensealg!r}",
            *(f"{k}={v!r}" for k, v in self.solve_kwargs),
        ]
        return "NeuralODE(" + ", ".join(parts) + ")"


def _rhs(u: Any, p: Callable[[Any], Any], t: Any) -> Any:
    """``f(u, p, t)`` of the layer's problem: the vector field is p. Its shape and
    dtype are checked here, at trace time, naming the vector field."""
    del t
    du = p(u)
    if not is_array(du) or tuple(du.shape) != tuple(u.shape):
        got = f"shape {tuple(du.shape)}" if is_array(du) else short(du)
        raise InvalidProblemError(
            f"vector_field(u) returned {got} for u of shape {tuple(u.shape)}. "
            "It must return du/dt with the shape of u (a batch axis of u0 "
            "included: map over it inside the vector field, e.g. with jax.vmap)."
        )
    if dtype_name(du.dtype) != dtype_name(u.dtype):
        raise InvalidProblemError(
            f"vector_field(u) returned dtype {dtype_name(du.dtype)} for a "
            f"{dtype_name(u.dtype)} state. Keep the model's arrays in u0's dtype, "
            "e.g. jax.tree_util.tree_map(lambda x: x.astype(u0.dtype) if "
            "eqx.is_inexact_array(x) else x, model), or pass u0 in the model's."
        )
    return du


def _static_tspan(tspan: Any) -> tuple[float, float]:
    fix = "Pass two numbers, e.g. tspan=(0.0, 1.0)."
    try:
        t0, t1 = (float(t) for t in tspan)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        raise invalid(
            "tspan", "must be a pair of concrete numbers", tspan, fix
        ) from None
    return (t0, t1)


def _static_saveat(saveat: Any) -> tuple[float, ...] | float | None:
    if saveat is None:
        return None
    try:
        arr = np.asarray(saveat, dtype=np.float64)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        raise invalid(
            "saveat",
            "must be None, a number dt or a 1-D array of concrete times",
            saveat,
            "Pass e.g. saveat=np.linspace(t0, t1, 30).",
        ) from None
    if arr.ndim == 0:
        return float(arr)
    if arr.ndim != 1:
        raise invalid(
            "saveat",
            f"must be 1-D, not of shape {arr.shape}",
            saveat,
            "Pass the save times as one 1-D array.",
        )
    return tuple(float(t) for t in arr)


def _saveat_repr(saveat: Any) -> str:
    if isinstance(saveat, tuple) and len(saveat) > 4:
        return f"<{len(saveat)} times from {saveat[0]!r} to {saveat[-1]!r}>"
    return repr(saveat)
