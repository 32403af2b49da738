"""The PyTorch backend's ``rodas4`` (Hairer & Wanner's RODAS, order 4(3)):
its measured orders, ROBER against the IVP test set's values and against
rosenbrock23, its counts, and gradients by every torch sensealg.

The tableau's order conditions, stiff accuracy and L-stability are checked
algebraically in tests/test_rosenbrock.py; here the torch step is checked to be
that method (fixed-step orders 4 and 3 on a non-autonomous problem, which needs
the ``h d_i T`` terms right).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
from conftest import SENSEALGS as ALL_SENSEALGS
from problems import LINEAR_A, LINEAR_U0, linear, linear_grads, to_numpy

import diffeqkit as dk
from diffeqkit import problems
from diffeqkit._rosenbrock import ROSENBROCK_TABLEAUX
from diffeqkit._solve import build_request

torch = pytest.importorskip("torch")
pytest.importorskip("torchdiffeq")
from diffeqkit.backends.torch import _implicit, _replay  # noqa: E402
from diffeqkit.backends.torch._rk import interpolate, no_lift  # noqa: E402

pytestmark = pytest.mark.torch

ALG = "rodas4"
# With an implicit alg the continuous adjoint is the interpolating one.
SENSEALGS = {
    **{k: v for k, v in ALL_SENSEALGS.items() if k != "continuous"},
    "interpolating": dk.InterpolatingAdjoint(),
}
F64 = torch.float64


def _nonautonomous(t, y):
    # u' = -5 (u - sin t) + cos t: u = sin t + 0.3 e^(-5 t) from u0 = 0.3.
    return -5.0 * (y - torch.sin(t)) + torch.cos(t)


def _exact(t: float) -> float:
    return math.sin(t) + 0.3 * math.exp(-5.0 * t)


def _fixed_steps(n: int, what: str) -> float:
    """Error at t = 1 of `n` fixed steps (``what="solution"``), of the embedded
    solution y1 - (y1 - y1_hat) propagated instead (``"embedded"``), or the
    largest error of the dense output at the step midpoints (``"dense"``)."""
    consts = _implicit._rodas_constants(
        ROSENBROCK_TABLEAUX[ALG], F64, torch.device("cpu"), no_lift
    )
    h = torch.tensor(1.0 / n, dtype=F64)
    y, t = torch.tensor([0.3], dtype=F64), torch.tensor(0.0, dtype=F64)
    dense = 0.0
    for i in range(n):
        t1 = torch.tensor((i + 1) / n, dtype=F64)
        y1, _, err, coeffs = _implicit._rodas_step(
            _nonautonomous, y, _nonautonomous(t, y), t, h, t1, consts
        )
        assert err is not None
        mid = t + 0.5 * h
        value = float(interpolate(coeffs, t, t1, mid)[0])
        dense = max(dense, abs(value - _exact(float(mid))))
        y, t = (y1 - err if what == "embedded" else y1), t1
    return dense if what == "dense" else abs(float(y[0]) - _exact(1.0))


@pytest.mark.parametrize(
    ("what", "order"), [("solution", 4), ("embedded", 3), ("dense", 4)]
)
def test_rodas4_converges_at_its_orders_on_a_nonautonomous_problem(what, order):
    # h = 1/10 ... 1/80 (dense: 1/40 ... 1/320). Measured log2 ratios: solution
    # 4.02, 4.01, 4.00; embedded 3.04, 3.02, 3.01; dense output (RODAS's
    # continuous extension of order 3, local error O(h^4)) 3.86, 3.92, 3.96.
    # Allow 0.25: still tells 4 from 3 and 3 from 2.
    ns = (40, 80, 160, 320) if what == "dense" else (10, 20, 40, 80)
    errors = [_fixed_steps(n, what) for n in ns]
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    np.testing.assert_allclose(rates, order, atol=0.25)


def _dense_error_from_exact(n: int, lam: float, hermite: bool) -> float:
    """Largest error of one step's dense output at x = 1/4, 1/2, 3/4, the step of
    size 1/n from the exact value at t = 0.5 of u' = -lam (u - sin t) + cos t
    (u = sin t there, to rounding): the interpolant's own error."""
    tab = ROSENBROCK_TABLEAUX[ALG]
    if hermite:
        tab = dataclasses.replace(tab, dense=None)
    consts = _implicit._rodas_constants(tab, F64, torch.device("cpu"), no_lift)

    def f(t, y):
        return -lam * (y - torch.sin(t)) + torch.cos(t)

    h = torch.tensor(1.0 / n, dtype=F64)
    t0 = torch.tensor(0.5, dtype=F64)
    y0 = torch.sin(t0).reshape(1)
    _, _, _, coeffs = _implicit._rodas_step(f, y0, f(t0, y0), t0, h, t0 + h, consts)
    return max(
        abs(float(interpolate(coeffs, t0, t0 + h, t0 + x * h)[0]) - math.sin(t))
        for x in (0.25, 0.5, 0.75)
        for t in [0.5 + x / n]
    )


