"""What an event that never fires costs: a solve with ``events=[...]`` against the
same solve without, on SciPy and torch (issue 13's target: at most 1.2x).

Problem: Lotka-Volterra (u0 = [1, 1], p = [1.5, 1, 3, 1], t in [0, 10], 101 save
times), rtol = 1e-6, atol = 1e-8, float64, tsit5, the backend-neutral f. The
event ``u[0] + 1`` (the prey population crossing -1) never fires; it is checked
after every accepted step (one call of the condition per step, plus a sign test).
Groups: the plain solve per backend; and the value and gradient of a sum of
squares through it (SciPy: ForwardMode; torch: ReverseThroughSolver with
``loss.backward()``), where a solve with events that need gradients is run again
segment by segment on torch (so it costs about one more forward solve there).

Variants of one group run interleaved (round-robin, one call each per round,
`overhead.interleaved`), medians and quartiles, ratios of medians to "none".
torch is pinned to one thread.

Run: python benchmarks/events_overhead.py [--repeat N] [--quick]
     writes benchmarks/results/events_overhead.md
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from overhead import interleaved  # this directory is on sys.path when run

import diffeqkit as dk
from diffeqkit._info import versions

U0 = [1.0, 1.0]
P = [1.5, 1.0, 3.0, 1.0]
TS = np.linspace(0.0, 10.0, 101)
KW = {"saveat": TS, "rtol": 1e-6, "atol": 1e-8}
TARGET = 1.2
OUT = Path(__file__).parent / "results" / "events_overhead.md"


def lv(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack(
        [p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]]
    )


NEVER = dk.Event(lambda u, p, t: u[0] + 1.0, direction=-1)


def scipy_groups() -> dict[str, dict[str, Callable[[], Any]]]:
    prob = dk.ODEProblem(lv, np.array(U0), (0.0, 10.0), np.array(P))

    def solve(events: list[Any]) -> Callable[[], Any]:
        return lambda: dk.solve(prob, "tsit5", backend="scipy", events=events, **KW)

    def grad(events: list[Any]) -> Callable[[], Any]:
        def run() -> Any:
            sol, pull = dk.vjp(
                prob,
                "tsit5",
                backend="scipy",
                events=events,
                sensealg=dk.ForwardMode(),
                **KW,
            )
            return pull(2.0 * sol.u)

        return run

    return {
        "scipy solve": {"none": solve([]), "never fires": solve([NEVER])},
        "scipy ForwardMode gradient": {
            "none": grad([]),
            "never fires": grad([NEVER]),
        },
    }


def torch_groups() -> dict[str, dict[str, Callable[[], Any]]]:
    import torch

    torch.set_num_threads(1)
    u0 = torch.tensor(U0, dtype=torch.float64)
    p = torch.tensor(P, dtype=torch.float64, requires_grad=True)
    prob = dk.ODEProblem(lv, u0, (0.0, 10.0), p)

    def solve(events: list[Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return dk.solve(prob, "tsit5", events=events, **KW)

        return run

    def grad(events: list[Any]) -> Callable[[], Any]:
        def run() -> Any:
            sol = dk.solve(
                prob,
                "tsit5",
                events=events,
                sensealg=dk.ReverseThroughSolver(),
                **KW,
            )
            (sol.u**2).sum().backward()
            p.grad = None

        return run

    return {
        "torch solve": {"none": solve([]), "never fires": solve([NEVER])},
        "torch ReverseThroughSolver gradient": {
            "none": grad([]),
            "never fires": grad([NEVER]),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    repeat = 5 if args.quick else args.repeat
    start = time.perf_counter()
    groups = {**scipy_groups(), **torch_groups()}
    rows = []
    for group, variants in groups.items():
        res = interleaved(variants, repeat, warmup=2, budget_s=20.0)
        base = res["none"]["median_s"]
        for name, r in res.items():
            ratio = r["median_s"] / base
            rows.append(
                f"| {group} | {name} | {1e3 * r['median_s']:.2f} | "
                f"{1e3 * r['q1_s']:.2f}-{1e3 * r['q3_s']:.2f} | {ratio:.3f} | "
                f"{r['n']} |"
            )
            print(group, name, f"{1e3 * r['median_s']:.2f} ms", f"{ratio:.3f}x")
    lib = versions("numpy", "scipy", "torch")
    text = "\n".join(
        [
            "# Events: the cost of an event that never fires",
            "",
            "(benchmarks/events_overhead.py) Lotka-Volterra, tsit5, rtol=1e-6, "
            "atol=1e-8, 101 saves, float64; the event `u[0] + 1` never fires. "
            f"Interleaved rounds, medians; ratio to the solve without events "
            f"(target <= {TARGET}x).",
            "",
            f"Run {time.strftime('%Y-%m-%d %H:%M:%S')}, {platform.python_version()}, "
            f"{lib}, {'quick' if args.quick else 'full'} run, "
            f"{time.perf_counter() - start:.0f} s.",
            "",
            "| group | variant | median (ms) | quartiles (ms) | ratio | rounds |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )
    args.out.write_text(text)


if __name__ == "__main__":
    main()
