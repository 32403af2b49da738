"""JAX: any registered pytree as p (issue 12, API.md section 6).

An ``equinox.Module`` (array leaves are inputs, an activation function among its
leaves is static), a ``NamedTuple`` and a registered dataclass are handed to f as
they are; gradients come back in p's structure, with None for static leaves (as
``eqx.filter_grad`` gives); new parameter values never retrace. The problem is
exponential decay ``u' = -k u`` of two states, whose gradients have a closed
form: with ``L = sum_i |u(t_i)|^2``, ``dL/dk = -2 |u0|^2 sum_i t_i exp(-2 k t_i)``.
Each test builds its own f where it counts traces (a compilation of a few
seconds each).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
from conftest import SENSEALGS

import diffeqkit as dk
from diffeqkit import backends

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")
import jax.numpy as jnp  # noqa: E402

from diffeqkit.backends.jax import _solve  # noqa: E402

pytestmark = pytest.mark.jax

SENSEALGS = {**SENSEALGS, "interpolating": dk.InterpolatingAdjoint()}
U0 = np.array([1.0, 2.0])
SAVES = np.linspace(0.0, 1.0, 5)
KW = {"backend": "jax", "saveat": SAVES, "rtol": 1e-10, "atol": 1e-12}


def grad_k(k: float, u0: np.ndarray = U0) -> float:
    """Closed form of dL/dk for ``L = sum_i |u(t_i)|^2``, ``u = u0 exp(-k t)``."""
    return float(-2 * (SAVES * np.exp(-2 * k * SAVES)).sum() * (u0 @ u0))


def check(dk_: Any, k: float) -> None:
    # rtol 1e-10 per solve; 1e-7 leaves room for the adjoints' backward solves.
    np.testing.assert_allclose(float(dk_), grad_k(k), rtol=1e-7)


class Decay(eqx.Module):
    """``-act(rate) * u``: an array input, a static function leaf (act, not a
    static field: equinox's MLP keeps its activation so) and a static field."""

    rate: jax.Array
    act: Callable[[Any], Any]
    label: str = eqx.field(static=True)

    def __call__(self, u: Any) -> Any:
        return -self.act(self.rate) * u


def module(k: float, act: Callable[[Any], Any] = jnp.abs) -> Decay:
    return Decay(jnp.asarray(k), act, "decay")


def call_p(u: Any, p: Any, t: Any) -> Any:
    return p(u)


class Rates(NamedTuple):
    k: Any
    unused: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    k: Any
    name: str = dataclasses.field(metadata={"static": True}, default="p")


def squared_loss(prob: dk.ODEProblem) -> Callable[[Any], Any]:
    """``p -> L = sum_i |u(t_i)|^2`` through dk.solve."""

    def loss(p: Any) -> Any:
        return jnp.sum(dk.solve(prob.remake(p=p), **KW).u ** 2)

    return loss


class Counter:
    """``f = p(u)``, counting its Python calls (its traces under JAX)."""

    def __init__(self) -> None:
        self.traces = 0

    def __call__(self, u: Any, p: Any, t: Any) -> Any:
        self.traces += 1
        return p(u)


@pytest.mark.parametrize("sensealg", list(SENSEALGS.values()), ids=list(SENSEALGS))
def test_module_p_gradient_has_the_module_structure_on_every_sensealg(sensealg):
    prob = dk.ODEProblem(call_p, U0, (0.0, 1.0), module(1.3))
    sol, pullback = dk.vjp(prob, sensealg=sensealg, **KW)
    np.testing.assert_allclose(
        np.asarray(sol.u), U0 * np.exp(-1.3 * SAVES)[:, None], rtol=1e-9
    )
    grads = pullback(2 * np.asarray(sol.u))
    assert type(grads.p) is Decay
    assert grads.p.act is None  # a static leaf: no gradient, as eqx.filter_grad
    assert grads.p.label == "decay"
    check(grads.p.rate, 1.3)


def test_namedtuple_and_registered_dataclass_p_under_jit_grad():
    def nt_f(u: Any, p: Rates, t: Any) -> Any:
        return -p.k * u

    def dc_f(u: Any, p: Params, t: Any) -> Any:
        assert p.name == "rates"  # the static field reaches f
        return -p.k * u

    for f, p in (
        (nt_f, Rates(jnp.asarray(1.1), jnp.ones(3))),
        (dc_f, Params(jnp.asarray(1.1), "rates")),
    ):
        g = jax.grad(jax.jit(squared_loss(dk.ODEProblem(f, U0, (0.0, 1.0), p))))(p)
        assert type(g) is type(p)
        check(g.k, 1.1)


def test_vmap_over_a_batch_of_modules():
    ks = jnp.array([0.5, 1.0, 2.0])
    batch = Decay(ks, jnp.abs, "decay")
    prob = dk.ODEProblem(call_p, U0, (0.0, 1.0), module(1.0))
    solve = jax.vmap(
        lambda m: dk.solve(prob.remake(p=m), **KW).u,
        in_axes=(Decay(0, None, "decay"),),  # pyright: ignore[reportArgumentType]
    )
    u = solve(batch)
    want = U0 * np.exp(-np.asarray(ks)[:, None, None] * SAVES[None, :, None])
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-9)


