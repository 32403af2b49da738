"""torch.nn.Module as p, and diffeqkit.torch.NeuralODE.

Gradients are checked in float64 against `torchdiffeq.odeint` differentiated by
autograd (dopri5, the same tableau, at rtol=1e-11): both differentiate solutions
within ~1e-10 of the exact one, so we allow 1e-7 relative (the continuous
adjoints run at their default tolerances, the solve's). One parameter entry is
also checked against a central finite difference (step 1e-5; truncation ~1e-10,
solve error amplified by 1/step ~1e-6: 1e-5 relative allowed).
"""

from __future__ import annotations

import copy
import doctest

import numpy as np
import pytest
from conftest import SENSEALGS

import diffeqkit as dk

torch = pytest.importorskip("torch")
torchdiffeq = pytest.importorskip("torchdiffeq")
import diffeqkit.torch as dkt  # noqa: E402

pytestmark = pytest.mark.torch

F64 = torch.float64
TSPAN = (0.0, 0.5)
SAVES = np.linspace(0.0, 0.5, 6)
TOLS = {"rtol": 1e-11, "atol": 1e-13}
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)


def make_net(seed: int = 0, dtype: torch.dtype = F64) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    )
    return net.to(dtype)


def u0_of(dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor([1.0, -0.5], dtype=dtype)


def grads_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.grad.clone() for k, v in module.named_parameters() if v.grad is not None
    }


def loss_of(u: torch.Tensor) -> torch.Tensor:
    return (u**2).sum() + u[-1, 0]


def odeint_reference(net: torch.nn.Module, u0: torch.Tensor) -> dict:
    """d loss / d params by autograd through torchdiffeq.odeint."""
    ref = copy.deepcopy(net)
    u = torchdiffeq.odeint(
        lambda t, u: ref(u),
        u0,
        torch.as_tensor(SAVES, dtype=F64),
        method="dopri5",
        rtol=1e-11,
        atol=1e-13,
    )
    loss_of(u).backward()
    return grads_of(ref)


def assert_close(got: dict, want: dict, rel: float) -> None:
    assert got.keys() == want.keys()
    for k in want:
        scale = float(want[k].abs().max())
        err = float((got[k] - want[k]).abs().max())
        assert err <= rel * scale, (k, err, scale)


@pytest.fixture(scope="module")
def reference() -> dict:
    return odeint_reference(make_net(), u0_of())


# ---------------------------------------------------------------------------------
# Module as p: every sensealg fills .grad; vjp keys; hybrid p.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_backward_fills_grad_on_every_sensealg(sensealg: str, reference: dict):
    net = make_net()
    prob = dk.ODEProblem(lambda u, p, t: p(u), u0_of(), TSPAN, net)
    sol = dk.solve(prob, "dopri5", saveat=SAVES, sensealg=SENSEALGS[sensealg], **TOLS)
    assert sol.sensealg == SENSEALGS[sensealg]
    loss_of(sol.u).backward()
    assert_close(grads_of(net), reference, 1e-7)


def test_gradient_matches_finite_difference():
    net = make_net()
    prob = dk.ODEProblem(lambda u, p, t: p(u), u0_of(), TSPAN, net)

    def loss() -> float:
        with torch.no_grad():
            return float(loss_of(dk.solve(prob, "dopri5", saveat=SAVES, **TOLS).u))

    sol = dk.solve(prob, "dopri5", saveat=SAVES, **TOLS)
    loss_of(sol.u).backward()
    weight = net[0].weight
    assert weight.grad is not None
    h = 1e-5
    with torch.no_grad():
        weight[1, 0] += h
        up = loss()
        weight[1, 0] -= 2 * h
        down = loss()
        weight[1, 0] += h
    fd = (up - down) / (2 * h)
    assert abs(float(weight.grad[1, 0]) - fd) <= 1e-5 * abs(fd)


def test_vjp_returns_a_dict_by_parameter_name(reference: dict):
    net = make_net()
    prob = dk.ODEProblem(lambda u, p, t: p(u), u0_of(), TSPAN, net)
    _, grads = dk.value_and_grad(
        lambda sol: loss_of(sol.u), prob, "dopri5", saveat=SAVES, **TOLS
    )
    assert list(grads.p) == [name for name, _ in net.named_parameters()]
    assert_close(grads.p, reference, 1e-7)
    # The pullback differentiates without touching the parameters' .grad.
    assert all(x.grad is None for x in net.parameters())
    assert grads.u0.shape == (2,)


