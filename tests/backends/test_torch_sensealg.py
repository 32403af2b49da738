"""The PyTorch backend's gradient methods (sensealg).

Tolerances: adaptive solves run at rtol=1e-10, atol=1e-12, where the error of the
computed solution -- and so of its derivative, which is that of the discrete
solution -- is a small multiple of rtol (measured: up to 1e-10 for dopri5 on
these problems); we allow 100 * rtol, as tests/backends/test_torch_solve.py does for
values. rk4 runs at dt0=0.01, global error ~ dt0**4; we allow 10 * dt0**4. The
three methods that differentiate the discrete solution with the steps held fixed
(ForwardMode, ReverseThroughSolver, CheckpointedAdjoint) compute one derivative
by different orders of floating-point operations: measured differences are below
1e-14 relative, and we allow 1e-12.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from conftest import DISCRETE, SENSEALGS
from problems import (
    LINEAR_A,
    LINEAR_U0,
    LOGISTIC_P,
    LOGISTIC_U0,
    linear,
    linear_grads,
    logistic,
    logistic_grads,
    to_numpy,
)

import diffeqkit as dk
from diffeqkit._solve import build_request
from diffeqkit._tableaux import get_tableau

torch = pytest.importorskip("torch")
pytest.importorskip("torchdiffeq")
from diffeqkit.backends.torch import _replay  # noqa: E402

pytestmark = pytest.mark.torch

TIGHT = {"rtol": 1e-10, "atol": 1e-12}
LOOSE = {"rtol": 1e-6, "atol": 1e-8}
ALG_KWARGS = {"tsit5": TIGHT, "dopri5": TIGHT, "rk4": {"dt0": 0.01}}
TS = np.linspace(0.0, 2.0, 5)


def allowed(alg: str) -> float:
    if alg == "rk4":
        return 10 * ALG_KWARGS["rk4"]["dt0"] ** 4
    return 100 * TIGHT["rtol"]


def cotangent(m: int) -> np.ndarray:
    """A cotangent with distinct rows, so that every save time counts."""
    return np.cos(np.arange(2 * m, dtype=np.float64)).reshape(m, 2) + 0.5


def linear_inputs(dtype=None, u0_grad=True, p_grad=True):
    dtype = dtype or torch.float64
    u0 = torch.tensor(LINEAR_U0, dtype=dtype, requires_grad=u0_grad)
    a = torch.tensor(LINEAR_A, dtype=dtype, requires_grad=p_grad)
    return u0, a


def linear_backward(sensealg, alg="tsit5", tspan=(0.0, 2.0), ts=TS, **kwargs):
    """``loss.backward()`` of L = sum(cotangent * sol.u): (du0, dA, sol)."""
    u0, a = linear_inputs()
    prob = dk.ODEProblem(linear, u0, tspan, a)
    sol = dk.solve(prob, alg, saveat=ts, sensealg=sensealg, **kwargs)
    cot = torch.tensor(cotangent(len(ts)))
    (sol.u * cot).sum().backward()
    return to_numpy(u0.grad), to_numpy(a.grad), sol


def max_rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- tables --------------------------------------------------------------------------


# --- against closed forms -------------------------------------------------------------


@pytest.mark.parametrize("alg", list(ALG_KWARGS))
@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_linear_gradients_match_closed_form(sensealg, alg):
    du0, da, _ = linear_backward(SENSEALGS[sensealg], alg, **ALG_KWARGS[alg])
    exact_u0, exact_a = linear_grads(TS, cotangent(len(TS)))
    assert np.abs(du0 - exact_u0).max() < allowed(alg)
    assert np.abs(da - exact_a).max() < allowed(alg)


@pytest.mark.parametrize("alg", list(ALG_KWARGS))
@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_logistic_dict_p_gradients_match_closed_form(sensealg, alg):
    ts = np.linspace(0.0, 4.0, 6)
    u0 = torch.tensor(LOGISTIC_U0, requires_grad=True)
    p = {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
        for k, v in LOGISTIC_P.items()
    }
    prob = dk.ODEProblem(logistic, u0, (0.0, 4.0), p)
    sol = dk.solve(
        prob, alg, saveat=ts, sensealg=SENSEALGS[sensealg], **ALG_KWARGS[alg]
    )
    cot = cotangent(len(ts))
    (sol.u * torch.tensor(cot)).sum().backward()
    exact_u0, exact_p = logistic_grads(ts, cot)
    # The logistic gradients are up to ~10 in size: relative to that.
    scale = max(abs(v) for v in exact_p.values())
    assert np.abs(to_numpy(u0.grad) - exact_u0).max() < allowed(alg) * scale
    for k in ("r", "K"):
        assert abs(float(p[k].grad) - exact_p[k]) < allowed(alg) * scale


# --- the derivative of the discrete solution ------------------------------------------


@pytest.mark.parametrize("alg", ["tsit5", "dopri8", "rk4"])
@pytest.mark.parametrize("sensealg", ["forward", "checkpointed"])
def test_same_discrete_derivative_as_reverse_through_solver(sensealg, alg):
    # Loose tolerances and no dt0: few steps, the automatic first step, rejected
    # steps; the derivative is the same whatever the accuracy.
    kw = {"dt0": 0.05} if alg == "rk4" else {"rtol": 1e-5, "atol": 1e-7}
    ref_u0, ref_a, ref = linear_backward(dk.ReverseThroughSolver(), alg, **kw)
    du0, da, sol = linear_backward(SENSEALGS[sensealg], alg, **kw)
    assert sol.stats == ref.stats
    assert max_rel(du0, ref_u0) < 1e-12
    assert max_rel(da, ref_a) < 1e-12


def test_no_gradient_through_the_automatic_first_step():
    # torchdiffeq's initial step selection is differentiable in u0 and p, and
    # every later time inherits it (measured: a 5e-9 change in the gradient
    # here). Held fixed, the gradient is that of the steps alone: the one
    # CheckpointedAdjoint computes by construction.
    kw = {"rtol": 1e-6, "atol": 1e-8}
    ref_u0, ref_a, _ = linear_backward(dk.CheckpointedAdjoint(), **kw)
    du0, da, _ = linear_backward(dk.ReverseThroughSolver(), **kw)
    assert max_rel(du0, ref_u0) < 1e-12
    assert max_rel(da, ref_a) < 1e-12


def _complex_step(replay, a: np.ndarray, u0: np.ndarray, cot: np.ndarray):
    """dL/du0 and dL/dA of L = sum(cot * replay(A, u0)), by complex step: the
    replay is a polynomial in A and u0, so this is exact to rounding."""
    h = 1e-30

    def d(a, u0):
        return np.sum(cot * replay(a, u0).imag) / h

    du0 = np.array([d(a, u0 + 1j * h * e) for e in np.eye(2)])
    da = np.array([[d(a + 1j * h * e, u0) for e in row] for row in _units((2, 2))])
    return du0, da


def _units(shape):
    """The unit matrices E_ij, as rows of a nested list."""
    eye = np.eye(math.prod(shape)).reshape(-1, *shape)
    return [list(eye[i * shape[1] : (i + 1) * shape[1]]) for i in range(shape[0])]


def _rk_linear(tab, a, u, dt):
    """One Runge-Kutta step of u' = A u: the new state and the stages K."""
    ks = []
    for i in range(tab.n_stages):
        ks.append(a @ (u + dt * sum(tab.a[i, j] * ks[j] for j in range(i))))
    u1 = u + dt * sum(b * k for b, k in zip(tab.b, ks, strict=True))
    return u1, [*ks, a @ u1]


