"""Rosenbrock methods on torch: adaptive, L-stable, for stiff problems.

``rosenbrock23`` is Shampine & Reichelt's method (MATLAB's ``ode23s``): order 2,
an embedded order-3 error estimate, its own order-2 dense output. ``rodas4`` is
Hairer & Wanner's RODAS (`diffeqkit._rosenbrock`): order 4, an embedded order-3
estimate, stiffly accurate, with RODAS's own continuous extension of order 3
(built from the stages, so it stays accurate on stiff components, where a
Hermite interpolant through ``f`` does not). Each takes one
Jacobian (``torch.func.jacrev``, or ``prob.jac``) and one LU factorisation per
step. The driver is `_rk.AdaptiveRK`'s; only the trial step is Rosenbrock's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch

from ..._rosenbrock import ROSENBROCK_TABLEAUX, RosenbrockTableau
from ._rk import AdaptiveRK, Lift, Stepper, fsal_stepper, no_lift

__all__ = ["IMPLICIT_SOLVERS"]


class _Linear(NamedTuple):
    """The linearisation at a step start: ``T = df/dt`` and ``W = I - g J``
    factorised (``g`` = gamma * h), with quadrature rows ``J_q`` (or None)."""

    T: torch.Tensor
    lu: torch.Tensor
    pivots: torch.Tensor
    jq: torch.Tensor | None
    g: torch.Tensor

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        """``W^{-1} r``, `r` of the state's shape."""
        flat = r.reshape(-1)
        ni = self.lu.shape[-1]
        x = torch.linalg.lu_solve(self.lu, self.pivots, flat[:ni, None])[:, 0]
        if self.jq is not None:
            # Quadrature rows of W are [-g J_q, I]: x_q = r_q + g J_q x_i.
            x = torch.cat([x, flat[ni:] + self.g * (self.jq @ x)])
        return x.reshape(r.shape)


