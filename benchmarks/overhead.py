"""Overhead of diffeqkit against the same computation written directly in each library.

Requirements met here:

- Two parts, ``--part forward gradient`` (default: both), run in one process. Each
  group of variants (one backend, one problem) runs interleaved (round-robin, one
  call each per round), so machine noise hits them alike; we report medians,
  quartiles and ratios of medians dk / native. The first call of each variant
  (for JAX: tracing and compilation) is timed apart (``warmup_s``) and excluded.
  PyTorch is pinned to one intra-op thread, JAX's x64 mode is turned on, in this
  process only.
- forward: Lotka-Volterra (u0 = [1, 1], p = [1.5, 1, 3, 1], t in [0, 10], 101 save
  points), rtol = 1e-6, atol = 1e-8, float64; the keys of the foundation issue's
  benchmark (issue #3) are kept:

  * native: the library called directly with a vector field written for it
    (jitted diffrax; torchdiffeq.odeint; scipy.integrate.solve_ivp);
  * dk (same f): dk.solve with that very vector field, so the ratio is the pure
    adapter overhead;
  * dk (array-api f): dk.solve with the backend-neutral f a diffeqkit user writes
    (``xp = dk.array_namespace(u)``), the end-to-end cost. On NumPy this f is
    slower than a NumPy-native one by itself: ``xp.stack`` of two scalars costs
    ~4 us against ~0.4 us for ``np.array([...])``, times ~600 calls of f;
  * JAX only: jitted dk.solve, and eager dk.solve with a new p every call.

  Targets (issue #3): jitted dk.solve <= 1.05x jitted diffrax; eager dk.solve with
  a new p <= 3x jitted diffrax; torch and SciPy <= 1.10x their native call.
- gradient (issue #6): the value and gradient with respect to u0 and p of
  ``loss = 0.5 * sum((u - data)**2)`` over the save times, on Lotka-Volterra
  (``dk.problems.lotka_volterra()``, 6 inputs) and on the neural ODE
  (``dk.problems.neural_ode(width=32, depth=2)``: a dict pytree p of 1218
  parameters, 2 states, t in [0, 1], 21 saves), ``data`` the problem's own
  synthetic data. Both sides call the problem's one Array-API f (wrapped in a
  counter), so ratios measure diffeqkit's adapters, not f.

  * JAX: per sensealg, jitted ``jax.value_and_grad`` of the loss through dk.solve
    against the same through ``diffrax.diffeqsolve`` with the adjoint, solver
    (Tsit5), controller (PIDController at the same tolerances), SaveAt and
    max_steps dk's JAX backend uses (see `jax_gradient_group`); and eager
    ``dk.value_and_grad`` (the default sensealg) against the jitted diffrax one.
    Every call gets a new p (cycled through 16 pre-drawn values on the device).
    f counts its Python calls, which happen only while JAX traces: any trace
    after the warm-up is a retrace, recorded as ``retraces``; a non-zero count
    makes the script exit with status 1.
  * torch (dopri5): ``loss.backward()`` through dk.solve with
    ReverseThroughSolver against ``torchdiffeq.odeint`` + backward, and
    ContinuousAdjoint against ``torchdiffeq.odeint_adjoint`` with the same
    forward and adjoint tolerances, steps landing where dk's land
    (``step_t``), adjoint_params = p's tensors; CheckpointedAdjoint and
    ForwardMode (no torchdiffeq counterpart) are timed without a ratio.
  * SciPy (dopri5 = SciPy's RK45 tableau): ForwardMode against
    ``solve_ivp(method="RK45")`` of the forward-sensitivity system by the same
    engine dk uses by default (a jitted JAX ``linearize`` + ``vmap`` per call),
    and ContinuousAdjoint against the same backsolve written by hand
    (``solve_ivp`` forward, then SciPy's ``RK45`` stepped backward piece by
    piece with a jitted JAX VJP); dk through ``dk.value_and_grad`` and through
    ``dk.vjp`` with the cotangent computed in NumPy. For Lotka-Volterra also a
    NumPy version of the sensitivity system with the analytic Jacobian, as
    context (no target).
  * Evaluations of f (torch, SciPy) and step counts (JAX) of dk and the native
    call are compared; they must agree for a ratio to mean anything.

  Target (issue #6): median overhead at most 5% (ratio <= 1.05) on each backend,
  after JIT warm-up for JAX. Eager JAX keeps the foundation's 3x: it pays host
  round trips that a jitted call does not.

Rounds: enough for a stable median, scaled per group to a time budget, or
``--repeat N``; ``--quick`` is a smoke run of a few rounds.

Run: python benchmarks/overhead.py [--part forward gradient] [--repeat N] [--quick]
     [--backends jax torch scipy] [--out FILE]   (or: nox -s bench)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import diffeqkit as dk
from diffeqkit._info import versions
from diffeqkit._pytree import leaves, tree_map
from diffeqkit._sensealg import input_size

U0 = np.array([1.0, 1.0])
P = np.array([1.5, 1.0, 3.0, 1.0])
TSPAN = (0.0, 10.0)
TS = np.linspace(0.0, 10.0, 101)
RTOL, ATOL = 1e-6, 1e-8
MAX_STEPS = 100_000
OUT = Path(__file__).parent / "results" / "overhead.json"

# Gradient targets: the 5% for every like-for-like pair; 3x for eager JAX.
TARGET = 1.05
EAGER_TARGET = 3.0


# ---------------------------------------------------------------------------------
# Timing (also used by benchmarks/sensealg.py).
# ---------------------------------------------------------------------------------


def interleaved(
    variants: dict[str, Callable[[], Any]],
    repeat: int,
    *,
    warmup: int = 1,
    budget_s: float = 0.0,
    bounds: tuple[int, int] = (7, 2000),
    on_warm: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time `variants` round-robin, one call each per round; medians and quartiles.

    The first call of each (for JAX: tracing and compilation) is timed apart as
    ``warmup_s``, then ``warmup - 1`` more untimed rounds. `repeat` timed rounds
    follow; with ``repeat=0`` as many as fit in `budget_s` (estimated from one
    more round), clipped to `bounds`. A variant that raises `dk.UnsupportedError`
    on its first call is reported as unsupported. `on_warm` is called between
    the warm-up and the timed rounds.
    """
    out: dict[str, Any] = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        try:
            fn()
        except dk.UnsupportedError as err:
            out[name] = {"unsupported": str(err)}
            continue
        out[name] = {"warmup_s": time.perf_counter() - start}
    live = [k for k in variants if "unsupported" not in out[k]]
    for _ in range(max(warmup - 1, 0)):
        for name in live:
            variants[name]()
    if on_warm is not None:
        on_warm()
    if repeat <= 0:
        start = time.perf_counter()
        for name in live:
            variants[name]()
        per_round = max(time.perf_counter() - start, 1e-9)
        repeat = int(min(max(budget_s / per_round, bounds[0]), bounds[1]))
    times: dict[str, list[float]] = {k: [] for k in live}
    for _ in range(repeat):
        for name in live:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    for name in live:
        ts = times[name]
        q1, med, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else ts * 3
        out[name].update({"median_s": med, "q1_s": q1, "q3_s": q3, "n": len(ts)})
    return out


