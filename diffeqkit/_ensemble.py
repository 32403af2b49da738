"""Ensembles: one `ODEProblem` solved for a batch of initial states and parameters.

`EnsembleProblem` validates the batch once; `solve_ensemble` and `vjp_ensemble`
build the member template (`build_request` on the problem with member 0's
values, so that the backend and dtype follow the batched arrays) and hand the
backend one call with the batched ``u0`` and ``p`` (leading axis = members; None
= shared by every member). Each backend decides how members run (JAX: ``vmap``
of the compiled solve; torch: a batched solver; SciPy: chunks on an executor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import backends
from ._arrays import is_array, is_concrete, to_numpy
from ._errors import InvalidProblemError, UnsupportedError, listing, short
from ._problem import ODEProblem
from ._pytree import tree_map, tree_paths
from ._solution import Solution
from ._solve import build_request
from .backends._protocol import SolveRequest

__all__ = ["EnsembleProblem", "ensemble_request", "solve_ensemble", "vjp_ensemble"]


@dataclass(frozen=True, init=False, eq=False)
class EnsembleProblem:
    """`prob` for a batch of members, each with its own ``u0`` and/or ``p``.

    Parameters
    ----------
    prob : ODEProblem
        The member problem: `f`, `tspan`, `jac`, and the values of whatever is
        not batched.
    u0 : array, optional
        Shape ``(B, *prob.u0.shape)``: member ``i`` starts at ``u0[i]``. None:
        every member starts at ``prob.u0``.
    p : pytree, optional
        ``prob.p``'s structure (dict / list / tuple), every leaf an array with a
        leading axis of length ``B`` and then that leaf's shape in ``prob.p``
        (None leaves stay None). None: every member uses ``prob.p``.

    Attributes
    ----------
    prob, u0, p
        As given (`u0` as an array: lists become NumPy).
    size : int
        The number of members, ``B``.

    Raises
    ------
    InvalidProblemError
        Neither `u0` nor `p` given, a leading axis that differs between them, a
        shape that is not ``(B, *shape in prob)``, or `p` with another structure
        than ``prob.p``.

    Examples
    --------
    >>> import numpy as np, diffeqkit as dk
    >>> prob = dk.ODEProblem(lambda u, p, t: -p * u, np.array([1.0]), (0.0, 1.0),
    ...                      np.array(1.0))
    >>> ens = dk.EnsembleProblem(prob, p=np.array([0.5, 1.0, 2.0]))
    >>> sol = dk.solve(ens, "tsit5", backend="scipy", rtol=1e-10, atol=1e-12)
    >>> sol.u.shape                      # (members, saves, *u0.shape)
    (3, 2, 1)
    >>> bool(np.allclose(sol.u[:, -1, 0], np.exp(-np.array([0.5, 1.0, 2.0]))))
    True
    """

    prob: ODEProblem
    u0: Any
    p: Any
    size: int
    _template: ODEProblem = field(repr=False)

    def __init__(self, prob: ODEProblem, *, u0: Any = None, p: Any = None) -> None:
        if not isinstance(prob, ODEProblem):
            raise InvalidProblemError(
                f"prob must be a dk.ODEProblem; got prob={short(prob)}. Build the "
                "member problem with dk.ODEProblem(f, u0, tspan, p) and pass it "
                "first: dk.EnsembleProblem(prob, u0=..., p=...)."
            )
        if u0 is None and p is None:
            raise InvalidProblemError(
                "dk.EnsembleProblem needs u0=... (shape (B, *prob.u0.shape)) or "
                "p=... (prob.p's structure, each leaf with a leading axis B), or "
                "both; got neither."
            )
        sizes: list[tuple[str, int]] = []
        if u0 is not None:
            u0 = u0 if is_array(u0) else _as_array(u0, "u0")
            sizes.append(("u0", _leading("u0", u0, _shape(prob.u0))))
        if p is not None:
            sizes.extend(_check_p(prob.p, p))
        size = sizes[0][1]
        for name, n in sizes[1:]:
            if n != size:
                raise InvalidProblemError(
                    f"{name} has {n} members (its leading axis) but {sizes[0][0]} "
                    f"has {size}. Every batched input needs the same leading axis, "
                    "one entry per member."
                )
        if size < 1:
            raise InvalidProblemError(
                f"{sizes[0][0]} has a leading axis of length 0: an ensemble needs "
                "at least one member."
            )
        _check_finite("u0", u0)
        for path, leaf in tree_paths(p):
            _check_finite(path, leaf)
        object.__setattr__(self, "prob", prob)
        object.__setattr__(self, "u0", u0)
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "size", size)
        # Member 0 as a problem: validates a member's values (finite, one
        # framework) and is the template the backend and dtype are read from.
        object.__setattr__(self, "_template", self.member(0))

    def member(self, i: int) -> ODEProblem:
        """Member `i` as its own `ODEProblem` (for a per-member `dk.solve`)."""
        return self.prob.remake(
            u0=self.prob.u0 if self.u0 is None else self.u0[i],
            p=self.prob.p if self.p is None else tree_map(_row(i), self.p),
        )

    @property
    def template(self) -> ODEProblem:
        """Member 0 as a problem: what the request is built from."""
        return self._template

    def __repr__(self) -> str:
        batched = [n for n, v in (("u0", self.u0), ("p", self.p)) if v is not None]
        return (
            f"EnsembleProblem({self.prob!r}, size={self.size}, batched="
            f"{'+'.join(batched)})"
        )


def _row(i: int) -> Callable[[Any], Any]:
    return lambda x: x if x is None else x[i]


def _as_array(x: Any, name: str) -> Any:
    try:
        arr = np.asarray(x)
    except ValueError:
        raise InvalidProblemError(
            f"{name} must be a rectangular array with the members on its leading "
            f"axis; got {name}={short(x)}."
        ) from None
    if arr.dtype.kind not in "iuf":
        raise InvalidProblemError(
            f"{name} must hold real numbers, not {arr.dtype}; got {name}={short(x)}."
        )
    return arr if arr.dtype.kind == "f" else arr.astype(np.float64)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if is_array(x) else np.shape(x)


def _leading(name: str, x: Any, member: tuple[int, ...]) -> int:
    shape = tuple(x.shape)
    if len(shape) != len(member) + 1 or shape[1:] != member:
        raise InvalidProblemError(
            f"{name} must have shape (B, *{member}) (members first, then the shape "
            f"it has in prob); got shape {shape}. Stack one entry per member along "
            "a new leading axis."
        )
    return shape[0]


def _check_p(template: Any, p: Any) -> list[tuple[str, int]]:
    ours, theirs = tree_paths(template), tree_paths(p)
    if [k for k, _ in ours] != [k for k, _ in theirs]:
        raise InvalidProblemError(
            "p must have the structure of prob.p (leaves "
            f"{listing(k for k, _ in ours)}) with a leading member axis on each "
            "leaf; got leaves "
            f"{listing(k for k, _ in theirs)}. Batch every leaf of prob.p, or batch "
            "none (p=None) and close over shared values."
        )
    out = []
    for (path, mine), (_, leaf) in zip(ours, theirs, strict=True):
        if mine is None and leaf is None:
            continue
        if leaf is None or mine is None or not is_array(leaf):
            raise InvalidProblemError(
                f"{path} of the ensemble's p must be an array of shape (B, "
                f"*{_shape(mine)}) matching prob.{path}; got {short(leaf)}."
            )
        out.append((path, _leading(path, leaf, _shape(mine))))
    return out


def _check_finite(name: str, x: Any) -> None:
    """Every member's values are finite (member 0's problem checks the rest)."""
    if x is None or not is_concrete(x):
        return
    values = to_numpy(x)
    if values.dtype.kind != "f":
        return
    bad = ~np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)
    if bad.any():
        raise InvalidProblemError(
            f"{name} must be finite; members {_members(np.flatnonzero(bad))} hold "
            "NaN or inf. Fix their values before solving."
        )


def _members(indices: Any, limit: int = 10) -> str:
    """`[3, 17, 40]`, or the first `limit` and how many more."""
    ids = [int(i) for i in indices]
    text = ", ".join(str(i) for i in ids[:limit])
    more = f", ... ({len(ids)} in all)" if len(ids) > limit else ""
    return f"[{text}{more}]"


def ensemble_request(
    ens: EnsembleProblem, alg: str, solve_kwargs: dict[str, Any]
) -> tuple[SolveRequest, dict[str, Any]]:
    """The member template's request, and the scale-out options to pass on."""
    options = {
        k: solve_kwargs.pop(k)
        for k in ("devices", "executor")
        if solve_kwargs.get(k) is not None
    }
    solve_kwargs.pop("devices", None)
    solve_kwargs.pop("executor", None)
    req = build_request(ens.template, alg, **solve_kwargs)
    offered = backends.SPECS[req.backend].capabilities.ensemble
    for name in options:
        if name not in offered:
            by = [
                b for b, s in backends.SPECS.items() if name in s.capabilities.ensemble
            ]
            raise UnsupportedError(
                f"{name}=... is not available for ensembles on backend="
                f"'{req.backend}'"
                + (f"; backends offering it: {listing(by)}." if by else ".")
            )
    return req, options


def solve_ensemble(
    ens: EnsembleProblem, alg: str, solve_kwargs: dict[str, Any]
) -> Solution:
    """`dk.solve` of an ensemble: one backend call for the whole batch."""
    req, options = ensemble_request(ens, alg, dict(solve_kwargs))
    backend = backends.load(req.backend)
    return backend.solve_ensemble(req, ens.u0, ens.p, ens.size, **options)


def vjp_ensemble(
    ens: EnsembleProblem, alg: str, solve_kwargs: dict[str, Any]
) -> tuple[SolveRequest, Solution, Any]:
    """`dk.vjp` of an ensemble: the request, the solution and the pullback."""
    req, options = ensemble_request(ens, alg, dict(solve_kwargs))
    backend = backends.load(req.backend)
    sol, pull = backend.vjp_ensemble(req, ens.u0, ens.p, ens.size, **options)
    return req, sol, pull
