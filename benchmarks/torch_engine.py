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
- brusselator: the 1-D Brusselator (Hairer & Wanner II, IV.1: A = 1, B = 3,
  u = 1, v = 3 at both ends) on N = 1024 interior grid points, 2048 states, with
  the diffusion coefficient alpha = 5e-6 (alpha (N + 1)**2 = 5.3: not stiff,
  explicit methods apply), u0 = 1 + sin(2 pi x), v0 = 3, t in [0, 10], 11 save
  times, rtol = 1e-6, atol = 1e-8; plain solves, as the LV solve group.

The engine is selected per call with ``diffeqkit.torch.engine(mode)``;
``compile s`` sums ``_engine.COUNTS["compile_s"]`` over all of a variant's calls
(all in its first call when nothing recompiles).

Run: python benchmarks/torch_engine.py [--quick] [--groups solve,brusselator]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchdiffeq
from overhead import interleaved  # this directory is on sys.path when run

import diffeqkit as dk
import diffeqkit.torch as dkt
from diffeqkit._info import versions
from diffeqkit.backends.torch import _engine

OUT = Path(__file__).parent / "results" / "torch_engine.md"
F64 = torch.float64


def with_engine(mode: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with dkt.engine(mode):
            return fn()

    return run


def compile_tracked(
    variants: dict[str, Callable[[], Any]], seconds: dict[str, float]
) -> dict[str, Callable[[], Any]]:
    """`variants` summing the engine's compile seconds of each into `seconds`."""

    def tracked(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            before = _engine.COUNTS["compile_s"]
            try:
                return fn()
            finally:
                seconds[name] += _engine.COUNTS["compile_s"] - before

        return run

    for name in variants:
        seconds[name] = 0.0
    return {name: tracked(name, fn) for name, fn in variants.items()}


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


# --- the Brusselator with 2048 states -------------------------------------------------

BRUSS_N = 1024
BRUSS_ALPHA = 5e-6
BRUSS_X = torch.arange(1, BRUSS_N + 1, dtype=F64) / (BRUSS_N + 1)
BRUSS_TS = torch.linspace(0.0, 10.0, 11, dtype=F64)
BRUSS_TOL = {"rtol": 1e-6, "atol": 1e-8}


def brusselator(y, p, t):
    """``u' = 1 + u**2 v - 4 u + k u_xx``, ``v' = 3 u - u**2 v + k v_xx`` with
    ``k = p[0] = alpha / dx**2`` (second differences; u = 1, v = 3 outside)."""
    del t
    n = y.shape[0] // 2
    u, v = y[:n], y[n:]
    one = u.new_ones(1)
    uu, vv = torch.cat([one, u, one]), torch.cat([3 * one, v, 3 * one])
    u2v = u * u * v
    return torch.cat(
        [
            1 + u2v - 4 * u + p[0] * (uu[:-2] - 2 * u + uu[2:]),
            3 * u - u2v + p[0] * (vv[:-2] - 2 * v + vv[2:]),
        ]
    )


def bruss_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    y0 = torch.cat(
        [1 + torch.sin(2 * torch.pi * BRUSS_X), torch.full((BRUSS_N,), 3.0, dtype=F64)]
    )
    p = torch.tensor([BRUSS_ALPHA * (BRUSS_N + 1) ** 2], dtype=F64)
    return y0, p


def brusselator_group() -> dict[str, Callable[[], Any]]:
    def native() -> Any:
        y0, p = bruss_inputs()
        return torchdiffeq.odeint(
            lambda t, y: brusselator(y, p, t),
            y0,
            BRUSS_TS,
            method="dopri5",
            options={"step_t": BRUSS_TS[-1:]},
            **BRUSS_TOL,
        )

    def dk_solve(alg: str) -> Callable[[], Any]:
        def run() -> Any:
            y0, p = bruss_inputs()
            prob = dk.ODEProblem(brusselator, y0, (0.0, 10.0), p)
            return dk.solve(prob, alg, backend="torch", saveat=BRUSS_TS, **BRUSS_TOL)

        return run

    return {
        "odeint dopri5": native,
        "dk eager dopri5": with_engine("eager", dk_solve("dopri5")),
        "dk compiled dopri5": with_engine("compiled", dk_solve("dopri5")),
        "dk eager tsit5": with_engine("eager", dk_solve("tsit5")),
        "dk compiled tsit5": with_engine("compiled", dk_solve("tsit5")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument(
        "--groups",
        default="solve,gradient,spiral,brusselator",
        help="comma-separated groups to run",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    groups = {
        "solve": (solve_group, 3 if args.quick else 40),
        "gradient": (gradient_group, 3 if args.quick else 15),
        "spiral": (spiral_group, 3 if args.quick else 30),
        "brusselator": (brusselator_group, 2 if args.quick else 7),
    }
    chosen = args.groups.split(",")
    lines = []
    for group, (make, repeat) in groups.items():
        if group not in chosen:
            continue
        compile_s: dict[str, float] = {}
        variants = compile_tracked(make(), compile_s)
        res = interleaved(variants, repeat)
        base = res[next(iter(variants))]["median_s"]
        for name, r in res.items():
            lines.append(
                f"| {group} | {name} | {r['median_s'] * 1e3:.2f} | "
                f"{r['q1_s'] * 1e3:.2f}-{r['q3_s'] * 1e3:.2f} | "
                f"{base / r['median_s']:.1f}x | {r['warmup_s']:.2f} | "
                f"{compile_s[name]:.2f} | {r['n']} |"
            )
        print("\n".join(lines[-len(res) :]), flush=True)
    elapsed = time.perf_counter() - start
    text = f"""# The compiled torch engine (issue 15, part 1)

(benchmarks/torch_engine.py; see its docstring for the problems.)

Run {time.strftime("%Y-%m-%d %H:%M:%S")}, {platform.python_version()},
{versions("torch", "torchdiffeq")}, {"quick" if args.quick else "full"} run,
{elapsed:.0f} s (groups: {", ".join(chosen)}), one torch thread, float64,
engine blocks of {_engine.BLOCK}
steps. "speed-up" is the group's torchdiffeq median over the variant's; "first
call" includes torch.compile's compilation for the compiled variants (a shared
2-core machine under load from other jobs: compile times vary by 2-5x).

| group | variant | median ms | quartiles ms | speed-up | first call s | compile s | n |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(lines)}
"""
    if not args.quick:
        OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