# ---------------------------------------------------------------------------------
# Part 1: the forward solve (issue #3).
# ---------------------------------------------------------------------------------


def lv_array_api(u, p, t):
    xp = dk.array_namespace(u)
    a, b, c, d = p[0], p[1], p[2], p[3]
    return xp.stack([a * u[0] - b * u[0] * u[1], -c * u[1] + d * u[0] * u[1]])


def _jax_x64() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)  # a user's script may; the library never


def jax_variants() -> dict[str, Callable[[], Any]]:
    import diffrax
    import jax
    import jax.numpy as jnp

    _jax_x64()

    def lv_jax(u, p, t):
        return jnp.stack(
            [p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]]
        )

    ts = jnp.asarray(TS)

    @jax.jit
    def native(y0, p):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: lv_jax(y, args, t)),
            diffrax.Tsit5(),
            TSPAN[0],
            TSPAN[1],
            None,
            y0,
            p,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=MAX_STEPS,
        )
        return sol.ys

    prob = dk.ODEProblem(lv_jax, jnp.asarray(U0), TSPAN, jnp.asarray(P))
    prob_api = prob.remake(f=lv_array_api)
    kw = {
        "backend": "jax",
        "saveat": TS,
        "rtol": RTOL,
        "atol": ATOL,
        "max_steps": MAX_STEPS,
    }

    @jax.jit
    def dk_jit(y0, p):
        return dk.solve(prob.remake(u0=y0, p=p), "tsit5", **kw).u

    y0, p0 = jnp.asarray(U0), jnp.asarray(P)
    rng = np.random.default_rng(0)

    def eager_new_p(problem):
        def run():
            p = jnp.asarray(P * (1 + 1e-3 * rng.standard_normal(4)))
            return dk.solve(problem.remake(p=p), "tsit5", **kw).u.block_until_ready()

        return run

    return {
        "jax native diffrax (jit)": lambda: native(y0, p0).block_until_ready(),
        "jax dk.solve inside jit": lambda: dk_jit(y0, p0).block_until_ready(),
        "jax dk.solve eager, new p (same f)": eager_new_p(prob),
        "jax dk.solve eager, new p (array-api f)": eager_new_p(prob_api),
    }


def torch_variants() -> dict[str, Callable[[], Any]]:
    import torch
    import torchdiffeq

    torch.set_num_threads(1)  # in this benchmark process only

    def lv_torch(u, p, t):
        return torch.stack(
            [p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]]
        )

    y0 = torch.tensor(U0, dtype=torch.float64)
    p = torch.tensor(P, dtype=torch.float64)
    ts = torch.tensor(TS, dtype=torch.float64)

    def native():
        return torchdiffeq.odeint(
            lambda t, y: lv_torch(y, p, t),
            y0,
            ts,
            method="dopri5",
            rtol=RTOL,
            atol=ATOL,
        )

    prob = dk.ODEProblem(lv_torch, y0, TSPAN, p)
    prob_api = prob.remake(f=lv_array_api)
    kw = {"backend": "torch", "saveat": TS, "rtol": RTOL, "atol": ATOL}
    return {
        "torch native torchdiffeq dopri5": native,
        "torch dk.solve dopri5 (same f)": lambda: dk.solve(prob, "dopri5", **kw).u,
        "torch dk.solve dopri5 (array-api f)": lambda: (
            dk.solve(prob_api, "dopri5", **kw).u
        ),
    }


def scipy_variants() -> dict[str, Callable[[], Any]]:
    from scipy.integrate import solve_ivp

    def lv_np(u, p, t):
        return np.array(
            [p[0] * u[0] - p[1] * u[0] * u[1], -p[2] * u[1] + p[3] * u[0] * u[1]]
        )

    def native():
        return solve_ivp(
            lambda t, y: lv_np(y, P, t),
            TSPAN,
            U0,
            method="RK45",
            t_eval=TS,
            rtol=RTOL,
            atol=ATOL,
        ).y

    prob = dk.ODEProblem(lv_np, U0, TSPAN, P)
    prob_api = prob.remake(f=lv_array_api)
    kw = {"backend": "scipy", "saveat": TS, "rtol": RTOL, "atol": ATOL}
    return {
        "scipy native solve_ivp RK45": native,
        "scipy dk.solve dopri5 (same f)": lambda: dk.solve(prob, "dopri5", **kw).u,
        "scipy dk.solve dopri5 (array-api f)": lambda: (
            dk.solve(prob_api, "dopri5", **kw).u
        ),
    }


