"""`solve()`: validate and normalise every argument once, pick the backend, hand
it a `SolveRequest`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from . import backends
from ._algs import AlgInfo, get_alg
from ._arrays import FLOAT_DTYPES, dtype_name, is_array, is_concrete, is_real_number
from ._errors import InvalidProblemError, invalid, short
from ._events import MAX_EVENTS, check_events, check_max_events
from ._problem import ODEProblem
from ._saveat import save_times, step_grid
from ._sensealg import check_sensealg, default_sensealg
from ._solution import Solution
from ._tableaux import get_tableau
from .backends._protocol import SolveRequest

if TYPE_CHECKING:
    from ._ensemble import EnsembleProblem

__all__ = ["build_request", "check_problem", "solve"]


def solve(
    prob: ODEProblem | EnsembleProblem,
    alg: str = "tsit5",
    *,
    backend: str | None = None,
    saveat: Any = None,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    dt0: float | None = None,
    adaptive: bool = True,
    max_steps: int = 100_000,
    sensealg: Any = None,
    device: Any = None,
    dtype: Any = None,
    throw: bool = True,
    events: Any = None,
    max_events: int = MAX_EVENTS,
    devices: Any = None,
    executor: Any = None,
) -> Solution:
    """Solve an `ODEProblem` (or an `EnsembleProblem`) on a backend.

    Parameters
    ----------
    prob : ODEProblem or EnsembleProblem
        The problem; an ensemble solves every member with its own steps.
    alg : str, default "tsit5"
        A neutral solver name: fixed step (``euler``, ``rk4``, ...; need
        `dt0`), adaptive explicit (``tsit5``, ``dopri5``, ...) or implicit for
        stiff problems (``kvaerno5``, ``bdf``, ...). `dk.support_matrix()` lists
        what each backend offers.
    backend : {"jax", "torch", "scipy", "numpy", None}
        None infers it from the arrays in `u0` and `p`: torch tensors -> torch,
        JAX arrays -> jax, anything else -> scipy. ``"numpy"`` is ``"scipy"``.
    saveat : None, float or 1-D array
        Times to save at, inside `tspan` and ordered in the direction of
        integration; a float ``dt`` saves every ``dt`` from ``t0`` plus ``t1``.
        Default ``[t0, t1]``. Fixed-step methods also step on every save time.
    rtol, atol : float
        Relative and absolute tolerances of adaptive methods (RMS error norm
        ``err / (atol + rtol * max(|u_n|, |u_{n+1}|))``), > 0.
    dt0 : float, optional
        Length (> 0; the direction comes from `tspan`) of the first step of an
        adaptive method (default: chosen by the backend) or of every step of a
        fixed-step one (required).
    adaptive : bool, default True
        False runs an explicit adaptive alg (bosh3, dopri5, tsit5, dopri8) with
        constant steps of `dt0` (required), ending on the save times, as diffrax's
        ``ConstantStepSize`` and SciML's ``adaptive=false`` do: its order can then
        be measured by step halving. Fixed-step algs always step so.
    max_steps : int
        The most steps the solver may take, >= 1.
    sensealg : SensitivityAlgorithm or None
        `dk.ForwardMode()`, `dk.ReverseThroughSolver()`, `dk.ContinuousAdjoint()`,
        `dk.InterpolatingAdjoint()` or `dk.CheckpointedAdjoint()`: how gradients
        of this solve are computed when it is differentiated
        (``jax.grad``, ``loss.backward()``, `dk.vjp`, `dk.value_and_grad`). None
        picks `default_sensealg` for the backend and the problem size; the choice
        is recorded in ``Solution.sensealg``.
    device : {None, "cpu", "cuda", "cuda:N", "gpu"}
        None: where the inputs live, else the framework's default.
    dtype : {None, "float32", "float64"} or a framework dtype
        None follows the inputs: arrays keep their dtype, lists become the
        backend's default float (float64 on SciPy, `torch.get_default_dtype()`,
        JAX's default). diffeqkit never changes a framework's global flags.
    throw : bool
        If True a failed integration raises `SolveError`; if False the partial
        `Solution` is returned with ``success=False``.
    events : list of dk.Event, optional
        Zero crossings of conditions that stop the solve or apply a jump and
        continue (`dk.Event`); where they fired is in ``Solution.t_events`` and
        ``Solution.u_events``. Gradients follow the event times. On an
        ensemble each member has its own events (a terminal one stops only its
        member); ``t_events[k]`` then has shape ``(B, n_k)``, NaN-padded.
    max_events : int, default 1000
        The most events that may fire in one solve (all events together); one
        more stops it with status ``"too_many_events"`` (a chattering, Zeno,
        event ends with `SolveError`, never a hang). On an ensemble: per
        member.
    devices : list, optional
        Ensembles only: the devices to split the members over (JAX: a list of
        ``jax.Device`` or names such as ``"cuda:0"``; the batch is sharded over a
        1-D mesh of them).
    executor : concurrent.futures.Executor or dask.distributed.Client, optional
        Ensembles only (SciPy): members run in chunks on its workers, results in
        member order. None solves them one after another in this process.

    Returns
    -------
    Solution
        ``t`` of shape ``(m,)`` and ``u`` of shape ``(m, *u0.shape)`` in the
        backend's array type, plus ``stats``, ``status``, ``success``, ``message``,
        ``backend``, ``alg``, ``sensealg``. ``stats`` has ``nfev``, ``naccept``
        and ``nreject`` (None where the backend cannot tell); implicit algs add
        ``njev`` and ``nlu`` (Jacobians and LU factorisations) where counted, and
        SciPy's ``jacobian`` (where df/du came from: ``"prob.jac"``, ``"jax"``,
        ``"torch"`` or ``"finite differences"``).
        For an `EnsembleProblem` with ``B`` members: ``u`` of shape ``(B, m,
        *u0.shape)``, ``status`` a tuple of one status per member, ``success`` a
        bool array, each ``stats`` entry a list per member (``nevents`` too).

    Raises
    ------
    InvalidProblemError
        An argument is invalid, or `f` returns the wrong shape, dtype or a
        non-finite value at ``t0``.
    UnsupportedError
        The backend does not offer `alg`, `sensealg`, `device` or `dtype`.
    BackendNotInstalledError
        The backend's packages are missing; the message gives the pip line.
    SolveError
        The integration failed and ``throw=True`` (for an ensemble: any member
        failed; the message names them).

    Examples
    --------
    >>> import numpy as np, diffeqkit as dk
    >>> prob = dk.ODEProblem(lambda u, p, t: -p * u, [1.0], (0.0, 1.0), 2.0)
    >>> sol = dk.solve(prob, "tsit5", backend="scipy", rtol=1e-10, atol=1e-12)
    >>> bool(abs(sol.u[-1, 0] - np.exp(-2.0)) < 1e-9)
    True
    """
    kwargs: dict[str, Any] = dict(
        backend=backend,
        saveat=saveat,
        rtol=rtol,
        atol=atol,
        dt0=dt0,
        adaptive=adaptive,
        max_steps=max_steps,
        sensealg=sensealg,
        device=device,
        dtype=dtype,
        throw=throw,
        events=events,
        max_events=max_events,
    )
    # (Imported here: `_ensemble` builds on `build_request`.)
    from . import _ensemble

    if isinstance(prob, _ensemble.EnsembleProblem):
        options = {"devices": devices, "executor": executor}
        return _ensemble.solve_ensemble(prob, alg, {**kwargs, **options})
    for name, value in (("devices", devices), ("executor", executor)):
        if value is not None:
            raise invalid(
                name,
                "applies to a dk.EnsembleProblem only",
                value,
                "Wrap the problem: dk.EnsembleProblem(prob, u0=..., p=...), or "
                f"leave {name}=None.",
            )
    req = build_request(prob, alg, **kwargs)
    return backends.load(req.backend).solve(req)


def check_problem(prob: Any) -> None:
    """Refuse anything but a `dk.ODEProblem` as `prob`."""
    if not isinstance(prob, ODEProblem):
        raise invalid(
            "prob",
            "must be a dk.ODEProblem",
            prob,
            "Build one with dk.ODEProblem(f, u0, tspan, p).",
        )


def build_request(
    prob: ODEProblem,
    alg: str = "tsit5",
    *,
    backend: str | None = None,
    saveat: Any = None,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    dt0: float | None = None,
    adaptive: bool = True,
    max_steps: int = 100_000,
    sensealg: Any = None,
    device: Any = None,
    dtype: Any = None,
    throw: bool = True,
    events: Any = None,
    max_events: int = MAX_EVENTS,
) -> SolveRequest:
    """Validate and normalise the arguments of `solve` into a `SolveRequest`."""
    check_problem(prob)
    info = get_alg(alg)
    name = backends.resolve_name(backend, prob.u0, prob.p)
    backends.check_native_p(name, prob.p)
    backends.check_alg(name, info.name)
    dev = _normalise_device(device)
    backends.check_device(name, dev)
    checked_events = check_events(events)
    max_events = check_max_events(max_events)
    chosen = check_sensealg(sensealg)
    if chosen is None:
        chosen = default_sensealg(name, prob.u0, prob.p, events=bool(checked_events))
    if checked_events:
        backends.check_events(name, chosen)
    if not isinstance(throw, bool):
        raise invalid("throw", "must be True or False", throw, "Pass a bool.")
    if not isinstance(adaptive, bool):
        raise invalid("adaptive", "must be True or False", adaptive, "Pass a bool.")
    if not adaptive and info.implicit:
        raise InvalidProblemError(
            f"adaptive=False runs an explicit alg with constant steps, but "
            f"alg='{info.name}' is implicit. Use an explicit alg such as 'tsit5' "
            "with adaptive=False, or keep adaptive=True."
        )
    fixed_step = info.fixed_step or not adaptive
    backends.check_sensealg(name, chosen, info, fixed_step)
    tol_fix = "Pass a positive number such as 1e-6."
    _check_positive("rtol", rtol, tol_fix)
    _check_positive("atol", atol, tol_fix)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise invalid(
            "max_steps", "must be an int >= 1", max_steps, "Pass e.g. 100_000."
        )
    if dt0 is not None:
        _check_positive(
            "dt0", dt0, "dt0 is a step length; the direction comes from tspan."
        )
        dt0 = float(dt0)
    t0, t1 = prob.tspan
    ts = save_times(saveat, t0, t1)
    if fixed_step:
        if dt0 is None:
            raise invalid(
                "dt0",
                f"is required by the fixed-step alg='{info.name}'"
                if info.fixed_step
                else "is required with adaptive=False (the constant step length)",
                dt0,
                "Pass the step length, e.g. dt0=0.01, or use an adaptive alg "
                "such as 'tsit5' with adaptive=True.",
            )
        if is_concrete(t0) and is_concrete(t1):
            nsteps = step_grid(t0, t1, dt0, ts if is_concrete(ts) else None).size - 1
            if nsteps > max_steps:
                raise invalid(
                    "dt0",
                    f"needs {nsteps} steps over tspan=({t0!r}, {t1!r}), more "
                    f"than max_steps={max_steps}",
                    dt0,
                    "Raise max_steps or pass a larger dt0.",
                )
    req = SolveRequest(
        backend=name,
        f=prob.f,
        u0=prob.u0,
        p=prob.p,
        jac=prob.jac,
        t0=t0,
        t1=t1,
        saveat=ts,
        alg=info,
        rtol=_as_float(rtol),
        atol=_as_float(atol),
        dt0=dt0,
        max_steps=max_steps,
        dtype=_normalise_dtype(dtype),
        device=dev,
        throw=throw,
        sensealg=chosen,
        land_on_saves=_lands_on_saves(info, fixed_step),
        adaptive=adaptive,
        events=checked_events,
        max_events=max_events,
    )
    return req


def _lands_on_saves(info: AlgInfo, fixed_step: bool) -> bool:
    """Whether saved values must be step values (see `SolveRequest`)."""
    if fixed_step:
        return True
    if info.tableau is None:
        return False
    tableau = get_tableau(info.tableau)
    return tableau.error_order is not None and tableau.dense_order < tableau.error_order


def _as_float(x: Any) -> Any:
    return x if is_array(x) and not is_concrete(x) else float(x)


def _check_positive(name: str, value: Any, fix: str) -> None:
    if is_array(value) and not is_concrete(value):
        return
    ok = is_real_number(value) or (is_array(value) and len(value.shape) == 0)
    if not ok or not math.isfinite(float(value)) or float(value) <= 0:
        raise invalid(name, "must be a positive, finite number", value, fix)


def _normalise_device(device: Any) -> str | None:
    if device is None:
        return None
    text = str(device)
    kind, _, index = text.partition(":")
    kind = {"gpu": "cuda"}.get(kind, kind)
    if kind in ("cpu", "cuda") and (not index or index.isdigit()):
        return f"{kind}:{index}" if index else kind
    raise invalid(
        "device",
        "must be None, 'cpu', 'cuda', 'cuda:N' or 'gpu'",
        device,
        "Pass e.g. device='cuda', or None to use where the inputs live.",
    )


def _normalise_dtype(dtype: Any) -> str | None:
    if dtype is None:
        return None
    name = dtype_name(dtype)
    if name in FLOAT_DTYPES:
        return name
    raise InvalidProblemError(
        f"dtype must be None, 'float32' or 'float64'; got dtype={short(dtype)}. "
        "Pass dtype='float64' for accuracy or 'float32' for speed, or None to "
        "follow u0."
    )
