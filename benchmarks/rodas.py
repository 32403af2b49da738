"""torch's Rosenbrock methods: rodas4 against rosenbrock23 (and SciPy's lsoda).

The built-in stiff problems ROBER (to t = 1e11) and HIRES, float64, each
problem's saves and atol/rtol ratio: median wall time of `dk.solve`, accepted
and rejected steps, and the largest relative error against the IVP test set's
reference values. Variants: rosenbrock23 and rodas4 at rtol 1e-6; rodas4 at
1e-8 and with the analytic Jacobian (``prob.jac``, ROBER only); SciPy's lsoda
through diffeqkit at 1e-6 (JAX's or PyTorch's AD Jacobian), the yardstick of
issue 15. Interleaved rounds after a warm-up call (timed apart), one torch
thread. Writes ``benchmarks/results/rodas.md``.

Run: python benchmarks/rodas.py [--repeat N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from overhead import interleaved

import diffeqkit as dk

OUT = Path(__file__).parent / "results" / "rodas.md"


def _error(bp: dk.problems.BuiltinProblem, sol: dk.Solution) -> float:
    assert bp.reference is not None
    u = np.asarray(sol.u[-1])
    return float(np.max(np.abs(u - bp.reference.u) / np.abs(bp.reference.u)))


def _variants(name: str) -> dict[str, Any]:
    out = {}
    cases = [
        ("torch", "rosenbrock23", 1e-6, False),
        ("torch", "rodas4", 1e-6, False),
        ("torch", "rodas4", 1e-8, False),
        ("scipy", "lsoda", 1e-6, False),
    ]
    if name == "rober":
        cases.insert(3, ("torch", "rodas4", 1e-6, True))
    for backend, alg, rtol, jac in cases:
        bp = dk.problems.get(name, jac=True) if jac else dk.problems.get(name)
        key = f"{backend}/{alg} rtol={rtol:.0e}" + (" prob.jac" if jac else "")

        def run(bp=bp, backend=backend, alg=alg, rtol=rtol) -> dk.Solution:
            return dk.solve(
                bp.prob,
                alg,
                backend=backend,
                saveat=bp.saveat,
                rtol=rtol,
                atol=rtol * bp.atol / bp.rtol,
                max_steps=200_000,
            )

        out[key] = (bp, run)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    lines = []
    for name in ("rober", "hires"):
        variants = _variants(name)
        timings = interleaved({k: v[1] for k, v in variants.items()}, args.repeat)
        base = timings["torch/rosenbrock23 rtol=1e-06"]["median_s"]
        for key, (bp, fn) in variants.items():
            sol = fn()
            s = sol.stats
            t = timings[key]
            row = (
                f"| {name} | {key} | {t['median_s'] * 1e3:.0f} | "
                f"{t['warmup_s'] * 1e3:.0f} | {t['median_s'] / base:.3f} | "
                f"{s.get('naccept')}+{s.get('nreject')} | {s.get('nfev')} | "
                f"{_error(bp, sol):.1e} |"
            )
            print(row, flush=True)
            lines.append(row)
    header = [
        "# torch's Rosenbrock methods: rodas4 against rosenbrock23",
        "",
        "(benchmarks/rodas.py) `dk.solve` of the built-in problems with their",
        "saves and atol/rtol ratio, float64, one torch thread; interleaved rounds,",
        "medians; ratio to torch/rosenbrock23 at rtol=1e-6 on the same problem.",
        "error: largest relative error against the IVP test set's reference.",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S')}, {args.repeat} timed rounds, "
        f"torch {torch.__version__}, {time.perf_counter() - start:.0f} s.",
        "",
        "| problem | variant | median (ms) | first call (ms) | ratio | steps "
        "(accepted+rejected) | nfev | error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