@pytest.mark.parametrize("sensealg", DISCRETE)
def test_fixed_step_gradient_is_the_derivative_of_the_recursion(sensealg):
    # u_{n+1} = u_n + h sum b_i K_i replayed in NumPy on the step grid, and
    # differentiated exactly (complex step): the closed-form derivative of the
    # discrete map.
    dt0 = 0.05
    grid = np.linspace(0.0, 2.0, 41)  # the step grid: every save time on it
    tab = get_tableau("rk4")

    def replay(a, u0):
        u, rows = u0, {0.0: u0}
        for t0, t1 in itertools.pairwise(grid):
            u, _ = _rk_linear(tab, a, u, t1 - t0)
            rows[float(t1)] = u
        return np.stack([rows[float(t)] for t in TS])

    exact_u0, exact_a = _complex_step(
        replay, LINEAR_A.astype(complex), LINEAR_U0.astype(complex), cotangent(5)
    )
    du0, da, _ = linear_backward(SENSEALGS[sensealg], "rk4", dt0=dt0)
    assert max_rel(du0, exact_u0) < 1e-12
    assert max_rel(da, exact_a) < 1e-12


@pytest.mark.parametrize("sensealg", DISCRETE)
def test_adaptive_gradient_is_the_derivative_of_the_recorded_steps(sensealg):
    # The recorded steps (start, size, end) and which save time was read off
    # which step, replayed in NumPy with the shared tableau and its dense output,
    # and differentiated exactly (complex step).
    kw = {"rtol": 1e-5, "atol": 1e-7}
    ts = np.array([0.0, 0.3, 0.7, 1.1, 2.0])
    prob = dk.ODEProblem(linear, torch.tensor(LINEAR_U0), (0.0, 2.0), LINEAR_A)
    req = build_request(prob, "tsit5", saveat=ts, **kw)
    plan = _replay.make_plan(req)
    _, schedule = _replay.record(plan)
    steps = to_numpy(schedule.steps)
    times = to_numpy(schedule.times)
    tab = get_tableau("tsit5")

    def replay(a, u0):
        u, rows = u0, {0: u0}
        for n, (t0, dt, t1) in enumerate(steps.T):
            u1, ks = _rk_linear(tab, a, u, dt)
            coeffs = dt * np.stack(ks, axis=1) @ tab.p  # (2, q)
            for row in schedule.reads[n]:
                x = (times[row] - t0) / (t1 - t0)
                rows[row] = u + coeffs @ x ** np.arange(1, coeffs.shape[1] + 1)
            u = u1
        return np.stack([rows[i] for i in range(len(ts))])

    exact_u0, exact_a = _complex_step(
        replay, LINEAR_A.astype(complex), LINEAR_U0.astype(complex), cotangent(5)
    )
    du0, da, _ = linear_backward(SENSEALGS[sensealg], ts=ts, **kw)
    assert max_rel(du0, exact_u0) < 1e-12
    assert max_rel(da, exact_a) < 1e-12


