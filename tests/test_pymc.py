"""diffeqkit.pymc: the solve as a PyTensor Op, its gradient, failures, pickling.

The problem is linear decay ``u' = -k u`` with two states and two rates, so
values and gradients have closed forms: ``u_i(t) = u0_i exp(-k_i t)``.
"""

from __future__ import annotations

import importlib.util
import pickle
import warnings

import numpy as np
import pytest
from conftest import BY_NAME, need, need_gradients, sensealg_params

import diffeqkit as dk

pytestmark = pytest.mark.pymc

if importlib.util.find_spec("pymc") is None:
    pytest.skip("needs pymc: pip install pymc", allow_module_level=True)

with warnings.catch_warnings():
    # ArviZ (imported by PyMC) announces its refactor with a FutureWarning.
    warnings.simplefilter("ignore", FutureWarning)
    import pymc as pm
    import pytensor
    import pytensor.tensor as pt

    import diffeqkit.pymc as dkpm

TS = np.linspace(0.0, 1.0, 5)
U0 = np.array([1.0, 2.0])
K = np.array([0.5, 1.5])
TOL = {"rtol": 1e-10, "atol": 1e-12}


def decay(u, p, t):
    return -p * u


def decay_dict(u, p, t):
    return -p["k"] * u + 0.0 * p["c"]


def prob_of(k=K):
    return dk.ODEProblem(decay, U0, (0.0, 1.0), k)


def exact(u0, k):
    return u0[None, :] * np.exp(-k[None, :] * TS[:, None])


# A fixed weighting of the solution: L = sum(W * u).
W = np.random.default_rng(0).normal(size=(5, 2))


def exact_grads(u0, k):
    e = np.exp(-k[None, :] * TS[:, None])
    return (W * e).sum(0), (W * -TS[:, None] * u0[None, :] * e).sum(0)


def compiled(backend, sensealg=None, **kwargs):
    u0, k = pt.dvector("u0"), pt.dvector("k")
    u = dkpm.solve(
        prob_of(),
        u0=u0,
        p=k,
        saveat=TS,
        backend=backend,
        sensealg=sensealg,
        **(TOL | kwargs),
    )
    loss = pt.sum(W * u)
    return u, pytensor.function([u0, k], [u, loss, *pytensor.grad(loss, [u0, k])])


@pytest.mark.parametrize(("backend", "sensealg"), sensealg_params())
def test_value_and_gradient_match_dk_and_closed_form(backend, sensealg):
    need_gradients(backend)
    sa = BY_NAME[sensealg]
    _, fn = compiled(backend, sa)
    k2 = np.array([0.7, 1.1])
    u, _, du0, dk_ = fn(U0, k2)
    assert u.dtype == np.float64
    assert u.shape == (5, 2)
    ref = dk.solve(prob_of(k2), saveat=TS, backend=backend, **TOL)
    # The value comes from dk.vjp, whose forward pass may integrate an augmented
    # system (other steps than dk.solve's): equal to the tolerance asked.
    np.testing.assert_allclose(u, dk._arrays.to_numpy(ref.u), rtol=1e-9)
    np.testing.assert_allclose(u, exact(U0, k2), rtol=1e-8)
    g_u0, g_k = exact_grads(U0, k2)
    # The adjoints solve backward at their own default tolerances.
    tol = 1e-6 if sensealg in ("ContinuousAdjoint", "InterpolatingAdjoint") else 1e-8
    np.testing.assert_allclose(du0, g_u0, rtol=tol, atol=tol)
    np.testing.assert_allclose(dk_, g_k, rtol=tol, atol=tol)


def test_gradient_reuses_the_forward_solve():
    need_gradients("scipy")
    u, fn = compiled("scipy", dk.ForwardMode())
    core = u.owner.op.core
    assert core.want_pullback  # set when the gradient graph was built
    fn(U0, K)
    key = core._key
    fn(U0, K + 0.1)  # a new point: the VJP found the value Op's pullback
    assert core._key is not None
    assert core._key != key


