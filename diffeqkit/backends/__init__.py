"""The backend registry: the only place that knows the backend names.

Requirements met here:

- Each backend is a spec: module path, pip extra, required import names, an array
  test that imports nothing, and its capabilities as data.
- "Installed?" is `importlib.util.find_spec`, never an import; loading is lazy and
  cached. An `ImportError` becomes `BackendNotInstalledError` only when the missing
  module is one of the backend's requirements; any other failure is a bug and
  propagates.
- ``backend=None`` walks the leaves of `u0` and `p` with the array tests.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import array_api_compat as aac

from .._algs import ALGS
from .._errors import (
    InvalidProblemError,
    backend_not_installed,
    listing,
    short,
    unavailable_device,
    unsupported_alg,
    unsupported_sensealg,
)
from .._pytree import leaves
from ._protocol import Backend, Capabilities

__all__ = [
    "SPECS",
    "BackendSpec",
    "check_alg",
    "check_device",
    "check_sensealg",
    "implicit_algs",
    "infer_backend",
    "installed",
    "load",
    "resolve_name",
]

_ALL_SENSEALGS = (
    "ForwardMode",
    "ReverseThroughSolver",
    "ContinuousAdjoint",
    "CheckpointedAdjoint",
)
_EXPLICIT = ("euler", "midpoint", "heun", "rk4", "bosh3", "dopri5", "tsit5", "dopri8")
# The first two are those the "looks stiff" hint suggests.
_DIFFRAX_IMPLICIT = (
    "kvaerno5",
    "kencarp4",
    "kvaerno3",
    "kvaerno4",
    "kencarp3",
    "kencarp5",
    "implicit_euler",
)


@dataclass(frozen=True)
class BackendSpec:
    """How to find, install and recognise one backend."""

    name: str
    module: str
    extra: str
    requires: tuple[str, ...]
    is_array: Callable[[object], bool] | None
    capabilities: Capabilities


SPECS: Mapping[str, BackendSpec] = {
    "jax": BackendSpec(
        "jax",
        "diffeqkit.backends.jax",
        "jax",
        ("jax", "diffrax"),
        aac.is_jax_array,
        Capabilities(
            algs=(*_EXPLICIT, *_DIFFRAX_IMPLICIT),
            devices=("cpu", "cuda"),
            sensealgs=_ALL_SENSEALGS,
        ),
    ),
    "torch": BackendSpec(
        "torch",
        "diffeqkit.backends.torch",
        "torch",
        ("torch", "torchdiffeq"),
        aac.is_torch_array,
        Capabilities(
            algs=(*_EXPLICIT, "rosenbrock23"),
            devices=("cpu", "cuda"),
            sensealgs=_ALL_SENSEALGS,
        ),
    ),
    "scipy": BackendSpec(
        "scipy",
        "diffeqkit.backends.scipy",
        "scipy",
        ("scipy",),
        None,
        Capabilities(
            algs=(*_EXPLICIT, "bdf", "radau", "lsoda"),
            devices=("cpu",),
            # Its solvers are not differentiable: no ReverseThroughSolver.
            sensealgs=("ForwardMode", "ContinuousAdjoint", "CheckpointedAdjoint"),
        ),
    ),
}
ALIASES: Mapping[str, str] = {"numpy": "scipy"}
# backend=None: arrays of none of the typed backends go to this one.
DEFAULT = "scipy"

_loaded: dict[str, Backend] = {}


def resolve_name(backend: object, u0: Any, p: Any) -> str:
    """The backend to use: the one named, or the one the arrays imply."""
    if backend is None:
        return infer_backend(u0, p)
    if isinstance(backend, str):
        name = ALIASES.get(backend, backend)
        if name in SPECS:
            return name
    raise InvalidProblemError(
        f"backend must be one of {listing([*SPECS, *ALIASES])} or None; got "
        f"backend={short(backend)}. Pass e.g. backend='scipy', or None to infer it "
        "from the arrays in u0 and p."
    )


def infer_backend(u0: Any, p: Any) -> str:
    """torch tensors -> torch, JAX arrays -> jax, anything else -> scipy."""
    found = {
        spec.name
        for leaf in [u0, *leaves(p)]
        for spec in SPECS.values()
        if spec.is_array is not None and spec.is_array(leaf)
    }
    if len(found) > 1:
        raise InvalidProblemError(
            f"u0 and p mix arrays of {listing(sorted(found))}; backend=None cannot "
            "tell which to use. Convert them to one framework, or pass backend=..."
        )
    return found.pop() if found else DEFAULT


def installed(name: str) -> bool:
    return all(
        importlib.util.find_spec(req) is not None for req in SPECS[name].requires
    )


def load(name: str) -> Backend:
    """Import a backend module on first use; cached."""
    if name in _loaded:
        return _loaded[name]
    spec = SPECS[name]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as err:
        top = (err.name or "").split(".")[0]
        if top not in spec.requires:
            raise
        missing = [r for r in spec.requires if importlib.util.find_spec(r) is None]
        raise backend_not_installed(name, missing or [top], spec.extra) from err
    _loaded[name] = module.BACKEND
    return module.BACKEND


def check_alg(name: str, alg: str) -> None:
    offered = SPECS[name].capabilities.algs
    if alg not in offered:
        by = [b for b, s in SPECS.items() if alg in s.capabilities.algs]
        raise unsupported_alg(alg, name, offered, by)


def check_sensealg(name: str, sensealg: Any) -> None:
    offered = SPECS[name].capabilities.sensealgs
    if sensealg.name not in offered:
        by = [b for b, s in SPECS.items() if sensealg.name in s.capabilities.sensealgs]
        raise unsupported_sensealg(sensealg.name, name, offered, by)


def check_device(name: str, device: str | None) -> None:
    if device is None:
        return
    kind = device.split(":")[0]
    devices = SPECS[name].capabilities.devices
    if kind not in devices:
        raise unavailable_device(
            device,
            name,
            f"it runs on: {listing(devices)}",
            "Use backend='jax' or backend='torch' for a GPU.",
        )


def implicit_algs(name: str) -> list[str]:
    return [a for a in SPECS[name].capabilities.algs if ALGS[a].implicit]
