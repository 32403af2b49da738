"""Ensembles (API.md section 8): `dk.EnsembleProblem` validation, and the SciPy
backend's members solved in chunks, serially or on an executor.

Every member must equal its own `dk.solve` (same steps: the SciPy ensemble runs
the same solver per member), fail alone, and have gradients equal to its own
`dk.vjp`. The JAX backend is in tests/backends/test_jax_ensemble.py, Dask in
test_ensemble_dask.py.
"""

from __future__ import annotations

import concurrent.futures
import itertools

import numpy as np
import pytest
from conftest import BY_NAME, need, need_gradients

import diffeqkit as dk

SAVES = np.linspace(0.0, 2.0, 5)
TOL = {"rtol": 1e-8, "atol": 1e-10}


def lv(u, p, t):
    xp = dk.array_namespace(u)
    a, b = p["ab"][0], p["ab"][1]
    return xp.stack([a * u[0] - b * u[0] * u[1], p["d"] * u[0] * u[1] - u[1]])


def lv_problem():
    return dk.ODEProblem(
        lv,
        np.array([1.0, 1.0]),
        (0.0, 2.0),
        {"ab": np.array([1.5, 1.0]), "d": np.array(1.0)},
    )


def batch(size=6, seed=0):
    rng = np.random.default_rng(seed)
    u0 = rng.uniform(0.5, 1.5, (size, 2))
    p = {
        "ab": rng.uniform([1.0, 0.5], [2.0, 1.5], (size, 2)),
        "d": rng.uniform(0.5, 1.5, size),
    }
    return u0, p


def blowup(u, p, t):  # u = 1 / (1 - p t): a singularity at t = 1/p
    return p * u**2


# ---------------------------------------------------------------------------------
# Validation (no backend needed).
# ---------------------------------------------------------------------------------


def test_ensemble_needs_a_problem_and_a_batch():
    with pytest.raises(dk.InvalidProblemError, match=r"prob must be a dk\.ODEProblem"):
        dk.EnsembleProblem("not a problem", u0=np.ones((2, 2)))  # pyright: ignore[reportArgumentType]
    with pytest.raises(dk.InvalidProblemError, match=r"u0=.*or.*p=.*got neither"):
        dk.EnsembleProblem(lv_problem())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"u0": np.ones((3, 3))}, r"u0 must have shape \(B, \*\(2,\)\)"),
        ({"u0": np.ones(2)}, r"u0 must have shape \(B, \*\(2,\)\)"),
        ({"u0": np.ones((0, 2))}, "at least one member"),
        (
            {"u0": np.ones((3, 2)), "p": {"ab": np.ones((4, 2)), "d": np.ones(4)}},
            r"has 4 members .* but u0 has 3",
        ),
        ({"p": {"ab": np.ones((4, 2))}}, "p must have the structure of prob.p"),
        ({"p": {"ab": np.ones((4, 3)), "d": np.ones(4)}}, r"p\['ab'\] must have shape"),
        ({"p": {"ab": np.ones((4, 2)), "d": 1.0}}, r"p\['d'\] of the ensemble's p"),
        ({"u0": np.array([[1.0, 1.0], [np.nan, 1.0]])}, r"members \[1\] hold NaN"),
        ({"u0": [["a", "b"]]}, "u0 must hold real numbers"),
    ],
)
def test_ensemble_validation_names_the_argument(kwargs, match):
    with pytest.raises(dk.InvalidProblemError, match=match):
        dk.EnsembleProblem(lv_problem(), **kwargs)


def test_ensemble_members_and_repr():
    u0, p = batch(4)
    ens = dk.EnsembleProblem(lv_problem(), u0=u0.tolist(), p=p)
    assert ens.size == 4
    assert isinstance(ens.u0, np.ndarray)  # a list becomes NumPy
    member = ens.member(2)
    np.testing.assert_array_equal(member.u0, u0[2])
    np.testing.assert_array_equal(member.p["ab"], p["ab"][2])
    assert "size=4" in repr(ens)
    assert "u0+p" in repr(ens)


def test_devices_and_executor_need_an_ensemble():
    with pytest.raises(dk.InvalidProblemError, match="executor applies to a dk"):
        dk.solve(lv_problem(), executor=object())
    with pytest.raises(dk.InvalidProblemError, match="devices applies to a dk"):
        dk.solve(lv_problem(), devices=["cpu:0"])
    with pytest.raises(dk.InvalidProblemError, match="executor= applies to a dk"):
        dk.vjp(lv_problem(), executor=object())