@pytest.mark.parametrize(
    ("lam", "hermite", "order"),
    [(5.0, False, 4), (1e6, False, 3), (1e6, True, 2)],
)
def test_dense_output_has_its_order_at_mid_step(lam, hermite, order):
    # h = 1/10 ... 1/160 from the exact value. Measured log2 ratios: lam = 5
    # (nonstiff), RODAS's extension 3.74, 3.85, 3.92, 3.96 (local error O(h^4);
    # a cubic Hermite one too). lam = 1e6 (stiff, lam h >> 1): RODAS's 2.99,
    # 2.99, 3.00, 3.01, its order 3; cubic Hermite 2.37, 2.23, 2.13, 2.07,
    # errors 2.2 to 20 times larger: its f1 amplifies y1's error by lam h.
    errors = [_dense_error_from_exact(n, lam, hermite) for n in (10, 20, 40, 80, 160)]
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    np.testing.assert_allclose(rates[1:], order, atol=0.25)


def test_saves_between_steps_meet_a_tight_reference_on_van_der_pol():
    # VDPOL (mu = 1000) at rtol = atol = 1e-5, 201 saves on [0, 2] read off the
    # dense output (537 steps), against SciPy's Radau at rtol = atol = 1e-13.
    # Error relative to |u_ref| + 1e-3 max|u_ref|: measured 2.2e-4 (a cubic
    # Hermite dense output: 0.10, in the fast transitions). Allow 1e-3.
    from scipy.integrate import solve_ivp

    vdp = problems.van_der_pol(1000.0).prob
    ts = np.linspace(0.0, 2.0, 201)

    def rhs(t, u):
        return [u[1], ((1.0 - u[0] ** 2) * u[1] - u[0]) * 1e6]

    ref = solve_ivp(
        rhs, (0.0, 2.0), [2.0, 0.0], method="Radau", rtol=1e-13, atol=1e-13, t_eval=ts
    ).y.T
    prob = vdp.remake(u0=torch.tensor(vdp.u0), p=torch.tensor(vdp.p))
    sol = dk.solve(prob, ALG, rtol=1e-5, atol=1e-5, saveat=ts)
    scale = np.abs(ref) + 1e-3 * np.abs(ref).max(axis=0)
    assert float(np.max(np.abs(to_numpy(sol.u) - ref) / scale)) < 1e-3


def _rober(t1: float = 1e11) -> dk.ODEProblem:
    prob = problems.rober(1e11).prob.remake(tspan=(0.0, t1))
    return prob.remake(u0=torch.tensor(prob.u0), p=torch.tensor(prob.p))


@pytest.fixture(scope="module")
def rober_rtol_1e4() -> dict[str, dk.Solution]:
    """ROBER to 1e11 by both Rosenbrock methods at rtol=1e-4, atol=1e-14."""
    return {
        alg: dk.solve(_rober(), alg, rtol=1e-4, atol=1e-14, saveat=[1e11])
        for alg in ("rosenbrock23", ALG)
    }


def _rober_error(sol: dk.Solution) -> float:
    ref = problems.rober(1e11).reference
    assert ref is not None
    return float(np.max(np.abs(to_numpy(sol.u[-1]) - ref.u) / np.abs(ref.u)))


