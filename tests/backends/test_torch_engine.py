"""The compiled torch engine (`diffeqkit.backends.torch._engine`) against the
eager reference drivers and torchdiffeq.

Compiling costs seconds per graph, so these tests share one small problem
(Lotka-Volterra, float64) and blocks of 2 steps; each kind of block (adaptive,
replay, fixed) compiles once for the module, and the tests count the traces to
check that new u0, p, tspan, save times and tolerances never recompile.

Tolerances: the engine takes the same steps as the reference driver; its fused
arithmetic differs from eager torch's in the last bits, so values and gradients
differ by rounding, measured below 1e-12 relative; we allow 1e-10.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import diffeqkit as dk

torch = pytest.importorskip("torch")
torchdiffeq = pytest.importorskip("torchdiffeq")
import diffeqkit.torch as dkt  # noqa: E402
from diffeqkit.backends.torch import _engine, _policy  # noqa: E402

pytestmark = pytest.mark.torch

SAVES = [0.0, 0.5, 1.25, 2.0]


def lotka_volterra(u, p, t):
    x, y = u[0], u[1]
    return torch.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y])


@pytest.fixture(scope="module", autouse=True)
def small_blocks():
    """Blocks of 2 steps (cheaper to compile); the engine variable unset (the
    suite sets it to eager, tests/conftest.py): each test chooses its engine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_engine, "BLOCK", 2)
        mp.delenv(_engine.ENV, raising=False)
        yield


def solve(mode, u0=(1.0, 1.0), p=(1.5, 1.0, 3.0, 1.0), tspan=(0.0, 2.0), **kw):
    """dk.solve on torch with the engine `mode`, tensors requiring grad when
    ``sensealg`` is given; returns the solution and the inputs."""
    grad = "sensealg" in kw
    u0 = torch.tensor(u0, dtype=torch.float64, requires_grad=grad)
    p = torch.tensor(p, dtype=torch.float64, requires_grad=grad)
    prob = dk.ODEProblem(lotka_volterra, u0, tspan, p)
    kw = {"saveat": SAVES, "rtol": 1e-8, "atol": 1e-10, **kw}
    old = os.environ.get(_engine.ENV)
    os.environ[_engine.ENV] = mode
    try:
        return dk.solve(prob, kw.pop("alg", "dopri5"), backend="torch", **kw), u0, p
    finally:
        if old is None:
            del os.environ[_engine.ENV]
        else:
            os.environ[_engine.ENV] = old


def close(a, b, rel=1e-10):
    a, b = np.asarray(a.detach()), np.asarray(b.detach())
    np.testing.assert_allclose(a, b, rtol=rel, atol=rel * np.abs(b).max())


def test_eager_runs_the_reference_driver():
    sol, _, _ = solve("eager")
    assert "compile_s" not in sol.stats
    assert sol.stats["engine"] == "eager"


def test_plain_solve_equals_reference_and_never_recompiles():
    ref, _, _ = solve("eager")
    sol, _, _ = solve("compiled")
    close(sol.u, ref.u)
    for key in ("nfev", "naccept", "nreject"):
        assert sol.stats[key] == ref.stats[key], key
    traces = dict(_engine.TRACES)
    # New u0, p, tspan, save times and tolerances: the same compiled code.
    other = {
        "u0": (0.8, 1.3),
        "p": (1.2, 0.9, 2.5, 1.1),
        "tspan": (0.5, 3.0),
        "saveat": [0.5, 0.7, 3.0],
        "rtol": 1e-6,
        "atol": 1e-9,
    }
    ref2, _, _ = solve("eager", **other)
    sol2, _, _ = solve("compiled", **other)
    close(sol2.u, ref2.u)
    assert sol2.stats["naccept"] == ref2.stats["naccept"]
    assert traces == _engine.TRACES
    assert sol2.stats["compile_s"] == 0.0


