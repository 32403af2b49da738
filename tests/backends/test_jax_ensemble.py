"""Ensembles on JAX: ``vmap`` of the compiled solve (API.md section 8).

Each member must take its own steps (equal to its own `dk.solve`, step counts
included), fail alone, compile once per batch size, and have gradients equal to
its own `dk.vjp` with every sensealg, by `dk.vjp` on the ensemble and by
``jax.grad`` through `dk.solve`. Sharding over two host devices runs in a
subprocess (the device count is fixed when JAX starts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import BY_NAME, need

import diffeqkit as dk

pytestmark = pytest.mark.jax

SAVES = np.linspace(0.0, 2.0, 5)
TOL = {"rtol": 1e-8, "atol": 1e-10}
DISCRETE_NAMES = ("ForwardMode", "ReverseThroughSolver")


def lv(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack([p[0] * u[0] - p[1] * u[0] * u[1], p[2] * u[0] * u[1] - u[1]])


def lv_problem():
    return dk.ODEProblem(
        lv, np.array([1.0, 1.0]), (0.0, 2.0), np.array([1.5, 1.0, 1.0])
    )


def batch(size, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(0.5, 1.5, (size, 2)),
        rng.uniform([1.0, 0.5, 0.5], [2.0, 1.5, 1.5], (size, 3)),
    )


def blowup(u, p, t):  # u = 1 / (1 - p t): a singularity at t = 1/p
    return p * u**2


def test_members_take_their_own_steps_and_equal_their_own_solves():
    need("jax")
    u0, p = batch(5)
    ens = dk.EnsembleProblem(lv_problem(), u0=u0, p=p)
    sol = dk.solve(ens, "tsit5", backend="jax", saveat=SAVES, **TOL)
    assert sol.u.shape == (5, 5, 2)
    assert sol.status == ("success",) * 5
    assert sol.success.all()
    for i in range(5):
        one = dk.solve(ens.member(i), "tsit5", backend="jax", saveat=SAVES, **TOL)
        np.testing.assert_allclose(sol.u[i], one.u, rtol=1e-12, atol=1e-14)
        for key in ("nfev", "naccept", "nreject"):
            assert sol.stats[key][i] == one.stats[key]
    assert len(set(sol.stats["naccept"])) > 1  # per-member steps


def test_a_new_batch_of_the_same_size_does_not_recompile():
    need("jax")
    calls = {"n": 0}

    def counted(u, p, t):
        calls["n"] += 1
        return lv(u, p, t)

    prob = dk.ODEProblem(counted, np.array([1.0, 1.0]), (0.0, 2.0), np.ones(3))
    sols = []
    for seed in range(3):
        u0, p = batch(4, seed)
        sols.append(
            dk.solve(dk.EnsembleProblem(prob, u0=u0, p=p), "tsit5", backend="jax")
        )
        if seed == 0:
            traced = calls["n"]
    assert traced > 0
    assert calls["n"] == traced  # batches 2 and 3 reused the compiled program
    assert not np.allclose(sols[0].u, sols[1].u)


def test_a_failed_member_leaves_the_others_intact():
    need("jax")
    import jax

    prob = dk.ODEProblem(blowup, np.array([1.0]), (0.0, 2.0), np.array(0.1))
    ks = np.array([0.1, 1.0, 0.2, 0.8])
    ens = dk.EnsembleProblem(prob, p=ks)
    kw = {"backend": "jax", "saveat": SAVES, **TOL}
    sol = dk.solve(ens, "tsit5", throw=False, **kw)
    assert sol.success.tolist() == [True, False, True, False]
    assert sol.status[1] == "step_size_too_small"
    for i in (0, 2):
        exact = 1.0 / (1.0 - ks[i] * SAVES)
        np.testing.assert_allclose(sol.u[i, :, 0], exact, rtol=1e-6)
    assert np.isnan(np.asarray(sol.u[3, -1])).all()
    with pytest.raises(dk.SolveError, match=r"2 of 4 members failed.*\[1, 3\]"):
        dk.solve(ens, "tsit5", **kw)

    # Under jax.jit with throw=False the statuses are traced codes, one a member.
    @jax.jit
    def codes(k):
        s = dk.solve(dk.EnsembleProblem(prob, p=k), "tsit5", throw=False, **kw)
        return s.status, s.success

    status, success = codes(ks)
    names = [dk.Solution.STATUS_CODES[int(c)] for c in status]
    assert names == list(sol.status)
    assert np.asarray(success).tolist() == [True, False, True, False]


def test_nonfinite_rhs_names_the_members():
    need("jax")

    def root(u, p, t):
        xp = dk.array_namespace(u)
        return xp.sqrt(p) * u

    prob = dk.ODEProblem(root, np.array([1.0]), (0.0, 1.0), np.array(1.0))
    ens = dk.EnsembleProblem(prob, p=np.array([1.0, -1.0, 2.0]))
    with pytest.raises(dk.InvalidProblemError, match=r"for members \[1\]"):
        dk.solve(ens, "tsit5", backend="jax")


def test_executor_is_refused_on_jax():
    need("jax")
    ens = dk.EnsembleProblem(lv_problem(), u0=np.ones((2, 2)))
    with pytest.raises(dk.UnsupportedError, match=r"executor=.*backends offering"):
        dk.solve(ens, backend="jax", executor=object())


# The adjoints compile a backward solve for each of three programs (ensemble vjp,
# member vjp, jax.grad): tens of seconds each, so they run in tests_all.
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=[] if n in DISCRETE_NAMES else [pytest.mark.slow])
        for n in BY_NAME
    ],
)
def test_gradients_equal_member_vjps_with_every_sensealg(name):
    need("jax")
    import jax
    import jax.numpy as jnp

    u0, p = batch(3)
    prob = lv_problem()
    ens = dk.EnsembleProblem(prob, u0=u0, p=p)
    kw = {"backend": "jax", "saveat": SAVES, "sensealg": BY_NAME[name], **TOL}
    sol, pullback = dk.vjp(ens, "tsit5", **kw)
    cot = np.random.default_rng(1).normal(size=sol.u.shape)
    grads = pullback(cot)
    assert grads.u0.shape == (3, 2)
    assert grads.p.shape == (3, 3)
    for i in range(3):
        one, pull = dk.vjp(ens.member(i), "tsit5", **kw)
        np.testing.assert_allclose(sol.u[i], one.u, rtol=1e-12, atol=1e-14)
        g = pull(cot[i])
        np.testing.assert_allclose(grads.u0[i], g.u0, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(grads.p[i], g.p, rtol=1e-9, atol=1e-12)

    # jax.grad through dk.solve on the ensemble, with the same sensealg.
    def loss(u0, p):
        s = dk.solve(dk.EnsembleProblem(prob, u0=u0, p=p), "tsit5", **kw)
        return jnp.sum(s.u * cot)

    du0, dp = jax.grad(loss, argnums=(0, 1))(jnp.asarray(u0), jnp.asarray(p))
    np.testing.assert_allclose(du0, grads.u0, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dp, grads.p, rtol=1e-9, atol=1e-12)


def test_shared_inputs_get_gradients_summed_over_members():
    need("jax")
    u0, _ = batch(3)
    prob = lv_problem()
    ens = dk.EnsembleProblem(prob, u0=u0)  # p shared
    kw = {"backend": "jax", "saveat": SAVES, "sensealg": dk.ForwardMode(), **TOL}
    sol, pullback = dk.vjp(ens, "tsit5", **kw)
    cot = np.random.default_rng(2).normal(size=sol.u.shape)
    grads = pullback(cot)
    assert grads.p.shape == (3,)
    total = sum(
        np.asarray(dk.vjp(ens.member(i), "tsit5", **kw)[1](cot[i]).p) for i in range(3)
    )
    np.testing.assert_allclose(grads.p, total, rtol=1e-9)

    def loss(sol):
        xp = dk.array_namespace(sol.u)
        return xp.sum(sol.u * cot)

    value, vg = dk.value_and_grad(loss, ens, "tsit5", **kw)
    np.testing.assert_allclose(value, np.sum(np.asarray(sol.u) * cot), rtol=1e-12)
    np.testing.assert_allclose(vg.p, grads.p, rtol=1e-12)
    np.testing.assert_allclose(vg.u0, grads.u0, rtol=1e-12)


SHARDED = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    import diffeqkit as dk

    def lv(u, p, t):
        xp = dk.array_namespace(u)
        return xp.stack([p[0] * u[0] - p[1] * u[0] * u[1],
                         p[2] * u[0] * u[1] - u[1]])

    assert len(jax.devices()) == 2, jax.devices()
    prob = dk.ODEProblem(lv, np.array([1.0, 1.0]), (0.0, 2.0), np.ones(3))
    rng = np.random.default_rng(0)
    kw = dict(backend="jax", saveat=np.linspace(0, 2, 5), rtol=1e-8, atol=1e-10)
    for size in (6, 5):  # 5: padded to 6, the padding cut off
        u0 = rng.uniform(0.5, 1.5, (size, 2))
        p = rng.uniform(0.5, 1.5, (size, 3))
        ens = dk.EnsembleProblem(prob, u0=u0, p=p)
        plain = dk.solve(ens, "tsit5", **kw)
        split = dk.solve(ens, "tsit5", devices=jax.devices(), **kw)
        assert split.u.shape == (size, 5, 2)
        if size == 6:
            assert len(split.u.sharding.device_set) == 2, split.u.sharding
        np.testing.assert_allclose(split.u, plain.u, rtol=1e-12, atol=1e-14)
        assert split.stats == plain.stats
        sol, pull = dk.vjp(ens, "tsit5", devices=["cpu:0", "cpu:1"],
                           sensealg=dk.ReverseThroughSolver(), **kw)
        ref, ref_pull = dk.vjp(ens, "tsit5", sensealg=dk.ReverseThroughSolver(), **kw)
        cot = rng.normal(size=sol.u.shape)
        g, r = pull(cot), ref_pull(cot)
        assert g.u0.shape == (size, 2)
        np.testing.assert_allclose(g.u0, r.u0, rtol=1e-10)
        np.testing.assert_allclose(g.p, r.p, rtol=1e-10)
    # Under jax.jit and jax.grad: the sharding is a constraint in the program.
    def loss(p, devices):
        ens = dk.EnsembleProblem(prob, u0=u0, p=p)
        return jax.numpy.sum(dk.solve(ens, "tsit5", devices=devices, **kw).u ** 2)
    sharded = jax.jit(jax.value_and_grad(lambda p: loss(p, jax.devices())))
    single = jax.jit(jax.value_and_grad(lambda p: loss(p, None)))
    (v, g), (v1, g1) = sharded(p), single(p)
    np.testing.assert_allclose(v, v1, rtol=1e-12)
    np.testing.assert_allclose(g, g1, rtol=1e-10)
    print("sharded ok")
    """
)


