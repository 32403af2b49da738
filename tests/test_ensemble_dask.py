"""Ensembles on a Dask cluster: ``executor=dask.distributed.Client`` (API.md
section 8).

One `LocalCluster` of two worker processes (one thread each), started and
closed here. Members come back in order, equal to the serial solve bit for bit
(the same solver runs each member), with gradients equal to the serial ones;
a worker process killed mid-run loses no member (Dask reruns its chunks). Runs
in the tests_all session (the ``dask`` extra).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import numpy as np
import pytest
from conftest import need_gradients

import diffeqkit as dk
from diffeqkit.problems import lotka_volterra_rhs

pytestmark = pytest.mark.dask  # only in tests_all, which has SciPy and Dask

SAVES = np.linspace(0.0, 5.0, 11)
TOL = {"rtol": 1e-8, "atol": 1e-10}


def slow_decay(u, p, t):
    """``u' = -p u``, a millisecond per call: a solve long enough to kill a
    worker in the middle of it."""
    time.sleep(0.001)
    return -p * u


def decay(u, p, t):
    return -p * u


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def lv_ensemble(size, seed=0):
    rng = np.random.default_rng(seed)
    prob = dk.ODEProblem(
        lotka_volterra_rhs, np.array([1.0, 1.0]), (0.0, 5.0), np.ones(4)
    )
    u0 = rng.uniform(0.5, 1.5, (size, 2))
    p = rng.uniform([1.0, 0.5, 2.0, 0.5], [2.0, 1.5, 4.0, 1.5], (size, 4))
    return dk.EnsembleProblem(prob, u0=u0, p=p)


def test_members_on_the_cluster_equal_the_serial_solve_in_order(client):
    ens = lv_ensemble(50)
    kw = {"backend": "scipy", "saveat": SAVES, **TOL}
    serial = dk.solve(ens, "dopri5", **kw)
    remote = dk.solve(ens, "dopri5", executor=client, **kw)
    np.testing.assert_array_equal(remote.u, serial.u)
    assert remote.status == serial.status
    assert remote.stats == serial.stats
    # Chunked: more than one task per worker, and every member in one.
    assert len(dk.backends.scipy._ensemble.chunks(50, 2)) > 2


def prey_high(u, p, t):  # the prey crossing 1.2 (module-level: pickled by name)
    return u[0] - 1.2


def halve_prey(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack([0.5 * u[0], u[1]])


def test_events_on_the_cluster_equal_the_serial_ones(client):
    need_gradients("scipy")
    ens = lv_ensemble(12, seed=2)
    event = dk.Event(prey_high, direction=1, terminal=False, affect=halve_prey)
    kw = {"backend": "scipy", "saveat": SAVES, "events": [event], **TOL}
    serial = dk.solve(ens, "dopri5", **kw)
    remote = dk.solve(ens, "dopri5", executor=client, **kw)
    np.testing.assert_array_equal(remote.u, serial.u)
    np.testing.assert_array_equal(remote.t_events[0], serial.t_events[0])
    np.testing.assert_array_equal(remote.u_events[0], serial.u_events[0])
    assert remote.stats == serial.stats
    assert len(set(serial.stats["nevents"])) > 1  # members fire it differently
    sol, pull = dk.vjp(ens, "dopri5", executor=client, **kw)
    _, ref_pull = dk.vjp(ens, "dopri5", **kw)
    cot = np.random.default_rng(3).normal(size=sol.u.shape)
    got, want = pull(cot), ref_pull(cot)
    np.testing.assert_allclose(got.u0, want.u0, rtol=1e-12)
    np.testing.assert_allclose(got.p, want.p, rtol=1e-12)
    # the events' cotangents travel to the workers, cut per member
    t_cot = np.where(np.isnan(sol.t_events[0]), np.nan, 1.0)
    u_cot = np.where(np.isnan(sol.u_events[0]), np.nan, 0.5)
    got = pull(cot, t_events=[t_cot], u_events=[u_cot])
    want = ref_pull(cot, t_events=[t_cot], u_events=[u_cot])
    np.testing.assert_allclose(got.u0, want.u0, rtol=1e-12)
    np.testing.assert_allclose(got.p, want.p, rtol=1e-12)
    assert np.isfinite(got.p).all()


def test_gradients_on_the_cluster_equal_the_serial_ones(client):
    need_gradients("scipy")
    ens = lv_ensemble(20, seed=1)
    kw = {"backend": "scipy", "saveat": SAVES, "sensealg": dk.ForwardMode(), **TOL}
    sol, pull = dk.vjp(ens, "dopri5", **kw)
    rsol, rpull = dk.vjp(ens, "dopri5", executor=client, **kw)
    # (f's JVPs are compiled by JAX in each worker: equal up to rounding.)
    np.testing.assert_allclose(rsol.u, sol.u, rtol=1e-12)
    cot = np.random.default_rng(3).normal(size=sol.u.shape)
    g, rg = pull(cot), rpull(cot)
    np.testing.assert_allclose(rg.u0, g.u0, rtol=1e-12)
    np.testing.assert_allclose(rg.p, g.p, rtol=1e-12)


def test_a_killed_worker_loses_no_member(client):
    size = 40
    ks = np.linspace(0.5, 2.0, size)
    kw = {"backend": "scipy", "saveat": SAVES, **TOL}
    reference = dk.solve(
        dk.EnsembleProblem(dk.ODEProblem(decay, [1.0], (0.0, 5.0), 1.0), p=ks),
        "tsit5",
        **kw,
    )
    slow = dk.EnsembleProblem(dk.ODEProblem(slow_decay, [1.0], (0.0, 5.0), 1.0), p=ks)
    pids = client.run(os.getpid)  # worker address -> its process id
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        running = thread.submit(dk.solve, slow, "tsit5", executor=client, **kw)
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:
            busy = [a for a, tasks in client.processing().items() if tasks]
            victim = busy[0] if busy else None
            time.sleep(0.05)
        assert victim is not None, "no worker ever ran a chunk"
        time.sleep(0.3)  # in the middle of its chunk (each takes about a second)
        assert client.processing()[victim], "the chunk finished before the kill"
        os.kill(pids[victim], signal.SIGKILL)
        sol = running.result(timeout=300)
    assert victim not in client.run(os.getpid)  # it really died
    np.testing.assert_array_equal(sol.u, reference.u)
    assert sol.status == ("success",) * size
