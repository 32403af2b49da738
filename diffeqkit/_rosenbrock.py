"""Rosenbrock tableaux, as data, for the backends' linearly implicit solvers.

A Rosenbrock method with ``s`` stages is stored in the transformed form that
Hairer & Wanner use in their codes (Solving ODEs II, 2nd ed., section IV.7,
eq. (7.25)), which needs no matrix-vector products with the Jacobian ``J``::

    (I / (h gamma) - J) u_i = f(t0 + c_i h, y0 + sum_j a_ij u_j)
                              + sum_j (C_ij / h) u_j + h d_i f_t(t0, y0)
    y1 = y0 + sum_i m_i u_i,    y1_hat = y0 + sum_i m_hat_i u_i

with ``a`` and ``C`` strictly lower triangular. The classical form of the same
method (section IV.7, eq. (7.4)), in which the order conditions are written, has
the coefficients ``Gamma = (diag(1 / gamma) - C)^-1`` (lower triangular, diagonal
``gamma``), ``alpha = a Gamma``, ``b = m Gamma`` and ``b_hat = m_hat Gamma``;
`RosenbrockTableau.classical` returns them. Consistency asks ``c_i = sum_j
alpha_ij`` and ``d_i = sum_j Gamma_ij`` (tests check both).

Imports nothing but NumPy and the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = ["ROSENBROCK_TABLEAUX", "Classical", "RosenbrockTableau"]

Rows = tuple[tuple[float, ...], ...]


class Classical(NamedTuple):
    """The classical coefficients ``(alpha, Gamma, b, b_hat)`` of a tableau."""

    alpha: npt.NDArray[np.float64]
    gamma: npt.NDArray[np.float64]
    b: npt.NDArray[np.float64]
    b_hat: npt.NDArray[np.float64]


@dataclass(frozen=True)
class RosenbrockTableau:
    """A Rosenbrock method in Hairer & Wanner's transformed form (module docstring).

    Attributes
    ----------
    name : str
        The neutral alg name.
    order, error_order : int
        Orders of ``y1`` and of the embedded ``y1_hat``.
    gamma : float
        The diagonal of ``Gamma`` (one value: one LU factorisation per step).
    a, C : tuple of tuple of float
        Row ``i`` holds the ``i`` coefficients ``a_ij`` (``C_ij``), ``j < i``.
    c, d : tuple of float
        Stage times ``c_i`` and the ``f_t`` weights ``d_i``.
    m, m_hat : tuple of float
        Weights of ``y1`` and of ``y1_hat``.
    dense : tuple of tuple of float, optional
        A continuous extension ``y(t0 + x h) = (1 - x) y0 + x (y1 + (1 - x)
        (D_2 + x D_3))`` with ``D_k = sum_j dense[k - 2][j] u_j`` (the form of
        Hairer & Wanner's RODAS code), or None (then a cubic Hermite one).
    """

    name: str
    order: int
    error_order: int
    gamma: float
    a: Rows
    C: Rows
    c: tuple[float, ...]
    d: tuple[float, ...]
    m: tuple[float, ...]
    m_hat: tuple[float, ...]
    dense: Rows | None = None

    @property
    def n_stages(self) -> int:
        return len(self.c)

    def lower(self, rows: Rows) -> npt.NDArray[np.float64]:
        """`rows` as an ``(s, s)`` strictly lower triangular array."""
        s = self.n_stages
        out = np.zeros((s, s))
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def classical(self) -> Classical:
        """``(alpha, Gamma, b, b_hat)`` of the classical form."""
        s = self.n_stages
        gamma = np.linalg.inv(np.eye(s) / self.gamma - self.lower(self.C))
        m = np.asarray(self.m, dtype=np.float64)
        m_hat = np.asarray(self.m_hat, dtype=np.float64)
        return Classical(
            np.asarray(self.lower(self.a) @ gamma, dtype=np.float64),
            np.asarray(gamma, dtype=np.float64),
            np.asarray(m @ gamma, dtype=np.float64),
            np.asarray(m_hat @ gamma, dtype=np.float64),
        )


# RODAS (Hairer & Wanner, Solving ODEs II, section VI.4, Table 4.? "RODAS"; the
# coefficients of their Fortran code RODAS, METH=1): order 4 with an embedded
# order-3 solution, both stiffly accurate, L-stable, six stages (stage 5 is at
# c = 1 and stage 6 evaluates f at the embedded solution). y1_hat is the
# argument of stage 6 and y1 = y1_hat + u_6, so the error estimate is u_6.
_A51, _A52, _A53, _A54 = (
    0.1221224509226641e01,
    0.6019134481288629e01,
    0.1253708332932087e02,
    -0.6878860361058950e00,
)
RODAS4 = RosenbrockTableau(
    name="rodas4",
    order=4,
    error_order=3,
    gamma=0.25,
    a=(
        (),
        (0.1544e01,),
        (0.9466785280815826e00, 0.2557011698983284e00),
        (0.3314825187068521e01, 0.2896124015972201e01, 0.9986419139977817e00),
        (_A51, _A52, _A53, _A54),
        (_A51, _A52, _A53, _A54, 1.0),
    ),
    C=(
        (),
        (-0.56688e01,),
        (-0.2430093356833875e01, -0.2063599157091915e00),
        (-0.1073529058151375e00, -0.9594562251023355e01, -0.2047028614809616e02),
        (
            0.7496443313967647e01,
            -0.1024680431464352e02,
            -0.3399990352819905e02,
            0.1170890893206160e02,
        ),
        (
            0.8083246795921522e01,
            -0.7981132988064893e01,
            -0.3152159432874371e02,
            0.1631930543123136e02,
            -0.6058818238834054e01,
        ),
    ),
    c=(0.0, 0.386, 0.21, 0.63, 1.0, 1.0),
    d=(0.25, -0.1043, 0.1035, -0.3620000000000023e-01, 0.0, 0.0),
    m=(_A51, _A52, _A53, _A54, 1.0, 1.0),
    m_hat=(_A51, _A52, _A53, _A54, 1.0, 0.0),
    # The continuous extension of order 3 of the same code (its D21..D35),
    # over the first five stages.
    dense=(
        (
            0.1012623508344586e02,
            -0.7487995877610167e01,
            -0.3480091861555747e02,
            -0.7992771707568823e01,
            0.1025137723295662e01,
        ),
        (
            -0.6762803392801253e00,
            0.6087714651680015e01,
            0.1643084320892478e02,
            0.2476722511418386e02,
            -0.6594389125716872e01,
        ),
    ),
)

ROSENBROCK_TABLEAUX: Mapping[str, RosenbrockTableau] = MappingProxyType(
    {"rodas4": RODAS4}
)
