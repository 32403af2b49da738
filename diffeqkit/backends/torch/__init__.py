"""The PyTorch backend: diffeqkit's methods on torchdiffeq's own machinery.

Requirements met here:

- Every method is built from the shared Butcher tableaux (`diffeqkit._tableaux`), so
  all backends step with the same coefficients. The adaptive ones (bosh3, dopri5,
  tsit5, dopri8) subclass torchdiffeq's `RKAdaptiveStepsizeODESolver` (its stepper,
  error norm and step-size controller); the fixed-step ones (euler, midpoint, heun,
  rk4 -- the classical method, not torchdiffeq's 3/8 rule) subclass
  `FixedGridODESolver` and step on `diffeqkit._saveat.step_grid`, so saved values
  are step values.
- The implicit method rosenbrock23 (MATLAB's ode23s: L-stable, order 2, for
  stiff problems; `_implicit`) subclasses the same adaptive class with its own
  step: Jacobians by ``torch.func.jacrev`` (or ``prob.jac``), one LU per step;
  stats add ``njev`` and ``nlu``.
- Save values of adaptive methods come from the tableau's own dense output ``p``
  (the one SciPy uses), of the tableau's ``dense_order``: torchdiffeq's quartic
  fit through a midpoint is order 4 (and, for its bosh3, far less accurate than
  the step values); torchdiffeq has no tsit5. For dopri8 the shared ``p`` is of
  order 5 only, so between steps dopri8 is less accurate than at step ends.
- The solver classes are ordinary torchdiffeq solvers, registered in torchdiffeq's
  ``SOLVERS`` as ``"diffeqkit_<alg>"`` (new, namespaced keys; nothing of
  torchdiffeq's own changes), so ``torchdiffeq.odeint`` and ``odeint_adjoint`` run
  them as they are, with ``options={"step_size": dt0}`` (fixed step) or
  ``{"first_step": dt0, "max_steps": n, "step_t": [t1]}`` (adaptive), as `solve`
  does. `solve` drives them directly (``_before_integrate`` / ``_advance``, or
  ``integrate``) to stop cleanly after ``max_steps`` steps, to tell a step size
  that underflows from a non-finite state, and to return partial solutions --
  torchdiffeq itself only asserts on those.
- Backward integration (``t1 < t0``) negates time, exactly as ``odeint`` does.
  The last step lands on ``t1`` (torchdiffeq's ``step_t``) rather than stepping
  past it and interpolating back, so ``f`` is never evaluated beyond ``t1``.
- The user's ``f(u, p, t)`` sees ``u`` of ``u0``'s shape, ``p`` converted leaf by
  leaf (torch tensors used as they are, so autograd flows), and ``t`` a 0-d tensor
  in the state's dtype. Its first evaluation at ``t0`` is checked by
  `check_rhs_output` and reused as the solver's first evaluation.
- dtype: lists -> ``torch.get_default_dtype()``, arrays keep theirs, ``dtype=``
  casts. device: the named one, else u0's, else that of p's tensors, else
  ``torch.get_default_device()``; an unavailable CUDA device raises
  `UnsupportedError`. Nothing global of torch is changed.
- Gradients: when autograd records and u0 or a tensor in p requires grad,
  ``sol.u`` is differentiable (``loss.backward()``) by the request's sensealg,
  dispatched by the table `_backend._SENSEALGS`: `ReverseThroughSolver` is
  autograd through the steps of the plain solve (`_solve`); `CheckpointedAdjoint`
  (`_checkpoint`) and `ForwardMode` (`_forward`) are `torch.autograd.Function`\\ s
  that record the step schedule and replay it (`_replay`);
  `ContinuousAdjoint` (`_adjoint`) is torchdiffeq's ``odeint_adjoint`` on the same
  solver classes (the backsolve), except for implicit algs, where it is the
  interpolating adjoint (`_interpolating`): the state is read off the forward
  solve's dense output (kept in memory: O(steps)) and only the adjoint is
  integrated backward, with the same implicit method, as on JAX and SciPy
  (a backsolve of a stiff problem blows up backward). The first three give
  the same gradient to rounding: that of the computed solution with the steps
  held fixed (no gradient through the step-size controller, torchdiffeq's
  automatic first step included). Otherwise the solve
  is the plain one, with nothing added. `dk.vjp` makes u0 and p's leaves tensors
  that require grad and pulls back with ``torch.autograd.grad``.
- Overhead: per call, a handful of tensor conversions; per step, torchdiffeq's own
  work plus a step counter and one underflow check. Tableau tensors are built once
  per (method, dtype, device) and cached.
"""

from __future__ import annotations

from ._backend import TorchBackend
from ._solve import ALG_SOLVERS

__all__ = ["BACKEND", "TorchBackend"]

BACKEND = TorchBackend()

# The alg table (a test checks it against the registry's declaration).
_ALGS = ALG_SOLVERS
