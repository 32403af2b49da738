"""Test problems with closed-form solutions, written once against the Array API."""

from __future__ import annotations

import itertools

import numpy as np

import diffeqkit as dk

# A damped rotation: eigenvalues -0.5 +/- 2i, so the solution oscillates and decays.
LINEAR_A = np.array([[-0.5, 2.0], [-2.0, -0.5]])
LINEAR_U0 = np.array([1.0, 0.5])


def linear(u, p, t):
    return p @ u


def linear_problem(tspan=(0.0, 2.0)) -> dk.ODEProblem:
    return dk.ODEProblem(linear, LINEAR_U0, tspan, LINEAR_A)


def linear_exact(ts, t0: float = 0.0) -> np.ndarray:
    """exp(A t) u0 in closed form: A = [[a, b], [-b, a]] gives
    exp(A t) = e^(a t) [[cos bt, sin bt], [-sin bt, cos bt]] (no SciPy needed)."""
    a, b = LINEAR_A[0, 0], LINEAR_A[0, 1]
    out = []
    for t in np.asarray(ts, dtype=np.float64) - t0:
        c, s = np.cos(b * t), np.sin(b * t)
        out.append(np.exp(a * t) * (np.array([[c, s], [-s, c]]) @ LINEAR_U0))
    return np.stack(out)


def _expm_linear(t: float) -> np.ndarray:
    a, b = LINEAR_A[0, 0], LINEAR_A[0, 1]
    c, s = np.cos(b * t), np.sin(b * t)
    return np.exp(a * t) * np.array([[c, s], [-s, c]])


def linear_grads(ts, cotangent) -> tuple[np.ndarray, np.ndarray]:
    """Exact dL/du0 and dL/dA for L = sum_i <cotangent_i, u(t_i)>, u(t) = exp(At) u0
    (t0 = 0).

    dL/du0 = sum_i exp(A t_i)^T c_i. For A, the derivative of exp(At) in the
    direction E is the Frechet derivative int_0^t exp(A(t-s)) E exp(As) ds, so
    dL/dA = sum_i int_0^t_i exp(A(t_i-s))^T c_i (exp(As) u0)^T ds, integrated by
    60-point Gauss-Legendre over closed-form integrands (entire functions of s, so
    the rule is exact to rounding at these t).
    """
    nodes, weights = np.polynomial.legendre.leggauss(60)
    du0 = np.zeros(2)
    dA = np.zeros((2, 2))
    for t, c in zip(
        np.asarray(ts, dtype=np.float64), np.asarray(cotangent), strict=True
    ):
        du0 += _expm_linear(t).T @ c
        for x, w in zip(nodes, weights, strict=True):
            s = 0.5 * t * (x + 1.0)
            left = _expm_linear(t - s).T @ c
            right = _expm_linear(s) @ LINEAR_U0
            dA += 0.5 * t * w * np.outer(left, right)
    return du0, dA


# Logistic growth u' = r u (1 - u / K).
LOGISTIC_P = {"r": 1.3, "K": 5.0}
LOGISTIC_U0 = np.array([0.2, 1.0])


def logistic(u, p, t):
    return p["r"] * u * (1 - u / p["K"])


def logistic_problem(tspan=(0.0, 4.0)) -> dk.ODEProblem:
    return dk.ODEProblem(logistic, LOGISTIC_U0, tspan, dict(LOGISTIC_P))


def logistic_exact(ts, t0: float = 0.0) -> np.ndarray:
    r, K = LOGISTIC_P["r"], LOGISTIC_P["K"]
    e = np.exp(r * (np.asarray(ts)[:, None] - t0))
    return K * LOGISTIC_U0 * e / (K + LOGISTIC_U0 * (e - 1))


def logistic_grads(ts, cotangent) -> tuple[np.ndarray, dict[str, float]]:
    """Exact dL/du0, dL/dr and dL/dK for L = sum_i <cotangent_i, u(t_i)> (t0 = 0),
    by complex step on the closed form (h = 1e-30: no subtraction, so exact to
    rounding)."""
    h = 1e-30
    ts = np.asarray(ts, dtype=np.float64)[:, None]
    cot = np.asarray(cotangent)

    def u(u0, r, K):
        e = np.exp(r * ts)
        return K * u0 * e / (K + u0 * (e - 1))

    r, K = LOGISTIC_P["r"], LOGISTIC_P["K"]
    u0 = LOGISTIC_U0.astype(complex)
    du0 = np.array(
        [
            np.sum(cot * np.imag(u(u0 + 1j * h * np.eye(2)[j], r, K))) / h
            for j in range(2)
        ]
    )
    dr = np.sum(cot * np.imag(u(u0, r + 1j * h, K))) / h
    dK = np.sum(cot * np.imag(u(u0, r, K + 1j * h))) / h
    return du0, {"r": float(dr), "K": float(dK)}


def lotka_volterra(u, p, t):
    xp = dk.array_namespace(u)
    a, b, c, d = p[0], p[1], p[2], p[3]
    return xp.stack([a * u[0] - b * u[0] * u[1], -c * u[1] + d * u[0] * u[1]])


def lotka_volterra_problem() -> dk.ODEProblem:
    return dk.ODEProblem(
        lotka_volterra,
        np.array([1.0, 1.0]),
        (0.0, 10.0),
        np.array([1.5, 1.0, 3.0, 1.0]),
    )


def replay_fixed_steps(alg: str, grid: np.ndarray) -> dict[float, np.ndarray]:
    """The linear problem stepped with `alg`'s tableau on `grid`, in NumPy:
    ``{t: u(t)}`` at every grid point (the independent reference for fixed steps)."""
    from diffeqkit._tableaux import get_tableau

    tab = get_tableau(alg)
    u = LINEAR_U0.copy()
    out = {float(grid[0]): u}
    for t, t_next in itertools.pairwise(grid):
        h = t_next - t
        ks: list[np.ndarray] = []
        for i in range(tab.n_stages):
            ks.append(LINEAR_A @ (u + h * sum(tab.a[i, j] * ks[j] for j in range(i))))
        u = u + h * sum(b * k for b, k in zip(tab.b, ks, strict=True))
        out[float(t_next)] = u
    return out


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)
