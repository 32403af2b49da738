"""ForwardMode on JAX: the solve as a custom VJP whose forward pass computes the
Jacobian of the saved states by forward-mode AD through diffrax's steps, and whose
backward pass contracts it with the cotangent (SciMLSensitivity's
ForwardDiffSensitivity under reverse mode)."""

from __future__ import annotations

from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from ._solve import Job, fixed_inputs, solve_with

__all__ = ["solve"]

_TIMES = (
    "sensealg=dk.ForwardMode() on backend='jax' differentiates with respect to u0 "
    "and p only, not tspan, saveat, rtol or atol. Use "
    "sensealg=dk.ReverseThroughSolver() or dk.CheckpointedAdjoint() for gradients "
    "with respect to times."
)


def solve(job: Job) -> tuple[Any, Any]:
    """``(ys, counts)``, differentiable by forward mode: one batched tangent per
    input number that is differentiated (JAX's symbolic zeros tell which)."""
    p_tree = jax.tree_util.tree_structure(job.p)

    def run(y0: Any, p: Any, times: Any, ts: Any, grid: Any) -> tuple[Any, Any]:
        # diffrax's own init: a given solver state, whose tangents are computed
        # outside the solve, made gradients slower (docs/performance.md).
        inner = Job(job.cfg, y0, p, times, ts, grid)
        return solve_with(inner, diffrax.ForwardMode(), own_init=True)

    @jax.custom_vjp
    def solve(y0: Any, p: Any, times: Any, ts: Any, grid: Any) -> tuple[Any, Any]:
        return run(y0, p, times, ts, grid)

    def fwd(y0: Any, p: Any, times: Any, ts: Any, grid: Any) -> Any:
        primal = lambda x: isinstance(x, CustomVJPPrimal)  # noqa: E731
        fixed = fixed_inputs((times, ts, grid), _TIMES)
        # y0 is one array, then p's leaves.
        inputs = jax.tree_util.tree_leaves((y0, p), is_leaf=primal)
        values = [x.value for x in inputs]
        which = [i for i, x in enumerate(inputs) if x.perturbed]
        sizes = [values[i].size for i in which]
        parts: list[Any] = [None] * len(values)
        if sum(sizes) == 0:  # nothing to differentiate (an empty u0, say)
            ys, counts = run(values[0], p_tree.unflatten(values[1:]), *fixed)
            for i in which:
                parts[i] = jnp.zeros(values[i].shape + ys.shape, ys.dtype)
            return (ys, counts), parts
        cuts = np.cumsum(sizes)[:-1]
        flat = jnp.concatenate([jnp.ravel(values[i]) for i in which])

        def g(flat: Any) -> tuple[Any, Any]:
            full = list(values)
            for i, part in zip(which, jnp.split(flat, cuts), strict=True):
                full[i] = part.reshape(values[i].shape).astype(values[i].dtype)
            return run(full[0], p_tree.unflatten(full[1:]), *fixed)

        # One tangent per input number; the primal (and with it every step-size
        # decision) is not batched, so all tangents share the steps.
        ys, tangents, counts = jax.vmap(
            lambda v: jax.jvp(g, (flat,), (v,), has_aux=True),
            out_axes=(None, 0, None),
        )(jnp.eye(flat.size, dtype=flat.dtype))
        for i, jac in zip(which, jnp.split(tangents, cuts), strict=True):
            parts[i] = jac.reshape(values[i].shape + ys.shape)
        return (ys, counts), parts

    def bwd(parts: Any, cts: Any) -> Any:
        ct_ys = cts[0]
        grads = [
            None
            if jac is None or isinstance(ct_ys, SymbolicZero)
            else jnp.tensordot(jac, ct_ys.astype(jac.dtype), axes=ct_ys.ndim)
            for jac in parts
        ]
        return (grads[0], p_tree.unflatten(grads[1:]), None, None, None)

    solve.defvjp(fwd, bwd, symbolic_zeros=True)
    return solve(job.y0, job.p, job.times, job.ts, job.grid)
