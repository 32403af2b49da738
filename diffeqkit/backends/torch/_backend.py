"""`TorchBackend`: the plain solve, the sensealg table, `dk.vjp` and its losses.

`SENSEALGS` maps each gradient method to the function that runs a request whose
inputs require grad; `vjp` differentiates with respect to fresh leaves, so its
pullback can be called any number of times.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..._pytree import leaves, tree_map
from ..._sensealg import (
    CheckpointedAdjoint,
    ContinuousAdjoint,
    ForwardMode,
    InterpolatingAdjoint,
    ReverseThroughSolver,
)
from ..._solution import Solution
from .._protocol import Pullback, SensealgTable, SolveRequest
from . import (
    _adjoint,
    _checkpoint,
    _engine,
    _ensemble,
    _events,
    _forward,
    _interpolating,
    _policy,
    _replay,
)
from ._params import param_view
from ._solve import (
    check_inputs,
    grad_input,
    replace_leaves,
    requires_grad,
    solve_device,
    solve_plain,
    state_dtype,
    to_param,
    to_state,
    visible_devices,
)

__all__ = ["SENSEALGS", "TorchBackend"]

# How each gradient method runs a solve whose inputs require grad. (A solve that
# autograd does not record is the plain one whatever the sensealg.)
SENSEALGS: SensealgTable[SolveRequest, Solution] = {
    ForwardMode: _forward.solve,
    ReverseThroughSolver: _replay.solve_through,
    ContinuousAdjoint: _adjoint.solve,
    InterpolatingAdjoint: _interpolating.solve,
    CheckpointedAdjoint: _checkpoint.solve,
}


class TorchBackend:
    """diffeqkit on PyTorch.

    Offers the explicit methods euler, midpoint, heun, rk4 (fixed step) and bosh3,
    dopri5, tsit5, dopri8 (adaptive), all built from `diffeqkit._tableaux`, the
    implicit rosenbrock23 (stiff problems), and every sensealg: `loss.backward()`
    through `dk.solve` runs the one the request names.
    """

    name = "torch"

    def solve(self, req: SolveRequest) -> Solution:
        """Solve `req` and return the `Solution` (``t``, ``u`` torch tensors).

        When autograd records and u0 or a tensor in p requires grad, ``sol.u`` is
        differentiable with respect to them by ``req.sensealg``; otherwise this is
        the plain solve, whatever the sensealg.

        Raises
        ------
        UnsupportedError
            The device asked for is not visible to torch.
        InvalidProblemError
            ``f(u0, p, t0)`` has the wrong shape, dtype, or is not finite.
        SolveError
            The integration failed and ``req.throw`` is True.
        """
        # ``stats["engine"]``: "compiled" where compiled code ran; the auto
        # policy accounts the solve's time (`_policy`).
        supported = _engine.supported(req) and not req.events
        watch = _policy.Watch(req, _engine.COUNTS, supported)
        try:
            sol = _dispatch(req)
        finally:
            engine = watch.stop()
        sol.stats["engine"] = engine
        return sol

    def solve_ensemble(
        self, req: SolveRequest, u0: Any, p: Any, size: int, **options: Any
    ) -> Solution:
        """`size` members in one batch, each with its own steps (`_ensemble`);
        ``devices=[...]`` splits the batch across them."""
        return _ensemble.solve_ensemble(
            req, u0, p, size, solve_one=self.solve, **options
        )

    def vjp_ensemble(
        self, req: SolveRequest, u0: Any, p: Any, size: int, **options: Any
    ) -> tuple[Solution, Pullback]:
        """`solve_ensemble` and its pullback (autograd through the steps)."""
        return _ensemble.vjp_ensemble(req, u0, p, size, solve_one=self.solve, **options)

    def vjp(self, req: SolveRequest) -> tuple[Solution, Pullback]:
        """Solve, and return the pullback by ``req.sensealg`` (`dk.vjp`).

        u0 and p's floating leaves become tensors that require grad (tensors keep
        their dtype and device, and so do their gradients; other values are
        converted as `solve` converts them); the pullback is
        ``torch.autograd.grad`` of ``sol.u`` with the cotangent, and may be
        called repeatedly. A leaf ``f`` does not use gets zeros; integer and
        None leaves get None. A failed solve (``throw=False``) has no
        derivative: its gradients are NaN, as on every backend.
        """
        dtype = state_dtype(req)
        device = solve_device(req)
        check_inputs(req, dtype, device)
        u0 = grad_input(req.u0, to_state, dtype, device)
        # A module stays itself: its parameters are the inputs, with their own
        # requires_grad (autograd.grad leaves their .grad alone).
        p = tree_map(
            lambda x: (
                x
                if x is None or isinstance(x, torch.nn.Module)
                else grad_input(x, to_param, dtype, device)
            ),
            req.p,
        )
        p_leaves = leaves(param_view(p))
        inputs = [x for x in (u0, *p_leaves) if x is not None and x.requires_grad]
        with torch.enable_grad():
            sol = self.solve(dataclasses.replace(req, u0=u0, p=p))
        u = sol.u

        def pull(cotangent: Any, events: Any = None) -> tuple[Any, Any]:
            ct = _cotangent(cotangent, u)
            if not sol.success:  # no derivative: NaN, as on every backend
                nan = {id(x): torch.full_like(x, torch.nan) for x in inputs}
                dp = [None if x is None else nan.get(id(x)) for x in p_leaves]
                return nan[id(u0)], replace_leaves(req.p, dp)
            # the outputs that carry a graph, with their cotangents
            kept = [(u, ct)] if u.requires_grad else []
            if events is not None:
                for found, given in zip(
                    (sol.t_events, sol.u_events), events, strict=True
                ):
                    kept += [
                        (x, _cotangent(c, x))
                        for x, c in zip(found, given, strict=True)
                        if x.requires_grad
                    ]
            # A failed solve under ContinuousAdjoint has no graph (see _adjoint).
            found = (
                torch.autograd.grad(
                    [x for x, _ in kept],
                    inputs,
                    [c for _, c in kept],
                    retain_graph=True,
                    allow_unused=True,
                )
                if kept
                else (None,) * len(inputs)
            )
            grads = {
                id(x): torch.zeros_like(x) if g is None else g
                for x, g in zip(inputs, found, strict=True)
            }
            dp = [None if x is None else grads.get(id(x)) for x in p_leaves]
            return grads[id(u0)], replace_leaves(param_view(req.p), dp)

        detached = dataclasses.replace(sol, u=u.detach())
        if sol.t_events is not None:
            detached = dataclasses.replace(
                detached,
                t_events=[x.detach() for x in sol.t_events],
                u_events=[x.detach() for x in sol.u_events],
            )
        return detached, pull

    def loss_grad(
        self, loss: Callable[[Solution], Any], sol: Solution, req: SolveRequest
    ) -> tuple[Any, Any, Any]:
        """``loss(sol)`` and its gradients with respect to ``sol.u`` and, with
        events, ``(sol.t_events, sol.u_events)``, by autograd."""
        del req
        u = sol.u.detach().requires_grad_()
        if sol.t_events is None:
            with torch.enable_grad():
                value = loss(dataclasses.replace(sol, u=u))
                (cotangent,) = torch.autograd.grad(value, u)
            return value.detach(), cotangent, None
        t_events = [x.detach().requires_grad_() for x in sol.t_events]
        u_events = [x.detach().requires_grad_() for x in sol.u_events]
        inputs = [u, *t_events, *u_events]
        with torch.enable_grad():
            value = loss(
                dataclasses.replace(sol, u=u, t_events=t_events, u_events=u_events)
            )
            found = torch.autograd.grad(value, inputs, allow_unused=True)
        grads = [
            torch.zeros_like(x) if g is None else g
            for x, g in zip(inputs, found, strict=True)
        ]
        n = len(t_events)
        return value.detach(), grads[0], (grads[1 : 1 + n], grads[1 + n :])

    def describe(self) -> dict[str, Any]:
        """Visible devices and torch's intra-op thread count."""
        return {"devices": visible_devices(), "threads": torch.get_num_threads()}


def _dispatch(req: SolveRequest) -> Solution:
    """`TorchBackend.solve` by the request's sensealg (and events)."""
    sensealg = req.sensealg
    grad = sensealg is not None and requires_grad(req) and not _empty(req.u0)
    if req.events:
        return _events.solve(
            req,
            SENSEALGS[type(sensealg)] if grad else None,
            through=grad and isinstance(sensealg, ReverseThroughSolver),
        )
    if not grad:
        # An empty state has nothing to differentiate: its solution is u0.
        return solve_plain(req)
    return SENSEALGS[type(sensealg)](req)


def _empty(u0: Any) -> bool:
    return (
        math.prod(np.shape(u0)) == 0
        if not isinstance(u0, torch.Tensor)
        else u0.numel() == 0
    )


def _cotangent(cotangent: Any, u: torch.Tensor) -> torch.Tensor:
    if isinstance(cotangent, torch.Tensor):
        return cotangent.to(dtype=u.dtype, device=u.device)
    return torch.as_tensor(np.asarray(cotangent), dtype=u.dtype, device=u.device)
