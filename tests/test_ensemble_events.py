"""Events on ensembles (API.md sections 8 and 9), on every backend.

A bouncing ball per member: members bounce a different number of times, and a
terminal event ("the ball is above 2.5 and falling") stops only the member
dropped from higher up. Every member must equal its own `dk.solve` with the
same events (saves, event times and states, statuses, counts) and have the
gradients of its own `dk.vjp`; the padded layout is checked, and the first
impact time's gradient against its closed form ``sqrt(2 h0 / g)``. Dask is in
test_ensemble_dask.py, JAX's sharding over two devices in
tests/backends/test_jax_ensemble.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BY_NAME, as_backend, backend_params, need, need_gradients

import diffeqkit as dk

G, E = 9.81, 0.8
H0 = [1.0, 3.0, 0.5]  # member 1 starts above 2.5: its terminal event fires
SAVES = np.linspace(0.0, 1.5, 7)
# Tight tolerances: the members are compared with their own solves, which take
# the same steps (exact on SciPy and torch; vmap rounds differently on JAX).
TOL = {"rtol": 1e-10, "atol": 1e-12}


def ball(u, p, t):  # u = (height, velocity), p = (g, e)
    xp = dk.array_namespace(u)
    return xp.stack([u[1], -p[0] + 0.0 * u[0]])


def bounce(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack([u[0], -p[1] * u[1]])


GROUND = dk.Event(lambda u, p, t: u[0], direction=-1, terminal=False, affect=bounce)
HIGH = dk.Event(lambda u, p, t: u[0] - 2.5, direction=-1, terminal=True)
EVENTS = [GROUND, HIGH]


def ensemble(backend: str, batch_p: bool = True) -> dk.EnsembleProblem:
    u0 = as_backend(backend, [[h, 0.0] for h in H0])
    p = as_backend(backend, [G, E])
    prob = dk.ODEProblem(ball, u0[0], (0.0, 1.5), p)
    ps = as_backend(backend, [[G, E], [G * 1.1, E], [G, 0.9]])
    return dk.EnsembleProblem(prob, u0=u0, p=ps if batch_p else None)


def host(x):
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else x
    return np.asarray(x, dtype=float)


def impacts(h0: float, g: float, e: float, t1: float) -> list[float]:
    """The ball's impact times before `t1` (closed form)."""
    v = np.sqrt(2 * g * h0)
    times = [v / g]
    while True:
        v *= e
        nxt = times[-1] + 2 * v / g
        if nxt > t1:
            return times
        times.append(nxt)


def kwargs(**more):
    return {"saveat": SAVES, "events": EVENTS, "max_events": 8, **TOL, **more}


@pytest.mark.parametrize("backend", backend_params())
def test_members_equal_their_own_solves_with_events(backend):
    need(backend)
    ens = ensemble(backend)
    sol = dk.solve(ens, "tsit5", **kwargs())
    # vmap on JAX takes the same steps with other rounding.
    rtol = 1e-12 if backend == "jax" else 0.0
    assert sol.u.shape == (3, SAVES.size, 2)
    assert sol.status == ("success", "terminated", "success")
    assert sol.success.tolist() == [True, True, True]
    assert len(sol.t_events) == len(sol.u_events) == 2
    counts = [[], []]
    for i in range(3):
        one = dk.solve(ens.member(i), "tsit5", **kwargs())
        assert sol.status[i] == one.status
        np.testing.assert_allclose(host(sol.u[i]), host(one.u), rtol=rtol, atol=1e-14)
        assert sol.stats["nevents"][i] == one.stats["nevents"]
        for k in range(2):
            n = len(one.t_events[k])
            counts[k].append(n)
            t_k, u_k = host(sol.t_events[k][i]), host(sol.u_events[k][i])
            np.testing.assert_allclose(t_k[:n], host(one.t_events[k]), rtol=rtol)
            np.testing.assert_allclose(
                u_k[:n], host(one.u_events[k]), rtol=rtol, atol=1e-14
            )
            # NaN after the member's own events
            assert np.isnan(t_k[n:]).all()
            assert np.isnan(u_k[n:]).all()
    # (B, n_k) and (B, n_k, *u0.shape), n_k the most any member fired
    for k in range(2):
        assert tuple(sol.t_events[k].shape) == (3, max(counts[k]))
        assert tuple(sol.u_events[k].shape) == (3, max(counts[k]), 2)
    assert counts == [[2, 0, 3], [0, 1, 0]]
    # the closed form of the bounces, and the terminated member's NaN saves
    g = [G, G * 1.1, G]
    e = [E, E, 0.9]
    for i in (0, 2):
        exact = impacts(H0[i], g[i], e[i], 1.5)
        np.testing.assert_allclose(host(sol.t_events[0][i])[: len(exact)], exact)
    t_high = np.sqrt(2 * 0.5 / g[1])
    np.testing.assert_allclose(host(sol.t_events[1][1])[0], t_high, rtol=1e-12)
    assert np.isnan(host(sol.u[1])[t_high < SAVES]).all()
    assert np.isfinite(host(sol.u)[[0, 2]]).all()


