"""Built-in problems: ODEs users and tests share, each with its saveat, suggested
tolerances and, where published, reference values.

Every right-hand side is written once against the Array API (``xp =
dk.array_namespace(u)``), so the same problem runs on every backend; ``u0`` and
``p`` are float64 NumPy arrays (each backend converts them). Importing this module
imports NumPy only.

The stiff problems (ROBER, Van der Pol with mu = 1000, HIRES) come from the IVP
test set (Mazzia and Magherini, release 2.4) with its reference values; the
fitting problems (Lotka-Volterra, the cubic spiral, Lorenz, a two-compartment
PK model, a neural ODE whose weights are the pytree ``p``) carry synthetic
observations. `get(name, **options)` and `names()` look them up by name.

Examples
--------
>>> import diffeqkit as dk
>>> bp = dk.problems.rober()
>>> bp.prob.tspan
(0.0, 100000000000.0)
>>> sol = dk.solve(bp.prob, "bdf", saveat=bp.saveat, rtol=bp.rtol, atol=bp.atol)
>>> bool(abs(sol.u[-1, 0] / bp.reference.u[0] - 1) < 1e-3)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from ._arrays import array_namespace, to_numpy
from ._errors import InvalidProblemError, invalid, listing, short
from ._problem import ODEProblem

__all__ = [
    "BuiltinProblem",
    "Reference",
    "brusselator",
    "cubic_spiral",
    "get",
    "hires",
    "lorenz",
    "lotka_volterra",
    "names",
    "neural_ode",
    "neural_ode_size",
    "pk_two_compartment",
    "rober",
    "van_der_pol",
]

_TESTSET = (
    "IVP test set (F. Mazzia and C. Magherini, Test Set for IVP Solvers, "
    "release 2.4, University of Bari)"
)


@dataclass(frozen=True)
class Reference:
    """Published values of the solution at one time.

    Attributes
    ----------
    t : float
        The time of the values.
    u : numpy.ndarray
        The solution there (float64).
    source : str
        Where the values come from.
    """

    t: float
    u: np.ndarray
    source: str


@dataclass(frozen=True)
class BuiltinProblem:
    """A built-in problem and what is known about it.

    Attributes
    ----------
    name : str
        Its name in `names()`.
    prob : ODEProblem
        The problem; ``u0`` and ``p`` are float64 NumPy arrays.
    saveat : numpy.ndarray
        Save times that show the solution's character.
    rtol, atol : float
        Suggested tolerances: for the stiff problems, those that reproduce
        `reference` to a few digits with a stiff solver; for the others, those of
        a typical fit.
    stiff : bool
        Whether explicit solvers stall on it.
    reference : Reference or None
        Published values of the solution, where known.
    description : str
        One line for listings.
    data : numpy.ndarray or None
        Synthetic observations at `saveat`, shape ``(len(saveat), *u0.shape)``:
        the solution of a tight solve (``dopri8``, ``rtol = atol = 1e-12``, on
        SciPy when installed) plus seeded Gaussian noise whose standard deviation
        is the builder's ``noise`` times each component's root-mean-square over
        `saveat`. None for problems built without data (the stiff ones).
    """

    name: str
    prob: ODEProblem
    saveat: np.ndarray
    rtol: float
    atol: float
    stiff: bool
    reference: Reference | None
    description: str
    data: np.ndarray | None = None


# ---------------------------------------------------------------------------------
# ROBER: Robertson's autocatalytic reaction.
# ---------------------------------------------------------------------------------


def rober_rhs(u: Any, p: Any, t: Any) -> Any:
    """Robertson's reactions; ``p = (k1, k2, k3)``."""
    xp = array_namespace(u)
    k1, k2, k3 = p[0], p[1], p[2]
    r1 = k1 * u[0]
    r2 = k2 * u[1] * u[1]
    r3 = k3 * u[1] * u[2]
    return xp.stack([-r1 + r3, r1 - r2 - r3, r2])


