"""JAX events: located to tolerance, differentiable, under jax.jit and jax.vmap.

Checked against closed forms in float64 at rtol = atol = 1e-12:
- a ball ``h'' = -G`` dropped from h0 bouncing with restitution e: impact times
  ``t1 = sqrt(2 h0 / G)``, ``t_{k+1} = t_k + 2 e^k t1``; heights after a bounce;
  their gradients with respect to h0 and e;
- exponential decay ``u' = -k u`` stopped where ``u = c``: ``t* = ln(u0 / c) / k``,
  ``dt*/du0 = 1 / (k u0)``, ``dt*/dk = -t*/k``, with every sensealg;
- fixed steps (rk4): the ball's impacts and heights, exact for rk4 there, under
  jax.jit (traced once) and differentiated by ForwardMode, ReverseThroughSolver
  and CheckpointedAdjoint (the adjoints are refused there);
- a dose at t = 24 exactly (a time event); a condition zero at t0 that does not
  fire there; a Zeno ball stopping with "too_many_events".

Compiles are few (a program per event list, mode and sensealg); each test reuses
the module's functions and events, so programs are shared through the cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import diffeqkit as dk

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

pytestmark = pytest.mark.jax

G = 9.81
TOL = {"backend": "jax", "rtol": 1e-12, "atol": 1e-12}


def fall(u: Any, p: Any, t: Any) -> Any:
    xp = dk.array_namespace(u)
    return xp.stack([u[1], -G + 0.0 * u[0]])


def _bounce(u: Any, p: Any, t: Any) -> Any:
    xp = dk.array_namespace(u)
    return xp.stack([u[0], -p["e"] * u[1]])


def _height(u: Any, p: Any, t: Any) -> Any:
    return u[0]


GROUND = dk.Event(_height, direction=-1, terminal=False, affect=_bounce)
H0, E = 2.0, 0.8
SAVES = [0.5, 1.0, 1.5, 2.0]


def impacts(h0: float, e: float, n: int) -> np.ndarray:
    t1 = np.sqrt(2 * h0 / G)
    return t1 + np.concatenate([[0.0], np.cumsum([2 * e**k * t1 for k in range(1, n)])])


def height_after_first(h0: float, e: float, s: float) -> float:
    """h(s) for s between the first and second impacts."""
    t1 = np.sqrt(2 * h0 / G)
    return e * G * t1 * (s - t1) - G / 2 * (s - t1) ** 2


def ball(h0: Any, e: Any, t1: float = 2.0) -> dk.ODEProblem:
    return dk.ODEProblem(fall, jnp.stack([h0, 0.0 * h0]), (0.0, t1), {"e": e})


def test_ball_impact_times_and_states_match_closed_forms():
    sol = dk.solve(
        ball(jnp.asarray(H0), E), "tsit5", events=[GROUND], saveat=SAVES, **TOL
    )
    assert sol.status == "success"
    want = impacts(H0, E, 3)
    want = want[want < 2.0]
    assert sol.stats["nevents"] == len(want) == 2
    np.testing.assert_allclose(np.asarray(sol.t_events[0]), want, rtol=0, atol=1e-10)
    # The state before each bounce: on the ground, falling at e^k sqrt(2 G h0).
    u_ev = np.asarray(sol.u_events[0])
    speeds = np.sqrt(2 * G * H0) * E ** np.arange(len(want))
    np.testing.assert_allclose(u_ev[:, 0], 0.0, atol=1e-10)
    np.testing.assert_allclose(u_ev[:, 1], -speeds, rtol=1e-10)
    # Saves after the first bounce follow the new parabola.
    np.testing.assert_allclose(
        float(sol.u[1, 0]), height_after_first(H0, E, 1.0), rtol=1e-10
    )


@pytest.fixture(scope="module")
def ball_jacobian():
    """jit(jacrev) of (second impact time, h(1.0)) in (h0, e), by ForwardMode;
    f's traces counted."""
    traces = {"n": 0}

    def counted(u: Any, p: Any, t: Any) -> Any:
        traces["n"] += 1
        return fall(u, p, t)

    def outputs(h0: Any, e: Any) -> Any:
        prob = dk.ODEProblem(counted, jnp.stack([h0, 0.0 * h0]), (0.0, 2.0), {"e": e})
        sol = dk.solve(
            prob,
            "tsit5",
            events=[GROUND],
            saveat=SAVES,
            sensealg=dk.ForwardMode(),
            max_events=4,
            **TOL,
        )
        return jnp.stack([sol.t_events[0][1], sol.u[1, 0]])

    return jax.jit(jax.jacrev(outputs, argnums=(0, 1))), traces