# Timed rounds per backend: enough for a stable median of ~0.2 ms JAX calls,
# affordable for ~150 ms torchdiffeq calls.
DEFAULT_REPEAT = {"jax": 2000, "torch": 40, "scipy": 300}
GROUPS = {"jax": jax_variants, "torch": torch_variants, "scipy": scipy_variants}
# (variant, baseline, target ratio of medians)
TARGETS = [
    ("jax dk.solve inside jit", "jax native diffrax (jit)", 1.05),
    ("jax dk.solve eager, new p (same f)", "jax native diffrax (jit)", 3.0),
    ("jax dk.solve eager, new p (array-api f)", "jax native diffrax (jit)", 3.0),
    ("torch dk.solve dopri5 (same f)", "torch native torchdiffeq dopri5", 1.10),
    ("torch dk.solve dopri5 (array-api f)", "torch native torchdiffeq dopri5", 1.10),
    ("scipy dk.solve dopri5 (same f)", "scipy native solve_ivp RK45", 1.10),
    ("scipy dk.solve dopri5 (array-api f)", "scipy native solve_ivp RK45", 1.10),
]


def part_forward(backends: list[str], repeat: int, warmup: int) -> Results:
    res = Results()
    for backend in backends:
        # Interleave within a backend's group only: a 150 ms torch call between two
        # 0.2 ms JAX calls would evict caches and skew the fast ones.
        timed = interleaved(
            GROUPS[backend](), repeat or DEFAULT_REPEAT[backend], warmup=warmup
        )
        for row in timed.values():
            row["part"] = "forward"
        res.timings.update(timed)
    for variant, base, target in TARGETS:
        if variant in res.timings and base in res.timings:
            res.ratio(variant, base, target, part="forward")
    return res


# ---------------------------------------------------------------------------------
# Part 2: gradients (issue #6).
# ---------------------------------------------------------------------------------

PROBLEMS: dict[str, Callable[[], Any]] = {
    "lotka_volterra": lambda: dk.problems.lotka_volterra(),
    "neural_ode": lambda: dk.problems.neural_ode(width=32, depth=2),
}
SENSEALGS = {
    "ForwardMode": dk.ForwardMode(),
    "ReverseThroughSolver": dk.ReverseThroughSolver(),
    "ContinuousAdjoint": dk.ContinuousAdjoint(),
    "CheckpointedAdjoint": dk.CheckpointedAdjoint(),
}
# Seconds of timed rounds per group (one backend, one problem) when --repeat is
# not given: 20-400 rounds, enough for medians stable to about 1%.
BUDGET_S = 30.0
# Different p values each call cycles through.
N_P = 16


@dataclass
class Results:
    """Timings, ratios and per-group records of one part."""

    timings: dict[str, Any] = field(default_factory=dict)
    ratios: list[dict[str, Any]] = field(default_factory=list)
    groups: dict[str, Any] = field(default_factory=dict)

    def ratio(self, variant: str, base: str, target: float, **tags: Any) -> None:
        r = self.timings[variant]["median_s"] / self.timings[base]["median_s"]
        self.ratios.append(
            {
                "variant": variant,
                "baseline": base,
                "ratio": r,
                "target": target,
                "met": r <= target,
                **tags,
            }
        )

    def update(self, other: Results) -> None:
        self.timings.update(other.timings)
        self.ratios.extend(other.ratios)
        self.groups.update(other.groups)


@dataclass
class Group:
    """One backend on one problem: variants, pairs to compare, and checks."""

    variants: dict[str, Callable[[], Any]]
    # (dk variant, native variant, target)
    pairs: list[tuple[str, str, float]]
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Run after timing: counts to compare (evaluations, steps, retraces).
    checks: Callable[[], dict[str, Any]] = dict
    # JAX: how many times f has been traced so far (None elsewhere).
    traces: Callable[[], int] | None = None
    # torch: f's call counter, to compare evaluations per gradient.
    counter: Counted | None = None
    # (variant, baseline) timed for context: a ratio, no target.
    context: list[tuple[str, str]] = field(default_factory=list)


class Counted:
    """The problem's f, counting its Python calls (under JAX: its traces)."""

    def __init__(self, f: Callable[..., Any]) -> None:
        self.f = f
        self.calls = 0

    def __call__(self, u: Any, p: Any, t: Any) -> Any:
        self.calls += 1
        return self.f(u, p, t)


def _loss(sol: Any, data: Any) -> Any:
    xp = dk.array_namespace(sol.u)
    return 0.5 * xp.sum((sol.u - data) ** 2)


def _new_ps(p: Any, convert: Callable[[Any], Any]) -> list[Any]:
    """`N_P` perturbed copies of p (relative 1e-3), converted leaf by leaf."""
    rng = np.random.default_rng(1)
    return [
        tree_map(
            lambda x: convert(x * (1 + 1e-3 * rng.standard_normal(np.shape(x)))), p
        )
        for _ in range(N_P)
    ]


def _cycle(items: list[Any]) -> Callable[[], Any]:
    state = [0]

    def nxt() -> Any:
        state[0] = (state[0] + 1) % len(items)
        return items[state[0]]

    return nxt


# --- JAX -------------------------------------------------------------------------


