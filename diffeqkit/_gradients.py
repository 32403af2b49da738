"""Backend-neutral gradients: `vjp()`, `value_and_grad()` and `Grads`.

The solve is a function ``F: (u0, p) -> u`` with ``u = sol.u`` of shape
``(m, *u0.shape)``, the state at the ``m`` save times. For a downstream scalar
``L = g(u)``, the *cotangent* is ``∂g/∂u``, an array of ``u``'s shape; the
pullback maps it to ``∂L/∂u0`` (shape of ``u0``) and ``∂L/∂p`` (structure of
``p``) by the chain rule ``∂L/∂x = (∂F/∂x)^T ∂g/∂u``, computed by the solve's
``sensealg``. The same call works on every backend; arrays come back in the
backend's type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import backends
from ._ensemble import EnsembleProblem, vjp_ensemble
from ._errors import InvalidProblemError
from ._problem import ODEProblem
from ._solution import Solution
from ._solve import build_request
from .backends._protocol import Pullback, SolveRequest

__all__ = ["Grads", "value_and_grad", "vjp"]


@dataclass(frozen=True)
class Grads:
    """Gradients of a scalar loss with respect to the problem's inputs.

    Attributes
    ----------
    u0 : array
        ``∂L/∂u0``, of ``u0``'s shape, in the backend's array type.
    p : pytree or None
        ``∂L/∂p``, with ``p``'s structure (dicts, lists, tuples kept; a leaf's
        gradient has that leaf's shape; leaves that are None stay None).
    """

    u0: Any
    p: Any


def vjp(
    prob: ODEProblem | EnsembleProblem, alg: str = "tsit5", **solve_kwargs: Any
) -> tuple[Solution, Callable[[Any], Grads]]:
    """Solve, and return the solution with its pullback (vector-Jacobian product).

    Parameters
    ----------
    prob : ODEProblem or EnsembleProblem
        The problem; gradients are taken with respect to ``prob.u0`` and
        ``prob.p``. For an ensemble, with respect to its batched ``u0`` and ``p``
        (gradients with the member axis first) and, for what is not batched,
        ``prob.prob.u0`` or ``prob.prob.p`` (summed over the members).
    alg : str
        The solver, as in `dk.solve`.
    **solve_kwargs
        Any keyword of `dk.solve` (``backend``, ``saveat``, ``rtol``, ``atol``,
        ``sensealg``, ...). ``sensealg`` picks how the pullback is computed.

    Returns
    -------
    sol : Solution
        The solution (``sol.u`` of shape ``(m, *u0.shape)``, no autodiff graph
        attached).
    pullback : callable
        ``pullback(cotangent) -> Grads``. ``cotangent`` is ``∂L/∂sol.u`` for the
        downstream loss ``L``: an array of ``sol.u``'s shape (NumPy or the
        backend's type). Returns `Grads` with ``u0 = ∂L/∂u0`` and
        ``p = ∂L/∂p``. It may be called several times (e.g. one row of a
        Jacobian at a time).

    Raises
    ------
    InvalidProblemError
        A bad argument, or a cotangent whose shape is not ``sol.u``'s.
    UnsupportedError
        The backend cannot run this alg/sensealg combination.

    Notes
    -----
    Chain rule: for ``L = g(F(u0, p))`` with ``F`` the solve, ``∂L/∂u0 =
    (∂F/∂u0)^T ∂g/∂u`` and ``∂L/∂p = (∂F/∂p)^T ∂g/∂u``. For example, with
    ``L = sum(sol.u[-1])`` the cotangent is zero except for ones in its last
    row, and ``grads.u0`` is ``∂u(t1)/∂u0`` summed over the components of
    ``u(t1)``.

    Examples
    --------
    >>> import numpy as np, diffeqkit as dk
    >>> prob = dk.ODEProblem(lambda u, p, t: -p * u, [1.0], (0.0, 1.0), 2.0)
    >>> sol, pullback = dk.vjp(prob, "tsit5", backend="scipy", rtol=1e-10,
    ...                        atol=1e-12, sensealg=dk.ForwardMode())
    >>> cot = np.zeros(sol.u.shape); cot[-1] = 1.0   # L = u(t1)
    >>> grads = pullback(cot)                        # dL/dp = -t1 exp(-p t1)
    >>> bool(abs(grads.p - (-np.exp(-2.0))) < 1e-8)
    True
    """
    _, sol, pull = _backend_vjp(prob, alg, solve_kwargs)
    shape = tuple(sol.u.shape)

    def pullback(cotangent: Any) -> Grads:
        got = tuple(np.shape(cotangent))  # NumPy, torch and JAX arrays alike
        if got != shape:
            raise InvalidProblemError(
                f"cotangent must have the shape of sol.u, {shape}; got shape {got}. "
                "Pass dL/d(sol.u): one entry per saved time and state component."
            )
        du0, dp = pull(cotangent)
        return Grads(u0=du0, p=dp)

    return sol, pullback


def value_and_grad(
    loss: Callable[[Solution], Any],
    prob: ODEProblem | EnsembleProblem,
    alg: str = "tsit5",
    **solve_kwargs: Any,
) -> tuple[Any, Grads]:
    """The value of ``loss(sol)`` and its gradients with respect to ``u0`` and ``p``.

    Parameters
    ----------
    loss : callable
        ``loss(sol) -> scalar``, written against the Array API (``xp =
        dk.array_namespace(sol.u)``); it may read ``sol.u`` and ``sol.t``.
    prob, alg, **solve_kwargs
        As in `vjp`.

    Returns
    -------
    value : scalar
        ``loss(sol)`` in the backend's type (a 0-d array; a float on SciPy).
    grads : Grads
        ``grads.u0 = ∂loss/∂u0``, ``grads.p = ∂loss/∂p`` (``p``'s structure).

    Notes
    -----
    The cotangent ``∂loss/∂sol.u`` comes from autodiff of `loss` (on SciPy with
    the sensealg's ``autodiff`` framework), then the pullback of `vjp` applies
    the chain rule.

    Examples
    --------
    >>> import numpy as np, diffeqkit as dk
    >>> prob = dk.ODEProblem(lambda u, p, t: -p * u, [1.0], (0.0, 1.0), 2.0)
    >>> def loss(sol):
    ...     xp = dk.array_namespace(sol.u)
    ...     return xp.sum(sol.u[-1] ** 2)           # u(t1)^2 = exp(-2 p)
    >>> value, grads = dk.value_and_grad(loss, prob, backend="scipy", rtol=1e-10,
    ...                                  atol=1e-12, sensealg=dk.ForwardMode())
    >>> bool(abs(grads.p - (-2.0 * np.exp(-4.0))) < 1e-7)
    True
    """
    req, sol, pull = _backend_vjp(prob, alg, solve_kwargs)
    value, cotangent = backends.load(req.backend).loss_grad(loss, sol, req)
    du0, dp = pull(cotangent)
    return value, Grads(u0=du0, p=dp)


def _backend_vjp(
    prob: ODEProblem | EnsembleProblem, alg: str, solve_kwargs: dict[str, Any]
) -> tuple[SolveRequest, Solution, Pullback]:
    if isinstance(prob, EnsembleProblem):
        return vjp_ensemble(prob, alg, solve_kwargs)
    for name in ("devices", "executor"):
        if solve_kwargs.get(name) is not None:
            raise InvalidProblemError(
                f"{name}= applies to a dk.EnsembleProblem only; got {name}="
                f"{solve_kwargs[name]!r}. Wrap the problem: dk.EnsembleProblem(prob, "
                f"u0=..., p=...), or leave {name}=None."
            )
        solve_kwargs.pop(name, None)
    req = build_request(prob, alg, **solve_kwargs)
    sol, pull = backends.load(req.backend).vjp(req)
    return req, sol, pull