@pytest.mark.parametrize(("h0", "e"), [(2.0, 0.8), (2.3, 0.7)])
def test_ball_gradients_match_closed_forms_without_retrace(ball_jacobian, h0, e):
    jac, traces = ball_jacobian
    before = traces["n"]
    d_h0, d_e = (np.asarray(x) for x in jac(h0, e))
    if before:
        assert traces["n"] == before, "new values of h0 and e retraced f"
    t1 = np.sqrt(2 * h0 / G)
    a = 1 / np.sqrt(2 * G * h0)  # dt1/dh0
    s = 1.0
    # t2 = t1 (1 + 2e); h(s) = v+ (s - t1) - G/2 (s - t1)^2 with v+ = e G t1.
    want_h0 = [(1 + 2 * e) * a, a * ((e * G + G) * (s - t1) - e * G * t1)]
    want_e = [2 * t1, G * t1 * (s - t1)]
    np.testing.assert_allclose(d_h0, want_h0, rtol=1e-8)
    np.testing.assert_allclose(d_e, want_e, rtol=1e-8)


@pytest.mark.parametrize(
    "sensealg",
    [dk.CheckpointedAdjoint(), dk.ContinuousAdjoint()],
    ids=lambda s: type(s).__name__,
)
def test_ball_gradients_by_reverse_sensealgs(sensealg):
    # Events that continue: the checkpointed loop over segments.
    def outputs(h0: Any, e: Any) -> Any:
        sol = dk.solve(
            ball(h0, e),
            "tsit5",
            events=[GROUND],
            saveat=SAVES,
            sensealg=sensealg,
            max_events=3,
            **TOL,
        )
        return jnp.stack([sol.t_events[0][1], sol.u[1, 0]])

    d_h0, d_e = jax.jit(jax.jacrev(outputs, argnums=(0, 1)))(H0, E)
    t1, a, s = np.sqrt(2 * H0 / G), 1 / np.sqrt(2 * G * H0), 1.0
    want_h0 = [(1 + 2 * E) * a, a * ((E * G + G) * (s - t1) - E * G * t1)]
    np.testing.assert_allclose(np.asarray(d_h0), want_h0, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(d_e), [2 * t1, G * t1 * (s - t1)], rtol=1e-8)


def test_ball_vmapped_over_restitution():
    def impacts_of(e: Any) -> Any:
        sol = dk.solve(
            ball(jnp.asarray(H0), e, t1=1.5),
            "tsit5",
            events=[GROUND],
            saveat=[0.5, 1.5],
            sensealg=dk.ForwardMode(),
            max_events=4,
            **TOL,
        )
        return sol.t_events[0], sol.stats["nevents"]

    times, counts = jax.jit(jax.vmap(impacts_of))(jnp.asarray([0.5, 0.8]))
    times = np.asarray(times)
    # Before t = 1.5, e = 0.5 bounces twice, e = 0.8 once; the rest is NaN padding.
    np.testing.assert_array_equal(np.asarray(counts), [2, 1])
    np.testing.assert_allclose(times[0, :2], impacts(H0, 0.5, 2), rtol=0, atol=1e-10)
    np.testing.assert_allclose(times[1, :1], impacts(H0, 0.8, 1), rtol=0, atol=1e-10)
    assert np.isnan(times[0, 2:]).all()
    assert np.isnan(times[1, 1:]).all()


def _level(u: Any, p: Any, t: Any) -> Any:
    return u[0] - p["c"]


def decay(u: Any, p: Any, t: Any) -> Any:
    return -p["k"] * u


LEVEL = dk.Event(_level, direction=-1)


