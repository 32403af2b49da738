"""The neutral solver names: one lower-case name per method for every backend.

Each name maps to what the core needs to know to validate a call (is `dt0`
required? is it implicit?) and to word hints; which backend offers which name is
declared in the backend registry, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ._errors import unknown_alg

__all__ = ["ALGS", "AlgInfo", "get_alg"]

Kind = Literal["fixed", "adaptive", "implicit"]


@dataclass(frozen=True)
class AlgInfo:
    """What a neutral solver name means.

    Attributes
    ----------
    name : str
        The neutral name, e.g. ``"tsit5"``.
    kind : {"fixed", "adaptive", "implicit"}
        Fixed-step explicit (needs `dt0`), adaptive explicit, or implicit (stiff).
    order : int
        Order of the propagated solution.
    description : str
        One line for `info` and the docs.
    tableau : str or None
        Name in `diffeqkit._tableaux` when the method is an explicit Runge-Kutta
        method built from a shared tableau.
    """

    name: str
    kind: Kind
    order: int
    description: str
    tableau: str | None = None

    @property
    def fixed_step(self) -> bool:
        return self.kind == "fixed"

    @property
    def implicit(self) -> bool:
        return self.kind == "implicit"


def _table(*algs: AlgInfo) -> dict[str, AlgInfo]:
    return {a.name: a for a in algs}


ALGS: Mapping[str, AlgInfo] = _table(
    AlgInfo("euler", "fixed", 1, "explicit Euler", "euler"),
    AlgInfo("midpoint", "fixed", 2, "explicit midpoint", "midpoint"),
    AlgInfo("heun", "fixed", 2, "Heun's trapezoidal method", "heun"),
    AlgInfo("rk4", "fixed", 4, "classical 4th-order Runge-Kutta", "rk4"),
    AlgInfo("bosh3", "adaptive", 3, "Bogacki-Shampine 3(2) (SciPy's RK23)", "bosh3"),
    AlgInfo("dopri5", "adaptive", 5, "Dormand-Prince 5(4) (SciPy's RK45)", "dopri5"),
    AlgInfo("tsit5", "adaptive", 5, "Tsitouras 5(4)", "tsit5"),
    AlgInfo("dopri8", "adaptive", 8, "Prince-Dormand 8(7), 13 stages", "dopri8"),
    AlgInfo("implicit_euler", "implicit", 1, "implicit (backward) Euler, L-stable"),
    AlgInfo("kvaerno3", "implicit", 3, "Kvaerno 3(2) ESDIRK, L-stable"),
    AlgInfo("kvaerno4", "implicit", 4, "Kvaerno 4(3) ESDIRK, L-stable"),
    AlgInfo("kvaerno5", "implicit", 5, "Kvaerno 5(4) ESDIRK, L-stable"),
    AlgInfo("kencarp3", "implicit", 3, "Kennedy-Carpenter 3(2) ESDIRK, L-stable"),
    AlgInfo("kencarp4", "implicit", 4, "Kennedy-Carpenter 4(3) ESDIRK, L-stable"),
    AlgInfo("kencarp5", "implicit", 5, "Kennedy-Carpenter 5(4) ESDIRK, L-stable"),
    AlgInfo("bdf", "implicit", 5, "variable-order BDF (orders 1-5)"),
    AlgInfo("radau", "implicit", 5, "Radau IIA, 3 stages, order 5"),
    AlgInfo("lsoda", "implicit", 12, "LSODA: Adams/BDF with automatic switching"),
    AlgInfo(
        "rosenbrock23", "implicit", 2, "Rosenbrock 2(3) (MATLAB's ode23s), L-stable"
    ),
    AlgInfo("rodas4", "implicit", 4, "Rosenbrock 4(3) RODAS (Hairer-Wanner), L-stable"),
)


def get_alg(alg: object) -> AlgInfo:
    """Look up a neutral solver name; unknown names raise `UnsupportedError`."""
    if isinstance(alg, str) and alg in ALGS:
        return ALGS[alg]
    raise unknown_alg(alg, ALGS)
