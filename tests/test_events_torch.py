"""Events on the torch backend: crossings located on the adaptive drivers' dense
output, jumps, terminal stops, time events and the Zeno guard; gradients of saved
states and of event times through every sensealg that differentiates events,
against closed forms and the SciPy backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import need

import diffeqkit as dk

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")

G = 9.81
TIGHT = {"rtol": 1e-11, "atol": 1e-12}
EVENT_SENSEALGS = [
    "ReverseThroughSolver",
    "ForwardMode",
    "ContinuousAdjoint",
    "CheckpointedAdjoint",
    "InterpolatingAdjoint",
]


@pytest.fixture(autouse=True)
def _torch():
    need("torch")


def _fall(u, p, t):
    return torch.stack([u[1], -G + 0.0 * u[1]])


def _ground(terminal=False):
    return dk.Event(
        lambda u, p, t: u[0],
        direction=-1,
        terminal=terminal,
        affect=lambda u, p, t: torch.stack([u[0], -p["e"] * u[1]]),
    )


def _ball(h0, e, t1=2.0):
    return dk.ODEProblem(
        _fall, h0 * torch.tensor([1.0, 0.0], dtype=torch.float64), (0.0, t1), {"e": e}
    )


def _f64(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("alg", ["tsit5", "dopri8", "rosenbrock23"])
def test_ball_impacts_match_the_closed_form(alg):
    sol = dk.solve(
        _ball(1.0, _f64(0.8)),
        alg,
        events=[_ground()],
        **({"rtol": 1e-8, "atol": 1e-10} if alg == "rosenbrock23" else TIGHT),
    )
    t = math.sqrt(2 / G)
    expected = [t, t + 1.6 * t, t + 1.6 * t + 1.28 * t]
    tol = 1e-5 if alg == "rosenbrock23" else 1e-9
    np.testing.assert_allclose(sol.t_events[0].numpy(), expected, rtol=tol)
    assert sol.stats["nevents"] == 3
    assert sol.u_events[0].shape == (3, 2)
    assert sol.status == "success"


@pytest.mark.parametrize("sensealg", EVENT_SENSEALGS)
def test_ball_gradients_match_the_closed_form(sensealg):
    h0, e = _f64(1.0, True), _f64(0.8, True)
    prob = dk.ODEProblem(_fall, torch.stack([h0, 0.0 * h0]), (0.0, 2.0), {"e": e})
    T = 0.9
    sol = dk.solve(
        prob,
        "tsit5",
        events=[_ground()],
        saveat=[T, 2.0],
        sensealg=getattr(dk, sensealg)(),
        **TIGHT,
    )
    t1 = math.sqrt(2 / G)
    s, v1 = T - t1, 0.8 * G * t1
    np.testing.assert_allclose(sol.u[0, 0].item(), v1 * s - G * s**2 / 2, rtol=1e-9)
    dh0, de = torch.autograd.grad(sol.u[0, 0], [h0, e], retain_graph=True)
    dt1 = 1.0 / (G * t1)
    np.testing.assert_allclose(de.item(), G * t1 * s, rtol=1e-7)
    np.testing.assert_allclose(dh0.item(), dt1 * (0.8 * G * s - v1 + G * s), rtol=1e-7)
    # the event times are differentiable: t2 = t1 (1 + 2 e)
    dh0, de = torch.autograd.grad(sol.t_events[0][1], [h0, e])
    np.testing.assert_allclose(de.item(), 2 * t1, rtol=1e-8)
    np.testing.assert_allclose(dh0.item(), dt1 * (1 + 1.6), rtol=1e-8)


def test_vjp_after_a_dose_matches_scipy_and_the_closed_form():
    def f(u, p, t):
        return -p["k"] * u

    ev = dk.Event(
        lambda u, p, t: u[0] - p["c"],
        direction=-1,
        terminal=False,
        affect=lambda u, p, t: u + p["D"],
    )
    p = {"k": 0.7, "c": 0.5, "D": 0.3}
    prob = dk.ODEProblem(
        f,
        torch.tensor([2.0], dtype=torch.float64),
        (0.0, 2.5),
        {k: torch.tensor(v, dtype=torch.float64) for k, v in p.items()},
    )
    sol, pullback = dk.vjp(
        prob,
        "tsit5",
        saveat=[2.5],
        events=[ev],
        sensealg=dk.InterpolatingAdjoint(),
        **TIGHT,
    )
    k, c, D, u0, T = 0.7, 0.5, 0.3, 2.0, 2.5
    uT = (c + D) / c * u0 * math.exp(-k * T)
    np.testing.assert_allclose(sol.u[0, 0].item(), uT, rtol=1e-9)
    grads = pullback(torch.ones(1, 1, dtype=torch.float64))
    np.testing.assert_allclose(grads.u0.item(), uT / u0, rtol=1e-7)
    np.testing.assert_allclose(grads.p["k"].item(), -T * uT, rtol=1e-7)
    np.testing.assert_allclose(
        grads.p["c"].item(), -D / c**2 * u0 * math.exp(-k * T), rtol=1e-7
    )
    np.testing.assert_allclose(
        grads.p["D"].item(), u0 / c * math.exp(-k * T), rtol=1e-7
    )


@pytest.mark.parametrize("sensealg", ["ReverseThroughSolver", "ContinuousAdjoint"])
def test_gradient_through_two_events_matches_scipy(sensealg):
    need("scipy")

    def f(u, p, t):
        xp = dk.array_namespace(u)
        return xp.stack([u[1], -p["w"] * xp.sin(u[0])])

    def jump(u, p, t):
        xp = dk.array_namespace(u)
        return xp.stack([u[0], -p["e"] * u[1] + 0.1 * t])

    ev = dk.Event(
        lambda u, p, t: u[0] - 0.1 * t, direction=-1, terminal=False, affect=jump
    )
    ts = np.array([1.0, 2.5, 4.0])
    cot = np.array([[0.3, -0.2], [1.0, 0.5], [-0.4, 0.8]])
    kw = {"saveat": ts, "events": [ev], "rtol": 1e-12, "atol": 1e-12}
    ref_prob = dk.ODEProblem(
        f, np.array([1.0, 0.0]), (0.0, 4.0), {"w": np.array(2.0), "e": np.array(0.7)}
    )
    ref, ref_pull = dk.vjp(
        ref_prob, "dopri8", backend="scipy", sensealg=dk.ForwardMode(), **kw
    )
    ref_grads = ref_pull(cot)
    prob = dk.ODEProblem(
        f,
        torch.tensor([1.0, 0.0], dtype=torch.float64),
        (0.0, 4.0),
        {"w": _f64(2.0), "e": _f64(0.7)},
    )
    sol, pull = dk.vjp(prob, "dopri8", sensealg=getattr(dk, sensealg)(), **kw)
    assert sol.stats["nevents"] == ref.stats["nevents"] >= 2
    np.testing.assert_allclose(sol.u.numpy(), ref.u, rtol=1e-8, atol=1e-10)
    grads = pull(torch.as_tensor(cot))
    np.testing.assert_allclose(grads.u0.numpy(), ref_grads.u0, rtol=1e-6)
    for name in ("w", "e"):
        np.testing.assert_allclose(grads.p[name].item(), ref_grads.p[name], rtol=1e-6)


def test_terminal_event_and_nan_rows():
    t = np.linspace(0.0, 1.0, 11)
    sol = dk.solve(
        _ball(1.0, _f64(0.8)),
        "tsit5",
        saveat=t,
        events=[_ground(terminal=True)],
        **TIGHT,
    )
    t1 = math.sqrt(2 / G)
    assert sol.status == "terminated"
    assert sol.success
    np.testing.assert_allclose(sol.t_events[0].numpy(), [t1], rtol=1e-10)
    assert torch.isnan(sol.u[torch.as_tensor(t) > t1]).all()
    assert torch.isfinite(sol.u[torch.as_tensor(t) < t1]).all()


def test_time_event_lands_exactly_on_24_and_two_in_one_step_in_order():
    prob = dk.ODEProblem(
        lambda u, p, t: -0.1 * u, torch.tensor([1.0], dtype=torch.float64), (0.0, 60.0)
    )
    dose = dk.Event(
        lambda u, p, t: t - 24.0, terminal=False, affect=lambda u, p, t: u + 1.0
    )
    sol = dk.solve(prob, "tsit5", events=[dose], saveat=[0.0, 24.0, 30.0], **TIGHT)
    assert abs(sol.t_events[0][0].item() - 24.0) <= math.ulp(24.0)
    np.testing.assert_allclose(sol.u[1, 0].item(), math.exp(-2.4) + 1.0, rtol=1e-9)
    # u = t: one step crosses both; the later-listed event fires first
    line = dk.ODEProblem(
        lambda u, p, t: torch.ones_like(u),
        torch.tensor([0.0], dtype=torch.float64),
        (0.0, 1.0),
    )
    late = dk.Event(lambda u, p, t: u[0] - 0.6, terminal=False)
    early = dk.Event(
        lambda u, p, t: u[0] - 0.3, terminal=False, affect=lambda u, p, t: u + 0.05
    )
    sol = dk.solve(line, "tsit5", events=[late, early], saveat=[1.0])
    np.testing.assert_allclose(sol.t_events[1].numpy(), [0.3], rtol=1e-12)
    np.testing.assert_allclose(sol.t_events[0].numpy(), [0.55], rtol=1e-12)
    np.testing.assert_allclose(sol.u[-1].numpy(), [1.05], rtol=1e-12)


def test_zeno_ball_stops_with_too_many_events():
    prob = _ball(1.0, _f64(0.5), t1=10.0)
    with pytest.raises(dk.SolveError, match=r"too_many_events|max_events"):
        dk.solve(prob, "tsit5", events=[_ground()], max_events=15)
    sol = dk.solve(prob, "tsit5", events=[_ground()], throw=False)
    assert sol.status == "too_many_events"


def test_a_condition_that_is_not_a_scalar_is_refused():
    prob = _ball(1.0, _f64(0.8))
    vector = dk.Event(lambda u, p, t: u)
    with pytest.raises(dk.InvalidProblemError, match=r"events\[0\].condition"):
        dk.solve(prob, "tsit5", events=[vector])


@pytest.mark.parametrize("sensealg", EVENT_SENSEALGS)
def test_terminal_event_time_gradient_matches_the_closed_form(sensealg):
    # u' = -k u stops where u = c: t* = ln(u0 / c) / k
    u0, k = _f64([2.0], True), _f64(0.7, True)
    prob = dk.ODEProblem(lambda u, p, t: -p * u, u0, (0.0, 5.0), k)
    ev = dk.Event(lambda u, p, t: u[0] - 0.5, direction=-1)
    sol = dk.solve(
        prob,
        "tsit5",
        events=[ev],
        saveat=[1.0, 2.5],
        sensealg=getattr(dk, sensealg)(),
        **TIGHT,
    )
    t_star = math.log(2.0 / 0.5) / 0.7
    assert sol.status == "terminated"
    np.testing.assert_allclose(sol.t_events[0].detach().numpy(), [t_star], rtol=1e-9)
    assert torch.isnan(sol.u[1]).all()  # 2.5 is after the stop
    du0, dk_ = torch.autograd.grad(sol.t_events[0][0], [u0, k])
    np.testing.assert_allclose(du0.numpy(), [1 / (0.7 * 2.0)], rtol=1e-8)
    np.testing.assert_allclose(dk_.item(), -t_star / 0.7, rtol=1e-8)


@pytest.mark.parametrize("sensealg", EVENT_SENSEALGS)
def test_fixed_step_events_and_gradients(sensealg):
    # rk4 is exact on the ball's quadratic flight: impacts and the height after a
    # bounce match the closed form, located on the step's Hermite interpolant
    h0, e = _f64(1.0, True), _f64(0.8, True)
    prob = dk.ODEProblem(_fall, torch.stack([h0, 0.0 * h0]), (0.0, 2.0), {"e": e})
    T = 0.9
    sol = dk.solve(
        prob,
        "rk4",
        dt0=0.05,
        events=[_ground()],
        saveat=[T, 2.0],
        sensealg=getattr(dk, sensealg)(),
    )
    t1 = math.sqrt(2 / G)
    np.testing.assert_allclose(
        sol.t_events[0].detach().numpy(), [t1, 2.6 * t1, 3.88 * t1], rtol=1e-10
    )
    s, v1 = T - t1, 0.8 * G * t1
    np.testing.assert_allclose(sol.u[0, 0].item(), v1 * s - G * s**2 / 2, rtol=1e-10)
    dh0, de = torch.autograd.grad(sol.u[0, 0], [h0, e])
    np.testing.assert_allclose(de.item(), G * t1 * s, rtol=1e-8)
    np.testing.assert_allclose(
        dh0.item(), (0.8 * G * s - v1 + G * s) / (G * t1), rtol=1e-8
    )


@pytest.mark.parametrize("sensealg", ["ReverseThroughSolver", "InterpolatingAdjoint"])
def test_events_backward_in_time_and_their_gradient(sensealg):
    # u = exp(-t) from t = 2 back to 0 crosses 0.5 at ln 2, where it doubles:
    # u(0) = 2 e^2 u(2)
    u2 = _f64([math.exp(-2.0)], True)
    prob = dk.ODEProblem(lambda u, p, t: -u, u2, (2.0, 0.0))
    ev = dk.Event(
        lambda u, p, t: u[0] - 0.5, terminal=False, affect=lambda u, p, t: 2.0 * u
    )
    sol = dk.solve(
        prob,
        "tsit5",
        events=[ev],
        saveat=[2.0, 1.0, 0.0],
        sensealg=getattr(dk, sensealg)(),
        **TIGHT,
    )
    np.testing.assert_allclose(
        sol.t_events[0].detach().numpy(), [math.log(2.0)], rtol=1e-9
    )
    np.testing.assert_allclose(
        sol.u[:, 0].detach().numpy(), [math.exp(-2.0), math.exp(-1.0), 2.0], rtol=1e-9
    )
    (du2,) = torch.autograd.grad(sol.u[-1, 0], [u2], retain_graph=True)
    np.testing.assert_allclose(du2.numpy(), [2.0 * math.exp(2.0)], rtol=1e-7)
    # dt*/du(2): u(2) e^(2 - t*) = 0.5, t* = 2 + ln(2 u(2))
    (dt,) = torch.autograd.grad(sol.t_events[0][0], [u2])
    np.testing.assert_allclose(dt.numpy(), [math.exp(2.0)], rtol=1e-7)


def test_value_and_grad_of_a_loss_reading_event_times():
    prob = _ball(1.0, _f64(0.8))
    value, grads = dk.value_and_grad(
        lambda s: s.u[-1, 0], prob, "tsit5", events=[_ground()], saveat=[0.9], **TIGHT
    )
    t1 = math.sqrt(2 / G)
    s, v1 = 0.9 - t1, 0.8 * G * t1
    np.testing.assert_allclose(float(value), v1 * s - G * s**2 / 2, rtol=1e-9)
    np.testing.assert_allclose(grads.p["e"].item(), G * t1 * s, rtol=1e-7)
    # t2 = t1 (1 + 2 e): d/de = 2 t1, d/dh0 = (1 + 2 e) / (G t1)
    value, grads = dk.value_and_grad(
        lambda s: s.t_events[0][1], prob, "tsit5", events=[_ground()], **TIGHT
    )
    np.testing.assert_allclose(value.item(), 2.6 * t1, rtol=1e-9)
    np.testing.assert_allclose(grads.p["e"].item(), 2 * t1, rtol=1e-8)
    np.testing.assert_allclose(grads.u0[0].item(), 2.6 / (G * t1), rtol=1e-8)