@pytest.mark.parametrize(
    "sensealg",
    [
        dk.ForwardMode(),
        dk.ReverseThroughSolver(),
        dk.CheckpointedAdjoint(),
        dk.InterpolatingAdjoint(),
        dk.ContinuousAdjoint(),
    ],
    ids=lambda s: type(s).__name__,
)
def test_terminal_event_time_gradient_matches_closed_form(sensealg):
    u0, k, c = 2.0, 0.7, 0.5

    def t_star(u0: Any, k: Any, c: Any) -> Any:
        prob = dk.ODEProblem(decay, jnp.stack([u0]), (0.0, 10.0), {"k": k, "c": c})
        sol = dk.solve(
            prob, "tsit5", events=[LEVEL], saveat=[1.0, 5.0], sensealg=sensealg, **TOL
        )
        return sol.t_events[0][0]

    value = float(jax.jit(t_star)(u0, k, c))
    want = np.log(u0 / c) / k
    np.testing.assert_allclose(value, want, rtol=1e-11)
    grads = jax.jit(jax.grad(t_star, argnums=(0, 1, 2)))(u0, k, c)
    np.testing.assert_allclose(
        np.asarray(grads), [1 / (k * u0), -want / k, -1 / (k * c)], rtol=1e-8
    )


def test_terminal_event_stops_the_solve_rows_after_are_nan():
    prob = dk.ODEProblem(decay, [2.0], (0.0, 10.0), {"k": 0.7, "c": 0.5})
    sol = dk.solve(prob, "tsit5", events=[LEVEL], saveat=[1.0, 5.0], **TOL)
    assert sol.status == "terminated"
    assert sol.success
    assert np.isfinite(float(sol.u[0, 0]))
    assert np.isnan(float(sol.u[1, 0]))
    np.testing.assert_allclose(float(sol.u_events[0][0, 0]), 0.5, rtol=1e-11)


def _day(u: Any, p: Any, t: Any) -> Any:
    return t - 24.0 + 0.0 * u[0]


def _dose(u: Any, p: Any, t: Any) -> Any:
    return u + 1.0


def test_time_event_lands_exactly_on_24():
    dose = dk.Event(_day, direction=1, terminal=False, affect=_dose)
    k = 0.1
    prob = dk.ODEProblem(decay, [1.0], (0.0, 48.0), {"k": k, "c": 0.0})
    sol = dk.solve(prob, "tsit5", events=[dose], saveat=[24.0, 48.0], **TOL)
    assert sol.status == "success"
    assert float(sol.t_events[0][0]) == 24.0
    assert len(sol.t_events[0]) == 1
    before = np.exp(-k * 24.0)
    np.testing.assert_allclose(float(sol.u_events[0][0, 0]), before, rtol=1e-10)
    # A save time equal to the event time holds the state after the jump.
    np.testing.assert_allclose(float(sol.u[0, 0]), before + 1.0, rtol=1e-10)
    np.testing.assert_allclose(
        float(sol.u[1, 0]), (before + 1.0) * np.exp(-k * 24.0), rtol=1e-10
    )


def test_condition_zero_at_t0_does_not_fire():
    # u(0) = c: the condition starts at zero, then only falls.
    both = dk.Event(_level, direction=0)
    prob = dk.ODEProblem(decay, [0.5], (0.0, 1.0), {"k": 0.7, "c": 0.5})
    sol = dk.solve(prob, "tsit5", events=[both], **TOL)
    assert sol.status == "success"
    assert sol.stats["nevents"] == 0
    assert len(sol.t_events[0]) == 0


def test_zeno_ball_stops_with_too_many_events():
    zeno = dict(events=[GROUND], max_events=12, saveat=SAVES, **TOL)
    prob = ball(jnp.asarray(1.0), 0.5, t1=5.0)  # infinitely many bounces by 1.36
    sol = dk.solve(prob, "tsit5", throw=False, **zeno)
    assert sol.status == "too_many_events"
    assert sol.stats["nevents"] == 12
    with pytest.raises(dk.SolveError, match="max_events"):
        dk.solve(prob, "tsit5", **zeno)

    # Under jax.jit with throw=False: the status is a traced code.
    def status(h0: Any) -> Any:
        return dk.solve(ball(h0, 0.5, t1=5.0), "tsit5", throw=False, **zeno).status

    code = int(jax.jit(status)(jnp.asarray(1.0)))
    assert dk.Solution.STATUS_CODES[code] == "too_many_events"

    # With throw=True it raises when the program runs.
    def height(h0: Any) -> Any:
        return dk.solve(ball(h0, 0.5, t1=5.0), "tsit5", **zeno).u

    with pytest.raises(jax.errors.JaxRuntimeError, match="max_events"):
        jax.block_until_ready(jax.jit(height)(jnp.asarray(1.0)))


