"""Population pharmacokinetics: one oral dose, a thousand subjects, one ensemble.

Each subject has its own parameters of the built-in two-compartment model
(`dk.problems.pk_two_compartment`: absorption ka, elimination k10, exchange k12
and k21, central volume V), drawn log-normally around typical values with 30%
between-subject variability (a typical population-PK prior). The whole
population is one `dk.EnsembleProblem` (p with a leading subject axis), solved
in one call; each subject takes its own steps. The script prints the spread of
the central concentration over the sampling times, Cmax and Tmax, and checks
three subjects against their own tight-tolerance `dk.solve` (the full run:
largest relative difference below 1e-6 at rtol=1e-8); the figure
``population_pk.png`` shows the median and the 50% and 90% bands.

Then a dosing rule by events: each time a subject's concentration falls below
1 mg/L, that subject gets another 100 mg oral dose (`dk.Event` with an affect
on the gut compartment; each subject at its own times, in the same ensemble
call). The script reports how many subjects were redosed and when, and checks
three subjects' dose times against their own `dk.solve` with the event (the
full run: within 1e-6 h).

``--backend scipy`` (default; add ``--workers N`` to run the subjects in chunks
on a Dask LocalCluster of N worker processes when dask.distributed is
installed), ``--backend jax`` (``vmap`` of the compiled solve) or ``--backend
torch`` (one batch; each subject its own step sizes, finished subjects leave
the batch).

Run: python examples/population_pk.py [--quick] [--backend scipy|jax|torch]
     [--subjects N] [--workers N]
"""

# requires: matplotlib

from __future__ import annotations

import argparse
import time

import numpy as np

import diffeqkit as dk

TYPICAL = np.array([1.0, 0.2, 0.3, 0.15, 10.0])  # ka, k10, k12, k21 (1/h), V (L)
CV = 0.3  # between-subject variability (log-normal)
TIMES = np.linspace(0.0, 24.0, 97)  # every 15 minutes for the figure
DOSE = 100.0  # mg, oral
RESCUE_LEVEL = 1.0  # mg/L: below it, another dose


def redose(u, p, t):
    """Another oral dose into the gut compartment."""
    xp = dk.array_namespace(u)
    return xp.stack([u[0] + DOSE, u[1], u[2]])


# Fires where the central concentration falls through RESCUE_LEVEL (not where it
# rises through it after a dose).
RESCUE = dk.Event(
    lambda u, p, t: u[1] - RESCUE_LEVEL, direction=-1, terminal=False, affect=redose
)


