"""The gradient methods: one flag, `sensealg=`, picks how a solve is differentiated.

Requirements met here:

- Each method is a frozen dataclass of options with its documentation; the code
  that runs it lives in each backend (a `_SENSEALGS` table there). The registry's
  ``Capabilities.sensealgs`` lists the class names each backend runs.
- Options are checked when the object is built, naming the option and the fix.
- ``sensealg=None`` resolves to `default_sensealg`, a documented rule on the backend
  and the number of inputs, recorded in ``Solution.sensealg``.

One convention on every backend: a gradient is that of the *computed* solution
with the solver's step sizes and accept/reject decisions held fixed, i.e. gradients
do not flow through the step-size controller (diffrax's and torchdiffeq's
convention; torchode's default differs). ForwardMode, ReverseThroughSolver and
CheckpointedAdjoint on JAX and torch all compute this derivative of the discrete
solution; the continuous adjoint, and SciPy's methods (which solve sensitivity or
adjoint ODEs), converge to it as the tolerances shrink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ._arrays import array_namespace, is_array
from ._errors import InvalidProblemError, invalid, short
from ._pytree import leaves

__all__ = [
    "AUTODIFF_ENGINES",
    "CheckpointedAdjoint",
    "ContinuousAdjoint",
    "ForwardMode",
    "ReverseThroughSolver",
    "SensitivityAlgorithm",
    "default_sensealg",
    "input_size",
]

# What computes f's Jacobian products on the SciPy backend: AD of the user's
# Array-API f with one of these frameworks, or prob.jac ("jac").
AUTODIFF_ENGINES = ("jax", "torch", "jac")


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
    if value is not None and value not in AUTODIFF_ENGINES:
        raise invalid(
            f"{owner}(autodiff=...)",
            "must be 'jax', 'torch', 'jac' or None",
            value,
            "None picks the backend's own framework (on SciPy: jax if installed, "
            "else torch, else prob.jac).",
        )


@dataclass(frozen=True)
class SensitivityAlgorithm:
    """Base class of the gradient methods (the ``sensealg=`` values)."""

    #: The name used in the capability tables and `Solution.sensealg`.
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        options = vars(self)
        for tol in ("rtol", "atol"):
            if tol in options:
                _check_tol(owner, tol, options[tol])
        if "autodiff" in options:
            _check_autodiff(owner, options["autodiff"])


@dataclass(frozen=True)
class ForwardMode(SensitivityAlgorithm):
    """Forward-mode sensitivities: the Jacobian of the solution, one column per input.

    Computes ``d u(t_i) / d(u0, p)`` alongside the solve (forward-mode AD through
    the solver's steps on JAX and torch; the forward sensitivity equations
    ``dS/dt = (df/du) S + df/dp`` on SciPy) and contracts it with the cotangent
    in the reverse pass, as SciMLSensitivity's ``ForwardDiffSensitivity`` does
    under reverse-mode AD.

    Parameters
    ----------
    autodiff : {None, "jax", "torch", "jac"}
        SciPy backend only: what differentiates ``f``. None: JAX if installed,
        else PyTorch, else ``prob.jac`` (which gives gradients with respect to
        ``u0`` only). On JAX and torch it must be None or the backend's name.

    Notes
    -----
    Cost: grows linearly with ``k``, the number of inputs (``u0.size`` plus the
    number of parameters that need a gradient), all ``k`` tangents batched
    along one solve (JAX, torch) or one augmented system (SciPy); memory
    independent of the number of steps. Gradients flow to ``u0`` and ``p``
    only, not to tensors ``f`` closes over. Fastest for few inputs on JAX and
    SciPy (measured crossovers in the docs); for large ``k`` use an adjoint.
    Backends: jax, torch, scipy. On JAX it works under
    ``jax.grad``/``jax.jacrev``/``jax.jit``/``jax.vmap`` (a custom VJP);
    ``jax.jvp``/``jax.jacfwd`` of such a solve are not supported by JAX's
    custom VJPs.
    """

    name: ClassVar[str] = "ForwardMode"
    autodiff: str | None = None


@dataclass(frozen=True)
class ReverseThroughSolver(SensitivityAlgorithm):
    """Reverse-mode AD through every solver step, storing the whole forward pass.

    "Discretise-then-optimise": the exact gradient of the computed solution, with
    the step sizes held fixed (no gradient flows through the step-size
    controller, on every backend).

    Notes
    -----
    Cost: about 2-4 forward solves; memory grows with the number of steps (every
    stage of every step is kept). Backends: jax (diffrax's
    ``RecursiveCheckpointAdjoint`` with one checkpoint per step, i.e. nothing is
    recomputed), torch (autograd through the steps). Not on SciPy, whose solvers
    are not differentiable: use `ForwardMode`, `ContinuousAdjoint` or
    `CheckpointedAdjoint` there.
    """

    name: ClassVar[str] = "ReverseThroughSolver"


@dataclass(frozen=True)
class ContinuousAdjoint(SensitivityAlgorithm):
    """The continuous adjoint ODE solved backward in time.

    Solves ``dλ/dt = -(df/du)^T λ`` and ``dμ/dt = -(df/dp)^T λ`` from ``t1`` back
    to ``t0``, with jumps ``λ += cotangent_i`` at the save times. With an explicit
    alg the state ``u`` is re-integrated backward alongside ("backsolve": Chen et
    al. 2018; torchdiffeq's ``odeint_adjoint``; diffrax's ``BacksolveAdjoint``).
    With an implicit alg ``u`` comes from the forward solve's dense output instead
    (SciMLSensitivity's ``InterpolatingAdjoint``) and the adjoint is integrated
    with the same implicit method: backward in time a stiff problem's fast,
    decaying modes grow, so a backsolve fails or, worse, returns a wrong gradient
    (on ROBER diffrax's was off by a factor 1e69, without an error).

    Parameters
    ----------
    rtol, atol : float, optional
        Tolerances of the backward solve. None: the forward rtol; for atol, the
        forward atol, scaled up to the cotangent's magnitude where the state is
        not integrated backward (implicit algs; see `adjoint_atol`).
    autodiff : {None, "jax", "torch", "jac"}
        SciPy backend only: see `ForwardMode`.

    Notes
    -----
    The backsolve's memory is independent of the number of steps; the
    interpolating form keeps the forward steps' dense output (O(steps)). No
    adaptive integrator is reversible: on chaotic or unstable problems (Lorenz
    over long times) the re-integrated state drifts away from the forward one and
    the gradient is wrong, silently. Prefer `CheckpointedAdjoint` there.
    Backends: jax, torch, scipy.
    """

    name: ClassVar[str] = "ContinuousAdjoint"
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
        are cut into at most `checkpoints` segments (about `checkpoints` for
        fixed-step algs, between half and all of them for adaptive ones, whose
        step count is not known in advance), None meaning ``ceil(sqrt(n_steps))``.
        SciPy: the forward solve is cut into `checkpoints` segments, each recomputed
        with dense output while the adjoint ODE is solved backward against it
        (CVODES-style), None meaning 10.
    rtol, atol : float, optional
        SciPy only: tolerances of the backward adjoint solve; None uses the
        forward solve's.
    autodiff : {None, "jax", "torch", "jac"}
        SciPy backend only: see `ForwardMode`.

    Notes
    -----
    Exact forward states and bounded memory at the price of recomputation. On
    JAX and torch it gives the same gradient as `ReverseThroughSolver` (the
    recomputed steps are the recorded ones). Backends: jax, torch, scipy.
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
    sizes of p's leaves."""

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

    return size(u0) + sum(size(x) for x in leaves(p))


# The default rule: forward mode up to this many inputs (u0.size + parameters),
# an adjoint above. Measured on this project's benchmark (benchmarks/sensealg.py,
# Lotka-Volterra and neural ODEs of growing width, gradient time per sensealg);
# see docs/gradients.md for the numbers behind each threshold.
#
# - jax: ForwardMode beat CheckpointedAdjoint up to 24 inputs and lost from 44 on
#   (neural ODE, 2 states): 32.
# - torch: ForwardMode was slower than the reverse methods at every size measured,
#   from 6 inputs (Lotka-Volterra: ~4x the forward solve against ~2.8x), because
#   each step's forward-mode ops cost more than their reverse: 0, never.
# - scipy: forward sensitivities beat the checkpointed adjoint at every size
#   measured, up to 324 inputs with 2 states (the adjoint's recomputation and two
#   backward passes cost more in Python overhead than the sensitivity matrix):
#   256, kept below the largest size measured.
FORWARD_MODE_MAX_INPUTS: dict[str, int] = {"jax": 32, "torch": 0, "scipy": 256}


def default_sensealg(backend: str, u0: Any, p: Any) -> SensitivityAlgorithm:
    """The gradient method ``sensealg=None`` stands for.

    `ForwardMode` when ``u0.size`` plus the number of parameters is at most
    ``FORWARD_MODE_MAX_INPUTS[backend]``; otherwise `CheckpointedAdjoint` (exact
    forward states with bounded memory, the field's recommended default).
    """
    limit = FORWARD_MODE_MAX_INPUTS.get(backend, 0)
    if input_size(u0, p) <= limit:
        return ForwardMode()
    return CheckpointedAdjoint()


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
    xp = array_namespace(cotangent)
    big = xp.max(xp.abs(states))
    tiny = xp.finfo(states.dtype).tiny
    scale = xp.max(xp.abs(cotangent)) / xp.maximum(
        big, xp.asarray(tiny, dtype=big.dtype)
    )
    return atol * xp.maximum(scale, xp.asarray(1.0, dtype=scale.dtype))
