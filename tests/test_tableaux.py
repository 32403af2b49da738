"""Tests of the shared Butcher tableaux (`diffeqkit._tableaux`).

Every tableau is checked algebraically (rooted-tree order conditions of the
solution, the embedded solution and the dense output, each shown to be sharp),
empirically (convergence orders on a nonlinear non-autonomous ODE) and against the
reference libraries (SciPy, diffrax, torchdiffeq) where they define the method.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from functools import cache
from typing import Any

import numpy as np
import pytest

from diffeqkit._tableaux import TABLEAUX, Tableau, get_tableau

NAMES = list(TABLEAUX)
ADAPTIVE = [name for name, tab in TABLEAUX.items() if tab.e is not None]
EXPECTED_ORDERS = {
    "euler": (1, None),
    "midpoint": (2, None),
    "heun": (2, None),
    "rk4": (4, None),
    "bosh3": (3, 2),
    "dopri5": (5, 4),
    "tsit5": (5, 4),
    "dopri8": (8, 7),
}

# ---------------------------------------------------------------------------------
# Rooted trees and elementary weights (Butcher's order conditions).
# A tree is the sorted tuple of its root's subtrees; the single node is ().
# ---------------------------------------------------------------------------------

Tree = tuple["Tree", ...]


def _graft(tree: Tree) -> Iterator[Tree]:
    """Yield every tree obtained from `tree` by attaching one new leaf."""
    yield tuple(sorted((*tree, ())))
    for i, child in enumerate(tree):
        for grown in _graft(child):
            yield tuple(sorted((*tree[:i], grown, *tree[i + 1 :])))


@cache
def trees(n: int) -> tuple[Tree, ...]:
    """All rooted trees with `n` nodes."""
    if n == 1:
        return ((),)
    return tuple(sorted({new for tree in trees(n - 1) for new in _graft(tree)}))


def size(tree: Tree) -> int:
    return 1 + sum(size(child) for child in tree)


def density(tree: Tree) -> int:
    return size(tree) * math.prod(density(child) for child in tree)


def weights(tree: Tree, a: np.ndarray) -> np.ndarray:
    """Internal elementary weights Phi_i(tree) of the stages."""
    phi = np.ones(a.shape[0])
    for child in tree:
        phi = phi * (a @ weights(child, a))
    return phi


def extended_a(tab: Tableau) -> np.ndarray:
    """`a` of the (s + 1)-stage tableau whose last stage is f(t + h, y1)."""
    s = tab.n_stages
    a = np.zeros((s + 1, s + 1))
    a[:s, :s] = tab.a
    a[s, :s] = tab.b
    return a


def b_ext(tab: Tableau) -> np.ndarray:
    """b padded with the zero weight of K[s] = f(t + h, y1)."""
    return np.append(tab.b, 0.0)


def dense_weights(tab: Tableau, theta: float) -> np.ndarray:
    """b_i(theta) of the dense output, for the s + 1 rows of K."""
    return tab.p @ theta ** np.arange(1, tab.p.shape[1] + 1)


def max_residual(
    w: np.ndarray, a: np.ndarray, orders: range, theta: float = 1.0
) -> float:
    """max |sum_i w_i Phi_i(t) - theta^|t| / gamma(t)| over the trees of `orders`.

    With theta = 1 these are the order conditions of the weights `w`; with theta
    in (0, 1) the continuous order conditions of a dense output.
    """
    return max(
        abs(float(w @ weights(tree, a)) - theta ** size(tree) / density(tree))
        for order in orders
        for tree in trees(order)
    )


def test_tree_counts() -> None:
    assert [len(trees(n)) for n in range(1, 10)] == [1, 1, 2, 4, 9, 20, 48, 115, 286]


# ---------------------------------------------------------------------------------
# Registry and structure.
# ---------------------------------------------------------------------------------


def test_registry() -> None:
    assert set(TABLEAUX) == set(EXPECTED_ORDERS)
    with pytest.raises(ValueError, match="unknown tableau 'dop853'"):
        get_tableau("dop853")
    with pytest.raises(TypeError):
        TABLEAUX["rk4"] = TABLEAUX["euler"]  # type: ignore[index]


CUSTOM: dict[str, object] = {
    "name": "custom",
    "order": 2,
    "error_order": None,
    "c": [0.0, 1.0],
    "a": [[0.0, 0.0], [1.0, 0.0]],
    "b": [0.5, 0.5],
    "e": None,
    "p": [[1.0], [0.0], [0.0]],
    "dense_order": 1,
    "fsal": False,
    "reference": "",
}


def test_tableau_copies_and_freezes() -> None:
    c = np.array([0.0, 1.0])
    tab = Tableau(**{**CUSTOM, "c": c})  # type: ignore[arg-type]
    assert c.flags.writeable
    assert tab.c is not c
    assert not tab.c.flags.writeable
    assert tab.n_stages == 2
    assert not tab.adaptive
    # Identity semantics: hashable (usable as a static argument) despite arrays.
    assert hash(tab) == hash(tab)
    assert tab != Tableau(**CUSTOM)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"a": [[0.0, 1.0], [1.0, 0.0]]},
        {"a": np.zeros((2, 3))},
        {"b": np.ones(3)},
        {"e": np.zeros(3)},
        {"e": np.zeros(2), "error_order": 1},
        {"p": np.zeros((2, 1))},
        {"p": np.zeros(3)},
    ],
    ids=[
        "not-lower",
        "a-shape",
        "b-shape",
        "e-without-order",
        "e-shape",
        "p-rows",
        "p-1d",
    ],
)
def test_tableau_rejects(change: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="custom"):
        Tableau(**{**CUSTOM, **change})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_structure(name: str) -> None:
    tab = get_tableau(name)
    assert tab is TABLEAUX[name]
    assert tab.name == name
    s = tab.n_stages
    assert (tab.order, tab.error_order) == EXPECTED_ORDERS[name]
    assert tab.adaptive == (tab.e is not None)
    assert tab.c.shape == (s,)
    assert tab.a.shape == (s, s)
    assert tab.b.shape == (s,)
    assert tab.p.shape[0] == s + 1
    assert tab.reference
    assert 1 <= tab.dense_order <= tab.order
    np.testing.assert_array_equal(np.triu(tab.a), 0.0)
    assert tab.c[0] == 0.0
    np.testing.assert_allclose(tab.a.sum(axis=1), tab.c, rtol=0, atol=1e-14)
    assert abs(tab.b.sum() - 1.0) < 1e-14
    # y(theta=1) = y1 and y'(theta=0) = f0, as identities of the coefficients (up
    # to the rounding of the coefficients and of the float sum).
    rounding = 4 * np.finfo(np.float64).eps * np.abs(tab.p).sum(axis=1)
    assert np.all(np.abs(tab.p.sum(axis=1) - b_ext(tab)) <= rounding)
    np.testing.assert_array_equal(tab.p[:, 0], np.eye(s + 1)[0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("field", ["c", "a", "b", "e", "p"])
def test_read_only(name: str, field: str) -> None:
    tab = TABLEAUX[name]
    array = getattr(tab, field)
    if array is None:
        assert field == "e"
        assert not tab.adaptive
        return
    assert array.dtype == np.float64
    assert not array.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        array[0] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(tab, field, array.copy())


@pytest.mark.parametrize("name", NAMES)
def test_error_coefficients(name: str) -> None:
    tab = TABLEAUX[name]
    if tab.e is None:
        assert tab.error_order is None
        assert not tab.fsal
        return
    assert tab.e.shape == (tab.n_stages + 1,)
    assert abs(tab.e.sum()) < 1e-14  # both solutions are consistent
    assert np.abs(tab.e).max() > 1e-6
    # fsal: the last stage of the standard form, f(t + h, y1), enters the estimate.
    assert tab.fsal == (tab.e[-1] != 0.0)


# ---------------------------------------------------------------------------------
# Order conditions (algebra on the float64 coefficients), each shown to be sharp:
# some condition of the next order fails.
# ---------------------------------------------------------------------------------

ALGEBRA_TOL = 1e-13


@pytest.mark.parametrize("name", NAMES)
def test_order_conditions(name: str) -> None:
    tab = TABLEAUX[name]
    assert max_residual(tab.b, tab.a, range(1, tab.order + 1)) < ALGEBRA_TOL
    next_order = range(tab.order + 1, tab.order + 2)
    assert max_residual(tab.b, tab.a, next_order) > 1e-6


@pytest.mark.parametrize("name", ADAPTIVE)
def test_embedded_order_conditions(name: str) -> None:
    tab = TABLEAUX[name]
    assert tab.e is not None
    assert tab.error_order is not None
    b_hat = b_ext(tab) + tab.e
    a = extended_a(tab)
    assert max_residual(b_hat, a, range(1, tab.error_order + 1)) < ALGEBRA_TOL
    next_order = range(tab.error_order + 1, tab.error_order + 2)
    assert max_residual(b_hat, a, next_order) > 1e-6


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("theta", [0.2, 0.5, 0.9, 1.0])
def test_dense_order_conditions(name: str, theta: float) -> None:
    tab = TABLEAUX[name]
    w = dense_weights(tab, theta)
    a = extended_a(tab)
    orders = range(1, tab.dense_order + 1)
    assert max_residual(w, a, orders, theta) < ALGEBRA_TOL
    if theta < 1.0:
        next_order = range(tab.dense_order + 1, tab.dense_order + 2)
        assert max_residual(w, a, next_order, theta) > 1e-6


# ---------------------------------------------------------------------------------
# Empirical orders on a nonlinear non-autonomous 2-D ODE with a closed form: two
# decoupled equations (so that no error constant vanishes in both at once),
#     u' = u (1 - u) (2 + cos 3t),   u(t) = 1 / (1 + 3 exp(-(2t + sin(3t) / 3))),
#     v' = -2 (t - 1) v^2,           v(t) = 1 / (1 + (t - 1)^2).
# ---------------------------------------------------------------------------------


def rhs(t: float, y: np.ndarray) -> np.ndarray:
    u, v = y
    return np.array(
        [u * (1.0 - u) * (2.0 + math.cos(3.0 * t)), -2.0 * (t - 1.0) * v**2]
    )


def exact(t: float) -> np.ndarray:
    u = 1.0 / (1.0 + 3.0 * math.exp(-(2.0 * t + math.sin(3.0 * t) / 3.0)))
    return np.array([u, 1.0 / (1.0 + (t - 1.0) ** 2)])


def rk_step(
    tab: Tableau, t: float, y: np.ndarray, h: float
) -> tuple[np.ndarray, np.ndarray]:
    """One step; returns y1 and K (s + 1 rows, the last being f(t + h, y1))."""
    s = tab.n_stages
    k = np.zeros((s + 1, y.size))
    for i in range(s):
        k[i] = rhs(t + tab.c[i] * h, y + h * (tab.a[i, :i] @ k[:i]))
    y1 = y + h * (tab.b @ k[:s])
    k[s] = rhs(t + h, y1)
    return y1, k


def dense(
    tab: Tableau, y0: np.ndarray, k: np.ndarray, h: float, theta: float
) -> np.ndarray:
    """Dense output y(t + theta h) of a step, as documented in `_tableaux`."""
    return y0 + h * (k.T @ tab.p) @ theta ** np.arange(1, tab.p.shape[1] + 1)


T_SPAN = (0.0, 3.0)
# Steps on T_SPAN (and twice as many) in the asymptotic regime of each method, with
# errors well above roundoff (dopri8: about 1e-11 and 1e-13).
N_STEPS = {"dopri5": 96, "tsit5": 128, "dopri8": 20}


def global_error(tab: Tableau, n: int, *, embedded: bool = False) -> float:
    """Max error on the grid of n fixed steps, propagating y1 or the embedded y."""
    t0, t1 = T_SPAN
    h = (t1 - t0) / n
    y = exact(t0)
    error = 0.0
    for step in range(n):
        t = t0 + step * h
        y1, k = rk_step(tab, t, y, h)
        y = y1 + h * (k.T @ tab.e) if embedded and tab.e is not None else y1
        error = max(error, float(np.abs(y - exact(t + h)).max()))
    return error


@pytest.mark.parametrize("name", NAMES)
def test_convergence_order(name: str) -> None:
    tab = TABLEAUX[name]
    n = N_STEPS.get(name, 64)
    err_h, err_h2 = global_error(tab, n), global_error(tab, 2 * n)
    assert err_h2 > 1e-14
    assert abs(math.log2(err_h / err_h2) - tab.order) < 0.3, (err_h, err_h2)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_embedded_convergence_order(name: str) -> None:
    tab = TABLEAUX[name]
    assert tab.error_order is not None
    n = N_STEPS.get(name, 64)
    err_h = global_error(tab, n, embedded=True)
    err_h2 = global_error(tab, 2 * n, embedded=True)
    assert err_h2 > 1e-14
    assert abs(math.log2(err_h / err_h2) - tab.error_order) < 0.3, (err_h, err_h2)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_error_estimate_scaling(name: str) -> None:
    # The estimate h K.T @ e is the local error of the embedded solution:
    # O(h^(error_order + 1)).
    tab = TABLEAUX[name]
    assert tab.e is not None
    assert tab.error_order is not None
    estimates = []
    for h in (0.125, 0.0625):
        _, k = rk_step(tab, 0.5, exact(0.5), h)
        estimates.append(float(np.abs(h * (k.T @ tab.e)).max()))
    observed = math.log2(estimates[0] / estimates[1])
    assert abs(observed - (tab.error_order + 1)) < 0.4, estimates


def dense_error(tab: Tableau, h: float, t0: float = 0.5) -> float:
    """Max error of the dense output of one step from the exact y(t0)."""
    y0 = exact(t0)
    _, k = rk_step(tab, t0, y0, h)
    return max(
        float(np.abs(dense(tab, y0, k, h, theta) - exact(t0 + theta * h)).max())
        for theta in (0.3, 0.5, 0.7)
    )


@pytest.mark.parametrize("name", NAMES)
def test_dense_output_order(name: str) -> None:
    tab = TABLEAUX[name]
    err_h, err_h2 = dense_error(tab, 0.125), dense_error(tab, 0.0625)
    assert err_h2 > 1e-14
    observed = math.log2(err_h / err_h2)
    assert abs(observed - (tab.dense_order + 1)) < 0.4, (err_h, err_h2)


@pytest.mark.parametrize("name", NAMES)
def test_dense_output_endpoints(name: str) -> None:
    tab = TABLEAUX[name]
    t0, h = 0.4, 0.3
    y0 = exact(t0)
    y1, k = rk_step(tab, t0, y0, h)
    np.testing.assert_array_equal(dense(tab, y0, k, h, 0.0), y0)
    np.testing.assert_allclose(dense(tab, y0, k, h, 1.0), y1, rtol=1e-14, atol=0)
    # C1 at the left end: the derivative of the dense output at theta = 0 is f0.
    np.testing.assert_allclose(k.T @ tab.p[:, 0], k[0], rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------
# Cross-checks against the reference libraries.
# ---------------------------------------------------------------------------------

RTOL = 1e-15
SCIPY_CLASSES = {"bosh3": "RK23", "dopri5": "RK45"}


def assert_coefficients(actual: np.ndarray, expected: object) -> None:
    """Equal to 1e-15 relative to the magnitude of the coefficients."""
    expected_array = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.abs(expected_array).max()))
    np.testing.assert_allclose(actual, expected_array, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.scipy
@pytest.mark.parametrize("name", list(SCIPY_CLASSES))
def test_matches_scipy(name: str) -> None:
    integrate = pytest.importorskip("scipy.integrate")
    cls = getattr(integrate, SCIPY_CLASSES[name])
    tab = TABLEAUX[name]
    s = tab.n_stages
    assert (cls.order, cls.error_estimator_order, cls.n_stages) == (
        tab.order,
        tab.error_order,
        s,
    )
    a = np.zeros((s, s))
    a[:, : cls.A.shape[1]] = cls.A
    assert_coefficients(tab.c, cls.C)
    assert_coefficients(tab.a, a)
    assert_coefficients(tab.b, cls.B)
    assert tab.e is not None
    assert_coefficients(tab.e, cls.E)
    assert_coefficients(tab.p, cls.P)


def assert_matches_fsal_form(
    tab: Tableau,
    c: np.ndarray,
    a_rows: list[np.ndarray],
    b_sol: np.ndarray,
    b_error: np.ndarray | None,
) -> None:
    """Compare with a tableau written with s + 1 stages, the last being f(t+h, y1).

    ``c`` and ``a_rows`` describe stages 2, ..., s + 1; ``b_error = b - b_hat`` (the
    opposite sign of ours), or None not to compare the error estimators.
    """
    s = tab.n_stages
    assert len(a_rows) == s
    assert_coefficients(tab.c[1:], c[: s - 1])
    assert c[s - 1] == 1.0
    for i in range(1, s):
        assert_coefficients(tab.a[i, :i], a_rows[i - 1])
    assert_coefficients(np.asarray(a_rows[s - 1]), tab.b)  # stage s + 1 is at y1
    assert_coefficients(tab.b, b_sol[:s])
    assert b_sol[s] == 0.0
    if b_error is not None:
        assert tab.e is not None
        assert_coefficients(tab.e, -b_error)


# diffrax's Dopri5 (like torchdiffeq's dopri5) uses another embedded 4th-order
# solution (b_hat_7 = 1/60) than Dormand & Prince's and SciPy's (b_hat_7 = 1/40),
# which ours follows: only c, a and b are compared there.
DIFFRAX_CLASSES = {
    "bosh3": "Bosh3",
    "dopri5": "Dopri5",
    "tsit5": "Tsit5",
    "dopri8": "Dopri8",
}
DIFFRAX_OTHER_ERROR_ESTIMATOR = {"dopri5"}


@pytest.fixture
def jax_x64() -> Iterator[object]:
    """JAX with 64-bit floats enabled for the test (restored afterwards)."""
    jax = pytest.importorskip("jax")
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", previous)


@pytest.mark.jax
@pytest.mark.usefixtures("jax_x64")
@pytest.mark.parametrize("name", list(DIFFRAX_CLASSES))
def test_matches_diffrax_tableau(name: str) -> None:
    diffrax = pytest.importorskip("diffrax")
    ref = getattr(diffrax, DIFFRAX_CLASSES[name]).tableau
    same_error = name not in DIFFRAX_OTHER_ERROR_ESTIMATOR
    assert_matches_fsal_form(
        TABLEAUX[name],
        np.asarray(ref.c),
        [np.asarray(row) for row in ref.a_lower],
        np.asarray(ref.b_sol),
        np.asarray(ref.b_error) if same_error else None,
    )


@pytest.mark.torch
def test_dopri8_matches_torchdiffeq_tableau() -> None:
    pytest.importorskip("torch")
    dopri8 = pytest.importorskip("torchdiffeq._impl.dopri8")
    ref = dopri8._DOPRI8_TABLEAU
    assert_matches_fsal_form(
        TABLEAUX["dopri8"],
        ref.alpha.numpy(),
        [row.numpy() for row in ref.beta],
        ref.c_sol.numpy(),
        ref.c_error.numpy(),
    )


@pytest.mark.jax
@pytest.mark.parametrize("name", ["tsit5", "dopri8"])
def test_matches_diffrax_step_and_interpolation(jax_x64: object, name: str) -> None:
    diffrax = pytest.importorskip("diffrax")
    jnp = pytest.importorskip("jax.numpy")
    tab = TABLEAUX[name]

    def vector_field(t: Any, y: Any, args: None) -> Any:
        u, v = y[0], y[1]
        return jnp.stack(
            [u * (1.0 - u) * (2.0 + jnp.cos(3.0 * t)), -2.0 * (t - 1.0) * v**2]
        )

    solver = getattr(diffrax, DIFFRAX_CLASSES[name])()
    term = diffrax.ODETerm(vector_field)
    t0, t1 = 0.4, 0.9
    y0 = exact(t0)
    state = solver.init(term, t0, t1, jnp.asarray(y0), None)
    y1_ref, err_ref, dense_info, _, _ = solver.step(
        term, t0, t1, jnp.asarray(y0), None, state, made_jump=False
    )
    interpolation = solver.interpolation_cls(t0=t0, t1=t1, **dense_info)

    h = t1 - t0
    y1, k = rk_step(tab, t0, y0, h)
    assert tab.e is not None
    np.testing.assert_allclose(y1, np.asarray(y1_ref), rtol=1e-14, atol=0)
    # diffrax's error is b_error @ k with b_error = b - b_hat: the opposite sign.
    # Compared up to the rounding of the (cancelling) sum.
    scale = h * float(np.abs(k).max()) * float(np.abs(tab.e).sum())
    np.testing.assert_allclose(
        h * (k.T @ tab.e), -np.asarray(err_ref), rtol=0, atol=1e-14 * scale
    )
    for theta in np.linspace(0.0, 1.0, 11):
        ours = dense(tab, y0, k, h, float(theta))
        ref = np.asarray(interpolation.evaluate(t0 + theta * h))
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=0)
