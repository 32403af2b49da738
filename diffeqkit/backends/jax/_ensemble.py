"""Ensembles on JAX: ``jax.vmap`` of the compiled solve, sharded over devices.

Every member runs the same compiled program as a single solve, vectorised by
``vmap``: each keeps its own time, step size, accepted and rejected steps and
status (diffrax's loop runs until the last member is done; finished members
stop changing). With events, each member runs its own loop of segments
(`_events`; the batched loop runs until the last member is done), its events
padded with NaN to ``max_events``. The batched program is cached like a single
one, by problem structure and which inputs are batched; ``jax.jit`` compiles it
once per batch size. With ``devices=[...]`` the members are sharded over a 1-D
mesh of them (`jax.sharding.NamedSharding`), padded to a multiple of the device
count by repeating the last member; the padding is cut off before anything is
returned.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..._errors import InvalidProblemError, invalid
from .._protocol import SolveRequest
from ._events import EventConfig
from ._events import program as events_program
from ._inputs import Params, _named_device, convert_leaves, host, split_p
from ._solve import Config, program

__all__ = [
    "Batch",
    "batch_inputs",
    "batched_events_program",
    "batched_program",
    "batched_vjp_program",
    "mesh_of",
]


@dataclass(frozen=True)
class Batch:
    """Which inputs carry the member axis: `u0` (0 or None) and each input leaf of
    p (0 or None, in `split_p` order). Part of the compiled program's key."""

    u0: int | None
    p: tuple[int | None, ...]

    @property
    def in_axes(self) -> tuple[Any, ...]:
        return (self.u0, list(self.p), None, None, None)


def batch_inputs(
    req: SolveRequest, u0: Any, p: Any, dtype: str, template: tuple[Any, Any, Params]
) -> tuple[Any, list[Any], Batch]:
    """The batched u0 and p's input leaves (JAX values as they are, others as
    NumPy in the solve's dtype) and their `Batch`; shared ones are the
    template's (`template` = the template's u0, input leaves and `Params`)."""
    tu0, tinputs, params = template
    if u0 is None:
        bu0, u_axis = tu0, None
    else:
        bu0, u_axis = (u0 if isinstance(u0, jax.Array) else host(u0, dtype)), 0
    if p is None:
        return bu0, list(tinputs), Batch(u_axis, (None,) * len(tinputs))
    inputs, batched = split_p(p)
    if batched != params:
        raise InvalidProblemError(
            "p of the ensemble must have the structure of prob.p, with arrays "
            "where prob.p has arrays (JAX sees another tree or other static leaves)."
        )
    return bu0, convert_leaves(inputs, dtype), Batch(u_axis, (0,) * len(inputs))


def batched_program(
    cfg: Config, batch: Batch, u0: Any, p: Any, scalars: Any, ts: Any, grid: Any
) -> Any:
    """`program` over the members: ``(ts, ys (B, m, ...), info (B, k))``."""
    solve = functools.partial(program, cfg)
    return jax.vmap(solve, in_axes=batch.in_axes, out_axes=(None, 0, 0))(
        u0, p, scalars, ts, grid
    )


def batched_events_program(
    cfg: Config, ev: EventConfig, batch: Batch, u0: Any, p: Any, scalars: Any, ts: Any
) -> Any:
    """`_events.program` over the members: ``(ts, ys (B, m, ...), t_events (B,
    n, max_events), u_events (B, n, max_events, ...), info (B, k), t_end (B,))``,
    each member with its own segments, its events padded with NaN."""
    solve = functools.partial(events_program, cfg, ev)
    return jax.vmap(
        solve, in_axes=(batch.u0, list(batch.p), None, None), out_axes=(None, *[0] * 5)
    )(u0, p, scalars, ts)


def batched_vjp_program(
    cfg: Config, batch: Batch, u0: Any, p: Any, scalars: Any, ts: Any, grid: Any
) -> tuple[Any, Any, Any]:
    """`batched_program` with its pullback, for `dk.vjp` of an ensemble: the
    gradient of a shared input is summed over the members (vmap's transpose)."""

    def solve(u0: Any, p: Any) -> tuple[Any, Any]:
        ts_out, ys, info = batched_program(cfg, batch, u0, p, scalars, ts, grid)
        return ys, (ts_out, info)

    return jax.vjp(solve, u0, p, has_aux=True)


# ---------------------------------------------------------------------------------
# Devices.
# ---------------------------------------------------------------------------------


def mesh_of(devices: Any) -> Mesh:
    """A 1-D mesh (axis ``"members"``) of `devices`: ``jax.Device``s or names
    such as ``"cpu:1"`` or ``"cuda:0"``."""
    fix = (
        "Pass a list of jax.Device (jax.devices()) or of names such as 'cuda:0', "
        "'cuda:1'."
    )
    if isinstance(devices, str | jax.Device) or not isinstance(devices, Sequence):
        raise invalid("devices", "must be a list of devices", devices, fix)
    if not devices:
        raise invalid("devices", "must name at least one device", devices, fix)
    found = []
    for d in devices:
        if isinstance(d, str):
            found.append(_named_device(d))
        elif isinstance(d, jax.Device):
            found.append(d)
        else:
            raise invalid("devices", "must hold jax.Device or names", devices, fix)
    if len(set(found)) != len(found):
        raise invalid("devices", "must not repeat a device", devices, fix)
    return Mesh(np.array(found), ("members",))


def padded(x: Any, size: int) -> Any:
    """`x` with its member axis grown to `size` by repeating its last row."""
    extra = size - x.shape[0]
    if extra == 0:
        return x
    xp = jnp if isinstance(x, jax.Array | Tracer) else np
    return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)], axis=0)


def shard(
    mesh: Mesh, batch: Batch, size: int, args: tuple[Any, ...]
) -> tuple[tuple[Any, ...], int]:
    """``(u0, inputs, scalars, ts, grid)`` padded to a multiple of the mesh's
    devices and placed: batched inputs split over the mesh, the rest replicated.
    Under a transformation the placement is a sharding constraint. Returns the
    padded size too."""
    n = mesh.devices.size
    total = -(-size // n) * n
    split = NamedSharding(mesh, PartitionSpec("members"))
    whole = NamedSharding(mesh, PartitionSpec())
    u0, inputs, scalars, ts, grid = args
    u0 = u0 if batch.u0 is None else padded(u0, total)
    inputs = [
        x if a is None else padded(x, total)
        for x, a in zip(inputs, batch.p, strict=True)
    ]
    shardings = (
        whole if batch.u0 is None else split,
        [whole if a is None else split for a in batch.p],
        whole,
        whole,
        None if grid is None else whole,
    )
    placed = (u0, inputs, scalars, ts, grid)
    if any(isinstance(x, Tracer) for x in jax.tree_util.tree_leaves(placed)):
        # Under a transformation: constrain the batched inputs only.
        constrain = jax.lax.with_sharding_constraint
        u0 = u0 if batch.u0 is None else constrain(u0, split)
        inputs = [
            x if a is None else constrain(x, split)
            for x, a in zip(inputs, batch.p, strict=True)
        ]
        return (u0, inputs, scalars, ts, grid), total
    out = tuple(
        x if x is None else jax.device_put(x, s)
        for x, s in zip(placed, shardings, strict=True)
    )
    return out, total


def trim(x: Any, size: int) -> Any:
    return x if x.shape[0] == size else x[:size]