def jax_gradient_group(bp: Any) -> Group:
    """dk.solve under jitted jax.value_and_grad against diffrax called directly.

    What dk's JAX backend runs (diffeqkit/backends/jax/), and the direct
    equivalent here: Tsit5; ``PIDController(rtol, atol)`` (dk's subclass adds a
    guard that stops a step rejected below 10 ulps: a few extra operations per
    step, counted as dk's overhead); ``SaveAt(ts=...)``; ``max_steps=100_000``;
    and per sensealg the adjoint: ReverseThroughSolver ->
    ``RecursiveCheckpointAdjoint(checkpoints=max_steps)``, CheckpointedAdjoint ->
    ``RecursiveCheckpointAdjoint()``, ContinuousAdjoint ->
    ``BacksolveAdjoint(stepsize_controller=PIDController(rtol, atol))``,
    ForwardMode -> a custom VJP whose forward pass is ``vmap`` of ``jvp`` through
    ``diffrax.ForwardMode()`` (one tangent per input) and whose backward pass
    contracts that Jacobian: written directly as ``jax.jacfwd(..., has_aux=True)``
    with ``diffrax.ForwardMode()`` and the contraction.
    """
    import diffrax
    import jax
    import jax.numpy as jnp

    _jax_x64()
    f = Counted(bp.prob.f)
    prob = bp.prob.remake(f=f)
    t0, t1 = prob.tspan
    ts = jnp.asarray(bp.saveat)
    data = jnp.asarray(bp.data)
    u0 = jnp.asarray(prob.u0)
    # Each variant cycles through the same p values on its own, so the n-th calls
    # of all variants see the same p (their results are compared).
    ps = _new_ps(prob.p, jnp.asarray)
    kw = {
        "backend": "jax",
        "saveat": bp.saveat,
        "rtol": RTOL,
        "atol": ATOL,
        "max_steps": MAX_STEPS,
    }

    def vf(t: Any, y: Any, args: Any) -> Any:
        return f(y, args, t)

    def diffrax_solve(y0: Any, p: Any, adjoint: Any = None) -> Any:
        extra = {} if adjoint is None else {"adjoint": adjoint}
        return diffrax.diffeqsolve(
            diffrax.ODETerm(vf),
            diffrax.Tsit5(),
            t0,
            t1,
            None,
            y0,
            args=p,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=MAX_STEPS,
            **extra,
        )

    def diffrax_ys(y0: Any, p: Any, adjoint: Any) -> Any:
        return diffrax_solve(y0, p, adjoint).ys

    def loss_of(ys: Any) -> Any:
        return 0.5 * jnp.sum((ys - data) ** 2)

    def native_reverse(adjoint: Any) -> Callable[..., Any]:
        return jax.jit(
            jax.value_and_grad(
                lambda y0, p: loss_of(diffrax_ys(y0, p, adjoint)), argnums=(0, 1)
            )
        )

    @jax.jit
    def native_forward_mode(y0: Any, p: Any) -> Any:
        def both(x: Any) -> tuple[Any, Any]:
            ys = diffrax_ys(*x, diffrax.ForwardMode())
            return ys, ys

        jac, ys = jax.jacfwd(both, has_aux=True)((y0, p))
        ct = ys - data
        return loss_of(ys), jax.tree.map(
            lambda j: jnp.tensordot(ct, j, axes=ct.ndim), jac
        )

    natives = {
        "ForwardMode": native_forward_mode,
        "ReverseThroughSolver": native_reverse(
            diffrax.RecursiveCheckpointAdjoint(checkpoints=MAX_STEPS)
        ),
        "ContinuousAdjoint": native_reverse(
            diffrax.BacksolveAdjoint(
                stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL)
            )
        ),
        "CheckpointedAdjoint": native_reverse(diffrax.RecursiveCheckpointAdjoint()),
    }

    def dk_grad(sensealg: Any) -> Callable[..., Any]:
        def loss(y0: Any, p: Any) -> Any:
            sol = dk.solve(prob.remake(u0=y0, p=p), sensealg=sensealg, **kw)
            return loss_of(sol.u)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    def call(fn: Callable[..., Any]) -> Callable[[], Any]:
        new_p = _cycle(ps)
        return lambda: jax.block_until_ready(fn(u0, new_p()))

    variants: dict[str, Callable[[], Any]] = {}
    pairs = []
    for sname, native in natives.items():
        dk_name = f"dk {sname} (jit)"
        nat_name = f"diffrax {sname} (jit)"
        variants[nat_name] = call(native)
        variants[dk_name] = call(dk_grad(SENSEALGS[sname]))
        pairs.append((dk_name, nat_name, TARGET))

    default = dk.default_sensealg("jax", prob.u0, prob.p)

    eager_p = _cycle(ps)

    def eager() -> Any:
        value, grads = dk.value_and_grad(
            lambda sol: _loss(sol, data), prob.remake(p=eager_p()), **kw
        )
        return jax.block_until_ready((value, grads.u0, grads.p))

    vjp_p = _cycle(ps)

    def eager_vjp() -> Any:
        sol, pullback = dk.vjp(prob.remake(p=vjp_p()), **kw)
        ct = sol.u - data
        grads = pullback(ct)
        return jax.block_until_ready((0.5 * jnp.sum(ct**2), grads.u0, grads.p))

    native_default = f"diffrax {default.name} (jit)"
    for name, fn in (
        (f"dk.vjp eager, default {default.name}", eager_vjp),
        (f"dk.value_and_grad eager, default {default.name}", eager),
    ):
        variants[name] = fn
        pairs.append((name, native_default, EAGER_TARGET))

    @jax.jit
    def native_stats(y0: Any, p: Any) -> Any:
        return diffrax_solve(y0, p).stats

    def checks() -> dict[str, Any]:
        # The forward steps (those every sensealg's gradient runs on): dk's eager
        # solve and the same diffrax solve, at the problem's own p.
        sol = dk.solve(prob, **kw)
        stats = native_stats(u0, tree_map(jnp.asarray, prob.p))
        return {
            "steps (accepted, rejected)": {
                "dk": [sol.stats["naccept"], sol.stats["nreject"]],
                "diffrax": [
                    int(stats["num_accepted_steps"]),
                    int(stats["num_rejected_steps"]),
                ],
            }
        }

    return Group(
        variants,
        pairs,
        settings={"alg": "tsit5", "default_sensealg": default.name},
        notes=[
            "dk's PIDController subclass adds a guard (a rejected step below 10 "
            "ulps of t stops the solve) that plain diffrax.PIDController lacks; "
            "its cost is counted as dk's.",
            "ForwardMode: dk runs a custom VJP (vmap of jvp through "
            "diffrax.ForwardMode, contracted in the backward pass); the direct "
            "equivalent is jax.jacfwd(has_aux=True) through diffrax.ForwardMode "
            "and the same contraction.",
            "Every call gets a new p; f's Python calls (JAX traces) are counted.",
        ],
        checks=checks,
        traces=lambda: f.calls,
    )


