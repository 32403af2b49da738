"""Backend-neutral gradients: `vjp()`, `value_and_grad()` and `Grads`.

The solve is a function ``F: (u0, p) -> u`` with ``u = sol.u`` of shape
``(m, *u0.shape)``, the state at the ``m`` save times. For a downstream scalar
``L = g(u)``, the *cotangent* is ``∂g/∂u``, an array of ``u``'s shape; the
pullback maps it to ``∂L/∂u0`` (shape of ``u0``) and ``∂L/∂p`` (structure of
``p``) by the chain rule ``∂L/∂x = (∂F/∂x)^T ∂g/∂u``, computed by the solve's
``sensealg``. With ``events=[...]`` the solve has two more outputs,
``sol.t_events`` and ``sol.u_events``, and a loss may read them too: their
cotangents are added to the chain rule (`vjp`'s keywords ``t_events=`` and
``u_events=``). The same call works on every backend; arrays come back in the
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
) -> tuple[Solution, Callable[..., Grads]]:
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
        ``sensealg``, ``events``, ...). ``sensealg`` picks how the pullback is
        computed.

    Returns
    -------
    sol : Solution
        The solution (``sol.u`` of shape ``(m, *u0.shape)``, no autodiff graph
        attached).
    pullback : callable
        ``pullback(cotangent=None, *, t_events=None, u_events=None) -> Grads``.
        ``cotangent`` is ``∂L/∂sol.u`` for the downstream loss ``L``: an array of
        ``sol.u``'s shape (NumPy or the backend's type), or None for zero.
        With ``events=[...]``, ``t_events`` and ``u_events`` are ``∂L/∂sol.t_events``
        and ``∂L/∂sol.u_events``: lists with one entry per event, each of the
        shape of ``sol.t_events[k]`` (``(n_k,)``) or ``sol.u_events[k]``
        (``(n_k, *u0.shape)``), or None for zero (the list itself, or an entry
        of it); for an ensemble ``(B, n_k)`` and ``(B, n_k, *u0.shape)``, where
        entries on a member's NaN padding are ignored. Returns `Grads` with
        ``u0 = ∂L/∂u0`` and ``p = ∂L/∂p``. It may be called several times (e.g.
        one row of a Jacobian at a time).

    Raises
    ------
    InvalidProblemError
        A bad argument; a cotangent whose shape is not ``sol.u``'s; event
        cotangents for a solve without events, or not one per event of the
        shape of that event's outputs.
    UnsupportedError
        The backend cannot run this alg/sensealg combination.

    Notes
    -----
    Chain rule: for ``L = g(F(u0, p))`` with ``F`` the solve, ``∂L/∂u0 =
    (∂F/∂u0)^T ∂g/∂u`` and ``∂L/∂p = (∂F/∂p)^T ∂g/∂u``. For example, with
    ``L = sum(sol.u[-1])`` the cotangent is zero except for ones in its last
    row, and ``grads.u0`` is ``∂u(t1)/∂u0`` summed over the components of
    ``u(t1)``.

    With events the solve's outputs are ``(u, T, U)``: ``u = sol.u``, ``T`` the
    event times and ``U`` the states just before each event's jump, and for
    ``x`` in ``(u0, p)``

    ``∂L/∂x = (∂u/∂x)^T ∂g/∂u + Σ_j (dt_j/dx)^T ∂g/∂t_j + Σ_j (dU_j/dx)^T ∂g/∂U_j``.

    An event time ``t*`` is a zero of its condition ``c(u(t*), p, t*)``, so it
    moves as ``dt*/dx = -(∂c/∂x + ∂c/∂u · ∂u/∂x) / (∂c/∂u · f + ∂c/∂t)``, all at
    ``(u(t*-), p, t*)``; the state there, ``U = u(t*-)``, moves with it:
    ``dU/dx = ∂u(t*-)/∂x + f(u(t*-), p, t*) dt*/dx``.

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

    The time where ``u = exp(-p t)`` falls to 0.5 is ``t* = ln 2 / p``, and
    ``dt*/dp = -t*/p``:

    >>> half = dk.Event(lambda u, p, t: u[0] - 0.5)   # terminal: stops there
    >>> sol, pullback = dk.vjp(prob, "tsit5", backend="scipy", rtol=1e-10,
    ...                        atol=1e-12, sensealg=dk.ForwardMode(),
    ...                        events=[half])
    >>> grads = pullback(t_events=[np.ones(1)])       # L = t*
    >>> bool(abs(grads.p - (-np.log(2.0) / 4.0)) < 1e-8)
    True
    """
    _, sol, pull = _backend_vjp(prob, alg, solve_kwargs)
    shape = tuple(sol.u.shape)

    def pullback(
        cotangent: Any = None, *, t_events: Any = None, u_events: Any = None
    ) -> Grads:
        if cotangent is None:
            cotangent = np.zeros(shape)
        got = tuple(np.shape(cotangent))  # NumPy, torch and JAX arrays alike
        if got != shape:
            raise InvalidProblemError(
                f"cotangent must have the shape of sol.u, {shape}; got shape {got}. "
                "Pass dL/d(sol.u): one entry per saved time and state component, "
                "or None (zero)."
            )
        events = event_cotangents(sol, t_events, u_events)
        du0, dp = pull(cotangent) if events is None else pull(cotangent, events)
        return Grads(u0=du0, p=dp)

    return sol, pullback


