"""The spiral training step on the compiled torch engine, every sensealg.

The spiral group of benchmarks/torch_engine.py (one Adam step of the spiral
neural ODE of issue 15: MLP 2 -> 50 -> 2 on u**3, 252 parameters as a dict of
tensors, dopri5, rtol 1e-7, atol 1e-9, 30 saves, float64, MSE loss) against
``torchdiffeq.odeint`` + backward, with each sensealg on the engine, and
ReverseThroughSolver also by its former path (the solve under ``no_grad``, then
its steps replayed under autograd) for comparison, and
``torchdiffeq.odeint_adjoint`` (the reference for the two adjoints' rows).
Interleaved rounds, one torch thread, medians, ratios to odeint; first calls
(compilation) apart.

Run: python benchmarks/spiral_engine.py [--quick]
Writes benchmarks/results/spiral_engine.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch_engine as te
import torchdiffeq
from overhead import interleaved  # this directory is on sys.path when run
from torch_engine import spiral_group, with_engine

import diffeqkit as dk
from diffeqkit._info import versions
from diffeqkit.backends.torch import _engine, _engine_adjoint

OUT = Path(__file__).parent / "results" / "spiral_engine.md"


def variants() -> dict[str, Any]:
    out = {"odeint + backward": spiral_group()["odeint + backward"]}
    data = te.spiral_data()

    def adjoint_trainer() -> Any:
        """torchdiffeq's own continuous adjoint: the reference for dk's
        ContinuousAdjoint and InterpolatingAdjoint rows."""
        p = te.spiral_params()
        opt = torch.optim.Adam(list(p.values()), lr=1e-3)

        def step() -> float:
            opt.zero_grad()
            u = torchdiffeq.odeint_adjoint(
                lambda t, u: te.mlp(u, p, t),
                te.SPIRAL_U0,
                te.SPIRAL_TS,
                method="dopri5",
                options={"step_t": te.SPIRAL_TS[-1:]},
                adjoint_params=tuple(p.values()),
                **te.SPIRAL_TOL,
            )
            loss = ((u - data) ** 2).mean()
            loss.backward()
            opt.step()
            return float(loss)

        return step

    out["odeint_adjoint + backward"] = adjoint_trainer()

    def trainer(sensealg: Any, replay: bool = False) -> Any:
        p = te.spiral_params()
        opt = torch.optim.Adam(list(p.values()), lr=1e-3)
        through = _engine_adjoint.through

        def step() -> float:
            if replay:
                _engine_adjoint.through = lambda req: None
            try:
                opt.zero_grad()
                prob = dk.ODEProblem(te.mlp, te.SPIRAL_U0, (0.0, 1.5), p)
                sol = dk.solve(
                    prob,
                    "dopri5",
                    backend="torch",
                    saveat=te.SPIRAL_TS,
                    sensealg=sensealg,
                    **te.SPIRAL_TOL,
                )
                loss = ((sol.u - data) ** 2).mean()
                loss.backward()
                opt.step()
            finally:
                _engine_adjoint.through = through
            return float(loss)

        return with_engine("compiled", step)

    for name in (
        "ReverseThroughSolver",
        "CheckpointedAdjoint",
        "ForwardMode",
        "InterpolatingAdjoint",
        "ContinuousAdjoint",
    ):
        out[f"dk compiled {name}"] = trainer(getattr(dk, name)())
    out["dk compiled ReverseThroughSolver (replay)"] = trainer(
        dk.ReverseThroughSolver(), replay=True
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    group = variants()
    res = interleaved(group, 3 if args.quick else 30)
    base = res["odeint + backward"]["median_s"]
    lines = [
        f"| {name} | {r['median_s'] * 1e3:.2f} | "
        f"{r['q1_s'] * 1e3:.2f}-{r['q3_s'] * 1e3:.2f} | "
        f"{base / r['median_s']:.2f}x | {r['warmup_s']:.1f} | {r['n']} |"
        for name, r in res.items()
    ]
    load = os.getloadavg()[0]
    text = f"""# The spiral training step on the compiled torch engine

(benchmarks/spiral_engine.py; see its docstring.)

Run {time.strftime("%Y-%m-%d %H:%M:%S")}, {platform.python_version()},
{versions("torch", "torchdiffeq")}, {"quick" if args.quick else "full"} run,
{time.perf_counter() - start:.0f} s, one torch thread, float64, engine blocks
of {_engine.BLOCK}; load average {load:.1f} on 2 cores at the end (a shared
machine: absolute times vary 2x, ratios of interleaved medians less).

| variant | median ms | quartiles ms | speed-up vs odeint | first call s | n |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(lines)}
"""
    if not args.quick:
        OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