def _linearise(
    func: Any, t0: torch.Tensor, y0: torch.Tensor, g: torch.Tensor, n_implicit: Any
) -> _Linear:
    """`_Linear` of `func` at ``(t0, y0)``: ``prob.jac`` when `func` carries one
    (diffeqkit's `_Rhs`), else ``torch.func.jacrev`` of `func` itself."""
    shape, n = y0.shape, y0.numel()
    ni = n if n_implicit is None else n_implicit
    # The uncounted evaluation, without _Rhs's cached first value.
    raw = getattr(func, "raw", func)
    flat = y0.reshape(-1)
    head, tail = flat[:ni], flat[ni:]

    def field(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = z if ni == n else torch.cat([z, tail])
        return raw(t, y.reshape(shape)).reshape(-1)

    if ni == n and getattr(func, "jac", None) is not None:
        jac = func.jacobian(t0, y0)

        def time_derivative() -> torch.Tensor:
            return torch.func.jvp(
                lambda t: field(t, head), (t0,), (torch.ones_like(t0),)
            )[1]

        if torch.compiler.is_compiling():  # the engine filters the warning itself
            T = time_derivative()
        else:
            with warnings.catch_warnings():
                # torch loads its forward-AD decompositions on the first jvp of a
                # process by torch.jit.script, which warns that it is deprecated
                # (torch's business; see `_forward._quiet_jit`).
                warnings.filterwarnings(
                    "ignore", "`torch.jit.script` is deprecated", DeprecationWarning
                )
                T = time_derivative()
    else:
        T, jac = torch.func.jacrev(field, argnums=(0, 1))(t0, head)
    T = T.to(y0.dtype).reshape(shape)
    eye = torch.eye(ni, dtype=y0.dtype, device=y0.device)
    lu, pivots = torch.linalg.lu_factor(eye - g * jac[:ni])
    return _Linear(T, lu, pivots, jac[ni:] if ni < n else None, g)


# ---------------------------------------------------------------------------------
# rosenbrock23 (Shampine & Reichelt 1997, "The MATLAB ODE Suite", SIAM J. Sci.
# Comput. 18(1), section 2.1: ode23s).
# ---------------------------------------------------------------------------------

_D = 1.0 / (2.0 + math.sqrt(2.0))
_E32 = 6.0 + math.sqrt(2.0)


class _Ros23Constants(NamedTuple):
    d: Any
    e32: Any
    half: Any
    two: Any
    sixth: Any
    # Dense output y(t0 + s h) = y0 + s c1 + s^2 c2 (ode23s's ntrp23s):
    # c1 = h (k1 - 2 d k2) / (1 - 2 d), c2 = h (k2 - k1) / (1 - 2 d).
    w: Any
    w2d: Any


def _ros23_constants(
    dtype: torch.dtype, device: torch.device, lift: Lift
) -> _Ros23Constants:
    values = (_D, _E32, 0.5, 2.0, 1.0 / 6.0, 1.0 / (1.0 - 2.0 * _D))
    d, e32, half, two, sixth, w = (
        lift(torch.tensor(v, dtype=dtype, device=device)) for v in values
    )
    return _Ros23Constants(d, e32, half, two, sixth, w, w * two * d)


def _ros23_step(
    func: Any,
    y0: torch.Tensor,
    f0: torch.Tensor,
    t0: torch.Tensor,
    dt: torch.Tensor,
    t1: torch.Tensor,
    c: _Ros23Constants,
    n_implicit: int | None = None,
    estimate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """One ode23s step: ``(y1, f(t1, y1), error estimate or None, dense
    coefficients)``."""
    h = dt.to(y0.dtype)
    hd = h * c.d
    lin = _linearise(func, t0, y0, hd, n_implicit)
    k1 = lin.solve(f0 + hd * lin.T)
    f1 = func(t0 + c.half.to(dt.dtype) * dt, y0 + (c.half * h) * k1)
    k2 = lin.solve(f1 - k1) + k1
    y1 = y0 + h * k2
    f2 = func(t1, y1)
    error = None
    if estimate:
        # The order-3 companion y0 + h (k1 + 4 k2 + k3) / 6 minus y1. Its T term
        # is h d T, as in ode23s: with J = 0 that companion is Simpson's rule
        # only then (checked by a convergence test on a non-autonomous problem).
        k3 = lin.solve(f2 - c.e32 * (k2 - f1) - c.two * (k1 - f0) + hd * lin.T)
        error = (h * c.sixth) * (k1 - c.two * k2 + k3)
    coeffs = [y0, (h * c.w) * k1 - (h * c.w2d) * k2, (h * c.w) * (k2 - k1)]
    return y1, f2, error, coeffs


# ---------------------------------------------------------------------------------
# rodas4 and other tableaux of `diffeqkit._rosenbrock` (Hairer & Wanner's form).
# ---------------------------------------------------------------------------------


class _Stage(NamedTuple):
    """Stage ``i`` of a transformed Rosenbrock tableau, its zero terms dropped:
    ``(j, a_ij)``, ``(j, C_ij)``, ``c_i`` (None: at ``t0``; 1: at ``t1``) and
    ``d_i`` (None when zero)."""

    a: list[tuple[int, Any]]
    C: list[tuple[int, Any]]
    c: Any
    d: Any


class _RodasConstants(NamedTuple):
    gamma: Any
    stages: list[_Stage]
    m: list[tuple[int, Any]]
    # The stage whose argument is the embedded solution, if one is (then y1 is
    # that argument plus the last u and the error estimate is that u).
    embedded_stage: int | None
    # The tableau's continuous extension (`RosenbrockTableau.dense`): the
    # nonzero terms of D_2 and D_3, or None. Written as a polynomial in x,
    # y0 + x (dy + D_2) + x^2 (D_3 - D_2) - x^3 D_3 (dy = y1 - y0).
    dense: tuple[list[tuple[int, Any]], list[tuple[int, Any]]] | None
    # Else cubic Hermite: y0 + x h f0 + x^2 (3 dy - h (2 f0 + f1))
    # + x^3 (h (f0 + f1) - 2 dy).
    two: Any
    three: Any


def _rodas_constants(
    tab: RosenbrockTableau, dtype: torch.dtype, device: torch.device, lift: Lift
) -> _RodasConstants:
    def value(x: float) -> Any:
        return lift(torch.tensor(x, dtype=dtype, device=device))

    def terms(row: tuple[float, ...]) -> list[tuple[int, Any]]:
        return [(j, value(x)) for j, x in enumerate(row) if x != 0.0]

    stages = [
        _Stage(
            terms(tab.a[i]),
            terms(tab.C[i]),
            None if i == 0 else (1.0 if tab.c[i] == 1.0 else value(tab.c[i])),
            None if tab.d[i] == 0.0 else value(tab.d[i]),
        )
        for i in range(tab.n_stages)
    ]
    s = tab.n_stages
    last = tab.a[s - 1]
    embedded = (
        s - 1
        if tab.m_hat[s - 1] == 0.0
        and tuple(tab.m_hat[: s - 1]) == tuple(last)
        and tab.m[s - 1] == 1.0
        and tuple(tab.m[: s - 1]) == tuple(last)
        else None
    )
    dense = None if tab.dense is None else (terms(tab.dense[0]), terms(tab.dense[1]))
    return _RodasConstants(
        value(tab.gamma),
        stages,
        terms(tab.m),
        embedded,
        dense,
        value(2.0),
        value(3.0),
    )


def _combination(terms: list[tuple[int, Any]], us: list[torch.Tensor]) -> torch.Tensor:
    """``sum_j w_j us[j]`` over `terms` ``[(j, w_j), ...]`` (at least one)."""
    total = terms[0][1] * us[terms[0][0]]
    for j, w in terms[1:]:
        total = total + w * us[j]
    return total


def rodas_dense(
    c: _RodasConstants,
    y0: torch.Tensor,
    y1: torch.Tensor,
    f0: torch.Tensor,
    f1: torch.Tensor,
    h: torch.Tensor,
    us: list[torch.Tensor],
) -> list[torch.Tensor]:
    """The dense-output coefficients ``[y0, c_1, c_2, c_3]`` of a step (powers of
    ``x = (t - t0) / h``): the tableau's continuous extension, or cubic Hermite."""
    dy = y1 - y0
    if c.dense is not None:
        d2 = _combination(c.dense[0], us)
        d3 = _combination(c.dense[1], us)
        return [y0, dy + d2, d3 - d2, -d3]
    hf0, hf1 = h * f0, h * f1
    return [y0, hf0, c.three * dy - c.two * hf0 - hf1, hf0 + hf1 - c.two * dy]


def _rodas_step(
    func: Any,
    y0: torch.Tensor,
    f0: torch.Tensor,
    t0: torch.Tensor,
    dt: torch.Tensor,
    t1: torch.Tensor,
    c: _RodasConstants,
    n_implicit: int | None = None,
    estimate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """One step of a transformed Rosenbrock tableau: ``(y1, f(t1, y1), error
    estimate or None, dense coefficients)``. With ``g = gamma h`` and ``W = I -
    g J``, each ``u_i = g W^-1 (f_i + sum_j C_ij u_j / h + h d_i T)``."""
    h = dt.to(y0.dtype)
    g = h * c.gamma
    lin = _linearise(func, t0, y0, g, n_implicit)
    us: list[torch.Tensor] = []
    arg = y0
    for i, stage in enumerate(c.stages):
        if i == 0:
            fi = f0
        else:
            arg = y0
            for j, a in stage.a:
                arg = arg + a * us[j]
            at_end = isinstance(stage.c, float)
            fi = func(t1 if at_end else t0 + stage.c.to(dt.dtype) * dt, arg)
        r = fi
        if stage.C:
            extra = stage.C[0][1] * us[stage.C[0][0]]
            for j, cij in stage.C[1:]:
                extra = extra + cij * us[j]
            r = r + extra / h
        if stage.d is not None:
            r = r + (h * stage.d) * lin.T
        us.append(g * lin.solve(r))
    if c.embedded_stage is not None:
        y1 = arg + us[-1]
    else:
        y1 = y0
        for j, mj in c.m:
            y1 = y1 + mj * us[j]
    f1 = func(t1, y1)
    error = us[-1] if estimate else None
    return y1, f1, error, rodas_dense(c, y0, y1, f0, f1, h, us)


# ---------------------------------------------------------------------------------
# The solver class.
# ---------------------------------------------------------------------------------


class _Rosenbrock(AdaptiveRK):
    """An adaptive Rosenbrock method: `AdaptiveRK`'s controller around a
    Rosenbrock trial step. ``n_implicit`` (None: every component): only the first
    ``n_implicit`` components of the flattened state are solved implicitly; the
    rest are quadratures (their block of ``W`` is the identity), as the parameter
    gradients of an adjoint solve are. Counts ``njev`` and ``nlu``."""

    def __init__(
        self,
        func: Any,
        y0: torch.Tensor,
        rtol: Any,
        atol: Any,
        *,
        n_implicit: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(func, y0, rtol, atol, **options)
        self.n_implicit = n_implicit
        self.njev = 0
        self.nlu = 0

    @staticmethod
    def _constants(dtype: torch.dtype, device: torch.device, lift: Lift) -> Any:
        return _ros23_constants(dtype, device, lift)

    _step_fn: ClassVar[Callable[..., Any]] = staticmethod(_ros23_step)

    def _prepare(self, dtype: torch.dtype, device: torch.device) -> None:
        self.constants = self._constants(dtype, device, no_lift)

    def _trial(
        self,
        y0: torch.Tensor,
        f0: torch.Tensor,
        t0: torch.Tensor,
        dt: torch.Tensor,
        t1: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[], list[Any]]]:
        y1, f1, error, coeffs = type(self)._step_fn(
            self.func, y0, f0, t0, dt, t1, self.constants, self.n_implicit
        )
        self.njev += 1
        self.nlu += 1
        if error is None:  # pragma: no cover - asked for
            raise RuntimeError("no error estimate")
        return y1, f1, error, lambda: coeffs

    @classmethod
    def stepper(
        cls, dtype: torch.dtype, device: torch.device, lift: Lift = no_lift
    ) -> Stepper:
        """One step as a pure function (see `_rk.Stepper`), for replays."""
        constants = cls._constants(dtype, device, lift)
        step_fn = cls._step_fn

        def advance(
            func: Any, y0: torch.Tensor, f0: torch.Tensor, t0: Any, dt: Any, t1: Any
        ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
            y1, f1, _, coeffs = step_fn(
                func, y0, f0, t0, dt, t1, constants, estimate=False
            )
            return y1, f1, coeffs

        return fsal_stepper(advance)


class _Rosenbrock23(_Rosenbrock):
    alg = "rosenbrock23"
    # The controller's exponent is 1/order: the error estimate is O(h^3).
    order = 3


class _Rodas4(_Rosenbrock):
    alg = "rodas4"
    # The error estimate (y1 - y1_hat, y1_hat of order 3) is O(h^4).
    order = 4
    _step_fn = staticmethod(_rodas_step)

    @staticmethod
    def _constants(dtype: torch.dtype, device: torch.device, lift: Lift) -> Any:
        return _rodas_constants(ROSENBROCK_TABLEAUX["rodas4"], dtype, device, lift)


# The implicit algs this backend offers, in the registry's order.
IMPLICIT_SOLVERS: dict[str, type[_Rosenbrock]] = {
    "rosenbrock23": _Rosenbrock23,
    "rodas4": _Rodas4,
}