def rober_jac(u: Any, p: Any, t: Any) -> Any:
    """df/du of `rober_rhs`."""
    xp = array_namespace(u)
    k1, k2, k3 = p[0], p[1], p[2]
    zero = 0.0 * u[0]
    a = k1 + zero
    b = k3 * u[2]
    c = k3 * u[1]
    d = 2.0 * k2 * u[1]
    return xp.stack(
        [
            xp.stack([-a, b, c]),
            xp.stack([a, -b - d, -c]),
            xp.stack([zero, d, zero]),
        ]
    )


def rober(t1: float = 1e11, *, jac: bool = False) -> BuiltinProblem:
    """ROBER: ``k1 = 0.04, k2 = 3e7, k3 = 1e4``, ``u0 = (1, 0, 0)`` on ``[0, t1]``.

    The classic stiff chemical kinetics problem: the fast reaction ``k2`` makes
    explicit solvers stall, while the solution changes on every time scale up to
    ``t = 1e11``. The reference values (at ``t1 = 1e11`` only) are the IVP test
    set's. ``jac=True`` attaches the analytic Jacobian as ``prob.jac``.
    """
    if not t1 > 0:
        raise InvalidProblemError(f"t1 must be > 0; got t1={short(t1)}.")
    decades = np.logspace(-5.0, np.log10(t1), int(np.log10(t1)) + 6)
    ref = None
    if t1 == 1e11:
        u = [0.2083340149701255e-07, 0.8333360770334713e-13, 0.9999999791665050]
        ref = Reference(1e11, np.array(u), _TESTSET)
    prob = ODEProblem(
        rober_rhs,
        np.array([1.0, 0.0, 0.0]),
        (0.0, float(t1)),
        np.array([0.04, 3e7, 1e4]),
        jac=rober_jac if jac else None,
    )
    return BuiltinProblem(
        "rober",
        prob,
        np.concatenate([[0.0], decades]),
        rtol=1e-8,
        atol=1e-14,
        stiff=True,
        reference=ref,
        description="Robertson's chemical kinetics (stiff, 3 species)",
    )


# ---------------------------------------------------------------------------------
# VDPOL: Van der Pol's oscillator, relaxation regime.
# ---------------------------------------------------------------------------------


def van_der_pol_rhs(u: Any, p: Any, t: Any) -> Any:
    """Van der Pol in the test set's scaled time; ``p = (mu,)``."""
    xp = array_namespace(u)
    mu = p[0]
    return xp.stack([u[1], ((1.0 - u[0] * u[0]) * u[1] - u[0]) * (mu * mu)])


def van_der_pol_jac(u: Any, p: Any, t: Any) -> Any:
    """df/du of `van_der_pol_rhs`."""
    xp = array_namespace(u)
    mu2 = p[0] * p[0]
    zero = 0.0 * u[0]
    return xp.stack(
        [
            xp.stack([zero, zero + 1.0]),
            xp.stack([(-2.0 * u[0] * u[1] - 1.0) * mu2, (1.0 - u[0] * u[0]) * mu2]),
        ]
    )


def van_der_pol(mu: float = 1000.0, *, jac: bool = False) -> BuiltinProblem:
    """VDPOL: ``y'' - mu (1 - y^2) y' + y = 0`` in scaled time, ``mu = 1000``.

    The test set's form: with ``t = T / mu`` and ``eps = 1 / mu^2``, ``u0' = u1``,
    ``u1' = ((1 - u0^2) u1 - u0) / eps`` on ``[0, 2]`` from ``u = (2, 0)``. The
    reference values (for ``mu = 1000`` only) are the test set's.
    """
    if not mu > 0:
        raise InvalidProblemError(f"mu must be > 0; got mu={short(mu)}.")
    ref = None
    if mu == 1000.0:
        u = [0.1706167732170483e1, -0.8928097010247975e0]
        ref = Reference(2.0, np.array(u), _TESTSET)
    prob = ODEProblem(
        van_der_pol_rhs,
        np.array([2.0, 0.0]),
        (0.0, 2.0),
        np.array([float(mu)]),
        jac=van_der_pol_jac if jac else None,
    )
    return BuiltinProblem(
        "van_der_pol",
        prob,
        np.linspace(0.0, 2.0, 21),
        rtol=1e-8,
        atol=1e-10,
        stiff=mu >= 10.0,
        reference=ref,
        description=f"Van der Pol oscillator, mu = {mu:g} (relaxation; stiff)",
    )


