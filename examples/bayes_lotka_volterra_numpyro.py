"""Bayesian Lotka-Volterra with NumPyro: NUTS through `dk.solve` on JAX.

Synthetic observations of both species (lognormal noise, sigma 0.1, 21 times
over [0, 10]) from known rates p = (1.5, 1.0, 3.0, 1.0). Priors: each rate
LogNormal(0, 1.5), sigma HalfNormal(0.5). The model calls `dk.solve` directly:
no host callback, one compiled program for the whole chain. Warm-up proposes
extreme rates, and some make the solve fail (max_steps, blow-up); with
``throw=False`` such a solve turns into log-density -inf, a rejected
proposal, instead of an exception that would end the run.

Prints r-hat, ESS, the 94 % equal-tailed intervals and whether each true value
lies inside, how often solves fail (over prior draws, and the divergent
transitions, which a failed solve inside a trajectory causes), and saves a
posterior predictive figure ``bayes_lotka_volterra_numpyro.png``.

``--full`` (4 chains x 1000 warm-up + 1000 draws; 877 s on a heavily shared
2-core CPU) gave r-hat 1.003 and ESS 792 to 1259 for every parameter, each true
value inside its 94 % interval (alpha 1.502 [1.436, 1.568], beta 0.985 [0.914,
1.060], gamma 2.966 [2.829, 3.113], delta 1.007 [0.928, 1.095], sigma 0.084
[0.067, 0.107]); 3 % of prior draws fail the solve, and warm-up had 127
divergent transitions (none after).
``--quick`` runs one short chain to show the pieces work; no option, two
chains of 100 + 100.

Run: python examples/bayes_lotka_volterra_numpyro.py [--quick | --full]
"""

# requires: jax numpyro matplotlib

from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)  # an example may; the library never does

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.diagnostics import summary  # noqa: E402
from numpyro.infer import MCMC, NUTS, Predictive  # noqa: E402

import diffeqkit as dk  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TRUE_P = np.array([1.5, 1.0, 3.0, 1.0])
TRUE_SIGMA = 0.1
U0 = np.array([1.0, 1.0])
TS = np.linspace(0.0, 10.0, 21)
NAMES = ["alpha", "beta", "gamma", "delta"]
# Few enough that a hopeless proposal fails fast; the truth needs 108 steps.
MAX_STEPS = 1000


def lotka_volterra(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack(
        [p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]]
    )


PROB = dk.ODEProblem(lotka_volterra, jnp.asarray(U0), (0.0, 10.0), jnp.asarray(TRUE_P))


def solve(p):
    """The solution at TS for rates p; traceable (jit, grad, vmap)."""
    return dk.solve(
        PROB.remake(p=p),
        saveat=TS,
        rtol=1e-6,
        atol=1e-8,
        max_steps=MAX_STEPS,
        throw=False,
    )


def synthetic_data(seed: int = 0) -> np.ndarray:
    u = np.asarray(dk.solve(PROB.remake(p=TRUE_P), saveat=TS, rtol=1e-10, atol=1e-12).u)
    noise = np.random.default_rng(seed).normal(size=u.shape)
    return u * np.exp(TRUE_SIGMA * noise)


