"""The plain solve on torch: the alg table, inputs, and a request's tensors.

`ALGS` maps each alg to its driver (`_rk`, `_implicit`); `solver_for` picks the
fixed-step driver for ``adaptive=False``. `prepare` turns a request into tensors
in solver time (negated for ``t1 < t0``), `run_steps` integrates them and `finish`
makes the `Solution`; every gradient method builds on these.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..._arrays import dtype_name, to_numpy
from ..._errors import listing, unavailable_device
from ..._problem import check_rhs_output
from ..._pytree import leaves, tree_map
from ..._solution import Solution
from .._protocol import SolveRequest, conclude
from . import _engine, _engine_rosenbrock
from ._implicit import IMPLICIT_SOLVERS
from ._params import bind, check_params, has_modules, param_view
from ._rk import Recorder, Rhs, Run, Solver, adaptive_solver, fixed_solver, tensor

__all__ = [
    "ALGS",
    "Setup",
    "finish",
    "grad_input",
    "prepare",
    "run_steps",
    "solve_plain",
    "solver_for",
]

_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
}

# The algs this backend offers (declared in the registry's SPECS["torch"]).
ALGS: Mapping[str, Solver] = {
    **{alg: fixed_solver(alg) for alg in ("euler", "midpoint", "heun", "rk4")},
    **{alg: adaptive_solver(alg) for alg in ("bosh3", "dopri5", "tsit5", "dopri8")},
    **IMPLICIT_SOLVERS,
}


def solver_for(req: SolveRequest) -> Solver:
    """The driver of `req`: its alg's, or with ``adaptive=False`` the fixed-step
    one with the alg's own weights."""
    if req.fixed_step:
        return fixed_solver(req.alg.name)
    return ALGS[req.alg.name]


def _reversed(f: Callable[..., Any]) -> Callable[..., Any]:
    """``f`` in negated time ``s = -t`` (``du/ds = -f(u, p, -s)``)."""

    def f_reversed(u: Any, p: Any, s: Any) -> Any:
        return -f(u, p, -s)

    return f_reversed


# ---------------------------------------------------------------------------------
# Inputs: dtype, device, conversion.
# ---------------------------------------------------------------------------------


def visible_devices() -> list[str]:
    return ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def solve_device(req: SolveRequest) -> torch.device:
    """The device asked for, else where the inputs live, else torch's default."""
    if req.device is None:
        for x in [req.u0, *leaves(param_view(req.p))]:
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
            f"torch sees: {listing(visible_devices())}",
            "Pass one of those, or device=None to run where the inputs live.",
        )
    return torch.device(req.device)


def state_dtype(req: SolveRequest) -> torch.dtype:
    """The dtype of the solve: lists get torch's default float."""
    return _DTYPES[req.state_dtype(default=dtype_name(torch.get_default_dtype()))]


def check_inputs(req: SolveRequest, dtype: torch.dtype, device: torch.device) -> None:
    """`check_params` on p, saying where the solve's dtype comes from."""
    if req.dtype is not None:
        source = f"dtype='{req.dtype}' was asked for"
    elif isinstance(req.u0, torch.Tensor):
        source = "the dtype of u0"
    else:
        source = "torch's default dtype, as u0 is not a tensor"
    check_params(req.p, dtype, device, source)


def bound_p(req: SolveRequest, dtype: torch.dtype, device: torch.device) -> Any:
    """p's view (`param_view`) with its leaves converted by `to_param`."""
    convert = functools.partial(to_param, dtype=dtype, device=device)
    return tree_map(lambda x: x if x is None else convert(x), param_view(req.p))


