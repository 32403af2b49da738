"""Gradient methods compared: cost ratios, memory and crossover.

Three measurements, each written to ``benchmarks/results/sensealg.json``:

1. ``ratios``: gradient time / forward time for every installed backend x sensealg
   on Lotka-Volterra (u0 = [1, 1], p = [1.5, 1, 3, 1], t in [0, 10], 101 saves)
   and on a small neural ODE (2 -> 16 -> 2 tanh MLP, 82 parameters, t in [0, 1],
   21 saves), rtol 1e-6, atol 1e-8, tsit5, float64, loss = sum(u**2). Forward:
   `dk.solve`; gradient: the path a user takes (JAX: jitted ``jax.value_and_grad``
   through `dk.solve`; torch: ``loss.backward()``; SciPy: `dk.value_and_grad`).
2. ``crossover``: gradient time against the number of inputs (u0.size + number of
   parameters) for the neural ODE of widths 1..64, per backend x sensealg; where
   ForwardMode stops winning sets the registry's `forward_mode_max_inputs`
   (`diffeqkit/backends/__init__.py`).
3. ``memory``: peak memory of the gradient of a long integration (rk4, 10,000
   fixed steps, neural ODE with a 32-dimensional state and 64 hidden units), each
   variant in its own subprocess: the rise of the peak resident set size
   (ru_maxrss) over the resident size just before the gradient call.
Timings: variants of one group run interleaved (round-robin, one call each per
round) after a warm-up call (whose time, for JAX the compile time, is reported
separately); medians and quartiles, ratios of medians (`overhead.interleaved`).
torch runs one intra-op thread.

Each sensealg through dk against the same computation written directly in
diffrax, torchdiffeq and SciPy (what was part 4 here, JAX only) is
``benchmarks/overhead.py --part gradient``.

Run: python benchmarks/sensealg.py [--repeat N] [--quick] [--only PART ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from overhead import interleaved  # this directory is on sys.path when run

import diffeqkit as dk
from diffeqkit import backends
from diffeqkit._info import versions

RTOL, ATOL = 1e-6, 1e-8
SENSEALGS = {
    "ForwardMode": dk.ForwardMode(),
    "ReverseThroughSolver": dk.ReverseThroughSolver(),
    "ContinuousAdjoint": dk.ContinuousAdjoint(),
    "CheckpointedAdjoint": dk.CheckpointedAdjoint(),
}
OUT = Path(__file__).parent / "results" / "sensealg.json"


# ---------------------------------------------------------------------------------
# Problems, written once against the Array API.
# ---------------------------------------------------------------------------------


def lotka_volterra(u, p, t):
    xp = dk.array_namespace(u)
    a, b, c, d = p[0], p[1], p[2], p[3]
    return xp.stack([a * u[0] - b * u[0] * u[1], -c * u[1] + d * u[0] * u[1]])


def mlp(u, p, t):
    xp = dk.array_namespace(u)
    return p["W2"] @ xp.tanh(p["W1"] @ u + p["b1"]) + p["b2"]


def mlp_params(width: int, dim: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.normal(scale=1 / np.sqrt(dim), size=(width, dim)),
        "b1": rng.normal(scale=0.1, size=width),
        "W2": rng.normal(scale=1 / np.sqrt(width), size=(dim, width)),
        "b2": rng.normal(scale=0.1, size=dim),
    }


def problem(name: str, width: int = 16) -> tuple[dk.ODEProblem, np.ndarray]:
    if name == "lotka_volterra":
        prob = dk.ODEProblem(
            lotka_volterra,
            np.array([1.0, 1.0]),
            (0.0, 10.0),
            np.array([1.5, 1.0, 3.0, 1.0]),
        )
        return prob, np.linspace(0.0, 10.0, 101)
    prob = dk.ODEProblem(mlp, np.array([1.0, -0.5]), (0.0, 1.0), mlp_params(width))
    return prob, np.linspace(0.0, 1.0, 21)


def n_inputs(prob: dk.ODEProblem) -> int:
    from diffeqkit._sensealg import input_size

    return input_size(prob.u0, prob.p)


# ---------------------------------------------------------------------------------
# Per-backend callables: forward and gradient, as a user writes them.
# ---------------------------------------------------------------------------------


def _as(backend: str, tree: Any) -> Any:
    from diffeqkit._pytree import tree_map

    if backend == "jax":
        import jax.numpy as jnp

        return tree_map(lambda x: jnp.asarray(x), tree)
    if backend == "torch":
        import torch

        return tree_map(lambda x: torch.as_tensor(np.asarray(x)), tree)
    return tree


def calls(
    backend: str, prob: dk.ODEProblem, ts: np.ndarray, sensealg: Any, **kw: Any
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(forward, gradient) zero-argument callables that block until done."""
    alg = kw.pop("alg", "tsit5")
    opts = {"alg": alg, "saveat": ts, "rtol": RTOL, "atol": ATOL, **kw}
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        u0, p = _as("jax", prob.u0), _as("jax", prob.p)

        def loss(u0: Any, p: Any) -> Any:
            sol = dk.solve(prob.remake(u0=u0, p=p), sensealg=sensealg, **opts)
            return jnp.sum(sol.u**2)

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        fwd = jax.jit(loss)
        return (
            lambda: fwd(u0, p).block_until_ready(),
            lambda: jax.block_until_ready(grad(u0, p)),
        )
    if backend == "torch":
        import torch

        from diffeqkit._pytree import leaves

        def forward() -> Any:
            with torch.no_grad():
                return dk.solve(
                    prob.remake(u0=_as("torch", prob.u0), p=_as("torch", prob.p)),
                    **opts,
                )

        def gradient() -> Any:
            u0 = _as("torch", prob.u0).requires_grad_()
            p = _as("torch", prob.p)
            for x in leaves(p):
                x.requires_grad_()
            sol = dk.solve(prob.remake(u0=u0, p=p), sensealg=sensealg, **opts)
            loss = (sol.u**2).sum()
            loss.backward()
            return loss

        return forward, gradient

    def sq(sol: Any) -> Any:
        xp = dk.array_namespace(sol.u)
        return xp.sum(sol.u**2)

    return (
        lambda: dk.solve(prob, backend="scipy", **opts),
        lambda: dk.value_and_grad(sq, prob, backend="scipy", sensealg=sensealg, **opts),
    )