def event_cotangents(sol: Solution, t_events: Any, u_events: Any) -> Any:
    """``(t_cots, u_cots)`` for a backend's pullback: one array per event (NumPy
    zeros for None), checked against ``sol.t_events`` / ``sol.u_events``; None
    when both are None (the pullback of ``sol.u`` alone)."""
    if t_events is None and u_events is None:
        return None
    if sol.t_events is None:
        name = "t_events" if t_events is not None else "u_events"
        raise InvalidProblemError(
            f"pullback({name}=...) is the cotangent of sol.{name}, which only a "
            "solve with events=[...] has; this one has none. Drop the argument, or "
            "pass events=[...] to dk.vjp."
        )
    return (
        _per_event("t_events", t_events, sol.t_events, "(number of firings,)"),
        _per_event(
            "u_events", u_events, sol.u_events, "(number of firings, *u0.shape)"
        ),
    )


def _per_event(name: str, given: Any, outputs: Any, what: str) -> list[Any]:
    n = len(outputs)
    if given is None:
        return [np.zeros(np.shape(x)) for x in outputs]
    if not isinstance(given, (list, tuple)) or len(given) != n:
        got = f"a {type(given).__name__}" + (
            f" of length {len(given)}" if isinstance(given, (list, tuple)) else ""
        )
        raise InvalidProblemError(
            f"{name}= must be a list with one entry per event ({n}), each "
            f"dL/d(sol.{name}[k]) or None; got {got}."
        )
    found = []
    for k, (cot, out) in enumerate(zip(given, outputs, strict=True)):
        want = tuple(np.shape(out))
        if cot is None:
            found.append(np.zeros(want))
            continue
        got = tuple(np.shape(cot))
        if got != want:
            raise InvalidProblemError(
                f"{name}[{k}] must have the shape of sol.{name}[{k}], {want} "
                f"{what}; got shape {got}. Pass dL/d(sol.{name}[{k}]), or None "
                "(zero)."
            )
        found.append(cot)
    return found


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
        dk.array_namespace(sol.u)``); it may read ``sol.u`` and ``sol.t``, and
        with ``events=[...]`` ``sol.t_events`` and ``sol.u_events``.
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
    The cotangents ``∂loss/∂sol.u`` (and ``∂loss/∂sol.t_events``,
    ``∂loss/∂sol.u_events`` with events) come from autodiff of `loss` (on SciPy
    with the sensealg's ``autodiff`` framework), then the pullback of `vjp`
    applies the chain rule.

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
    value, cotangent, events = backends.load(req.backend).loss_grad(loss, sol, req)
    du0, dp = pull(cotangent) if events is None else pull(cotangent, events)
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
