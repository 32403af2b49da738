"""Native autodiff on JAX: every sensealg under jax.grad / jax.jit / jax.vmap
through dk.solve, against dk.vjp."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BY_NAME as SENSEALGS
from conftest import need
from problems import (
    LINEAR_A,
    LINEAR_U0,
    linear,
    linear_grads,
)

import diffeqkit as dk

TIGHT = {"rtol": 1e-10, "atol": 1e-12}

# ---------------------------------------------------------------------------------
# Native autodiff on JAX: every sensealg under jax.jit/jax.grad/jax.vmap.
# ---------------------------------------------------------------------------------


@pytest.mark.jax
@pytest.mark.parametrize("name", list(SENSEALGS))
def test_jax_grad_through_solve_equals_vjp_and_traces_once(name):
    need("jax")
    import jax
    import jax.numpy as jnp

    calls = {"n": 0}

    def counted(u, p, t):
        calls["n"] += 1
        return linear(u, p, t)

    ts = np.linspace(0.0, 2.0, 6)
    cot = np.random.default_rng(4).normal(size=(6, 2))

    @jax.jit
    def loss(u0, A):
        sol = dk.solve(
            dk.ODEProblem(counted, u0, (0.0, 2.0), A),
            saveat=ts,
            sensealg=SENSEALGS[name],
            **TIGHT,
        )
        return jnp.sum(sol.u * cot)

    grad = jax.grad(loss, argnums=(0, 1))
    gu, gA = grad(jnp.asarray(LINEAR_U0), jnp.asarray(LINEAR_A))
    traced = calls["n"]
    grad(jnp.asarray(LINEAR_U0), jnp.asarray(LINEAR_A) * 1.01)
    assert calls["n"] == traced, "a new value of p re-traced f"
    du0, dA = linear_grads(ts, cot)
    # As in the closed-form test above.
    np.testing.assert_allclose(np.asarray(gu), du0, atol=1e-8)
    np.testing.assert_allclose(np.asarray(gA), dA, atol=1e-8)
    # vmap over a batch of matrices: each row its own gradient.
    batch = jnp.stack([jnp.asarray(LINEAR_A), jnp.asarray(LINEAR_A)])
    gAs = jax.vmap(lambda A: grad(jnp.asarray(LINEAR_U0), A)[1])(batch)
    np.testing.assert_allclose(np.asarray(gAs[1]), dA, atol=1e-8)


@pytest.mark.jax
def test_jax_forward_mode_refuses_gradients_with_respect_to_time():
    need("jax")
    import jax
    import jax.numpy as jnp

    def loss(t1):
        prob = dk.ODEProblem(linear, jnp.asarray(LINEAR_U0), (0.0, t1), LINEAR_A)
        return jnp.sum(dk.solve(prob, sensealg=dk.ForwardMode()).u)

    with pytest.raises(
        dk.UnsupportedError,
        match=r"sensealg=dk\.ForwardMode\(\) on backend='jax' differentiates with "
        r"respect to u0 and p only, not tspan",
    ):
        jax.grad(loss)(2.0)

    # The discrete reverse methods differentiate with respect to t1 too:
    # d/dt1 sum(u(t1)) = sum(A u(t1)).
    def reverse(t1):
        prob = dk.ODEProblem(linear, jnp.asarray(LINEAR_U0), (0.0, t1), LINEAR_A)
        sol = dk.solve(prob, sensealg=dk.ReverseThroughSolver(), **TIGHT)
        return jnp.sum(sol.u)

    from problems import linear_exact

    expected = np.sum(LINEAR_A @ linear_exact([2.0])[0])
    assert float(jax.grad(reverse)(2.0)) == pytest.approx(expected, rel=1e-8)


@pytest.mark.jax
def test_jax_vjp_refuses_to_run_under_a_transformation():
    need("jax")
    import jax
    import jax.numpy as jnp

    def inside(A):
        prob = dk.ODEProblem(linear, jnp.asarray(LINEAR_U0), (0.0, 1.0), A)
        return dk.vjp(prob)[0].u

    with pytest.raises(dk.UnsupportedError, match=r"dk\.vjp cannot run under a JAX"):
        jax.jit(inside)(jnp.asarray(LINEAR_A))