def test_rober_to_1e11_beats_rosenbrock23_at_the_same_tolerance(rober_rtol_1e4):
    # Measured: rodas4 161 steps, largest relative error 8.9e-6; rosenbrock23
    # 466 steps, 1.0e-3.
    ours, theirs = rober_rtol_1e4[ALG], rober_rtol_1e4["rosenbrock23"]
    assert ours.stats["naccept"] < theirs.stats["naccept"] / 2
    assert _rober_error(ours) < 1e-4 < _rober_error(theirs) / 5


def test_rober_to_1e11_meets_the_reference_at_a_tight_tolerance():
    # rtol=1e-6: 458 steps, largest relative error 1.3e-7 (measured; u[1] ~
    # 8e-14 is the hardest component). Allow 1e-6.
    sol = dk.solve(_rober(), ALG, rtol=1e-6, atol=1e-14, saveat=[1e11])
    assert sol.status == "success"
    assert _rober_error(sol) < 1e-6


def test_stats_count_jacobians_and_factorisations(rober_rtol_1e4):
    s = rober_rtol_1e4[ALG].stats
    attempts = s["naccept"] + s["nreject"]
    # One Jacobian and one LU per attempt; six f per attempt (stages 2-6 and
    # f(t1, y1)), plus f at t0 and one for the first step size.
    assert s["njev"] == s["nlu"] == attempts
    assert s["nfev"] == 2 + 6 * attempts