# --- torch -----------------------------------------------------------------------


def torch_gradient_group(bp: Any) -> Group:
    """``loss.backward()`` through dk.solve against torchdiffeq called directly.

    dk's dopri5 on torch is torchdiffeq's adaptive Runge-Kutta machinery with the
    shared Dormand-Prince tableau, which differs from torchdiffeq's "dopri5" in
    three ways: the error estimate uses the standard Dormand-Prince weights (those
    of SciPy's RK45, diffrax and OrdinaryDiffEq) where torchdiffeq's uses
    Shampine's (its ``c_error`` is another embedded 4th-order solution, about 2/3
    of the standard estimate with other weights), so the two take different
    steps (Lotka-Volterra: 88 + 21 rejected against 82 + 21); the last step lands
    on t1 (torchdiffeq's ``step_t`` option); and saves between steps come from the
    tableau's dense output, not torchdiffeq's quartic fit through the midpoint.

    The native side is therefore torchdiffeq's own ``Dopri5Solver`` with its
    ``c_error`` replaced by SciPy's ``RK45.E`` (registered in torchdiffeq's
    ``SOLVERS`` as ``"dopri5_standard_error"`` in this process) and
    ``options={"step_t": [t1]}``: torchdiffeq's stepping, controller and
    interpolation, the same steps as dk. The adjoint's backward solve lands on
    every save time in dk (``adjoint_options={"step_t": ts}``), and natively too.
    Stock torchdiffeq "dopri5" is timed as context (ratio, no target).
    """
    import torch
    import torchdiffeq

    torch.set_num_threads(1)  # in this benchmark process only
    method = _torchdiffeq_standard_error()
    f = Counted(bp.prob.f)
    prob = bp.prob.remake(f=f)
    dtype = torch.float64
    u0 = torch.tensor(prob.u0, dtype=dtype)
    p = tree_map(lambda x: torch.tensor(x, dtype=dtype), prob.p)
    ts = torch.tensor(bp.saveat, dtype=dtype)
    data = torch.tensor(bp.data, dtype=dtype)
    kw = {"backend": "torch", "saveat": bp.saveat, "rtol": RTOL, "atol": ATOL}

    def fresh() -> tuple[Any, Any]:
        return (
            u0.detach().clone().requires_grad_(),
            tree_map(lambda x: x.detach().clone().requires_grad_(), p),
        )

    def finish(u: Any, y0: Any, q: Any) -> tuple[Any, ...]:
        loss = 0.5 * ((u - data) ** 2).sum()
        loss.backward()
        return (loss.detach(), y0.grad, *(x.grad for x in leaves(q)))

    def dk_grad(sensealg: Any) -> Callable[[], Any]:
        def run() -> Any:
            y0, q = fresh()
            sol = dk.solve(prob.remake(u0=y0, p=q), "dopri5", sensealg=sensealg, **kw)
            return finish(sol.u, y0, q)

        return run

    forward_options = {"step_t": ts[-1:]}

    def native(method: str, options: Any, adjoint: bool = False) -> Callable[[], Any]:
        """torchdiffeq called directly: odeint + backward, or odeint_adjoint with
        dk's adjoint settings (same tolerances, steps landing on the saves)."""

        def run() -> Any:
            y0, q = fresh()
            extra: dict[str, Any] = {}
            if adjoint:
                extra = {
                    "adjoint_rtol": RTOL,
                    "adjoint_atol": ATOL,
                    "adjoint_method": method,
                    "adjoint_options": {"step_t": ts},
                    "adjoint_params": tuple(leaves(q)),
                }
            solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
            u = solve(
                lambda t, y: f(y, q, t),
                y0,
                ts,
                rtol=RTOL,
                atol=ATOL,
                method=method,
                options=options,
                **extra,
            )
            return finish(u, y0, q)

        return run

    variants = {
        "torchdiffeq odeint + backward": native(method, forward_options),
        "dk ReverseThroughSolver": dk_grad(dk.ReverseThroughSolver()),
        "torchdiffeq odeint_adjoint": native(method, forward_options, adjoint=True),
        "dk ContinuousAdjoint": dk_grad(dk.ContinuousAdjoint()),
        "dk CheckpointedAdjoint (no native)": dk_grad(dk.CheckpointedAdjoint()),
        "dk ForwardMode (no native)": dk_grad(dk.ForwardMode()),
        "stock torchdiffeq dopri5 odeint + backward": native("dopri5", None),
    }
    pairs = [
        ("dk ReverseThroughSolver", "torchdiffeq odeint + backward", TARGET),
        ("dk ContinuousAdjoint", "torchdiffeq odeint_adjoint", TARGET),
    ]
    return Group(
        variants,
        pairs,
        settings={
            "alg": "dopri5",
            "torchdiffeq method": "Dopri5Solver with c_error = SciPy's RK45.E",
            "torchdiffeq forward options": {"step_t": "[t1]"},
            "torchdiffeq adjoint": {
                "adjoint_rtol": RTOL,
                "adjoint_atol": ATOL,
                "adjoint_method": "the same",
                "adjoint_options": {"step_t": "save times"},
                "adjoint_params": "p's tensors",
            },
            "dk ContinuousAdjoint": "rtol=None, atol=None: the forward ones",
            "threads": torch.get_num_threads(),
        },
        notes=[
            "Native calls land the last step on t1 (step_t), as dk's solver does; "
            "without it torchdiffeq steps past t1 and interpolates back, a "
            "different step sequence.",
            "dk's dense output is the tableau's (one matmul), torchdiffeq's a "
            "quartic fit through the midpoint: same cost class, values differ at "
            "rounding-to-interpolation level between steps.",
        ],
        counter=f,
        context=[
            (
                "dk ReverseThroughSolver",
                "stock torchdiffeq dopri5 odeint + backward",
            )
        ],
    )