@pytest.mark.parametrize("backend", backend_params())
def test_one_member_with_too_many_events_fails_alone(backend):
    need(backend)
    ens = ensemble(backend)
    kw = kwargs(max_events=2)  # member 2 bounces three times
    sol = dk.solve(ens, "tsit5", throw=False, **kw)
    assert sol.status == ("success", "terminated", "too_many_events")
    assert sol.success.tolist() == [True, True, False]
    with pytest.raises(dk.SolveError, match=r"too_many_events for members \[2\]"):
        dk.solve(ens, "tsit5", **kw)


# Refused on JAX for an ensemble whose events continue (diffrax's checkpointed
# reverse pass does not batch over members with different segments).
JAX_REFUSED = ("ReverseThroughSolver", "CheckpointedAdjoint")
JAX_SLOW = ("ContinuousAdjoint", "InterpolatingAdjoint")


def _sensealg_params() -> list:
    return [
        pytest.param(
            b,
            name,
            id=f"{b}-{name}",
            # JAX compiles the batched and the member program for each (a
            # minute or more): only its default, ForwardMode, and the refusals
            # in the per-backend session.
            marks=[getattr(pytest.mark, b)]
            + ([pytest.mark.slow] if b == "jax" and name in JAX_SLOW else []),
        )
        for b, spec in dk.backends.SPECS.items()
        for name in spec.capabilities.events
    ]


@pytest.mark.parametrize(("backend", "name"), _sensealg_params())
def test_ensemble_vjp_with_events_equals_member_vjps(backend, name):
    need_gradients(backend)
    ens = ensemble(backend)
    kw = kwargs(sensealg=BY_NAME[name], max_events=4)
    if backend == "jax" and name in JAX_REFUSED:
        with pytest.raises(dk.UnsupportedError, match="whose events continue"):
            dk.vjp(ens, "tsit5", **kw)
        return
    sol, pullback = dk.vjp(ens, "tsit5", **kw)
    cot = np.random.default_rng(0).normal(size=tuple(sol.u.shape))
    # The ensemble ignores the cotangent on rows not reached (after member 1's
    # terminal event); its members' own vjps are given zeros there.
    grads = pullback(as_backend(backend, cot))
    cot[np.isnan(host(sol.u))] = 0.0
    assert tuple(grads.u0.shape) == (3, 2)
    assert tuple(grads.p.shape) == (3, 2)
    for i in range(3):
        _, pull = dk.vjp(ens.member(i), "tsit5", **kw)
        g = pull(as_backend(backend, cot[i]))
        # The member's own computation, batched: equal up to rounding.
        np.testing.assert_allclose(host(grads.u0[i]), host(g.u0), rtol=1e-10)
        np.testing.assert_allclose(host(grads.p[i]), host(g.p), rtol=1e-10)
    assert np.isfinite(host(grads.u0)).all()


