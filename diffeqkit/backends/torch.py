"""The PyTorch backend: diffeqkit's explicit methods on torchdiffeq's own machinery.

Requirements met here:

- Every method is built from the shared Butcher tableaux (`diffeqkit._tableaux`), so
  all backends step with the same coefficients. The adaptive ones (bosh3, dopri5,
  tsit5, dopri8) subclass torchdiffeq's `RKAdaptiveStepsizeODESolver` (its stepper,
  error norm and step-size controller); the fixed-step ones (euler, midpoint, heun,
  rk4 -- the classical method, not torchdiffeq's 3/8 rule) subclass
  `FixedGridODESolver` and step on `diffeqkit._saveat.step_grid`, so saved values
  are step values.
- Save values of adaptive methods come from the tableau's own dense output ``p``
  (the one SciPy uses), of the tableau's ``dense_order``: torchdiffeq's quartic
  fit through a midpoint is order 4 (and, for its bosh3, far less accurate than
  the step values); torchdiffeq has no tsit5. For dopri8 the shared ``p`` is of
  order 5 only, so between steps dopri8 is less accurate than at step ends.
- The solver classes are ordinary torchdiffeq solvers, registered in torchdiffeq's
  ``SOLVERS`` as ``"diffeqkit_<alg>"`` (new, namespaced keys; nothing of
  torchdiffeq's own changes), so ``torchdiffeq.odeint`` and ``odeint_adjoint`` run
  them as they are, with ``options={"step_size": dt0}`` (fixed step) or
  ``{"first_step": dt0, "max_steps": n, "step_t": [t1]}`` (adaptive), as `solve`
  does. `solve` drives them directly (``_before_integrate`` / ``_advance``, or
  ``integrate``) to stop cleanly after ``max_steps`` steps, to tell a step size
  that underflows from a non-finite state, and to return partial solutions --
  torchdiffeq itself only asserts on those.
- Backward integration (``t1 < t0``) negates time, exactly as ``odeint`` does.
  The last step lands on ``t1`` (torchdiffeq's ``step_t``) rather than stepping
  past it and interpolating back, so ``f`` is never evaluated beyond ``t1``.
- The user's ``f(u, p, t)`` sees ``u`` of ``u0``'s shape, ``p`` converted leaf by
  leaf (torch tensors used as they are, so autograd flows), and ``t`` a 0-d tensor
  in the state's dtype. Its first evaluation at ``t0`` is checked by
  `check_rhs_output` and reused as the solver's first evaluation.
- dtype: lists -> ``torch.get_default_dtype()``, arrays keep theirs, ``dtype=``
  casts. device: the named one, else u0's, else that of p's tensors, else
  ``torch.get_default_device()``; an unavailable CUDA device raises
  `UnsupportedError`. Nothing global of torch is changed.
- Overhead: per call, a handful of tensor conversions; per step, torchdiffeq's own
  work plus a step counter and one underflow check. Tableau tensors are built once
  per (method, dtype, device) and cached.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from torchdiffeq._impl.misc import _null_callback, _rms_norm
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver, _ButcherTableau
from torchdiffeq._impl.solvers import FixedGridODESolver

from .._algs import ALGS
from .._arrays import dtype_name, to_numpy
from .._errors import listing, unavailable_device
from .._problem import check_rhs_output
from .._pytree import leaves
from .._saveat import step_grid
from .._solution import Solution
from .._tableaux import get_tableau
from ._protocol import SolveRequest, conclude

__all__ = ["BACKEND", "TorchBackend"]

_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
}
# torchdiffeq's own default for max_num_steps: effectively no limit.
_NO_LIMIT = 2**31 - 1


class _StoppedError(RuntimeError):
    """The integration cannot go on; `status` is a diffeqkit status name."""

    def __init__(self, status: str, alg: str, t: float) -> None:
        super().__init__(f"diffeqkit_{alg}: integration stopped at t={t:.6g}: {status}")
        self.status = status
        self.t = t


# ---------------------------------------------------------------------------------
# Tableaux as torch tensors, cached per (alg, dtype, device).
# ---------------------------------------------------------------------------------


# Nonzero weights of a linear combination of stages: ((stage index, weight), ...).
_Combination = tuple[tuple[int, float], ...]


@functools.cache
def _adaptive_tableau(
    alg: str, dtype: torch.dtype, device: torch.device
) -> tuple[_ButcherTableau, torch.Tensor]:
    """torchdiffeq's tableau and the dense-output matrix ``p`` of an adaptive alg.

    torchdiffeq's stages are ours with the row ``K[s] = f(t + h, y1)`` appended as
    a last stage at ``c = 1`` with weights ``b``; it recognises that row (``c_sol``
    = ``b`` padded with 0) and reuses it as the next step's first stage, so its
    ``k`` is exactly SciPy's ``K`` (``s + 1`` rows) and ``e`` applies unchanged.
    """
    tab = get_tableau(_tableau_name(alg))
    if tab.e is None:
        raise ValueError(f"{alg}: an adaptive method needs error coefficients e")

    def tensor(x: Any) -> torch.Tensor:
        return _tensor(x, dtype, device)

    s = tab.n_stages
    rows = [tab.a[i, :i] for i in range(1, s)]
    tableau = _ButcherTableau(
        alpha=tensor([*tab.c[1:], 1.0]),
        beta=[tensor(row) for row in [*rows, tab.b]],
        c_sol=tensor([*tab.b, 0.0]),
        c_error=tensor(tab.e),
    )
    return tableau, tensor(tab.p)


@functools.cache
def _fixed_tableau(
    alg: str,
) -> tuple[tuple[tuple[float, _Combination], ...], _Combination]:
    """The stages ``(c_i, a[i, :i])`` and weights ``b`` of a fixed-step alg, with
    the zero coefficients dropped, as Python floats (cheapest to apply per step)."""
    tab = get_tableau(_tableau_name(alg))
    stages = tuple(
        (float(tab.c[i]), _nonzero(tab.a[i, :i])) for i in range(1, tab.n_stages)
    )
    return stages, _nonzero(tab.b)


def _nonzero(weights: np.ndarray) -> _Combination:
    return tuple((j, float(w)) for j, w in enumerate(weights) if w != 0.0)


def _combine(weights: _Combination, ks: list[torch.Tensor]) -> torch.Tensor:
    """``sum_j w_j * ks[j]`` over the nonzero weights."""
    terms = [ks[j] if w == 1.0 else w * ks[j] for j, w in weights]
    return functools.reduce(torch.add, terms)


def _tableau_name(alg: str) -> str:
    name = ALGS[alg].tableau
    if name is None:
        raise ValueError(f"{alg} is not built from a shared tableau")
    return name


# ---------------------------------------------------------------------------------
# The vector field as torchdiffeq calls it.
# ---------------------------------------------------------------------------------


class _Rhs:
    """torchdiffeq's ``func(t, y)`` over the user's ``f(u, p, t)``, counting calls.

    ``first``, when given, is ``f`` already evaluated at ``(t0, u0)``: both
    torchdiffeq solvers evaluate there first, so the first call returns it instead
    of evaluating ``f`` again (and counts it: the solver uses that evaluation).
    ``perturb`` (torchdiffeq's nudge of ``t`` by one ulp around jumps) is ignored:
    diffeqkit has no jump times, and ``f`` sees the exact stage times, as on the
    other backends.
    """

    def __init__(
        self, f: Callable[..., Any], p: Any, dtype: torch.dtype, first: Any = None
    ) -> None:
        self.f = f
        self.p = p
        self.dtype = dtype
        self.nfev = 0
        self._first = first
        # torchdiffeq calls these hooks; its own no-op object, so that odeint's
        # _check_inputs also sees "no callback" when handed this object.
        self.callback_step = _null_callback
        self.callback_accept_step = _null_callback
        self.callback_reject_step = _null_callback

    def __call__(self, t: torch.Tensor, y: torch.Tensor, perturb: Any = None) -> Any:
        self.nfev += 1
        first = self._first
        if first is not None:
            self._first = None
            return first
        return self.f(y, self.p, t.to(self.dtype))


def _reversed(f: Callable[..., Any]) -> Callable[..., Any]:
    """``f`` in negated time ``s = -t`` (``du/ds = -f(u, p, -s)``), as odeint does."""

    def f_reversed(u: Any, p: Any, s: Any) -> Any:
        return -f(u, p, -s)

    return f_reversed


# ---------------------------------------------------------------------------------
# The solver classes.
# ---------------------------------------------------------------------------------


class _Run(NamedTuple):
    """A driven solve: the state at `times` (NaN where not reached) and outcome."""

    u: torch.Tensor
    status: str
    t_reached: float | None  # solver time where it stopped; None on success
    naccept: int
    nreject: int


class _AdaptiveRK(RKAdaptiveStepsizeODESolver):
    """An adaptive explicit Runge-Kutta method of the shared tableaux.

    torchdiffeq's stepper and step-size controller with three changes: the
    tableau comes from `diffeqkit._tableaux`; the interpolant is the tableau's
    dense output; steps are counted (``nsteps``, ``naccept``), and more than
    ``max_steps`` steps, an underflowing step size or a non-finite state raise
    `_StoppedError` (torchdiffeq asserts on the latter two, or loops forever under
    ``python -O``).
    """

    alg: str

    def __init__(
        self,
        func: Any,
        y0: torch.Tensor,
        rtol: Any,
        atol: Any,
        *,
        max_steps: int = _NO_LIMIT,
        **options: Any,
    ) -> None:
        # Set before torchdiffeq's __init__, whose .to(dtype, device) of the tableau
        # and of `mid` then returns these very tensors. `mid` is its midpoint
        # weights; here it carries the dense-output matrix p instead.
        self.tableau, self.mid = _adaptive_tableau(self.alg, y0.dtype, y0.device)
        options.setdefault("norm", _rms_norm)
        super().__init__(func, y0, rtol, atol, **options)
        self.max_steps = max_steps
        self.nsteps = 0
        self.naccept = 0

    def _adaptive_step(self, rk_state: Any) -> Any:
        t, dt = rk_state.t1, rk_state.dt
        if self.nsteps >= self.max_steps:
            raise _StoppedError("max_steps_reached", self.alg, float(t.detach()))
        # False for a NaN, zero or underflowing step alike; only then do we look
        # closer. torchdiffeq's own check is an assert (gone under python -O).
        if not bool(t + dt > t):
            raise _StoppedError(self._failure(rk_state), self.alg, float(t.detach()))
        self.nsteps += 1
        try:
            new = super()._adaptive_step(rk_state)
        except AssertionError as err:  # torchdiffeq's checks of y and dt
            raise _StoppedError(
                self._failure(rk_state), self.alg, float(t.detach())
            ) from err
        # A rejected step hands back the very same end time tensor.
        if new.t1 is not t:
            self.naccept += 1
        return new

    @staticmethod
    def _failure(rk_state: Any) -> str:
        finite = bool(torch.isfinite(rk_state.dt)) and bool(
            torch.isfinite(rk_state.y1).all()
        )
        return "step_size_too_small" if finite else "nonfinite"

    def _interp_fit(
        self, y0: torch.Tensor, y1: torch.Tensor, k: torch.Tensor, dt: torch.Tensor
    ) -> list[torch.Tensor]:
        """Coefficients of ``y(t0 + x h) = y0 + sum_j c_j x^j`` from the tableau's
        dense output, in the form torchdiffeq's `_interp_evaluate` reads."""
        # k: (*shape, s + 1), the stages K; mid: p, (s + 1, q).
        coeffs = torch.matmul(k, self.mid) * dt.type_as(y0)
        return [y0, *coeffs.unbind(-1)]

    @classmethod
    def run(
        cls, rhs: _Rhs, y0: torch.Tensor, times: torch.Tensor, req: SolveRequest
    ) -> _Run:
        """Integrate through `times` (``times[0]`` is t0, ``times[-1]`` t1),
        stopping cleanly."""
        solver = cls(
            rhs,
            y0,
            req.rtol,
            req.atol,
            first_step=req.dt0,
            max_steps=req.max_steps,
            # The last step lands on t1 instead of overshooting it and
            # interpolating back: f is never evaluated beyond t1 (where it may be
            # undefined) and u(t1) is a step value, as on the other backends.
            # Where the dense output is weaker than the steps (dopri8), every
            # save time is a step end.
            step_t=times[1:] if req.land_on_saves else times[-1:],
        )
        solver._before_integrate(times)
        rows = [y0]
        status, reached = "success", None
        try:
            for t in times[1:]:
                rows.append(solver._advance(t))
        except _StoppedError as stop:
            status, reached = stop.status, stop.t
            nan = torch.full_like(y0, math.nan)
            rows.extend([nan] * (times.shape[0] - len(rows)))
        return _Run(
            torch.stack(rows),
            status,
            reached,
            solver.naccept,
            solver.nsteps - solver.naccept,
        )


class _FixedRK(FixedGridODESolver):
    """A fixed-step explicit Runge-Kutta method of the shared tableaux.

    torchdiffeq's grid stepper; the grid is `diffeqkit._saveat.step_grid` (``t0 +
    k*dt0`` merged with the save times), also when run by ``odeint`` with
    ``options={"step_size": dt0}``, so every save time is a step end.
    """

    alg: str

    def __init__(self, func: Any, y0: torch.Tensor, **options: Any) -> None:
        self._stages, self._weights = _fixed_tableau(self.alg)
        super().__init__(func, y0, **options)
        self.nsteps = 0

    @staticmethod
    def _grid_constructor_from_step_size(step_size: Any) -> Callable[..., Any]:
        return functools.partial(_step_grid, float(step_size))

    def _step_func(  # pyright: ignore[reportIncompatibleMethodOverride]
        self,
        func: Any,
        t0: torch.Tensor,
        dt: torch.Tensor,
        t1: torch.Tensor,
        y0: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.nsteps += 1
        h = dt.to(y0.dtype)
        ks = [func(t0, y0)]
        for c, weights in self._stages:
            # A stage at c = 1 evaluates at the grid point itself, not t0 + dt.
            ti = t1 if c == 1.0 else t0 + c * dt
            ks.append(func(ti, y0 + h * _combine(weights, ks)))
        return h * _combine(self._weights, ks), ks[0]

    @classmethod
    def run(
        cls, rhs: _Rhs, y0: torch.Tensor, times: torch.Tensor, req: SolveRequest
    ) -> _Run:
        """Integrate through `times`; rows from the first non-finite one on are NaN."""
        solver = cls(rhs, y0, step_size=req.dt0, rtol=req.rtol, atol=req.atol)
        u = solver.integrate(times)
        finite = torch.isfinite(u.reshape(u.shape[0], -1)).all(dim=1)
        if bool(finite.all()):
            return _Run(u, "success", None, solver.nsteps, 0)
        # The state blew up between the last finite row and the first bad one.
        bad = int(torch.nonzero(~finite)[0, 0])
        keep = (torch.arange(u.shape[0], device=u.device) < bad).reshape(
            -1, *([1] * y0.dim())
        )
        u = torch.where(keep, u, torch.full_like(u, math.nan))
        return _Run(u, "nonfinite", float(times[bad - 1]), solver.nsteps, 0)


def _step_grid(dt0: float, func: Any, y0: torch.Tensor, t: torch.Tensor) -> Any:
    """torchdiffeq grid constructor: `step_grid` over the times asked for."""
    ts = t.detach().cpu().numpy().astype(np.float64)
    grid = step_grid(float(ts[0]), float(ts[-1]), dt0, ts)
    return torch.as_tensor(grid, dtype=t.dtype, device=t.device)


def _solver_class(alg: str) -> type[_AdaptiveRK] | type[_FixedRK]:
    base = _FixedRK if ALGS[alg].fixed_step else _AdaptiveRK
    # torchdiffeq's step-size exponent is 1/order; the standard one is
    # 1/(error_order + 1), which is what this sets (equal to `order` here).
    tab = get_tableau(_tableau_name(alg))
    order = tab.order if tab.error_order is None else tab.error_order + 1
    name = f"Diffeqkit{alg.capitalize()}Solver"
    namespace = {"alg": alg, "order": order, "__module__": __name__}
    return cast("type[_AdaptiveRK] | type[_FixedRK]", type(name, (base,), namespace))


# The algs this backend offers (declared in the registry's SPECS["torch"]).
_ALGS: Mapping[str, type[_AdaptiveRK] | type[_FixedRK]] = {
    alg: _solver_class(alg)
    for alg in (
        "euler",
        "midpoint",
        "heun",
        "rk4",
        "bosh3",
        "dopri5",
        "tsit5",
        "dopri8",
    )
}

# New keys only, namespaced: torchdiffeq's own methods are untouched.
for _alg, _cls in _ALGS.items():
    SOLVERS[f"diffeqkit_{_alg}"] = _cls


# ---------------------------------------------------------------------------------
# Inputs: dtype, device, conversion.
# ---------------------------------------------------------------------------------


def _visible_devices() -> list[str]:
    return ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def _device(req: SolveRequest) -> torch.device:
    """The device asked for, else where the inputs live, else torch's default."""
    if req.device is None:
        for x in [req.u0, *leaves(req.p)]:
            if isinstance(x, torch.Tensor):
                return x.device
        return torch.get_default_device()
    kind, _, index = req.device.partition(":")
    if kind == "cuda" and (
        not torch.cuda.is_available() or int(index or 0) >= torch.cuda.device_count()
    ):
        raise unavailable_device(
            req.device,
            "torch",
            f"torch sees: {listing(_visible_devices())}",
            "Pass one of those, or device=None to run where the inputs live.",
        )
    return torch.device(req.device)


def _to_state(u0: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(u0, torch.Tensor):
        return u0.to(device=device, dtype=dtype)  # keeps u0's autograd graph
    return _tensor(to_numpy(u0), dtype, device)


def _to_param(x: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Tensors as they are (moved to the device); floats to the state dtype;
    integers stay integer."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device)
    arr = np.asarray(to_numpy(x))
    return _tensor(arr, dtype if arr.dtype.kind == "f" else None, device)


def _tensor(x: Any, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """A NumPy array(-like) as a new tensor: copied, as it may be read-only or have
    negative strides, which torch cannot wrap."""
    return torch.as_tensor(np.array(x), dtype=dtype, device=device)


def _integration_times(req: SolveRequest) -> tuple[np.ndarray, int]:
    """``[t0, *saveat, t1]`` without repeats, and where the save rows start.

    The solve always runs to ``t1`` (as on the other backends), whatever the save
    times, so that success means the same everywhere.
    """
    ts = np.asarray(req.saveat, dtype=np.float64)
    head = [] if ts[0] == req.t0 else [req.t0]
    tail = [] if ts[-1] == req.t1 else [req.t1]
    return np.concatenate([head, ts, tail]), len(head)


# ---------------------------------------------------------------------------------
# The backend.
# ---------------------------------------------------------------------------------


class TorchBackend:
    """diffeqkit on PyTorch, through torchdiffeq's solvers.

    Offers the explicit methods euler, midpoint, heun, rk4 (fixed step) and bosh3,
    dopri5, tsit5, dopri8 (adaptive), all built from `diffeqkit._tableaux`. The
    solver classes are registered in torchdiffeq as ``"diffeqkit_<alg>"``; see the
    module docstring.
    """

    name = "torch"

    def solve(self, req: SolveRequest) -> Solution:
        """Solve `req` and return the `Solution` (``t``, ``u`` torch tensors).

        Raises
        ------
        UnsupportedError
            The device asked for is not visible to torch.
        InvalidProblemError
            ``f(u0, p, t0)`` has the wrong shape, dtype, or is not finite.
        SolveError
            The integration failed and ``req.throw`` is True.
        """
        default = dtype_name(torch.get_default_dtype())
        dtype = _DTYPES[req.state_dtype(default=default)]
        device = _device(req)
        y0 = _to_state(req.u0, dtype, device)
        p = req.convert_p(functools.partial(_to_param, dtype=dtype, device=device))
        du0 = req.f(y0, p, torch.tensor(req.t0, dtype=dtype, device=device))
        check_rhs_output(du0, y0, req.t0)

        backward = req.t1 < req.t0
        times, lead = _integration_times(req)
        if backward:
            rhs = _Rhs(_reversed(req.f), p, dtype, -du0)
            times = -times
        else:
            rhs = _Rhs(req.f, p, dtype, du0)
        solver_times = torch.as_tensor(times, dtype=torch.float64, device=device)
        run = _ALGS[req.alg.name].run(rhs, y0, solver_times, req)

        m = len(req.saveat)
        reached = run.t_reached
        if reached is not None and backward:
            reached = -reached
        return conclude(
            req,
            t=_tensor(req.saveat, dtype, device),
            u=run.u[lead : lead + m],
            stats={"nfev": rhs.nfev, "naccept": run.naccept, "nreject": run.nreject},
            status=run.status,
            t_reached=req.t1 if reached is None else reached,
        )

    def describe(self) -> dict[str, Any]:
        """Visible devices and torch's intra-op thread count."""
        return {"devices": _visible_devices(), "threads": torch.get_num_threads()}


BACKEND = TorchBackend()
