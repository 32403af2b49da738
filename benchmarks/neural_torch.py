"""One Adam training step of the spiral neural ODE: diffeqkit.torch.NeuralODE
against the same model through torchdiffeq.

Requirements met here (issue 12, torch half):

- The model of examples/neural_spiral_torch.py: data from u' = (u**3) A,
  A = [[-0.1, 2], [-2, -0.1]], u0 = [2, 0], 30 save times in [0, 1.5]; the
  vector field u -> u**3 -> Linear(2, 50) -> Tanh -> Linear(50, 2) (252
  parameters); loss the mean squared error over the 30 saves.
- One step = zero_grad, forward, loss.backward(), Adam step. Every variant has
  its own copy of the same initial network and its own Adam, so all train along
  the same trajectory.
- Same tableau and settings on both sides: dopri5 (torchdiffeq has no tsit5),
  rtol 1e-7 (the issue's), atol 1e-9, the same 30 saves.
- dk: NeuralODE with the default sensealg and with each sensealg, and with
  CheckpointedAdjoint(checkpoints=3), which replays every step (the default's
  path before it kept the first steps' graph); torchdiffeq:
  ``odeint`` + backward (the target: default <= 1.0x), and ``odeint_adjoint``
  (adjoint tolerances = forward ones) as the counterpart of ContinuousAdjoint.
- Interleaved rounds (one call of each variant per round), medians and
  quartiles, ratios of medians to the torchdiffeq call timed in the same group;
  first call timed apart. The fast
  variants and the slow ones (ForwardMode, the adjoints) run as two groups so
  that the fast ones get enough rounds. One torch thread
  (``torch.set_num_threads(1)``), float32 and float64.
- Evaluations of the vector field per step (forward and backward) are counted
  for every variant.

Run: python benchmarks/neural_torch.py [--quick] [--dtype float32 float64]
Writes benchmarks/results/neural_torch.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from overhead import interleaved  # this directory is on sys.path when run

import diffeqkit as dk
import diffeqkit.torch as dkt
from diffeqkit._info import versions

OUT = Path(__file__).parent / "results" / "neural_torch.md"
RTOL, ATOL = 1e-7, 1e-9
T1, NSAVE = 1.5, 30
FAST = {
    "default": None,
    "ReverseThroughSolver": dk.ReverseThroughSolver(),
    "CheckpointedAdjoint": dk.CheckpointedAdjoint(),
    # An explicit count keeps no steps' graph and replays every step: the path
    # the default took before the kept steps (diffeqkit/backends/torch/_checkpoint).
    "CheckpointedAdjoint(checkpoints=3)": dk.CheckpointedAdjoint(checkpoints=3),
}
SLOW = {
    "ForwardMode": dk.ForwardMode(),
    "ContinuousAdjoint": dk.ContinuousAdjoint(),
    "InterpolatingAdjoint": dk.InterpolatingAdjoint(),
}


def build(torch: Any, dtype: Any) -> dict[str, Any]:
    """Data, the network (fixed seed) and the save times."""
    import torchdiffeq

    a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=dtype)
    u0 = torch.tensor([2.0, 0.0], dtype=dtype)
    t = torch.linspace(0.0, T1, NSAVE, dtype=dtype)
    with torch.no_grad():
        data = torchdiffeq.odeint(
            lambda t, u: (u**3) @ a, u0, t, method="dopri5", rtol=1e-10, atol=1e-12
        )

    class Field(torch.nn.Module):
        """u -> u**3 -> Linear(2, 50) -> Tanh -> Linear(50, 2), counting calls."""

        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(2, 50), torch.nn.Tanh(), torch.nn.Linear(50, 2)
            )
            self.calls = 0

        def forward(self, u: Any) -> Any:
            self.calls += 1
            return self.net(u**3)

    torch.manual_seed(0)
    return {"u0": u0, "t": t, "data": data, "field": Field().to(dtype)}


def variants(torch: Any, setup: dict[str, Any], names: dict[str, Any], native: bool):
    """name -> (one training step, its vector field)."""
    import torchdiffeq

    u0, t, data = setup["u0"], setup["t"], setup["data"]
    out: dict[str, tuple[Callable[[], Any], Any]] = {}

    def stepper(model: Any, forward: Callable[[], Any]) -> Callable[[], Any]:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step() -> Any:
            opt.zero_grad()
            loss = ((forward() - data) ** 2).mean()
            loss.backward()
            opt.step()
            return loss

        return step

    class Timed(torch.nn.Module):
        """torchdiffeq's ``func(t, u)`` over the field."""

        def __init__(self, field: Any) -> None:
            super().__init__()
            self.field = field

        def forward(self, t: Any, u: Any) -> Any:
            return self.field(u)

    if native:
        field = copy.deepcopy(setup["field"])
        func = Timed(field)
        out["odeint"] = (
            stepper(
                field,
                lambda: torchdiffeq.odeint(
                    func, u0, t, method="dopri5", rtol=RTOL, atol=ATOL
                ),
            ),
            field,
        )
    else:
        field = copy.deepcopy(setup["field"])
        func = Timed(field)
        out["odeint_adjoint"] = (
            stepper(
                field,
                lambda: torchdiffeq.odeint_adjoint(
                    func,
                    u0,
                    t,
                    method="dopri5",
                    rtol=RTOL,
                    atol=ATOL,
                    adjoint_params=tuple(field.parameters()),
                ),
            ),
            field,
        )
    for name, sensealg in names.items():
        field = copy.deepcopy(setup["field"])
        node = dkt.NeuralODE(
            field,
            (0.0, T1),
            "dopri5",
            saveat=t.cpu().numpy(),
            sensealg=sensealg,
            rtol=RTOL,
            atol=ATOL,
        )
        out[name] = (stepper(node, lambda node=node: node(u0)), field)
    return out