def test_verify_grad_in_float64():
    need_gradients("scipy")

    def f(u0, k):
        return dkpm.solve(prob_of(), u0=u0, p=k, saveat=TS, backend="scipy", **TOL)

    pytensor.gradient.verify_grad(
        f, [U0, K], rng=np.random.default_rng(1), eps=1e-6, abs_tol=1e-6, rel_tol=1e-6
    )


@pytest.mark.parametrize("backend", ["scipy", "jax", "torch"])
def test_tuple_and_dict_parameters(backend):
    need_gradients(backend)
    k, c = pt.dvector("k"), pt.dscalar("c")
    prob = dk.ODEProblem(decay_dict, U0, (0.0, 1.0), {"k": K, "c": 1.0})
    u = dkpm.solve(prob, p={"k": k, "c": c}, saveat=TS, backend=backend, **TOL)
    gk, gc = pytensor.grad(pt.sum(W * u), [k, c])
    fn = pytensor.function([k, c], [u, gk, gc])
    val, dk_, dc = fn(K, 3.0)
    np.testing.assert_allclose(val, exact(U0, K), rtol=1e-8)
    np.testing.assert_allclose(dk_, exact_grads(U0, K)[1], rtol=1e-7)
    assert dc == pytest.approx(0.0, abs=1e-10)

    def decay_tuple(u, p, t):
        return -p[0] * u * p[1]

    prob = dk.ODEProblem(decay_tuple, U0, (0.0, 1.0), (K, 1.0))
    s = pt.dscalar("s")
    u = dkpm.solve(prob, p=(k, s), saveat=TS, backend=backend, **TOL)
    fn = pytensor.function([k, s], [u, *pytensor.grad(pt.sum(W * u), [k, s])])
    val, dk_, ds = fn(K, 2.0)
    np.testing.assert_allclose(val, exact(U0, 2.0 * K), rtol=1e-8)
    # d/ds of sum(W u) with rates s k: sum over i of k_i * dL/dk_i at rates s k.
    assert ds == pytest.approx(float(exact_grads(U0, 2.0 * K)[1] @ K), rel=1e-7)


def test_defaults_are_the_problems_values():
    need("scipy")
    u = dkpm.solve(prob_of(), saveat=TS, backend="scipy", **TOL)
    np.testing.assert_allclose(u.eval(), exact(U0, K), rtol=1e-8)


@pytest.mark.parametrize("backend", ["scipy", "jax", "torch"])
def test_failed_solve_is_nan_not_an_exception(backend):
    need_gradients(backend)
    u, fn = compiled(backend, max_steps=2)
    val, loss, du0, dk_ = fn(U0, K)
    assert np.isnan(val).all()
    assert np.isnan(loss)
    assert np.isnan(du0).all()
    assert np.isnan(dk_).all()
    assert u.owner.op.n_failed >= 1
    # Non-finite inputs (a wild proposal) are a rejection too.
    _, fn = compiled(backend)
    assert np.isnan(fn(U0, np.array([np.inf, 1.0]))[1])
    # And the Op still works at a good point afterwards.
    np.testing.assert_allclose(fn(U0, K)[0], exact(U0, K), rtol=1e-8)


def test_bad_input_at_model_build_time():
    need("scipy")
    prob = prob_of()
    with pytest.raises(dk.InvalidProblemError, match=r"^p must have shape \(2,\)"):
        dkpm.solve(prob, p=pt.dvector("k", shape=(3,)), backend="scipy")
    with pytest.raises(dk.InvalidProblemError, match=r"^p must have shape"):
        dkpm.solve(prob, p=pt.dmatrix("k"), backend="scipy")
    with pytest.raises(dk.InvalidProblemError, match=r"^u0 must have shape \(2,\)"):
        dkpm.solve(prob, u0=np.ones(3), backend="scipy")
    with pm.Model():
        theta = pm.Normal("theta", shape=4)
        with pytest.raises(dk.InvalidProblemError, match=r"^p must have shape"):
            dkpm.solve(prob, p=theta, backend="scipy")
    dict_prob = dk.ODEProblem(decay_dict, U0, (0.0, 1.0), {"k": K, "c": 1.0})
    with pytest.raises(dk.InvalidProblemError, match=r"^p must have the problem's"):
        dkpm.solve(dict_prob, p={"k": pt.dvector("k")}, backend="scipy")
    with pytest.raises(dk.InvalidProblemError, match="throw"):
        dkpm.solve(prob, backend="scipy", throw=True)
    with pytest.raises(dk.InvalidProblemError, match="rtol"):
        dkpm.solve(prob, backend="scipy", rtol=-1.0)
    with pytest.raises(dk.UnsupportedError):
        dkpm.solve(prob, "not_an_alg", backend="scipy")


