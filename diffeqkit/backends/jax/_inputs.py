"""Inputs of a JAX solve: the state dtype, the device, and host values as arrays.

The state dtype follows the inputs (lists get JAX's default float); float64 without
JAX's x64 mode is refused, and the flag is never changed here. The device is the
one asked for, else that of the JAX inputs, else JAX's default.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from ..._arrays import to_numpy
from ..._errors import UnsupportedError, listing, unavailable_device
from ..._saveat import step_grid
from .._protocol import SolveRequest

__all__ = [
    "concrete_times",
    "convert_leaves",
    "host",
    "is_traced",
    "placement",
    "signature",
    "state_dtype",
    "traced_inputs",
    "visible_devices",
    "x64",
]


def x64() -> bool:
    return bool(jax.config.jax_enable_x64)  # pyright: ignore[reportAttributeAccessIssue]


def state_dtype(req: SolveRequest) -> str:
    """The solve's dtype; float64 without JAX's x64 mode raises."""
    on = x64()
    dtype = req.state_dtype(default="float64" if on else "float32")
    if dtype == "float64" and not on:
        why = (
            "dtype='float64' was asked for"
            if req.dtype is not None
            else "u0 is a float64 array"
        )
        raise UnsupportedError(
            f"{why}, but JAX's 64-bit mode is off (jax_enable_x64=False), so JAX "
            "would silently compute in float32. Enable it once at the start of your "
            'program with jax.config.update("jax_enable_x64", True), or pass '
            "dtype='float32'."
        )
    return dtype


def is_traced(req: SolveRequest) -> bool:
    """Whether any input of the request is a JAX tracer (a transformation runs)."""
    leaves = jax.tree_util.tree_leaves(req.p)
    values = (req.u0, *leaves, req.t0, req.t1, req.saveat, req.rtol, req.atol)
    return any(isinstance(x, Tracer) for x in values)


def visible_devices() -> list[str]:
    names = []
    for platform in dict.fromkeys(d.platform for d in jax.devices()):
        kind = "cuda" if platform == "gpu" else platform
        names += [f"{kind}:{i}" for i, _ in enumerate(jax.devices(platform))]
    return names


@functools.cache
def _named_device(name: str) -> Any:
    kind, _, index = name.partition(":")
    platform = "gpu" if kind == "cuda" else kind
    try:
        devices = jax.devices(platform)
    except RuntimeError:  # no backend of that platform
        devices = []
    i = int(index or 0)
    if i >= len(devices):
        raise unavailable_device(
            name,
            "jax",
            f"JAX sees: {listing(visible_devices())}",
            "Pass one of those, or device=None to run where the inputs live (a GPU "
            'needs the CUDA build of jax: pip install "jax[cuda12]").',
        )
    return devices[i]


def _default_device() -> Any:
    configured = jax.config.jax_default_device  # pyright: ignore[reportAttributeAccessIssue]
    if isinstance(configured, jax.Device):
        return configured
    if isinstance(configured, str):
        return jax.devices(configured)[0]
    return jax.devices()[0]


def placement(req: SolveRequest, leaves: list[Any]) -> tuple[Any, bool]:
    """The device asked for, else that of the JAX inputs, else JAX's default; and
    whether the inputs must be put there. When it is the default device and the
    JAX inputs live there, the compiled call itself moves the host data, an order
    of magnitude faster than `jax.device_put`."""
    arrays = [x for x in (req.u0, *leaves) if isinstance(x, jax.Array)]
    if req.device is not None:
        device = _named_device(req.device)
    elif arrays:
        device = next(iter(arrays[0].devices()))
    else:
        device = _default_device()
    here = all(x.devices() == {device} for x in arrays)
    return device, not (here and device == _default_device())


def host(x: Any, dtype: str | None) -> Any:
    """A non-JAX value as a NumPy array: floating in `dtype`, integers in JAX's
    integer width (int32 unless x64 is on)."""
    arr = np.asarray(to_numpy(x))
    if arr.dtype.kind == "f" and dtype is not None:
        return arr.astype(dtype, copy=False)
    if arr.dtype.kind in "iub":
        return arr.astype(jax.dtypes.canonicalize_dtype(arr.dtype), copy=False)
    return arr


def convert_leaves(leaves: list[Any], dtype: str) -> list[Any]:
    """p's leaves: JAX arrays as they are (gradients flow), others to NumPy (see
    `host`)."""
    return [x if isinstance(x, jax.Array) else host(x, dtype) for x in leaves]


def signature(x: Any) -> tuple[tuple[int, ...], Any]:
    return tuple(x.shape), x.dtype


def concrete_times(req: SolveRequest) -> tuple[float, float, np.ndarray]:
    """t0, t1 and the save times (already checked by the core) as host values."""
    return float(req.t0), float(req.t1), np.asarray(req.saveat, dtype=np.float64)


def traced_inputs(req: SolveRequest, dtype: str) -> tuple[Any, Any, Any, Any, Any]:
    """``(u0, p, scalars, ts, grid)`` for a program run under a transformation or
    by `dk.vjp`: JAX values as they are, others as NumPy arrays (so p's
    Python-number leaves are differentiable 0-d arrays)."""
    grid = None
    if req.fixed_step:
        if (
            req.saveat is None
            or req.dt0 is None
            or any(isinstance(x, Tracer) for x in (req.t0, req.t1, req.saveat))
        ):
            raise UnsupportedError(
                f"alg='{req.alg.name}' with fixed steps needs tspan and saveat as "
                "concrete values under a JAX transformation: its step grid "
                "(t0 + k*dt0 merged with the save times) decides the shape of "
                "the computation. Close over tspan and saveat instead of passing "
                "them as traced arguments, or use an adaptive alg such as 'tsit5'."
            )
        t0, t1, saveat = concrete_times(req)
        grid = np.asarray(step_grid(t0, t1, req.dt0, saveat), dtype=dtype)
    u0 = req.u0 if isinstance(req.u0, jax.Array) else host(req.u0, dtype)
    leaves, treedef = jax.tree_util.tree_flatten(req.p)
    p = treedef.unflatten(convert_leaves(leaves, dtype))
    if req.saveat is None:  # traced tspan, default saveat: [t0, t1]
        ts = jnp.stack([jnp.asarray(req.t0, dtype), jnp.asarray(req.t1, dtype)])
    elif isinstance(req.saveat, jax.Array):
        ts = req.saveat
    else:
        ts = np.asarray(req.saveat, dtype=dtype)
    dt0 = 0.0 if req.dt0 is None else req.dt0
    scalars = (req.t0, req.t1, req.rtol, req.atol, dt0)
    return u0, p, scalars, ts, grid