# ---------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------


SELECTED: list[str] = []


def installed_backends() -> list[str]:
    return [
        b
        for b in backends.SPECS
        if backends.installed(b) and (not SELECTED or b in SELECTED)
    ]


def part_ratios(repeat: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in ("lotka_volterra", "neural_ode"):
        prob, ts = problem(name)
        results[name] = {"inputs": n_inputs(prob)}
        for backend in installed_backends():
            reps = max(3, repeat // (10 if backend == "torch" else 1))
            variants: dict[str, Callable[[], Any]] = {}
            for sname, sensealg in SENSEALGS.items():
                if sname not in backends.SPECS[backend].capabilities.sensealgs:
                    continue
                fwd, grad = calls(backend, prob, ts, sensealg)
                variants.setdefault("forward", fwd)
                variants[sname] = grad
            timed = interleaved(variants, reps)
            base = timed["forward"]["median_s"]
            for v in timed.values():
                if "median_s" in v:
                    v["ratio_to_forward"] = v["median_s"] / base
            results[name][backend] = timed
            print(
                name,
                backend,
                {k: round(v.get("ratio_to_forward", -1), 2) for k, v in timed.items()},
                flush=True,
            )
    return results


def part_crossover(repeat: int, widths: list[int]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for backend in installed_backends():
        rows = []
        for width in widths:
            prob, ts = problem("neural_ode", width)
            variants = {}
            for sname in ("ForwardMode", "CheckpointedAdjoint", "ReverseThroughSolver"):
                if sname in backends.SPECS[backend].capabilities.sensealgs:
                    variants[sname] = calls(backend, prob, ts, SENSEALGS[sname])[1]
            reps = max(3, repeat // (10 if backend == "torch" else 2))
            timed = interleaved(variants, reps)
            row = {"width": width, "inputs": n_inputs(prob)}
            row.update({k: v.get("median_s") for k, v in timed.items()})
            rows.append(row)
            print("crossover", backend, row, flush=True)
        results[backend] = rows
    return results


# ---------------------------------------------------------------------------------
# Memory: one subprocess per variant.
# ---------------------------------------------------------------------------------

MEMORY_STEPS = 10_000


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def memory_child(backend: str, sname: str) -> dict[str, Any]:
    """Run in a subprocess: peak memory rise of one long gradient."""
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
    dim, width = 32, 64
    rng = np.random.default_rng(0)
    p = mlp_params(width, dim)
    prob = dk.ODEProblem(mlp, rng.normal(size=dim), (0.0, 10.0), p)
    ts = np.linspace(0.0, 10.0, 11)
    kw = {"dt0": 10.0 / MEMORY_STEPS, "max_steps": MEMORY_STEPS + 20}
    extra: dict[str, Any] = {}
    if backend == "jax":
        # Compile ahead of time, so the measured call only runs.
        import jax
        import jax.numpy as jnp

        def loss(u0: Any, p: Any) -> Any:
            sol = dk.solve(
                prob.remake(u0=u0, p=p),
                "rk4",
                saveat=ts,
                sensealg=SENSEALGS[sname],
                **kw,
            )
            return jnp.sum(sol.u**2)

        args = (jnp.asarray(prob.u0), _as("jax", prob.p))
        compiled = (
            jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
        )
        analysis = compiled.memory_analysis()
        if analysis is not None:
            extra["xla_temp_mb"] = analysis.temp_size_in_bytes / 2**20

        def grad() -> Any:
            return jax.block_until_ready(compiled(*args))
    else:
        # Warm up (imports, caches) on a shorter span, then measure the long one.
        small = prob.remake(tspan=(0.0, 1.0))  # a tenth: warms the allocator too
        warm = calls(backend, small, ts / 10, SENSEALGS[sname], alg="rk4", **kw)
        warm[1]()
        grad = calls(backend, prob, ts, SENSEALGS[sname], alg="rk4", **kw)[1]
    before = _rss_bytes()
    start = time.perf_counter()
    grad()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_rise_mb": (peak - before) / 2**20, "time_s": elapsed, **extra}


def part_memory() -> dict[str, Any]:
    results: dict[str, Any] = {
        "steps": MEMORY_STEPS,
        "alg": "rk4",
        "problem": "MLP 32 -> 64 -> 32, t in [0, 10]",
    }
    for backend in installed_backends():
        results[backend] = {}
        for sname in (
            "ReverseThroughSolver",
            "CheckpointedAdjoint",
            "ContinuousAdjoint",
        ):
            if sname not in backends.SPECS[backend].capabilities.sensealgs:
                results[backend][sname] = {"unsupported": True}
                continue
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-child", backend, sname],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                results[backend][sname] = {"error": proc.stderr[-2000:]}
            else:
                results[backend][sname] = json.loads(proc.stdout.splitlines()[-1])
            print("memory", backend, sname, results[backend][sname], flush=True)
    return results


def _versions() -> dict[str, str]:
    return versions("numpy", "scipy", "jax", "diffrax", "torch", "torchdiffeq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="few repeats and widths")
    parser.add_argument(
        "--only",
        nargs="*",
        choices=["ratios", "crossover", "memory"],
    )
    parser.add_argument("--backends", nargs="*", choices=list(backends.SPECS))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--memory-child", nargs=2, metavar=("BACKEND", "SENSEALG"))
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return
    if backends.installed("jax"):
        import jax

        jax.config.update(
            "jax_enable_x64", True
        )  # the user's choice, not the library's
    if backends.installed("torch"):
        import torch

        torch.set_num_threads(1)
    SELECTED.extend(args.backends or [])
    repeat = 3 if args.quick else args.repeat
    widths = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    parts = args.only or ["ratios", "crossover", "memory"]
    results: dict[str, Any] = {}
    if args.out.exists():
        results = json.loads(args.out.read_text())
    results["machine"] = {
        "python": platform.python_version(),
        "cpus": __import__("os").cpu_count(),
        "versions": _versions(),
    }
    for part in parts:
        fn = {
            "ratios": lambda: part_ratios(repeat),
            "crossover": lambda: part_crossover(repeat, widths),
            "memory": part_memory,
        }[part]
        results[part] = fn()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
