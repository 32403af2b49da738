"""Inputs of a JAX solve: the state dtype, the device, host values as arrays, and
p split into its inputs and its static part.

The state dtype follows the inputs (lists get JAX's default float); float64 without
JAX's x64 mode is refused, and the flag is never changed here. The device is the
one asked for, else that of the JAX inputs, else JAX's default. `p` may be any
registered pytree (an ``equinox.Module`` with activation functions among its
leaves): its arrays and numbers are the traced inputs of the compiled program, a
flat list; its structure and other leaves (`Params`) are part of the program's
key, so new parameter values never recompile, as under ``eqx.filter_jit``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from ..._arrays import to_numpy
from ..._errors import (
    InvalidProblemError,
    UnsupportedError,
    listing,
    short,
    unavailable_device,
)
from ..._saveat import step_grid
from .._protocol import SolveRequest
from .._trees import is_input

__all__ = [
    "Params",
    "concrete_times",
    "convert_leaves",
    "host",
    "is_traced",
    "placement",
    "signature",
    "split_p",
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


@dataclass(frozen=True)
class Params:
    """What of `p` shapes the compiled program: its tree structure, which leaves
    are inputs (arrays and numbers) and the other, static leaves (functions,
    flags, strings), compared by value (functions by identity)."""

    treedef: Any
    is_input: tuple[bool, ...]
    static: tuple[Any, ...]

    def merge(self, inputs: Sequence[Any]) -> Any:
        """p rebuilt from its inputs and the static leaves."""
        values, static = iter(inputs), iter(self.static)
        return self.treedef.unflatten(
            [next(values) if k else next(static) for k in self.is_input]
        )

    def grads(self, grads: Sequence[Any]) -> Any:
        """The inputs' gradients in p's structure, None for static leaves (as
        ``eqx.filter_grad`` gives)."""
        values = iter(grads)
        return self.treedef.unflatten(
            [next(values) if k else None for k in self.is_input]
        )

    def bind(self, f: Callable[..., Any]) -> Callable[..., Any]:
        """``f(u, p, t)`` as a function of p's inputs, ``(u, inputs, t)``."""

        def rhs(u: Any, inputs: Any, t: Any) -> Any:
            return f(u, self.merge(inputs), t)

        return rhs


def split_p(p: Any) -> tuple[list[Any], Params]:
    """p's inputs, a list (JAX values as they are), and its `Params`."""
    leaves, treedef = jax.tree_util.tree_flatten(p)
    mask = tuple(is_input(x) for x in leaves)
    static = tuple(x for x, k in zip(leaves, mask, strict=True) if not k)
    params = Params(treedef, mask, static)
    try:
        hash(params)
    except TypeError:
        raise _unhashable(p) from None
    return [x for x, k in zip(leaves, mask, strict=True) if k], params


def _unhashable(p: Any) -> InvalidProblemError:
    for path, x in jax.tree_util.tree_flatten_with_path(p)[0]:
        if is_input(x):
            continue
        try:
            hash(x)
        except TypeError:
            return InvalidProblemError(
                f"p{jax.tree_util.keystr(path)} is a static (non-array) leaf of p "
                f"that cannot be hashed: {short(x)}. On JAX, p's leaves that are "
                "not arrays or numbers are part of the compiled program's key, as "
                "under eqx.filter_jit. Make it hashable, mark the field static, or "
                "hold it outside p (in a closure over f)."
            )
    return InvalidProblemError(
        "p's structure cannot be hashed (a pytree node with unhashable auxiliary "
        "data). Make its static fields hashable."
    )


def signature(x: Any) -> tuple[tuple[int, ...], Any]:
    return tuple(x.shape), x.dtype


def concrete_times(req: SolveRequest) -> tuple[float, float, np.ndarray]:
    """t0, t1 and the save times (already checked by the core) as host values."""
    return float(req.t0), float(req.t1), np.asarray(req.saveat, dtype=np.float64)


def traced_inputs(
    req: SolveRequest, dtype: str
) -> tuple[tuple[Any, Any, Any, Any, Any], Params]:
    """``(u0, inputs, scalars, ts, grid)`` for a program run under a transformation
    or by `dk.vjp`, and p's `Params`: JAX values as they are, others as NumPy
    arrays (so p's Python-number leaves are differentiable 0-d arrays)."""
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
    inputs, params = split_p(req.p)
    inputs = convert_leaves(inputs, dtype)
    if req.saveat is None:  # traced tspan, default saveat: [t0, t1]
        ts = jnp.stack([jnp.asarray(req.t0, dtype), jnp.asarray(req.t1, dtype)])
    elif isinstance(req.saveat, jax.Array):
        ts = req.saveat
    else:
        ts = np.asarray(req.saveat, dtype=dtype)
    dt0 = 0.0 if req.dt0 is None else req.dt0
    values = (req.t0, req.t1, req.rtol, req.atol, dt0)
    # One array, as the eager path passes them: five separate Python floats
    # reach XLA as separate constants, and a solve with events then ran 1.5x
    # the plain one on XLA's CPU scheduler (1.05x with one array).
    if any(isinstance(x, jax.Array) for x in values):
        scalars: Any = jnp.stack([jnp.asarray(x, dtype) for x in values])
    else:
        scalars = np.array(values, dtype=dtype)
    return (u0, inputs, scalars, ts, grid), params
