"""Overhead of dk.solve against the same computation written directly in each library.

Lotka-Volterra, u0 = [1, 1], p = [1.5, 1, 3, 1], t in [0, 10], 101 save points,
rtol = 1e-6, atol = 1e-8, float64. All variants run in one process, interleaved
(round-robin, one call each per round) so machine noise hits them alike; we report
medians, quartiles and ratios of medians. PyTorch is pinned to one intra-op thread
in this process only.

Variants per backend:
- native: the library called directly with a vector field written for it
  (jitted diffrax; torchdiffeq.odeint; scipy.integrate.solve_ivp);
- dk (same f): dk.solve with that very vector field, so the ratio is the pure
  adapter overhead;
- dk (array-api f): dk.solve with the backend-neutral f a diffeqkit user writes
  (``xp = dk.array_namespace(u)``), the end-to-end cost. On NumPy this f is
  slower than a NumPy-native one by itself: ``xp.stack`` of two scalars costs
  ~4 us against ~0.4 us for ``np.array([...])``, times ~600 calls of f;
- JAX only: jitted dk.solve, and eager dk.solve with a new p every call.

Each backend's variants run interleaved (round-robin) among themselves; the
backends run one after another.

Targets (issue #3): jitted dk.solve <= 1.05x jitted diffrax; eager dk.solve with a
new p <= 3x jitted diffrax; torch and SciPy <= 1.10x their native call.

Run: python benchmarks/overhead.py [--repeat N] [--out FILE]   (or: nox -s bench)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import diffeqkit as dk
from diffeqkit._info import versions

U0 = np.array([1.0, 1.0])
P = np.array([1.5, 1.0, 3.0, 1.0])
TSPAN = (0.0, 10.0)
TS = np.linspace(0.0, 10.0, 101)
RTOL, ATOL = 1e-6, 1e-8
MAX_STEPS = 100_000


def lv_array_api(u, p, t):
    xp = dk.array_namespace(u)
    a, b, c, d = p[0], p[1], p[2], p[3]
    return xp.stack([a * u[0] - b * u[0] * u[1], -c * u[1] + d * u[0] * u[1]])


def jax_variants() -> dict[str, Callable[[], Any]]:
    import diffrax
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)  # a user's script may; the library never

    def lv_jax(u, p, t):
        return jnp.stack(
            [p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]]
        )

    ts = jnp.asarray(TS)

    @jax.jit
    def native(y0, p):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: lv_jax(y, args, t)),
            diffrax.Tsit5(),
            TSPAN[0],
            TSPAN[1],
            None,
            y0,
            p,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=MAX_STEPS,
        )
        return sol.ys

    prob = dk.ODEProblem(lv_jax, jnp.asarray(U0), TSPAN, jnp.asarray(P))
    prob_api = prob.remake(f=lv_array_api)
    kw = {
        "backend": "jax",
        "saveat": TS,
        "rtol": RTOL,
        "atol": ATOL,
        "max_steps": MAX_STEPS,
    }

    @jax.jit
    def dk_jit(y0, p):
        return dk.solve(prob.remake(u0=y0, p=p), "tsit5", **kw).u

    y0, p0 = jnp.asarray(U0), jnp.asarray(P)
    rng = np.random.default_rng(0)

    def eager_new_p(problem):
        def run():
            p = jnp.asarray(P * (1 + 1e-3 * rng.standard_normal(4)))
            return dk.solve(problem.remake(p=p), "tsit5", **kw).u.block_until_ready()

        return run

    return {
        "jax native diffrax (jit)": lambda: native(y0, p0).block_until_ready(),
        "jax dk.solve inside jit": lambda: dk_jit(y0, p0).block_until_ready(),
        "jax dk.solve eager, new p (same f)": eager_new_p(prob),
        "jax dk.solve eager, new p (array-api f)": eager_new_p(prob_api),
    }


def torch_variants() -> dict[str, Callable[[], Any]]:
    import torch
    import torchdiffeq

    torch.set_num_threads(1)  # in this benchmark process only

    def lv_torch(u, p, t):
        return torch.stack(
            [p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]]
        )

    y0 = torch.tensor(U0, dtype=torch.float64)
    p = torch.tensor(P, dtype=torch.float64)
    ts = torch.tensor(TS, dtype=torch.float64)

    def native():
        return torchdiffeq.odeint(
            lambda t, y: lv_torch(y, p, t),
            y0,
            ts,
            method="dopri5",
            rtol=RTOL,
            atol=ATOL,
        )

    prob = dk.ODEProblem(lv_torch, y0, TSPAN, p)
    prob_api = prob.remake(f=lv_array_api)
    kw = {"backend": "torch", "saveat": TS, "rtol": RTOL, "atol": ATOL}
    return {
        "torch native torchdiffeq dopri5": native,
        "torch dk.solve dopri5 (same f)": lambda: dk.solve(prob, "dopri5", **kw).u,
        "torch dk.solve dopri5 (array-api f)": lambda: (
            dk.solve(prob_api, "dopri5", **kw).u
        ),
    }


def scipy_variants() -> dict[str, Callable[[], Any]]:
    from scipy.integrate import solve_ivp

    def lv_np(u, p, t):
        return np.array(
            [p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]]
        )

    def native():
        return solve_ivp(
            lambda t, y: lv_np(y, P, t),
            TSPAN,
            U0,
            method="RK45",
            t_eval=TS,
            rtol=RTOL,
            atol=ATOL,
        ).y

    prob = dk.ODEProblem(lv_np, U0, TSPAN, P)
    prob_api = prob.remake(f=lv_array_api)
    kw = {"backend": "scipy", "saveat": TS, "rtol": RTOL, "atol": ATOL}
    return {
        "scipy native solve_ivp RK45": native,
        "scipy dk.solve dopri5 (same f)": lambda: dk.solve(prob, "dopri5", **kw).u,
        "scipy dk.solve dopri5 (array-api f)": lambda: (
            dk.solve(prob_api, "dopri5", **kw).u
        ),
    }


# Timed rounds per backend: enough for a stable median of ~0.2 ms JAX calls,
# affordable for ~150 ms torchdiffeq calls.
DEFAULT_REPEAT = {"jax": 2000, "torch": 40, "scipy": 300}
GROUPS = {"jax": jax_variants, "torch": torch_variants, "scipy": scipy_variants}
# (variant, baseline, target ratio of medians)
TARGETS = [
    ("jax dk.solve inside jit", "jax native diffrax (jit)", 1.05),
    ("jax dk.solve eager, new p (same f)", "jax native diffrax (jit)", 3.0),
    ("jax dk.solve eager, new p (array-api f)", "jax native diffrax (jit)", 3.0),
    ("torch dk.solve dopri5 (same f)", "torch native torchdiffeq dopri5", 1.10),
    ("torch dk.solve dopri5 (array-api f)", "torch native torchdiffeq dopri5", 1.10),
    ("scipy dk.solve dopri5 (same f)", "scipy native solve_ivp RK45", 1.10),
    ("scipy dk.solve dopri5 (array-api f)", "scipy native solve_ivp RK45", 1.10),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, default=0, help="timed rounds (default: per backend)"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backends", nargs="*", default=list(dk.support_matrix()))
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "overhead.json")
    )
    args = parser.parse_args(argv)

    times: dict[str, list[float]] = {}
    for group in args.backends:
        # Interleave within a backend's group only: a 150 ms torch call between two
        # 0.2 ms JAX calls would evict caches and skew the fast ones.
        variants = GROUPS[group]()
        repeat = args.repeat or DEFAULT_REPEAT[group]
        for fn in variants.values():
            for _ in range(args.warmup):
                fn()
        group_times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeat):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                group_times[name].append(time.perf_counter() - start)
        times.update(group_times)

    rows = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        rows[name] = {
            "median_s": statistics.median(ts),
            "q1_s": q[0],
            "q3_s": q[2],
            "n": len(ts),
        }
    ratios = []
    for variant, base, target in TARGETS:
        if variant in rows and base in rows:
            r = rows[variant]["median_s"] / rows[base]["median_s"]
            ratios.append(
                {
                    "variant": variant,
                    "baseline": base,
                    "ratio": r,
                    "target": target,
                    "met": r <= target,
                }
            )

    print(f"{'variant':<44} {'median':>10} {'q1':>10} {'q3':>10}")
    for name, row in rows.items():
        print(
            f"{name:<44} {row['median_s'] * 1e3:8.3f}ms "
            f"{row['q1_s'] * 1e3:8.3f}ms {row['q3_s'] * 1e3:8.3f}ms"
        )
    print()
    print(f"{'variant / baseline':<44} {'ratio':>7} {'target':>7}")
    for r in ratios:
        print(
            f"{r['variant']:<44} {r['ratio']:7.3f} {r['target']:7.2f} "
            f"{'ok' if r['met'] else 'MISSED'}"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "overhead: Lotka-Volterra forward solve",
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "machine": {
                    "python": platform.python_version(),
                    "processor": platform.processor(),
                    "cpus": os.cpu_count(),
                },
                "versions": versions(
                    "diffeqkit",
                    "numpy",
                    "jax",
                    "diffrax",
                    "torch",
                    "torchdiffeq",
                    "scipy",
                ),
                "settings": {
                    "repeat": {
                        g: args.repeat or DEFAULT_REPEAT[g] for g in args.backends
                    },
                    "warmup": args.warmup,
                    "rtol": RTOL,
                    "atol": ATOL,
                    "save_points": len(TS),
                },
                "timings": rows,
                "ratios": ratios,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
