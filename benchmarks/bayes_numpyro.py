"""NumPyro through `dk.solve` against the same model written directly on diffrax.

The model is examples/bayes_lotka_volterra_numpyro.py's: Lotka-Volterra's four
rates (LogNormal priors) and sigma, lognormal observations of both species at
21 times over [0, 10], ``throw=False`` with a -inf factor for a failed solve.
Two versions differ only in the solve:

- dk: ``dk.solve(prob, "tsit5", saveat=TS, rtol=1e-6, atol=1e-8,
  max_steps=1000, sensealg=dk.CheckpointedAdjoint(), throw=False)``;
- diffrax: ``diffrax.diffeqsolve`` with Tsit5, ``PIDController(rtol, atol)``,
  ``SaveAt(ts=TS)``, ``max_steps=1000``, ``RecursiveCheckpointAdjoint()`` (what
  CheckpointedAdjoint runs), ``throw=False``, and the same failure mask
  (``sol.result`` successful, else -inf; rows not reached replaced).

Both call the same Array-API f. Measured, interleaved (round-robin, medians and
quartiles, the first call of each timed apart as compile time):

- gradient: one jitted ``jax.value_and_grad`` of the model's log-density
  (`numpyro.infer.util.potential_energy`) at unconstrained parameters, a new
  value each call (cycled through 16 draws near the posterior mode);
- nuts: one jitted run of K NUTS transitions (``lax.scan`` of the kernel's
  ``sample``) from the same state, fixed step size and identity mass matrix, so
  both versions take the same trajectories (their leapfrog counts are compared);
  reported per run and per leapfrog step.

Target: dk / diffrax <= 1.05 for both. Writes benchmarks/results/bayes_numpyro.md.

Run: python benchmarks/bayes_numpyro.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from overhead import interleaved  # this directory is on sys.path when run

import diffeqkit as dk
from diffeqkit._info import versions

OUT = Path(__file__).parent / "results" / "bayes_numpyro.md"
TRUE_P = np.array([1.5, 1.0, 3.0, 1.0])
U0 = np.array([1.0, 1.0])
TS = np.linspace(0.0, 10.0, 21)
RTOL, ATOL, MAX_STEPS = 1e-6, 1e-8, 1000
TARGET = 1.05
K = 5  # NUTS transitions per timed run
DEPTH = 5  # max tree depth: at most 31 leapfrog steps per transition


def lotka_volterra(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack(
        [p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]]
    )


def build() -> dict[str, Any]:
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import NUTS
    from numpyro.infer.util import initialize_model

    jax.config.update("jax_enable_x64", True)  # a script may; the library never
    ts = jnp.asarray(TS)
    u0 = jnp.asarray(U0)
    prob = dk.ODEProblem(lotka_volterra, u0, (0.0, 10.0), jnp.asarray(TRUE_P))
    truth = dk.solve(prob, saveat=TS, rtol=1e-10, atol=1e-12).u
    rng = np.random.default_rng(0)
    obs = jnp.asarray(np.asarray(truth) * np.exp(0.1 * rng.normal(size=truth.shape)))

    def dk_solve(p: Any) -> tuple[Any, Any]:
        sol = dk.solve(
            prob.remake(p=p),
            "tsit5",
            saveat=TS,
            rtol=RTOL,
            atol=ATOL,
            max_steps=MAX_STEPS,
            sensealg=dk.CheckpointedAdjoint(),
            throw=False,
        )
        return sol.u, sol.success

    def diffrax_solve(p: Any) -> tuple[Any, Any]:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: lotka_volterra(y, args, t)),
            diffrax.Tsit5(),
            0.0,
            10.0,
            None,
            u0,
            args=p,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=MAX_STEPS,
            adjoint=diffrax.RecursiveCheckpointAdjoint(),
            throw=False,
        )
        return sol.ys, sol.result == diffrax.RESULTS.successful

    def model_of(solve: Any) -> Any:
        def model(obs: Any) -> None:
            p = numpyro.sample("p", dist.LogNormal(0.0, 1.5).expand([4]).to_event(1))
            sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
            u, success = solve(p)
            numpyro.factor("solve_failed", jnp.where(success, 0.0, -jnp.inf))
            u = jnp.where(success, u, 1.0)
            loc = jnp.log(jnp.maximum(u, 1e-12))
            numpyro.sample("obs", dist.LogNormal(loc, sigma), obs=obs)

        return model

    models = {"dk": model_of(dk_solve), "diffrax": model_of(diffrax_solve)}
    # Unconstrained draws near the mode: log rates and log sigma.
    mode = np.concatenate([np.log(TRUE_P), [np.log(0.1)]])
    draws = [mode + 0.02 * rng.standard_normal(5) for _ in range(16)]
    out: dict[str, Any] = {"gradient": {}, "nuts": {}, "leapfrogs": {}}
    for name, model in models.items():
        info = initialize_model(jax.random.PRNGKey(0), model, model_args=(obs,))
        potential = info.potential_fn

        def unflatten(x: Any) -> dict[str, Any]:
            return {"p": x[:4], "sigma": x[4]}

        grad = jax.jit(jax.value_and_grad(lambda x, f=potential: f(unflatten(x))))
        it = iter(range(10**9))

        def gradient(grad: Any = grad, it: Any = it) -> Any:
            x = jnp.asarray(draws[next(it) % len(draws)])
            return jax.block_until_ready(grad(x))

        kernel = NUTS(
            model,
            step_size=0.005,
            adapt_step_size=False,
            adapt_mass_matrix=False,
            max_tree_depth=DEPTH,
        )
        init = {"p": jnp.asarray(TRUE_P), "sigma": jnp.asarray(0.1)}
        state = kernel.init(
            jax.random.PRNGKey(1), 0, init, model_args=(obs,), model_kwargs={}
        )

        @jax.jit
        def run(state: Any, kernel: Any = kernel) -> Any:
            def body(s: Any, _: Any) -> tuple[Any, Any]:
                s = kernel.sample(s, (obs,), {})
                return s, s.num_steps

            return jax.lax.scan(body, state, None, length=K)

        def nuts(run: Any = run, state: Any = state) -> Any:
            return jax.block_until_ready(run(state))

        out["gradient"][name] = gradient
        out["nuts"][name] = nuts
        tic = time.perf_counter()
        out.setdefault("values", {})[name] = np.asarray(gradient()[1])
        out.setdefault("compile", {})[name] = time.perf_counter() - tic
        out["leapfrogs"][name] = int(np.sum(np.asarray(nuts()[1])))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few rounds")
    parser.add_argument("--repeat", type=int, default=0, help="rounds (0: budget)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    built = build()
    budget = 5.0 if args.quick else 40.0
    results = {
        part: interleaved(
            built[part],
            args.repeat or (3 if args.quick else 0),
            budget_s=budget,
            bounds=(7, 400),
        )
        for part in ("gradient", "nuts")
    }
    lines = [
        "# NumPyro: dk.solve against diffrax directly",
        "",
        "Generated by `python benchmarks/bayes_numpyro.py`"
        + (" --quick" if args.quick else "")
        + f" on {platform.machine()} ({platform.system()}), "
        + ", ".join(
            f"{k} {v}"
            for k, v in versions("jax", "diffrax", "numpyro", "equinox").items()
        )
        + ".",
        "",
        f"Lotka-Volterra, 21 saves, tsit5, rtol={RTOL}, atol={ATOL}, "
        f"max_steps={MAX_STEPS}, CheckpointedAdjoint = RecursiveCheckpointAdjoint(),"
        " throw=False on both sides.",
        "",
        "| measure | dk median | diffrax median | dk / diffrax | target | rounds |",
        "|---|---|---|---|---|---|",
    ]
    ok = True
    for part, res in results.items():
        dk_m, dx_m = res["dk"]["median_s"], res["diffrax"]["median_s"]
        ratio = dk_m / dx_m
        ok &= ratio <= TARGET
        label = {
            "gradient": "log-density value and gradient",
            "nuts": f"{K} NUTS transitions (depth <= {DEPTH})",
        }[part]
        lines.append(
            f"| {label} | {dk_m * 1e3:.3f} ms | {dx_m * 1e3:.3f} ms | {ratio:.3f} | "
            f"<= {TARGET} | {res['dk']['n']} |"
        )
    leaps = built["leapfrogs"]
    per = {k: results["nuts"][k]["median_s"] / leaps[k] for k in leaps}
    lines.append(
        f"| per leapfrog step | {per['dk'] * 1e6:.1f} us | "
        f"{per['diffrax'] * 1e6:.1f} us | {per['dk'] / per['diffrax']:.3f} | | |"
    )
    diff = float(np.max(np.abs(built["values"]["dk"] - built["values"]["diffrax"])))
    lines += [
        "",
        f"Leapfrog steps per run: dk {leaps['dk']}, diffrax {leaps['diffrax']} "
        "(equal: the same trajectories). Largest difference between the two "
        f"gradients at the same point: {diff:.2e}. Compile (first call): "
        + ", ".join(f"gradient {name} {built['compile'][name]:.1f} s" for name in leaps)
        + f". Total run {time.perf_counter() - start:.0f} s.",
    ]
    text = "\n".join(lines) + "\n"
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
