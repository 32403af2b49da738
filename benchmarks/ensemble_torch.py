"""Torch ensembles: diffeqkit's batched solver against the alternatives, per trajectory.

Requirements met here (issue 16, torch):

- Problem: Lotka-Volterra, u0 = (1, 1) and p = (1.5, 1, 3, 1), each member's u0
  and p spread uniformly by +-20% (seeded), t in [0, 10], 101 save times, rtol =
  1e-6, atol = 1e-8, float64, torch pinned to one intra-op thread.
- Variants, interleaved round-robin in one run (medians, quartiles; the first
  call of each is timed apart as warm-up), for B = 1,000 and 10,000 members and
  the algs tsit5 and dopri5:

  * ensemble: ``diffeqkit.backends.torch._ensemble.solve_ensemble`` (what
    ``dk.solve(dk.EnsembleProblem(...))`` runs on torch), the user's
    single-member f vmapped, per-member steps, finished members dropped;
  * loop: ``dk.solve`` member by member; timed on the first 50 members and
    extrapolated (per trajectory, the cost does not depend on B);
  * torchode 1.0.1: ``AutoDiffAdjoint`` with the same tableau, an
    ``IntegralController`` at the same tolerances (same controller constants:
    safety 0.9, factors in [0.2, 10]) and a batched f with per-member p as
    ``args``; per-member steps, but every member is evaluated until the last is
    done;
  * stacked: the batch as one ODE of B*2 states through ``dk.solve`` (one error
    norm: every member takes the hardest member's steps), as torchdiffeq users do.

- Reported: seconds per trajectory (median / B) and ratios; the evaluations of f
  per member each solver really made (ensemble: the rows it evaluated; torchode:
  rows evaluated, counted in its f; stacked: nfev); the largest difference of each
  variant's u from the loop's, relative to the state's scale.

Targets: ensemble at least 10x faster than the loop per trajectory, and no slower
than torchode.

Run: python benchmarks/ensemble_torch.py [--sizes 1000 10000] [--algs tsit5 dopri5]
     [--repeat N] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffeqkit as dk
from diffeqkit._solve import build_request
from diffeqkit.backends.torch._ensemble import integrate, solve_ensemble

F64 = torch.float64
U0 = torch.tensor([1.0, 1.0], dtype=F64)
P = torch.tensor([1.5, 1.0, 3.0, 1.0], dtype=F64)
TSPAN = (0.0, 10.0)
TS = np.linspace(0.0, 10.0, 101)
RTOL, ATOL = 1e-6, 1e-8
LOOP = 50  # members the loop solves per round (extrapolated per trajectory)
OUT = Path(__file__).parent / "results" / "ensemble_torch.md"


def lv(u, p, t):
    """One member's Lotka-Volterra: u (2,), p (4,)."""
    x, y = u[0], u[1]
    return torch.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y])


def lv_batched(u, p):
    """The batch's: u (B, 2), p (B, 4)."""
    x, y = u[:, 0], u[:, 1]
    return torch.stack(
        [p[:, 0] * x - p[:, 1] * x * y, -p[:, 2] * y + p[:, 3] * x * y], dim=1
    )


