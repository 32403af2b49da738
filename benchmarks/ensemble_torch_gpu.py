"""The torch ensemble solver on a CUDA GPU: a correctness check and timings.

Requirements met here (issue 16: run the GPU paths on a CUDA GPU when one is
available): Lotka-Volterra members (u0 and p spread by +-20%, t in [0, 10], 101
saves, rtol=1e-6, atol=1e-8, float64) solved by
``diffeqkit.backends.torch._ensemble.solve_ensemble`` on the GPU:

- every 8th of 64 members against its own `dk.solve` on the GPU (max abs
  difference; equal nfev asserted);
- ``loss.backward()`` through the batch against per-member `dk.vjp`
  (ReverseThroughSolver), max relative difference;
- seconds per call and per trajectory for B = 1,000, 10,000, 100,000 against the
  batch as one stacked ODE through `dk.solve` (median of 3 after a warm-up,
  synchronised).

Writes ``benchmarks/results/ensemble_torch_gpu.md``. Without a GPU it exits
with status 2 (``--device cpu`` runs the same on the CPU, as a smoke test).

Run: python benchmarks/ensemble_torch_gpu.py [--device cuda] [--sizes ...]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffeqkit as dk
from diffeqkit._solve import build_request
from diffeqkit.backends.torch._ensemble import solve_ensemble

F64 = torch.float64
TS = np.linspace(0.0, 10.0, 101)
KW: dict[str, Any] = {"saveat": TS, "rtol": 1e-6, "atol": 1e-8}
OUT = Path(__file__).parent / "results" / "ensemble_torch_gpu.md"


def lv(u, p, t):
    x, y = u[0], u[1]
    return torch.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y])


def lv_batched(u, p, t):
    x, y = u[:, 0], u[:, 1]
    return torch.stack(
        [p[:, 0] * x - p[:, 1] * x * y, -p[:, 2] * y + p[:, 3] * x * y], dim=1
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible", file=sys.stderr)
        return 2
    u0 = torch.tensor([1.0, 1.0], dtype=F64, device=dev)
    p0 = torch.tensor([1.5, 1.0, 3.0, 1.0], dtype=F64, device=dev)

    def members(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        us = 1 + 0.4 * (torch.rand(n, 2, generator=gen, dtype=F64) - 0.5)
        ps = 1 + 0.4 * (torch.rand(n, 4, generator=gen, dtype=F64) - 0.5)
        return us.to(dev) * u0, ps.to(dev) * p0

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn: Callable[[], Any], n: int = 3) -> float:
        fn()
        sync()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    req = build_request(dk.ODEProblem(lv, u0, (0.0, 10.0), p0), "tsit5", **KW)
    lines = []
    us, ps = members(64)
    sol = solve_ensemble(req, us, ps, 64)
    worst = 0.0
    for i in range(0, 64, 8):
        ref = dk.solve(dk.ODEProblem(lv, us[i], (0.0, 10.0), ps[i]), "tsit5", **KW)
        worst = max(worst, float((ref.u - sol.u[i]).abs().max()))
        assert ref.stats["nfev"] == sol.stats["nfev"][i]
    lines.append(f"- members vs their own dk.solve on {dev}: max |diff| {worst:.1e}")
    ug, pg = us[:4].clone().requires_grad_(), ps[:4].clone().requires_grad_()
    (solve_ensemble(req, ug, pg, 4).u ** 2).sum().backward()
    assert pg.grad is not None
    rel = 0.0
    for i in range(4):
        prob = dk.ODEProblem(lv, us[i], (0.0, 10.0), ps[i])
        ref, pull = dk.vjp(prob, "tsit5", sensealg=dk.ReverseThroughSolver(), **KW)
        g = pull(2 * ref.u).p
        rel = max(rel, float(((pg.grad[i] - g).abs() / g.abs()).max()))
    lines.append(f"- gradients vs per-member dk.vjp: max rel. diff {rel:.1e}")
    lines += ["", "| B | ensemble s | us/trajectory | stacked s | us/trajectory |"]
    lines.append("|---|---|---|---|---|")
    for size in args.sizes:
        us, ps = members(size)
        stacked = dk.ODEProblem(lv_batched, us, (0.0, 10.0), ps)
        te = timed(lambda: solve_ensemble(req, us, ps, size))  # noqa: B023
        tk = timed(lambda: dk.solve(stacked, "tsit5", **KW))  # noqa: B023
        lines.append(
            f"| {size} | {te:.3f} | {te / size * 1e6:.2f} | {tk:.3f} | "
            f"{tk / size * 1e6:.2f} |"
        )
        print(lines[-1], flush=True)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.machine()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = "\n".join(
        [
            "# Torch ensembles on a GPU",
            "",
            f"Written by `benchmarks/ensemble_torch_gpu.py` on {name}, torch "
            f"{torch.__version__}, {when}.",
            "",
            *lines,
            "",
        ]
    )
    print(text)
    if dev.type == "cuda":
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
