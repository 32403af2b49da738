"""Butcher tableaux of the explicit Runge--Kutta methods shared by all backends.

This module is the single source of the coefficients that the JAX, PyTorch and
SciPy backends build their Runge--Kutta solvers on.  It holds plain float64 NumPy
data (read-only arrays) and imports nothing but NumPy and the standard library.

Convention
----------
All tableaux follow the convention of SciPy's ``scipy.integrate.RungeKutta``.  For
a method with ``s`` stages and a step of size ``h`` from ``(t, y0)``::

    K[i] = f(t + c[i] * h, y0 + h * (K[:i].T @ a[i, :i]))    for i = 0, ..., s - 1
    y1 = y0 + h * (K[:s].T @ b)
    K[s] = f(t + h, y1)

so ``K`` has ``s + 1`` rows, the last one always being ``f(t + h, y1)`` (which is
also the first stage of the next step).  Then

* the local error estimate is ``h * (K.T @ e)``, where ``e = b_hat - b`` (``b``
  padded with a zero for row ``s``) and ``b_hat`` are the weights of the embedded
  solution of order ``error_order`` (the sign follows SciPy's ``E`` arrays);
* the dense output is ``y(t + theta * h) = y0 + h * (K.T @ p) @ [theta, theta**2,
  ..., theta**q]`` for ``0 <= theta <= 1``.

Rational coefficients are evaluated exactly with :class:`fractions.Fraction` and
rounded once to float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

__all__ = ["TABLEAUX", "Tableau", "get_tableau"]

_Scalar = Fraction | int | str
"""An exact coefficient: a fraction, an integer or a decimal/rational string."""

_FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class Tableau:
    """Butcher tableau of an explicit Runge--Kutta method (SciPy convention).

    Instances are immutable, their arrays are read-only float64 copies, and they
    compare and hash by identity (so a tableau can be a static/hashable argument).

    Parameters
    ----------
    name : str
        Backend-neutral name of the method, e.g. ``"tsit5"``.
    order : int
        Order of the propagated solution ``y1``.
    error_order : int or None
        Order of the embedded solution used for error estimation; ``None`` for
        fixed-step methods.
    c : numpy.ndarray, shape (s,)
        Nodes.
    a : numpy.ndarray, shape (s, s)
        Strictly lower-triangular Runge--Kutta matrix.
    b : numpy.ndarray, shape (s,)
        Weights of the propagated solution.
    e : numpy.ndarray or None, shape (s + 1,)
        Error coefficients: the local error estimate is ``h * K.T @ e`` where ``K``
        has ``s + 1`` rows, the last one being ``f(t + h, y1)``.  ``None`` for
        fixed-step methods.
    p : numpy.ndarray, shape (s + 1, q)
        Dense-output coefficients: ``y(t + theta * h) = y0 + h * (K.T @ p) @
        [theta, theta**2, ..., theta**q]``.
    dense_order : int
        Order of accuracy of the dense output (its local error is
        ``O(h**(dense_order + 1))``).
    fsal : bool
        Whether the method is "first same as last" in its standard form: its last
        stage is ``f(t + h, y1)`` and enters the error estimate (``e[s] != 0``).  For
        every tableau ``K[s] = f(t + h, y1)`` can be reused as the first stage of
        the next step; ``fsal`` says that the method itself needs it.
    reference : str
        Citation of the source of the coefficients.

    Raises
    ------
    ValueError
        If the shapes are inconsistent, ``a`` is not strictly lower triangular, or
        exactly one of ``e`` and ``error_order`` is ``None``.
    """

    name: str
    order: int
    error_order: int | None
    c: _FloatArray
    a: _FloatArray
    b: _FloatArray
    e: _FloatArray | None
    p: _FloatArray
    dense_order: int
    fsal: bool
    reference: str

    def __post_init__(self) -> None:
        """Copy the arrays to read-only float64 arrays and validate the shapes."""
        for field_name in ("c", "a", "b", "e", "p"):
            value: npt.ArrayLike | None = getattr(self, field_name)
            if value is None:
                continue
            array = np.array(value, dtype=np.float64)
            array.flags.writeable = False
            object.__setattr__(self, field_name, array)
        if self.c.ndim != 1 or self.c.size == 0:
            raise ValueError(f"{self.name}: c must be a non-empty 1-D array")
        s = self.c.shape[0]
        if self.a.shape != (s, s):
            raise ValueError(f"{self.name}: a must have shape {(s, s)}")
        if np.any(np.triu(self.a) != 0.0):
            raise ValueError(f"{self.name}: a must be strictly lower triangular")
        if self.b.shape != (s,):
            raise ValueError(f"{self.name}: b must have shape {(s,)}")
        if (self.e is None) != (self.error_order is None):
            raise ValueError(f"{self.name}: e and error_order must both be given")
        if self.e is not None and self.e.shape != (s + 1,):
            raise ValueError(f"{self.name}: e must have shape {(s + 1,)}")
        if self.p.ndim != 2 or self.p.shape[0] != s + 1 or self.p.shape[1] < 1:
            raise ValueError(f"{self.name}: p must have shape ({s + 1}, q), q >= 1")

    @property
    def n_stages(self) -> int:
        """Number of stages ``s`` (not counting the row ``K[s] = f(t + h, y1)``)."""
        return int(self.c.shape[0])

    @property
    def adaptive(self) -> bool:
        """Whether the method has an embedded error estimator."""
        return self.e is not None


def _q(value: _Scalar) -> Fraction:
    """Convert an exact coefficient to a fraction (strings are parsed exactly)."""
    return Fraction(value)


def _vector(values: Sequence[_Scalar]) -> list[Fraction]:
    """Convert a sequence of exact coefficients to fractions."""
    return [_q(v) for v in values]


def _matrix(rows: Sequence[Sequence[_Scalar]]) -> list[list[Fraction]]:
    """Convert a nested sequence of exact coefficients to fractions."""
    return [_vector(row) for row in rows]


def _to_float(data: Sequence[Fraction] | Sequence[list[Fraction]]) -> _FloatArray:
    """Round exact coefficients (a vector or a matrix) to a float64 array."""
    return np.array(data, dtype=np.float64)


def _hermite_p(b: Sequence[Fraction]) -> list[list[Fraction]]:
    """Dense-output matrix of the cubic Hermite interpolant of a step.

    The interpolant matches ``y0``, ``y1 = y0 + h K[:s].T @ b``, ``f0 = K[0]`` and
    ``f1 = K[s]``.  With the Hermite basis ``h10 = theta - 2 theta^2 + theta^3``,
    ``h01 = 3 theta^2 - 2 theta^3`` and ``h11 = -theta^2 + theta^3`` it reads
    ``y0 + h (h10 f0 + h01 K[:s].T @ b + h11 f1)``.

    Parameters
    ----------
    b : sequence of Fraction, length s
        Weights of the propagated solution.

    Returns
    -------
    list of list of Fraction
        The ``(s + 1, 3)`` matrix ``p``.
    """
    rows = [[Fraction(0), 3 * bi, -2 * bi] for bi in b]
    rows[0] = [rows[0][0] + 1, rows[0][1] - 2, rows[0][2] + 1]
    rows.append([Fraction(0), Fraction(-1), Fraction(1)])
    return rows


def _make(
    *,
    name: str,
    order: int,
    c: Sequence[_Scalar],
    a_lower: Sequence[Sequence[_Scalar]],
    b: Sequence[_Scalar],
    p: Sequence[Sequence[_Scalar]] | None,
    dense_order: int,
    reference: str,
    error_order: int | None = None,
    b_hat: Sequence[_Scalar] | None = None,
    fsal: bool = False,
) -> Tableau:
    """Build a :class:`Tableau` from exact coefficients.

    Parameters
    ----------
    name, order, dense_order, reference, error_order, fsal
        As in :class:`Tableau`.
    c : sequence, length s
        Nodes.
    a_lower : sequence of sequences
        Rows ``1, ..., s - 1`` of ``a``; row ``i`` lists ``a[i, :i]``.
    b : sequence, length s
        Weights of the propagated solution.
    p : sequence of sequences or None
        Dense-output matrix of shape ``(s + 1, q)``; ``None`` selects the cubic
        Hermite interpolant (see :func:`_hermite_p`).
    b_hat : sequence or None
        Weights of the embedded solution, of length ``s`` or ``s + 1`` (the last
        one multiplying ``K[s]``); ``None`` for fixed-step methods.

    Returns
    -------
    Tableau
        The tableau, with ``e = b_hat - b`` computed exactly before rounding.
    """
    c_q = _vector(c)
    s = len(c_q)
    a_q = [[Fraction(0)] * s for _ in range(s)]
    for i, row in enumerate(_matrix(a_lower), start=1):
        if len(row) != i:
            raise ValueError(f"{name}: row {i} of a must have {i} entries")
        a_q[i][:i] = row
    b_q = _vector(b)
    p_q = _hermite_p(b_q) if p is None else _matrix(p)
    e: _FloatArray | None = None
    if b_hat is not None:
        b_hat_q = _vector(b_hat)
        b_hat_q += [Fraction(0)] * (s + 1 - len(b_hat_q))
        e = _to_float(
            [bh - bi for bh, bi in zip(b_hat_q, [*b_q, Fraction(0)], strict=True)]
        )
    return Tableau(
        name=name,
        order=order,
        error_order=error_order,
        c=_to_float(c_q),
        a=_to_float(a_q),
        b=_to_float(b_q),
        e=e,
        p=_to_float(p_q),
        dense_order=dense_order,
        fsal=fsal,
        reference=reference,
    )


_HAIRER = (
    "E. Hairer, S. P. Norsett, G. Wanner, Solving Ordinary Differential "
    "Equations I, 2nd ed., Springer, 1993, Sec. II.1"
)

# ---------------------------------------------------------------------------------
# Fixed-step methods.  Their dense output is linear (euler) or the cubic Hermite
# interpolant through y0, y1, f0 = K[0] and f1 = K[s].  The Hermite interpolant is
# O(h^4) accurate given exact end values, so it has order 3 on top of rk4 but only
# order 2 on top of the second-order methods, whose y1 carries an O(h^3) local
# error.  Both are the best possible without extra stages: no continuous extension
# built on the stages and f1 reaches order 4 for rk4 or order 3 for midpoint/heun.
# (The same holds for every dense output below: none of those orders can be raised
# without extra function evaluations.)
# ---------------------------------------------------------------------------------

_EULER = _make(
    name="euler",
    order=1,
    c=[0],
    a_lower=[],
    b=[1],
    p=[[1], [0]],
    dense_order=1,
    reference=f"Forward Euler method; see {_HAIRER}.",
)

_MIDPOINT = _make(
    name="midpoint",
    order=2,
    c=[0, "1/2"],
    a_lower=[["1/2"]],
    b=[0, 1],
    p=None,
    dense_order=2,
    reference=(
        "Explicit midpoint rule: C. Runge, Ueber die numerische Aufloesung von "
        f"Differentialgleichungen, Math. Ann. 46 (1895) 167-178; see {_HAIRER}."
    ),
)

_HEUN = _make(
    name="heun",
    order=2,
    c=[0, 1],
    a_lower=[[1]],
    b=["1/2", "1/2"],
    p=None,
    dense_order=2,
    reference=(
        "Heun's (trapezoidal) method: K. Heun, Neue Methoden zur approximativen "
        "Integration der Differentialgleichungen einer unabhaengigen "
        f"Veraenderlichen, Z. Math. Phys. 45 (1900) 23-38; see {_HAIRER}."
    ),
)

_RK4 = _make(
    name="rk4",
    order=4,
    c=[0, "1/2", "1/2", 1],
    a_lower=[["1/2"], [0, "1/2"], [0, 0, 1]],
    b=["1/6", "1/3", "1/3", "1/6"],
    p=None,
    dense_order=3,
    reference=(
        "Classical Runge-Kutta method: W. Kutta, Beitrag zur naeherungsweisen "
        "Integration totaler Differentialgleichungen, Z. Math. Phys. 46 (1901) "
        f"435-453; see {_HAIRER}."
    ),
)

# ---------------------------------------------------------------------------------
# Bogacki--Shampine 3(2), identical to scipy.integrate.RK23 (FSAL; the dense
# output is the cubic Hermite interpolant on the step, as in SciPy).
# ---------------------------------------------------------------------------------

_BOSH3 = _make(
    name="bosh3",
    order=3,
    error_order=2,
    c=[0, "1/2", "3/4"],
    a_lower=[["1/2"], [0, "3/4"]],
    b=["2/9", "1/3", "4/9"],
    b_hat=["7/24", "1/4", "1/3", "1/8"],
    p=[
        [1, "-4/3", "5/9"],
        [0, 1, "-2/3"],
        [0, "4/3", "-8/9"],
        [0, -1, 1],
    ],
    dense_order=3,
    fsal=True,
    reference=(
        "P. Bogacki, L. F. Shampine, A 3(2) pair of Runge-Kutta formulas, "
        "Appl. Math. Lett. 2(4) (1989) 321-325."
    ),
)

# ---------------------------------------------------------------------------------
# Dormand--Prince 5(4), identical to scipy.integrate.RK45, with Shampine's
# fourth-order continuous extension.
# ---------------------------------------------------------------------------------

_DOPRI5 = _make(
    name="dopri5",
    order=5,
    error_order=4,
    c=[0, "1/5", "3/10", "4/5", "8/9", 1],
    a_lower=[
        ["1/5"],
        ["3/40", "9/40"],
        ["44/45", "-56/15", "32/9"],
        ["19372/6561", "-25360/2187", "64448/6561", "-212/729"],
        ["9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"],
    ],
    b=["35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84"],
    b_hat=[
        "5179/57600",
        0,
        "7571/16695",
        "393/640",
        "-92097/339200",
        "187/2100",
        "1/40",
    ],
    p=[
        [
            1,
            "-8048581381/2820520608",
            "8663915743/2820520608",
            "-12715105075/11282082432",
        ],
        [0, 0, 0, 0],
        [
            0,
            "131558114200/32700410799",
            "-68118460800/10900136933",
            "87487479700/32700410799",
        ],
        [
            0,
            "-1754552775/470086768",
            "14199869525/1410260304",
            "-10690763975/1880347072",
        ],
        [
            0,
            "127303824393/49829197408",
            "-318862633887/49829197408",
            "701980252875/199316789632",
        ],
        [0, "-282668133/205662961", "2019193451/616988883", "-1453857185/822651844"],
        [0, "40617522/29380423", "-110615467/29380423", "69997945/29380423"],
    ],
    dense_order=4,
    fsal=True,
    reference=(
        "J. R. Dormand, P. J. Prince, A family of embedded Runge-Kutta formulae, "
        "J. Comput. Appl. Math. 6(1) (1980) 19-26; dense output: L. F. Shampine, "
        "Some practical Runge-Kutta formulas, Math. Comp. 46(173) (1986) 135-150."
    ),
)

# ---------------------------------------------------------------------------------
# Tsitouras 5(4).  The coefficients are not rational; they are given here to 30
# significant digits (truncated from the high-precision values used by diffrax and
# OrdinaryDiffEq.jl).
# ---------------------------------------------------------------------------------

_TSIT5_C = [0, "0.161", "0.327", "0.9", "0.980025540904509685729810286287", 1]
_TSIT5_A_LOWER = [
    ["0.161"],
    ["-0.00848065549235698854442687425023", "0.335480655492356988544426874250"],
    [
        "2.89715305710549343213043259419",
        "-6.35944848997507484314815991238",
        "4.36229543286958141101772731819",
    ],
    [
        "5.32586482843925660442887792084",
        "-11.7488835640628278777471703398",
        "7.49553934288983620830460478456",
        "-0.0924950663617552492565020793321",
    ],
    [
        "5.86145544294642002865925148698",
        "-12.9209693178471092917061186818",
        "8.15936789857615864318040079454",
        "-0.0715849732814009972245305425258",
        "-0.0282690503940683829090030572127",
    ],
]
_TSIT5_B = [
    "0.0964607668180652295181673131651",
    "1/100",
    "0.479889650414499574775249532291",
    "1.37900857410374189319227482186",
    "-3.29006951543608067990104758571",
    "2.32471052409977398241535591840",
]
_TSIT5_B_HAT = [
    "0.0946807557658394580747887625576",
    "0.00918356554034325309677636393665",
    "0.487770528424761570785564259963",
    "1.23429756693047898565510967388",
    "-2.70771234998352545488110997506",
    "1.86662841817058703575371939957",
    "1/66",
]

# Dense output: Tsitouras' fourth-order continuous extension b_i(theta) (also used
# by diffrax's Tsit5 and OrdinaryDiffEq.jl), row i holding the coefficients of
# theta, ..., theta^4 in b_i(theta).  The paper's factored polynomials (printed to
# about 17 digits) were expanded exactly and then moved by a minimum-norm correction
# (< 1e-16) onto the constraints b_i'(0) = [i == 0], b_i(1) = b_i (b_7 = 0) and the
# continuous order conditions through order 4.
_TSIT5_P = [
    [
        1,
        "-2.763706197274825868705",
        "2.913255461821912655463",
        "-1.053088497729021557239",
    ],
    [
        0,
        "0.1316999999999999999853",
        "-0.2233999999999999999798",
        "0.1016999999999999999946",
    ],
    [
        0,
        "3.930296236894751517551",
        "-5.941033872131504735912",
        "2.490627285651252793136",
    ],
    [
        0,
        "-12.41107716693367704134",
        "30.33818863028232165380",
        "-16.54810288924490271927",
    ],
    [
        0,
        "37.50931341651103918947",
        "-88.17890489476640109194",
        "47.37952196281928122256",
    ],
    [
        0,
        "-27.89652628919728779724",
        "65.09189467479367151894",
        "-34.87065786149660973928",
    ],
    [
        0,
        "1.500000000000000000273",
        "-4.000000000000000000374",
        "2.500000000000000000101",
    ],
]

# ---------------------------------------------------------------------------------
# Prince--Dormand 8(7), 13 stages (the method of diffrax's Dopri8 and torchdiffeq's
# dopri8; not Hairer's DOP853).  The coefficients are the rational approximations
# published in the paper.  Stage 13 has c = 1 but is not f(t + h, y1): not FSAL.
# ---------------------------------------------------------------------------------

_DOPRI8_C = [
    0,
    "1/18",
    "1/12",
    "1/8",
    "5/16",
    "3/8",
    "59/400",
    "93/200",
    "5490023248/9719169821",
    "13/20",
    "1201146811/1299019798",
    1,
    1,
]
_DOPRI8_A_LOWER = [
    ["1/18"],
    ["1/48", "1/16"],
    ["1/32", 0, "3/32"],
    ["5/16", 0, "-75/64", "75/64"],
    ["3/80", 0, 0, "3/16", "3/20"],
    [
        "29443841/614563906",
        0,
        0,
        "77736538/692538347",
        "-28693883/1125000000",
        "23124283/1800000000",
    ],
    [
        "16016141/946692911",
        0,
        0,
        "61564180/158732637",
        "22789713/633445777",
        "545815736/2771057229",
        "-180193667/1043307555",
    ],
    [
        "39632708/573591083",
        0,
        0,
        "-433636366/683701615",
        "-421739975/2616292301",
        "100302831/723423059",
        "790204164/839813087",
        "800635310/3783071287",
    ],
    [
        "246121993/1340847787",
        0,
        0,
        "-37695042795/15268766246",
        "-309121744/1061227803",
        "-12992083/490766935",
        "6005943493/2108947869",
        "393006217/1396673457",
        "123872331/1001029789",
    ],
    [
        "-1028468189/846180014",
        0,
        0,
        "8478235783/508512852",
        "1311729495/1432422823",
        "-10304129995/1701304382",
        "-48777925059/3047939560",
        "15336726248/1032824649",
        "-45442868181/3398467696",
        "3065993473/597172653",
    ],
    [
        "185892177/718116043",
        0,
        0,
        "-3185094517/667107341",
        "-477755414/1098053517",
        "-703635378/230739211",
        "5731566787/1027545527",
        "5232866602/850066563",
        "-4093664535/808688257",
        "3962137247/1805957418",
        "65686358/487910083",
    ],
    [
        "403863854/491063109",
        0,
        0,
        "-5068492393/434740067",
        "-411421997/543043805",
        "652783627/914296604",
        "11173962825/925320556",
        "-13158990841/6184727034",
        "3936647629/1978049680",
        "-160528059/685178525",
        "248638103/1413531060",
        0,
    ],
]
_DOPRI8_B = [
    "14005451/335480064",
    0,
    0,
    0,
    0,
    "-59238493/1068277825",
    "181606767/758867731",
    "561292985/797845732",
    "-1041891430/1371343529",
    "760417239/1151165299",
    "118820643/751138087",
    "-528747749/2220607170",
    "1/4",
]
_DOPRI8_B_HAT = [
    "13451932/455176623",
    0,
    0,
    0,
    0,
    "-808719846/976000145",
    "1757004468/5645159321",
    "656045339/265891186",
    "-3867574721/1518517206",
    "465885868/322736535",
    "53011238/667516719",
    "2/45",
    0,
]

# Dense output: the continuous extension of diffrax's Dopri8 and torchdiffeq's
# dopri8 (attributed there to Bogacki & Shampine 1990), row i holding the
# coefficients of theta, ..., theta^6 in b_i(theta); row 13 multiplies
# K[13] = f(t + h, y1) and stages 2-5 do not enter.  Its order is 5, not more: with
# these 14 stage values the continuous order conditions of order 6 are
# inconsistent, so a higher-order interpolant (like DOP853's, of order 7) needs
# extra stages.  The coefficients as distributed there are accurate to only about
# 13 digits (b_i(1) - b_i up to 1e-12), so they were moved by a minimum-norm
# correction (< 2e-13) onto the constraints b_i(1) = b_i (exactly), b_i'(0) =
# [i == 0] and the continuous order conditions through order 5 (to about 1e-15).
_DOPRI8_P = [
    [
        1,
        "-6.691018173783725722000",
        "19.99900693336843340434",
        "-30.06105682896661543674",
        "22.13965049980944532947",
        "-6.344834939286007329028",
    ],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [
        0,
        "-7.614265804587072726075",
        "52.22735327929474696078",
        "-121.4999627731332685557",
        "116.4422149550344103505",
        "-39.61079198522005533887",
    ],
    [
        0,
        "10.72813926304277904140",
        "-46.89191641810947287131",
        "83.17210046398466963107",
        "-67.14513188259583320576",
        "20.37612138087903750065",
    ],
    [
        0,
        "0.5526637063753422884144",
        "-0.1890893225010814534822",
        "9.572450755599342631058",
        "-16.56722435274967376271",
        "7.334709882679513317207",
    ],
    [
        0,
        "4.218656262566365772154",
        "-35.70759759462235602761",
        "87.84060576772041338018",
        "-89.99160148472464958557",
        "32.88017743524576553302",
    ],
    [
        0,
        "-0.6627209125361399757494",
        "6.273644808324055093200",
        "-17.41521077707627728877",
        "22.62374896485330487632",
        "-10.15889905264265636530",
    ],
    [
        0,
        "-1.263678900113463625152",
        "10.31608812724515535860",
        "-28.59032895147901147396",
        "32.23623401673561571399",
        "-12.54012680987817263847",
    ],
    [
        0,
        "5.410603789858945446074",
        "-34.76507698666127800431",
        "81.66309505843404362569",
        "-82.10203154883608066542",
        "29.55530014845150679423",
    ],
    [
        0,
        "-7.032137906794560749879",
        "47.74579710782256797534",
        "-114.9375291377009292796",
        "116.2662185791119677503",
        "-41.79234864243904569623",
    ],
    [
        0,
        "2.353758675971530250921",
        "-19.00820993416077043546",
        "50.25583642261763276684",
        "-53.90207774663850680098",
        "20.30069258221011421867",
    ],
]

_TSIT5 = _make(
    name="tsit5",
    order=5,
    error_order=4,
    c=_TSIT5_C,
    a_lower=_TSIT5_A_LOWER,
    b=_TSIT5_B,
    b_hat=_TSIT5_B_HAT,
    p=_TSIT5_P,
    dense_order=4,
    fsal=True,
    reference=(
        "Ch. Tsitouras, Runge-Kutta pairs of order 5(4) satisfying only the first "
        "column simplifying assumption, Comput. Math. Appl. 62(2) (2011) 770-775 "
        "(including the continuous extension)."
    ),
)

_DOPRI8 = _make(
    name="dopri8",
    order=8,
    error_order=7,
    c=_DOPRI8_C,
    a_lower=_DOPRI8_A_LOWER,
    b=_DOPRI8_B,
    b_hat=_DOPRI8_B_HAT,
    p=_DOPRI8_P,
    dense_order=5,
    fsal=False,
    reference=(
        "P. J. Prince, J. R. Dormand, High order embedded Runge-Kutta formulae, "
        "J. Comput. Appl. Math. 7(1) (1981) 67-75; dense output: the interpolant "
        "of diffrax's Dopri8 / torchdiffeq's dopri8 (after P. Bogacki, "
        "L. F. Shampine, Interpolating high-order Runge-Kutta formulas, Comput. "
        "Math. Appl. 20(3) (1990) 15-24), refined as described in the source."
    ),
)

TABLEAUX: Mapping[str, Tableau] = MappingProxyType(
    {
        t.name: t
        for t in (
            _EULER,
            _MIDPOINT,
            _HEUN,
            _RK4,
            _BOSH3,
            _DOPRI5,
            _TSIT5,
            _DOPRI8,
        )
    }
)
"""All tableaux, keyed by :attr:`Tableau.name` (a read-only mapping)."""


def get_tableau(name: str) -> Tableau:
    """Return the tableau called ``name``.

    Parameters
    ----------
    name : str
        One of the keys of :data:`TABLEAUX`.

    Returns
    -------
    Tableau
        The (shared, immutable) tableau.

    Raises
    ------
    ValueError
        If there is no tableau called ``name``.
    """
    try:
        return TABLEAUX[name]
    except KeyError:
        known = ", ".join(sorted(TABLEAUX))
        raise ValueError(f"unknown tableau {name!r}; available: {known}") from None
