"""Fit Lotka-Volterra's four rates to noisy data, on every installed backend.

The same loss and the same gradient call (`dk.value_and_grad`) run on SciPy,
JAX and PyTorch; `--sensealg` switches the gradient method and nothing else
changes. The fit is plain gradient descent in log-parameters with a step that
halves until the loss falls (a few lines, so the gradient is what is on show).

Run: python examples/fit_lotka_volterra.py [--quick] [--sensealg NAME]
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np

import diffeqkit as dk
from diffeqkit import backends

TRUE_P = np.array([1.5, 1.0, 3.0, 1.0])
TS = np.linspace(0.0, 10.0, 41)
SENSEALGS = {
    "default": None,
    "forward": dk.ForwardMode(),
    "reverse": dk.ReverseThroughSolver(),
    "adjoint": dk.ContinuousAdjoint(),
    "checkpointed": dk.CheckpointedAdjoint(),
}


def lotka_volterra(u, p, t):
    xp = dk.array_namespace(u)
    a, b, c, d = p[0], p[1], p[2], p[3]
    return xp.stack([a * u[0] - b * u[0] * u[1], -c * u[1] + d * u[0] * u[1]])


def synthetic_data(seed: int = 0) -> np.ndarray:
    prob = dk.ODEProblem(lotka_volterra, np.array([1.0, 1.0]), (0.0, 10.0), TRUE_P)
    sol = dk.solve(prob, "tsit5", backend="scipy", saveat=TS, rtol=1e-10, atol=1e-10)
    return sol.u + np.random.default_rng(seed).normal(scale=0.05, size=sol.u.shape)


def fit(backend: str, sensealg, data: np.ndarray, iterations: int) -> None:
    def loss(sol):
        xp = dk.array_namespace(sol.u)
        target = xp.asarray(data, dtype=sol.u.dtype)
        return xp.mean((sol.u - target) ** 2)

    def value_and_grad(log_p: np.ndarray) -> tuple[float, np.ndarray]:
        p = np.exp(log_p)
        prob = dk.ODEProblem(lotka_volterra, np.array([1.0, 1.0]), (0.0, 10.0), p)
        value, grads = dk.value_and_grad(
            loss, prob, "tsit5", backend=backend, saveat=TS, sensealg=sensealg
        )
        # Chain rule through p = exp(log p).
        return float(value), np.asarray(_to_numpy(grads.p)) * p

    log_p = np.log(TRUE_P * np.array([1.1, 0.9, 0.9, 1.1]))
    value, grad = value_and_grad(log_p)
    first, step = value, 0.5
    start = time.perf_counter()
    for _ in range(iterations):
        while step > 1e-8:
            trial = log_p - step * grad
            trial_value, trial_grad = value_and_grad(trial)
            if trial_value < value:
                log_p, value, grad, step = trial, trial_value, trial_grad, step * 1.5
                break
            step /= 2
    elapsed = time.perf_counter() - start
    print(
        f"{backend:<6} tsit5  loss {first:.4f} -> {value:.4f} in {iterations} steps "
        f"({elapsed:.2f} s); p = {np.round(np.exp(log_p), 3)} (true {TRUE_P})"
    )


def _to_numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    parser.add_argument("--sensealg", choices=list(SENSEALGS), default="default")
    args = parser.parse_args()
    if importlib.util.find_spec("jax") is not None:
        import jax

        # This script's choice (float64 on JAX); diffeqkit never flips it.
        jax.config.update("jax_enable_x64", True)
    data = synthetic_data()
    sensealg = SENSEALGS[args.sensealg]
    for backend in backends.SPECS:
        if not backends.installed(backend):
            print(f"{backend:<6} not installed")
            continue
        if backend == "scipy" and not any(
            importlib.util.find_spec(m) for m in ("jax", "torch")
        ):
            print("scipy  gradients need jax or torch to differentiate f; skipped")
            continue
        try:
            fit(backend, sensealg, data, 3 if args.quick else 60)
        except dk.UnsupportedError as err:
            print(f"{backend:<6} tsit5  {err}")


if __name__ == "__main__":
    main()