def test_prob_jac_replaces_automatic_differentiation():
    calls = []

    def jac(u, p, t):
        calls.append(t)
        return problems.rober_jac(u, p, t)

    prob = _rober(1.0)
    sol = dk.solve(prob.remake(jac=jac), ALG, rtol=1e-6, atol=1e-10)
    assert len(calls) == sol.stats["njev"] > 0
    ad = dk.solve(prob, ALG, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(to_numpy(sol.u), to_numpy(ad.u), rtol=1e-12)


def test_replay_reproduces_the_forward_states_bit_for_bit():
    req = build_request(
        _rober(1e-3), ALG, saveat=[0.0, 1e-4, 1e-3], rtol=1e-6, atol=1e-10
    )
    plan = _replay.make_plan(req)
    run, schedule = _replay.record(plan)
    replayer = _replay.Replayer(plan, schedule)
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        replayer.run(
            plan.setup.rhs(first=False), plan.setup.y0, 0, schedule.needed, out
        )
    replayed = torch.stack([plan.setup.y0, *(out[r] for r in range(1, len(out) + 1))])
    assert torch.equal(replayed, run.u)


# ---------------------------------------------------------------------------------
# Gradients: the linear problem's closed form, at rtol=1e-8 (73 steps).
# ---------------------------------------------------------------------------------

TS = np.linspace(0.0, 1.0, 3)
COTANGENT = np.cos(np.arange(6.0)).reshape(3, 2) + 0.5


@functools.cache
def linear_gradients(sensealg: str) -> tuple[np.ndarray, np.ndarray]:
    u0 = torch.tensor(LINEAR_U0, requires_grad=True)
    a = torch.tensor(LINEAR_A, requires_grad=True)
    sol = dk.solve(
        dk.ODEProblem(linear, u0, (0.0, 1.0), a),
        ALG,
        saveat=TS,
        rtol=1e-8,
        atol=1e-10,
        sensealg=SENSEALGS[sensealg],
    )
    (sol.u * torch.tensor(COTANGENT)).sum().backward()
    assert u0.grad is not None
    assert a.grad is not None
    return to_numpy(u0.grad), to_numpy(a.grad)


# ForwardMode pushes tangents through torch.func.jacrev at every step (~0.15 s
# a step here): tests_all runs it, the torch session skips it.
SENSEALG_PARAMS = [
    pytest.param(name, marks=[pytest.mark.slow] if name == "forward" else [])
    for name in SENSEALGS
]


@pytest.mark.parametrize("sensealg", SENSEALG_PARAMS)
def test_linear_gradients_match_closed_form(sensealg):
    du0, da = linear_gradients(sensealg)
    want_u0, want_a = linear_grads(TS, COTANGENT)
    # Measured errors at rtol=1e-8: at most 1.8e-9 (the interpolating adjoint
    # 3.5e-10). Allow 1e-7 (rosenbrock23 needs 1e-5 at this rtol).
    np.testing.assert_allclose(du0, want_u0, atol=1e-7)
    np.testing.assert_allclose(da, want_a, atol=1e-7)


@pytest.mark.parametrize(
    "sensealg", [pytest.param("forward", marks=pytest.mark.slow), "checkpointed"]
)
def test_discrete_methods_give_the_same_gradient(sensealg):
    # They differentiate the same discrete solution: equal to rounding.
    for ours, reverse in zip(
        linear_gradients(sensealg), linear_gradients("reverse"), strict=True
    ):
        np.testing.assert_allclose(ours, reverse, rtol=1e-11, atol=1e-14)


@pytest.mark.slow
def test_rober_onset_gradients_match_finite_differences():
    # dL/dp of ROBER over [0, 1e-3] (the fast transient) by the discrete and the
    # interpolating adjoints against central differences of dk.solve at
    # rtol=1e-10 (relative step 1e-4: truncation ~1e-8). Allow 1e-5 relative.
    saveat = [0.0, 1e-4, 3e-4, 1e-3]
    weights = np.array([1.0, 1e4, 1.0])
    prob = _rober(1e-3)
    p0 = to_numpy(prob.p)

    def loss(sol):
        return (sol.u[1:] * torch.as_tensor(weights)).sum()

    def value(p: np.ndarray) -> float:
        sol = dk.solve(
            prob.remake(p=torch.tensor(p)), ALG, saveat=saveat, rtol=1e-10, atol=1e-14
        )
        return float(loss(sol))

    fd = []
    for j in range(3):
        e = np.eye(3)[j] * 1e-4 * p0[j]
        fd.append((value(p0 + e) - value(p0 - e)) / (2 * e[j]))
    for sensealg in (dk.ReverseThroughSolver(), dk.InterpolatingAdjoint()):
        _, grads = dk.value_and_grad(
            loss, prob, ALG, saveat=saveat, rtol=1e-9, atol=1e-14, sensealg=sensealg
        )
        np.testing.assert_allclose(to_numpy(grads.p), fd, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    # ROBER over [0, 1] in float32 too: the constants follow the state's dtype.
    prob = _rober(1.0)
    prob = prob.remake(u0=prob.u0.to(dtype), p=prob.p.to(dtype))
    sol = dk.solve(prob, ALG, rtol=1e-4, atol=1e-8)
    assert sol.u.dtype == dtype
    # Mass is conserved (the rows of f sum to zero) up to the dtype's rounding.
    total = to_numpy(sol.u.sum(dim=-1)).astype(np.float64)
    eps = float(torch.finfo(dtype).eps)
    np.testing.assert_allclose(total, 1.0, atol=100 * eps)


@pytest.mark.slow
def test_interpolating_adjoint_over_rober_onset_and_decay_matches_discrete():
    # ROBER over [0, 1], the loss weighting u[1] by 1e4: the interpolating
    # adjoint reads the state off rodas4's dense output. Measured at
    # rtol=1e-6: dL/dp agree with ReverseThroughSolver's to 1.6e-7 relative,
    # dL/du0 to 6.8e-8 absolute (dL/du0[1:] ~ 3.5e-3). Allow 1e-5 for both.
    weights = torch.tensor([1.0, 1e4, 1.0], dtype=F64)

    def loss(sol):
        return (sol.u[1:] * weights).sum()

    kwargs = {"saveat": [0.0, 1.0], "rtol": 1e-6, "atol": 1e-10}
    prob = _rober(1.0)
    grads = [
        dk.value_and_grad(loss, prob, ALG, sensealg=s, **kwargs)[1]
        for s in (dk.ReverseThroughSolver(), dk.InterpolatingAdjoint())
    ]
    reverse, continuous = grads
    np.testing.assert_allclose(to_numpy(continuous.p), to_numpy(reverse.p), rtol=1e-5)
    np.testing.assert_allclose(
        to_numpy(continuous.u0), to_numpy(reverse.u0), rtol=1e-5, atol=1e-5
    )
