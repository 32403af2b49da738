"""NumPyro on JAX: a model calls `dk.solve` directly, under NUTS's jit.

No host callback and no retrace per sampler step (f is traced a constant number
of times, whatever the chain's length), and proposals whose solve fails
(``throw=False``) are rejected instead of stopping the chain (API.md section 7).
Kept small: one scalar parameter, a handful of save times, short chains.
"""

from __future__ import annotations

import numpy as np
import pytest

import diffeqkit as dk

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import MCMC, NUTS  # noqa: E402
from numpyro.infer.util import log_density  # noqa: E402

pytestmark = pytest.mark.jax

TS = np.linspace(0.0, 1.0, 6)
SIGMA = 0.02


class Counted:
    """``f(u, p, t) = sign * p u^power``, counting its Python calls (traces)."""

    def __init__(self, sign: float, power: int) -> None:
        self.sign, self.power, self.traces = sign, power, 0

    def __call__(self, u, p, t):
        self.traces += 1
        return self.sign * p * u**self.power


def model(f, obs, prior):
    """The recipe: solve with throw=False, and make a failed solve an
    impossible observation (log-density -inf), so the proposal is rejected."""
    k = numpyro.sample("k", prior)
    prob = dk.ODEProblem(f, jnp.array([1.0]), (0.0, 1.0), k)
    sol = dk.solve(prob, saveat=TS, rtol=1e-6, atol=1e-8, throw=False)
    numpyro.factor("solve_failed", jnp.where(sol.success, 0.0, -jnp.inf))
    # Rows not reached are NaN: give the likelihood finite stand-ins there.
    u = jnp.where(sol.success, sol.u[:, 0], 1.0)
    numpyro.sample("obs", dist.Normal(u, SIGMA), obs=obs)


def chain(f, obs, prior, n: int, seed: int = 0):
    mcmc = MCMC(
        NUTS(model, max_tree_depth=4), num_warmup=n, num_samples=n, progress_bar=False
    )
    mcmc.run(
        jax.random.PRNGKey(seed), f, obs, prior, extra_fields=("diverging", "num_steps")
    )
    return mcmc


def test_nuts_traces_f_a_constant_number_of_times():
    obs = np.exp(-0.7 * TS) + SIGMA * np.random.default_rng(0).normal(size=TS.size)
    f = Counted(-1.0, 1)  # exponential decay, k = 0.7
    mcmc = chain(f, obs, dist.LogNormal(0.0, 1.0), 40)
    evaluations = int(np.sum(mcmc.get_extra_fields()["num_steps"]))
    k = np.asarray(mcmc.get_samples()["k"])
    # A few traces per compiled function (initialisation, the sampler's step;
    # 15 measured with diffrax 0.7 and NumPyro 0.22), never one per gradient
    # evaluation, of which the 80 sampler steps made over a hundred.
    assert f.traces < 40 < evaluations
    assert abs(np.mean(k) - 0.7) < 0.1


def test_failed_solves_are_rejected_proposals():
    # u' = k u^2, u(0) = 1: u = 1 / (1 - k t) blows up before t = 1 when k > 1;
    # half of the prior's mass fails the solve.
    f = Counted(1.0, 2)
    obs = 1 / (1 - 0.5 * TS) + SIGMA * np.random.default_rng(1).normal(size=TS.size)
    prior = dist.Uniform(0.0, 2.0)
    # The log-density at a failing k is -inf with a NaN gradient, not an error.
    density = jax.jit(
        jax.value_and_grad(
            lambda k: log_density(model, (f, obs, prior), {}, {"k": k})[0]
        )
    )
    value, grad = density(jnp.asarray(1.5))
    assert value == -np.inf
    assert np.isnan(grad)
    value, grad = density(jnp.asarray(0.5))
    assert np.isfinite(value)
    assert np.isfinite(grad)
    mcmc = chain(f, obs, prior, 30, seed=3)
    k = np.asarray(mcmc.get_samples()["k"])
    assert k.shape == (30,)
    assert (k < 1.0).all()  # no sample where the solve fails
    assert abs(np.mean(k) - 0.5) < 0.05
