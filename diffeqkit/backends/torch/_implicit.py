"""Rosenbrock methods on torch: adaptive, L-stable, for stiff problems.

Requirements met here:

- ``rosenbrock23`` is Shampine & Reichelt's method (MATLAB's ``ode23s``): order
  2, L-stable, an embedded order-3 error estimate, one Jacobian and one LU
  factorisation of ``W = I - h d J`` (``d = 1/(2 + sqrt(2))``) per step, two
  evaluations of ``f`` (the last one FSAL), and its own order-2 dense output.
- ``J = df/du`` and ``T = df/dt`` at the step start come from ``torch.func``
  (one ``jacrev`` over ``(t, u)``: one evaluation and ``n`` batched reverse
  passes; ``jacfwd`` measured 3-4x slower, torch's forward-mode AD of small ops
  being slow), or ``J`` from ``prob.jac`` and ``T`` from one ``torch.func.jvp`` when the
  user gave ``jac``. ``T`` is what keeps the order on non-autonomous problems.
  Both are differentiable functions of ``(u, p)`` in the surrounding autograd
  graph, so a gradient through the steps (`ReverseThroughSolver`) is the exact
  derivative of the discrete solution, ``dJ/dp`` included.
- The solver classes subclass `_solve._AdaptiveRK`, so they are ordinary
  torchdiffeq solvers (registered as ``"diffeqkit_<alg>"``) with the same step
  counting, clean stops (max_steps, underflowing step, non-finite state), first
  step selection and recorder callbacks; only the step attempt (`_attempt`) is
  theirs: torchdiffeq's controller (``_optimal_step_size``, under ``no_grad``)
  with exponent ``1/3``, the landing on ``step_t``, and its accept/reject
  bookkeeping, repeated op for op around a Rosenbrock step.
- One step is a pure function (`_ros23_step`) shared by the solver and the
  replay's `stepper`: the replay repeats the recorded steps bit for bit and runs
  under ``torch.func.vmap``/``jvp`` (ForwardMode), ``jacrev`` and the LU nested
  inside.
- ``n_implicit`` (a solver option): only the first ``n_implicit`` components of
  the flattened state are solved implicitly; the rest are *quadratures*, whose
  derivative may depend on the implicit part but never feeds back (the
  parameter gradients of an adjoint solve). Their block of ``W`` is the
  identity and their stage values follow from one matrix product, so a
  backward adjoint solve factorises an ``n x n`` matrix whatever the number of
  parameters (see `_interpolating`).
- Stats: ``njev`` Jacobians and ``nlu`` LU factorisations (one each per step
  attempt); the ``f`` evaluations inside the Jacobian are not in ``nfev``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, cast

import torch
from torchdiffeq._impl.misc import _compute_error_ratio, _optimal_step_size
from torchdiffeq._impl.rk_common import _ButcherTableau, _RungeKuttaState

from ._solve import Lift, Stepper, _AdaptiveRK, fsal_stepper, no_lift

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
        with warnings.catch_warnings():
            # torch loads its forward-AD decompositions on the first jvp of a
            # process by torch.jit.script, which warns that it is deprecated
            # (torch's business; see `_forward._quiet_jit`).
            warnings.filterwarnings(
                "ignore", "`torch.jit.script` is deprecated", DeprecationWarning
            )
            T = torch.func.jvp(lambda t: field(t, head), (t0,), (torch.ones_like(t0),))[
                1
            ]
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
# The solver class.
# ---------------------------------------------------------------------------------


def _no_tableau(
    dtype: torch.dtype, device: torch.device
) -> tuple[_ButcherTableau, torch.Tensor]:
    """What torchdiffeq's constructor moves to the device: nothing to speak of."""
    empty = torch.zeros(0, dtype=dtype, device=device)
    return _ButcherTableau(alpha=empty, beta=[], c_sol=empty, c_error=empty), empty


class _Rosenbrock(_AdaptiveRK):
    """An adaptive Rosenbrock method (see the module docstring).

    Options beyond `_AdaptiveRK`'s: ``n_implicit`` (None: every component is
    implicit). torchdiffeq's ``jump_t`` is not supported (diffeqkit never
    passes it).
    """

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
        if options.get("jump_t") is not None:
            raise ValueError(f"diffeqkit_{self.alg} does not support jump_t")
        super().__init__(func, y0, rtol, atol, **options)
        self.n_implicit = n_implicit
        self.njev = 0
        self.nlu = 0
        self.constants = _ros23_constants(y0.dtype, y0.device, no_lift)

    @classmethod
    def _tables(
        cls, dtype: torch.dtype, device: torch.device
    ) -> tuple[_ButcherTableau, torch.Tensor]:
        return _no_tableau(dtype, device)

    def _attempt(self, rk_state: Any) -> Any:
        """One step attempt: torchdiffeq's ``_adaptive_step`` with a Rosenbrock
        step in place of its Runge-Kutta one."""
        y0, f0, _, t0, dt, interp_coeff = rk_state
        dt = dt.clamp(self.min_step, self.max_step)
        self.func.callback_step(t0, y0, dt)
        t1 = t0 + dt
        on_step_t = False
        # Set by torchdiffeq's _before_integrate (possibly empty).
        step_t = cast("torch.Tensor", self.step_t)
        if len(step_t):
            next_step_t = step_t[self.next_step_index]
            on_step_t = bool(t0 < next_step_t < t0 + dt)
            if on_step_t:
                t1 = next_step_t
                dt = t1 - t0
        y1, f1, error, coeffs = _ros23_step(
            self.func, y0, f0, t0, dt, t1, self.constants, self.n_implicit
        )
        self.njev += 1
        self.nlu += 1
        error_ratio = _compute_error_ratio(
            error, self.rtol, self.atol, y0, y1, self.norm
        )
        accept = bool(error_ratio <= 1)
        if accept:
            self.func.callback_accept_step(t0, y0, dt)
            if on_step_t and self.next_step_index != len(step_t) - 1:
                self.next_step_index += 1
            t_next, y_next, f_next, interp_coeff = t1, y1, f1, coeffs
        else:
            self.func.callback_reject_step(t0, y0, dt)
            t_next, y_next, f_next = t0, y0, f0
        dt_next = _optimal_step_size(
            dt, error_ratio, self.safety, self.ifactor, self.dfactor, self.order
        ).clamp(self.min_step, self.max_step)
        return _RungeKuttaState(y_next, f_next, t0, t_next, dt_next, interp_coeff)

    @classmethod
    def stepper(
        cls, dtype: torch.dtype, device: torch.device, lift: Lift = no_lift
    ) -> Stepper:
        """One step as a pure function (see `_solve.Stepper`), for replays."""
        constants = _ros23_constants(dtype, device, lift)

        def advance(
            func: Any, y0: torch.Tensor, f0: torch.Tensor, t0: Any, dt: Any, t1: Any
        ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
            y1, f1, _, coeffs = _ros23_step(
                func, y0, f0, t0, dt, t1, constants, estimate=False
            )
            return y1, f1, coeffs

        return fsal_stepper(advance)


class _Rosenbrock23(_Rosenbrock):
    alg = "rosenbrock23"
    # torchdiffeq's controller exponent is 1/order: the error estimate is O(h^3).
    order = 3


# The implicit algs this backend offers, in the registry's order.
IMPLICIT_SOLVERS: dict[str, type[_Rosenbrock]] = {"rosenbrock23": _Rosenbrock23}