def run_group(
    torch: Any, dtype: Any, names: dict[str, Any], native: bool, budget: float
) -> dict[str, Any]:
    setup = build(torch, dtype)
    group = variants(torch, setup, names, native)
    # Vector field calls per training step, counted once after the warm-up.
    calls: dict[str, int] = {}
    for name, (step, field) in group.items():
        step()
        field.calls = 0
        step()
        calls[name] = field.calls
    result = interleaved(
        {k: v[0] for k, v in group.items()}, 0, warmup=2, budget_s=budget
    )
    sol = dkt.NeuralODE(
        setup["field"],
        (0.0, T1),
        "dopri5",
        saveat=setup["t"].cpu().numpy(),
        rtol=RTOL,
        atol=ATOL,
    ).solve(setup["u0"])
    for name in result:
        result[name]["calls"] = calls[name]
    result["_dk_steps"] = sol.stats
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    """One row per variant; the ratio is to the torchdiffeq call of its own
    group (the groups ran at different times, so ratios across them are not
    like for like)."""
    lines = [
        "| dtype | variant | median (ms) | quartiles (ms) | ratio | to | f calls "
        "per step | rounds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dtype, groups in results.items():
        for group, base_name in (("fast", "odeint"), ("slow", "odeint_adjoint")):
            rows = groups.get(group, {})
            if base_name not in rows:
                continue
            base = rows[base_name]["median_s"]
            for name, r in rows.items():
                if name.startswith("_"):
                    continue
                lines.append(
                    f"| {dtype} | {name} | {r['median_s'] * 1e3:.2f} | "
                    f"{r['q1_s'] * 1e3:.2f}-{r['q3_s'] * 1e3:.2f} | "
                    f"{r['median_s'] / base:.3f} | {base_name} | {r['calls']} | "
                    f"{r['n']} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=["float32", "float64"],
        choices=["float32", "float64"],
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    fast_budget, slow_budget = (1.0, 1.0) if args.quick else (40.0, 25.0)
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for name in args.dtype:
        dtype = getattr(torch, name)
        results[name] = {
            "fast": run_group(torch, dtype, FAST, True, fast_budget),
            "slow": run_group(torch, dtype, SLOW, False, slow_budget),
        }
        for group in results[name].values():
            for k, r in group.items():
                if not k.startswith("_"):
                    print(
                        f"{name} {k:22s} {r['median_s'] * 1e3:9.2f} ms  "
                        f"calls {r['calls']}"
                    )
    text = table(results)
    steps = {k: v["fast"]["_dk_steps"] for k, v in results.items()}
    report = f"""# Spiral neural ODE: one Adam training step on torch

(benchmarks/neural_torch.py)

dk: `diffeqkit.torch.NeuralODE(field, (0, 1.5), "dopri5", saveat=30 times,
sensealg=..., rtol=1e-7, atol=1e-9)`; torchdiffeq: `odeint` / `odeint_adjoint`
with method="dopri5" and the same tolerances and saves. One step = zero_grad,
forward, MSE loss, backward, Adam step; each variant trains its own copy of the
same network. Interleaved rounds, medians; ratios to the torchdiffeq call of
the same group and dtype (`odeint` + backward for the default,
ReverseThroughSolver and CheckpointedAdjoint; `odeint_adjoint` for ForwardMode
and the adjoints, timed in a second group). One torch thread. "f calls" counts
vector-field evaluations per step (forward and backward passes). dk's forward
solve: {steps}.

Run {time.strftime("%Y-%m-%d %H:%M:%S")}, {platform.python_version()},
{versions("torch", "torchdiffeq")}, {"quick" if args.quick else "full"} run,
{time.perf_counter() - start:.0f} s.

{text}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