@pytest.mark.parametrize("checkpoints", [1, 2, 7, None])
@pytest.mark.parametrize("alg", ["tsit5", "rk4"])
def test_checkpoints_do_not_change_the_gradient(alg, checkpoints):
    kw = {"dt0": 0.05} if alg == "rk4" else {"rtol": 1e-6, "atol": 1e-8}
    ref_u0, ref_a, _ = linear_backward(dk.ReverseThroughSolver(), alg, **kw)
    sensealg = dk.CheckpointedAdjoint(checkpoints=checkpoints)
    du0, da, _ = linear_backward(sensealg, alg, **kw)
    assert max_rel(du0, ref_u0) < 1e-12
    assert max_rel(da, ref_a) < 1e-12


@pytest.mark.parametrize("alg", ["tsit5", "dopri8"])
@pytest.mark.parametrize(
    ("t1", "rtol", "long"), [(1.0, 1e-4, False), (8.0, 1e-10, True)]
)
def test_kept_steps_and_replayed_tail_give_the_same_gradient(alg, t1, rtol, long):
    # checkpoints=None keeps the graph of the first KEEP_STEPS steps and replays
    # only the rest: a short solve replays nothing, a long one (over [0, 8] at
    # rtol=1e-10) replays its tail. Both differentiate the discrete solution, as
    # ReverseThroughSolver does.
    from diffeqkit.backends.torch import _checkpoint

    kw = {"rtol": rtol, "atol": rtol * 1e-2, "tspan": (0.0, t1)}
    ts = np.linspace(0.0, t1, 9)
    ref_u0, ref_a, ref = linear_backward(dk.ReverseThroughSolver(), alg, ts=ts, **kw)
    calls = {"backward": 0}
    original = _checkpoint.Replayer.run

    def counted(self, *args, **kwargs):
        calls["backward"] += 1
        return original(self, *args, **kwargs)

    _checkpoint.Replayer.run = counted
    try:
        du0, da, sol = linear_backward(dk.CheckpointedAdjoint(), alg, ts=ts, **kw)
    finally:
        _checkpoint.Replayer.run = original
    assert sol.stats == ref.stats
    assert (sol.stats["naccept"] > _checkpoint.KEEP_STEPS) == long
    assert (calls["backward"] > 0) == long
    assert max_rel(du0, ref_u0) < 1e-12
    assert max_rel(da, ref_a) < 1e-12