@pytest.mark.parametrize(
    "backend",
    # (JAX: two more compilations of a minute each, so in tests_all)
    [
        p
        if p.id != "jax"
        else pytest.param("jax", marks=[pytest.mark.jax, pytest.mark.slow], id="jax")
        for p in backend_params()
    ],
)
def test_shared_p_gets_gradients_summed_and_value_and_grad_agrees(backend):
    need_gradients(backend)
    ens = ensemble(backend, batch_p=False)
    kw = kwargs()
    sol, pullback = dk.vjp(ens, "tsit5", **kw)
    cot = np.where(np.isnan(host(sol.u)), 0.0, 1.0)

    def loss(sol):  # sum of the saved heights and velocities reached
        xp = dk.array_namespace(sol.u)
        return xp.sum(xp.where(xp.isnan(sol.u), 0.0, sol.u))

    value, vg = dk.value_and_grad(loss, ens, "tsit5", **kw)
    grads = pullback(as_backend(backend, cot))
    np.testing.assert_allclose(float(value), np.nansum(host(sol.u)), rtol=1e-12)
    np.testing.assert_allclose(host(vg.p), host(grads.p), rtol=1e-12)
    np.testing.assert_allclose(host(vg.u0), host(grads.u0), rtol=1e-12)
    assert tuple(grads.p.shape) == (2,)
    total = sum(
        host(dk.vjp(ens.member(i), "tsit5", **kw)[1](as_backend(backend, cot[i])).p)
        for i in range(3)
    )
    np.testing.assert_allclose(host(grads.p), total, rtol=1e-10)

    # a loss reading the event times: the pullback of their cotangent
    def reads_events(sol):
        return sol.t_events[0][0, 0] + 2.0 * sol.t_events[1][1, 0]

    value, vg = dk.value_and_grad(reads_events, ens, "tsit5", **kw)
    np.testing.assert_allclose(
        float(value),
        host(sol.t_events[0])[0, 0] + 2.0 * host(sol.t_events[1])[1, 0],
        rtol=1e-12,
    )
    t_cots = [np.zeros(tuple(x.shape)) for x in sol.t_events]
    t_cots[0][0, 0], t_cots[1][1, 0] = 1.0, 2.0
    grads = pullback(t_events=[as_backend(backend, c) for c in t_cots])
    np.testing.assert_allclose(host(vg.p), host(grads.p), rtol=1e-12)
    np.testing.assert_allclose(host(vg.u0), host(grads.u0), rtol=1e-12)
    # member 0's first impact sqrt(2 h0 / g) and member 1's crossing of 2.5,
    # sqrt(2 (h0 - 2.5) / g): d/dg of 1 * the one + 2 * the other
    exact = -0.5 * np.sqrt(2 * H0[0] / G) / G - np.sqrt(2 * (H0[1] - 2.5) / G) / G
    np.testing.assert_allclose(host(grads.p)[0], exact, rtol=1e-8)
    assert host(grads.p)[1] == 0.0  # e plays no part before the first impact


@pytest.mark.torch
def test_torch_event_times_of_members_are_differentiable():
    need("torch")
    import torch

    h0 = torch.tensor(H0, dtype=torch.float64, requires_grad=True)
    u0 = torch.stack([h0, torch.zeros(3, dtype=torch.float64)], dim=1)
    p = torch.tensor([G, E], dtype=torch.float64)
    prob = dk.ODEProblem(ball, u0[0].detach(), (0.0, 1.5), p)
    ens = dk.EnsembleProblem(prob, u0=u0)
    sol = dk.solve(ens, "tsit5", events=[GROUND], **TOL)
    # first impact: t* = sqrt(2 h0 / g), dt*/dh0 = 1 / sqrt(2 g h0)
    sol.t_events[0][:, 0].sum().backward()
    exact = 1.0 / np.sqrt(2 * G * np.array(H0))
    np.testing.assert_allclose(h0.grad.numpy(), exact, rtol=1e-9)


@pytest.mark.torch
def test_torch_refuses_devices_with_events():
    need("torch")
    with pytest.raises(dk.UnsupportedError, match=r"events=\[\.\.\.\] solve the"):
        dk.solve(ensemble("torch"), "tsit5", devices=["cpu"], **kwargs())


@pytest.mark.parametrize("backend", backend_params())
def test_bad_events_on_an_ensemble_are_refused(backend):
    need(backend)
    ens = ensemble(backend)
    with pytest.raises(dk.InvalidProblemError, match=r"events=\[event\]"):
        dk.solve(ens, "tsit5", events=GROUND)
    with pytest.raises(dk.InvalidProblemError, match="max_events must be an int"):
        dk.solve(ens, "tsit5", events=EVENTS, max_events=0)
    with pytest.raises(dk.InvalidProblemError, match=r"events\[1\]"):
        dk.solve(ens, "tsit5", events=[GROUND, "ground"])


# Event cotangents of an ensemble: one or two sensealgs per backend (JAX: its
# default only; its programs compile for a minute).
EVENT_COTANGENTS = {
    "scipy": ("ForwardMode", "InterpolatingAdjoint"),
    "torch": ("ReverseThroughSolver", "ContinuousAdjoint"),
    "jax": ("ForwardMode",),
}