@pytest.mark.parametrize("sensealg", ["reverse", "interpolating", "checkpointed"])
def test_hybrid_dict_and_tuple_p(sensealg: str):
    """du/dt = A u * theta + net(u): theta's and the net's gradients against the
    same model written with torchdiffeq."""
    theta = torch.tensor(0.7, dtype=F64, requires_grad=True)
    net = make_net(1)

    def f(u, p, t):
        return p["theta"] * (u @ A) + p["nn"](u)

    prob = dk.ODEProblem(f, u0_of(), TSPAN, {"theta": theta, "nn": net})
    sol = dk.solve(prob, "dopri5", saveat=SAVES, sensealg=SENSEALGS[sensealg], **TOLS)
    loss_of(sol.u).backward()
    assert theta.grad is not None

    theta_ref = theta.detach().clone().requires_grad_()
    net_ref = copy.deepcopy(net)
    net_ref.zero_grad()
    u = torchdiffeq.odeint(
        lambda t, u: f(u, {"theta": theta_ref, "nn": net_ref}, t),
        u0_of(),
        torch.as_tensor(SAVES, dtype=F64),
        method="dopri5",
        rtol=1e-11,
        atol=1e-13,
    )
    loss_of(u).backward()
    assert theta_ref.grad is not None
    assert abs(float(theta.grad - theta_ref.grad)) <= 1e-7 * abs(float(theta_ref.grad))
    assert_close(grads_of(net), grads_of(net_ref), 1e-7)

    # The same as a tuple: grads.p nests the parameter dict at the module's place.
    tprob = dk.ODEProblem(
        lambda u, p, t: p[0] * (u @ A) + p[1](u), u0_of(), TSPAN, (theta, net)
    )
    _, grads = dk.value_and_grad(
        lambda s: loss_of(s.u), tprob, "dopri5", saveat=SAVES, **TOLS
    )
    assert isinstance(grads.p, tuple)
    assert abs(float(grads.p[0] - theta_ref.grad)) <= 1e-7 * abs(float(theta.grad))
    assert_close(grads.p[1], grads_of(net_ref), 1e-7)


def test_buffers_ride_along_and_frozen_parameters_get_no_gradient():
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2).double()
            self.register_buffer("scale", torch.tensor(0.5, dtype=F64))

        def forward(self, u):
            return self.scale * self.lin(u)

    module = Scaled()
    module.lin.bias.requires_grad_(False)
    prob = dk.ODEProblem(lambda u, p, t: p(u), u0_of(), TSPAN, module)
    sol = dk.solve(prob, "dopri5", sensealg=dk.CheckpointedAdjoint(), **TOLS)
    loss_of(sol.u).backward()
    assert module.lin.weight.grad is not None
    assert module.lin.bias.grad is None
    _, grads = dk.value_and_grad(lambda s: loss_of(s.u), prob, "dopri5", **TOLS)
    assert grads.p["lin.bias"] is None
    torch.testing.assert_close(grads.p["lin.weight"], module.lin.weight.grad)
    # The buffer is used (halving it changes the solution) but not an input.
    assert "scale" not in grads.p
    with torch.no_grad():
        before = dk.solve(prob, "dopri5", **TOLS).u[-1]
        module.scale.fill_(0.25)
        after = dk.solve(prob, "dopri5", **TOLS).u[-1]
    assert float((before - after).abs().max()) > 1e-3


@pytest.mark.parametrize("sensealg", list(SENSEALGS))
def test_tied_weights_get_both_uses(sensealg: str):
    """One Linear used twice: its gradient sums both uses on every sensealg."""
    torch.manual_seed(2)
    lin = torch.nn.Linear(2, 2).double()
    net = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    prob = dk.ODEProblem(lambda u, p, t: p(u), u0_of(), TSPAN, net)
    _, want = dk.value_and_grad(
        lambda s: loss_of(s.u),
        prob,
        "dopri5",
        sensealg=dk.ReverseThroughSolver(),
        saveat=SAVES,
        **TOLS,
    )
    assert list(want.p) == ["0.weight", "0.bias"]
    sol = dk.solve(prob, "dopri5", saveat=SAVES, sensealg=SENSEALGS[sensealg], **TOLS)
    loss_of(sol.u).backward()
    assert_close(grads_of(net), want.p, 1e-7)


