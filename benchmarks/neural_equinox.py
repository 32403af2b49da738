"""One training step of the spiral neural ODE: diffeqkit.equinox.NeuralODE against
the same model written directly on diffrax.

Requirements met here:

- The model and data of examples/neural_spiral_equinox.py: ``u -> u**3 ->
  Linear(2, 50) -> tanh -> Linear(50, 2)`` (252 parameters), ``u0 = [2, 0]``, 30
  saves on t in [0, 1.5], float32, rtol = atol = 1e-6, tsit5, max_steps 100_000.
- The model is first trained for 800 Adam steps (MSE ~0.001; ``--quick``: none),
  so the solves take the steps of a fitted spiral, as in most of a training run.
- One step = ``eqx.filter_value_and_grad`` of the MSE + ``optax.adam`` update,
  under ``eqx.filter_jit``, from the same model and optimizer state every call.
- diffrax side: ``diffrax.diffeqsolve`` with what dk's JAX backend runs for the
  sensealg (diffeqkit/backends/jax/): ``Tsit5()``, ``PIDController(rtol, atol)``
  (dk's subclass adds a guard against steps below 10 ulps and non-finite
  candidates: a few operations per step, counted as dk's overhead),
  ``SaveAt(ts=...)``, ``max_steps``, and the adjoint: the default sensealg here
  (252 inputs > 32) is CheckpointedAdjoint -> ``RecursiveCheckpointAdjoint()``;
  ReverseThroughSolver -> ``RecursiveCheckpointAdjoint(checkpoints=max_steps)``;
  ContinuousAdjoint -> ``BacksolveAdjoint(stepsize_controller=PIDController(rtol,
  atol))``.
- Variants run interleaved (`overhead.interleaved`: round-robin, first call
  timed apart as compile time); medians, quartiles, ratio of medians dk /
  diffrax. Target: ratio <= 1.05 for the default sensealg. The losses of both
  sides are checked equal (same steps, same arithmetic up to rounding).

Writes benchmarks/results/neural_equinox.md.

Run: python benchmarks/neural_equinox.py [--repeat N] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from overhead import interleaved  # this directory is on sys.path when run

import diffeqkit as dk
from diffeqkit._info import versions
from diffeqkit.equinox import NeuralODE

OUT = Path(__file__).parent / "results" / "neural_equinox.md"
U0 = jnp.array([2.0, 0.0])
TSPAN = (0.0, 1.5)
TS = np.linspace(*TSPAN, 30)
RTOL = ATOL = 1e-6
MAX_STEPS = 100_000
TARGET = 1.05
# Adam steps before timing (MSE about 0.001 by then; examples/neural_spiral_equinox.py).
PRETRAIN = 800
A = jnp.array([[-0.1, 2.0], [-2.0, -0.1]])


class SpiralField(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(2, 50, key=k1)
        self.out = eqx.nn.Linear(50, 2, key=k2)

    def __call__(self, u: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(u**3)))


class DiffraxNODE(eqx.Module):
    """The same layer written directly on diffrax."""

    vector_field: SpiralField
    adjoint: diffrax.AbstractAdjoint = eqx.field(static=True)

    def __call__(self, u0: jax.Array) -> jax.Array:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, field: field(y)),
            diffrax.Tsit5(),
            TSPAN[0],
            TSPAN[1],
            None,
            u0,
            args=self.vector_field,
            saveat=diffrax.SaveAt(ts=jnp.asarray(TS, dtype=u0.dtype)),
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=MAX_STEPS,
            adjoint=self.adjoint,
        )
        return sol.ys


def data() -> jax.Array:
    prob = dk.ODEProblem(lambda u, p, t: (u**3) @ p, U0, TSPAN, A)
    return dk.solve(prob, "tsit5", saveat=TS, rtol=1e-7, atol=1e-7).u


def training_step(model: Any, target: jax.Array) -> Callable[[], Any]:
    """A jitted Adam step from `model`; calling it runs one step, same inputs."""
    optimizer = optax.adam(1e-2)
    state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_value_and_grad
    def loss(m: Any) -> jax.Array:
        return jnp.mean((m(U0) - target) ** 2)

    @eqx.filter_jit
    def step(m: Any, s: Any) -> tuple[Any, Any, jax.Array]:
        value, grads = loss(m)
        updates, s = optimizer.update(grads, s, m)
        return eqx.apply_updates(m, updates), s, value

    def run() -> Any:
        return jax.block_until_ready(step(model, state))

    return run


def pretrained(target: jax.Array, steps: int) -> SpiralField:
    """The field after `steps` Adam steps: a trained model's spiral takes more
    solver steps than the untrained one's near-straight line, as in training."""
    node = NeuralODE(
        SpiralField(jax.random.key(0)), TSPAN, saveat=TS, rtol=RTOL, atol=ATOL
    )
    optimizer = optax.adam(1e-2)
    state = optimizer.init(eqx.filter(node, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(m: Any, s: Any) -> tuple[Any, Any]:
        grads = eqx.filter_grad(lambda m: jnp.mean((m(U0) - target) ** 2))(m)
        updates, s = optimizer.update(grads, s, m)
        return eqx.apply_updates(m, updates), s

    for _ in range(steps):
        node, state = step(node, state)
    return node.vector_field


PAIRS = {
    # sensealg name: (dk sensealg, diffrax adjoint)
    "default (CheckpointedAdjoint)": (
        None,
        diffrax.RecursiveCheckpointAdjoint(),
    ),
    "ReverseThroughSolver": (
        dk.ReverseThroughSolver(),
        diffrax.RecursiveCheckpointAdjoint(checkpoints=MAX_STEPS),
    ),
    "ContinuousAdjoint": (
        dk.ContinuousAdjoint(),
        diffrax.BacksolveAdjoint(
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL)
        ),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=0, help="rounds (0: budget)")
    parser.add_argument("--quick", action="store_true", help="a few rounds")
    parser.add_argument("--only-default", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    target = data()
    field = pretrained(target, 0 if args.quick else PRETRAIN)

    rows = []
    pairs = list(PAIRS.items())[:1] if args.only_default else PAIRS.items()
    for name, (sensealg, adjoint) in pairs:
        node = NeuralODE(
            field, TSPAN, saveat=TS, sensealg=sensealg, rtol=RTOL, atol=ATOL
        )
        direct = DiffraxNODE(field, adjoint)
        variants = {
            "dk": training_step(node, target),
            "diffrax": training_step(direct, target),
        }
        values, compile_s = {}, {}
        for k, fn in variants.items():
            start = time.perf_counter()
            values[k] = float(fn()[2])
            compile_s[k] = time.perf_counter() - start
        if not np.isclose(values["dk"], values["diffrax"], rtol=1e-5):
            raise SystemExit(f"{name}: losses differ: {values}")
        start = time.perf_counter()
        timed = interleaved(variants, 5 if args.quick else args.repeat, budget_s=40.0)
        ratio = timed["dk"]["median_s"] / timed["diffrax"]["median_s"]
        rows.append((name, timed, ratio, values["dk"], compile_s))
        print(
            f"{name:<30} dk {1e3 * timed['dk']['median_s']:.2f} ms  diffrax "
            f"{1e3 * timed['diffrax']['median_s']:.2f} ms  ratio {ratio:.3f} "
            f"(n={timed['dk']['n']})"
        )
    write(args.out, rows)


def write(path: Path, rows: list[Any]) -> None:
    ver = versions("diffeqkit", "jax", "diffrax", "equinox", "optax")
    lines = [
        "# Neural ODE training step: diffeqkit.equinox.NeuralODE vs diffrax",
        "",
        "Written by `benchmarks/neural_equinox.py` (see its docstring for what is",
        "compared). One `eqx.filter_jit` Adam step of the spiral model (252",
        "parameters, float32, tsit5, rtol = atol = 1e-6, 30 saves), medians of",
        "interleaved calls; ratio = dk / diffrax (target <= 1.05 for the default).",
        "",
        f"Machine: {platform.machine()}, {platform.python_version()}; "
        + ", ".join(f"{k} {v}" for k, v in ver.items()),
        "",
        "| sensealg | dk median (ms) | diffrax median (ms) | dk q1-q3 | diffrax q1-q3 "
        "| ratio | n | first call dk / diffrax (s) | loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, timed, ratio, loss, compile_s in rows:
        d, n = timed["dk"], timed["diffrax"]
        lines.append(
            f"| {name} | {1e3 * d['median_s']:.2f} | {1e3 * n['median_s']:.2f} | "
            f"{1e3 * d['q1_s']:.2f}-{1e3 * d['q3_s']:.2f} | "
            f"{1e3 * n['q1_s']:.2f}-{1e3 * n['q3_s']:.2f} | {ratio:.3f} | {d['n']} | "
            f"{compile_s['dk']:.1f} / {compile_s['diffrax']:.1f} | {loss:.5f} |"
        )
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
