"""`diffeqkit.equinox.NeuralODE`: shapes, batches, dtypes, JAX transformations,
gradients against diffrax called directly, every sensealg, no retrace, bad input.

The models are tiny (a linear or 2-4-2 field) so that each compilation takes a
few seconds; float64 (conftest turns on JAX's x64) except where float32 is the
point.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import SENSEALGS

import diffeqkit as dk

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")
diffrax = pytest.importorskip("diffrax")
import jax.numpy as jnp  # noqa: E402

from diffeqkit.equinox import NeuralODE  # noqa: E402

pytestmark = pytest.mark.jax

SENSEALGS = {**SENSEALGS, "interpolating": dk.InterpolatingAdjoint()}
TSPAN = (0.0, 1.0)
SAVES = np.linspace(0.0, 1.0, 6)
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
U0 = jnp.array([1.0, -0.5])


class Batched(eqx.Module):
    """``u -> tanh(u) W^T + b`` over the last axis: any leading batch axes pass
    through. All its fields are arrays, so plain jax.jit / jax.grad take it."""

    weight: jax.Array
    bias: jax.Array

    def __call__(self, u: jax.Array) -> jax.Array:
        return jnp.tanh(u) @ self.weight.T + self.bias


def batched(dtype: Any = jnp.float64) -> Batched:
    w = jnp.array([[-0.5, 1.0], [-1.0, -0.3]], dtype=dtype)
    return Batched(w, jnp.array([0.1, -0.2], dtype=dtype))


def mlp() -> eqx.nn.MLP:
    """A 2-4-2 MLP with tanh: an activation function among its leaves."""
    model = eqx.nn.MLP(2, 2, 4, 1, activation=jnp.tanh, key=jax.random.key(0))
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model
    )


def diffrax_ys(field: Any, u0: Any, adjoint: Any) -> Any:
    """The same layer on diffrax directly (the reference)."""
    return diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, f: f(y)),
        diffrax.Tsit5(),
        TSPAN[0],
        TSPAN[1],
        None,
        u0,
        args=field,
        saveat=diffrax.SaveAt(ts=jnp.asarray(SAVES)),
        stepsize_controller=diffrax.PIDController(**TIGHT),
        adjoint=adjoint,
    ).ys


@pytest.fixture(scope="module")
def reference() -> tuple[Any, Any]:
    """The MLP layer's saved states and the gradient of ``sum(u**2)`` with respect
    to its arrays, from diffrax directly (discretise-then-optimise)."""
    field = mlp()

    def loss(f: Any) -> Any:
        return jnp.sum(diffrax_ys(f, U0, diffrax.RecursiveCheckpointAdjoint()) ** 2)

    ys = diffrax_ys(field, U0, diffrax.RecursiveCheckpointAdjoint())
    return ys, eqx.filter_grad(loss)(field)


def test_call_returns_the_saved_states_and_solve_the_solution():
    node = NeuralODE(batched(), TSPAN, saveat=SAVES, **TIGHT)
    u = node(U0)
    sol = node.solve(U0)
    assert u.shape == (len(SAVES), 2)
    assert isinstance(sol, dk.Solution)
    assert sol.backend == "jax"
    assert sol.alg == "tsit5"
    np.testing.assert_allclose(np.asarray(sol.t), SAVES)
    np.testing.assert_allclose(np.asarray(sol.u), np.asarray(u))
    want = diffrax_ys(batched(), U0, diffrax.RecursiveCheckpointAdjoint())
    np.testing.assert_allclose(np.asarray(u), np.asarray(want), rtol=1e-9)


def test_a_leading_batch_axis_reaches_the_vector_field():
    node = NeuralODE(batched(), TSPAN, saveat=SAVES, **TIGHT)
    u0s = jnp.array([[1.0, -0.5], [0.2, 0.3], [-1.0, 2.0]])
    u = node(u0s)
    assert u.shape == (len(SAVES), 3, 2)
    # The members are independent: each equals its own solve (to the tolerance:
    # the batch takes the steps of its worst member).
    for i in range(3):
        np.testing.assert_allclose(
            np.asarray(u[:, i]), np.asarray(node(u0s[i])), rtol=1e-8, atol=1e-10
        )
    # jax.vmap maps over the batch instead; each member takes its own steps.
    mapped = jax.vmap(node)(u0s)
    assert mapped.shape == (3, len(SAVES), 2)
    np.testing.assert_allclose(
        np.asarray(mapped), np.asarray(jnp.swapaxes(u, 0, 1)), rtol=1e-8
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_dtype_follows_u0_and_the_model(dtype):
    node = NeuralODE(batched(jnp.dtype(dtype)), TSPAN, rtol=1e-5, atol=1e-7)
    u = node(U0.astype(dtype))
    assert u.dtype == jnp.dtype(dtype)
    want = node.solve(U0).u if dtype == "float32" else u
    np.testing.assert_allclose(np.asarray(u), np.asarray(want), rtol=1e-5)


def test_jit_and_grad_take_a_layer_of_arrays_directly():
    node = NeuralODE(batched(), TSPAN, saveat=SAVES, **TIGHT)

    def loss(n: NeuralODE, u0: Any) -> Any:
        return jnp.sum(n(u0) ** 2)

    g_node, g_u0 = jax.jit(jax.grad(loss, argnums=(0, 1)))(node, U0)
    assert isinstance(g_node, NeuralODE)
    assert g_node.tspan == TSPAN  # static fields ride along

    def direct(f: Any, u0: Any) -> Any:
        ys = diffrax_ys(f, u0, diffrax.RecursiveCheckpointAdjoint())
        return jnp.sum(ys**2)

    w_field, w_u0 = jax.grad(direct, argnums=(0, 1))(batched(), U0)
    np.testing.assert_allclose(
        np.asarray(g_node.vector_field.weight), np.asarray(w_field.weight), rtol=1e-7
    )
    np.testing.assert_allclose(np.asarray(g_u0), np.asarray(w_u0), rtol=1e-7)


@pytest.mark.parametrize("sensealg", list(SENSEALGS.values()), ids=list(SENSEALGS))
def test_every_sensealg_matches_diffrax_on_an_mlp(sensealg, reference):
    ys, want = reference
    node = NeuralODE(mlp(), TSPAN, saveat=SAVES, sensealg=sensealg, **TIGHT)
    np.testing.assert_allclose(np.asarray(node(U0)), np.asarray(ys), rtol=1e-9)

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(n: NeuralODE) -> Any:
        return jnp.sum(n(U0) ** 2)

    got = grad(node).vector_field
    # The discrete methods differentiate the same steps as diffrax (agreement
    # to rounding); the continuous adjoints solve the adjoint ODE at rtol 1e-10,
    # whose error is of that order relative to the gradient.
    rtol = 1e-9 if sensealg.name in ("ForwardMode", "ReverseThroughSolver") else 1e-6
    for g, w in zip(
        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
    ):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=1e-12)
    assert got.activation is None  # static: no gradient, as eqx.filter_grad


def test_optax_steps_reduce_the_loss():
    optax = pytest.importorskip("optax")
    node = NeuralODE(batched(), TSPAN, saveat=SAVES)
    target = jnp.zeros((len(SAVES), 2))
    optimizer = optax.adam(0.05)
    state = optimizer.init(eqx.filter(node, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(n: NeuralODE, s: Any) -> tuple[Any, Any, Any]:
        value, grads = eqx.filter_value_and_grad(
            lambda n: jnp.mean((n(U0) - target) ** 2)
        )(n)
        updates, s = optimizer.update(grads, s, n)
        return eqx.apply_updates(n, updates), s, value

    values = []
    for _ in range(5):
        node, state, value = step(node, state)
        values.append(float(value))
    assert values[-1] < values[0]


class Tally:
    """A call count, hashed by identity (a static field must be hashable)."""

    def __init__(self) -> None:
        self.n = 0


class Counting(eqx.Module):
    """`Batched`, counting its Python calls (traces under JAX)."""

    weight: jax.Array
    bias: jax.Array
    tally: Tally = eqx.field(static=True)

    def __call__(self, u: jax.Array) -> jax.Array:
        self.tally.n += 1
        return jnp.tanh(u) @ self.weight.T + self.bias


def test_new_weights_do_not_retrace_eager_calls():
    tally, b = Tally(), batched()
    node = NeuralODE(Counting(b.weight, b.bias, tally), TSPAN, saveat=SAVES)
    want = [node(U0)]
    first = tally.n
    assert first > 0
    for scale in (0.5, 2.0):
        new = eqx.tree_at(lambda n: n.vector_field.weight, node, b.weight * scale)
        want.append(new(U0))
    assert tally.n == first
    # ... and the new weights were used.
    assert not np.allclose(np.asarray(want[1]), np.asarray(want[2]))


def test_bad_vector_fields_and_arguments_are_refused():
    wrong = NeuralODE(lambda u: jnp.concatenate([u, u]), TSPAN)
    with pytest.raises(
        dk.InvalidProblemError,
        match=r"vector_field\(u\) returned shape \(4,\) for u of shape \(2,\)",
    ):
        wrong(U0)
    casts = NeuralODE(batched(jnp.float64), TSPAN)
    with pytest.raises(dk.InvalidProblemError, match="returned dtype float64"):
        casts(U0.astype(jnp.float32))
    with pytest.raises(dk.InvalidProblemError, match="vector_field must be callable"):
        NeuralODE(jnp.ones(2), TSPAN)
    with pytest.raises(dk.InvalidProblemError, match=r"unknown keyword.*backend"):
        NeuralODE(batched(), TSPAN, backend="torch")
    with pytest.raises(dk.InvalidProblemError, match="saveat must be 1-D"):
        NeuralODE(batched(), TSPAN, saveat=np.ones((2, 2)))
    with pytest.raises(dk.InvalidProblemError, match="sensealg must be"):
        NeuralODE(batched(), TSPAN, sensealg="adjoint")


def test_repr_shows_the_solve_settings():
    node = NeuralODE(
        batched(), TSPAN, "dopri5", saveat=SAVES, sensealg=dk.ForwardMode(), rtol=1e-7
    )
    text = repr(node)
    assert text.startswith("NeuralODE(vector_field=Batched(")
    assert "weight=f64[2,2]" in text
    assert "tspan=(0.0, 1.0)" in text
    assert "alg='dopri5'" in text
    assert "saveat=<6 times from 0.0 to 1.0>" in text
    assert "sensealg=ForwardMode(" in text
    assert "rtol=1e-07" in text
