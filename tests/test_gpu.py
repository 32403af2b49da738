"""This round's paths on a CUDA GPU: events, ensembles, the compiled torch engine
and rodas4 on torch; events and ensembles on JAX. Each result is checked against
the same computation on the CPU. Skipped, with the reason, where no GPU is
visible (CI never has one; the notes say where these ran)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import need

import diffeqkit as dk

G = 9.81
TOL = {"rtol": 1e-9, "atol": 1e-11}


def ball(u, p, t):
    return dk.array_namespace(u).stack([u[1], -p[0] + 0.0 * u[0]])


def bounce(u, p, t):
    return dk.array_namespace(u).stack([u[0], -p[1] * u[1]])


def impacts(e: float, n: int) -> np.ndarray:
    first = np.sqrt(2.0 / G)
    return first + np.concatenate([[0.0], np.cumsum(2 * first * e ** np.arange(1, n))])


EVENTS = [dk.Event(lambda u, p, t: u[0], direction=-1, terminal=False, affect=bounce)]


def lv(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack(
        [p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]]
    )


def _torch_cuda():
    need("torch")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    return torch


def _jax_gpu():
    need("jax")
    import jax

    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("no GPU visible to JAX")
    return jax


@pytest.mark.gpu
@pytest.mark.torch
@pytest.mark.parametrize(
    "sensealg",
    [dk.ReverseThroughSolver(), dk.CheckpointedAdjoint(), dk.InterpolatingAdjoint()],
)
def test_torch_events_on_cuda(sensealg):
    torch = _torch_cuda()
    e = torch.tensor([G, 0.8], dtype=torch.float64, device="cuda", requires_grad=True)
    u0 = torch.tensor([1.0, 0.0], dtype=torch.float64, device="cuda")
    prob = dk.ODEProblem(ball, u0, (0.0, 2.0), e)
    sol = dk.solve(prob, "tsit5", events=EVENTS, sensealg=sensealg, **TOL)
    assert sol.u.device.type == "cuda"
    got = sol.t_events[0].detach().cpu().numpy()
    np.testing.assert_allclose(got, impacts(0.8, got.size), rtol=1e-9)
    sol.t_events[0][-1].backward() if sensealg.name == "ReverseThroughSolver" else (
        sol.u[-1, 0].backward()
    )
    assert e.grad is not None
    assert e.grad.device.type == "cuda"
    assert torch.isfinite(e.grad).all()


@pytest.mark.gpu
@pytest.mark.torch
def test_torch_ensemble_on_cuda_matches_the_cpu():
    torch = _torch_cuda()
    rng = np.random.default_rng(0)
    p = torch.tensor(
        np.array([1.5, 1.0, 3.0, 1.0]) * rng.uniform(0.8, 1.2, (64, 4)),
        dtype=torch.float64,
    )
    prob = dk.ODEProblem(lv, torch.ones(2, dtype=torch.float64), (0.0, 5.0), p[0])
    saves = np.linspace(0.0, 5.0, 11)
    cpu = dk.solve(dk.EnsembleProblem(prob, p=p), "tsit5", saveat=saves, **TOL)
    gpu_prob = dk.ODEProblem(lv, prob.u0.cuda(), prob.tspan, p[0].cuda())
    ens = dk.EnsembleProblem(gpu_prob, p=p.cuda())
    gpu = dk.solve(ens, "tsit5", saveat=saves, devices=["cuda:0"], **TOL)
    assert gpu.u.device.type == "cuda"
    torch.testing.assert_close(gpu.u.cpu(), cpu.u, rtol=1e-9, atol=1e-11)
    assert gpu.stats["naccept"] == cpu.stats["naccept"]


@pytest.mark.gpu
@pytest.mark.torch
@pytest.mark.parametrize(
    ("alg", "engine"),
    [("rodas4", "eager"), ("tsit5", "compiled"), ("rodas4", "compiled")],
)
def test_torch_rodas4_and_compiled_engine_on_cuda(monkeypatch, alg, engine):
    torch = _torch_cuda()
    p = torch.tensor([1.5, 1.0, 3.0, 1.0], dtype=torch.float64)
    u0 = torch.ones(2, dtype=torch.float64)
    saves = np.linspace(0.0, 5.0, 11)
    monkeypatch.setenv("DIFFEQKIT_TORCH_ENGINE", engine)
    cpu = dk.solve(dk.ODEProblem(lv, u0, (0.0, 5.0), p), alg, saveat=saves, **TOL)
    pc = p.cuda().requires_grad_()
    gpu = dk.solve(
        dk.ODEProblem(lv, u0.cuda(), (0.0, 5.0), pc), alg, saveat=saves, **TOL
    )
    torch.testing.assert_close(gpu.u.detach().cpu(), cpu.u, rtol=1e-8, atol=1e-10)
    gpu.u[-1].sum().backward()
    assert pc.grad is not None
    assert torch.isfinite(pc.grad).all()


@pytest.mark.gpu
@pytest.mark.jax
def test_jax_ensemble_sharded_on_gpus_matches_the_cpu():
    jax = _jax_gpu()
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    p = np.array([1.5, 1.0, 3.0, 1.0]) * rng.uniform(0.8, 1.2, (64, 4))
    saves = np.linspace(0.0, 5.0, 11)
    with jax.default_device(jax.devices("cpu")[0]):
        prob = dk.ODEProblem(lv, jnp.ones(2), (0.0, 5.0), jnp.asarray(p[0]))
        cpu = dk.solve(
            dk.EnsembleProblem(prob, p=jnp.asarray(p)), "tsit5", saveat=saves, **TOL
        )
    gpus = jax.devices("gpu")
    prob = dk.ODEProblem(lv, jnp.ones(2), (0.0, 5.0), jnp.asarray(p[0]))
    sol = dk.solve(
        dk.EnsembleProblem(prob, p=jnp.asarray(p)),
        "tsit5",
        saveat=saves,
        devices=gpus,
        **TOL,
    )
    assert {d.platform for d in sol.u.devices()} == {"gpu"}
    np.testing.assert_allclose(np.asarray(sol.u), np.asarray(cpu.u), rtol=1e-9)


@pytest.mark.gpu
@pytest.mark.jax
def test_jax_events_on_gpu():
    jax = _jax_gpu()
    import jax.numpy as jnp

    def impact_time(e):
        prob = dk.ODEProblem(ball, jnp.array([1.0, 0.0]), (0.0, 2.0), jnp.stack([G, e]))
        sol = dk.solve(prob, "tsit5", events=EVENTS, throw=False, **TOL)
        return sol.t_events[0][1]  # the second impact: 3 sqrt(2/g) e... moves with e

    t2, dt2 = jax.jit(jax.value_and_grad(impact_time))(0.8)
    first = np.sqrt(2.0 / G)
    assert float(t2) == pytest.approx(first * (1 + 2 * 0.8), rel=1e-9)
    assert float(dt2) == pytest.approx(2 * first, rel=1e-7)