def _torchdiffeq_standard_error() -> str:
    """torchdiffeq's Dopri5Solver with the standard Dormand-Prince error weights
    (SciPy's ``RK45.E``), registered under a new name; the name."""
    import torch
    from scipy.integrate import RK45
    from torchdiffeq._impl.dopri5 import Dopri5Solver
    from torchdiffeq._impl.odeint import SOLVERS

    name = "dopri5_standard_error"
    if name not in SOLVERS:
        tableau = Dopri5Solver.tableau._replace(
            c_error=torch.tensor(RK45.E, dtype=torch.float64)
        )
        SOLVERS[name] = type(
            "Dopri5StandardError", (Dopri5Solver,), {"tableau": tableau}
        )
    return name


# --- SciPy -----------------------------------------------------------------------


def _flat_params(p: Any) -> tuple[np.ndarray, Callable[[Any], Any]]:
    """p's leaves as one float64 vector, and the map back (any array type)."""
    found = leaves(p)
    shapes = [np.shape(x) for x in found]
    sizes = [int(np.prod(s)) for s in shapes]
    q = np.concatenate([np.ravel(x) for x in found])

    def unflatten(vec: Any) -> Any:
        parts, start = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            parts.append(vec[start : start + size].reshape(shape))
            start += size
        it = iter(parts)
        return tree_map(lambda _: next(it), p)

    return q, unflatten


