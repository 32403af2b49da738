"""The batched torch ensemble solver (`diffeqkit.backends.torch._ensemble`).

Each member is checked against its own `dk.solve` (same tableau and controller:
the same steps, so agreement far below the tolerance and equal step counts),
failures stay per member, gradients through the batched steps match per-member
`dk.vjp`, and members that are done cost no evaluations of f.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import diffeqkit as dk  # noqa: E402
from diffeqkit._solve import build_request  # noqa: E402
from diffeqkit.backends.torch._backend import TorchBackend  # noqa: E402
from diffeqkit.backends.torch._ensemble import (  # noqa: E402
    integrate,
    solve_ensemble,
    vjp_ensemble,
)
from diffeqkit.problems import lotka_volterra_rhs  # noqa: E402

pytestmark = pytest.mark.torch

F64 = torch.float64
U0 = torch.tensor([1.0, 1.0], dtype=F64)
P0 = torch.tensor([1.5, 1.0, 3.0, 1.0], dtype=F64)
SAVES = np.linspace(0.0, 5.0, 11)


def members(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member u0 and p of Lotka-Volterra, spread by +-30%."""
    gen = torch.Generator().manual_seed(seed)
    spread_u = 1 + 0.6 * (torch.rand(size, 2, generator=gen, dtype=F64) - 0.5)
    spread_p = 1 + 0.6 * (torch.rand(size, 4, generator=gen, dtype=F64) - 0.5)
    return U0 * spread_u, P0 * spread_p


def lv(u0=U0, p=P0, tspan=(0.0, 5.0)):
    return dk.ODEProblem(lotka_volterra_rhs, u0, tspan, p)


def own(prob, alg, **kw):
    """A member's own solve, without raising."""
    return dk.solve(prob, alg, throw=False, **kw)


@pytest.mark.parametrize("alg", ["tsit5", "dopri5", "bosh3", "dopri8"])
def test_each_member_equals_its_own_solve(alg):
    us, ps = members(6)
    kw = {"saveat": SAVES, "rtol": 1e-7, "atol": 1e-9}
    sol = solve_ensemble(build_request(lv(), alg, **kw), us, ps, 6)
    assert sol.u.shape == (6, len(SAVES), 2)
    assert sol.status == ("success",) * 6
    for i in range(6):
        ref = own(lv(us[i], ps[i]), alg, **kw)
        # The same steps: agreement to rounding, far below rtol.
        torch.testing.assert_close(sol.u[i], ref.u, rtol=1e-10, atol=1e-11)
        for key in ("nfev", "naccept", "nreject"):
            assert sol.stats[key][i] == ref.stats[key], (key, i)
    # Different parameters, different step counts: each member has its own steps.
    assert len(set(sol.stats["naccept"])) > 1