def test_plain_solve_matches_torchdiffeq():
    """torchdiffeq's dopri5 (landing on t1): the same solution within its error
    (100 rtol) at a similar cost. Not the same steps: torchdiffeq's dopri5
    estimates its error with another embedded formula than the shared tableau
    (SciPy's RK45), 248 evaluations of f against 266; with the shared tableau on
    torchdiffeq's solver class the eager driver takes its steps bit for bit
    (test_torch_solve.py::test_eager_driver_takes_torchdiffeqs_steps), and the
    engine the eager driver's (above). Values between steps differ by the
    interpolants too."""
    sol, _, _ = solve("compiled")
    p = torch.tensor([1.5, 1.0, 3.0, 1.0], dtype=torch.float64)
    calls = []

    def func(t, u):
        calls.append(t)
        return lotka_volterra(u, p, t)

    ref = torchdiffeq.odeint(
        func,
        torch.tensor([1.0, 1.0], dtype=torch.float64),
        torch.tensor(SAVES, dtype=torch.float64),
        rtol=1e-8,
        atol=1e-10,
        method="dopri5",
        # dk's steps land on t1 rather than stepping past it.
        options={"step_t": torch.tensor(SAVES[-1:], dtype=torch.float64)},
    )
    close(sol.u, ref, rel=1e-6)
    assert abs(sol.stats["nfev"] - len(calls)) < 0.1 * len(calls)


@pytest.mark.parametrize(
    "sensealg",
    [
        dk.ReverseThroughSolver(),
        dk.CheckpointedAdjoint(),
        dk.CheckpointedAdjoint(checkpoints=3),
    ],
    ids=["ReverseThroughSolver", "CheckpointedAdjoint", "CheckpointedAdjoint-3"],
)
def test_gradients_equal_reference(sensealg):
    grads = {}
    for mode in ("eager", "compiled"):
        sol, u0, p = solve(mode, sensealg=sensealg)
        (sol.u**2).sum().backward()
        grads[mode] = (sol.u, u0.grad, p.grad)
    for got, want in zip(grads["compiled"], grads["eager"], strict=True):
        close(got, want)


def test_checkpointed_differentiates_a_short_solve_in_one_pass(monkeypatch):
    """CheckpointedAdjoint() on the engine: a solve of at most KEEP_STEPS
    attempts is differentiated through its blocks in one pass (no replay); a
    longer one is solved again and replayed, and the structure's next solve
    skips the first try until one fits again. Gradients equal eager's."""
    from diffeqkit.backends.torch import _checkpoint, _engine_adjoint

    tries, replays = [], []
    through, apply = _engine_adjoint.through, _checkpoint._Checkpointed.apply

    def spy_through(req, max_blocks=None):
        tries.append(max_blocks)
        return through(req, max_blocks)

    def spy_apply(*args):
        replays.append(1)
        return apply(*args)

    monkeypatch.setattr(_engine_adjoint, "through", spy_through)
    monkeypatch.setattr(_checkpoint._Checkpointed, "apply", spy_apply)
    monkeypatch.setattr(_checkpoint, "_LONG", {})
    short = {"tspan": (0.0, 0.5), "saveat": [0.0, 0.2, 0.5]}
    long = {"tspan": (0.0, 2.0), "saveat": SAVES}
    sensealg = dk.CheckpointedAdjoint()

    def gradients(mode, kw):
        sol, u0, p = solve(mode, sensealg=sensealg, **kw)
        (sol.u**2).sum().backward()
        return sol, (sol.u, u0.grad, p.grad)

    seen = []
    for kw in (short, long, long, short, short):
        _, want = gradients("eager", kw)
        tries.clear(), replays.clear()
        sol, got = gradients("compiled", kw)
        for a, b in zip(got, want, strict=True):
            close(a, b)
        attempts = sol.stats["naccept"] + sol.stats["nreject"]
        seen.append((attempts <= _checkpoint.KEEP_STEPS, len(tries), len(replays)))
    limit = _checkpoint.KEEP_STEPS // _engine.BLOCK
    assert tries == [limit]
    # (fits, first tries, replays) per solve: short in one pass; long tried,
    # then replayed; long again straight to the replay; short replayed once
    # (the last solve was long), then in one pass again.
    assert seen == [(True, 1, 0), (False, 1, 1), (False, 0, 1), (True, 0, 1),
                    (True, 1, 0)]  # fmt: skip