def scipy_gradient_group(bp: Any) -> Group:
    """dk's SciPy gradients against the same computation with solve_ivp.

    dk's default engine (JAX with x64 on, diffeqkit/backends/scipy/_autodiff.py)
    evaluates, per call of the integrated system, one jitted function: for
    ForwardMode ``jax.linearize`` of f and a ``vmap`` of the linear map over the
    ``k = n + P`` sensitivity columns; for ContinuousAdjoint one ``jax.vjp``.
    The native side jits the same functions by hand, integrates the sensitivity
    system with ``solve_ivp(method="RK45")`` (dk's dopri5 is RK45's tableau), and
    the backsolve with SciPy's ``RK45`` stepped between consecutive save times
    backward, each piece starting with the step size the previous one ended with
    (as dk does; ``solve_ivp`` cannot take it over, so the stepping loop is
    ``solve_ivp``'s own, written out).
    """
    import jax
    import jax.numpy as jnp
    from scipy.integrate import RK45, solve_ivp

    _jax_x64()
    f = Counted(bp.prob.f)
    prob = bp.prob.remake(f=f)
    t0, t1 = prob.tspan
    ts = bp.saveat
    data = bp.data
    u0 = np.asarray(prob.u0, dtype=np.float64)
    n = u0.size
    q, unflatten = _flat_params(prob.p)
    size = q.size
    k = n + size
    tangents = np.concatenate([np.zeros((size, n)), np.eye(size)], axis=1)
    kw = {"backend": "scipy", "saveat": ts, "rtol": RTOL, "atol": ATOL}

    def rhs(u: Any, q: Any, t: Any) -> Any:
        return f(u, unflatten(q), t)

    @jax.jit
    def sensitivities(t: Any, y: Any, q: Any) -> Any:
        fu, lin = jax.linearize(lambda u, q: rhs(u, q, t), y[:n], q)
        dS = jax.vmap(lin, in_axes=(1, 1), out_axes=1)(y[n:].reshape(n, k), tangents)
        return jnp.concatenate([fu, dS.reshape(-1)])

    @jax.jit
    def backsolve(t: Any, y: Any, q: Any) -> Any:
        fu, pull = jax.vjp(lambda u, q: rhs(u, q, t), y[:n], q)
        gu, gq = pull(y[n : 2 * n])
        return jnp.concatenate([fu, -gu, -gq])

    nfev: dict[str, int] = {}
    y0_sens = np.concatenate([u0, np.eye(n, k).reshape(-1)])

    def contract(u: Any, S: Any) -> tuple[Any, ...]:
        ct = u - data
        g = np.einsum("mi,mik->k", ct, S)
        return 0.5 * np.sum(ct**2), g[:n], g[n:]

    def solve_sensitivities(rhs: Callable[[Any, Any], Any], label: str) -> Any:
        """solve_ivp RK45 of the forward-sensitivity system `rhs`, contracted."""
        sol = solve_ivp(
            rhs, (t0, t1), y0_sens, method="RK45", t_eval=ts, rtol=RTOL, atol=ATOL
        )
        nfev[label] = sol.nfev
        Y = sol.y.T
        return contract(Y[:, :n], Y[:, n:].reshape(-1, n, k))

    def native_forward_mode() -> Any:
        return solve_sensitivities(
            lambda t, y: np.asarray(sensitivities(t, y, q)), "native ForwardMode"
        )

    p_np = prob.p

    def native_backsolve() -> Any:
        fwd = solve_ivp(
            lambda t, y: f(y, p_np, t),
            (t0, t1),
            u0,
            method="RK45",
            t_eval=ts,
            rtol=RTOL,
            atol=ATOL,
        )
        nfev["native ContinuousAdjoint (forward solve)"] = fwd.nfev
        count = 0
        u = fwd.y.T
        ct = u - data

        def fun(t: float, y: Any) -> Any:
            return np.asarray(backsolve(t, y, q))

        y = np.concatenate([u[-1], ct[-1], np.zeros(size)])
        h = None
        for i in range(len(ts) - 1, 0, -1):
            first = None if h is None else min(h, abs(ts[i] - ts[i - 1]))
            solver = RK45(
                fun, ts[i], y, ts[i - 1], rtol=RTOL, atol=ATOL, first_step=first
            )
            while solver.status == "running":
                solver.step()
            count += solver.nfev
            h = solver.h_abs
            y = solver.y.copy()
            y[:n] = u[i - 1]
            y[n : 2 * n] += ct[i - 1]
        nfev["native ContinuousAdjoint (backward solve)"] = count
        return 0.5 * np.sum(ct**2), y[n : 2 * n], y[2 * n :]

    def dk_value_and_grad(sensealg: Any) -> Callable[[], Any]:
        def run() -> Any:
            value, grads = dk.value_and_grad(
                lambda sol: _loss(sol, data), prob, "dopri5", sensealg=sensealg, **kw
            )
            return value, grads.u0, *leaves(grads.p)

        return run

    def dk_vjp(sensealg: Any) -> Callable[[], Any]:
        def run() -> Any:
            sol, pullback = dk.vjp(prob, "dopri5", sensealg=sensealg, **kw)
            # dk's stats count the forward solve (for ForwardMode: of the
            # sensitivity system); the backward one is checked by the gradients
            # agreeing with the native ones to rounding.
            suffix = " (forward solve)" if sensealg.name == "ContinuousAdjoint" else ""
            nfev[f"dk {sensealg.name}{suffix}"] = sol.stats["nfev"]
            ct = sol.u - data
            grads = pullback(ct)
            return 0.5 * np.sum(ct**2), grads.u0, *leaves(grads.p)

        return run

    variants: dict[str, Callable[[], Any]] = {
        "solve_ivp forward sensitivities (jax jvp)": native_forward_mode,
        "dk ForwardMode, dk.vjp": dk_vjp(dk.ForwardMode()),
        "dk ForwardMode, dk.value_and_grad": dk_value_and_grad(dk.ForwardMode()),
        "solve_ivp + RK45 backsolve (jax vjp)": native_backsolve,
        "dk ContinuousAdjoint, dk.vjp": dk_vjp(dk.ContinuousAdjoint()),
        "dk ContinuousAdjoint, dk.value_and_grad": dk_value_and_grad(
            dk.ContinuousAdjoint()
        ),
    }
    fm = "solve_ivp forward sensitivities (jax jvp)"
    ca = "solve_ivp + RK45 backsolve (jax vjp)"
    pairs = [
        ("dk ForwardMode, dk.vjp", fm, TARGET),
        ("dk ForwardMode, dk.value_and_grad", fm, TARGET),
        ("dk ContinuousAdjoint, dk.vjp", ca, TARGET),
        ("dk ContinuousAdjoint, dk.value_and_grad", ca, TARGET),
    ]
    notes = [
        "Both sides differentiate f with the same jitted JAX functions (dk's "
        "default engine); dk.vjp takes the cotangent u - data from NumPy like the "
        "native code, dk.value_and_grad computes it by eager JAX autodiff of the "
        "loss (the engine's rule).",
        "The native backsolve carries the step size from one piece to the next as "
        "dk does; with solve_ivp per piece each piece would choose its own first "
        "step (one more evaluation each, other steps).",
    ]
    context: dict[str, Callable[[], Any]] = {}
    if bp.name == "lotka_volterra":

        def lv_sensitivities(t: float, y: Any) -> Any:
            a, b, c, d = q
            x, v = y[0], y[1]
            J = np.array([[a - b * v, -b * x], [d * v, -c + d * x]])
            fp = np.array([[x, -x * v, 0.0, 0.0], [0.0, 0.0, -v, x * v]])
            dS = J @ y[2:].reshape(n, k)
            dS[:, n:] += fp
            du = [a * x - b * x * v, -c * v + d * x * v]
            return np.concatenate([du, dS.reshape(-1)])

        def analytic() -> Any:
            return solve_sensitivities(lv_sensitivities, "NumPy analytic ForwardMode")

        context["solve_ivp forward sensitivities (NumPy analytic J)"] = analytic
        notes.append(
            "Context only (no target): the sensitivity system of Lotka-Volterra "
            "written in NumPy with its analytic Jacobian, what a SciPy user with "
            "a small hand-differentiated model runs. It avoids the ~10-20 us "
            "dispatch of a jitted JAX call per evaluation, which both dk and the "
            "native JAX-engine code pay."
        )
    variants.update(context)
    return Group(
        variants,
        pairs,
        settings={"alg": "dopri5 (RK45's tableau)", "engine": "jax (dk's default)"},
        notes=notes,
        checks=lambda: {"nfev (integrated system)": dict(nfev)},
        context=[(name, fm) for name in context],
    )


GRADIENT_GROUPS: dict[str, Callable[[Any], Group]] = {
    "jax": jax_gradient_group,
    "torch": torch_gradient_group,
    "scipy": scipy_gradient_group,
}


def _flat(x: Any) -> np.ndarray:
    """Every number in a (nested) result as one float64 vector; dicts by key."""
    if isinstance(x, dict):
        return _flat([x[k] for k in sorted(x)])
    if isinstance(x, list | tuple):
        parts = [_flat(v) for v in x if v is not None]
        return np.concatenate(parts) if parts else np.zeros(0)
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().numpy()
    return np.ravel(np.asarray(x, dtype=np.float64))


def _rel_diff(a: Any, b: Any) -> float:
    x, y = _flat(a), _flat(b)
    return float(np.max(np.abs(x - y)) / np.max(np.abs(y)))


