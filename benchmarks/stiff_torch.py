"""Stiff problems on torch: rodas4 eager and compiled against SciPy and JAX.

The built-in stiff problems ROBER (to t = 1e11), Van der Pol (mu = 1000) and
HIRES, float64, each problem's saves and atol/rtol ratio, rtol = 1e-6 (and
rodas4 compiled at 1e-4, the same compiled code): median
wall time of `dk.solve`, accepted and rejected steps, and the largest relative
error against the IVP test set's reference values at the end. Variants:
torch's rodas4 on the eager driver and on the compiled engine
(``DIFFEQKIT_TORCH_ENGINE``), rosenbrock23 compiled; SciPy's lsoda and radau
through diffeqkit (Jacobians by JAX's AD); JAX's kvaerno5. The first call
(compilation) is timed apart. Target (issue 15): ROBER on torch within 10x of
lsoda through diffeqkit, at an error at least as small. One torch thread.
Writes ``benchmarks/results/stiff_torch.md``.

Run: python benchmarks/stiff_torch.py [--repeat N] [--problems rober ...]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from overhead import interleaved

import diffeqkit as dk

OUT = Path(__file__).parent / "results" / "stiff_torch.md"
ENV = "DIFFEQKIT_TORCH_ENGINE"
RTOL = 1e-6
# (label, backend, alg, engine mode or None, rtol)
CASES = [
    ("torch/rodas4 eager", "torch", "rodas4", "eager", RTOL),
    ("torch/rodas4 compiled", "torch", "rodas4", "compiled", RTOL),
    # The same compiled code at a looser tolerance (tolerances never
    # recompile): rodas4's error there is still below lsoda's at 1e-6.
    ("torch/rodas4 compiled rtol=1e-4", "torch", "rodas4", "compiled", 1e-4),
    ("torch/rosenbrock23 compiled", "torch", "rosenbrock23", "compiled", RTOL),
    ("scipy/lsoda", "scipy", "lsoda", None, RTOL),
    ("scipy/radau", "scipy", "radau", None, RTOL),
    ("jax/kvaerno5", "jax", "kvaerno5", None, RTOL),
]
NAMES = {"rober": "rober", "vdp": "van_der_pol", "hires": "hires"}


def _error(bp: dk.problems.BuiltinProblem, sol: dk.Solution) -> float:
    assert bp.reference is not None
    u = np.asarray(sol.u[-1])
    return float(np.max(np.abs(u - bp.reference.u) / np.abs(bp.reference.u)))


# Seconds compiling, of each variant's first call.
FIRST_COMPILE: dict[str, float] = {}


def _runner(
    label: str,
    bp: dk.problems.BuiltinProblem,
    backend: str,
    alg: str,
    mode: str | None,
    rtol: float,
) -> Callable[[], dk.Solution]:
    def run() -> dk.Solution:
        if mode is not None:
            os.environ[ENV] = mode
        try:
            sol = dk.solve(
                bp.prob,
                alg,
                backend=backend,
                saveat=bp.saveat,
                rtol=rtol,
                atol=rtol * bp.atol / bp.rtol,
                max_steps=200_000,
            )
        finally:
            os.environ.pop(ENV, None)
        if "compile_s" in sol.stats:
            FIRST_COMPILE.setdefault(label, sol.stats["compile_s"])
        return sol

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--problems", nargs="+", default=list(NAMES))
    args = parser.parse_args()
    import jax
    import torch

    jax.config.update("jax_enable_x64", True)
    torch.set_num_threads(1)
    start = time.perf_counter()
    load = os.getloadavg()[0]
    lines = []
    for short in args.problems:
        bp = dk.problems.get(NAMES[short])
        variants = {
            label: _runner(f"{short} {label}", bp, backend, alg, mode, rtol)
            for label, backend, alg, mode, rtol in CASES
        }
        timings = interleaved(variants, args.repeat)
        base = timings["scipy/lsoda"]["median_s"]
        for label, fn in variants.items():
            sol = fn()
            s: dict[str, Any] = dict(sol.stats)
            t = timings[label]
            compile_s = FIRST_COMPILE.get(f"{short} {label}")
            row = (
                f"| {short} | {label} | {t['median_s'] * 1e3:.0f} | "
                f"{t['warmup_s']:.1f} | "
                f"{'' if compile_s is None else f'{compile_s:.1f}'} | "
                f"{t['median_s'] / base:.2f} | "
                f"{s.get('naccept')}+{s.get('nreject')} | {s.get('nfev')} | "
                f"{_error(bp, sol):.1e} |"
            )
            print(row, flush=True)
            lines.append(row)
    header = [
        "# Stiff problems on torch: rodas4 eager and compiled, SciPy, JAX",
        "",
        "(benchmarks/stiff_torch.py) `dk.solve` of the built-in problems with",
        f"their saves and atol/rtol ratio at rtol={RTOL:.0e} (unless the variant",
        "says otherwise), float64, one torch",
        "thread; interleaved rounds, medians; ratio: median over scipy/lsoda's",
        "on the same problem. first call: the warm-up call (compilation, s);",
        "compile: the engine's `stats['compile_s']` of that call. error: largest",
        "relative error at the end against the IVP test set's reference.",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S')}, {args.repeat} timed rounds, "
        f"torch {torch.__version__}, jax {jax.__version__}, "
        f"{time.perf_counter() - start:.0f} s; 2 cores shared with other jobs, "
        f"load average {load:.1f} at the start.",
        "",
        "| problem | variant | median (ms) | first call (s) | compile (s) | "
        "ratio to lsoda | steps (accepted+rejected) | nfev | error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
