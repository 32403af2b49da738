"""Ensembles (issue 16): per-trajectory cost of `dk.solve` on a `dk.EnsembleProblem`.

Lotka-Volterra members (u0 and p drawn around DiffEqFlux's (1, 1) and (1.5, 1, 3,
1), t in [0, 10], 101 saves, tsit5 on JAX / dopri5 on SciPy, rtol = 1e-6, atol =
1e-8, float64).

- JAX, for each batch size: eager ``dk.solve(ensemble)`` (new u0 and p every
  call: host arrays in, the batch's u and per-member statuses out) and
  ``jax.jit`` of a function calling it, against ``jax.jit(jax.vmap(...))`` of
  ``diffrax.diffeqsolve`` written directly (Tsit5, PIDController at the same
  tolerances, SaveAt(ts=...), the same max_steps). Target: dk <= 1.05x native.
  Step counts of both sides are compared (they must agree for the ratio to mean
  anything).
- SciPy: the serial solve (executor=None) against the same members on a
  ``dask.distributed.LocalCluster`` of 2 worker processes, one thread each
  (started here, its start-up not timed). Target: >= 1.6x faster than serial on
  a 2-core machine. Also 1 worker, to show the scheduling overhead.

Variants of one group run interleaved (round-robin, one call each per round;
`overhead.interleaved`); medians and ratios of medians. Writes
``benchmarks/results/ensemble.md``.

Run: python benchmarks/ensemble.py [--sizes 1000 10000] [--scipy-sizes 1000]
     [--one-worker] [--repeat N] [--budget S] [--quick] [--out FILE]
(about 3-5 minutes on a loaded 2-core machine). The large JAX batches:
python benchmarks/ensemble.py --sizes 10000 100000 --scipy-sizes --repeat 7
--out benchmarks/results/ensemble_jax_large.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from overhead import interleaved  # this directory is on sys.path when run

import diffeqkit as dk
from diffeqkit._info import versions
from diffeqkit.problems import lotka_volterra_rhs

TSPAN = (0.0, 10.0)
TS = np.linspace(0.0, 10.0, 101)
RTOL, ATOL = 1e-6, 1e-8
MAX_STEPS = 4096
OUT = Path(__file__).parent / "results" / "ensemble.md"
JAX_TARGET, SCIPY_TARGET = 1.05, 1.6
PACKAGES = ("jax", "diffrax", "scipy", "distributed")


def members(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u0 = rng.uniform(0.8, 1.2, (size, 2))
    p = np.array([1.5, 1.0, 3.0, 1.0]) * rng.uniform(0.9, 1.1, (size, 4))
    return u0, p


def problem() -> dk.ODEProblem:
    return dk.ODEProblem(lotka_volterra_rhs, np.ones(2), TSPAN, np.ones(4))


# ---------------------------------------------------------------------------------
# JAX.
# ---------------------------------------------------------------------------------


def jax_group(size: int, repeat: int, budget_s: float) -> dict[str, Any]:
    import diffrax
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)  # this process only
    prob = problem()
    draws = [members(size, seed) for seed in range(4)]
    on_device = [(jnp.asarray(u), jnp.asarray(p)) for u, p in draws]
    ts = jnp.asarray(TS)
    turn = {"dk": 0, "jit": 0, "native": 0}

    def nxt(name: str) -> int:
        turn[name] += 1
        return turn[name] % len(draws)

    def one(y0: Any, p: Any) -> Any:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: lotka_volterra_rhs(y, args, t)),
            diffrax.Tsit5(),
            TSPAN[0],
            TSPAN[1],
            None,
            y0,
            args=p,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=MAX_STEPS,
        )
        return sol.ys, sol.stats["num_accepted_steps"]

    native = jax.jit(jax.vmap(one))

    @jax.jit
    def dk_jit(u0: Any, p: Any) -> Any:
        ens = dk.EnsembleProblem(prob, u0=u0, p=p)
        return dk.solve(
            ens, "tsit5", saveat=TS, rtol=RTOL, atol=ATOL, max_steps=MAX_STEPS
        ).u

    def run_dk() -> Any:
        u0, p = draws[nxt("dk")]
        ens = dk.EnsembleProblem(prob, u0=u0, p=p)
        sol = dk.solve(
            ens,
            "tsit5",
            backend="jax",
            saveat=TS,
            rtol=RTOL,
            atol=ATOL,
            max_steps=MAX_STEPS,
        )
        return jax.block_until_ready(sol.u)

    def run_jit() -> Any:
        return jax.block_until_ready(dk_jit(*on_device[nxt("jit")]))

    def run_native() -> Any:
        return jax.block_until_ready(native(*on_device[nxt("native")]))

    timings = interleaved(
        {"dk.solve (eager)": run_dk, "dk.solve (jit)": run_jit, "native": run_native},
        repeat,
        budget_s=budget_s,
        bounds=(5, 200),
    )
    # The same members: equal step counts and values.
    u0, p = draws[0]
    sol = dk.solve(
        dk.EnsembleProblem(prob, u0=u0, p=p),
        "tsit5",
        backend="jax",
        saveat=TS,
        rtol=RTOL,
        atol=ATOL,
        max_steps=MAX_STEPS,
    )
    ys, steps = native(*on_device[0])
    return {
        "timings": timings,
        "steps_equal": bool(np.array_equal(sol.stats["naccept"], np.asarray(steps))),
        "max_diff": float(np.max(np.abs(np.asarray(sol.u) - np.asarray(ys)))),
        "mean_steps": float(np.mean(sol.stats["naccept"])),
    }


# ---------------------------------------------------------------------------------
# SciPy on Dask.
# ---------------------------------------------------------------------------------


def scipy_group(size: int, repeat: int, one_worker: bool) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    prob = problem()
    u0, p = members(size, 0)
    ens = dk.EnsembleProblem(prob, u0=u0, p=p)
    kw = {"backend": "scipy", "saveat": TS, "rtol": RTOL, "atol": ATOL}
    clusters = {"dask, 2 workers": 2} | ({"dask, 1 worker": 1} if one_worker else {})
    started: dict[str, Any] = {}
    try:
        for name, n in clusters.items():
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
            )
            started[name] = (cluster, Client(cluster))
        variants = {"serial": lambda: dk.solve(ens, "dopri5", **kw)}
        for name, (_, client) in started.items():
            variants[name] = lambda c=client: dk.solve(ens, "dopri5", executor=c, **kw)
        timings = interleaved(variants, repeat, bounds=(3, 20))
        serial = dk.solve(ens, "dopri5", **kw)
        remote = dk.solve(ens, "dopri5", executor=started["dask, 2 workers"][1], **kw)
        same = bool(np.array_equal(serial.u, remote.u))
    finally:
        for cluster, client in started.values():
            client.close()
            cluster.close()
    return {
        "timings": timings,
        "same": same,
        "nfev": float(np.mean(serial.stats["nfev"])),
    }


# ---------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------


def _us(seconds: float, size: int) -> str:
    return f"{1e6 * seconds / size:.2f} us"


def report(
    jax_rows: dict[int, Any], scipy_rows: dict[int, Any], total: float, load: str
) -> str:
    lines = [
        "# Ensembles: per-trajectory cost",
        "",
        f"Generated by `python benchmarks/ensemble.py` on {platform.machine()} "
        f"({platform.system()}), {os.cpu_count()} CPU cores shared with other "
        f"jobs (load average {load}); "
        f"{', '.join(f'{k} {v}' for k, v in versions(*PACKAGES).items())}.",
        "",
        f"Lotka-Volterra members (u0, p within 20% / 10% of (1, 1), (1.5, 1, 3, "
        f"1)), t in {TSPAN}, {TS.size} saves, rtol={RTOL}, atol={ATOL}, float64. "
        "Medians of interleaved rounds; per trajectory = median / members.",
        "",
    ]
    if jax_rows:
        lines += [
            "## JAX: dk.solve(ensemble) vs jax.jit(jax.vmap(diffrax.diffeqsolve))",
            "",
            "| members | variant | median | per trajectory | / native | target "
            "| rounds | compile |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for size, row in jax_rows.items():
            t = row["timings"]
            ref = t["native"]["median_s"]
            for name, v in t.items():
                ratio = v["median_s"] / ref
                target = "" if name == "native" else f"<= {JAX_TARGET}"
                lines.append(
                    f"| {size} | {name} | {v['median_s'] * 1e3:.1f} ms | "
                    f"{_us(v['median_s'], size)} | {ratio:.3f} | {target} | "
                    f"{v['n']} | {v['warmup_s']:.1f} s |"
                )
        lines.append("")
        for size, row in jax_rows.items():
            lines.append(
                f"- {size} members: mean accepted steps {row['mean_steps']:.1f}; "
                f"step counts equal to native: {row['steps_equal']}; largest "
                f"difference of u: {row['max_diff']:.1e}."
            )
        lines.append("")
    if scipy_rows:
        lines += [
            "## SciPy: serial vs a Dask LocalCluster (processes, 1 thread each)",
            "",
            "| members | variant | median | per trajectory | speed-up vs serial "
            "| target | rounds |",
            "|---|---|---|---|---|---|---|",
        ]
        for size, row in scipy_rows.items():
            t = row["timings"]
            ref = t["serial"]["median_s"]
            for name, v in t.items():
                target = f">= {SCIPY_TARGET}" if "2 workers" in name else ""
                lines.append(
                    f"| {size} | {name} | {v['median_s']:.2f} s | "
                    f"{_us(v['median_s'], size)} | {ref / v['median_s']:.2f}x | "
                    f"{target} | {v['n']} |"
                )
        lines.append("")
        for size, row in scipy_rows.items():
            lines.append(
                f"- {size} members: mean nfev {row['nfev']:.0f} per member; the "
                f"cluster's u equal to the serial one bit for bit: {row['same']}."
            )
        lines.append("")
    lines.append(f"Total run {total:.0f} s.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10_000])
    parser.add_argument("--scipy-sizes", type=int, nargs="*", default=[1000])
    parser.add_argument("--repeat", type=int, default=0, help="rounds (0: budget)")
    parser.add_argument("--budget", type=float, default=15.0, help="s per group")
    parser.add_argument("--one-worker", action="store_true", help="also 1 worker")
    parser.add_argument("--quick", action="store_true", help="small, few rounds")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.scipy_sizes, args.repeat = [100], [64], 3
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    jax_rows = {n: jax_group(n, args.repeat, args.budget) for n in args.sizes}
    for n, row in jax_rows.items():
        print(n, {k: v.get("median_s") for k, v in row["timings"].items()})
    scipy_rows = {
        n: scipy_group(n, args.repeat, args.one_worker) for n in args.scipy_sizes
    }
    for n, row in scipy_rows.items():
        print(n, {k: v.get("median_s") for k, v in row["timings"].items()})
    load = f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    text = report(jax_rows, scipy_rows, time.perf_counter() - start, load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