def test_terminated_status_is_a_traced_code_under_jit():
    def stopped(u0: Any) -> Any:
        prob = dk.ODEProblem(decay, jnp.stack([u0]), (0.0, 10.0), {"k": 0.7, "c": 0.5})
        sol = dk.solve(prob, "tsit5", events=[LEVEL], saveat=[1.0, 5.0], **TOL)
        return sol.status, sol.success

    code, success = jax.jit(stopped)(2.0)
    assert dk.Solution.STATUS_CODES[int(code)] == "terminated"
    assert bool(success)


# Fixed steps: rk4 is exact on the ball's quadratic flight, so the impacts
# (located on the steps' cubic Hermite interpolant, also exact there) and the
# heights after a bounce are the closed forms' to rounding.
FIXED = {"backend": "jax", "dt0": 0.05, "sensealg": dk.ForwardMode()}
FIXED_TRACES: list[int] = []


@jax.jit
def _fixed_ball(h0: Any, e: Any) -> Any:
    FIXED_TRACES.append(1)
    sol = dk.solve(ball(h0, e), "rk4", events=[GROUND], saveat=SAVES, **FIXED)
    return sol.t_events[0], sol.u_events[0], sol.u


@pytest.mark.parametrize("h0", [H0, 1.5])
def test_fixed_step_ball_matches_closed_forms_and_traces_once(h0):
    t_ev, u_ev, u = _fixed_ball(jnp.asarray(h0), jnp.asarray(E))
    assert len(FIXED_TRACES) == 1  # a new h0 (another grid after t*) reuses it
    want = impacts(h0, E, 3)
    want = want[want < 2.0]
    got = np.asarray(t_ev)
    np.testing.assert_allclose(got[: len(want)], want, rtol=1e-13)
    assert np.all(np.isnan(got[len(want) :]))  # padding under jit
    speeds = np.sqrt(2 * G * h0) * E ** np.arange(len(want))
    np.testing.assert_allclose(np.asarray(u_ev)[: len(want), 1], -speeds, rtol=1e-12)
    t1 = np.sqrt(2 * h0 / G)
    after = [s for s in SAVES if t1 < s < want[1]]
    rows = np.asarray(u)[[SAVES.index(s) for s in after], 0]
    np.testing.assert_allclose(
        rows, [height_after_first(h0, E, s) for s in after], rtol=1e-12
    )


@pytest.mark.parametrize(
    "sensealg", ["ForwardMode", "ReverseThroughSolver", "CheckpointedAdjoint"]
)
def test_fixed_step_ball_height_differentiates_as_the_closed_form(sensealg):
    # h(1.0) after the first bounce (h0 = 2: impacts at 0.639 and 1.660).
    opts = {**FIXED, "sensealg": getattr(dk, sensealg)()}

    def height(h0: Any, e: Any) -> Any:
        sol = dk.solve(ball(h0, e), "rk4", events=[GROUND], saveat=SAVES, **opts)
        return sol.u[1, 0]

    value, (dh0, de) = jax.value_and_grad(height, argnums=(0, 1))(
        jnp.asarray(H0), jnp.asarray(E)
    )
    s, t1 = 1.0, np.sqrt(2 * H0 / G)  # dt1/dh0 = 1 / (G t1)
    np.testing.assert_allclose(float(value), height_after_first(H0, E, s), rtol=1e-12)
    np.testing.assert_allclose(float(de), G * t1 * (s - t1), rtol=1e-10)
    want = (E * (s - 2 * t1) + (s - t1)) / t1
    np.testing.assert_allclose(float(dh0), want, rtol=1e-10)