@pytest.mark.parametrize(
    ("backend", "name"),
    [
        pytest.param(b, name, id=f"{b}-{name}", marks=getattr(pytest.mark, b))
        for b, names in EVENT_COTANGENTS.items()
        for name in names
    ],
)
def test_event_cotangents_reach_each_member_as_its_own(backend, name):
    need_gradients(backend)
    ens = ensemble(backend)
    kw = kwargs(sensealg=BY_NAME[name], max_events=4)
    sol, pullback = dk.vjp(ens, "tsit5", **kw)
    rng = np.random.default_rng(1)
    cot = rng.normal(size=tuple(sol.u.shape))
    cot[np.isnan(host(sol.u))] = 0.0
    t_cots = [rng.normal(size=tuple(x.shape)) for x in sol.t_events]
    u_cots = [rng.normal(size=tuple(x.shape)) for x in sol.u_events]
    # Cotangents on the NaN padding are ignored (no member has an output there),
    # whatever they hold, NaN included.
    padded = [np.isnan(host(x)) for x in (*sol.t_events, *sol.u_events)]
    assert any(m.any() for m in padded)  # member 0 bounces twice, member 2 three
    for c, m in zip((*t_cots, *u_cots), padded, strict=True):
        c[m] = np.nan
    grads = pullback(
        as_backend(backend, cot),
        t_events=[as_backend(backend, c) for c in t_cots],
        u_events=[as_backend(backend, c) for c in u_cots],
    )
    assert np.isfinite(host(grads.u0)).all()
    assert np.isfinite(host(grads.p)).all()
    for i in range(3):
        one, pull = dk.vjp(ens.member(i), "tsit5", **kw)
        n = [len(t) for t in one.t_events]
        g = pull(
            as_backend(backend, cot[i]),
            t_events=[
                as_backend(backend, c[i, :k]) for c, k in zip(t_cots, n, strict=True)
            ],
            u_events=[
                as_backend(backend, c[i, :k]) for c, k in zip(u_cots, n, strict=True)
            ],
        )
        np.testing.assert_allclose(host(grads.u0[i]), host(g.u0), rtol=1e-10)
        np.testing.assert_allclose(host(grads.p[i]), host(g.p), rtol=1e-10)
    # the event cotangents do reach the gradients
    assert not np.allclose(host(grads.p), host(pullback(as_backend(backend, cot)).p))


def bounces(h0: float, g: float, e: float, t1: float) -> float:
    """Closed form of the loss below: the impact times before `t1` plus the
    squared velocities just before them (``2 g h0 e^(2j)`` at impact ``j``)."""
    times = impacts(h0, g, e, t1)
    return sum(times) + sum(2 * g * h0 * e ** (2 * j) for j in range(len(times)))


@pytest.mark.parametrize("backend", backend_params())
def test_value_and_grad_of_event_outputs_against_finite_differences(backend):
    need_gradients(backend)
    ens = ensemble(backend)
    kw = kwargs(max_events=4)  # the backends' default sensealgs

    def loss(sol):  # every member's impact times and squared impact velocities
        xp = dk.array_namespace(sol.u)
        t, v = sol.t_events[0], sol.u_events[0][..., 1]
        return xp.sum(xp.where(xp.isnan(t), 0.0, t)) + xp.sum(
            xp.where(xp.isnan(v), 0.0, v**2)
        )

    value, grads = dk.value_and_grad(loss, ens, "tsit5", **kw)
    # member 1 stops at 2.5 (its terminal event) before any impact
    h0, ps = np.array(H0), [[G, E], [G * 1.1, E], [G, 0.9]]
    closed = [bounces(h0[i], *ps[i], 1.5) if i != 1 else 0.0 for i in range(3)]
    np.testing.assert_allclose(float(value), sum(closed), rtol=1e-8)
    d = 1e-5  # central differences of the closed form: 1e-10 off
    for i in (0, 2):
        dh = (bounces(h0[i] + d, *ps[i], 1.5) - bounces(h0[i] - d, *ps[i], 1.5)) / 2 / d
        dg = (
            bounces(h0[i], ps[i][0] + d, ps[i][1], 1.5)
            - bounces(h0[i], ps[i][0] - d, ps[i][1], 1.5)
        ) / (2 * d)
        de = (
            bounces(h0[i], ps[i][0], ps[i][1] + d, 1.5)
            - bounces(h0[i], ps[i][0], ps[i][1] - d, 1.5)
        ) / (2 * d)
        np.testing.assert_allclose(host(grads.u0)[i, 0], dh, rtol=1e-8)
        np.testing.assert_allclose(host(grads.p)[i], [dg, de], rtol=1e-8)
    # member 1 has no impact: the loss does not depend on it
    np.testing.assert_allclose(host(grads.u0)[1], 0.0, atol=1e-12)
    np.testing.assert_allclose(host(grads.p)[1], 0.0, atol=1e-12)