@pytest.mark.scipy
def test_chunks_cover_the_members_in_order():
    need("scipy")
    from diffeqkit.backends.scipy import _ensemble

    for size, workers in [(1, 1), (7, 2), (1000, 2), (10_001, 3), (5, 8)]:
        parts = _ensemble.chunks(size, workers)
        assert parts[0][0] == 0
        assert parts[-1][1] == size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
        assert len(parts) <= max(1, _ensemble.CHUNKS_PER_WORKER * workers)
        if workers > 1 and size >= 100:
            assert min(b - a for a, b in parts) >= _ensemble.MIN_CHUNK


# ---------------------------------------------------------------------------------
# SciPy.
# ---------------------------------------------------------------------------------


@pytest.mark.scipy
@pytest.mark.parametrize("executor", ["serial", "threads"])
def test_scipy_members_equal_their_own_solves(executor):
    need("scipy")
    u0, p = batch(6)
    ens = dk.EnsembleProblem(lv_problem(), u0=u0, p=p)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        sol = dk.solve(
            ens,
            "dopri5",
            backend="scipy",
            saveat=SAVES,
            executor=None if executor == "serial" else pool,
            **TOL,
        )
    assert sol.u.shape == (6, 5, 2)
    assert sol.status == ("success",) * 6
    assert sol.success.tolist() == [True] * 6
    np.testing.assert_array_equal(sol.t, SAVES)
    for i in range(6):
        one = dk.solve(ens.member(i), "dopri5", backend="scipy", saveat=SAVES, **TOL)
        np.testing.assert_array_equal(sol.u[i], one.u)  # the very same steps
        for key in ("nfev", "naccept", "nreject"):
            assert sol.stats[key][i] == one.stats[key]
    # Members take their own steps.
    assert len(set(sol.stats["naccept"])) > 1


@pytest.mark.scipy
def test_scipy_failed_member_leaves_the_others_intact():
    need("scipy")
    prob = dk.ODEProblem(blowup, np.array([1.0]), (0.0, 2.0), np.array(0.1))
    ks = np.array([0.1, 1.0, 0.2, 0.8])  # members 1 and 3 blow up before t = 2
    ens = dk.EnsembleProblem(prob, p=ks)
    sol = dk.solve(ens, "tsit5", backend="scipy", saveat=SAVES, throw=False, **TOL)
    assert sol.success.tolist() == [True, False, True, False]
    assert sol.status[1] == sol.status[3] == "step_size_too_small"
    for i in (0, 2):
        exact = 1.0 / (1.0 - ks[i] * SAVES)
        np.testing.assert_allclose(sol.u[i, :, 0], exact, rtol=1e-6)
    assert np.isnan(sol.u[1, -1]).all()
    assert sol.u[1, 0, 0] == 1.0
    assert "members [1, 3]" in sol.message
    with pytest.raises(dk.SolveError, match=r"2 of 4 members failed.*\[1, 3\]") as err:
        dk.solve(ens, "tsit5", backend="scipy", saveat=SAVES, **TOL)
    assert err.value.solution.success.tolist() == [True, False, True, False]


@pytest.mark.scipy
def test_executor_must_be_an_executor():
    need("scipy")
    ens = dk.EnsembleProblem(lv_problem(), u0=np.ones((2, 2)))
    with pytest.raises(dk.InvalidProblemError, match="executor must be None, a"):
        dk.solve(ens, backend="scipy", executor=object())


SCIPY_SENSEALGS = list(dk.backends.SPECS["scipy"].capabilities.sensealgs)


