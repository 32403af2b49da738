"""A week of oral dosing: doses every 24 h, and a rescue dose when the
concentration falls below a threshold.

The built-in two-compartment model (`dk.problems.pk_two_compartment`: gut
amount, central concentration, peripheral amount) with two kinds of events:

- time events, one `dk.Event` per scheduled dose (condition ``t - 24 k``, with
  an `affect` that adds the dose to the gut): steps land exactly on them;
- a state event: when the central concentration falls through the threshold,
  a half dose is given at once.

The script prints when each rescue dose was given, then how the trough
concentration before the last scheduled dose moves with the elimination rate
k10 and the dose (`dk.vjp`, through the events: the rescue times move with the
parameters), checked against central finite differences (measured, relative:
4e-6 at --quick's tolerances, 1e-7 with --full). Saves `pk_dosing_<backend>.png`.

Run: python examples/pk_dosing.py [--quick | --full] [--backend NAME]
"""

# requires: matplotlib
from __future__ import annotations

import argparse
import importlib.util

import numpy as np

import diffeqkit as dk
from diffeqkit import backends
from diffeqkit.problems import pk_two_compartment_rhs

# (ka, k10, k12, k21, V) in 1/h and L, then the dose in mg.
P = np.array([1.0, 0.2, 0.3, 0.15, 10.0, 100.0])
THRESHOLD = 1.0  # mg/L
DAYS = 7


def rhs(u, p, t):
    return pk_two_compartment_rhs(u, p[:5], t)


def scheduled_dose(u, p, t):
    """The dose goes into the gut compartment."""
    xp = dk.array_namespace(u)
    return xp.stack([u[0] + p[5], u[1], u[2]])


def rescue_dose(u, p, t):
    xp = dk.array_namespace(u)
    return xp.stack([u[0] + 0.5 * p[5], u[1], u[2]])


def dose_at(hour: float):
    return lambda u, p, t: t - hour


EVENTS = [
    *(
        dk.Event(dose_at(24.0 * day), terminal=False, affect=scheduled_dose)
        for day in range(1, DAYS)
    ),
    dk.Event(
        lambda u, p, t: u[1] - THRESHOLD,
        direction=-1,
        terminal=False,
        affect=rescue_dose,
    ),
]
T_TROUGH = 24.0 * (DAYS - 1) - 1e-6  # just before the last scheduled dose


def problem(p: np.ndarray, backend: str) -> dk.ODEProblem:
    u0 = np.array([p[5], 0.0, 0.0])
    if backend == "jax":
        import jax.numpy as jnp

        return dk.ODEProblem(rhs, jnp.asarray(u0), (0.0, 24.0 * DAYS), jnp.asarray(p))
    if backend == "torch":
        import torch

        return dk.ODEProblem(rhs, torch.tensor(u0), (0.0, 24.0 * DAYS), torch.tensor(p))
    return dk.ODEProblem(rhs, u0, (0.0, 24.0 * DAYS), p)


def to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def trough(p: np.ndarray, kw: dict) -> float:
    sol = dk.solve(problem(p, kw["backend"]), "tsit5", saveat=[0.0, T_TROUGH], **kw)
    return float(to_numpy(sol.u)[-1, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="looser tolerances")
    mode.add_argument("--full", action="store_true", help="tight tolerances")
    parser.add_argument(
        "--backend", choices=list(backends.SPECS), help="default: every installed one"
    )
    args = parser.parse_args()
    if importlib.util.find_spec("jax") is not None:
        import jax

        jax.config.update("jax_enable_x64", True)  # this script's choice
    chosen = [args.backend] if args.backend else list(backends.SPECS)
    for backend in chosen:
        if backends.installed(backend):
            simulate(backend, args)
        else:
            print(f"{backend}: not installed")


def simulate(backend: str, args: argparse.Namespace) -> None:
    tol = 1e-7 if args.quick else 1e-10
    kw = dict(backend=backend, events=EVENTS, rtol=tol, atol=tol * 1e-2)

    ts = np.linspace(0.0, 24.0 * DAYS, 24 * DAYS * 4 + 1)
    sol = dk.solve(problem(P, backend), "tsit5", saveat=ts, **kw)
    doses = [to_numpy(t) for t in sol.t_events]
    scheduled = np.concatenate(doses[:-1])
    rescues = doses[-1]
    print(f"{backend}: scheduled doses at {scheduled.tolist()} h")
    print(
        f"rescue doses (C fell below {THRESHOLD} mg/L) at "
        + ", ".join(f"{t:.3f} h" for t in rescues)
    )

    if backend != "scipy" or any(importlib.util.find_spec(m) for m in ("jax", "torch")):
        # d trough / d (k10, dose) through every event, against finite differences.
        saves = [0.0, T_TROUGH]
        _, pullback = dk.vjp(problem(P, backend), "tsit5", saveat=saves, **kw)
        cot = np.zeros((2, 3))
        cot[-1, 1] = 1.0
        if backend == "torch":
            import torch

            cot = torch.tensor(cot)
        g = pullback(cot)
        grads = to_numpy(g.p).copy()
        grads[5] += to_numpy(g.u0)[0]  # the first dose is u0[0] as well
        for i, name in ((1, "k10"), (5, "dose")):
            h = 1e-5 * P[i]
            up, down = P.copy(), P.copy()
            up[i] += h
            down[i] -= h
            fd = (trough(up, kw) - trough(down, kw)) / (2 * h)
            print(
                f"d trough / d {name}: {grads[i]:+.6e} (finite differences "
                f"{fd:+.6e}, relative difference {abs(grads[i] - fd) / abs(fd):.1e})"
            )
    else:
        print("scipy gradients need jax or torch to differentiate f; skipped")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(ts, to_numpy(sol.u)[:, 1], label="central concentration")
    ax.axhline(THRESHOLD, color="C3", lw=0.8, ls="--", label="rescue threshold")
    for t in rescues:
        ax.axvline(t, color="C3", lw=0.6, alpha=0.7)
    ax.set(xlabel="t (h)", ylabel="C (mg/L)", title="Daily doses with rescue doses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"pk_dosing_{backend}.png", dpi=120)
    print(f"saved pk_dosing_{backend}.png")


if __name__ == "__main__":
    main()