def population(n: int, seed: int = 0) -> np.ndarray:
    """``(n, 5)`` parameters, log-normal around `TYPICAL`."""
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(np.log(1.0 + CV**2))
    return TYPICAL * np.exp(rng.normal(-0.5 * sigma**2, sigma, (n, 5)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100 subjects")
    parser.add_argument("--full", action="store_true", help="the real run (default)")
    parser.add_argument("--backend", choices=["scipy", "jax", "torch"], default="scipy")
    parser.add_argument("--subjects", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0, help="Dask workers")
    args = parser.parse_args(argv)
    n = args.subjects or (100 if args.quick else 1000)
    rtol, atol = (1e-6, 1e-8) if args.quick else (1e-8, 1e-10)

    base = dk.problems.pk_two_compartment(dose=100.0).prob
    kw: dict = {"backend": args.backend, "saveat": TIMES, "rtol": rtol, "atol": atol}
    if args.backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # this script's choice
    elif args.backend == "torch":
        import torch

        base = base.remake(
            u0=torch.as_tensor(base.u0), p=torch.as_tensor(np.asarray(base.p))
        )
    params = population(n)
    p = params if args.backend != "torch" else base.p.new_tensor(params)
    ens = dk.EnsembleProblem(base, p=p)

    client = None
    if args.workers and args.backend == "scipy":
        from distributed import Client, LocalCluster

        client = Client(
            LocalCluster(
                n_workers=args.workers, threads_per_worker=1, dashboard_address=None
            )
        )
        kw["executor"] = client
    try:
        try:
            if args.backend == "jax":  # compile once; the timed call reuses it
                dk.solve(ens, "tsit5", **kw)
            start = time.perf_counter()
            sol = dk.solve(ens, "tsit5", **kw)
        except dk.UnsupportedError as err:
            print(f"backend={args.backend}: {err}")
            return 0
        elapsed = time.perf_counter() - start
    finally:
        if client is not None:
            client.close()

    conc = np.asarray(sol.u)[:, :, 1]  # (subjects, times): central concentration
    print(
        f"{n} subjects, alg=tsit5, backend={sol.backend}: {elapsed:.2f} s "
        f"({1e3 * elapsed / n:.2f} ms a subject), all succeeded: "
        f"{bool(np.all(sol.success))}; accepted steps per subject: "
        f"{min(sol.stats['naccept'])} to {max(sol.stats['naccept'])}"
    )
    q = np.percentile(conc, [5, 25, 50, 75, 95], axis=0)
    print(f"{'t (h)':>6} {'5%':>8} {'25%':>8} {'median':>8} {'75%':>8} {'95%':>8}")
    for t in (0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0):
        i = int(np.argmin(np.abs(TIMES - t)))
        print(f"{t:6.1f} " + " ".join(f"{v:8.3f}" for v in q[:, i]) + "  mg/L")
    cmax, tmax = conc.max(axis=1), TIMES[conc.argmax(axis=1)]
    print(
        f"Cmax median {np.median(cmax):.2f} mg/L (90% of subjects in "
        f"{np.percentile(cmax, 5):.2f}-{np.percentile(cmax, 95):.2f}); Tmax median "
        f"{np.median(tmax):.2f} h"
    )

    # Three subjects against their own tight solve (SciPy, whatever ran above).
    worst = 0.0
    for i in (0, n // 2, n - 1):
        one = dk.solve(
            dk.ODEProblem(base.f, np.array([100.0, 0.0, 0.0]), (0.0, 24.0), params[i]),
            "dopri8",
            backend="scipy",
            saveat=TIMES,
            rtol=1e-12,
            atol=1e-14,
        )
        ref = one.u[:, 1]
        worst = max(worst, float(np.max(np.abs(conc[i] - ref) / (np.abs(ref) + 1e-3))))
    print(f"largest relative difference against per-subject solves: {worst:.1e}")
    worst_t = rescue_doses(ens, base, params, kw, args.backend, n)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.fill_between(TIMES, q[0], q[4], alpha=0.25, label="5-95%")
    ax.fill_between(TIMES, q[1], q[3], alpha=0.45, label="25-75%")
    ax.plot(TIMES, q[2], color="k", label="median")
    ax.set_xlabel("time after dose (h)")
    ax.set_ylabel("central concentration (mg/L)")
    ax.set_title(f"{n} subjects, 100 mg oral ({sol.backend})")
    ax.legend()
    fig.tight_layout()
    fig.savefig("population_pk.png", dpi=120)
    print("figure: population_pk.png")
    ok = worst < (1e-4 if args.quick else 1e-6)
    return 0 if ok and worst_t < (1e-4 if args.quick else 1e-6) else 1


def rescue_doses(
    ens: dk.EnsembleProblem, base: dk.ODEProblem, params, kw: dict, backend: str, n: int
) -> float:
    """The dosing rule `RESCUE` on every subject (one ensemble call); returns the
    largest difference (h) of three subjects' dose times from their own solve."""
    kw = {**kw, "events": [RESCUE], "max_events": 20}
    kw.pop("executor", None)  # (the cluster is closed by now)
    if backend == "jax":  # compile once; the timed call reuses it
        dk.solve(ens, "tsit5", **kw)
    start = time.perf_counter()
    sol = dk.solve(ens, "tsit5", **kw)
    elapsed = time.perf_counter() - start
    # (subjects, most doses any subject got): NaN after each subject's own
    times = np.asarray(sol.t_events[0])
    doses = np.asarray(sol.stats["nevents"])
    first = times[doses > 0, 0]
    print(
        f"rescue doses (concentration below {RESCUE_LEVEL} mg/L): {elapsed:.2f} s; "
        f"{np.mean(doses > 0):.0%} of subjects redosed, {doses.sum()} doses in all "
        f"(at most {doses.max()} a subject)"
        + (f"; first one at a median {np.median(first):.2f} h" if first.size else "")
    )
    worst = 0.0
    for i in (0, n // 2, n - 1):
        one = dk.solve(
            dk.ODEProblem(base.f, np.array([DOSE, 0.0, 0.0]), (0.0, 24.0), params[i]),
            "dopri8",
            backend="scipy",
            events=[RESCUE],
            rtol=1e-12,
            atol=1e-14,
        )
        mine = times[i, : doses[i]]
        if mine.shape != one.t_events[0].shape:
            return float("inf")
        worst = max(worst, float(np.max(np.abs(mine - one.t_events[0]), initial=0.0)))
    print(f"largest dose-time difference against per-subject solves: {worst:.1e} h")
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