# ---------------------------------------------------------------------------------
# NeuralODE.
# ---------------------------------------------------------------------------------


def test_neural_ode_shapes_batch_and_solution():
    node = dkt.NeuralODE(make_net(), TSPAN, saveat=SAVES, **TOLS)
    u0 = u0_of()
    out = node(u0)
    assert out.shape == (len(SAVES), 2)
    sol = node.solve(u0)
    assert isinstance(sol, dk.Solution)
    assert sol.backend == "torch"
    torch.testing.assert_close(sol.u, out)
    batch = torch.stack([u0, 2 * u0, -u0])
    outb = node(batch)
    assert outb.shape == (len(SAVES), 3, 2)
    # Each row of the batch solves its own ODE (steps shared, within tolerance).
    for i in range(3):
        torch.testing.assert_close(outb[:, i], node(batch[i]), rtol=1e-8, atol=1e-10)
    # Default saves: [t0, t1].
    assert dkt.NeuralODE(make_net(), TSPAN)(u0).shape == (2, 2)


def test_neural_ode_dtype_follows_u0_and_module():
    node = dkt.NeuralODE(make_net(dtype=torch.float32), TSPAN, saveat=SAVES)
    out32 = node(u0_of(torch.float32))
    assert out32.dtype == torch.float32
    node.double()
    out64 = node(u0_of(F64))
    assert out64.dtype == F64
    # float32 agrees with float64 to float32's tolerance (default rtol 1e-6).
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-5)
    node.to("cpu")
    assert node(u0_of(F64)).device.type == "cpu"


def test_neural_ode_state_dict_round_trip_and_parameters():
    node = dkt.NeuralODE(make_net(3), TSPAN, saveat=SAVES, **TOLS)
    keys = list(node.state_dict())
    assert keys == [f"vector_field.{k}" for k in make_net().state_dict()]
    assert len(list(node.parameters())) == 4
    other = dkt.NeuralODE(make_net(4), TSPAN, saveat=SAVES, **TOLS)
    assert not torch.equal(other(u0_of()), node(u0_of()))
    other.load_state_dict(node.state_dict())
    torch.testing.assert_close(other(u0_of()), node(u0_of()), rtol=0, atol=0)


def test_neural_ode_backward_and_optimizer_step(reference: dict):
    node = dkt.NeuralODE(make_net(), TSPAN, "dopri5", saveat=SAVES, **TOLS)
    opt = torch.optim.SGD(node.parameters(), lr=1e-2)
    opt.zero_grad()
    loss = loss_of(node(u0_of()))
    loss.backward()
    got = {k.removeprefix("vector_field."): v for k, v in grads_of(node).items()}
    assert_close(got, reference, 1e-7)
    opt.step()
    with torch.no_grad():
        assert float(loss_of(node(u0_of()))) < float(loss)


def test_neural_ode_repr():
    node = dkt.NeuralODE(
        make_net(), (0.0, 1.5), saveat=SAVES, sensealg=dk.ReverseThroughSolver()
    )
    text = repr(node)
    assert "alg='tsit5'" in text
    assert "tspan=(0.0, 1.5)" in text
    assert "ReverseThroughSolver()" in text
    assert "(vector_field): Sequential" in text
    assert "saveat=6 times" in text


# ---------------------------------------------------------------------------------
# Bad input: clear errors before any deep framework traceback.
# ---------------------------------------------------------------------------------


def test_module_of_another_dtype_is_refused_naming_p():
    prob = dk.ODEProblem(
        lambda u, p, t: p(u), u0_of(), TSPAN, {"nn": make_net(dtype=torch.float32)}
    )
    with pytest.raises(dk.InvalidProblemError, match=r"p\['nn'\].*\.double\(\)"):
        dk.solve(prob)
    node = dkt.NeuralODE(make_net(dtype=torch.float32), TSPAN)
    with pytest.raises(dk.InvalidProblemError, match=r"^vector_field .*\.double\(\)"):
        node(u0_of(F64))
    node64 = dkt.NeuralODE(make_net(), TSPAN)
    with pytest.raises(dk.InvalidProblemError, match=r"float32.*\.float\(\)"):
        node64(u0_of(torch.float32))
    with pytest.raises(dk.InvalidProblemError, match="dtype='float32' was asked"):
        dk.solve(
            dk.ODEProblem(lambda u, p, t: p(u), u0_of(), TSPAN, make_net()),
            dtype="float32",
        )