def to_state(u0: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(u0, torch.Tensor):
        return u0.to(device=device, dtype=dtype)  # keeps u0's autograd graph
    return tensor(to_numpy(u0), dtype, device)


def to_param(x: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Tensors as they are (moved to the device); floats to the state dtype;
    integers stay integer."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device)
    arr = np.asarray(to_numpy(x))
    return tensor(arr, dtype if arr.dtype.kind == "f" else None, device)


def _integration_times(req: SolveRequest) -> tuple[np.ndarray, int]:
    """``[t0, *saveat, t1]`` without repeats, and where the save rows start.

    The solve always runs to ``t1`` (as on the other backends), whatever the save
    times, so that success means the same everywhere.
    """
    ts = np.asarray(req.saveat, dtype=np.float64)
    head = [] if ts[0] == req.t0 else [req.t0]
    tail = [] if ts[-1] == req.t1 else [req.t1]
    return np.concatenate([head, ts, tail]), len(head)


def replace_leaves(tree: Any, new: list[Any]) -> Any:
    """`tree` with its leaves (as `leaves` lists them) replaced by `new`."""
    it = iter(new)
    return tree_map(lambda _: next(it), tree)


def requires_grad(req: SolveRequest) -> bool:
    """Whether autograd is recording and u0 or a tensor of p requires grad."""
    if not torch.is_grad_enabled():
        return False
    return any(
        isinstance(x, torch.Tensor) and x.requires_grad
        for x in [req.u0, *leaves(param_view(req.p))]
    )


# ---------------------------------------------------------------------------------
# A solve, set up once for every gradient method.
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """A request turned into tensors, in the solver's time.

    Backward integration (``t1 < t0``) runs in negated time: `f` is then
    ``-f(u, p, -s)``, `du0` its value at ``t0`` and `times` negated, as
    ``torchdiffeq.odeint`` does.
    """

    y0: torch.Tensor
    p: Any
    f: Callable[..., Any]  # the user's f in solver time
    du0: torch.Tensor  # f(y0, p, t0) in solver time
    times: torch.Tensor  # float64: [t0, *saveat, t1] without repeats, solver time
    lead: int  # the row of times where the save times start
    dtype: torch.dtype
    device: torch.device
    backward: bool
    jac: Callable[..., Any] | None = None  # prob.jac in solver time

    def rhs(self, first: bool = True, p: Any = None) -> Rhs:
        """The vector field (``first``: reuse `du0` once)."""
        return Rhs(
            self.f,
            self.p if p is None else p,
            self.dtype,
            self.du0 if first else None,
            self.jac,
        )


def prepare(req: SolveRequest, *, graph: bool) -> Setup:
    """Convert the inputs and check ``f(u0, p, t0)``; `graph`: evaluate it with
    autograd recording (for a solve differentiated through its steps)."""
    dtype = state_dtype(req)
    device = solve_device(req)
    check_inputs(req, dtype, device)
    y0 = to_state(req.u0, dtype, device)
    # Modules in p: the solvers see their parameters as leaves (`_params`).
    p = bound_p(req, dtype, device)
    f, jac = req.f, req.jac
    if has_modules(req.p):
        f = bind(f, req.p)
        jac = None if jac is None else bind(jac, req.p)
    t0 = torch.tensor(req.t0, dtype=dtype, device=device)
    with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
        du0 = f(y0, p, t0)
    check_rhs_output(du0, y0, req.t0)
    backward = req.t1 < req.t0
    times, lead = _integration_times(req)
    if backward:
        f, du0, times = _reversed(f), -du0, -times
        jac = None if jac is None else _reversed(jac)
    return Setup(
        y0=y0,
        p=p,
        f=f,
        du0=du0,
        times=torch.as_tensor(times, dtype=torch.float64, device=device),
        lead=lead,
        dtype=dtype,
        device=device,
        backward=backward,
        jac=jac,
    )


def finish(req: SolveRequest, setup: Setup, run: Run, u: torch.Tensor) -> Solution:
    """The `Solution` of a run; `u` the state at every integration time (``run.u``
    or a differentiable copy of it)."""
    m = len(req.saveat)
    reached = run.t_reached
    if reached is not None and setup.backward:
        reached = -reached
    return conclude(
        req,
        t=tensor(req.saveat, setup.dtype, setup.device),
        u=u[setup.lead : setup.lead + m],
        stats=run_stats(run),
        status=run.status,
        t_reached=req.t1 if reached is None else reached,
    )


def run_stats(run: Run) -> dict[str, Any]:
    """``nfev``, ``naccept``, ``nreject``; and ``njev``, ``nlu`` for implicit algs."""
    stats: dict[str, Any] = {
        "nfev": run.nfev,
        "naccept": run.naccept,
        "nreject": run.nreject,
    }
    if run.njev is not None:
        stats["njev"] = run.njev
        stats["nlu"] = run.nlu
    if run.compile_s is not None:
        stats["compile_s"] = run.compile_s
    return stats


def run_steps(req: SolveRequest, setup: Setup, recorder: Recorder | None = None) -> Run:
    """Integrate `setup` with the driver of `req`. An empty state needs no step:
    every row is it."""
    rhs = setup.rhs()
    n = setup.times.shape[0]
    if setup.y0.numel() == 0:
        u = torch.stack([setup.y0] * n)
        return Run(u, "success", None, 0, 0, 1, n, float(setup.times[-1]))
    if (
        _engine.enabled(req)
        and not records_graph(setup)
        and (
            recorder is None
            or not hasattr(recorder, "accepted")
            # (the hook of the RK engine's dense output, `_engine_adjoint`)
            or (hasattr(recorder, "engine_steps") and _engine.explicit(req))
        )
    ):
        # Rosenbrock algs take prob.jac too.
        out = (
            _engine_rosenbrock.run(
                req, setup.f, setup.p, setup.y0, setup.du0, setup.times,
                setup.backward, recorder, setup.jac,
            )
            if req.alg.implicit
            else _engine.run(
                req, setup.f, setup.p, setup.y0, setup.du0, setup.times,
                setup.backward, recorder,
            )
        )  # fmt: skip
        if out is not None:
            return out.run._replace(compile_s=out.stats["compile_s"])
    return solver_for(req).run(rhs, setup.y0, setup.times, req, recorder)


def records_graph(setup: Setup) -> bool:
    """Whether a run of `setup` now would record an autograd graph."""
    if not torch.is_grad_enabled():
        return False
    return any(
        isinstance(x, torch.Tensor) and x.requires_grad
        for x in [setup.y0, *leaves(setup.p)]
    )


def solve_plain(req: SolveRequest) -> Solution:
    """The solve itself; differentiable through its steps when autograd records
    (ReverseThroughSolver)."""
    setup = prepare(req, graph=True)
    run = run_steps(req, setup)
    return finish(req, setup, run, run.u)


def grad_input(
    x: Any,
    convert: Callable[..., torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """An input of `dk.vjp` as a fresh tensor that requires grad: a tensor as it
    is (its dtype and device, so its gradient has them too), anything else
    converted as `solve` converts it. Integer values cannot require grad."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        t = x.detach()
    else:
        t = convert(x, dtype, device)
    if t.is_floating_point():
        t.requires_grad_()
    return t