# ---------------------------------------------------------------------------------
# HIRES: plant photomorphogenesis (Schäfer 1975), 8 species.
# ---------------------------------------------------------------------------------

# The 12 rate constants, in the order the right-hand side reads them.
HIRES_P = np.array(
    [1.71, 0.43, 8.32, 0.0007, 8.75, 10.03, 0.035, 1.12, 1.745, 280.0, 0.69, 1.81]
)


def hires_rhs(u: Any, p: Any, t: Any) -> Any:
    """HIRES; ``p`` = `HIRES_P`'s 12 constants."""
    xp = array_namespace(u)
    a, b, c, d, e, f, g, h, i, k, m, n = (p[j] for j in range(12))
    y1, y2, y3, y4, y5, y6, y7, y8 = (u[j] for j in range(8))
    r = k * y6 * y8
    return xp.stack(
        [
            -a * y1 + b * y2 + c * y3 + d,
            a * y1 - e * y2,
            -f * y3 + b * y4 + g * y5,
            c * y2 + a * y3 - h * y4,
            -i * y5 + b * (y6 + y7),
            -r + m * y4 + a * y5 - b * y6 + m * y7,
            r - n * y7,
            -r + n * y7,
        ]
    )


def hires(*, jac: bool = False) -> BuiltinProblem:
    """HIRES: 8 chemical species on ``[0, 321.8122]`` (test set reference).

    ``jac=True`` attaches a Jacobian computed from the structure of `hires_rhs`
    (for SciPy without an autodiff framework).
    """
    prob = ODEProblem(
        hires_rhs,
        np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057]),
        (0.0, 321.8122),
        HIRES_P.copy(),
        jac=hires_jac if jac else None,
    )
    u = [
        0.73713125733256e-3,
        0.14424857263161e-3,
        0.58887297409675e-4,
        0.11756513432831e-2,
        0.23863561988313e-2,
        0.62389682527427e-2,
        0.28499983951857e-2,
        0.28500016048142e-2,
    ]
    return BuiltinProblem(
        "hires",
        prob,
        np.concatenate([np.linspace(0.0, 5.0, 11), [321.8122]]),
        rtol=1e-8,
        atol=1e-12,
        stiff=True,
        reference=Reference(321.8122, np.array(u), _TESTSET),
        description="HIRES plant physiology kinetics (stiff, 8 species)",
    )


def hires_jac(u: Any, p: Any, t: Any) -> Any:
    """df/du of `hires_rhs`."""
    xp = array_namespace(u)
    a, b, c, _, e, f, g, h, i, k, m, n = (p[j] for j in range(12))
    z = 0.0 * u[0]
    y6, y8 = u[5], u[7]
    rows = [
        [-a, b, c, z, z, z, z, z],
        [a, -e, z, z, z, z, z, z],
        [z, z, -f, b, g, z, z, z],
        [z, c, a, -h, z, z, z, z],
        [z, z, z, z, -i, b, b, z],
        [z, z, z, m, a, -k * y8 - b, m, -k * y6],
        [z, z, z, z, z, k * y8, -n, k * y6],
        [z, z, z, z, z, -k * y8, n, -k * y6],
    ]
    return xp.stack([xp.stack([x + z for x in row]) for row in rows])


# ---------------------------------------------------------------------------------
# Option checks and synthetic data, shared by the non-stiff builders.
# ---------------------------------------------------------------------------------


# The fix each option's error suggests: its default, which the builder documents.
_FIX = {
    "t1": "Pass an end time > 0, e.g. t1=10.0.",
    "dose": "Pass a dose in mg, e.g. dose=100.0.",
    "n_saves": "Pass e.g. n_saves=101.",
    "n": "Pass the number of grid points, e.g. n=32.",
    "width": "Pass e.g. width=16.",
    "depth": "Pass the number of hidden layers, e.g. depth=2.",
    "dim": "Pass the number of states, e.g. dim=2.",
    "u0": "See the builder's docstring for the default.",
    "p": "See the builder's docstring for the default.",
}


