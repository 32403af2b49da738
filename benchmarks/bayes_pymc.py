"""Cost of one log-density gradient of the Lotka-Volterra posterior in PyMC.

`diffeqkit.pymc.solve` on each installed backend against PyMC's own
`pymc.ode.DifferentialEquation`, on the same data, priors and likelihood: the
compiled ``model.logp_dlogp_function()`` is called at the same random points,
the variants interleaved round by round; medians and ratios to pm.ode. The time
per effective NUTS sample is this cost times the leapfrog steps per draw over
ESS per draw, which depend on the posterior, not on who computes the gradient,
as both variants give the same gradient to solver tolerance (so the ratio here
is the ratio per effective sample). ``--nuts DRAWS`` checks that: one NUTS
chain per variant, timed whole, in seconds per effective sample.

Run: python benchmarks/bayes_pymc.py [--rounds N] [--nuts DRAWS]
Writes benchmarks/results/bayes_pymc.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

import diffeqkit as dk
from diffeqkit import backends

TRUE_P = np.array([1.5, 1.0, 3.0, 1.0])
TS = np.linspace(0.0, 10.0, 21)


def lotka_volterra(u, p, t):
    xp = dk.array_namespace(u)
    a, b, c, d = p[0], p[1], p[2], p[3]
    return xp.stack([a * u[0] - b * u[0] * u[1], -c * u[1] + d * u[0] * u[1]])


def pm_ode_rhs(y, t, p):
    return [p[0] * y[0] - p[1] * y[0] * y[1], -p[2] * y[1] + p[3] * y[0] * y[1]]


def build(variant: str, data: np.ndarray):
    """The compiled value-and-gradient function of `variant`'s log density."""
    model = build_model(variant, data)
    fn = model.logp_dlogp_function(ravel_inputs=True)
    fn.set_extra_values({})
    return fn


def build_model(variant: str, data: np.ndarray):
    """The Lotka-Volterra posterior as a PyMC model, the solve by `variant`."""
    import pymc as pm

    with pm.Model() as model:
        rates = pm.LogNormal("rates", mu=np.log(TRUE_P), sigma=0.5, shape=4)
        sigma = pm.HalfNormal("sigma", sigma=1.0)
        if variant == "pm.ode":
            ode = pm.ode.DifferentialEquation(
                func=pm_ode_rhs, times=TS[1:], n_states=2, n_theta=4, t0=0.0
            )
            tail = ode(y0=[1.0, 1.0], theta=rates)
            u = pm.math.concatenate([np.ones((1, 2)), tail], axis=0)
        else:
            import diffeqkit.pymc as dkpm

            backend, sensealg = variant.split(":")
            sa = {"forward": dk.ForwardMode(), "adjoint": dk.InterpolatingAdjoint()}
            prob = dk.ODEProblem(lotka_volterra, np.ones(2), (0.0, 10.0), TRUE_P)
            u = dkpm.solve(
                prob, p=rates, saveat=TS, backend=backend, sensealg=sa[sensealg]
            )
        pm.Normal("obs", mu=u, sigma=sigma, observed=data)
    return model


def nuts(variants: list[str], data: np.ndarray, draws: int) -> list[str]:
    """Seconds per effective sample: one NUTS chain per variant (the same seed,
    tuning and draws), timed whole; ESS is the smallest bulk ESS of the rates."""
    import arviz as az
    import pymc as pm

    rows = []
    for v in variants:
        model = build_model(v, data)
        with model, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            idata = pm.sample(
                draws=draws,
                tune=draws,
                chains=1,
                cores=1,
                random_seed=3,
                progressbar=False,
                compute_convergence_checks=False,
                initvals={"rates": TRUE_P, "sigma": 0.3},
            )
            seconds = time.perf_counter() - start
        ess = float(az.ess(idata, var_names=["rates"])["rates"].min())
        rows.append((v, seconds, ess))
    base = rows[0][1] / rows[0][2]
    lines = [
        "",
        f"## Time per effective sample (`--nuts {draws}`)",
        "",
        f"One NUTS chain per variant: {draws} tuning + {draws} draws, the same seed",
        "and start; the whole `pm.sample` timed (compilation included); ESS is the",
        "smallest bulk ESS of the four rates.",
        "",
        "| variant | sample s | min ESS | s per ESS | pm.ode / variant |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for v, seconds, ess in rows:
        per = seconds / ess
        lines.append(
            f"| {v} | {seconds:.1f} | {ess:.0f} | {per:.3f} | {base / per:.1f}x |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--nuts",
        type=int,
        default=0,
        metavar="DRAWS",
        help="also run one NUTS chain per variant (DRAWS tuning + DRAWS draws) "
        "and report seconds per effective sample",
    )
    args = parser.parse_args()
    import jax

    jax.config.update("jax_enable_x64", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pymc  # noqa: F401

    prob = dk.ODEProblem(lotka_volterra, np.ones(2), (0.0, 10.0), TRUE_P)
    clean = dk.solve(prob, backend="scipy", saveat=TS, rtol=1e-10, atol=1e-10).u
    data = clean + np.random.default_rng(0).normal(scale=0.25, size=clean.shape)
    variants = ["pm.ode", "scipy:forward", "scipy:adjoint"]
    variants += [f"{b}:forward" for b in ("jax", "torch") if backends.installed(b)]
    fns = {}
    for v in variants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fns[v] = build(v, data)
    rng = np.random.default_rng(1)
    points = [
        np.concatenate([np.log(TRUE_P) + 0.05 * rng.normal(size=4), [np.log(0.3)]])
        for _ in range(args.rounds)
    ]
    times: dict[str, list[float]] = {v: [] for v in variants}
    grads: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    for v in variants:
        fns[v](points[0])  # compile / warm up
    for x in points:  # interleaved: every variant at the same point, in turn
        for v in variants:
            start = time.perf_counter()
            _, g = fns[v](x)
            times[v].append(time.perf_counter() - start)
            grads[v].append(g)
    base = statistics.median(times["pm.ode"])
    lines = [
        "# Lotka-Volterra log-density gradient in PyMC",
        "",
        f"`benchmarks/bayes_pymc.py --rounds {args.rounds}`: one call of the compiled",
        "`logp_dlogp_function` (value and gradient, 5 unconstrained inputs, 21 saves",
        "x 2 states), interleaved, median over rounds. Gradient difference: max",
        "relative difference from pm.ode's at the same points.",
        "",
        "| variant | median ms | pm.ode / variant | grad rel. diff. |",
        "| --- | ---: | ---: | ---: |",
    ]
    for v in variants:
        med = statistics.median(times[v])
        diff = max(
            float(np.max(np.abs(a - b) / (np.abs(b) + 1e-8)))
            for a, b in zip(grads[v], grads["pm.ode"], strict=True)
        )
        lines.append(f"| {v} | {med * 1e3:.2f} | {base / med:.1f}x | {diff:.1e} |")
    if args.nuts:  # torch's ForwardMode, 4.5x pm.ode's gradient cost, is left out
        chains = [v for v in ("pm.ode", "jax:forward", "scipy:forward") if v in fns]
        lines += nuts(chains, data, args.nuts)
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "bayes_pymc.md"
    out.write_text(text)


if __name__ == "__main__":
    if importlib.util.find_spec("jax") is None:
        raise SystemExit("this benchmark needs jax (for SciPy's autodiff of f)")
    main()