def test_observed_with_the_wrong_shape_fails_before_sampling():
    # PyMC does not check broadcasting when the model is built; the solution's
    # static shape makes the first log-density evaluation fail, before any step.
    need("scipy")
    with pm.Model() as model:
        k = pm.LogNormal("k", shape=2)
        u = dkpm.solve(prob_of(), p=k, saveat=TS, backend="scipy")
        pm.Normal("obs", mu=u, sigma=0.1, observed=np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"hape|broadcast"):
        model.point_logps()


def test_pickles():
    need_gradients("scipy")
    u, fn = compiled("scipy", dk.ForwardMode())
    fn(U0, K)  # fills the pullback cache, which is not pickled
    op = pickle.loads(pickle.dumps(u.owner.op))
    assert op.core._pullback is None
    assert op.core.kwargs["backend"] == "scipy"
    fn2 = pickle.loads(pickle.dumps(fn))
    for a, b in zip(fn2(U0, K + 0.2), fn(U0, K + 0.2), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.jax
def test_jax_backed_op_pickles():
    need("jax")
    u = dkpm.solve(prob_of(), p=pt.dvector("k"), saveat=TS, backend="jax", **TOL)
    op = pickle.loads(pickle.dumps(u.owner.op))
    assert op.core.kwargs["backend"] == "jax"
    assert op.core.out_shape == (5, 2)


def _model(backend, n_draws_data=None):
    rng = np.random.default_rng(2)
    data = exact(U0, K) + rng.normal(scale=0.05, size=(5, 2))
    with pm.Model() as model:
        k = pm.LogNormal("k", mu=np.log(K), sigma=0.3, shape=2)
        u = dkpm.solve(prob_of(), p=k, saveat=TS, backend=backend, rtol=1e-8)
        pm.Normal("obs", mu=u, sigma=0.05, observed=data)
    return model


@pytest.mark.slow
def test_pm_sample_two_processes():
    need_gradients("scipy")
    with _model("scipy"):
        idata = pm.sample(
            draws=30,
            tune=30,
            chains=2,
            cores=2,
            # JAX is loaded in this process (conftest): fork would warn that
            # it may deadlock; spawn also checks that the model pickles.
            mp_ctx="spawn",
            progressbar=False,
            random_seed=3,
            compute_convergence_checks=False,
        )
    post = idata.posterior["k"].values  # pyright: ignore[reportAttributeAccessIssue]
    assert post.shape == (2, 30, 2)
    assert np.isfinite(post).all()
    assert np.all(np.abs(post.mean((0, 1)) - K) < 0.5)


@pytest.mark.jax
def test_numpyro_samples_the_model_compiled_to_jax():
    need("jax")
    if importlib.util.find_spec("numpyro") is None:
        pytest.skip("needs numpyro")
    with _model("jax"):
        idata = pm.sample(
            draws=50,
            tune=50,
            chains=1,
            nuts_sampler="numpyro",
            progressbar=False,
            random_seed=4,
            initvals={"k": K},
        )
    post = idata.posterior["k"].values  # pyright: ignore[reportAttributeAccessIssue]
    assert post.shape == (1, 50, 2)
    assert np.isfinite(post).all()
    assert np.all(np.abs(post.mean((0, 1)) - K) < 0.5)


def test_docstring_examples_run():
    import doctest

    need("scipy")
    result = doctest.testmod(dkpm, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