def test_module_training_equals_reference_and_never_recompiles():
    """p an nn.Module (the neural ODE): two Adam steps on each path give the same
    losses and parameters; the second step, with new parameter values and their
    .grad filled in, runs the compiled code of the first."""

    def field(u, net, t):
        return net(u**3)

    def train(mode):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
        ).double()
        opt = torch.optim.Adam(net.parameters(), lr=0.1)
        u0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
        losses, traces = [], []
        os.environ[_engine.ENV] = mode
        try:
            for _ in range(2):
                opt.zero_grad()
                prob = dk.ODEProblem(field, u0, (0.0, 1.5), net)
                sol = dk.solve(
                    prob,
                    "dopri5",
                    backend="torch",
                    saveat=SAVES[:3],
                    sensealg=dk.ReverseThroughSolver(),
                )
                loss = (sol.u**2).mean()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
                traces.append(dict(_engine.TRACES))
        finally:
            del os.environ[_engine.ENV]
        return torch.stack(losses), list(net.parameters()), traces

    ref_losses, ref_params, _ = train("eager")
    losses, params, traces = train("compiled")
    close(losses, ref_losses)
    for got, want in zip(params, ref_params, strict=True):
        close(got, want)
    assert traces[0] == traces[1]


def test_fixed_step_equals_reference():
    ref, _, _ = solve("eager", alg="rk4", dt0=0.1)
    sol, _, _ = solve("compiled", alg="rk4", dt0=0.1)
    close(sol.u, ref.u, rel=1e-13)
    assert sol.stats["nfev"] == ref.stats["nfev"]


def test_failed_compilation_falls_back_once_with_a_warning():
    @torch.compiler.disable
    def opaque(u):
        return u

    def decay(u, p, t):
        return -p * opaque(u)

    def run():
        prob = dk.ODEProblem(decay, torch.tensor([1.0], dtype=torch.float64), (0, 1))
        prob = dk.ODEProblem(
            decay,
            torch.tensor([1.0], dtype=torch.float64),
            (0.0, 1.0),
            torch.tensor(0.5, dtype=torch.float64),
        )
        os.environ[_engine.ENV] = "compiled"
        try:
            return dk.solve(prob, "dopri5", backend="torch", saveat=[0.0, 1.0])
        finally:
            del os.environ[_engine.ENV]

    with pytest.warns(_engine.EngineFallbackWarning, match="could not compile"):
        sol = run()
    np.testing.assert_allclose(sol.u[-1].item(), np.exp(-0.5), rtol=1e-5)
    # Warned once: a second solve of the same structure is quiet (warnings are
    # errors in the test suite).
    run()


def test_unknown_engine_name_is_refused():
    with pytest.raises(ValueError, match=_engine.ENV):
        solve("fast")


# --- the engine option and the auto policy -----------------------------------------


@pytest.fixture
def fresh_auto(monkeypatch):
    """A fresh auto policy (no eager seconds, no compiles measured), with the
    option and the environment variable unset."""
    auto = _policy._Auto()
    monkeypatch.setattr(_policy, "AUTO", auto)
    monkeypatch.delenv(_engine.ENV, raising=False)
    dkt.set_engine(None)
    yield auto
    dkt.set_engine(None)


def auto_solve(f=lotka_volterra, u0=(1.0, 1.0), p=(1.5, 1.0, 3.0, 1.0), **kw):
    prob = dk.ODEProblem(
        f,
        torch.tensor(u0, dtype=torch.float64),
        (0.0, 2.0),
        torch.tensor(p, dtype=torch.float64),
    )
    kw = {"saveat": SAVES, "rtol": 1e-8, "atol": 1e-10, **kw}
    return dk.solve(prob, "dopri5", backend="torch", **kw)


def test_option_precedence_and_bad_names(fresh_auto, monkeypatch):
    assert dkt.get_engine() == "auto"
    monkeypatch.setenv(_engine.ENV, "compiled")
    assert dkt.get_engine() == "compiled"
    dkt.set_engine("eager")
    assert dkt.get_engine() == "eager"
    with dkt.engine("compiled"):
        assert dkt.get_engine() == "compiled"
        with dkt.engine(" Auto "):
            assert dkt.get_engine() == "auto"
    assert dkt.get_engine() == "eager"
    dkt.set_engine(None)
    assert dkt.get_engine() == "compiled"
    with pytest.raises(dk.InvalidProblemError, match=r"mode must be one of 'auto'"):
        dkt.set_engine("fast")
    with pytest.raises(dk.InvalidProblemError, match="mode"), dkt.engine("jit"):
        pass


