"""`ODEProblem`: the problem a user writes once and solves on any backend."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from . import backends
from ._arrays import FLOAT_DTYPES, dtype_name, is_array, is_concrete, to_numpy
from ._errors import InvalidProblemError, invalid, listing, short

__all__ = ["ODEProblem", "check_rhs_output", "rhs_nonfinite_error"]

_UNSET: Any = object()


@dataclass(frozen=True, eq=False)
class ODEProblem:
    """An initial value problem ``du/dt = f(u, p, t)``, ``u(t0) = u0``.

    Parameters
    ----------
    f : callable
        ``f(u, p, t) -> du/dt``, out of place, returning an array of the shape and
        dtype of `u`. Write it once against the Array API standard (``xp =
        dk.array_namespace(u)``, then ``xp.exp``, ``xp.stack``, ``u[0]``, ...) and it
        runs unchanged on NumPy, PyTorch and JAX arrays.
    u0 : array-like
        The initial state, of any shape. Lists, NumPy, torch and JAX arrays are
        accepted; arrays keep their floating dtype, lists become the backend's
        default float.
    tspan : (t0, t1)
        Finite times with ``t0 != t1``; ``t1 < t0`` integrates backward.
    p : None, array or pytree, optional
        Parameters handed to `f` in the backend's array type with their structure
        (nested dict / list / tuple) intact. A list is a pytree: ``p=[1.5, 1.0]`` is
        two scalar parameters; pass ``np.array([1.5, 1.0])`` for one vector. On
        JAX, `p` may be any registered pytree (an ``equinox.Module``, a
        ``NamedTuple``, a registered dataclass, optax or flax structures), handed
        to `f` as it is: its arrays and numbers are the inputs, its other leaves
        (activation functions, flags) static. The arrays of one `p` belong to
        one framework (NumPy arrays and numbers go with any). On torch, a leaf
        may be a ``torch.nn.Module``, handed to `f` as it is (``f`` may call it);
        its parameters are the inputs of the gradients, its buffers ride along.
    jac : callable, optional
        ``jac(u, p, t) -> df/du`` of shape ``u.shape + u.shape``, used by implicit
        solvers instead of automatic differentiation.

    Raises
    ------
    InvalidProblemError
        If an argument is invalid; the message names it and says how to fix it.

    Notes
    -----
    The problem is immutable; `remake` returns a changed copy. Values that cannot
    be read now (JAX tracers under ``jax.jit``) are checked for shape only.

    Examples
    --------
    >>> import numpy as np, diffeqkit as dk
    >>> def decay(u, p, t):
    ...     return -p * u
    >>> prob = dk.ODEProblem(decay, np.array([1.0]), (0.0, 1.0), np.array(0.5))
    >>> prob.remake(p=np.array(2.0)).p
    array(2.)
    """

    f: Callable[..., Any]
    u0: Any
    tspan: tuple[Any, Any]
    p: Any = None
    jac: Callable[..., Any] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if not callable(self.f):
            raise invalid(
                "f", "must be a callable f(u, p, t)", self.f, "Pass a function."
            )
        if self.jac is not None and not callable(self.jac):
            raise invalid(
                "jac",
                "must be None or a callable jac(u, p, t)",
                self.jac,
                "Pass a function returning df/du, or leave jac=None.",
            )
        object.__setattr__(self, "tspan", _check_tspan(self.tspan))
        _check_u0(self.u0)
        _check_p(self.p)

    @property
    def t0(self) -> Any:
        return self.tspan[0]

    @property
    def t1(self) -> Any:
        return self.tspan[1]

    def remake(
        self,
        *,
        f: Callable[..., Any] = _UNSET,
        u0: Any = _UNSET,
        tspan: Any = _UNSET,
        p: Any = _UNSET,
        jac: Any = _UNSET,
    ) -> ODEProblem:
        """Return a new, validated problem with the given fields replaced.

        Examples
        --------
        >>> import numpy as np, diffeqkit as dk
        >>> prob = dk.ODEProblem(lambda u, p, t: -u, np.array([1.0]), (0.0, 1.0))
        >>> prob.remake(tspan=(0.0, 2.0)).tspan
        (0.0, 2.0)
        """

        def pick(new: Any, old: Any) -> Any:
            return old if new is _UNSET else new

        return ODEProblem(
            pick(f, self.f),
            pick(u0, self.u0),
            pick(tspan, self.tspan),
            pick(p, self.p),
            jac=pick(jac, self.jac),
        )

    def __repr__(self) -> str:
        name = getattr(self.f, "__name__", type(self.f).__name__)
        shape = tuple(self.u0.shape) if is_array(self.u0) else np.shape(self.u0)
        return f"ODEProblem(f={name}, u0 shape={shape}, tspan={self.tspan!r})"


def _check_tspan(tspan: Any) -> tuple[Any, Any]:
    fix = "Pass tspan=(t0, t1) with two finite numbers, e.g. tspan=(0.0, 10.0)."
    if isinstance(tspan, str | bytes) or not hasattr(tspan, "__len__"):
        raise invalid("tspan", "must be a pair (t0, t1)", tspan, fix)
    if len(tspan) != 2:
        raise invalid("tspan", f"must have 2 entries, not {len(tspan)}", tspan, fix)
    out = []
    for name, t in zip(("t0", "t1"), tspan, strict=True):
        if is_array(t) and not is_concrete(t):
            out.append(t)
            continue
        try:
            value = float(t)
        except (TypeError, ValueError):
            raise invalid(
                "tspan", f"must hold numbers, but {name} is not one", tspan, fix
            ) from None
        if isinstance(t, bool) or not math.isfinite(value):
            raise invalid("tspan", f"must be finite, but {name}={t!r}", tspan, fix)
        out.append(value)
    if all(isinstance(t, float) for t in out) and out[0] == out[1]:
        raise invalid(
            "tspan",
            "must have t0 != t1",
            tuple(out),
            "Pass an interval of non-zero length, e.g. tspan=(0.0, 10.0).",
        )
    return (out[0], out[1])


def _check_u0(u0: Any) -> None:
    fix = "Pass an array of finite floats, e.g. u0=[1.0, 0.0]."
    if u0 is None:
        raise invalid("u0", "is required", u0, fix)
    if is_array(u0):
        kind = dtype_name(u0.dtype)
        if kind not in FLOAT_DTYPES:
            raise invalid(
                "u0",
                f"must be a float32 or float64 array, not {kind}",
                u0,
                "Convert it first (e.g. u0.astype('float64')) or pass a list, "
                "which becomes the backend's default float.",
            )
        if is_concrete(u0) and not np.all(np.isfinite(to_numpy(u0))):
            raise invalid("u0", "must be finite (no NaN or inf)", u0, fix)
        return
    try:
        arr = np.asarray(u0)
    except ValueError:
        raise invalid("u0", "must be a rectangular array", u0, fix) from None
    if arr.dtype.kind not in "iuf":
        raise invalid("u0", f"must hold real numbers, not {arr.dtype}", u0, fix)
    if not np.all(np.isfinite(arr)):
        raise invalid("u0", "must be finite (no NaN or inf)", u0, fix)


def _check_p(p: Any) -> None:
    found = backends.params(p)
    _check_one_framework(found)
    for path, leaf, *_ in found:
        if leaf is None:
            continue
        if is_array(leaf):
            kind = dtype_name(leaf.dtype)
            numeric = kind.startswith(("float", "int", "uint", "bfloat"))
            if not numeric:
                raise InvalidProblemError(
                    f"{path} must be a real array; got dtype {kind}. "
                    "Parameters are real numbers or arrays of them."
                )
            if (
                kind.startswith(("float", "bfloat"))
                and is_concrete(leaf)
                and not np.all(np.isfinite(to_numpy(leaf)))
            ):
                raise InvalidProblemError(
                    f"{path} must be finite; it holds NaN or inf. Fix the parameter "
                    "values before solving."
                )
            continue
        if isinstance(leaf, bool) or not isinstance(leaf, int | float | np.number):
            raise InvalidProblemError(
                f"{path} must be a number or an array; got {short(leaf)}. p is None, "
                "an array, or a nested dict / list / tuple of arrays; pass other "
                "settings to f through a closure."
            )
        if not math.isfinite(float(leaf)):
            raise InvalidProblemError(
                f"{path} must be finite; got {leaf!r}. Fix the parameter values "
                "before solving."
            )


def _check_one_framework(found: list[Any]) -> None:
    """p's arrays, and the framework pytrees holding them, all belong to one
    framework; the first leaf of another one is named."""
    first: tuple[str, str] | None = None  # ("<path> is <what>", framework)
    for param in found:
        array = backends.framework(param._replace(owner=None))
        owner = param.owner
        if array and owner and array != owner:
            _mixed(
                f"{param.path} is a {array} array inside a {owner} pytree "
                f"(at {param.node})",
                array,
                owner,
            )
        kind = array or owner
        if kind is None:
            continue
        what = f"a {array} array" if array else f"inside a {owner} pytree"
        if first is None:
            first = (f"{param.path} is {what}", kind)
        elif kind != first[1]:
            _mixed(f"{param.path} is {what}, but {first[0]}", kind, first[1])


def _mixed(where: str, *kinds: str) -> NoReturn:
    raise InvalidProblemError(
        f"{where}: p mixes {listing(sorted(set(kinds)))}. A solve runs in one "
        "framework; convert every array of p to it (NumPy arrays and numbers go "
        "with any)."
    )


def check_rhs_output(du: Any, u0: Any, t0: Any) -> None:
    """Check `f(u0, p, t0)`: same shape and dtype as `u0`, finite values.

    Backends call this on their first evaluation of `f` so every backend words the
    error the same way. Lazy values (JAX tracers) are checked for shape and dtype.
    """
    if not is_array(du):
        raise InvalidProblemError(
            f"f(u0, p, t0) must return an array of the shape of u0 {tuple(u0.shape)}; "
            f"got {short(du)}. Return e.g. xp.stack([...]) built with "
            "xp = dk.array_namespace(u)."
        )
    if tuple(du.shape) != tuple(u0.shape):
        raise InvalidProblemError(
            f"f(u0, p, t0) returned shape {tuple(du.shape)} but u0 has shape "
            f"{tuple(u0.shape)}. f must return du/dt with the shape of u."
        )
    if dtype_name(du.dtype) != dtype_name(u0.dtype):
        raise InvalidProblemError(
            f"f(u0, p, t0) returned dtype {dtype_name(du.dtype)} but the state has "
            f"dtype {dtype_name(u0.dtype)}. Keep f's arithmetic in the state's dtype "
            "(check the dtype of constants and of p)."
        )
    if is_concrete(du) and not np.all(np.isfinite(to_numpy(du))):
        raise rhs_nonfinite_error(t0)


def rhs_nonfinite_error(t0: Any) -> InvalidProblemError:
    return InvalidProblemError(
        f"f(u0, p, t0) is not finite at t0={t0!r} (NaN or inf). Check u0, p and f "
        "near the initial time."
    )