@pytest.mark.parametrize("alg", ["rk4", "euler"])
def test_fixed_step_decay_threshold_time_differentiates(alg):
    # u' = -k u stopped at u = c: t* = ln(u0 / c) / k. By the implicit-function
    # theorem at the step's state u-, dt*/du0 = (u-/u0) / (k u-) = 1 / (k u0)
    # exactly for any linear one-step method; dt*/dk is the closed form's to the
    # method's error (rk4; measured 5e-8 relative at dt0 = 0.05), for euler
    # that of its steps (-2.5008, as torch's ForwardMode and ReverseThroughSolver).
    level = dk.Event(lambda u, p, t: u[0] - 0.3, terminal=True)

    def t_star(u0: Any, k: Any) -> Any:
        prob = dk.ODEProblem(decay_k, jnp.stack([u0]), (0.0, 3.0), k)
        sol = dk.solve(prob, alg, events=[level], saveat=[1.0], **FIXED)
        return sol.t_events[0][0]

    k = 0.7
    value, (du0, dk_) = jax.value_and_grad(t_star, argnums=(0, 1))(1.0, k)
    want = np.log(1 / 0.3) / k
    np.testing.assert_allclose(float(du0), 1 / k, rtol=1e-13)
    if alg == "rk4":
        np.testing.assert_allclose(float(value), want, rtol=1e-6)
        np.testing.assert_allclose(float(dk_), -want / k, rtol=1e-6)
    else:
        # Euler: u- = (1 - k h)^n (1 - k s) after n steps of h and one of s to
        # t*; dt*/dk = -(du-/dk) / (du-/dt) with du-/dt = -k u- (its rate).
        h = FIXED["dt0"]
        n = int(np.floor(float(value) / h))
        s_ = float(value) - n * h
        u_minus = (1 - k * h) ** n * (1 - k * s_)
        du_dk = -n * h * (1 - k * h) ** (n - 1) * (1 - k * s_) - (1 - k * h) ** n * s_
        np.testing.assert_allclose(float(dk_), du_dk / (k * u_minus), rtol=1e-12)


def decay_k(u: Any, p: Any, t: Any) -> Any:
    return -p * u


@pytest.mark.parametrize("sensealg", ["InterpolatingAdjoint", "ContinuousAdjoint"])
def test_fixed_step_events_refuse_the_adjoints(sensealg):
    def height(h0: Any) -> Any:
        sol = dk.solve(
            ball(h0, E),
            "rk4",
            events=[GROUND],
            saveat=SAVES,
            backend="jax",
            dt0=0.05,
            sensealg=getattr(dk, sensealg)(),
        )
        return sol.u[1, 0]

    with pytest.raises(dk.UnsupportedError, match="ReverseThroughSolver"):
        jax.grad(height)(jnp.asarray(H0))


def test_every_step_kept_with_the_default_max_events():
    # ReverseThroughSolver keeps every step of a segment; the checkpointed loop
    # over segments keeps one segment's at a time, so max_events=1000 (a
    # thousand segments' worth up front in a scan) works: h(1.0) after the
    # first bounce, differentiated in h0 and e.
    def height(h0: Any, e: Any) -> Any:
        sol = dk.solve(
            ball(h0, e),
            "tsit5",
            events=[GROUND],
            saveat=SAVES,
            sensealg=dk.ReverseThroughSolver(),
            **TOL,
        )
        return sol.u[1, 0]

    d_h0, d_e = jax.jit(jax.grad(height, argnums=(0, 1)))(H0, E)
    t1, a, s = np.sqrt(2 * H0 / G), 1 / np.sqrt(2 * G * H0), 1.0
    want_h0 = a * ((E * G + G) * (s - t1) - E * G * t1)
    np.testing.assert_allclose(float(d_h0), want_h0, rtol=1e-8)
    np.testing.assert_allclose(float(d_e), G * t1 * (s - t1), rtol=1e-8)