def run_gradient_group(
    backend: str, problem: str, repeat: int, warmup: int, budget_s: float
) -> Results:
    bp = PROBLEMS[problem]()
    group = GRADIENT_GROUPS[backend](bp)
    prefix = f"{backend} {problem} gradient: "
    traces: dict[str, int] = {}
    if group.traces is not None:
        traces["before"] = group.traces()

    def on_warm() -> None:
        if group.traces is not None:
            traces["after warm-up"] = group.traces()

    timed = interleaved(
        group.variants, repeat, warmup=warmup, budget_s=budget_s, on_warm=on_warm
    )
    record: dict[str, Any] = {
        "settings": group.settings,
        "notes": group.notes,
        "inputs": input_size(bp.prob.u0, bp.prob.p),
    }
    if group.traces is not None:
        traces["after timing"] = group.traces()
        record["traces of f during warm-up"] = (
            traces["after warm-up"] - traces["before"]
        )
        record["retraces"] = traces["after timing"] - traces["after warm-up"]
    # Same computation? One more call of each variant of a pair (once each, so
    # that the variants' cycles of p stay in step): the results must agree (to
    # rounding where the steps are the same).
    outputs: dict[str, Any] = {}
    calls: dict[str, int] = {}
    for name in dict.fromkeys(n for pair in group.pairs for n in pair[:2]):
        before = group.counter.calls if group.counter is not None else 0
        outputs[name] = group.variants[name]()
        if group.counter is not None:
            calls[name] = group.counter.calls - before
    agreement = {
        dk_name: _rel_diff(outputs[dk_name], outputs[native])
        for dk_name, native, _ in group.pairs
    }
    record["max relative difference of (value, grads) dk vs native"] = agreement
    if group.counter is not None:
        record["f calls per gradient"] = calls
    record["checks"] = group.checks()
    res = Results()
    for name, row in timed.items():
        row.update({"part": "gradient", "problem": problem, "backend": backend})
        res.timings[prefix + name] = row
    for dk_name, native, target in group.pairs:
        res.ratio(
            prefix + dk_name,
            prefix + native,
            target,
            part="gradient",
            problem=problem,
            backend=backend,
        )
    record["context"] = {
        f"{name} / {base}": timed[name]["median_s"] / timed[base]["median_s"]
        for name, base in group.context
    }
    res.groups[f"{backend} {problem}"] = record
    print(f"\n== {backend} / {problem}")
    _print_rows({k: v for k, v in timed.items() if "median_s" in v})
    print(json.dumps({k: v for k, v in record.items() if k != "notes"}, indent=1))
    return res


def part_gradient(
    backends: list[str], repeat: int, warmup: int, budget_s: float
) -> Results:
    res = Results()
    for backend in backends:
        for problem in PROBLEMS:
            res.update(run_gradient_group(backend, problem, repeat, warmup, budget_s))
    return res


# ---------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------


def _print_rows(rows: dict[str, Any]) -> None:
    width = max([len(k) for k in rows] + [10])
    print(f"{'variant':<{width}} {'median':>10} {'q1':>10} {'q3':>10} {'n':>5}")
    for name, row in rows.items():
        print(
            f"{name:<{width}} {row['median_s'] * 1e3:8.3f}ms "
            f"{row['q1_s'] * 1e3:8.3f}ms {row['q3_s'] * 1e3:8.3f}ms {row['n']:5d}"
        )


def _print_ratios(ratios: list[dict[str, Any]]) -> None:
    width = max([len(r["variant"]) for r in ratios] + [10])
    print(f"\n{'variant (/ baseline)':<{width}} {'ratio':>7} {'target':>7}")
    for r in ratios:
        print(
            f"{r['variant']:<{width}} {r['ratio']:7.3f} {r['target']:7.2f} "
            f"{'ok' if r['met'] else 'MISSED'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        nargs="*",
        choices=["forward", "gradient"],
        default=["forward", "gradient"],
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=0,
        help="timed rounds per group (default: forward per backend, gradient "
        "what fits in a time budget)",
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a few rounds: smoke run")
    parser.add_argument("--backends", nargs="*", default=list(dk.support_matrix()))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    repeat, warmup, budget = args.repeat, args.warmup, BUDGET_S
    if args.quick:
        repeat, warmup = repeat or 3, 1

    res = Results()
    if "forward" in args.part:
        res.update(part_forward(args.backends, repeat, warmup))
    if "gradient" in args.part:
        # One more untimed call each than the forward part: diffrax's gradient
        # programs, the torch and SciPy first calls warm their own caches.
        res.update(part_gradient(args.backends, repeat, max(warmup, 2), budget))

    print()
    _print_rows({k: v for k, v in res.timings.items() if v.get("part") == "forward"})
    _print_ratios(res.ratios)
    retraces = sum(g.get("retraces", 0) for g in res.groups.values())

    # A run of one part keeps the other part's results from the file.
    previous: dict[str, Any] = {}
    if args.out.exists():
        previous = json.loads(args.out.read_text())
    kept = [p for p in ("forward", "gradient") if p not in args.part]
    timings = {
        k: v
        for k, v in previous.get("timings", {}).items()
        if v.get("part", "forward") in kept
    }
    timings.update(res.timings)
    ratios = [r for r in previous.get("ratios", []) if r.get("part", "forward") in kept]
    ratios.extend(res.ratios)
    groups = previous.get("gradient", {}) if "gradient" in kept else {}
    groups.update(res.groups)
    out = {
        "benchmark": "overhead: dk against the libraries called directly "
        "(Lotka-Volterra forward solve; gradients on Lotka-Volterra and a "
        "neural ODE)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "versions": versions(
            "diffeqkit", "numpy", "jax", "diffrax", "torch", "torchdiffeq", "scipy"
        ),
        "settings": {
            "parts": args.part,
            "repeat": {g: repeat or DEFAULT_REPEAT[g] for g in args.backends},
            "gradient rounds": repeat or f"what fits in {budget:.0f} s per group",
            "warmup": warmup,
            "quick": args.quick,
            "rtol": RTOL,
            "atol": ATOL,
            "save_points": len(TS),
        },
        "timings": timings,
        "ratios": ratios,
        "gradient": groups,
        "retraces": retraces,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {args.out}")
    if retraces:
        print(f"FAILED: f was traced again {retraces} time(s) after the warm-up")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