def _positive(name: str, value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise invalid(name, "must be a positive, finite number", value, _FIX[name])
    return float(value)


def _nonnegative(name: str, value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise invalid(
            name, "must be a finite number >= 0", value, "Pass e.g. 0.05, or 0."
        )
    return float(value)


def _count(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise invalid(name, f"must be an int >= {least}", value, _FIX[name])
    return value


def _vector(name: str, value: Any, size: int, positive: bool = False) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise invalid(name, f"must be {size} numbers", value, _FIX[name]) from err
    if arr.shape != (size,) or not np.all(np.isfinite(arr)):
        raise invalid(name, f"must be {size} finite numbers", value, _FIX[name])
    if positive and not np.all(arr > 0):
        raise invalid(name, "must have positive entries", value, _FIX[name])
    return arr


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid("seed", "must be an int >= 0", value, "Pass e.g. seed=0.")
    return value


def _synthetic_data(
    prob: ODEProblem, saveat: np.ndarray, noise: float, seed: int
) -> np.ndarray:
    """The solution of a tight solve at `saveat` plus Gaussian noise of standard
    deviation `noise` times each component's RMS over `saveat`."""
    from . import backends
    from ._solve import solve

    # SciPy is the reference integrator (float64, no JIT); torch, then jax, when
    # SciPy is missing (jax always brings SciPy). With none, SciPy's pip line.
    order = [backends.DEFAULT, *(b for b in backends.SPECS if b != backends.DEFAULT)]
    backend = next((b for b in order if backends.installed(b)), backends.DEFAULT)
    # dopri8 at 1e-12: errors near 1e-11, far below any noise level worth adding.
    sol = solve(prob, "dopri8", backend=backend, saveat=saveat, rtol=1e-12, atol=1e-12)
    truth = to_numpy(sol.u).astype(np.float64)
    if noise == 0.0:
        return truth
    rms = np.sqrt(np.mean(truth**2, axis=0))
    rng = np.random.default_rng(seed)
    return truth + noise * rms * rng.standard_normal(truth.shape)


def _fitting(
    name: str,
    rhs: Callable[..., Any],
    u0: np.ndarray,
    p: np.ndarray,
    t1: Any,
    n_saves: Any,
    noise: Any,
    seed: Any,
    description: str,
) -> BuiltinProblem:
    """A non-stiff fitting problem on ``[0, t1]``: equally spaced saves, synthetic
    data, ``rtol=1e-6, atol=1e-8``; `description` may use ``{t1}``."""
    t1 = _positive("t1", t1)
    saveat = _saves(0.0, t1, n_saves)
    prob = ODEProblem(rhs, u0, (0.0, t1), p)
    return BuiltinProblem(
        name,
        prob,
        saveat,
        rtol=1e-6,
        atol=1e-8,
        stiff=False,
        reference=None,
        description=description.format(t1=f"{t1:g}"),
        data=_synthetic_data(prob, saveat, _nonnegative("noise", noise), _seed(seed)),
    )


def _saves(t0: float, t1: float, n_saves: Any) -> np.ndarray:
    return np.linspace(t0, t1, _count("n_saves", n_saves, 2))


# ---------------------------------------------------------------------------------
# Lotka-Volterra predator-prey.
# ---------------------------------------------------------------------------------


def lotka_volterra_rhs(u: Any, p: Any, t: Any) -> Any:
    """``x' = a x - b x y``, ``y' = -c y + d x y``; ``p = (a, b, c, d)``."""
    xp = array_namespace(u)
    a, b, c, d = p[0], p[1], p[2], p[3]
    return xp.stack([a * u[0] - b * u[0] * u[1], -c * u[1] + d * u[0] * u[1]])


def lotka_volterra(
    *,
    u0: Sequence[float] = (1.0, 1.0),
    p: Sequence[float] = (1.5, 1.0, 3.0, 1.0),
    t1: float = 10.0,
    n_saves: int = 101,
    noise: float = 0.05,
    seed: int = 0,
) -> BuiltinProblem:
    """Lotka-Volterra predator-prey: ``x' = a x - b x y``, ``y' = -c y + d x y``.

    The defaults are DiffEqFlux's tutorial values: ``u0 = (1, 1)``,
    ``p = (a, b, c, d) = (1.5, 1, 3, 1)`` on ``[0, 10]``, saved at `n_saves`
    equally spaced times (about three periods). 2 states and 4 parameters: the
    regime where forward mode is expected to win.

    Parameters
    ----------
    u0 : two numbers
        Prey and predator at ``t = 0``.
    p : four numbers
        ``(a, b, c, d)``.
    t1 : float
        End time, > 0.
    n_saves : int
        Number of equally spaced save times on ``[0, t1]``, >= 2.
    noise : float
        Standard deviation of the data's noise, relative to each component's
        RMS, >= 0.
    seed : int
        Seed of the noise.
    """
    return _fitting(
        "lotka_volterra",
        lotka_volterra_rhs,
        _vector("u0", u0, 2, positive=True),
        _vector("p", p, 4, positive=True),
        t1,
        n_saves,
        noise,
        seed,
        "Lotka-Volterra predator-prey (2 states, 4 parameters)",
    )


# ---------------------------------------------------------------------------------
# The cubic spiral of the neural-ODE literature.
# ---------------------------------------------------------------------------------

# Chen et al. 2018's torchdiffeq demo (examples/ode_demo.py) and DiffEqFlux's
# neural-ODE tutorial: u' = (u^3) A with this A, u0 = (2, 0), t in [0, 25].
CUBIC_SPIRAL_A = np.array([[-0.1, 2.0], [-2.0, -0.1]])


def cubic_spiral_rhs(u: Any, p: Any, t: Any) -> Any:
    """``u' = (u ** 3) @ A`` with ``A = p`` (a 2 x 2 matrix)."""
    return (u**3) @ p


def cubic_spiral(
    *,
    t1: float = 25.0,
    n_saves: int = 100,
    noise: float = 0.0,
    seed: int = 0,
) -> BuiltinProblem:
    """The cubic spiral: ``u' = (u^3) A``, ``A = [[-0.1, 2], [-2, -0.1]]``.

    The target trajectory of the neural-ODE literature (torchdiffeq's
    ``ode_demo.py``, DiffEqFlux's first tutorial): ``u0 = (2, 0)`` on
    ``[0, 25]``, a spiral decaying towards the origin. ``p`` is the matrix ``A``
    (4 parameters). Those demos save 1000 points; the default here is 100, which
    shows the same curve at a tenth of the saving cost. The data are noise-free
    by default, as there.

    Parameters
    ----------
    t1 : float
        End time, > 0.
    n_saves : int
        Number of equally spaced save times on ``[0, t1]``, >= 2.
    noise : float
        Standard deviation of the data's noise relative to each component's RMS.
    seed : int
        Seed of the noise.
    """
    return _fitting(
        "cubic_spiral",
        cubic_spiral_rhs,
        np.array([2.0, 0.0]),
        CUBIC_SPIRAL_A.copy(),
        t1,
        n_saves,
        noise,
        seed,
        "cubic spiral u' = (u^3) A of the neural-ODE demos (2 states)",
    )


# ---------------------------------------------------------------------------------
# Lorenz.
# ---------------------------------------------------------------------------------


def lorenz_rhs(u: Any, p: Any, t: Any) -> Any:
    """Lorenz 1963; ``p = (sigma, rho, beta)``."""
    xp = array_namespace(u)
    sigma, rho, beta = p[0], p[1], p[2]
    x, y, z = u[0], u[1], u[2]
    return xp.stack([sigma * (y - x), x * (rho - z) - y, x * y - beta * z])


def lorenz(
    *,
    t1: float = 1.0,
    n_saves: int = 101,
    noise: float = 0.05,
    seed: int = 0,
) -> BuiltinProblem:
    """Lorenz: ``sigma = 10, rho = 28, beta = 8/3``, ``u0 = (1, 0, 0)``.

    The default span ``[0, 1]`` is short on purpose. The largest Lyapunov exponent
    is about 0.9, so perturbations (and gradients) grow like ``e^{0.9 t}``: over
    ``[0, 1]`` gradients are well conditioned and every method can be checked
    against a reference, while the backward re-integration of `ContinuousAdjoint`
    already expands volumes like ``e^{13.7 t}`` (the sum of the Lyapunov
    exponents, ``-(sigma + 1 + beta)``, reversed). Over ``[0, 100]`` gradients
    are dominated by chaos and the backsolve adjoint fails (docs/gradients.md);
    pass a larger `t1` to see that.

    Parameters
    ----------
    t1 : float
        End time, > 0.
    n_saves : int
        Number of equally spaced save times on ``[0, t1]``, >= 2.
    noise : float
        Standard deviation of the data's noise relative to each component's RMS.
    seed : int
        Seed of the noise.
    """
    return _fitting(
        "lorenz",
        lorenz_rhs,
        np.array([1.0, 0.0, 0.0]),
        np.array([10.0, 28.0, 8.0 / 3.0]),
        t1,
        n_saves,
        noise,
        seed,
        "Lorenz 1963 on [0, {t1}] (chaotic; 3 states, 3 parameters)",
    )


# ---------------------------------------------------------------------------------
# Two-compartment pharmacokinetics with first-order oral absorption.
# ---------------------------------------------------------------------------------

# Sampling times of a typical single-dose study (hours).
PK_TIMES = np.array([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 24.0])


def pk_two_compartment_rhs(u: Any, p: Any, t: Any) -> Any:
    """Oral two-compartment PK; ``u = (gut amount, central concentration,
    peripheral amount)``, ``p = (ka, k10, k12, k21, V)``."""
    xp = array_namespace(u)
    ka, k10, k12, k21, v = p[0], p[1], p[2], p[3], p[4]
    gut, conc, periph = u[0], u[1], u[2]
    return xp.stack(
        [
            -ka * gut,
            (ka * gut + k21 * periph) / v - (k10 + k12) * conc,
            k12 * v * conc - k21 * periph,
        ]
    )


def pk_two_compartment(
    *,
    dose: float = 100.0,
    p: Sequence[float] = (1.0, 0.2, 0.3, 0.15, 10.0),
    saveat: Sequence[float] | None = None,
    noise: float = 0.05,
    seed: int = 0,
) -> BuiltinProblem:
    """Two-compartment pharmacokinetics after an oral dose.

    With ``A_g`` the amount in the gut, ``C`` the concentration in the central
    compartment (volume ``V``) and ``A_p`` the amount in the peripheral one::

        A_g' = -ka A_g
        C'   = (ka A_g + k21 A_p) / V - (k10 + k12) C
        A_p' = k12 V C - k21 A_p

    i.e. first-order absorption ``ka``, elimination ``k10`` from the central
    compartment and exchange ``k12``, ``k21`` between the two, the standard
    linear model written in rate constants (the central amount is ``V C``). The
    state carries ``C`` rather than the central amount so that the measured
    quantity is a state and ``V`` a parameter of ``f``. ``u0 = (dose, 0, 0)`` on
    ``[0, 24]`` hours; units mg, L, 1/h.

    Parameters
    ----------
    dose : float
        The oral dose (mg), > 0.
    p : five numbers
        ``(ka, k10, k12, k21, V)`` (1/h and L): rates >= 0, ``V > 0``. The defaults are
        typical of a small-molecule drug (absorption half-life 0.7 h,
        elimination half-life about 3.5 h from the central compartment).
    saveat : increasing times in ``(0, 24]``, optional
        Sampling times (hours); default `PK_TIMES`, a typical single-dose
        schedule (0.25 h to 24 h).
    noise : float
        Standard deviation of the data's noise relative to each component's RMS
        (a proportional assay error would be the next refinement).
    seed : int
        Seed of the noise.
    """
    dose = _positive("dose", dose)
    params = _vector("p", p, 5)
    if np.any(params[:4] < 0) or params[4] <= 0:
        raise invalid(
            "p",
            "must hold rate constants (ka, k10, k12, k21) >= 0 and a volume V > 0",
            p,
            "Pass e.g. p=(1.0, 0.2, 0.3, 0.15, 10.0).",
        )
    times = PK_TIMES.copy() if saveat is None else np.asarray(saveat, dtype=float)
    ok = (
        times.ndim == 1
        and times.size >= 1
        and bool(np.all(np.isfinite(times)))
        and bool(np.all(np.diff(times) > 0))
        and times[0] >= 0.0
        and times[-1] <= 24.0
    )
    if not ok:
        raise invalid(
            "saveat",
            "must be increasing times in [0, 24] (hours)",
            saveat,
            "Pass e.g. saveat=[0.5, 1, 2, 4, 8, 24], or None for PK_TIMES.",
        )
    prob = ODEProblem(
        pk_two_compartment_rhs, np.array([dose, 0.0, 0.0]), (0.0, 24.0), params
    )
    return BuiltinProblem(
        "pk_two_compartment",
        prob,
        times,
        rtol=1e-6,
        atol=1e-8,
        stiff=False,
        reference=None,
        description="two-compartment pharmacokinetics, oral dose (3 states, 5 "
        "parameters)",
        data=_synthetic_data(prob, times, _nonnegative("noise", noise), _seed(seed)),
    )


# ---------------------------------------------------------------------------------
# A neural ODE: a tanh MLP whose weights are the pytree p.
# ---------------------------------------------------------------------------------


def neural_ode_rhs(u: Any, p: Any, t: Any) -> Any:
    """A tanh MLP ``u -> W_L tanh(... tanh(W_0 u + b_0) ...) + b_L``; ``p`` holds
    ``W0, b0, ..., W{L}, b{L}``."""
    xp = array_namespace(u)
    last = len(p) // 2 - 1
    h = u
    for i in range(last):
        h = xp.tanh(p[f"W{i}"] @ h + p[f"b{i}"])
    return p[f"W{last}"] @ h + p[f"b{last}"]


def neural_ode_size(width: int = 16, depth: int = 2, dim: int = 2) -> int:
    """The number of parameters of `neural_ode` (weights and biases):
    ``2 dim w + w + (depth - 1)(w^2 + w) + dim``."""
    return 2 * dim * width + width + (depth - 1) * (width * width + width) + dim


def neural_ode(
    width: int = 16,
    depth: int = 2,
    dim: int = 2,
    seed: int = 0,
    *,
    t1: float = 1.0,
    n_saves: int = 21,
    noise: float = 0.05,
) -> BuiltinProblem:
    """A neural ODE ``u' = MLP(u)`` whose weights are the dict pytree ``p``.

    ``depth`` hidden tanh layers of ``width`` units map the ``dim`` states to
    their derivatives. ``p`` is ``{"W0": (width, dim), "b0": (width,), "W1":
    (width, width), ..., "W{depth}": (dim, width), "b{depth}": (dim,)}`` as float64
    NumPy arrays, so each backend converts the same weights and runs the same
    network; `neural_ode_size` gives the parameter count. Weights are drawn
    ``N(0, 1/fan_in)`` (LeCun), biases ``N(0, 0.1^2)``, and ``u0 ~ N(0, 1)``, all
    from `seed`. On ``[0, 1]``, saved at 21 points.

    Parameters
    ----------
    width : int
        Units per hidden layer, >= 1.
    depth : int
        Number of hidden layers, >= 1.
    dim : int
        Number of states, >= 1.
    seed : int
        Seed of the weights, of ``u0`` and of the data's noise.
    t1 : float
        End time, > 0.
    n_saves : int
        Number of equally spaced save times on ``[0, t1]``, >= 2.
    noise : float
        Standard deviation of the data's noise relative to each component's RMS.
    """
    width = _count("width", width, 1)
    depth = _count("depth", depth, 1)
    dim = _count("dim", dim, 1)
    seed = _seed(seed)
    t1 = _positive("t1", t1)
    saveat = _saves(0.0, t1, n_saves)
    rng = np.random.default_rng(seed)
    sizes = [dim, *([width] * depth), dim]
    params: dict[str, np.ndarray] = {}
    for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
        params[f"W{i}"] = rng.normal(
            scale=1.0 / np.sqrt(fan_in), size=(fan_out, fan_in)
        )
        params[f"b{i}"] = rng.normal(scale=0.1, size=fan_out)
    prob = ODEProblem(neural_ode_rhs, rng.normal(size=dim), (0.0, t1), params)
    return BuiltinProblem(
        "neural_ode",
        prob,
        saveat,
        rtol=1e-6,
        atol=1e-8,
        stiff=False,
        reference=None,
        description=f"neural ODE, tanh MLP {dim} -> {width} x {depth} -> {dim} "
        f"({neural_ode_size(width, depth, dim)} parameters)",
        data=_synthetic_data(prob, saveat, _nonnegative("noise", noise), seed + 1),
    )


# ---------------------------------------------------------------------------------
# BRUSS: the 1-D Brusselator with diffusion, a stiff problem of any size.
# ---------------------------------------------------------------------------------


def brusselator_rhs(y: Any, p: Any, t: Any) -> Any:
    """The method-of-lines Brusselator; ``y = (u_1..u_N, v_1..v_N)``, ``p =
    (alpha,)``, boundary values ``u = 1``, ``v = 3``."""
    xp = array_namespace(y)
    n = y.shape[0] // 2
    u, v = y[:n], y[n:]
    one = u[:1] * 0.0 + 1.0
    c = p[0] * (n + 1) ** 2
    lap_u = xp.concat([one, u[:-1]]) - 2.0 * u + xp.concat([u[1:], one])
    lap_v = xp.concat([3.0 * one, v[:-1]]) - 2.0 * v + xp.concat([v[1:], 3.0 * one])
    uuv = u * u * v
    return xp.concat([1.0 + uuv - 4.0 * u + c * lap_u, 3.0 * u - uuv + c * lap_v])


def brusselator(n: int = 32) -> BuiltinProblem:
    """BRUSS (Hairer and Wanner, Solving ODEs II, section IV.10): the Brusselator
    reaction with diffusion ``alpha = 1/50`` on ``x`` in ``(0, 1)``, discretised on
    `n` interior points (``2 n`` states) over ``t`` in ``[0, 10]``, from ``u =
    1 + sin(2 pi x)``, ``v = 3``.

    Its stiffness grows like ``n^2`` (the diffusion's fastest rate is about ``4
    alpha (n + 1)^2``), so it measures how an implicit solver's Jacobian scales
    with the size of the state. No reference values.
    """
    n = _count("n", n, 2)
    x = np.arange(1, n + 1) / (n + 1)
    prob = ODEProblem(
        brusselator_rhs,
        np.concatenate([1.0 + np.sin(2 * np.pi * x), np.full(n, 3.0)]),
        (0.0, 10.0),
        np.array([1.0 / 50.0]),
    )
    return BuiltinProblem(
        "brusselator",
        prob,
        np.linspace(0.0, 10.0, 11),
        rtol=1e-6,
        atol=1e-8,
        stiff=True,
        reference=None,
        description=f"Brusselator with diffusion, {2 * n} states (stiff)",
    )


_BUILDERS: Mapping[str, Callable[..., BuiltinProblem]] = {
    "lotka_volterra": lotka_volterra,
    "cubic_spiral": cubic_spiral,
    "lorenz": lorenz,
    "pk_two_compartment": pk_two_compartment,
    "neural_ode": neural_ode,
    "rober": rober,
    "van_der_pol": van_der_pol,
    "hires": hires,
    "brusselator": brusselator,
}


def names() -> list[str]:
    """The built-in problems' names."""
    return list(_BUILDERS)


def get(name: str, **options: Any) -> BuiltinProblem:
    """The built-in problem `name`, built with `options` (see each builder)."""
    if name not in _BUILDERS:
        raise InvalidProblemError(
            f"no built-in problem named {short(name)}; the names are "
            f"{listing(names())}."
        )
    return _BUILDERS[name](**options)