def model(obs=None):
    p = numpyro.sample("p", dist.LogNormal(0.0, 1.5).expand([4]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
    sol = solve(p)
    # The throw=False recipe: a failed solve is an impossible observation.
    numpyro.factor("solve_failed", jnp.where(sol.success, 0.0, -jnp.inf))
    # Rows not reached are NaN; the factor above already rejected such a p, so
    # any finite stand-in keeps the likelihood (and its gradient) NaN-free.
    u = jnp.where(sol.success, sol.u, 1.0)
    numpyro.sample(
        "obs", dist.LogNormal(jnp.log(jnp.maximum(u, 1e-12)), sigma), obs=obs
    )


# Solves for a batch of BATCH parameter vectors: one vmapped program, each
# member with its own steps and its own (traced) status.
BATCH = 200
solve_batch = jax.jit(jax.vmap(lambda p: (lambda s: (s.u, s.success))(solve(p))))


def prior_failure_rate(seed: int = 1) -> float:
    """The fraction of BATCH prior draws whose solve fails."""
    draws = Predictive(model, num_samples=BATCH)(jax.random.PRNGKey(seed))["p"]
    _, success = solve_batch(draws)
    return 1.0 - float(jnp.mean(success))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one short chain")
    mode.add_argument("--full", action="store_true", help="4 chains x 1000")
    args = parser.parse_args(argv)
    chains, warmup, draws = (4, 1000, 1000) if args.full else (2, 100, 100)
    if args.quick:
        chains, warmup, draws = 1, 20, 20

    obs = synthetic_data()
    rate = prior_failure_rate()
    print(f"prior draws whose solve fails: {100 * rate:.1f} %")

    kernel = NUTS(model, max_tree_depth=5 if args.quick else 10)
    mcmc = MCMC(
        kernel,
        num_warmup=warmup,
        num_samples=draws,
        num_chains=chains,
        chain_method="sequential",
        progress_bar=False,
    )
    start = time.perf_counter()
    warm_div = "not counted"
    if not args.quick:  # (a second compilation: the quick run skips it)
        # Warm-up on its own, to count its divergent transitions: a proposal
        # whose solve fails has log-density -inf, which NUTS reports as one.
        mcmc.warmup(
            jax.random.PRNGKey(0),
            obs=obs,
            collect_warmup=True,
            extra_fields=("diverging",),
        )
        warm_div = int(np.sum(mcmc.get_extra_fields()["diverging"]))
    mcmc.run(jax.random.PRNGKey(1), obs=obs, extra_fields=("diverging",))
    elapsed = time.perf_counter() - start
    samples = mcmc.get_samples(group_by_chain=True)
    divergent = int(np.sum(mcmc.get_extra_fields()["diverging"]))
    print(
        f"NUTS: {chains} chain(s) x ({warmup} warm-up + {draws} draws) in "
        f"{elapsed:.1f} s; divergent transitions (failed solves among them): "
        f"{warm_div} in warm-up, {divergent} after"
    )

    stats = summary(samples, group_by_chain=True)
    flat = {k: np.asarray(v).reshape((-1, *v.shape[2:])) for k, v in samples.items()}
    rows = [
        (f"p[{i}] {NAMES[i]}", TRUE_P[i], flat["p"][:, i], stats["p"], i)
        for i in range(4)
    ]
    rows.append(("sigma", TRUE_SIGMA, flat["sigma"], stats["sigma"], None))
    print(
        f"{'parameter':<12} {'true':>6} {'mean':>7} {'94% interval':>18} {'inside':>7} "
        f"{'r-hat':>6} {'ESS':>7}"
    )
    all_inside = True
    for name, truth, x, st, i in rows:
        lo, hi = np.quantile(x, [0.03, 0.97])
        inside = bool(lo <= truth <= hi)
        all_inside &= inside
        rhat = st["r_hat"] if i is None else st["r_hat"][i]
        ess = st["n_eff"] if i is None else st["n_eff"][i]
        print(
            f"{name:<12} {truth:>6.2f} {np.mean(x):>7.3f} [{lo:>7.3f}, {hi:>7.3f}] "
            f"{inside!s:>7} {float(rhat):>6.3f} {float(ess):>7.0f}"
        )
    print(f"all true values inside their 94% intervals: {all_inside}")

    # Posterior predictive: the solve for posterior draws, vmapped.
    picked = flat["p"][np.linspace(0, len(flat["p"]) - 1, BATCH).astype(int)]
    u = np.asarray(solve_batch(jnp.asarray(picked))[0])
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (label, color) in enumerate([("prey", "C0"), ("predator", "C1")]):
        lo, mid, hi = np.nanquantile(u[:, :, k], [0.03, 0.5, 0.97], axis=0)
        ax.fill_between(TS, lo, hi, color=color, alpha=0.3)
        ax.plot(TS, mid, color=color, label=f"{label}: posterior median, 94% band")
        ax.plot(TS, obs[:, k], "o", color=color, ms=4, label=f"{label}: observed")
    ax.set_xlabel("t")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("bayes_lotka_volterra_numpyro.png", dpi=120)
    print("saved bayes_lotka_volterra_numpyro.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
