"""Cost of an event that never fires on the JAX backend (issue 13's target: a solve
with such an event costs at most 1.2x the same solve without events).

Lotka-Volterra (u0 = [1, 1], p = [1.5, 1, 3, 1], t in [0, 10], 101 saves),
tsit5 at rtol = 1e-6, atol = 1e-8, float64, with and without
``dk.Event(lambda u, p, t: u[0] + 10.0)`` (u[0] stays positive: it never fires).
Pairs run interleaved (round-robin, `overhead.interleaved`); medians and the
ratio events / plain; the first call (tracing and compilation) is reported apart
as ``warmup_s``. Every call gets a new p (cycled through 8 pre-drawn values).

- forward, jitted: ``jax.jit`` of dk.solve -> u.
- forward, eager: dk.solve with a new p each call.
- forward, jitted, 256 states: ``u' = A u`` (A dense 256 x 256, stable), the
  event ``u[0] + 10``, with sensealg=ForwardMode and with the default
  (65,792 inputs: CheckpointedAdjoint), at max_events 1000 and 10. Both run
  the plain loop of segments as their custom VJP's primal (before that change
  the default ran the bounded scan of max_events + 1 segments even when not
  differentiated: 26x at max_events=1000, 5.4x at 10).
- gradient, jitted: ``jax.jit(jax.grad)`` of ``0.5 * sum(u**2)`` in p, with
  ForwardMode (the event terminal=False: the loop of segments) and with
  CheckpointedAdjoint (terminal: one located segment, then the differentiable
  solve of [t0, t*], so about two solves' work: reported, no target).
- reverse cost against max_events: a ball dropped from h0 ~ 2 bouncing
  (restitution 0.8, two bounces in [0, 2]), ``jax.jit(jax.grad)`` in h0 with
  CheckpointedAdjoint at max_events=4 (the "plain" column) and 1000 (the
  "events" column): the cost should follow the events that fired, not
  max_events.

Run: python benchmarks/events_overhead_jax.py [--quick]
Writes benchmarks/results/events_overhead_jax.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

import diffeqkit as dk

sys.path.insert(0, str(Path(__file__).parent))
from overhead import interleaved

OUT = Path(__file__).parent / "results" / "events_overhead_jax.md"
U0 = np.array([1.0, 1.0])
P = np.array([1.5, 1.0, 3.0, 1.0])
TS = np.linspace(0.0, 10.0, 101)
TARGET = 1.2


def lv(u: Any, p: Any, t: Any) -> Any:
    xp = dk.array_namespace(u)
    return xp.stack(
        [p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]]
    )


def never(u: Any, p: Any, t: Any) -> Any:
    return u[0] + 10.0


def groups() -> dict[str, dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)  # this process only
    rng = np.random.default_rng(0)
    ps = [jnp.asarray(P * (1 + 0.05 * rng.standard_normal(4))) for _ in range(8)]
    u0 = jnp.asarray(U0)
    kw = {"backend": "jax", "saveat": TS, "rtol": 1e-6, "atol": 1e-8}
    going_on = [dk.Event(never, terminal=False)]
    stopping = [dk.Event(never)]

    def solve_u(p: Any, events: Any, **extra: Any) -> Any:
        return dk.solve(
            dk.ODEProblem(lv, u0, (0.0, 10.0), p), "tsit5", events=events, **kw, **extra
        ).u

    def cycling(fn: Any) -> Any:
        state = {"i": 0}

        def call() -> Any:
            state["i"] += 1
            return jax.block_until_ready(fn(ps[state["i"] % len(ps)]))

        return call

    def grad_of(events: Any, sensealg: Any) -> Any:
        loss = lambda p: 0.5 * jnp.sum(solve_u(p, events, sensealg=sensealg) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))

    fwd = lambda events: jax.jit(lambda p: solve_u(p, events))  # noqa: E731
    n = 256
    a = -np.eye(n) + rng.standard_normal((n, n)) / (2 * np.sqrt(n))
    mats = [jnp.asarray(a * (1 + 0.05 * rng.standard_normal())) for _ in range(8)]
    big0 = jnp.ones(n)

    def linear(u: Any, p: Any, t: Any) -> Any:
        return p @ u

    def big(events: Any, max_events: int = 1000, sensealg: Any = None) -> Any:
        def solve(m: Any) -> Any:
            prob = dk.ODEProblem(linear, big0, (0.0, 10.0), m)
            opts = {"events": events, "max_events": max_events, "sensealg": sensealg}
            return dk.solve(prob, "tsit5", **opts, **kw).u

        return jax.jit(solve)

    hs = [jnp.asarray(2.0 + 0.05 * rng.standard_normal()) for _ in range(8)]

    def fall(u: Any, p: Any, t: Any) -> Any:
        return jnp.stack([u[1], -9.81 + 0.0 * u[0]])

    ground = dk.Event(
        lambda u, p, t: u[0],
        direction=-1,
        terminal=False,
        affect=lambda u, p, t: jnp.stack([u[0], -p * u[1]]),
    )

    def ball_grad(max_events: int) -> Any:
        def loss(h0: Any) -> Any:
            prob = dk.ODEProblem(fall, jnp.stack([h0, 0.0 * h0]), (0.0, 2.0), 0.8)
            sol = dk.solve(
                prob,
                "tsit5",
                backend="jax",
                events=[ground],
                max_events=max_events,
                saveat=[0.5, 1.0, 1.5, 2.0],
                rtol=1e-8,
                atol=1e-8,
                sensealg=dk.CheckpointedAdjoint(),
            )
            return jnp.sum(sol.u[:, 0])

        return jax.jit(jax.grad(loss))

    def cycling_ball(fn: Any) -> Any:
        state = {"i": 0}

        def call() -> Any:
            state["i"] += 1
            return jax.block_until_ready(fn(hs[state["i"] % len(hs)]))

        return call

    def cycling_big(fn: Any) -> Any:
        state = {"i": 0}

        def call() -> Any:
            state["i"] += 1
            return jax.block_until_ready(fn(mats[state["i"] % len(mats)]))

        return call

    return {
        "forward, jitted": {
            "plain": cycling(fwd(None)),
            "events": cycling(fwd(going_on)),
        },
        "forward, eager": {
            "plain": cycling(lambda p: solve_u(p, None)),
            "events": cycling(lambda p: solve_u(p, going_on)),
        },
        "forward, jitted, 256 states, ForwardMode": {
            "plain": cycling_big(big(None, sensealg=dk.ForwardMode())),
            "events": cycling_big(big(going_on, sensealg=dk.ForwardMode())),
        },
        "forward, jitted, 256 states, default sensealg": {
            "plain": cycling_big(big(None)),
            "events": cycling_big(big(going_on)),
        },
        "forward, jitted, 256 states, default sensealg, max_events=10": {
            "plain": cycling_big(big(None)),
            "events": cycling_big(big(going_on, 10)),
        },
        "gradient ForwardMode, jitted": {
            "plain": cycling(grad_of(None, dk.ForwardMode())),
            "events": cycling(grad_of(going_on, dk.ForwardMode())),
        },
        "gradient CheckpointedAdjoint (terminal event), jitted": {
            "plain": cycling(grad_of(None, dk.CheckpointedAdjoint())),
            "events": cycling(grad_of(stopping, dk.CheckpointedAdjoint())),
        },
        "ball (2 bounces), gradient CheckpointedAdjoint, jitted: max_events "
        "4 (plain column) vs 1000 (events column)": {
            "plain": cycling_ball(ball_grad(4)),
            "events": cycling_ball(ball_grad(1000)),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds only")
    parser.add_argument(
        "--only", default="", help="run only the groups whose name contains this"
    )
    args = parser.parse_args(argv)
    lines = [
        "# Events overhead on JAX: an event that never fires",
        "",
        f"Python {platform.python_version()}, {platform.machine()}; "
        "`python benchmarks/events_overhead_jax.py`. Medians over interleaved "
        f"rounds; target events / plain <= {TARGET} for the forward solves.",
        "",
        "| group | plain median (ms) | events median (ms) | ratio | warm-up "
        "plain / events (s) | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for name, variants in groups().items():
        if args.only not in name:
            continue
        res = interleaved(variants, 5 if args.quick else 0, budget_s=15.0)
        a, b = res["plain"], res["events"]
        ratio = b["median_s"] / a["median_s"]
        lines.append(
            f"| {name} | {1e3 * a['median_s']:.3f} | {1e3 * b['median_s']:.3f} | "
            f"{ratio:.2f} | {a['warmup_s']:.1f} / {b['warmup_s']:.1f} | {a['n']} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if not args.quick and not args.only:
        OUT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
