"""The compiled torch engine on a CUDA GPU: correctness against the eager driver
and timings against it and torchdiffeq.

Two problems, float64, dopri5, rtol = 1e-6, atol = 1e-8: Lotka-Volterra (2
states, t in [0, 10], 101 saves) and a reaction-diffusion ring of 2,048 states
(u' = 0.1 (u[i-1] - 2 u[i] + u[i+1]) * n**2 / 100 - u**3 + sin(t), u0 a bump,
t in [0, 1], 11 saves). Interleaved medians (CUDA-synchronised); the first
call (compilation) apart. Prints a Markdown table.

Run: python benchmarks/torch_engine_gpu.py  (on a machine with a CUDA GPU)
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torchdiffeq

import diffeqkit as dk
from diffeqkit.backends.torch import _engine

DEV = torch.device("cuda")
F64 = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-8}


def lv(u, p, t):
    return torch.stack(
        [p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]]
    )


def ring(u, p, t):
    lap = torch.roll(u, 1) - 2 * u + torch.roll(u, -1)
    return p * lap - u**3 + torch.sin(t)


def problems():
    n = 2048
    x = torch.linspace(0, 1, n, dtype=F64, device=DEV)
    return {
        "LV (2 states)": (
            lv,
            torch.tensor([1.0, 1.0], dtype=F64, device=DEV),
            torch.tensor([1.5, 1.0, 3.0, 1.0], dtype=F64, device=DEV),
            torch.linspace(0, 10, 101, dtype=F64, device=DEV),
        ),
        "ring (2,048 states)": (
            ring,
            torch.exp(-100 * (x - 0.5) ** 2),
            torch.tensor(0.1 * n * n / 100, dtype=F64, device=DEV),
            torch.linspace(0, 1, 11, dtype=F64, device=DEV),
        ),
    }


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main():
    # Rows print as each problem finishes (flushed), so a run cut short by a
    # time limit still reports the problems it finished; compilation of the
    # 2,048-state ring alone can take minutes.
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| problem | variant | median ms | speed-up vs odeint | first call s "
          "| max abs diff compiled vs eager |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    for name, (f, u0, p, ts) in problems().items():
        rows = []
        span = (float(ts[0]), float(ts[-1]))

        def dk_solve(mode, f=f, u0=u0, p=p, ts=ts, span=span):
            def run():
                os.environ[_engine.ENV] = mode
                prob = dk.ODEProblem(f, u0, span, p)
                return dk.solve(prob, "dopri5", backend="torch", saveat=ts, **TOL).u

            return run

        def native(f=f, u0=u0, p=p, ts=ts):
            return torchdiffeq.odeint(
                lambda t, u: f(u, p, t), u0, ts, method="dopri5",
                options={"step_t": ts[-1:]}, **TOL,
            )  # fmt: skip

        variants = {"odeint": native, "dk eager": dk_solve("eager"),
                    "dk compiled": dk_solve("compiled")}  # fmt: skip
        first = {k: timed(v) for k, v in variants.items()}
        err = (first["dk compiled"][1] - first["dk eager"][1]).abs().max().item()
        times = {k: [] for k in variants}
        for _ in range(15):
            for k, v in variants.items():
                times[k].append(timed(v)[0])
        base = statistics.median(times["odeint"])
        for k in variants:
            med = statistics.median(times[k])
            rows.append(
                f"| {name} | {k} | {med * 1e3:.2f} | {base / med:.1f}x | "
                f"{first[k][0]:.1f} | {err:.1e} |"
            )
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
