"""Stiff solvers compared: time, work and accuracy per backend x implicit alg, and
SciPy's Jacobians by automatic differentiation against finite differences.

Two measurements, each written to ``benchmarks/results/stiff.json``:

1. ``solvers``: every installed backend x implicit alg on the built-in stiff
   problems (`dk.problems`: ROBER to t = 1e11, Van der Pol with mu = 1000, HIRES)
   at one tolerance (rtol 1e-6, atol scaled as each problem's atol/rtol, float64):
   median wall time of `dk.solve`, its stats (nfev, njev, nlu, accepted and
   rejected steps, where the backend can tell) and the largest relative error
   against the IVP test set's reference values.
2. ``jacobian``: SciPy's bdf, radau and lsoda with the Jacobian by automatic
   differentiation (the engine `dk.solve` picks: JAX with x64, else PyTorch)
   against SciPy's own finite differences (forced with
   ``diffeqkit.backends.scipy.finite_difference_jacobians``) on the same problems
   plus the Brusselator with 32 and 256 states, each problem's rtol/atol: times,
   njev and nfev, and the speed-up (median FD time / median AD time).

Timings: the variants of one group run interleaved (round-robin) after a warm-up
call, timed apart (for JAX, the compile); medians and quartiles. torch runs one
intra-op thread.

Run: python benchmarks/stiff.py [--repeat N] [--quick] [--only PART ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
from sensealg import _versions, interleaved

import diffeqkit as dk
from diffeqkit import backends

RTOL = 1e-6
OUT = Path(__file__).parent / "results" / "stiff.json"
# The stiff problems of the collection (the IVP test set's).
STIFF = ("rober", "van_der_pol", "hires")


def _error(bp: dk.problems.BuiltinProblem, sol: dk.Solution) -> float | None:
    if bp.reference is None or not sol.success:
        return None
    u = np.asarray(sol.u[-1])
    return float(np.max(np.abs(u - bp.reference.u) / np.abs(bp.reference.u)))


def _run(
    bp: dk.problems.BuiltinProblem,
    alg: str,
    backend: str,
    rtol: float,
    atol: float,
    fd: bool = False,
) -> dk.Solution:
    ctx: Any = contextlib.nullcontext()
    if fd:
        from diffeqkit.backends.scipy import finite_difference_jacobians

        ctx = finite_difference_jacobians()
    with ctx:
        return dk.solve(
            bp.prob,
            alg,
            backend=backend,
            saveat=bp.saveat,
            rtol=rtol,
            atol=atol,
            throw=False,
        )


def _summary(bp: dk.problems.BuiltinProblem, sol: dk.Solution) -> dict[str, Any]:
    return {"status": sol.status, "error": _error(bp, sol), "stats": dict(sol.stats)}


def part_solvers(repeat: int, selected: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in STIFF:
        bp = dk.problems.get(name)
        atol = RTOL * bp.atol / bp.rtol
        cases = [
            (b, a)
            for b in backends.SPECS
            if backends.installed(b) and (not selected or b in selected)
            for a in backends.implicit_algs(b)
        ]
        variants = {
            f"{b}/{a}": (lambda bp=bp, b=b, a=a, atol=atol: _run(bp, a, b, RTOL, atol))
            for b, a in cases
        }
        timings = interleaved(variants, repeat)
        for key, fn in variants.items():
            timings[key].update(_summary(bp, fn()))
            print(name, key, _line(timings[key]), flush=True)
        out[name] = {"rtol": RTOL, "atol": atol, "results": timings}
    return out


def part_jacobian(repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # The test set's problems have 2 to 8 states; the Brusselator shows how the
    # difference grows with the state's size.
    sized = {f"brusselator(n={n})": dk.problems.brusselator(n) for n in (16, 128)}
    for name, bp in {**{s: dk.problems.get(s) for s in STIFF}, **sized}.items():
        rows: dict[str, Any] = {}
        for alg in backends.implicit_algs("scipy"):
            variants = {
                "ad": lambda bp=bp, alg=alg: _run(bp, alg, "scipy", bp.rtol, bp.atol),
                "fd": lambda bp=bp, alg=alg: _run(
                    bp, alg, "scipy", bp.rtol, bp.atol, True
                ),
            }
            timings = interleaved(variants, repeat)
            for key, fn in variants.items():
                timings[key].update(_summary(bp, fn()))
            timings["speedup"] = timings["fd"]["median_s"] / timings["ad"]["median_s"]
            rows[alg] = timings
            print(name, alg, f"AD {_line(timings['ad'])}", flush=True)
            print(name, alg, f"FD {_line(timings['fd'])}", flush=True)
            print(name, alg, f"speed-up {timings['speedup']:.2f}x", flush=True)
        out[name] = {"rtol": bp.rtol, "atol": bp.atol, "results": rows}
    return out


def _line(r: dict[str, Any]) -> str:
    if "median_s" not in r:
        return r.get("unsupported", "?")
    s = r["stats"]
    err = "-" if r["error"] is None else f"{r['error']:.1e}"
    return (
        f"{r['median_s'] * 1e3:9.1f} ms  {r['status']:<18} err {err:>8}  "
        f"nfev {s.get('nfev')}  njev {s.get('njev')}  nlu {s.get('nlu')}  "
        f"steps {s.get('naccept')}+{s.get('nreject')}  jac {s.get('jacobian', '-')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one timed call each")
    parser.add_argument("--only", nargs="*", choices=["solvers", "jacobian"])
    parser.add_argument("--backends", nargs="*", choices=list(backends.SPECS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if backends.installed("jax"):
        import jax

        jax.config.update("jax_enable_x64", True)  # the user's choice
    if backends.installed("torch"):
        import torch

        torch.set_num_threads(1)
    repeat = 1 if args.quick else args.repeat
    results: dict[str, Any] = {}
    if args.out.exists():
        results = json.loads(args.out.read_text())
    results["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": _versions(),
    }
    for part in args.only or ["solvers", "jacobian"]:
        if part == "solvers":
            results[part] = part_solvers(repeat, args.backends or [])
        else:
            results[part] = part_jacobian(repeat)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
