"""Gradients on every backend x sensealg against closed forms, with pytrees, the
default rule and bad input. Every case runs in float64; `dk.vjp` and
`dk.value_and_grad` are the same call on every backend. Finite differences and
agreement across methods and backends: tests/test_gradient_agreement.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BY_NAME as SENSEALGS
from conftest import as_backend, need, need_gradients, sensealg_params
from problems import (
    LINEAR_A,
    LINEAR_U0,
    linear,
    linear_grads,
    linear_problem,
    logistic_exact,
    logistic_grads,
    logistic_problem,
    to_numpy,
)

import diffeqkit as dk
from diffeqkit import backends


def unsupported_params() -> list:
    return [
        pytest.param(b, name, id=f"{b}-{name}", marks=getattr(pytest.mark, b))
        for b, spec in backends.SPECS.items()
        for name in SENSEALGS
        if name not in spec.capabilities.sensealgs
    ]


TIGHT = {"rtol": 1e-10, "atol": 1e-12}

# ---------------------------------------------------------------------------------
# Closed forms.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "name"), sensealg_params())
def test_vjp_of_linear_ode_matches_matrix_exponential_derivative(backend, name):
    need_gradients(backend)
    ts = np.linspace(0.0, 2.0, 6)
    cot = np.random.default_rng(0).normal(size=(6, 2))
    sol, pullback = dk.vjp(
        linear_problem(),
        "tsit5",
        backend=backend,
        saveat=ts,
        sensealg=SENSEALGS[name],
        **TIGHT,
    )
    grads = pullback(cot)
    du0, dA = linear_grads(ts, cot)
    # At rtol 1e-10 the solution's global error is ~1e-10 relative; its
    # sensitivities (the same linear ODE) carry errors of the same order. The
    # gradients are O(1), so 1e-8 leaves two orders of margin.
    np.testing.assert_allclose(to_numpy(grads.u0), du0, atol=1e-8)
    np.testing.assert_allclose(to_numpy(grads.p), dA, atol=1e-8)
    assert sol.sensealg == SENSEALGS[name]
    assert tuple(grads.u0.shape) == (2,)
    assert tuple(grads.p.shape) == (2, 2)


@pytest.mark.parametrize(("backend", "name"), sensealg_params())
def test_backward_in_time_gradients_match_closed_form(backend, name):
    need_gradients(backend)
    t0 = 2.0
    ts = np.linspace(2.0, 0.0, 5)
    cot = np.random.default_rng(3).normal(size=(5, 2))
    prob = dk.ODEProblem(linear, LINEAR_U0, (t0, 0.0), LINEAR_A)
    _, pullback = dk.vjp(
        prob, "tsit5", backend=backend, saveat=ts, sensealg=SENSEALGS[name], **TIGHT
    )
    grads = pullback(cot)
    # u(t) = exp(A (t - t0)) u0: the closed form at the (negative) elapsed times.
    du0, dA = linear_grads(ts - t0, cot)
    # Backward in time the solution grows like e^{0.5 |t|}: gradients up to ~10,
    # solved to ~1e-10 relative.
    np.testing.assert_allclose(to_numpy(grads.u0), du0, rtol=0, atol=1e-8)
    np.testing.assert_allclose(to_numpy(grads.p), dA, rtol=0, atol=1e-8)


@pytest.mark.parametrize(("backend", "name"), sensealg_params())
def test_save_times_inside_tspan_count_only_where_they_are(backend, name):
    need_gradients(backend)
    ts = np.array([0.5, 1.0, 1.7])  # neither t0 nor t1
    cot = np.random.default_rng(4).normal(size=(3, 2))
    _, pullback = dk.vjp(
        linear_problem(),
        "dopri8",
        backend=backend,
        saveat=ts,
        sensealg=SENSEALGS[name],
        **TIGHT,
    )
    grads = pullback(cot)
    du0, dA = linear_grads(ts, cot)
    # As in the matrix-exponential test above.
    np.testing.assert_allclose(to_numpy(grads.u0), du0, rtol=0, atol=1e-8)
    np.testing.assert_allclose(to_numpy(grads.p), dA, rtol=0, atol=1e-8)


@pytest.mark.parametrize(("backend", "name"), sensealg_params())
def test_saving_only_t0_gives_the_cotangent_itself(backend, name):
    need_gradients(backend)
    _, pullback = dk.vjp(
        linear_problem(), backend=backend, saveat=[0.0], sensealg=SENSEALGS[name]
    )
    grads = pullback(np.array([[2.0, -1.0]]))
    np.testing.assert_array_equal(to_numpy(grads.u0), [2.0, -1.0])
    np.testing.assert_array_equal(to_numpy(grads.p), np.zeros((2, 2)))


@pytest.mark.parametrize(("backend", "name"), sensealg_params())
def test_u0_of_any_shape_gets_a_gradient_of_that_shape(backend, name):
    need_gradients(backend)
    prob = dk.ODEProblem(linear, LINEAR_U0.reshape(2, 1), (0.0, 2.0), LINEAR_A)
    ts = np.linspace(0.0, 2.0, 3)
    cot = np.random.default_rng(5).normal(size=(3, 2, 1))
    _, pullback = dk.vjp(
        prob, backend=backend, saveat=ts, sensealg=SENSEALGS[name], **TIGHT
    )
    grads = pullback(cot)
    du0, dA = linear_grads(ts, cot[..., 0])
    assert tuple(grads.u0.shape) == (2, 1)
    # As in the matrix-exponential test above.
    np.testing.assert_allclose(to_numpy(grads.u0)[:, 0], du0, rtol=0, atol=1e-8)
    np.testing.assert_allclose(to_numpy(grads.p), dA, rtol=0, atol=1e-8)


@pytest.mark.parametrize(("backend", "name"), sensealg_params())
def test_value_and_grad_of_logistic_matches_closed_form_with_dict_p(backend, name):
    need_gradients(backend)
    ts = np.linspace(0.0, 4.0, 5)
    data = np.random.default_rng(1).normal(size=(5, 2))

    def loss(sol):
        xp = dk.array_namespace(sol.u)
        target = xp.asarray(data, dtype=sol.u.dtype)
        return 0.5 * xp.sum((sol.u - target) ** 2)

    value, grads = dk.value_and_grad(
        loss,
        logistic_problem(),
        "dopri5",
        backend=backend,
        saveat=ts,
        sensealg=SENSEALGS[name],
        **TIGHT,
    )
    u = logistic_exact(ts)
    du0, dp = logistic_grads(ts, u - data)  # cotangent of the loss: u - data
    assert float(value) == pytest.approx(0.5 * np.sum((u - data) ** 2), rel=1e-8)
    # As above: O(1) gradients, ~1e-10 relative solver error.
    np.testing.assert_allclose(to_numpy(grads.u0), du0, rtol=1e-7, atol=1e-8)
    assert set(grads.p) == {"r", "K"}
    for k in dp:
        assert float(grads.p[k]) == pytest.approx(dp[k], rel=1e-7, abs=1e-8)


# ---------------------------------------------------------------------------------
# Pytrees, u0 only, defaults, errors.
# ---------------------------------------------------------------------------------


def nested(u, p, t):
    return -p["decay"]["rate"] * u + p["forcing"][0] * p["forcing"][1]


@pytest.mark.parametrize(("backend", "name"), sensealg_params())
def test_nested_pytree_p_gets_gradients_in_its_own_structure(backend, name):
    need_gradients(backend)
    p = {
        "decay": {"rate": as_backend(backend, [0.7, 1.1])},
        "forcing": [as_backend(backend, 0.3), as_backend(backend, 2.0)],
    }
    prob = dk.ODEProblem(nested, as_backend(backend, [1.0, -1.0]), (0.0, 1.0), p)
    _, pullback = dk.vjp(
        prob, "tsit5", backend=backend, sensealg=SENSEALGS[name], **TIGHT
    )
    cot = np.zeros((2, 2))
    cot[-1] = 1.0  # L = sum(u(1))
    g = pullback(cot)
    # u_i(1) = e^{-k_i} u0_i + c (1 - e^{-k_i}) / k_i with c = a*b.
    k, a, b, u0 = np.array([0.7, 1.1]), 0.3, 2.0, np.array([1.0, -1.0])
    e = np.exp(-k)
    dk_ = -e * u0 + a * b * (e * k - (1 - e)) / k**2
    dc = np.sum((1 - e) / k)
    np.testing.assert_allclose(to_numpy(g.u0), e, rtol=1e-8)
    np.testing.assert_allclose(to_numpy(g.p["decay"]["rate"]), dk_, rtol=1e-8)
    assert isinstance(g.p["forcing"], list)
    assert float(g.p["forcing"][0]) == pytest.approx(dc * b, rel=1e-8)
    assert float(g.p["forcing"][1]) == pytest.approx(dc * a, rel=1e-8)


@pytest.mark.parametrize("backend", list(backends.SPECS))
def test_default_sensealg_is_recorded_and_follows_the_documented_rule(backend):
    need(backend)
    small = dk.solve(linear_problem(), backend=backend)
    assert small.sensealg == dk.default_sensealg(backend, LINEAR_U0, LINEAR_A)
    # 2 + 4 inputs: forward mode where the measured threshold allows it.
    few = backends.SPECS[backend].capabilities.forward_mode_max_inputs >= 6
    assert isinstance(small.sensealg, dk.ForwardMode if few else dk.CheckpointedAdjoint)
    big_p = np.zeros((64, 64))
    big = dk.solve(
        dk.ODEProblem(linear, np.ones(64), (0.0, 1.0), big_p), backend=backend
    )
    assert isinstance(big.sensealg, dk.CheckpointedAdjoint)


@pytest.mark.parametrize(("backend", "name"), unsupported_params())
def test_undeclared_sensealg_raises_unsupported_naming_alternatives(backend, name):
    need(backend)
    with pytest.raises(
        dk.UnsupportedError,
        match=rf"sensealg=dk\.{name}\(\) is not "
        rf"available on backend='{backend}'\. {backend} offers: ",
    ):
        dk.vjp(linear_problem(), backend=backend, sensealg=SENSEALGS[name])


@pytest.mark.parametrize("backend", list(backends.SPECS))
def test_cotangent_of_the_wrong_shape_raises(backend):
    need_gradients(backend)
    sol, pullback = dk.vjp(
        linear_problem(), backend=backend, sensealg=dk.CheckpointedAdjoint()
    )
    with pytest.raises(
        dk.InvalidProblemError,
        match=r"cotangent must have the shape "
        r"of sol.u, \(2, 2\); got shape \(2,\)",
    ):
        pullback(np.ones(2))
    assert tuple(sol.u.shape) == (2, 2)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"checkpoints": 0},
            r"CheckpointedAdjoint\(checkpoints=\.\.\.\) must be an "
            r"int >= 1 or None; got CheckpointedAdjoint\(checkpoints=\.\.\.\)=0",
        ),
        ({"rtol": -1.0}, r"CheckpointedAdjoint\(rtol=\.\.\.\) must be a positive"),
        (
            {"autodiff": "numpy"},
            r"CheckpointedAdjoint\(autodiff=\.\.\.\) must be "
            r"'jax', 'torch', 'jac' or None",
        ),
    ],
)
def test_bad_sensealg_options_raise_naming_the_option(options, match):
    with pytest.raises(dk.InvalidProblemError, match=match):
        dk.CheckpointedAdjoint(**options)


def test_sensealg_classes_are_frozen_and_hashable():
    a, b = dk.CheckpointedAdjoint(checkpoints=4), dk.CheckpointedAdjoint(checkpoints=4)
    assert a == b
    assert hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.checkpoints = 5  # pyright: ignore[reportAttributeAccessIssue]
