"""Events behave the same on every backend: where they fire, what a save time
on an event holds, and what a terminal event leaves; and the gradients of the
event times and states through `dk.vjp` and `dk.value_and_grad` with every
sensealg a backend offers for events (float64, closed forms and finite
differences)."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
from conftest import backend_params, need, need_gradients

import diffeqkit as dk
from diffeqkit import backends

K = 0.7


def decay(u, p, t):
    return -p * u


def doubled(u, p, t):
    return 2.0 * u


def _arrays(backend: str):
    need(backend)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray
    if backend == "torch":
        import torch

        return lambda x: torch.tensor(x, dtype=torch.float64)
    return np.asarray


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("terminal", [False, True])
def test_a_save_time_on_an_event_holds_the_state_after_its_jump(backend, terminal):
    arr = _arrays(backend)
    prob = dk.ODEProblem(decay, arr([1.0]), (0.0, 1.0), arr(K))
    event = dk.Event(lambda u, p, t: t - 0.5, terminal=terminal, affect=doubled)
    sol = dk.solve(
        prob,
        "tsit5",
        events=[event],
        saveat=[0.0, 0.25, 0.5, 1.0],
        rtol=1e-12,
        atol=1e-12,
    )
    u = np.asarray(sol.u.tolist(), dtype=float)[:, 0]
    assert sol.status == ("terminated" if terminal else "success")
    np.testing.assert_allclose(float(sol.t_events[0][0]), 0.5, rtol=0, atol=1e-15)
    np.testing.assert_allclose(u[:2], np.exp(-K * np.array([0.0, 0.25])), rtol=1e-10)
    np.testing.assert_allclose(u[2], 2 * np.exp(-K * 0.5), rtol=1e-10)
    np.testing.assert_allclose(
        float(np.asarray(sol.u_events[0].tolist()).ravel()[0]),
        np.exp(-K * 0.5),
        rtol=1e-10,
    )
    if terminal:
        assert np.isnan(u[3])
    else:
        np.testing.assert_allclose(u[3], 2 * np.exp(-K), rtol=1e-10)


# -- gradients of the event outputs: t_events and u_events ---------------------
#
# A ball dropped from h0 with velocity v0 (u = (h, v), p = {"e": e}) bounces with
# restitution e. At v0 = 0: t1 = sqrt(2 h0 / G), t2 = t1 (1 + 2 e), velocity
# before the first impact -sqrt(2 G h0) = -G t1, before the second -e G t1.
# Their derivatives with respect to (h0, v0, e), in closed form:
#   dt1 = (1 / (G t1), 1 / G, 0)       dt2 = ((1 + 2 e) / (G t1), 1 / G, 2 t1)
#   dv1 = (-1 / t1, 0, 0)              dv2 = (-e / t1, 0, -G t1)
# and the heights there are 0 whatever (h0, v0, e): zero derivatives.

G = 9.81
H0, E = 1.0, 0.8
TIGHT = {"rtol": 1e-12, "atol": 1e-12}
# JAX: each sensealg is a compile of several seconds (tens on a busy machine);
# the jax session runs a forward and a reverse one on the ball, tests_all the rest
JAX_SLOW = ("ReverseThroughSolver", "InterpolatingAdjoint", "ContinuousAdjoint")
JAX_ALL = ("ForwardMode", *JAX_SLOW, "CheckpointedAdjoint")


def event_sensealg_params(jax_slow: tuple[str, ...] = JAX_SLOW) -> list:
    """(backend, sensealg class name) for every sensealg that a backend offers
    with events; those on JAX in `jax_slow` are marked slow."""
    return [
        pytest.param(
            b,
            name,
            id=f"{b}-{name}",
            marks=[getattr(pytest.mark, b)]
            + ([pytest.mark.slow] if b == "jax" and name in jax_slow else []),
        )
        for b, spec in backends.SPECS.items()
        for name in spec.capabilities.events
    ]


def fall(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack([u[1], -G + 0.0 * u[1]])


def bounce(u, p, t):
    return dk.array_namespace(u).stack([u[0], -p["e"] * u[1]])


def height(u, p, t):
    return u[0]


GROUND = dk.Event(height, direction=-1, terminal=False, affect=bounce)


def ball(backend: str, h0: float = H0, e: float = E, v0: float = 0.0):
    arr = _arrays(backend)
    return dk.ODEProblem(fall, arr([h0, v0]), (0.0, 2.0), {"e": arr(e)})


# three impacts on [0, 2] (0.45, 1.17, 1.75 s); a small max_events keeps JAX's
# reverse methods cheap (a scan over max_events + 1 segments)
BALL = {"saveat": [0.9, 2.0], "events": [GROUND], "max_events": 4, **TIGHT}


@functools.cache
def ball_vjp(backend: str, sensealg: str):
    sol, pullback = dk.vjp(
        ball(backend), "tsit5", sensealg=getattr(dk, sensealg)(), **BALL
    )
    return sol, pullback


def _grads(grads) -> np.ndarray:
    """(d/dh0, d/dv0, d/de) as floats."""
    u0 = np.asarray(grads.u0.tolist(), dtype=float)
    return np.array([u0[0], u0[1], float(grads.p["e"])])


@pytest.mark.parametrize(("backend", "sensealg"), event_sensealg_params())
def test_ball_event_times_and_states_differentiate_as_the_closed_form(
    backend, sensealg
):
    need_gradients(backend)
    sol, pullback = ball_vjp(backend, sensealg)
    t1 = np.sqrt(2 * H0 / G)
    times = np.asarray(sol.t_events[0].tolist(), dtype=float)
    states = np.asarray(sol.u_events[0].tolist(), dtype=float)
    np.testing.assert_allclose(
        times, [t1, t1 * (1 + 2 * E), t1 * (1 + 2 * E + 2 * E**2)], rtol=1e-11
    )
    np.testing.assert_allclose(states[:2, 1], [-G * t1, -E * G * t1], rtol=1e-10)
    dt1 = np.array([1 / (G * t1), 1 / G, 0.0])
    dt2 = np.array([(1 + 2 * E) / (G * t1), 1 / G, 2 * t1])
    dv1 = np.array([-1 / t1, 0.0, 0.0])
    dv2 = np.array([-E / t1, 0.0, -G * t1])

    def t_cot(k):
        cot = np.zeros(3)
        cot[k] = 1.0
        return [cot]

    def u_cot(k, j):
        cot = np.zeros((3, 2))
        cot[k, j] = 1.0
        return [cot]

    tol = {"rtol": 1e-8, "atol": 1e-9}
    np.testing.assert_allclose(_grads(pullback(t_events=t_cot(0))), dt1, **tol)
    np.testing.assert_allclose(_grads(pullback(t_events=t_cot(1))), dt2, **tol)
    np.testing.assert_allclose(_grads(pullback(u_events=u_cot(0, 1))), dv1, **tol)
    np.testing.assert_allclose(_grads(pullback(u_events=u_cot(1, 1))), dv2, **tol)
    # the height at an impact is 0 however the impact moves: the state before
    # the jump gains f dt*/dθ, which cancels the flow's own derivative
    np.testing.assert_allclose(
        _grads(pullback(u_events=u_cot(1, 0))), np.zeros(3), atol=1e-9
    )
    # every cotangent at once (sol.u's too) adds up: h(0.9) after the first
    # bounce, s = 0.9 - t1: dh/de = G t1 s, dh/dh0 = (e G s - v1 + G s) / (G t1)
    s, v1 = 0.9 - t1, E * G * t1
    dh = np.array([(E * G * s - v1 + G * s) / (G * t1), (G * s - v1) / G, G * t1 * s])
    cot = np.zeros((2, 2))
    cot[0, 0] = 1.0
    both = pullback(
        cot,
        t_events=[np.array([0.0, 2.0, 0.0])],
        u_events=[np.array([[0.0, -3.0], [0.0, 0.0], [0.0, 0.0]])],
    )
    np.testing.assert_allclose(_grads(both), dh + 2 * dt2 - 3 * dv1, **tol)


# u' = -k u stops where u falls to c: t* = ln(u0 / c) / k, so dt*/du0 = 1 / (k u0),
# dt*/dk = -t*/k, dt*/dc = -1 / (k c); the state there is c whatever the inputs.


def decay_kc(u, p, t):
    return -p["k"] * u


def level(u, p, t):
    return u[0] - p["c"]


LEVEL = dk.Event(level, direction=-1)


# (JAX's own tests check dt*/d(u0, k, c) by jax.grad with every sensealg)
@pytest.mark.parametrize(("backend", "sensealg"), event_sensealg_params(JAX_ALL))
def test_decay_threshold_time_differentiates_as_the_closed_form(backend, sensealg):
    need_gradients(backend)
    arr = _arrays(backend)
    u0, k, c = 2.0, 0.7, 0.5
    prob = dk.ODEProblem(decay_kc, arr([u0]), (0.0, 5.0), {"k": arr(k), "c": arr(c)})
    sol, pullback = dk.vjp(
        prob,
        "tsit5",
        events=[LEVEL],
        saveat=[1.0, 5.0],
        sensealg=getattr(dk, sensealg)(),
        **TIGHT,
    )
    t_star = np.log(u0 / c) / k
    assert sol.status == "terminated"
    np.testing.assert_allclose(float(sol.t_events[0][0]), t_star, rtol=1e-11)

    def flat(grads):
        return [float(grads.u0[0]), float(grads.p["k"]), float(grads.p["c"])]

    grads = pullback(t_events=[np.ones(1)])
    want = [1 / (k * u0), -t_star / k, -1 / (k * c)]
    np.testing.assert_allclose(flat(grads), want, rtol=1e-8)
    grads = pullback(u_events=[np.ones((1, 1))])
    np.testing.assert_allclose(flat(grads), [0.0, 0.0, 1.0], rtol=1e-8, atol=1e-9)
    # u(1) = u0 exp(-k) and the event together; the NaN row after the stop
    # has a zero cotangent
    cot = np.zeros((2, 1))
    cot[0, 0] = 1.0
    grads = pullback(cot, t_events=[np.full(1, 2.0)])
    u1 = u0 * np.exp(-k)
    np.testing.assert_allclose(
        flat(grads), [u1 / u0 + 2 * want[0], -u1 + 2 * want[1], 2 * want[2]], rtol=1e-8
    )


def mixed_loss(sol):
    """A loss reading sol.u and both event outputs (Array API)."""
    xp = dk.array_namespace(sol.u)
    return (
        xp.sum(sol.u[:, 0] ** 2)
        + sol.t_events[0][1] ** 2
        + sol.u_events[0][0, 1] * sol.t_events[0][0]
        + 0.5 * xp.sum(sol.u_events[0][1:, 1])
    )


@functools.cache
def mixed_loss_differences() -> np.ndarray:
    """d mixed_loss / d(h0, v0, e) by fourth-order central differences of
    SciPy's solve (d/de is small, a cancellation: a second-order difference
    would be off by 4e-7 relative at h = 1e-5)."""
    h = 1e-4

    def value(x):
        sol = dk.solve(
            ball("scipy", x[0], x[2], x[1]), "tsit5", backend="scipy", **BALL
        )
        return float(mixed_loss(sol))

    x = np.array([H0, 0.0, E])
    return np.array(
        [
            (8 * (value(x + d) - value(x - d)) - (value(x + 2 * d) - value(x - 2 * d)))
            / (12 * h)
            for d in np.eye(3) * h
        ]
    )


@pytest.mark.parametrize(
    ("backend", "sensealg"),
    [
        pytest.param("scipy", dk.ForwardMode(autodiff="jax"), marks=pytest.mark.scipy),
        pytest.param(
            "scipy", dk.CheckpointedAdjoint(autodiff="torch"), marks=pytest.mark.scipy
        ),
        pytest.param("torch", dk.ReverseThroughSolver(), marks=pytest.mark.torch),
        pytest.param("torch", dk.InterpolatingAdjoint(), marks=pytest.mark.torch),
        pytest.param("jax", dk.ForwardMode(), marks=pytest.mark.jax),
    ],
    ids=lambda x: x if isinstance(x, str) else type(x).__name__,
)
def test_value_and_grad_of_a_loss_mixing_u_and_events_matches_differences(
    backend, sensealg
):
    need_gradients(backend)
    if backend == "scipy":
        pytest.importorskip(sensealg.autodiff)
    value, grads = dk.value_and_grad(
        mixed_loss, ball(backend), "tsit5", sensealg=sensealg, **BALL
    )
    sol = dk.solve(ball("scipy"), "tsit5", backend="scipy", **BALL)
    np.testing.assert_allclose(float(value), float(mixed_loss(sol)), rtol=1e-10)
    np.testing.assert_allclose(_grads(grads), mixed_loss_differences(), rtol=1e-6)


@pytest.mark.scipy
def test_bad_event_cotangents_are_refused_naming_the_argument():
    need_gradients("scipy")
    sol, pullback = dk.vjp(ball("scipy"), "tsit5", backend="scipy", **BALL)
    n = len(sol.t_events[0])
    cot = np.zeros(sol.u.shape)
    with pytest.raises(dk.InvalidProblemError, match=r"t_events\[0\] must have"):
        pullback(cot, t_events=[np.zeros(n + 1)])
    with pytest.raises(dk.InvalidProblemError, match=r"u_events\[0\] must have"):
        pullback(u_events=[np.zeros((n, 3))])
    with pytest.raises(dk.InvalidProblemError, match="one entry per event"):
        pullback(t_events=[np.zeros(n), np.zeros(n)])
    with pytest.raises(dk.InvalidProblemError, match="one entry per event"):
        pullback(t_events=np.zeros(n))
    with pytest.raises(dk.InvalidProblemError, match="cotangent must have"):
        pullback(np.zeros(3), t_events=[np.zeros(n)])
    # None entries are zeros; nothing at all is a zero gradient
    grads = pullback(t_events=[None], u_events=None)
    np.testing.assert_array_equal(_grads(grads), np.zeros(3))
    plain, pull = dk.vjp(ball("scipy"), "tsit5", backend="scipy", saveat=[0.2], **TIGHT)
    assert plain.t_events is None
    with pytest.raises(dk.InvalidProblemError, match="events="):
        pull(np.zeros(plain.u.shape), t_events=[np.zeros(1)])


def _at_ln2(u, p, t):
    return t - 0.6931471805599453


def _half(u, p, t):
    return u[0] - 0.5


@pytest.mark.parametrize("backend", backend_params())
def test_two_events_crossing_within_the_solve_error_both_fire_once(backend):
    # u = exp(-t): t = ln 2 and u = 0.5 cross at the same time, but the
    # computed u crosses 0.5 a few 1e-11 after it. Each fires once, in that
    # order (on JAX the second used to be located at NaN and chatter).
    arr = _arrays(backend)
    prob = dk.ODEProblem(lambda u, p, t: -u, arr([1.0]), (0.0, 1.0))
    events = [dk.Event(_at_ln2, terminal=False), dk.Event(_half, terminal=False)]
    sol = dk.solve(prob, "tsit5", events=events, rtol=1e-10, atol=1e-10)
    assert sol.status == "success"
    times = [np.asarray(t.tolist(), dtype=float) for t in sol.t_events]
    assert [len(t) for t in times] == [1, 1]
    np.testing.assert_allclose(times[0], [np.log(2.0)], rtol=1e-15)
    np.testing.assert_allclose(times[1], [np.log(2.0)], rtol=1e-9)
    assert times[1][0] >= times[0][0]


# Events on a fixed grid: the grid is t0 + k*dt0 merged with the save times and
# restarts at each event time; a crossing is located on the step's cubic Hermite
# interpolant and the state at it is a step of the alg to it. A NumPy reference of
# that convention (brentq to rounding on the interpolant) checks every backend.
FIXED_G = 9.81


def _fixed_step(alg, f, t, h, y):
    if alg == "euler":
        return h * f(y)
    k1 = f(y)
    k2 = f(y + h / 2 * k1)
    k3 = f(y + h / 2 * k2)
    k4 = f(y + h * k3)
    return h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _fixed_reference(alg, f, cond, direction, affect, terminal, u0, tspan, dt0, saves):
    """(rows at `saves`, event times, states before the events) of the convention."""
    from scipy.optimize import brentq

    from diffeqkit._saveat import step_grid

    t_s, y, t1 = tspan[0], np.asarray(u0, float), tspan[1]
    rows = {}
    t_ev, u_ev = [], []
    while True:
        sign = 1.0 if t1 > t_s else -1.0
        later = [s for s in saves if sign * (s - t_s) > 0]
        grid = step_grid(t_s, t1, dt0, np.array([t_s, *later, t1]))
        fired = None
        for a, b in itertools.pairwise(grid):
            y_b = y + _fixed_step(alg, f, a, b - a, y)
            before, after = cond(y), cond(y_b)
            if before * after < 0 and (direction == 0 or np.sign(after) == direction):
                f_a, f_b, h = f(y), f(y_b), b - a

                def hermite(t, y=y, y_b=y_b, f_a=f_a, f_b=f_b, a=a, h=h):
                    x = (t - a) / h
                    return (
                        (2 * x**3 - 3 * x**2 + 1) * y
                        + (x**3 - 2 * x**2 + x) * h * f_a
                        + (-2 * x**3 + 3 * x**2) * y_b
                        + (x**3 - x**2) * h * f_b
                    )

                t_star = brentq(lambda t: cond(hermite(t)), a, b, xtol=1e-16)
                fired = (t_star, y + _fixed_step(alg, f, a, t_star - a, y))
                break
            if b in saves:
                rows[b] = y_b
            y = y_b
        if fired is None:
            break
        t_star, u = fired
        t_ev.append(t_star)
        u_ev.append(u)
        if terminal:
            break
        t_s, y = t_star, affect(u)
    return rows, np.array(t_ev), np.array(u_ev)


def _fixed_fall(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack([u[1], -FIXED_G + 0.0 * u[0]])


def _fixed_bounce(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack([u[0], -0.8 * u[1]])


def _fixed_height(u, p, t):
    return u[0]


def _fixed_minus(u, p, t):
    return -u


def _fixed_half(u, p, t):
    return u[0] - 0.5


def _fixed_level(u, p, t):
    return u[0] - 0.3


FIXED_CASES = {
    # name: (f, u0, p, tspan, event, NumPy f, condition, direction, affect)
    "ball": (
        _fixed_fall,
        [1.0, 0.0],
        None,
        (0.0, 2.0),
        dk.Event(_fixed_height, direction=-1, terminal=False, affect=_fixed_bounce),
        lambda y: np.array([y[1], -FIXED_G]),
        lambda y: y[0],
        -1,
        lambda y: np.array([y[0], -0.8 * y[1]]),
    ),
    "backward": (  # u = exp(-t) from t = 2 back to 0, doubling at u = 0.5
        _fixed_minus,
        [np.exp(-2.0)],
        None,
        (2.0, 0.0),
        dk.Event(_fixed_half, terminal=False, affect=doubled),
        lambda y: -y,
        lambda y: y[0] - 0.5,
        0,
        lambda y: 2.0 * y,
    ),
    "decay": (
        decay,
        [1.0],
        K,
        (0.0, 3.0),
        dk.Event(_fixed_level, terminal=True),
        lambda y: -K * y,
        lambda y: y[0] - 0.3,
        0,
        None,
    ),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("alg", ["rk4", "euler"])
@pytest.mark.parametrize("case", sorted(FIXED_CASES))
def test_fixed_step_events_follow_the_grid_convention(backend, alg, case):
    # SciPy differs from this convention in two ways (torch and JAX follow it):
    # it locates euler's crossings on the linear interpolant, and its state at an
    # event is the interpolant's value there, not a step of the alg to it (rk4:
    # 1e-9 apart at dt0 = 0.05, exact on the ball's quadratic flight).
    if backend == "scipy" and alg == "euler":
        pytest.skip("SciPy locates euler's events on its linear interpolant")
    arr = _arrays(backend)
    f, u0, p, tspan, event, f_np, cond, direction, affect = FIXED_CASES[case]
    saves = {
        "ball": [0.33, 0.9, 1.5, 2.0],
        "decay": [0.33, 0.9, 1.5],
        "backward": [1.5, 0.5, 0.0],
    }[case]
    prob = dk.ODEProblem(f, arr(u0), tspan, None if p is None else arr(p))
    sol = dk.solve(prob, alg, dt0=0.05, events=[event], saveat=saves)
    rows, t_ev, u_ev = _fixed_reference(
        alg, f_np, cond, direction, affect, event.terminal, u0, tspan, 0.05, saves
    )
    got_t = np.asarray(sol.t_events[0].tolist(), dtype=float)
    assert len(got_t) == len(t_ev) > 0
    u = np.asarray(sol.u.tolist(), dtype=float)
    sign = np.sign(tspan[1] - tspan[0])
    # SciPy's state at an event (so all after it) is the interpolant's: it
    # agrees up to the first event only.
    exact = backend != "scipy"
    np.testing.assert_allclose(
        got_t[: None if exact else 1], t_ev[: None if exact else 1], rtol=1e-13
    )
    if exact:
        got_u = np.asarray(sol.u_events[0].tolist(), dtype=float)
        np.testing.assert_allclose(got_u, u_ev, rtol=1e-12, atol=1e-13)
    for i, s in enumerate(saves):
        if not exact and sign * (s - t_ev[0]) > 0:
            continue
        if s in rows:
            np.testing.assert_allclose(u[i], rows[s], rtol=1e-12, atol=1e-13)
        else:  # after a terminal event
            assert np.all(np.isnan(u[i]))
