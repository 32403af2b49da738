"""Events on the SciPy backend: crossings located to tolerance on the step's dense
output, jumps, terminal stops, time events, the Zeno guard and bad input; and
gradients through events against closed forms and finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import need, need_gradients, runs

import diffeqkit as dk

pytestmark = pytest.mark.scipy

G = 9.81
TIGHT = {"rtol": 1e-11, "atol": 1e-12}


@pytest.fixture(autouse=True)
def _scipy():
    need("scipy")


def _fall(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack([u[1], -G + 0.0 * u[1]])


def _ground(e=None, terminal=False):
    def bounce(u, p, t):
        coeff = p["e"] if e is None else e
        return dk.array_namespace(u).stack([u[0], -coeff * u[1]])

    return dk.Event(
        lambda u, p, t: u[0], direction=-1, terminal=terminal, affect=bounce
    )


def _ball(h0=1.0, e=0.8, t1=2.0):
    return dk.ODEProblem(_fall, np.array([h0, 0.0]), (0.0, t1), {"e": np.array(e)})


def _impacts(h0, e, k):
    t = math.sqrt(2 * h0 / G)
    times = [t]
    for j in range(1, k):
        times.append(times[-1] + 2 * e**j * t)
    return np.array(times)


@pytest.mark.parametrize("alg", ["tsit5", "dopri8", "radau"])
def test_ball_impacts_match_the_closed_form(alg):
    sol = dk.solve(_ball(), alg, backend="scipy", events=[_ground()], **TIGHT)
    expected = _impacts(1.0, 0.8, 3)
    assert sol.status == "success"
    np.testing.assert_allclose(sol.t_events[0], expected, rtol=1e-9)
    assert sol.stats["nevents"] == 3
    # u_events: the state before the jump (falling at the impact speed)
    speeds = [math.sqrt(2 * G) * 0.8**j for j in range(3)]
    np.testing.assert_allclose(sol.u_events[0][:, 1], -np.array(speeds), rtol=1e-8)
    np.testing.assert_allclose(sol.u_events[0][:, 0], 0.0, atol=1e-9)


def test_saves_between_bounces_follow_the_bounced_flight():
    t = np.linspace(0.0, 2.0, 41)
    sol = dk.solve(
        _ball(), "tsit5", backend="scipy", events=[_ground()], saveat=t, **TIGHT
    )
    t1, v1 = _impacts(1.0, 0.8, 1)[0], 0.8 * math.sqrt(2 * G)
    after = (t > t1) & (t < _impacts(1.0, 0.8, 2)[1])
    s = t[after] - t1
    np.testing.assert_allclose(sol.u[after, 0], v1 * s - G * s**2 / 2, atol=1e-9)
    before = t <= t1
    np.testing.assert_allclose(
        sol.u[before, 0], 1.0 - G * t[before] ** 2 / 2, atol=1e-9
    )


def test_terminal_event_stops_with_nan_rows_after():
    t = np.linspace(0.0, 1.0, 11)
    sol = dk.solve(
        _ball(),
        "tsit5",
        backend="scipy",
        saveat=t,
        events=[_ground(terminal=True)],
        **TIGHT,
    )
    t1 = _impacts(1.0, 0.8, 1)[0]
    assert sol.status == "terminated"
    assert sol.success
    np.testing.assert_allclose(sol.t_events[0], [t1], rtol=1e-10)
    assert np.isnan(sol.u[t > t1]).all()
    assert np.isfinite(sol.u[t < t1]).all()


def test_exponential_decay_threshold_time():
    k, u0, c = 0.7, 2.0, 0.5
    prob = dk.ODEProblem(
        lambda u, p, t: -p * u, np.array([u0]), (0.0, 5.0), np.array(k)
    )
    ev = dk.Event(lambda u, p, t: u[0] - c, direction=-1)
    sol = dk.solve(prob, "tsit5", backend="scipy", events=[ev], **TIGHT)
    assert sol.status == "terminated"
    np.testing.assert_allclose(sol.t_events[0], [math.log(u0 / c) / k], rtol=1e-9)
    np.testing.assert_allclose(sol.u_events[0], [[c]], rtol=1e-9)


@pytest.mark.parametrize("alg", ["tsit5", "rk4", "bdf"])
def test_time_event_lands_exactly_on_24(alg):
    prob = dk.ODEProblem(lambda u, p, t: -0.1 * u, np.array([1.0]), (0.0, 60.0))
    dose = dk.Event(
        lambda u, p, t: t - 24.0, terminal=False, affect=lambda u, p, t: u + 1.0
    )
    sol = dk.solve(
        prob,
        alg,
        backend="scipy",
        events=[dose],
        dt0=0.7,
        saveat=[0.0, 24.0, 30.0],
        **TIGHT,
    )
    assert abs(sol.t_events[0][0] - 24.0) <= math.ulp(24.0)
    tol = 1e-6 if alg == "rk4" else 1e-9
    # the save time on the event takes the state after the jump
    np.testing.assert_allclose(sol.u[1, 0], math.exp(-2.4) + 1.0, rtol=tol)
    np.testing.assert_allclose(
        sol.u[2, 0], (math.exp(-2.4) + 1.0) * math.exp(-0.6), rtol=tol
    )
    np.testing.assert_allclose(sol.u_events[0][0, 0], math.exp(-2.4), rtol=tol)


def test_two_events_in_one_step_fire_in_time_order():
    # One linear step crosses both thresholds; the later-listed event comes first.
    prob = dk.ODEProblem(lambda u, p, t: np.array([1.0]), np.array([0.0]), (0, 1.0))
    late = dk.Event(lambda u, p, t: u[0] - 0.6, terminal=False)
    early = dk.Event(
        lambda u, p, t: u[0] - 0.3, terminal=False, affect=lambda u, p, t: u + 0.05
    )
    sol = dk.solve(
        prob, "rk4", backend="scipy", dt0=1.0, saveat=[1.0], events=[late, early]
    )
    np.testing.assert_allclose(sol.t_events[1], [0.3], rtol=1e-12)
    # after the jump u = t + 0.05: u crosses 0.6 at 0.55, not at 0.6
    np.testing.assert_allclose(sol.t_events[0], [0.55], rtol=1e-12)
    np.testing.assert_allclose(sol.u[-1], [1.05], rtol=1e-12)
    assert sol.stats["nevents"] == 2


def test_condition_zero_at_t0_does_not_fire_there():
    prob = dk.ODEProblem(
        lambda u, p, t: np.array([math.cos(t)]), np.array([0.0]), (0.0, 4.0)
    )
    ev = dk.Event(lambda u, p, t: u[0], terminal=False)
    sol = dk.solve(prob, "tsit5", backend="scipy", events=[ev], **TIGHT)
    # u = sin t: zero at t0 (no event), then at pi
    np.testing.assert_allclose(sol.t_events[0], [math.pi], rtol=1e-9)


def test_direction_filters_crossings():
    prob = dk.ODEProblem(
        lambda u, p, t: np.array([math.cos(t)]), np.array([0.5]), (0.0, 7.0)
    )
    up = dk.Event(lambda u, p, t: u[0], direction=1, terminal=False)
    down = dk.Event(lambda u, p, t: u[0], direction=-1, terminal=False)
    sol = dk.solve(prob, "tsit5", backend="scipy", events=[up, down], **TIGHT)
    # u = 0.5 + sin t crosses 0 falling at pi + pi/6, rising at 2 pi - pi/6
    np.testing.assert_allclose(sol.t_events[1], [7 * math.pi / 6], rtol=1e-9)
    np.testing.assert_allclose(sol.t_events[0], [11 * math.pi / 6], rtol=1e-9)


def test_zeno_ball_stops_with_too_many_events():
    prob = _ball(e=0.5, t1=10.0)
    with pytest.raises(dk.SolveError, match=r"too_many_events|max_events"):
        dk.solve(prob, "tsit5", backend="scipy", events=[_ground()], max_events=20)
    sol = dk.solve(
        prob, "tsit5", backend="scipy", events=[_ground()], max_events=20, throw=False
    )
    assert sol.status == "too_many_events"
    assert not sol.success
    assert len(sol.t_events[0]) == 20
    # With the default max_events the bounces shrink below t's resolution (a
    # Zeno point at 3 t1): the solve ends there, not with a ball through the floor.
    sol = dk.solve(prob, "tsit5", backend="scipy", events=[_ground()], throw=False)
    assert sol.status == "too_many_events"
    np.testing.assert_allclose(
        sol.t_events[0][-1], 3 * _impacts(1.0, 0.5, 1)[0], rtol=1e-6
    )


def test_event_that_never_fires_changes_nothing():
    prob = _ball(t1=0.3)
    t = np.linspace(0.0, 0.3, 7)
    plain = dk.solve(prob, "tsit5", backend="scipy", saveat=t)
    sol = dk.solve(prob, "tsit5", backend="scipy", saveat=t, events=[_ground()])
    np.testing.assert_array_equal(sol.u, plain.u)
    assert sol.t_events[0].shape == (0,)
    assert sol.u_events[0].shape == (0, 2)
    assert plain.t_events is None


def test_bad_condition_and_affect_are_named():
    prob = _ball()
    vector = dk.Event(lambda u, p, t: u)
    with pytest.raises(dk.InvalidProblemError, match=r"events\[0\].condition"):
        dk.solve(prob, "tsit5", backend="scipy", events=[vector])
    short = dk.Event(lambda u, p, t: u[0], affect=lambda u, p, t: u[:1])
    with pytest.raises(dk.InvalidProblemError, match=r"events\[0\].affect"):
        dk.solve(prob, "tsit5", backend="scipy", events=[short])


# -- gradients through events (ForwardMode: sensitivities jump at each event) --


def _decay_dose():
    """u' = -k u; when u falls to c, a dose D is added: after the event
    u(T) = (c + D) / c * u0 * exp(-k T), in closed form."""

    def f(u, p, t):
        return -p["k"] * u

    ev = dk.Event(
        lambda u, p, t: u[0] - p["c"],
        direction=-1,
        terminal=False,
        affect=lambda u, p, t: u + p["D"],
    )
    p = {"k": np.array(0.7), "c": np.array(0.5), "D": np.array(0.3)}
    return dk.ODEProblem(f, np.array([2.0]), (0.0, 2.5), p), ev


def _short(name):
    return name.replace("Adjoint", "").replace("Mode", "").lower()


SENSEALGS = [
    "ForwardMode",
    "ContinuousAdjoint",
    "InterpolatingAdjoint",
    "CheckpointedAdjoint",
]


@pytest.mark.parametrize(
    ("alg", "sensealg"),
    [
        (a, s)
        for a in ("tsit5", "radau")
        for s in SENSEALGS
        if runs("scipy", _short(s), a)
    ],
)
def test_gradient_after_a_dose_matches_the_closed_form(alg, sensealg):
    need_gradients("scipy")
    prob, ev = _decay_dose()
    T = 2.5  # one dose (at 1.98; the next would come at 2.65)
    sol, pullback = dk.vjp(
        prob,
        alg,
        backend="scipy",
        saveat=[T],
        events=[ev],
        sensealg=getattr(dk, sensealg)(),
        **TIGHT,
    )
    k, c, D, u0 = 0.7, 0.5, 0.3, 2.0
    uT = (c + D) / c * u0 * math.exp(-k * T)
    np.testing.assert_allclose(sol.u[0, 0], uT, rtol=1e-9)
    np.testing.assert_allclose(sol.t_events[0], [math.log(u0 / c) / k], rtol=1e-9)
    grads = pullback(np.ones((1, 1)))
    np.testing.assert_allclose(grads.u0, [uT / u0], rtol=1e-7)
    np.testing.assert_allclose(grads.p["k"], -T * uT, rtol=1e-7)
    np.testing.assert_allclose(
        grads.p["c"], -D / c**2 * u0 * math.exp(-k * T), rtol=1e-7
    )
    np.testing.assert_allclose(grads.p["D"], u0 / c * math.exp(-k * T), rtol=1e-7)


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_gradient_of_a_height_after_a_bounce_matches_the_closed_form(sensealg):
    need_gradients("scipy")
    h0, e, T = 1.0, 0.8, 0.9
    sol, pullback = dk.vjp(
        _ball(h0, e),
        "tsit5",
        backend="scipy",
        saveat=[T],
        events=[_ground()],
        sensealg=getattr(dk, sensealg)(),
        **TIGHT,
    )
    t1 = math.sqrt(2 * h0 / G)
    s, v1 = T - t1, e * G * t1
    np.testing.assert_allclose(sol.u[0, 0], v1 * s - G * s**2 / 2, rtol=1e-9)
    cot = np.zeros((1, 2))
    cot[0, 0] = 1.0
    grads = pullback(cot)
    dt1 = 1.0 / (G * t1)
    np.testing.assert_allclose(grads.p["e"], G * t1 * s, rtol=1e-7)
    np.testing.assert_allclose(grads.u0[0], dt1 * (e * G * s - v1 + G * s), rtol=1e-7)
    # a velocity change at the start moves the impact as well
    cot[0] = [0.0, 1.0]  # d v(T) / d [h0, v0, e]
    grads = pullback(cot)
    np.testing.assert_allclose(grads.p["e"], G * t1, rtol=1e-7)


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_gradient_through_two_events_matches_finite_differences(sensealg):
    need_gradients("scipy")
    # A nonlinear system with a state-dependent jump and a time-dependent
    # condition, so that every correction term matters.

    def f(u, p, t):
        xp = dk.array_namespace(u)
        return xp.stack([u[1], -p["w"] * xp.sin(u[0])])

    ev = dk.Event(
        lambda u, p, t: u[0] - 0.1 * t,
        direction=-1,
        terminal=False,
        affect=lambda u, p, t: dk.array_namespace(u).stack(
            [u[0], -p["e"] * u[1] + 0.1 * t]
        ),
    )
    p = {"w": np.array(2.0), "e": np.array(0.7)}
    u0 = np.array([1.0, 0.0])
    ts = np.array([1.0, 2.5, 4.0])
    kw = {
        "backend": "scipy",
        "saveat": ts,
        "events": [ev],
        "rtol": 1e-12,
        "atol": 1e-12,
    }
    prob = dk.ODEProblem(f, u0, (0.0, 4.0), p)
    sol, pullback = dk.vjp(prob, "dopri8", sensealg=getattr(dk, sensealg)(), **kw)
    assert sol.stats["nevents"] >= 2
    cot = np.array([[0.3, -0.2], [1.0, 0.5], [-0.4, 0.8]])
    grads = pullback(cot)

    def loss(u0, p):
        s = dk.solve(dk.ODEProblem(f, u0, (0.0, 4.0), p), "dopri8", **kw)
        return float(np.sum(cot * s.u))

    h = 1e-6
    for i in range(2):
        du = np.eye(2)[i] * h
        fd = (loss(u0 + du, p) - loss(u0 - du, p)) / (2 * h)
        np.testing.assert_allclose(grads.u0[i], fd, rtol=1e-6)
    for name in p:
        up = {**p, name: p[name] + h}
        down = {**p, name: p[name] - h}
        fd = (loss(u0, up) - loss(u0, down)) / (2 * h)
        np.testing.assert_allclose(grads.p[name], fd, rtol=1e-6)


def test_reverse_through_solver_is_refused_naming_what_works():
    with pytest.raises(dk.UnsupportedError, match="ForwardMode"):
        dk.solve(
            _ball(),
            "tsit5",
            backend="scipy",
            events=[_ground()],
            sensealg=dk.ReverseThroughSolver(),
        )


def test_events_backward_in_time_and_their_gradient():
    need_gradients("scipy")
    # u = exp(-t) integrated from t = 2 back to 0 crosses 0.5 at ln 2, where a
    # jump doubles it: u(0) = 2 exp(-2) e^2 ... = 2, d u(0) / d u(2) = 2 e^2.
    prob = dk.ODEProblem(lambda u, p, t: -u, np.array([math.exp(-2.0)]), (2.0, 0.0))
    ev = dk.Event(
        lambda u, p, t: u[0] - 0.5, terminal=False, affect=lambda u, p, t: 2.0 * u
    )
    for sensealg in (dk.ForwardMode(), dk.InterpolatingAdjoint()):
        sol, pullback = dk.vjp(
            prob,
            "tsit5",
            backend="scipy",
            events=[ev],
            saveat=[2.0, 0.0],
            sensealg=sensealg,
            **TIGHT,
        )
        np.testing.assert_allclose(sol.t_events[0], [math.log(2.0)], rtol=1e-9)
        np.testing.assert_allclose(sol.u[-1], [2.0], rtol=1e-9)
        grads = pullback(np.array([[0.0], [1.0]]))
        np.testing.assert_allclose(grads.u0, [2.0 * math.exp(2.0)], rtol=1e-7)
        # dt*/du(2): u(2) e^(2 - t*) = 0.5, t* = 2 + ln(2 u(2))
        grads = pullback(t_events=[np.ones(1)])
        np.testing.assert_allclose(grads.u0, [math.exp(2.0)], rtol=1e-7)


@pytest.mark.parametrize("autodiff", ["jax", "torch"])
def test_event_derivatives_by_either_engine(autodiff):
    pytest.importorskip(autodiff)
    prob, ev = _decay_dose()
    k, c, D, u0, T = 0.7, 0.5, 0.3, 2.0, 2.5
    for sensealg in (
        dk.ForwardMode(autodiff=autodiff),
        dk.InterpolatingAdjoint(autodiff=autodiff),
    ):
        _, pullback = dk.vjp(
            prob,
            "tsit5",
            backend="scipy",
            saveat=[T],
            events=[ev],
            sensealg=sensealg,
            **TIGHT,
        )
        grads = pullback(np.ones((1, 1)))
        np.testing.assert_allclose(
            grads.p["c"], -D / c**2 * u0 * math.exp(-k * T), rtol=1e-7
        )
        np.testing.assert_allclose(grads.p["D"], u0 / c * math.exp(-k * T), rtol=1e-7)


def test_event_derivatives_by_differences_with_the_jac_engine():
    need("scipy")
    # no framework differentiates here (prob.jac gives df/du): the condition and
    # affect are differentiated by central differences. One dose, at ln 4.
    prob = dk.ODEProblem(
        lambda u, p, t: -u, np.array([2.0]), (0.0, 1.7), jac=lambda u, p, t: -np.eye(1)
    )
    ev = dk.Event(
        lambda u, p, t: u[0] - 0.5,
        direction=-1,
        terminal=False,
        affect=lambda u, p, t: u + 0.3,
    )
    _, pullback = dk.vjp(
        prob,
        "tsit5",
        backend="scipy",
        saveat=[1.7],
        events=[ev],
        sensealg=dk.ForwardMode(autodiff="jac"),
        **TIGHT,
    )
    grads = pullback(np.ones((1, 1)))
    np.testing.assert_allclose(grads.u0, [0.8 / 0.5 * math.exp(-1.7)], rtol=1e-7)


def test_value_and_grad_of_a_loss_reading_the_event_time():
    need_gradients("scipy")
    prob, ev = _decay_dose()
    kw = {"backend": "scipy", "saveat": [2.5], "events": [ev]}
    value, grads = dk.value_and_grad(lambda s: s.u[0, 0] ** 2, prob, "tsit5", **kw)
    uT = 0.8 / 0.5 * 2.0 * math.exp(-0.7 * 2.5)
    np.testing.assert_allclose(value, uT**2, rtol=1e-5)
    np.testing.assert_allclose(grads.u0, [2 * uT * uT / 2.0], rtol=1e-5)
    # the dose comes at t* = ln(u0 / c) / k
    k, c, u0 = 0.7, 0.5, 2.0
    t_star = math.log(u0 / c) / k
    for sensealg in (dk.ForwardMode(), dk.CheckpointedAdjoint()):
        value, grads = dk.value_and_grad(
            lambda s: s.t_events[0][0], prob, "tsit5", sensealg=sensealg, **kw, **TIGHT
        )
        np.testing.assert_allclose(value, t_star, rtol=1e-9)
        np.testing.assert_allclose(grads.u0, [1 / (k * u0)], rtol=1e-7)
        np.testing.assert_allclose(grads.p["k"], -t_star / k, rtol=1e-7)
        np.testing.assert_allclose(grads.p["c"], -1 / (k * c), rtol=1e-7)
        np.testing.assert_allclose(grads.p["D"], 0.0, atol=1e-9)


@pytest.mark.parametrize("sensealg", SENSEALGS)
def test_cotangents_of_two_events_go_to_their_own_event(sensealg):
    need_gradients("scipy")
    # u' = -k u; a dose D at t = 0.5 (a time event), then a stop where u falls to
    # c: t* = 0.5 + ln(w / c) / k with w = u0 exp(-k / 2) + D, the state before
    # the dose u0 exp(-k / 2)
    k, c, D, u0 = 0.7, 0.5, 0.3, 2.0
    dose = dk.Event(
        lambda u, p, t: t - 0.5, terminal=False, affect=lambda u, p, t: u + p["D"]
    )
    stop = dk.Event(lambda u, p, t: u[0] - c, direction=-1)
    p = {"k": np.array(k), "D": np.array(D)}
    prob = dk.ODEProblem(lambda u, p, t: -p["k"] * u, np.array([u0]), (0.0, 5.0), p)
    sol, pullback = dk.vjp(
        prob,
        "tsit5",
        backend="scipy",
        events=[dose, stop],
        saveat=[5.0],
        sensealg=getattr(dk, sensealg)(),
        **TIGHT,
    )
    before = u0 * math.exp(-k / 2)
    w = before + D
    t_star = 0.5 + math.log(w / c) / k
    np.testing.assert_allclose(sol.t_events[1], [t_star], rtol=1e-10)
    grads = pullback(t_events=[np.ones(1), np.ones(1)])  # the dose's time is fixed
    dw_du0, dw_dk = before / u0, -before / 2
    np.testing.assert_allclose(grads.u0, [dw_du0 / (k * w)], rtol=1e-8)
    np.testing.assert_allclose(grads.p["D"], 1 / (k * w), rtol=1e-8)
    np.testing.assert_allclose(
        grads.p["k"], dw_dk / (k * w) - math.log(w / c) / k**2, rtol=1e-8
    )
    grads = pullback(u_events=[np.ones((1, 1)), None])
    np.testing.assert_allclose(grads.u0, [dw_du0], rtol=1e-8)
    np.testing.assert_allclose(grads.p["k"], dw_dk, rtol=1e-8)
    np.testing.assert_allclose(grads.p["D"], 0.0, atol=1e-10)