def test_new_module_values_reuse_the_program_and_a_new_static_leaf_does_not():
    f = Counter()
    prob = dk.ODEProblem(f, U0, (0.0, 1.0), module(1.3))
    sol, pullback = dk.vjp(prob, **KW)
    pullback(2 * np.asarray(sol.u))
    traces, programs = f.traces, set(_solve.PROGRAMS.keys())
    assert traces > 0
    for k in (0.4, 2.2):
        sol, pullback = dk.vjp(prob.remake(p=module(k)), **KW)
        check(pullback(2 * np.asarray(sol.u)).p.rate, k)
    assert f.traces == traces
    assert set(_solve.PROGRAMS.keys()) == programs
    # Another activation function is another program (it is compiled in).
    dk.solve(prob.remake(p=module(1.3, act=jnp.negative)), **KW)
    assert f.traces > traces


def test_filter_jit_grad_of_a_module_matches_closed_form_and_traces_once():
    # The activation function among the leaves needs equinox's filtered
    # transformations (plain jax.jit refuses a function argument).
    f = Counter()
    prob = dk.ODEProblem(f, U0, (0.0, 1.0), module(1.3))
    grad = eqx.filter_jit(eqx.filter_grad(squared_loss(prob)))
    grad(module(1.3))
    first = f.traces
    for k in (0.4, 2.2):
        g = grad(module(k))
        assert type(g) is Decay
        check(g.rate, k)
    assert f.traces == first


def test_backend_none_and_the_default_sensealg_see_the_modules_arrays():
    # NumPy arrays inside an equinox module: the module makes it a JAX problem.
    p = Decay(np.array([1.0, 1.0]), jnp.abs, "decay")
    assert backends.infer_backend(U0, p) == "jax"
    wide = Decay(np.ones(40), jnp.abs, "decay")
    assert dk.default_sensealg("jax", U0, p) == dk.ForwardMode()
    assert dk.default_sensealg("jax", U0, wide) == dk.CheckpointedAdjoint()


def test_an_unhashable_static_leaf_is_refused_naming_its_path():
    class Box:
        __hash__ = None  # pyright: ignore[reportAssignmentType]

    p = {"m": Decay(jnp.asarray(1.0), Box(), "decay")}  # pyright: ignore[reportArgumentType]
    prob = dk.ODEProblem(lambda u, p, t: -p["m"].rate * u, U0, (0.0, 1.0), p)
    with pytest.raises(
        dk.InvalidProblemError, match=r"p\['m'\]\.act .*cannot be hashed"
    ):
        dk.solve(prob, **KW)


def test_a_jax_pytree_on_scipy_is_refused_naming_the_backend():
    prob = dk.ODEProblem(call_p, U0, (0.0, 1.0), {"nn": module(1.0)})
    with pytest.raises(
        dk.UnsupportedError, match=r"p\['nn'\] is a .*Decay \(jax\).*backend='jax'"
    ):
        dk.solve(prob, backend="scipy")


def test_mixed_framework_leaves_are_refused_naming_the_path():
    torch = pytest.importorskip("torch")
    inside = Decay(torch.ones(1), jnp.abs, "decay")  # pyright: ignore[reportArgumentType]
    with pytest.raises(
        dk.InvalidProblemError, match=r"p\.rate is a torch array inside a jax pytree"
    ):
        dk.ODEProblem(call_p, U0, (0.0, 1.0), inside)
    beside = {"nn": module(1.0), "k": torch.ones(1)}
    with pytest.raises(
        dk.InvalidProblemError,
        match=r"p\['k'\] is a torch array, but p\['nn'\]\.rate is a jax array",
    ):
        dk.ODEProblem(call_p, U0, (0.0, 1.0), beside)
