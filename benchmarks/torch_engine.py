"""The compiled torch engine against the eager reference driver and torchdiffeq.

Three groups, each timed interleaved (round-robin, one call each per round) in
one process with one torch thread, float64; medians, quartiles and ratios of
medians to ``torchdiffeq.odeint`` of the group. The first call of each variant is
timed apart (``first call``): for the engine it is torch.compile's compilation
(also given by ``stats["compile_s"]``), excluded from the medians.

- solve: Lotka-Volterra, u0 = [1, 1], p = [1.5, 1, 3, 1], t in [0, 10], 101 save
  times, rtol = 1e-6, atol = 1e-8. torchdiffeq's dopri5 lands on t1 as dk does
  (``step_t``); it has no tsit5 (dk's tsit5 rows are ratios to its dopri5).
- gradient: the same solve, ``loss = sum(u**2)``, ``loss.backward()`` to u0 and
  p: odeint + backward against dk's ReverseThroughSolver and the torch default
  (CheckpointedAdjoint with checkpoints=None), eager and compiled.
- spiral: one Adam step of the spiral neural ODE of issue 15 (u' = (u**3) A,
  A = [[-0.1, 2], [-2, -0.1]], u0 = [2, 0], t in [0, 1.5], 30 saves, an MLP
  2 -> 50 -> 2 on u**3 with tanh, 252 parameters as a dict of tensors, rtol =
  1e-7, atol = 1e-9, dopri5, MSE loss); each variant trains its own copy.

The engine is selected per call with ``DIFFEQKIT_TORCH_ENGINE``.

Run: python benchmarks/torch_engine.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchdiffeq
from overhead import interleaved  # this directory is on sys.path when run

import diffeqkit as dk
from diffeqkit._info import versions
from diffeqkit.backends.torch import _engine

OUT = Path(__file__).parent / "results" / "torch_engine.md"
F64 = torch.float64


def with_engine(mode: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        os.environ[_engine.ENV] = mode
        try:
            return fn()
        finally:
            del os.environ[_engine.ENV]

    return run


def lv(u, p, t):
    x, y = u[0], u[1]
    return torch.stack([p[0] * x - p[1] * x * y, -p[2] * y + p[3] * x * y])


LV_U0 = [1.0, 1.0]
LV_P = [1.5, 1.0, 3.0, 1.0]
LV_TS = torch.linspace(0.0, 10.0, 101, dtype=F64)
LV_TOL = {"rtol": 1e-6, "atol": 1e-8}


def lv_inputs(grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    u0 = torch.tensor(LV_U0, dtype=F64, requires_grad=grad)
    p = torch.tensor(LV_P, dtype=F64, requires_grad=grad)
    return u0, p


def lv_odeint(u0: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torchdiffeq.odeint(
        lambda t, u: lv(u, p, t),
        u0,
        LV_TS,
        method="dopri5",
        options={"step_t": LV_TS[-1:]},
        **LV_TOL,
    )


def lv_dk(
    u0: torch.Tensor, p: torch.Tensor, alg: str = "dopri5", sensealg: Any = None
) -> Any:
    prob = dk.ODEProblem(lv, u0, (0.0, 10.0), p)
    return dk.solve(
        prob, alg, backend="torch", saveat=LV_TS, sensealg=sensealg, **LV_TOL
    )


def solve_group() -> dict[str, Callable[[], Any]]:
    def native() -> Any:
        return lv_odeint(*lv_inputs(False))

    def dk_solve(alg: str) -> Callable[[], Any]:
        return lambda: lv_dk(*lv_inputs(False), alg=alg)

    return {
        "odeint dopri5": native,
        "dk eager dopri5": with_engine("eager", dk_solve("dopri5")),
        "dk compiled dopri5": with_engine("compiled", dk_solve("dopri5")),
        "dk eager tsit5": with_engine("eager", dk_solve("tsit5")),
        "dk compiled tsit5": with_engine("compiled", dk_solve("tsit5")),
    }


def gradient_group() -> dict[str, Callable[[], Any]]:
    def native() -> Any:
        u0, p = lv_inputs(True)
        (lv_odeint(u0, p) ** 2).sum().backward()
        return u0.grad, p.grad

    def dk_grad(sensealg: Any) -> Callable[[], Any]:
        def run() -> Any:
            u0, p = lv_inputs(True)
            (lv_dk(u0, p, sensealg=sensealg).u ** 2).sum().backward()
            return u0.grad, p.grad

        return run

    rts, ckp = dk.ReverseThroughSolver(), dk.CheckpointedAdjoint()
    return {
        "odeint + backward": native,
        "dk eager ReverseThroughSolver": with_engine("eager", dk_grad(rts)),
        "dk compiled ReverseThroughSolver": with_engine("compiled", dk_grad(rts)),
        "dk eager CheckpointedAdjoint": with_engine("eager", dk_grad(ckp)),
        "dk compiled CheckpointedAdjoint": with_engine("compiled", dk_grad(ckp)),
    }


# --- the spiral neural ODE ---------------------------------------------------------

SPIRAL_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)
SPIRAL_U0 = torch.tensor([2.0, 0.0], dtype=F64)
SPIRAL_TS = torch.linspace(0.0, 1.5, 30, dtype=F64)
SPIRAL_TOL = {"rtol": 1e-7, "atol": 1e-9}


def mlp(u, p, t):
    del t
    return torch.tanh(u**3 @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def spiral_data() -> torch.Tensor:
    with torch.no_grad():
        return torchdiffeq.odeint(
            lambda t, u: (u**3) @ SPIRAL_A, SPIRAL_U0, SPIRAL_TS, method="dopri5"
        )


def spiral_params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"w1": (2, 50), "b1": (50,), "w2": (50, 2), "b2": (2,)}
    return {
        k: (0.1 * torch.randn(s, generator=gen, dtype=F64)).requires_grad_()
        for k, s in shapes.items()
    }


def spiral_group() -> dict[str, Callable[[], Any]]:
    data = spiral_data()

    def trainer(forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]):
        p = spiral_params()
        opt = torch.optim.Adam(list(p.values()), lr=1e-3)

        def step() -> float:
            opt.zero_grad()
            loss = ((forward(p) - data) ** 2).mean()
            loss.backward()
            opt.step()
            return float(loss)

        return step

    def native(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torchdiffeq.odeint(
            lambda t, u: mlp(u, p, t),
            SPIRAL_U0,
            SPIRAL_TS,
            method="dopri5",
            options={"step_t": SPIRAL_TS[-1:]},
            **SPIRAL_TOL,
        )

    def through(sensealg: Any) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        def forward(p: dict[str, torch.Tensor]) -> torch.Tensor:
            prob = dk.ODEProblem(mlp, SPIRAL_U0, (0.0, 1.5), p)
            sol = dk.solve(
                prob,
                "dopri5",
                backend="torch",
                saveat=SPIRAL_TS,
                sensealg=sensealg,
                **SPIRAL_TOL,
            )
            return sol.u

        return forward

    rts, ckp = dk.ReverseThroughSolver(), dk.CheckpointedAdjoint()
    return {
        "odeint + backward": trainer(native),
        "dk eager ReverseThroughSolver": with_engine("eager", trainer(through(rts))),
        "dk compiled ReverseThroughSolver": with_engine(
            "compiled", trainer(through(rts))
        ),
        "dk eager CheckpointedAdjoint": with_engine("eager", trainer(through(ckp))),
        "dk compiled CheckpointedAdjoint": with_engine(
            "compiled", trainer(through(ckp))
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    groups = {
        "solve": (solve_group, 3 if args.quick else 40),
        "gradient": (gradient_group, 3 if args.quick else 15),
        "spiral": (spiral_group, 3 if args.quick else 30),
    }
    lines = []
    for group, (make, repeat) in groups.items():
        variants = make()
        res = interleaved(variants, repeat)
        base = res[next(iter(variants))]["median_s"]
        for name, r in res.items():
            lines.append(
                f"| {group} | {name} | {r['median_s'] * 1e3:.2f} | "
                f"{r['q1_s'] * 1e3:.2f}-{r['q3_s'] * 1e3:.2f} | "
                f"{base / r['median_s']:.1f}x | {r['warmup_s']:.2f} | {r['n']} |"
            )
        print("\n".join(lines[-len(res) :]), flush=True)
    elapsed = time.perf_counter() - start
    text = f"""# The compiled torch engine (issue 15, part 1)

(benchmarks/torch_engine.py; see its docstring for the problems.)

Run {time.strftime("%Y-%m-%d %H:%M:%S")}, {platform.python_version()},
{versions("torch", "torchdiffeq")}, {"quick" if args.quick else "full"} run,
{elapsed:.0f} s, one torch thread, float64, engine blocks of {_engine.BLOCK}
steps. "speed-up" is the group's torchdiffeq median over the variant's; "first
call" includes torch.compile's compilation for the compiled variants (a shared
2-core machine under load from other jobs: compile times vary by 2-5x).

| group | variant | median ms | quartiles ms | speed-up | first call s | n |
| --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(lines)}
"""
    if not args.quick:
        OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