def test_kept_graph_allows_a_second_pullback():
    # dk.vjp's pullback may be called twice; the kept graph is retained.
    prob = dk.ODEProblem(linear, torch.tensor(LINEAR_U0), (0.0, 2.0), LINEAR_A)
    _, pull = dk.vjp(prob, "tsit5", saveat=TS, sensealg=dk.CheckpointedAdjoint())
    first = pull(cotangent(len(TS)))
    second = pull(cotangent(len(TS)))
    assert torch.equal(first.u0, second.u0)
    assert torch.equal(first.p, second.p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alg", ["tsit5", "dopri8", "rk4"])
def test_replay_reproduces_the_forward_states_bit_for_bit(alg, dtype):
    # The replay (what CheckpointedAdjoint differentiates and ForwardMode pushes
    # tangents through) repeats the recorded steps with the same operations.
    prob = dk.ODEProblem(
        linear,
        torch.tensor(LINEAR_U0, dtype=dtype),
        (0.0, 2.0),
        torch.tensor(LINEAR_A, dtype=dtype),
    )
    kw = {"dt0": 0.05} if alg == "rk4" else {"rtol": 1e-6, "atol": 1e-8}
    req = build_request(prob, alg, saveat=np.linspace(0.0, 2.0, 9), **kw)
    plan = _replay.make_plan(req)
    run, schedule = _replay.record(plan, keep=True, checkpoints=3)
    replayer = _replay.Replayer(plan, schedule)
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for start, stop in schedule.segments():
            y = replayer.run(
                plan.setup.rhs(first=False), schedule.states[start], start, stop, out
            )
            if stop in schedule.states:
                assert torch.equal(y, schedule.states[stop])
    assert len(out) == run.u.shape[0] - 1
    for row, value in out.items():
        assert torch.equal(value, run.u[row])


def _fake_steps(recorder, n):
    for i in range(n):
        recorder.step(
            torch.tensor(float(i)), torch.tensor([float(i)]), torch.tensor(1.0)
        )


@pytest.mark.parametrize("n", [1, 5, 100, 1000, 10_000])
@pytest.mark.parametrize("checkpoints", [1, 7, 64])
def test_recorder_keeps_at_most_k_evenly_spaced_checkpoints(checkpoints, n):
    # An adaptive solve does not know its number of steps: at most K kept, at
    # least K/2 once there are K steps, every s-th step's start.
    recorder = _replay.Recorder(keep=True, checkpoints=checkpoints)
    _fake_steps(recorder, n)
    kept = sorted(recorder.states)
    assert kept[0] == 0
    assert len(kept) <= checkpoints
    assert len(kept) >= min(n, checkpoints // 2, math.ceil(n / recorder.stride))
    assert all(i % recorder.stride == 0 for i in kept)
    assert all(float(recorder.states[i][0]) == i for i in kept)


@pytest.mark.parametrize("n", [100, 1000, 10_000])
def test_recorder_default_keeps_about_sqrt_n(n):
    recorder = _replay.Recorder(keep=True)
    _fake_steps(recorder, n)
    root = math.sqrt(n)
    # Both the stride and the number kept stay within a factor 2 of sqrt(n).
    assert root / 2 <= recorder.stride <= 2 * root
    assert root / 2 <= len(recorder.states) <= 2 * root + 1


@pytest.mark.parametrize("checkpoints", [3, None])
def test_fixed_step_knows_its_steps_and_cuts_exact_segments(checkpoints):
    prob = dk.ODEProblem(linear, torch.tensor(LINEAR_U0), (0.0, 2.0), LINEAR_A)
    req = build_request(prob, "rk4", dt0=0.01)  # 200 steps
    _, schedule = _replay.record(
        _replay.make_plan(req), keep=True, checkpoints=checkpoints
    )
    expected = checkpoints or math.ceil(math.sqrt(200))
    assert len(schedule.segments()) == expected


# --- memory ---------------------------------------------------------------------------


class _SavedBytes:
    """Bytes that autograd holds for the backward pass, live and peak: each saved
    tensor counted by its own size, once however often it is saved."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self.refs: dict[int, list[int]] = {}

    def pack(self, t):
        key = t.data_ptr()
        entry = self.refs.setdefault(key, [0, t.numel() * t.element_size()])
        if entry[0] == 0:
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        return _Held(t, key, self)

    @staticmethod
    def unpack(held):
        return held.t


class _Held:
    __slots__ = ("key", "meter", "t")

    def __init__(self, t, key, meter):
        self.t, self.key, self.meter = t, key, meter

    def __del__(self):
        entry = self.meter.refs[self.key]
        entry[0] -= 1
        if entry[0] == 0:
            self.meter.live -= entry[1]
            del self.meter.refs[self.key]


def _peak_saved_bytes(sensealg, nsteps):
    # 16 copies of the linear system: a 32-element state, as a small network's.
    u0 = torch.tensor(np.tile(LINEAR_U0, 16), requires_grad=True)
    a = torch.tensor(np.kron(np.eye(16), LINEAR_A), requires_grad=True)
    prob = dk.ODEProblem(linear, u0, (0.0, 1.0), a)
    meter = _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        sol = dk.solve(prob, "euler", dt0=1.0 / nsteps, sensealg=sensealg)
        sol.u[-1].sum().backward()
    return meter.peak


def test_checkpointed_memory_stays_bounded():
    # 4096 Euler steps: reverse-through-solver holds every step's tensors at once;
    # the checkpointed reverse pass one segment's (64 steps for None, 512 for 8).
    n = 4096
    full = _peak_saved_bytes(dk.ReverseThroughSolver(), n)
    sqrt_segments = _peak_saved_bytes(dk.CheckpointedAdjoint(), n)
    eight_segments = _peak_saved_bytes(dk.CheckpointedAdjoint(checkpoints=8), n)
    # Ideally 64x and 8x less; allow a factor 2 for what every step or segment
    # holds besides its states (step sizes, the matrix).
    assert sqrt_segments < full / 32
    assert eight_segments < full / 4
    assert eight_segments > 4 * sqrt_segments


def test_checkpointed_memory_stays_bounded_with_kept_steps():
    # An adaptive solve of ~150 steps: with checkpoints=None the forward pass
    # keeps KEEP_STEPS steps' graph and the backward one replays ~sqrt(n)-step
    # segments: far less than every step's graph.
    u0 = torch.tensor(np.tile(LINEAR_U0, 4), requires_grad=True)
    a = torch.tensor(np.kron(np.eye(4), LINEAR_A), requires_grad=True)
    prob = dk.ODEProblem(linear, u0, (0.0, 20.0), a)

    def peak(sensealg):
        meter = _SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            sol = dk.solve(prob, "tsit5", sensealg=sensealg, rtol=1e-8, atol=1e-10)
            sol.u[-1].sum().backward()
        return meter.peak, sol.stats["naccept"]

    full, n = peak(dk.ReverseThroughSolver())
    kept, _ = peak(dk.CheckpointedAdjoint())
    assert n > 100, n
    assert kept < full / 3, (kept, full)


# --- paths, inputs, dtypes ------------------------------------------------------------


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_backward_and_vjp_and_value_and_grad_agree(sensealg):
    # The same computation three ways: the gradients are identical, bit for bit
    # (whatever the tolerances; loose ones keep this fast).
    s = SENSEALGS[sensealg]
    du0, da, sol = linear_backward(s, **LOOSE)
    prob = dk.ODEProblem(linear, torch.tensor(LINEAR_U0), (0.0, 2.0), LINEAR_A)
    vsol, pullback = dk.vjp(prob, "tsit5", saveat=TS, sensealg=s, **LOOSE)
    grads = pullback(cotangent(len(TS)))
    assert not vsol.u.requires_grad
    assert vsol.sensealg == s
    assert torch.equal(vsol.u, sol.u.detach())
    assert np.array_equal(to_numpy(grads.u0), du0)
    assert np.array_equal(to_numpy(grads.p), da)
    # Called again (several rows of a Jacobian, say), the same answer.
    again = pullback(torch.tensor(cotangent(len(TS))))
    assert torch.equal(again.u0, grads.u0)

    cot = torch.tensor(cotangent(len(TS)))

    def loss(sol):
        xp = dk.array_namespace(sol.u)
        return xp.sum(sol.u * cot)

    value, vg = dk.value_and_grad(loss, prob, "tsit5", saveat=TS, sensealg=s, **LOOSE)
    assert float(value) == pytest.approx(float((sol.u.detach() * cot).sum()), rel=1e-15)
    assert np.array_equal(to_numpy(vg.u0), du0)
    assert np.array_equal(to_numpy(vg.p), da)


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_differentiable_solution_equals_the_plain_one(sensealg):
    u0, a = linear_inputs(u0_grad=False, p_grad=False)
    plain = dk.solve(dk.ODEProblem(linear, u0, (0.0, 2.0), a), "tsit5", saveat=TS)
    _, _, sol = linear_backward(SENSEALGS[sensealg])
    assert torch.equal(sol.u.detach(), plain.u)
    assert sol.stats == plain.stats
    assert sol.sensealg == SENSEALGS[sensealg]


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_plain_solve_without_requires_grad_records_nothing(sensealg):
    u0, a = linear_inputs(u0_grad=False, p_grad=False)
    prob = dk.ODEProblem(linear, u0, (0.0, 2.0), a)
    sol = dk.solve(prob, "tsit5", sensealg=SENSEALGS[sensealg])
    assert not sol.u.requires_grad
    assert sol.u.grad_fn is None
    # Nor under no_grad, whatever requires grad.
    u0, a = linear_inputs()
    with torch.no_grad():
        sol = dk.solve(dk.ODEProblem(linear, u0, (0.0, 2.0), a), "tsit5")
    assert sol.u.grad_fn is None


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_float32_inputs_get_float32_gradients(sensealg):
    u0, a = linear_inputs(dtype=torch.float32)
    prob = dk.ODEProblem(linear, u0, (0.0, 2.0), a)
    sol = dk.solve(
        prob, "tsit5", saveat=TS, sensealg=SENSEALGS[sensealg], rtol=1e-5, atol=1e-7
    )
    assert sol.u.dtype == torch.float32
    (sol.u * torch.tensor(cotangent(len(TS)), dtype=torch.float32)).sum().backward()
    assert u0.grad.dtype == torch.float32
    assert a.grad.dtype == torch.float32
    exact_u0, exact_a = linear_grads(TS, cotangent(len(TS)))
    # float32: rounding (~1e-7 per step over ~30 steps) and rtol=1e-5 dominate.
    assert np.abs(to_numpy(u0.grad) - exact_u0).max() < 1e-4
    assert np.abs(to_numpy(a.grad) - exact_a).max() < 1e-4


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_float64_solve_of_float32_u0_gives_its_gradient_in_float32(sensealg):
    u0 = torch.tensor(LINEAR_U0, dtype=torch.float32, requires_grad=True)
    prob = dk.ODEProblem(linear, u0, (0.0, 2.0), torch.tensor(LINEAR_A))
    sol = dk.solve(prob, "tsit5", sensealg=SENSEALGS[sensealg], dtype="float64")
    assert sol.u.dtype == torch.float64
    sol.u[-1].sum().backward()
    assert u0.grad.dtype == torch.float32


@pytest.mark.parametrize("which", ["u0", "p"])
@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_only_one_input_requires_grad(sensealg, which):
    u0, a = linear_inputs(u0_grad=which == "u0", p_grad=which == "p")
    prob = dk.ODEProblem(linear, u0, (0.0, 2.0), a)
    sol = dk.solve(prob, "tsit5", saveat=TS, sensealg=SENSEALGS[sensealg], **TIGHT)
    (sol.u * torch.tensor(cotangent(len(TS)))).sum().backward()
    exact_u0, exact_a = linear_grads(TS, cotangent(len(TS)))
    if which == "u0":
        assert a.grad is None
        assert np.abs(to_numpy(u0.grad) - exact_u0).max() < allowed("tsit5")
    else:
        assert u0.grad is None
        assert np.abs(to_numpy(a.grad) - exact_a).max() < allowed("tsit5")


def scaled_linear(u, p, t):
    # A_eff = s * A: nested dict and list leaves, a Python float, an integer.
    return p["m"]["A"] @ u * (p["s"][0] * p["s"][2]) + 0.0 * p["c"]


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_pytree_p_gradients_keep_the_structure(sensealg):
    # p = {"m": {"A": A/2}, "s": [2.0, None, 1 (int)], "c": 0.5}: A_eff = LINEAR_A,
    # so dL/dA = 2 dL/dA_eff and dL/ds = sum(A/2 * dL/dA_eff).
    p = {"m": {"A": LINEAR_A / 2}, "s": [2.0, None, np.array(1)], "c": 0.5}
    prob = dk.ODEProblem(scaled_linear, LINEAR_U0, (0.0, 2.0), p)
    _, pullback = dk.vjp(
        prob,
        "tsit5",
        backend="torch",
        saveat=TS,
        sensealg=SENSEALGS[sensealg],
        **TIGHT,
    )
    grads = pullback(cotangent(len(TS)))
    exact_u0, exact_a = linear_grads(TS, cotangent(len(TS)))
    assert set(grads.p) == {"m", "s", "c"}
    assert np.abs(to_numpy(grads.u0) - exact_u0).max() < allowed("tsit5")
    assert np.abs(to_numpy(grads.p["m"]["A"]) - 2 * exact_a).max() < 2 * allowed(
        "tsit5"
    )
    ds = float((LINEAR_A / 2 * exact_a).sum())
    assert grads.p["s"][0].shape == ()  # a Python float gets a 0-d tensor
    assert float(grads.p["s"][0]) == pytest.approx(ds, abs=allowed("tsit5"))
    assert grads.p["s"][1] is None  # None stays None
    assert grads.p["s"][2] is None  # integers are not differentiable
    assert float(grads.p["c"]) == 0.0  # used, with derivative zero


# --- ContinuousAdjoint ----------------------------------------------------------------


def test_continuous_adjoint_reports_the_forward_stats():
    u0, a = linear_inputs()
    prob = dk.ODEProblem(linear, u0, (0.0, 2.0), a)
    plain = dk.solve(prob, "tsit5", sensealg=dk.ContinuousAdjoint())
    with torch.no_grad():
        reference = dk.solve(prob, "tsit5")
    assert plain.stats == reference.stats
    stats = dict(plain.stats)
    plain.u.sum().backward()  # the backward solve counts nothing here
    assert plain.stats == stats


def test_continuous_adjoint_tolerances_set_the_backward_solve():
    # A loose backward solve (rtol=1e-4) is far less accurate than one at the
    # forward tolerances (1e-10): the option reaches odeint_adjoint.
    exact_u0, exact_a = linear_grads(TS, cotangent(len(TS)))
    errors = []
    for sensealg in (
        dk.ContinuousAdjoint(rtol=1e-4, atol=1e-6),
        dk.ContinuousAdjoint(),
    ):
        du0, da, _ = linear_backward(sensealg, **TIGHT)
        errors.append(max(np.abs(du0 - exact_u0).max(), np.abs(da - exact_a).max()))
    loose, tight = errors
    assert loose > 1e3 * tight


@pytest.mark.parametrize(
    ("tspan", "where"),
    [((0.0, 2.0), r"t=1\.\d+ of tspan=\(2\.0, 0\.0\)"), ((2.0, 0.0), r"t=0\.\d+")],
    ids=["forward", "backward"],
)
def test_continuous_adjoint_backward_solve_failure_raises_solve_error(tspan, where):
    # The backward solve at rtol=1e-12 needs far more than the 30 steps (per
    # interval) that the forward one at 1e-4 gets by with.
    u0, a = linear_inputs()
    prob = dk.ODEProblem(linear, u0, tspan, a)
    kw = {"rtol": 1e-4, "atol": 1e-6, "max_steps": 30}
    sensealg = dk.ContinuousAdjoint(rtol=1e-12, atol=1e-14)
    sol = dk.solve(prob, "tsit5", sensealg=sensealg, **kw)
    match = rf"the backward solve of sensealg=dk\.ContinuousAdjoint.*{where}.*"
    match += r"max_steps_reached.*dk\.CheckpointedAdjoint\(\)"
    with pytest.raises(dk.SolveError, match=match):
        sol.u.sum().backward()
    _, pullback = dk.vjp(prob, "tsit5", sensealg=sensealg, **kw)
    with pytest.raises(dk.SolveError, match=match):
        pullback(np.ones((2, 2)))


def blow_up(u, p, t):
    return p * u**2  # u(t) = u0 / (1 - p u0 t): a singularity at t = 1


@pytest.mark.parametrize("sensealg", DISCRETE)
def test_failed_solve_differentiates_the_rows_reached(sensealg):
    # u(0.5) = 1 / (1 - 0.5 p) with p = u0 = 1: du/du0 = 4, du/dp = 2 at t = 0.5.
    p = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    prob = dk.ODEProblem(blow_up, u0, (0.0, 2.0), p)
    sol = dk.solve(
        prob,
        "tsit5",
        saveat=[0.0, 0.5, 1.5, 2.0],
        sensealg=SENSEALGS[sensealg],
        throw=False,
        rtol=1e-8,
        atol=1e-10,
    )
    assert not sol.success
    sol.u[1].sum().backward()
    # At rtol=1e-8 the derivative of the computed solution is within 1e-6 here
    # (measured 2e-7: the sensitivities grow 4x by t = 0.5).
    assert float(u0.grad[0]) == pytest.approx(4.0, rel=1e-6)
    assert float(p.grad) == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("alg", ["tsit5", "euler"])
def test_continuous_adjoint_failed_solve_returns_the_partial_solution(alg):
    p = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    u0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    prob = dk.ODEProblem(blow_up, u0, (0.0, 3.0), p)
    kw = {"saveat": np.linspace(0.0, 3.0, 7), "dt0": 0.1, "rtol": 1e-4, "atol": 1e-6}
    sol = dk.solve(prob, alg, sensealg=dk.ContinuousAdjoint(), throw=False, **kw)
    assert sol.status in ("nonfinite", "step_size_too_small")
    assert not sol.u.requires_grad  # no gradient for a failed backsolve
    with pytest.raises(dk.SolveError, match="stopped at t="):
        dk.solve(prob, alg, sensealg=dk.ContinuousAdjoint(), **kw)
    _, pullback = dk.vjp(prob, alg, sensealg=dk.ContinuousAdjoint(), throw=False, **kw)
    # dk.vjp: a failed solve has no derivative (NaN, as on every backend).
    assert torch.isnan(pullback(np.ones((7, 1))).u0).all()


# --- ForwardMode ----------------------------------------------------------------------


def noisy_linear(u, p, t):
    # A random op (times zero: f stays deterministic) that vmap refuses in its
    # default randomness="error" mode.
    return p @ u + 0.0 * torch.rand((), dtype=u.dtype)


def test_forward_mode_falls_back_to_one_tangent_at_a_time():
    u0, a = linear_inputs()
    prob = dk.ODEProblem(noisy_linear, u0, (0.0, 2.0), a)
    sol = dk.solve(prob, "tsit5", saveat=TS, sensealg=dk.ForwardMode(), **LOOSE)
    (sol.u * torch.tensor(cotangent(len(TS)))).sum().backward()
    ref_u0, ref_a, _ = linear_backward(dk.ReverseThroughSolver(), **LOOSE)
    assert max_rel(to_numpy(u0.grad), ref_u0) < 1e-12
    assert max_rel(to_numpy(a.grad), ref_a) < 1e-12


class _NoForwardAD(torch.autograd.Function):
    """An op with a reverse-mode derivative only (old-style autograd.Function)."""

    @staticmethod
    def forward(ctx, x):
        return 2.0 * x

    @staticmethod
    def backward(ctx, g):
        return 2.0 * g


def test_forward_mode_without_forward_ad_of_f_is_unsupported():
    u0, a = linear_inputs()
    prob = dk.ODEProblem(lambda u, p, t: _NoForwardAD.apply(p @ u), u0, (0.0, 1.0), a)
    with pytest.raises(
        dk.UnsupportedError, match=r"forward-mode AD.*dk\.ReverseThroughSolver\(\)"
    ):
        dk.solve(prob, "tsit5", sensealg=dk.ForwardMode())


# --- options of other backends --------------------------------------------------------


@pytest.mark.parametrize(
    ("sensealg", "match"),
    [
        (
            dk.ForwardMode(autodiff="jax"),
            r"ForwardMode\(autodiff='jax'\) has no effect",
        ),
        (dk.ContinuousAdjoint(autodiff="jac"), r"autodiff='jac'\) has no effect"),
        (dk.CheckpointedAdjoint(autodiff="jax"), r"Leave autodiff=None"),
        (dk.CheckpointedAdjoint(rtol=1e-8), r"rtol=1e-08\) has no effect"),
        (dk.CheckpointedAdjoint(atol=1e-8), r"atol=1e-08\) has no effect.*scipy"),
    ],
)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "plain"])
def test_options_of_other_backends_are_invalid(sensealg, match, grad):
    # The core refuses them (from the registry's data) before the backend runs.
    u0, a = linear_inputs(u0_grad=grad, p_grad=grad)
    prob = dk.ODEProblem(linear, u0, (0.0, 1.0), a)
    with pytest.raises(dk.InvalidProblemError, match=match):
        dk.solve(prob, "tsit5", sensealg=sensealg)


@pytest.mark.parametrize("sensealg", [dk.ForwardMode(autodiff="torch")])
def test_autodiff_torch_is_accepted(sensealg):
    u0, a = linear_inputs()
    sol = dk.solve(dk.ODEProblem(linear, u0, (0.0, 1.0), a), "tsit5", sensealg=sensealg)
    sol.u[-1].sum().backward()
    assert u0.grad is not None


# --- device ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_gradients_on_cuda(sensealg):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    u0 = torch.tensor(LINEAR_U0, device="cuda", requires_grad=True)
    a = torch.tensor(LINEAR_A, device="cuda", requires_grad=True)
    prob = dk.ODEProblem(linear, u0, (0.0, 2.0), a)
    sol = dk.solve(prob, "tsit5", saveat=TS, sensealg=SENSEALGS[sensealg], **TIGHT)
    (sol.u * torch.tensor(cotangent(len(TS)), device="cuda")).sum().backward()
    assert u0.grad.device.type == "cuda"
    assert a.grad.device.type == "cuda"
    exact_u0, exact_a = linear_grads(TS, cotangent(len(TS)))
    assert np.abs(to_numpy(u0.grad) - exact_u0).max() < allowed("tsit5")
    assert np.abs(to_numpy(a.grad) - exact_a).max() < allowed("tsit5")


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_p_that_also_computes_u0_is_counted_once(sensealg):
    # u0 = (0, 3e) and f = (e u1, 0) on [0.5, 1]: u(1) = (1.5 e^2, 3e), so
    # d(u0(1) + u1(1))/de = 3e + 3 (the kept graph of CheckpointedAdjoint once
    # reached e through u0 as well and gave twice the u0 term).
    e = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    u0 = torch.stack([torch.zeros((), dtype=torch.float64), 3 * e])

    def f(u, p, t):
        return torch.stack([p * u[1], 0.0 * u[0]])

    prob = dk.ODEProblem(f, u0, (0.5, 1.0), e)
    sol = dk.solve(prob, "tsit5", sensealg=SENSEALGS[sensealg], rtol=1e-10, atol=1e-12)
    (sol.u[-1, 0] + sol.u[-1, 1]).backward()
    assert e.grad is not None
    assert float(e.grad) == pytest.approx(3 * 0.5 + 3, rel=1e-8)
