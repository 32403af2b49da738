"""Lotka-Volterra written once, solved on every installed backend.

Run: python examples/lotka_volterra.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import diffeqkit as dk


def lotka_volterra(u, p, t):
    xp = dk.array_namespace(u)
    a, b, c, d = p[0], p[1], p[2], p[3]
    return xp.stack([a * u[0] - b * u[0] * u[1], -c * u[1] + d * u[0] * u[1]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one alg, no timing")
    args = parser.parse_args(argv)

    prob = dk.ODEProblem(
        lotka_volterra,
        np.array([1.0, 1.0]),
        (0.0, 10.0),
        np.array([1.5, 1.0, 3.0, 1.0]),
    )
    algs = ["tsit5"] if args.quick else ["tsit5", "dopri5", "dopri8"]
    print(
        f"{'backend':<7} {'alg':<7} {'nfev':>5} {'naccept':>7} {'nreject':>7} "
        f"{'u(10)':>24} {'time':>9}"
    )
    for backend in dk.support_matrix():
        for alg in algs:
            kwargs = dict(backend=backend, saveat=0.1, rtol=1e-6, atol=1e-8)
            if backend == "jax":
                kwargs["dtype"] = _jax_dtype()
            dk.solve(prob, alg, **kwargs)  # warm-up (JAX compiles here)
            start = time.perf_counter()
            sol = dk.solve(prob, alg, **kwargs)
            elapsed = time.perf_counter() - start
            end = np.asarray(sol.u[-1].tolist())
            s = sol.stats
            print(
                f"{backend:<7} {alg:<7} {s['nfev']!s:>5} {s['naccept']!s:>7} "
                f"{s['nreject']!s:>7} {np.array2string(end, precision=6):>24} "
                f"{elapsed * 1e3:7.2f}ms"
            )
    return 0


def _jax_dtype() -> str:
    # float64 needs JAX's x64 mode, which diffeqkit never switches on for you.
    import jax

    return "float64" if jax.config.jax_enable_x64 else "float32"


if __name__ == "__main__":
    raise SystemExit(main())