def test_auto_threshold_is_the_mean_compile_time():
    auto = _policy._Auto()
    key = (1, 2)
    assert auto.expected_compile_s() == _policy.PRIOR_COMPILE_S
    assert not auto.ready(key)
    auto.compiles += [2.0, 4.0]
    auto.add(key, (), 2.9)
    assert auto.expected_compile_s() == 3.0
    assert not auto.ready(key)
    auto.add(key, (), 0.1)
    assert auto.ready(key)
    # A fixed threshold of 0 still never compiles a structure's first solve.
    auto.threshold_s = 0.0
    assert not auto.ready((3,))


def test_auto_runs_eagerly_until_the_threshold_then_compiles(fresh_auto):
    """Eager while the eager seconds are below the expected compile time (a
    tiny solve takes milliseconds), compiled from the first solve after it is
    reached: the same values, and new u0, p and tolerances never recompile."""

    ref = auto_solve()
    assert ref.stats["engine"] == "eager"
    assert "compile_s" not in ref.stats
    fresh_auto.threshold_s = 60.0
    for _ in range(2):
        assert auto_solve().stats["engine"] == "eager"
    fresh_auto.threshold_s = 1e-9
    sol = auto_solve()
    assert sol.stats["engine"] == "compiled"
    close(sol.u, ref.u)
    assert sol.stats["naccept"] == ref.stats["naccept"]
    traces = dict(_engine.TRACES)
    again = auto_solve(u0=(0.8, 1.3), p=(1.2, 0.9, 2.5, 1.1), rtol=1e-6)
    assert again.stats["engine"] == "compiled"
    assert again.stats["compile_s"] == 0.0
    assert traces == _engine.TRACES
    # Other problem structures keep their own account: still eager (another f;
    # another shape of the state, which torch would compile anew).
    other_f = auto_solve(f=lambda u, p, t: lotka_volterra(u, p, t))
    assert other_f.stats["engine"] == "eager"
    batch = auto_solve(u0=((1.0, 1.0), (0.9, 1.1)))
    assert batch.stats["engine"] == "eager"


def test_auto_backward_pass_replays_on_the_forward_pass_engine(fresh_auto):
    """The solve's account reaches the threshold at the end of its forward pass;
    its backward pass still replays eagerly, as its forward pass ran."""
    fresh_auto.threshold_s = 1e-9
    grads = []
    for mode in ("eager", "auto"):
        with dkt.engine(mode):
            sol, u0, p = solve(mode, sensealg=dk.CheckpointedAdjoint(checkpoints=3))
        calls = _engine.COUNTS["calls"]
        (sol.u**2).sum().backward()
        assert _engine.COUNTS["calls"] == calls
        assert sol.stats["engine"] == "eager"
        grads.append((u0.grad, p.grad))
    for got, want in zip(*grads, strict=True):
        assert torch.equal(got, want)


def test_auto_falls_back_once_with_a_warning(fresh_auto):
    @torch.compiler.disable
    def opaque(u):
        return u

    def decay(u, p, t):
        return -p[0] * opaque(u)

    fresh_auto.threshold_s = 1e-9
    first = auto_solve(f=decay, u0=(1.0,), p=(0.5,))
    assert first.stats["engine"] == "eager"
    with pytest.warns(_engine.EngineFallbackWarning, match="could not compile"):
        second = auto_solve(f=decay, u0=(1.0,), p=(0.5,))
    assert second.stats["engine"] == "eager"
    torch.testing.assert_close(second.u, first.u, rtol=0, atol=0)
    # Eager from then on, quietly (warnings are errors in the test suite).
    assert auto_solve(f=decay, u0=(1.0,), p=(0.5,)).stats["engine"] == "eager"


def test_a_bound_method_is_one_structure(fresh_auto):
    """Each ``obj.method`` is a new bound method: the structure is its function
    and object (an unhashable object too), so it compiles once."""

    @dataclasses.dataclass
    class Model:  # eq=True: unhashable
        scale: float = 1.0

        def rhs(self, u, p, t):
            return self.scale * lotka_volterra(u, p, t)

    model = Model()
    fresh_auto.threshold_s = 1e-9
    assert auto_solve(f=model.rhs).stats["engine"] == "eager"
    first = auto_solve(f=model.rhs)
    assert first.stats["engine"] == "compiled"
    traces = dict(_engine.TRACES)
    again = auto_solve(f=model.rhs, u0=(0.7, 1.1))
    assert again.stats["engine"] == "compiled"
    assert again.stats["compile_s"] == 0.0
    assert traces == _engine.TRACES
