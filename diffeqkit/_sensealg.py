"""The gradient methods: one flag, `sensealg=`, picks how a solve is differentiated.

Each method is a frozen dataclass of options and documentation; the code that runs
it lives in each backend's sensealg table, and which options take effect where is
declared in the registry (`diffeqkit.backends.SPECS`) and checked once by the core.
A gradient is that of the computed solution with the step sizes held fixed (no
gradient through the step-size controller), as in diffrax and torchdiffeq.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ._arrays import array_namespace, is_array
from ._errors import InvalidProblemError, invalid, short

__all__ = [
    "SENSEALGS",
    "CheckpointedAdjoint",
    "ContinuousAdjoint",
    "ForwardMode",
    "InterpolatingAdjoint",
    "ReverseThroughSolver",
    "SensitivityAlgorithm",
    "default_sensealg",
    "input_size",
    "options_set",
]


def _check_tol(owner: str, name: str, value: Any) -> None:
    if value is None:
        return
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
    if not ok:
        raise invalid(
            f"{owner}({name}=...)",
            "must be a positive number or None (None: the forward solve's)",
            value,
            f"Pass e.g. {name}=1e-8.",
        )


def _check_autodiff(owner: str, value: Any) -> None:
    if value is None:
        return
    from .backends import SPECS  # what some backend honours: data in the registry

    engines = list(
        dict.fromkeys(e for s in SPECS.values() for e in s.capabilities.autodiff)
    )
    if value not in engines:
        raise invalid(
            f"{owner}(autodiff=...)",
            "must be " + ", ".join(repr(e) for e in engines) + " or None",
            value,
            "None picks the backend's own framework (on SciPy: jax if installed, "
            "else torch, else prob.jac).",
        )


@dataclass(frozen=True)
class SensitivityAlgorithm:
    """Base class of the gradient methods (the ``sensealg=`` values)."""

    #: The name used in the capability tables and `Solution.sensealg`.
    name: ClassVar[str] = ""
    #: Why the method refuses an alg kind ("fixed", "adaptive", "implicit") on
    #: every backend, for the error message; which kinds a backend runs is data in
    #: its registry spec.
    kind_notes: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        owner = type(self).__name__
        options = vars(self)
        for tol in ("rtol", "atol"):
            if tol in options:
                _check_tol(owner, tol, options[tol])
        if "autodiff" in options:
            _check_autodiff(owner, options["autodiff"])


def options_set(sensealg: SensitivityAlgorithm) -> dict[str, Any]:
    """The options of `sensealg` given a value other than their default (None)."""
    return {
        f.name: getattr(sensealg, f.name)
        for f in fields(sensealg)
        if getattr(sensealg, f.name) is not None
    }


@dataclass(frozen=True)
class ForwardMode(SensitivityAlgorithm):
    """Forward-mode sensitivities: the Jacobian of the solution, one column per input.

    Computes ``d u(t_i) / d(u0, p)`` alongside the solve and contracts it with the
    cotangent in the reverse pass, as SciMLSensitivity's ``ForwardDiffSensitivity``
    does under reverse-mode AD. On JAX and torch it is forward-mode AD through the
    solver's steps: the derivative of the discrete solution, exact to rounding. On
    SciPy it integrates the forward sensitivity equations ``dS/dt = (df/du) S +
    df/dp`` under error control: it converges to the derivative of the exact
    solution as the tolerances shrink (`dk.support_matrix` says which, per
    backend).

    Parameters
    ----------
    autodiff : {None, "jax", "torch", "jac"}
        What differentiates ``f`` on SciPy: None picks JAX if installed, else
        PyTorch, else ``prob.jac`` (gradients with respect to ``u0`` only). On JAX
        and torch the backend's own framework always does (None or its name).

    Notes
    -----
    Cost grows linearly with ``k``, the number of inputs (``u0.size`` plus the
    parameters), all ``k`` tangents carried along one solve; memory does not grow
    with the number of steps. Gradients flow to ``u0`` and ``p``, not to tensors
    ``f`` closes over. Fastest for few inputs; use an adjoint for many (the
    crossovers are in docs/performance.md). Backends: jax, torch, scipy. On JAX
    it works under ``jax.grad``/``jax.jit``/``jax.vmap`` (a custom VJP), not
    under ``jax.jvp``/``jax.jacfwd``.
    """

    name: ClassVar[str] = "ForwardMode"
    autodiff: str | None = None


@dataclass(frozen=True)
class ReverseThroughSolver(SensitivityAlgorithm):
    """Reverse-mode AD through every solver step, storing the whole forward pass.

    "Discretise-then-optimise": the exact gradient of the computed solution, with
    the step sizes held fixed.

    Notes
    -----
    Cost about 2-4 forward solves; memory grows with the number of steps. Backends:
    jax (diffrax's ``RecursiveCheckpointAdjoint`` with one checkpoint per step),
    torch (autograd through the steps). Not on SciPy, whose solvers are not
    differentiable: use `ForwardMode` or an adjoint there.
    """

    name: ClassVar[str] = "ReverseThroughSolver"


@dataclass(frozen=True)
class ContinuousAdjoint(SensitivityAlgorithm):
    """The backsolve adjoint: the adjoint ODE and the state, integrated backward.

    Solves ``dλ/dt = -(df/du)^T λ`` and ``dμ/dt = -(df/dp)^T λ`` from ``t1`` back to
    ``t0`` with jumps ``λ += cotangent_i`` at the save times, re-integrating ``u``
    backward alongside (Chen et al. 2018; torchdiffeq's ``odeint_adjoint``;
    diffrax's ``BacksolveAdjoint``; SciMLSensitivity's ``BacksolveAdjoint``).

    Parameters
    ----------
    rtol, atol : float, optional
        Tolerances of the backward solve; None: the forward solve's.
    autodiff : {None, "jax", "torch", "jac"}
        SciPy only: see `ForwardMode`.

    Notes
    -----
    Memory does not grow with the number of steps. No adaptive integrator is
    reversible: on chaotic or unstable problems (Lorenz over long times) the
    re-integrated state drifts from the forward one and the gradient is wrong,
    silently; on stiff problems the backward solve blows up, so implicit algs are
    refused (use `InterpolatingAdjoint`). Prefer `CheckpointedAdjoint` or
    `InterpolatingAdjoint` when in doubt. Backends: jax, torch, scipy.
    """

    name: ClassVar[str] = "ContinuousAdjoint"
    kind_notes: ClassVar[dict[str, str]] = {
        "implicit": (
            "the backsolve re-integrates the state backward in time, where a "
            "stiff problem's fast decaying modes grow (on ROBER the gradient was "
            "off by a factor 1e69, without an error). Use "
            "sensealg=dk.InterpolatingAdjoint(): the same adjoint, against the "
            "forward solution's dense output"
        )
    }
    rtol: float | None = None
    atol: float | None = None
    autodiff: str | None = None


@dataclass(frozen=True)
class InterpolatingAdjoint(SensitivityAlgorithm):
    """The adjoint ODE integrated backward against the forward solution.

    Solves the adjoint equations of `ContinuousAdjoint` from ``t1`` back to ``t0``,
    but reads the state ``u(t)`` off the forward solve's dense output instead of
    re-integrating it backward (SciMLSensitivity's ``InterpolatingAdjoint``), so
    the forward states are exact and stiff problems stay stable: with an implicit
    alg the adjoint is integrated with the same implicit method.

    Parameters
    ----------
    rtol, atol : float, optional
        Tolerances of the backward adjoint solve. None: the forward rtol; for
        atol the forward atol scaled up to the cotangent's magnitude (see
        `adjoint_atol`).
    autodiff : {None, "jax", "torch", "jac"}
        SciPy only: see `ForwardMode`.

    Notes
    -----
    Memory grows with the number of steps (the dense output of every step is
    kept); time about one forward solve plus one adjoint solve. Converges to the
    gradient of the exact solution as the tolerances shrink. Backends: jax, torch,
    scipy.
    """

    name: ClassVar[str] = "InterpolatingAdjoint"
    rtol: float | None = None
    atol: float | None = None
    autodiff: str | None = None


@dataclass(frozen=True)
class CheckpointedAdjoint(SensitivityAlgorithm):
    """A reverse pass that stores `checkpoints` states and recomputes the rest.

    Parameters
    ----------
    checkpoints : int, optional
        How many forward states to keep. JAX: diffrax's recursive (binomial)
        checkpointing, None meaning about ``log2(max_steps)``. torch: the steps
        are cut into at most `checkpoints` segments, None meaning
        ``ceil(sqrt(n_steps))``. SciPy: the forward solve is cut into
        `checkpoints` segments, each recomputed with dense output while the
        adjoint ODE is solved backward against it (CVODES-style), None meaning 10.
    rtol, atol : float, optional
        SciPy only: tolerances of the backward adjoint solve (JAX and torch
        recompute the forward steps exactly and have none).
    autodiff : {None, "jax", "torch", "jac"}
        SciPy only: see `ForwardMode`.

    Notes
    -----
    Exact forward states and bounded memory at the price of recomputation. On
    JAX and torch it gives `ReverseThroughSolver`'s gradient (the recomputed steps
    are the recorded ones). Backends: jax, torch, scipy.
    """

    name: ClassVar[str] = "CheckpointedAdjoint"
    checkpoints: int | None = None
    rtol: float | None = None
    atol: float | None = None
    autodiff: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.checkpoints
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise invalid(
                "CheckpointedAdjoint(checkpoints=...)",
                "must be an int >= 1 or None",
                n,
                "Pass e.g. checkpoints=16, or None for the backend's default.",
            )


SENSEALGS: tuple[type[SensitivityAlgorithm], ...] = (
    ForwardMode,
    ReverseThroughSolver,
    ContinuousAdjoint,
    InterpolatingAdjoint,
    CheckpointedAdjoint,
)


def check_sensealg(sensealg: Any) -> SensitivityAlgorithm | None:
    """`sensealg` as given if it is None or an instance; a clear error otherwise."""
    if sensealg is None or isinstance(sensealg, SensitivityAlgorithm):
        return sensealg
    names = ", ".join(f"dk.{c.__name__}()" for c in SENSEALGS)
    fix = f"Pass one of {names}, or None for the default."
    if isinstance(sensealg, type) and issubclass(sensealg, SensitivityAlgorithm):
        fix = f"Pass an instance: sensealg=dk.{sensealg.__name__}()."
    raise InvalidProblemError(
        f"sensealg must be a diffeqkit gradient method or None; got "
        f"sensealg={short(sensealg)}. {fix}"
    )


def input_size(u0: Any, p: Any) -> int:
    """How many numbers a gradient is taken with respect to: ``u0.size`` plus the
    sizes of p's leaves (a framework pytree's or module's: its arrays')."""

    def size(x: Any) -> int:
        if x is None:
            return 0
        if is_array(x):
            return math.prod(x.shape)
        shape = getattr(x, "shape", None)
        if shape is not None:
            return math.prod(shape)
        if isinstance(x, list | tuple):
            return sum(size(v) for v in x)
        return 1

    # through framework pytrees (equinox.Module, torch.nn.Module, ...)
    from .backends import params

    return size(u0) + sum(size(x.leaf) for x in params(p))


def default_sensealg(
    backend: str, u0: Any, p: Any, *, events: bool = False
) -> SensitivityAlgorithm:
    """The gradient method ``sensealg=None`` stands for.

    `ForwardMode` when ``u0.size`` plus the number of parameters is at most the
    backend's measured crossover (``forward_mode_max_inputs`` in its registry
    spec; docs/performance.md has the measurements); otherwise
    `CheckpointedAdjoint` (exact forward states with bounded memory, the field's
    recommended default). With `events`, the rule's choice when the backend
    differentiates events with it, else the first sensealg that it does.
    """
    from .backends import spec_of

    caps = spec_of(backend).capabilities
    chosen: SensitivityAlgorithm = (
        ForwardMode()
        if input_size(u0, p) <= caps.forward_mode_max_inputs
        else CheckpointedAdjoint()
    )
    if events and caps.events and type(chosen).__name__ not in caps.events:
        chosen = {c.__name__: c for c in SENSEALGS}[caps.events[0]]()
    return chosen


def adjoint_atol(atol: Any, cotangent: Any, states: Any) -> Any:
    """The default atol of an adjoint solve that integrates only ``(λ, μ)``: the
    forward atol scaled from the states' magnitude to the cotangent's, never
    below the forward atol (any array type; a traced JAX value stays traced).

    An absolute tolerance means something only next to the values it bounds. On
    ROBER (states up to 1 with atol 1e-14, cotangents up to 1e4), the forward atol
    made the adjoint chase rounding noise: JAX's Kvaerno5 hit max_steps over
    [10, 100], every other step rejected, and SciPy's BDF stalled. Scaled, to
    1e-10 there, JAX's adjoint took 2,200 steps over [0, 100] and its gradients
    matched finite differences as closely as the discrete methods' did.
    """
    if math.prod(states.shape) == 0:  # an empty state: nothing to scale by
        return atol
    xp = array_namespace(cotangent)
    big = xp.max(xp.abs(states))
    tiny = xp.finfo(states.dtype).tiny
    scale = xp.max(xp.abs(cotangent)) / xp.maximum(
        big, xp.asarray(tiny, dtype=big.dtype)
    )
    return atol * xp.maximum(scale, xp.asarray(1.0, dtype=scale.dtype))