def test_devices_shard_the_members_over_a_mesh():
    need("jax")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", SHARDED],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sharded ok" in out.stdout


def test_devices_must_be_a_list_of_devices():
    need("jax")
    ens = dk.EnsembleProblem(lv_problem(), u0=np.ones((2, 2)))
    with pytest.raises(dk.InvalidProblemError, match="devices must be a list"):
        dk.solve(ens, backend="jax", devices="cpu:0")
    with pytest.raises(dk.UnsupportedError, match="cpu:7"):
        dk.solve(ens, backend="jax", devices=["cpu:7"])


# ---------------------------------------------------------------------------------
# Events (the members' equality with their own solves, every backend, is in
# tests/test_ensemble_events.py).
# ---------------------------------------------------------------------------------

G = 9.81


def ball(u, p, t):  # u = (height, velocity), p = (g, e)
    xp = dk.array_namespace(u)
    return xp.stack([u[1], -p[0] + 0.0 * u[0]])


def bounce(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack([u[0], -p[1] * u[1]])


GROUND = dk.Event(lambda u, p, t: u[0], direction=-1, terminal=False, affect=bounce)
EV_KW = {
    "backend": "jax",
    "events": [GROUND],
    "max_events": 4,
    "rtol": 1e-10,
    "atol": 1e-12,
}


def drops(calls):
    """``h0 -> first impact times`` under jax.jit: an ensemble of balls dropped
    from heights `h0`, counting the traces of f in `calls`."""
    import jax
    import jax.numpy as jnp

    def counted(u, p, t):
        calls["n"] += 1
        return ball(u, p, t)

    prob = dk.ODEProblem(counted, np.array([1.0, 0.0]), (0.0, 1.0), np.array([G, 0.8]))

    @jax.jit
    def run(h0):
        u0 = jnp.stack([h0, jnp.zeros_like(h0)], axis=1)
        sol = dk.solve(dk.EnsembleProblem(prob, u0=u0), "tsit5", **EV_KW)
        return sol.t_events[0], sol.u_events[0], sol.stats["nevents"], sol.status

    return run


def test_events_under_jit_trace_once_with_static_shapes():
    need("jax")
    import jax.numpy as jnp

    calls = {"n": 0}
    run = drops(calls)
    t_ev, u_ev, nevents, status = run(jnp.array([1.0, 0.3]))
    traced = calls["n"]
    assert traced > 0
    # (B, max_events) and (B, max_events, 2), NaN after each member's events
    assert t_ev.shape == (2, 4)
    assert u_ev.shape == (2, 4, 2)
    assert np.asarray(nevents).tolist() == [1, 3]  # impacts before t = 1
    assert np.isnan(np.asarray(t_ev[0, 1:])).all()
    assert np.isfinite(np.asarray(t_ev[1, :3])).all()
    assert [dk.Solution.STATUS_CODES[int(c)] for c in status] == ["success"] * 2
    np.testing.assert_allclose(t_ev[:, 0], np.sqrt(2 * np.array([1.0, 0.3]) / G))
    t_ev2, *_ = run(jnp.array([0.8, 0.5]))
    assert calls["n"] == traced  # new values, the same compiled program
    np.testing.assert_allclose(t_ev2[:, 0], np.sqrt(2 * np.array([0.8, 0.5]) / G))


def test_events_on_one_device_equal_the_plain_ensemble():
    need("jax")
    import jax

    prob = dk.ODEProblem(ball, np.array([1.0, 0.0]), (0.0, 1.0), np.array([G, 0.8]))
    ens = dk.EnsembleProblem(prob, u0=np.array([[1.0, 0.0], [0.3, 0.0], [0.6, 0.0]]))
    plain = dk.solve(ens, "tsit5", **EV_KW)
    split = dk.solve(ens, "tsit5", devices=jax.devices()[:1], **EV_KW)
    np.testing.assert_array_equal(split.u, plain.u)
    np.testing.assert_array_equal(split.t_events[0], plain.t_events[0])
    assert split.stats == plain.stats


@pytest.mark.slow  # the differentiated program: about a minute to compile
def test_jax_grad_of_member_event_times_matches_the_closed_form():
    need("jax")
    import jax
    import jax.numpy as jnp

    run = drops({"n": 0})
    h0 = jnp.array([1.0, 0.3])
    # first impact: t* = sqrt(2 h0 / g), dt*/dh0 = 1 / sqrt(2 g h0)
    grad = jax.grad(lambda h: jnp.sum(run(h)[0][:, 0]))(h0)
    np.testing.assert_allclose(grad, 1.0 / np.sqrt(2 * G * np.asarray(h0)), rtol=1e-9)