def test_shared_u0_or_shared_p_and_backward_time():
    us, ps = members(4, seed=1)
    # Saves that skip t0 and end before t1 (the solve still runs to t1).
    saves = np.array([3.0, 2.0, 0.5])
    kw = {"saveat": saves, "rtol": 1e-8, "atol": 1e-10}
    req = build_request(lv(tspan=(4.0, 0.0)), "tsit5", **kw)
    by_p = solve_ensemble(req, None, ps, 4)
    by_u = solve_ensemble(req, us, None, 4)
    for i in range(4):
        ref_p = own(lv(U0, ps[i], tspan=(4.0, 0.0)), "tsit5", **kw)
        ref_u = own(lv(us[i], P0, tspan=(4.0, 0.0)), "tsit5", **kw)
        torch.testing.assert_close(by_p.u[i], ref_p.u, rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(by_u.u[i], ref_u.u, rtol=1e-10, atol=1e-11)
        assert by_p.stats["nfev"][i] == ref_p.stats["nfev"]
    torch.testing.assert_close(by_p.t, torch.as_tensor(saves, dtype=F64))


def test_dict_p_and_closed_form():
    # u' = -k u + c: u(t) = c/k + (u0 - c/k) exp(-k t), per member.
    def f(u, p, t):
        return -p["k"] * u + p["c"]

    k = torch.tensor([0.5, 2.0, 8.0], dtype=F64)
    c = torch.tensor([1.0, -1.0, 0.0], dtype=F64)
    prob = dk.ODEProblem(
        f, torch.tensor([1.0], dtype=F64), (0.0, 2.0), {"k": 1.0, "c": 0.0}
    )
    ts = np.linspace(0.0, 2.0, 5)
    sol = solve_ensemble(
        build_request(prob, "tsit5", saveat=ts, rtol=1e-10, atol=1e-12),
        None,
        {"k": k, "c": c},
        3,
    )
    t = torch.as_tensor(ts, dtype=F64)
    exact = (c / k)[:, None] + (1 - c / k)[:, None] * torch.exp(-k[:, None] * t)
    torch.testing.assert_close(sol.u[..., 0], exact, rtol=1e-8, atol=1e-10)
    # A stiffer member takes more steps.
    assert sol.stats["naccept"][2] > sol.stats["naccept"][0]


def blow_up(u, p, t):
    """``u' = p u^2``: ``u = 1 / (1 - p t)`` blows up at ``t = 1/p``."""
    return p * u**2


def test_a_failing_member_leaves_the_others_intact():
    p = torch.tensor([0.1, 1.0, 0.2, 0.3], dtype=F64)  # member 1 blows up at t=1
    prob = dk.ODEProblem(blow_up, torch.tensor([1.0], dtype=F64), (0.0, 2.0), 0.1)
    ts = np.linspace(0.0, 2.0, 8)  # no save at the singularity itself
    kw = {"saveat": ts, "rtol": 1e-8, "atol": 1e-10}
    sol = solve_ensemble(build_request(prob, "tsit5", throw=False, **kw), None, p, 4)
    ref_bad = own(dk.ODEProblem(blow_up, prob.u0, (0.0, 2.0), p[1]), "tsit5", **kw)
    assert sol.status[1] == ref_bad.status != "success"
    assert [s for i, s in enumerate(sol.status) if i != 1] == ["success"] * 3
    torch.testing.assert_close(
        sol.u[1], ref_bad.u, rtol=1e-9, atol=1e-10, equal_nan=True
    )
    assert torch.isnan(sol.u[1, -1]).all()
    for i in (0, 2, 3):
        exact = 1 / (1 - p[i] * torch.as_tensor(ts, dtype=F64))
        torch.testing.assert_close(sol.u[i, :, 0], exact, rtol=1e-7, atol=0.0)
    # throw=True names the failing member and still carries everyone's result.
    with pytest.raises(dk.SolveError, match=r"1 of 4 members failed .*members \[1\]"):
        solve_ensemble(build_request(prob, "tsit5", **kw), None, p, 4)
    with pytest.raises(dk.SolveError) as err:
        solve_ensemble(build_request(prob, "tsit5", **kw), None, p, 4)
    assert err.value.solution.status == sol.status


def test_max_steps_is_per_member():
    us, ps = members(8, seed=2)
    kw = {"saveat": SAVES, "rtol": 1e-7, "atol": 1e-9}
    full = solve_ensemble(build_request(lv(), "tsit5", **kw), us, ps, 8)
    steps = sorted(
        a + r for a, r in zip(full.stats["naccept"], full.stats["nreject"], strict=True)
    )
    limit = steps[4]  # some members need more
    req = build_request(lv(), "tsit5", max_steps=limit, throw=False, **kw)
    sol = solve_ensemble(req, us, ps, 8)
    failed = [i for i, s in enumerate(sol.status) if s != "success"]
    assert 0 < len(failed) < 8
    for i in range(8):
        ref = own(lv(us[i], ps[i]), "tsit5", max_steps=limit, **kw)
        assert sol.status[i] == ref.status
        torch.testing.assert_close(
            sol.u[i], ref.u, rtol=1e-10, atol=1e-11, equal_nan=True
        )
        assert sol.stats["nfev"][i] == ref.stats["nfev"]


def test_finished_members_cost_no_evaluations():
    # Decay rates spread over three decades: the stiffest member needs far more
    # steps than the rest, which leave the batch when they reach t1.
    def f(u, p, t):
        return -p * u

    rates = torch.tensor([0.1, 0.2, 0.5, 1.0, 2.0, 200.0], dtype=F64)
    prob = dk.ODEProblem(f, torch.tensor([1.0], dtype=F64), (0.0, 1.0), 1.0)
    req = build_request(prob, "tsit5", saveat=[0.0, 1.0], rtol=1e-8, atol=1e-10)
    _, run, rhs = integrate(req, None, rates, 6)
    assert rhs.vectorized  # vmapped, not looped
    # Every evaluation of a member is counted in its nfev, and no other happens.
    assert rhs.member_evals == sum(run.nfev)
    assert rhs.member_evals < 0.4 * 6 * max(run.nfev)
    assert run.nfev[5] > 5 * run.nfev[0]


@pytest.mark.parametrize("alg", ["tsit5", "rk4"])
def test_gradients_through_the_batch_match_per_member_vjp(alg):
    us, ps = members(3, seed=3)
    us.requires_grad_(True)
    ps.requires_grad_(True)
    kw = {"saveat": SAVES, "rtol": 1e-8, "atol": 1e-10}
    if alg == "rk4":
        kw["dt0"] = 0.05
    weights = torch.linspace(0.5, 1.5, len(SAVES), dtype=F64)[:, None]
    sol = solve_ensemble(build_request(lv(), alg, **kw), us, ps, 3)
    loss = (weights * sol.u**2).sum()
    loss.backward()
    assert us.grad is not None
    assert ps.grad is not None
    for i in range(3):
        u0, p = us[i].detach(), ps[i].detach()
        ref, pullback = dk.vjp(lv(u0, p), alg, sensealg=dk.ReverseThroughSolver(), **kw)
        grads = pullback(2 * weights * ref.u)
        torch.testing.assert_close(us.grad[i], grads.u0, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ps.grad[i], grads.p, rtol=1e-6, atol=1e-9)


def test_fixed_step_batch_and_a_nonfinite_member():
    def f(u, p, t):
        return p * u**2

    p = torch.tensor([0.1, 4.0, 0.3], dtype=F64)  # member 1 overflows
    prob = dk.ODEProblem(f, torch.tensor([1.0], dtype=F64), (0.0, 2.0), 0.1)
    kw = {"saveat": np.linspace(0.0, 2.0, 5), "dt0": 0.01}
    sol = solve_ensemble(build_request(prob, "rk4", throw=False, **kw), None, p, 3)
    for i in range(3):
        ref = own(dk.ODEProblem(f, prob.u0, (0.0, 2.0), p[i]), "rk4", **kw)
        assert sol.status[i] == ref.status
        torch.testing.assert_close(
            sol.u[i], ref.u, rtol=1e-12, atol=0.0, equal_nan=True
        )
        assert sol.stats["naccept"][i] == ref.stats["naccept"]
        assert sol.stats["nfev"][i] == ref.stats["nfev"]
    assert sol.status[1] == "nonfinite"


def test_an_f_that_vmap_cannot_batch_runs_member_by_member():
    def f(u, p, t):
        # Data-dependent Python control flow: not vmappable.
        if float(p) > 1.0:
            return -p * u
        return p * u

    p = torch.tensor([0.5, 2.0], dtype=F64)
    prob = dk.ODEProblem(f, torch.tensor([1.0], dtype=F64), (0.0, 1.0), 0.5)
    req = build_request(prob, "tsit5", saveat=[0.0, 1.0], rtol=1e-9, atol=1e-11)
    _, run, rhs = integrate(req, None, p, 2)
    assert not rhs.vectorized
    torch.testing.assert_close(
        run.u[:, -1, 0],
        torch.exp(torch.tensor([0.5, -2.0], dtype=F64)),
        rtol=1e-8,
        atol=0,
    )


def test_bad_inputs_are_refused():
    req = build_request(lv(), "tsit5", saveat=SAVES)
    with pytest.raises(dk.InvalidProblemError, match="leading axis of length 3"):
        solve_ensemble(req, None, torch.ones(2, 4, dtype=F64), 3)
    with pytest.raises(dk.InvalidProblemError, match="Stack one u0 per member"):
        solve_ensemble(req, torch.ones(3, 3, dtype=F64), None, 3)


@pytest.mark.parametrize(
    ("alg", "sensealg"),
    [
        ("tsit5", dk.ContinuousAdjoint()),
        ("tsit5", dk.InterpolatingAdjoint()),
        ("rodas4", dk.CheckpointedAdjoint()),
    ],
)
def test_continuous_adjoints_and_implicit_algs_solve_the_members_one_by_one(
    alg, sensealg
):
    us, ps = members(2)
    kw = {"saveat": SAVES, "sensealg": sensealg, "rtol": 1e-8, "atol": 1e-10}
    req = build_request(lv(), alg, **kw)
    sol, pull = vjp_ensemble(req, us, ps, 2, solve_one=TorchBackend().solve)
    assert sol.status == ("success", "success")
    cot = torch.ones_like(sol.u)
    du0, dp = pull(cot)
    for i in range(2):
        one, pull_one = dk.vjp(lv(us[i], ps[i]), alg, **kw)
        torch.testing.assert_close(sol.u[i], one.u, rtol=1e-12, atol=1e-12)
        g = pull_one(torch.ones_like(one.u))
        torch.testing.assert_close(du0[i], g.u0, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dp[i], g.p, rtol=1e-10, atol=1e-12)
    with pytest.raises(dk.UnsupportedError, match="one by one"):
        solve_ensemble(req, us, ps.clone().requires_grad_(True), 2, devices=["cpu"])
    with pytest.raises(dk.UnsupportedError, match=r"through dk\.solve"):
        solve_ensemble(req, us, ps.clone().requires_grad_(True), 2)


def test_vjp_ensemble_batched_p_and_shared_u0():
    _, ps = members(3, seed=4)
    kw = {"saveat": SAVES, "rtol": 1e-8, "atol": 1e-10}
    req = build_request(lv(), "tsit5", **kw)
    sol, pull = vjp_ensemble(req, None, ps, 3)
    assert not sol.u.requires_grad
    gen = torch.Generator().manual_seed(5)
    ct = torch.randn(sol.u.shape, generator=gen, dtype=F64)
    du0, dp = pull(ct)
    assert dp.shape == (3, 4)
    assert du0.shape == (2,)
    total_u0 = torch.zeros(2, dtype=F64)
    for i in range(3):
        _, pullback = dk.vjp(
            lv(U0, ps[i]), "tsit5", sensealg=dk.ReverseThroughSolver(), **kw
        )
        grads = pullback(ct[i])
        torch.testing.assert_close(dp[i], grads.p, rtol=1e-6, atol=1e-9)
        total_u0 = total_u0 + grads.u0
    # The shared u0's gradient sums the members'.
    torch.testing.assert_close(du0, total_u0, rtol=1e-6, atol=1e-9)
    # The pullback may be called again.
    torch.testing.assert_close(pull(2 * ct)[1], 2 * dp)


def test_vjp_ensemble_failed_member_has_nan_gradient():
    p = torch.tensor([0.1, 1.0, 0.2], dtype=F64)  # member 1 blows up at t=1
    prob = dk.ODEProblem(blow_up, torch.tensor([1.0], dtype=F64), (0.0, 2.0), 0.1)
    req = build_request(prob, "tsit5", saveat=[0.0, 0.5, 2.0], throw=False)
    sol, pull = vjp_ensemble(req, torch.ones(3, 1, dtype=F64), p, 3)
    du0, dp = pull(torch.ones(sol.u.shape, dtype=F64))
    assert torch.isnan(dp[1])
    assert torch.isnan(du0[1]).all()
    # u(2) = 1 / (1 - 2 p) + the earlier saves: d/dp of sum_t 1/(1 - p t).
    ts = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    for i in (0, 2):
        exact = (ts / (1 - p[i] * ts) ** 2).sum()
        torch.testing.assert_close(dp[i], exact, rtol=1e-5, atol=0.0)


def test_members_split_over_devices_match_one_batch():
    us, ps = members(7, seed=6)
    kw = {"saveat": SAVES[::-1], "rtol": 1e-8, "atol": 1e-10}
    # Backward in time, and some members stopped by max_steps.
    req = build_request(lv(tspan=(5.0, 0.0)), "tsit5", throw=False, max_steps=150, **kw)
    one = solve_ensemble(req, us, ps, 7)
    split = solve_ensemble(req, us, ps, 7, devices=["cpu", "cpu", "cpu"])
    torch.testing.assert_close(split.u, one.u, rtol=1e-13, atol=0.0, equal_nan=True)
    assert split.status == one.status
    assert split.stats == one.stats
    assert split.message == one.message
    # Gradients through the split batch are the same too.
    _, pull_one = vjp_ensemble(req, us, ps, 7)
    _, pull_split = vjp_ensemble(req, us, ps, 7, devices=["cpu", "cpu"])
    ct = torch.ones(one.u.shape, dtype=F64)
    for a, b in zip(pull_one(ct), pull_split(ct), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0, equal_nan=True)
    with pytest.raises(dk.UnsupportedError, match="cuda:7"):
        solve_ensemble(req, us, ps, 7, devices=["cpu", "cuda:7"])