def test_module_on_another_device_is_refused_naming_p():
    # The meta device stands in for a GPU: any device other than u0's.
    net = make_net().to("meta")
    prob = dk.ODEProblem(lambda u, p, t: p(u), u0_of(), TSPAN, net)
    with pytest.raises(dk.InvalidProblemError, match=r"^p .*on meta.*\.to\('cpu'\)"):
        dk.solve(prob)
    with pytest.raises(dk.InvalidProblemError, match=r"^vector_field .*on meta"):
        dkt.NeuralODE(net, TSPAN)(u0_of())


def test_vector_field_of_the_wrong_shape_names_the_shapes():
    node = dkt.NeuralODE(torch.nn.Linear(2, 3).double(), TSPAN)
    with pytest.raises(
        dk.InvalidProblemError,
        match=r"vector_field\(u0\) returned shape \(3,\).*\(2,\)",
    ):
        node(u0_of())
    prob = dk.ODEProblem(
        lambda u, p, t: p(u), u0_of(), TSPAN, torch.nn.Linear(2, 3).double()
    )
    with pytest.raises(dk.InvalidProblemError, match=r"returned shape \(3,\)"):
        dk.solve(prob)


def test_numpy_or_jax_leaf_beside_torch_values_is_refused_with_its_path():
    p = {"nn": make_net(), "k": np.ones(2)}
    prob = dk.ODEProblem(lambda u, p, t: p["nn"](u) * 1.0, u0_of(), TSPAN, p)
    with pytest.raises(dk.InvalidProblemError, match=r"p\['k'\] is a NumPy array"):
        dk.solve(prob)
    with pytest.raises(dk.InvalidProblemError, match=r"p\['k'\] is a NumPy array"):
        dk.vjp(prob)
    tensors = (torch.ones(2, dtype=F64), np.ones(2))
    prob = dk.ODEProblem(lambda u, p, t: -u, u0_of(), TSPAN, tensors)
    with pytest.raises(dk.InvalidProblemError, match=r"p\[1\] is a NumPy array"):
        dk.solve(prob)


def test_module_p_picks_torch_and_other_backends_refuse_it():
    net = make_net(dtype=torch.get_default_dtype())
    prob = dk.ODEProblem(lambda u, p, t: p(u), [1.0, 0.0], TSPAN, net)
    assert dk.solve(prob).backend == "torch"
    with pytest.raises(dk.UnsupportedError, match="Pass backend='torch'"):
        dk.solve(prob, backend="scipy")
    assert dk.default_sensealg("torch", u0_of(), make_net()) == dk.CheckpointedAdjoint()


def test_neural_ode_bad_arguments():
    with pytest.raises(dk.InvalidProblemError, match="vector_field"):
        dkt.NeuralODE(lambda u: u, TSPAN)  # pyright: ignore[reportArgumentType]
    with pytest.raises(dk.InvalidProblemError, match="tspan"):
        dkt.NeuralODE(make_net(), (0.0, 0.0))
    with pytest.raises(dk.InvalidProblemError, match="backend"):
        dkt.NeuralODE(make_net(), TSPAN, backend="jax")
    with pytest.raises(dk.InvalidProblemError, match="u0"):
        dkt.NeuralODE(make_net(), TSPAN)(np.ones(2))  # pyright: ignore[reportArgumentType]


def test_docstring_example_runs():
    result = doctest.testmod(dkt, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.gpu
@pytest.mark.parametrize("sensealg", ["default", *SENSEALGS])
def test_neural_ode_on_cuda(sensealg: str, reference: dict):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    chosen = None if sensealg == "default" else SENSEALGS[sensealg]
    node = dkt.NeuralODE(
        make_net(), TSPAN, "dopri5", saveat=SAVES, sensealg=chosen, **TOLS
    ).to("cuda")
    loss_of(node(u0_of().cuda())).backward()
    got = {k.removeprefix("vector_field."): v.cpu() for k, v in grads_of(node).items()}
    assert all(p.grad.device.type == "cuda" for p in node.parameters())
    assert_close(got, reference, 1e-7)
    # The module on the GPU, u0 on the CPU: named, with the fix.
    with pytest.raises(dk.InvalidProblemError, match=r"on cuda.*\.to\('cpu'\)"):
        node(u0_of())
