"""`diffeqkit.tools.profiling`: waiting for arrays and a gradient's peak memory,
the framework told by the arrays (the backends have no hooks for either)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import need

import diffeqkit as dk
from diffeqkit.tools.profiling import peak_memory, synchronize


def decay(u, p, t):
    return -p * u


PROB = dk.ODEProblem(decay, np.ones(3), (0.0, 1.0), 0.5)


def _loss(backend, max_steps, sensealg):
    def loss(u0, p):
        sol = dk.solve(
            PROB.remake(u0=u0, p=p),
            "tsit5",
            backend=backend,
            saveat=[1.0],
            max_steps=max_steps,
            sensealg=sensealg,
        )
        return dk.array_namespace(sol.u).sum(sol.u**2) / 2

    return loss


def _unused():
    raise AssertionError("a compiled measurement must not run the eager call")


def test_jax_memory_is_the_buffer_assignment_of_the_compiled_gradient():
    """XLA's plan of the compiled gradient. For ReverseThroughSolver it holds
    diffrax's buffer of one checkpoint per possible step, so it grows with
    max_steps (the cost `compare` must show)."""
    need("jax")
    import jax.numpy as jnp

    def peak(max_steps):
        loss = _loss("jax", max_steps, dk.ReverseThroughSolver())
        return peak_memory(_unused, loss, jnp.ones(3), jnp.asarray(0.5))

    small, method = peak(200)
    large, _ = peak(2000)
    assert method == "xla buffer assignment"
    assert small is not None
    assert large is not None
    # Measured 8.2x (18 KB -> 150 KB): the checkpoint buffer dominates, the
    # state and the program's other temporaries do not grow.
    assert 6 < large / small <= 10


def test_numpy_memory_is_traced_by_tracemalloc():
    def run():
        return np.ones(2**20).sum()  # 8 MiB of float64, freed before returning

    mb, method = peak_memory(run, _unused, np.ones(3), 0.5)
    assert method == "tracemalloc"
    assert 8 <= mb < 9


def test_torch_memory_on_the_cpu_is_not_measured():
    need("torch")
    import torch

    calls = []
    mb = peak_memory(lambda: calls.append(1), _unused, torch.ones(3), None)
    assert mb == (None, None)
    assert calls == []


@pytest.mark.gpu
def test_torch_memory_on_cuda_is_the_allocator_peak_of_the_call():
    need("torch")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    u0 = torch.ones(3, device="cuda")

    def run():
        return torch.ones(2**20, dtype=torch.float64, device="cuda").sum()

    mb, method = peak_memory(run, _unused, u0, None)
    assert method == "cuda allocator"
    assert 8 <= mb < 9  # the 8 MiB buffer, not what was allocated before


def test_synchronize_accepts_trees_of_numpy_and_none():
    assert synchronize([np.ones(2), {"a": (np.ones(1), None)}, 1.0]) is None


def test_synchronize_waits_for_jax_arrays_in_a_tree():
    need("jax")
    import jax.numpy as jnp

    x = jnp.ones((300, 300))
    tree = {"u0": x @ x, "p": [None, jnp.sin(x).sum()]}
    synchronize(tree)
    assert tree["u0"].is_ready()
    assert tree["p"][1].is_ready()


def test_synchronize_accepts_torch_tensors_on_the_cpu():
    need("torch")
    import torch

    assert synchronize((torch.ones(2), {"p": torch.zeros(1)})) is None
