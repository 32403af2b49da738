"""Tests of the Rosenbrock tableaux (`diffeqkit._rosenbrock`), algebraically.

Each tableau is converted to its classical form (alpha, Gamma, b, b_hat) and
checked against the Rosenbrock order conditions of Hairer & Wanner (Solving ODEs
II, section IV.7, Table 7.1) up to its order, with the embedded solution's
conditions shown to hold up to its order and to fail one beyond (the estimate
is then truly of that order); plus consistency of the stage times and of the
``f_t`` weights, stiff accuracy and L-stability (R(-inf) = 0, |R| <= 1 on the
imaginary axis and in the left half-plane).
"""

from __future__ import annotations

import numpy as np
import pytest

from diffeqkit._rosenbrock import ROSENBROCK_TABLEAUX, RosenbrockTableau

NAMES = list(ROSENBROCK_TABLEAUX)


def residuals(tab: RosenbrockTableau, weights: np.ndarray) -> dict[int, np.ndarray]:
    """Residuals of the order conditions (Table 7.1) of `weights`, by order.

    With ``beta_ij = alpha_ij + gamma_ij`` for ``j < i`` (strictly lower),
    ``beta'_i = sum_j beta_ij`` and ``alpha_i = sum_j alpha_ij``."""
    alpha, gamma_full, _, _ = tab.classical()
    g = tab.gamma
    beta = alpha + np.tril(gamma_full, -1)
    bp = beta.sum(axis=1)
    a = alpha.sum(axis=1)
    w = weights
    return {
        1: np.array([w.sum() - 1.0]),
        2: np.array([w @ bp - (0.5 - g)]),
        3: np.array([w @ a**2 - 1 / 3, w @ beta @ bp - (1 / 6 - g + g**2)]),
        4: np.array(
            [
                w @ a**3 - 1 / 4,
                w @ (a * (alpha @ bp)) - (1 / 8 - g / 3),
                w @ beta @ a**2 - (1 / 12 - g / 3),
                w @ beta @ beta @ bp - (1 / 24 - g / 2 + 1.5 * g**2 - g**3),
            ]
        ),
    }


def stability(tab: RosenbrockTableau, weights: np.ndarray, z: complex) -> complex:
    """``R(z) = 1 + z w^T (I - z B)^-1 1``, ``B = alpha + Gamma``."""
    alpha, gamma_full, _, _ = tab.classical()
    big = alpha + gamma_full
    s = tab.n_stages
    k = np.linalg.solve(np.eye(s) - z * big, np.ones(s))
    return complex(1.0 + z * (weights @ k))


@pytest.mark.parametrize("name", NAMES)
def test_rows_have_their_lengths(name):
    tab = ROSENBROCK_TABLEAUX[name]
    s = tab.n_stages
    assert [len(r) for r in tab.a] == list(range(s))
    assert [len(r) for r in tab.C] == list(range(s))
    assert len(tab.d) == len(tab.m) == len(tab.m_hat) == s


@pytest.mark.parametrize("name", NAMES)
def test_stage_times_and_time_derivative_weights_are_consistent(name):
    # c_i = sum_j alpha_ij and d_i = sum_j Gamma_ij (the T terms of a
    # non-autonomous problem, seen as an autonomous one with t as a component).
    tab = ROSENBROCK_TABLEAUX[name]
    alpha, gamma_full, _, _ = tab.classical()
    np.testing.assert_allclose(alpha.sum(axis=1), tab.c, atol=1e-14)
    np.testing.assert_allclose(gamma_full.sum(axis=1), tab.d, atol=1e-14)
    np.testing.assert_allclose(np.diag(gamma_full), tab.gamma, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_solution_satisfies_the_order_conditions(name):
    tab = ROSENBROCK_TABLEAUX[name]
    res = residuals(tab, tab.classical().b)
    for order in range(1, tab.order + 1):
        np.testing.assert_allclose(res[order], 0.0, atol=1e-13, err_msg=f"{order}")


@pytest.mark.parametrize("name", NAMES)
def test_embedded_solution_has_exactly_its_order(name):
    tab = ROSENBROCK_TABLEAUX[name]
    res = residuals(tab, tab.classical().b_hat)
    for order in range(1, tab.error_order + 1):
        np.testing.assert_allclose(res[order], 0.0, atol=1e-13, err_msg=f"{order}")
    # RODAS's embedded solution misses the order-4 conditions by 4e-3 to 0.1.
    assert np.abs(res[tab.error_order + 1]).max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_both_solutions_are_stiffly_accurate(name):
    # b_j = beta_sj (the last row of alpha + Gamma, diagonal included) and
    # alpha_s = 1: y1 is the last stage's argument plus its own u. The embedded
    # solution is the same of the first s - 1 stages.
    tab = ROSENBROCK_TABLEAUX[name]
    alpha, gamma_full, b, b_hat = tab.classical()
    big = alpha + gamma_full
    s = tab.n_stages
    np.testing.assert_allclose(b, big[s - 1], atol=1e-13)
    np.testing.assert_allclose(b_hat[: s - 1], big[s - 2, : s - 1], atol=1e-13)
    assert b_hat[s - 1] == 0.0
    assert tab.c[s - 1] == tab.c[s - 2] == 1.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("which", ["b", "b_hat"])
def test_l_stable(name, which):
    tab = ROSENBROCK_TABLEAUX[name]
    weights = getattr(tab.classical(), which)
    assert abs(stability(tab, weights, -1e12)) < 1e-10
    # A-stable: |R| <= 1 on the imaginary axis (R is analytic in the left
    # half-plane, its poles being at 1/gamma > 0) and, as a check, inside it.
    ys = np.concatenate([[0.0], np.logspace(-3, 6, 400)])
    on_axis = np.array([abs(stability(tab, weights, 1j * y)) for y in ys])
    assert on_axis.max() <= 1.0 + 1e-12
    rng = np.random.default_rng(0)
    zs = -np.abs(rng.standard_normal(200)) * 10 + 1j * rng.standard_normal(200) * 10
    assert max(abs(stability(tab, weights, z)) for z in zs) <= 1.0 + 1e-12
    # Sanity: an explicit-like stability function would exceed 1 out there.
    assert abs(stability(tab, weights, 0.5)) > 1.0