@pytest.mark.scipy
@pytest.mark.parametrize("sensealg", SCIPY_SENSEALGS)
@pytest.mark.parametrize("batched", ["u0", "p", "both"])
def test_scipy_ensemble_vjp_equals_member_vjps(sensealg, batched):
    need_gradients("scipy")
    u0, p = batch(3)
    prob = lv_problem()
    ens = dk.EnsembleProblem(
        prob,
        u0=None if batched == "p" else u0,
        p=None if batched == "u0" else p,
    )
    kw = {"backend": "scipy", "saveat": SAVES, "sensealg": BY_NAME[sensealg], **TOL}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        sol, pullback = dk.vjp(ens, "dopri5", executor=pool, **kw)
        cot = np.random.default_rng(1).normal(size=sol.u.shape)
        grads = pullback(cot)
    du0, dab, dd = [], [], []
    for i in range(3):
        one, pull = dk.vjp(ens.member(i), "dopri5", **kw)
        np.testing.assert_allclose(sol.u[i], one.u, rtol=1e-12)
        g = pull(cot[i])
        du0.append(g.u0)
        dab.append(g.p["ab"])
        dd.append(g.p["d"])
    # Batched inputs keep the member axis; shared ones are summed over members.
    reduce = lambda xs, b: np.stack(xs) if b else np.sum(xs, axis=0)  # noqa: E731
    np.testing.assert_allclose(grads.u0, reduce(du0, batched != "p"), rtol=1e-10)
    np.testing.assert_allclose(grads.p["ab"], reduce(dab, batched != "u0"), rtol=1e-10)
    np.testing.assert_allclose(grads.p["d"], reduce(dd, batched != "u0"), rtol=1e-10)


@pytest.mark.scipy
def test_scipy_ensemble_value_and_grad_against_closed_form():
    need_gradients("scipy")
    prob = dk.ODEProblem(lambda u, p, t: -p * u, np.array([1.0]), (0.0, 1.0), 1.0)
    ks = np.array([0.5, 1.0, 2.0])
    ens = dk.EnsembleProblem(prob, p=ks)

    def loss(sol):  # sum over members of u(t1)^2 = exp(-2 k)
        xp = dk.array_namespace(sol.u)
        return xp.sum(sol.u[:, -1, 0] ** 2)

    value, grads = dk.value_and_grad(
        loss,
        ens,
        "tsit5",
        backend="scipy",
        rtol=1e-10,
        atol=1e-12,
        sensealg=dk.ForwardMode(),
    )
    np.testing.assert_allclose(value, np.exp(-2 * ks).sum(), rtol=1e-8)
    np.testing.assert_allclose(grads.p, -2 * np.exp(-2 * ks), rtol=1e-7)
    np.testing.assert_allclose(grads.u0, [2 * np.exp(-2 * ks).sum()], rtol=1e-7)


@pytest.mark.scipy
def test_scipy_ensemble_gradients_of_a_failed_member_are_nan():
    need_gradients("scipy")
    prob = dk.ODEProblem(blowup, np.array([1.0]), (0.0, 2.0), np.array(0.1))
    ens = dk.EnsembleProblem(prob, p=np.array([0.1, 1.0]))
    sol, pullback = dk.vjp(
        ens, "tsit5", backend="scipy", saveat=SAVES, throw=False, **TOL
    )
    grads = pullback(np.ones(sol.u.shape))
    assert np.isfinite(grads.p[0])
    assert np.isnan(grads.p[1])
    with pytest.raises(dk.SolveError, match=r"members \[1\]"):
        dk.vjp(ens, "tsit5", backend="scipy", saveat=SAVES, **TOL)


@pytest.mark.torch
def test_torch_ensembles_run_through_solve_and_vjp():
    need("torch")
    import torch

    f64 = torch.float64
    p = {"ab": torch.tensor([1.5, 1.0], dtype=f64), "d": torch.tensor(1.0, dtype=f64)}
    prob = dk.ODEProblem(lv, torch.ones(2, dtype=f64), (0.0, 2.0), p)
    u0 = torch.tensor([[1.0, 1.0], [0.8, 1.2], [1.2, 0.7]], dtype=f64)
    ens = dk.EnsembleProblem(prob, u0=u0)
    sol = dk.solve(ens, "tsit5", saveat=SAVES, **TOL)
    assert sol.u.shape == (3, SAVES.size, 2)
    assert sol.status == ("success",) * 3
    out, pullback = dk.vjp(ens, "tsit5", saveat=SAVES, **TOL)
    grads = pullback(torch.ones_like(out.u))
    assert grads.u0.shape == (3, 2)
    for i in range(3):
        one, pull_one = dk.vjp(ens.member(i), "tsit5", saveat=SAVES, **TOL)
        torch.testing.assert_close(sol.u[i], one.u, rtol=1e-10, atol=1e-12)
        g = pull_one(torch.ones_like(one.u))
        torch.testing.assert_close(grads.u0[i], g.u0, rtol=1e-8, atol=1e-10)
    with pytest.raises(dk.UnsupportedError, match="executor"):
        dk.solve(ens, "tsit5", executor=object())