def test_condition_not_a_scalar_and_affect_of_wrong_shape_are_refused():
    prob = dk.ODEProblem(decay, [1.0, 2.0], (0.0, 1.0), {"k": 1.0, "c": 0.0})
    bad = dk.Event(lambda u, p, t: u)
    with pytest.raises(dk.InvalidProblemError, match=r"events\[0\].*scalar"):
        dk.solve(prob, "tsit5", backend="jax", events=[bad])
    jump = dk.Event(_level, terminal=False, affect=lambda u, p, t: u[:1])
    with pytest.raises(dk.InvalidProblemError, match=r"events\[0\]\.affect"):
        dk.solve(prob, "tsit5", backend="jax", events=[jump])


def _clock(u: Any, p: Any, t: Any) -> Any:
    return 0.0 * u + 1.0


def test_two_crossings_in_one_step_fire_in_time_order():
    # u = t, rtol loose: steps of about 1 hold both crossings; the one listed
    # second crosses first.
    late = dk.Event(lambda u, p, t: u[0] - 0.7, terminal=False)
    early = dk.Event(lambda u, p, t: u[0] - 0.6, terminal=False)
    prob = dk.ODEProblem(_clock, jnp.asarray([0.0]), (0.0, 10.0))
    loose = {"backend": "jax", "rtol": 1e-6, "atol": 1e-6}
    sol = dk.solve(prob, "tsit5", events=[late, early], **loose)
    np.testing.assert_allclose(np.asarray(sol.t_events[0]), [0.7], rtol=1e-14)
    np.testing.assert_allclose(np.asarray(sol.t_events[1]), [0.6], rtol=1e-14)
    # Terminal: the earlier one stops the solve, also for a reverse sensealg.
    stop = [dk.Event(late.condition), dk.Event(early.condition)]

    def stop_time(u0: Any) -> Any:
        p = dk.ODEProblem(_clock, jnp.stack([u0]), (0.0, 10.0))
        out = dk.solve(
            p, "tsit5", events=stop, sensealg=dk.CheckpointedAdjoint(), **loose
        )
        return out.t_events[1][0]

    value, grad = jax.jit(jax.value_and_grad(stop_time))(0.0)
    np.testing.assert_allclose([float(value), float(grad)], [0.6, -1.0], rtol=1e-12)


def test_dk_vjp_and_value_and_grad_follow_the_event():
    # h(1.0) lies between the first (0.639 s) and second impacts: d/dh0 and d/de
    # of it by central differences of the closed form.
    prob = ball(jnp.asarray(H0), jnp.asarray(E))
    kw = dict(events=[GROUND], saveat=SAVES, sensealg=dk.CheckpointedAdjoint(), **TOL)
    sol, pullback = dk.vjp(prob, "tsit5", **kw)
    assert sol.t_events[0].shape == (2,)
    cot = np.zeros((len(SAVES), 2))
    cot[1, 0] = 1.0
    grads = pullback(cot)
    h = 1e-6
    d_h0 = (height_after_first(H0 + h, E, 1.0) - height_after_first(H0 - h, E, 1.0)) / (
        2 * h
    )
    d_e = (height_after_first(H0, E + h, 1.0) - height_after_first(H0, E - h, 1.0)) / (
        2 * h
    )
    assert float(grads.u0[0]) == pytest.approx(d_h0, rel=1e-7)
    assert float(grads.p["e"]) == pytest.approx(d_e, rel=1e-7)
    value, g = dk.value_and_grad(lambda s: s.u[1, 0], prob, "tsit5", **kw)
    assert float(value) == pytest.approx(height_after_first(H0, E, 1.0), rel=1e-10)
    assert float(g.p["e"]) == pytest.approx(d_e, rel=1e-7)
    # the first impact, t1 = sqrt(2 h0 / G), and the velocity there, -sqrt(2 G h0)
    value, g = dk.value_and_grad(
        lambda s: s.t_events[0][0] - s.u_events[0][0, 1], prob, "tsit5", **kw
    )
    t1 = np.sqrt(2 * H0 / G)
    assert float(value) == pytest.approx(t1 + G * t1, rel=1e-10)
    assert float(g.u0[0]) == pytest.approx(1 / (G * t1) + 1 / t1, rel=1e-8)
    assert float(g.p["e"]) == pytest.approx(0.0, abs=1e-10)