def members(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    us = U0 * (1 + 0.4 * (torch.rand(size, 2, generator=gen, dtype=F64) - 0.5))
    ps = P * (1 + 0.4 * (torch.rand(size, 4, generator=gen, dtype=F64) - 0.5))
    return us, ps


def interleaved(
    variants: dict[str, Callable[[], Any]], repeat: int
) -> dict[str, dict[str, float]]:
    """Round-robin timing; the first call of each variant is the warm-up."""
    out: dict[str, dict[str, float]] = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        fn()
        out[name] = {"warmup_s": time.perf_counter() - start}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        q1, med, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else ts * 3
        out[name].update({"median_s": med, "q1_s": q1, "q3_s": q3, "n": len(ts)})
    return out


def group(size: int, alg: str, repeat: int) -> dict[str, Any]:
    import torchode as to

    us, ps = members(size)
    prob = dk.ODEProblem(lv, U0, TSPAN, P)
    kw: dict[str, Any] = {"saveat": TS, "rtol": RTOL, "atol": ATOL}
    req = build_request(prob, alg, **kw)

    def ensemble() -> torch.Tensor:
        return solve_ensemble(req, us, ps, size).u

    def loop() -> torch.Tensor:
        return torch.stack(
            [
                dk.solve(dk.ODEProblem(lv, us[i], TSPAN, ps[i]), alg, **kw).u
                for i in range(LOOP)
            ]
        )

    rows = {"torchode": 0}

    def f_torchode(t, y, p):
        rows["torchode"] += y.shape[0]
        return lv_batched(y, p)

    term = to.ODETerm(f_torchode, with_args=True)
    method = {"tsit5": to.Tsit5, "dopri5": to.Dopri5}[alg](term=term)
    controller = to.IntegralController(atol=ATOL, rtol=RTOL, term=term)
    solver = to.AutoDiffAdjoint(method, controller)
    t_eval = torch.as_tensor(TS, dtype=F64).expand(size, -1)

    def torchode() -> torch.Tensor:
        sol = solver.solve(to.InitialValueProblem(y0=us, t_eval=t_eval), args=ps)
        return sol.ys

    stacked_prob = dk.ODEProblem(lambda u, p, t: lv_batched(u, p), us, TSPAN, ps)
    stacked_nfev = {"n": 0}

    def stacked() -> torch.Tensor:
        sol = dk.solve(stacked_prob, alg, **kw)
        stacked_nfev["n"] = sol.stats["nfev"]
        return sol.u.transpose(0, 1)

    variants = {
        "ensemble": ensemble,
        "loop": loop,
        "torchode": torchode,
        "stacked": stacked,
    }
    # Accuracy against the loop, and the evaluations each made (untimed runs).
    ref = loop()
    scale = ref.abs().max()
    errors = {
        name: float((fn()[:LOOP] - ref).abs().max() / scale)
        for name, fn in variants.items()
        if name != "loop"
    }
    rows["torchode"] = 0
    torchode()
    _, run, rhs = integrate(req, us, ps, size)
    evals = {
        "ensemble": rhs.member_evals / size,
        "torchode": rows["torchode"] / size,
        "stacked": float(stacked_nfev["n"]),
        "own steps (mean nfev)": float(np.mean(run.nfev)),
        "own steps (max nfev)": float(np.max(run.nfev)),
    }
    timing = interleaved(variants, repeat)
    per = {
        name: t["median_s"] / (LOOP if name == "loop" else size)
        for name, t in timing.items()
    }
    return {
        "size": size,
        "alg": alg,
        "timing": timing,
        "per_trajectory_s": per,
        "errors": errors,
        "evals": evals,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| B | alg | variant | median s/call | s per trajectory | loop / this | "
        "this / torchode | f evals per member | max rel. diff to loop | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per = r["per_trajectory_s"]
        for name, t in r["timing"].items():
            evals = r["evals"].get(name)
            lines.append(
                f"| {r['size']} | {r['alg']} | {name} | {t['median_s']:.4g} "
                f"[{t['q1_s']:.3g}, {t['q3_s']:.3g}] | {per[name]:.3g} | "
                f"{per['loop'] / per[name]:.1f} | {per[name] / per['torchode']:.2f} | "
                f"{'-' if evals is None else f'{evals:.0f}'} | "
                f"{r['errors'].get(name, 0.0):.1e} | {t['n']} |"
            )
    lines.append("")
    for r in results:
        e = r["evals"]
        lines.append(
            f"- B={r['size']} {r['alg']}: members' own solves take "
            f"{e['own steps (mean nfev)']:.0f} evaluations of f on average, "
            f"{e['own steps (max nfev)']:.0f} at most."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--algs", nargs="+", default=["tsit5", "dopri5"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="B=100, 2 rounds")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sizes, repeat = ([100], 2) if args.quick else (args.sizes, args.repeat)
    results = []
    for size in sizes:
        for alg in args.algs:
            start = time.perf_counter()
            results.append(group(size, alg, repeat))
            print(f"B={size} {alg}: {time.perf_counter() - start:.1f} s", flush=True)
    import torchode

    text = "\n".join(
        [
            "# Torch ensembles per trajectory: a loop, torchode, one stacked ODE",
            "",
            "Written by `benchmarks/ensemble_torch.py` (see its docstring for the "
            "setup). Lotka-Volterra, +-20% spread in u0 and p, t in [0, 10], 101 "
            "saves, rtol=1e-6, atol=1e-8, float64, one torch thread. The loop is "
            f"timed on {LOOP} members and extrapolated per trajectory. "
            "`loop / this` > 1 is faster than the loop; `this / torchode` < 1 is "
            "faster than torchode.",
            "",
            f"torch {torch.__version__}, torchode {torchode.__version__}, Python "
            f"{platform.python_version()}, {platform.machine()}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            table(results),
            "",
        ]
    )
    print(text)
    if not args.quick:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
