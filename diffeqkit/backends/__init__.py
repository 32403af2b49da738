"""The backend registry: the only place that knows the backend names.

Each backend is a `BackendSpec`: module path, pip extra, required import names, an
array test and a pytree test that import nothing, and its capabilities as data
(algs, devices, the sensealgs with their options, the default rule's crossover).
Loading is lazy and cached; "installed?" is `importlib.util.find_spec`, never an
import.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import array_api_compat as aac

from .._algs import ALGS, AlgInfo
from .._errors import (
    InvalidProblemError,
    UnsupportedError,
    backend_not_installed,
    ineffective_option,
    listing,
    short,
    unavailable_device,
    unsupported_alg,
    unsupported_kind,
    unsupported_sensealg,
)
from .._pytree import Param, param_paths, tree_paths
from .._sensealg import options_set
from . import _trees
from ._protocol import Backend, Capabilities, Kind, SensealgSupport

__all__ = [
    "SPECS",
    "BackendSpec",
    "check_alg",
    "check_device",
    "check_events",
    "check_native_p",
    "check_sensealg",
    "implicit_algs",
    "infer_backend",
    "installed",
    "load",
    "native_tree",
    "params",
    "resolve_name",
    "spec_of",
]

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
_EXPLICIT_KINDS: tuple[Kind, ...] = ("fixed", "adaptive")
_TOLS = ("rtol", "atol")
# JAX and torch: the discrete methods differentiate the solver's own steps; the
# adjoints integrate the adjoint ODE with the sensealg's tolerances.
_NATIVE_SENSEALGS = {
    "ForwardMode": SensealgSupport("discrete"),
    "ReverseThroughSolver": SensealgSupport("discrete"),
    "ContinuousAdjoint": SensealgSupport("continuous", _TOLS, _EXPLICIT_KINDS),
    "InterpolatingAdjoint": SensealgSupport("continuous", _TOLS),
    "CheckpointedAdjoint": SensealgSupport("discrete", ("checkpoints",)),
}


@dataclass(frozen=True)
class BackendSpec:
    """How to find, install and recognise one backend.

    `is_array` tells the framework's arrays; `tree`, given an object the core's
    dict / list / tuple walk does not know, returns its input leaves with their
    paths when the framework knows it as a pytree (None otherwise; see
    `_trees`). Neither imports the framework.
    """

    name: str
    module: str
    extra: str
    requires: tuple[str, ...]
    is_array: Callable[[object], bool] | None
    capabilities: Capabilities
    tree: Callable[[Any], list[tuple[str, Any]] | None] | None = None


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
            sensealgs=_NATIVE_SENSEALGS,
            autodiff=("jax",),
            # ForwardMode beat CheckpointedAdjoint up to 24 inputs, lost from 44.
            forward_mode_max_inputs=32,
            reference_algs=("dopri8", "kvaerno5"),
            reference_rank=1,
            # ForwardMode differentiates every event (a loop of segments); the
            # reverse ones solves whose events are all terminal (one segment).
            events=(
                "ForwardMode",
                "ReverseThroughSolver",
                "CheckpointedAdjoint",
                "InterpolatingAdjoint",
                "ContinuousAdjoint",
            ),
            ensemble=("devices",),
        ),
        tree=_trees.jax_tree,
    ),
    "torch": BackendSpec(
        "torch",
        "diffeqkit.backends.torch",
        "torch",
        ("torch", "torchdiffeq"),
        aac.is_torch_array,
        Capabilities(
            algs=(*_EXPLICIT, "rosenbrock23", "rodas4"),
            devices=("cpu", "cuda"),
            sensealgs=_NATIVE_SENSEALGS,
            autodiff=("torch",),
            # ForwardMode lost to the reverse methods at every size measured.
            forward_mode_max_inputs=0,
            reference_algs=("dopri8", "rodas4"),
            reference_rank=2,
            # Segment solves by the sensealg, glued by the event corrections.
            events=(
                "ReverseThroughSolver",
                "ForwardMode",
                "ContinuousAdjoint",
                "InterpolatingAdjoint",
                "CheckpointedAdjoint",
            ),
            # One batch with per-member steps; devices split it (one chunk each).
            ensemble=("devices",),
        ),
        tree=_trees.torch_module,
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
            # Sensitivity and adjoint ODEs under error control; SciPy's solvers are
            # not differentiable, so there is no ReverseThroughSolver.
            sensealgs={
                "ForwardMode": SensealgSupport("continuous"),
                "ContinuousAdjoint": SensealgSupport(
                    "continuous", _TOLS, _EXPLICIT_KINDS
                ),
                "InterpolatingAdjoint": SensealgSupport("continuous", _TOLS),
                "CheckpointedAdjoint": SensealgSupport(
                    "continuous", ("checkpoints", *_TOLS)
                ),
            },
            autodiff=("jax", "torch", "jac"),
            # Forward sensitivities beat the adjoints up to 324 inputs measured.
            forward_mode_max_inputs=256,
            # Its forward sensitivities are themselves error-controlled: the
            # reference of choice.
            reference_algs=("dopri8", "radau"),
            reference_rank=0,
            # Forward sensitivities jump at each event; the adjoints are composed
            # over the segments between events (docs/design.md, "Events").
            events=(
                "ForwardMode",
                "ContinuousAdjoint",
                "InterpolatingAdjoint",
                "CheckpointedAdjoint",
            ),
            ensemble=("executor",),
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
    """torch tensors -> torch, JAX arrays -> jax, anything else -> scipy; a
    framework's own pytree in p (an equinox.Module, ...) -> that framework."""
    found = {kind for x in [Param("u0", u0), *params(p)] if (kind := framework(x))}
    if len(found) > 1:
        raise InvalidProblemError(
            f"u0 and p mix arrays of {listing(sorted(found))}; backend=None cannot "
            "tell which to use. Convert them to one framework, or pass backend=..."
        )
    return found.pop() if found else DEFAULT


def native_tree(obj: Any) -> tuple[str, list[tuple[str, Any]]] | None:
    """``(backend, input leaves with paths)`` when an imported framework knows
    `obj` as a pytree; None otherwise."""
    for spec in SPECS.values():
        if spec.tree is not None:
            pairs = spec.tree(obj)
            if pairs is not None:
                return spec.name, pairs
    return None


def params(p: Any) -> list[Param]:
    """p's leaves with paths, through framework pytrees (`param_paths`)."""
    return param_paths(p, native_tree)


def framework(param: Param) -> str | None:
    """The backend whose framework a leaf belongs to: its array type's, else the
    owner of the pytree holding it; None for NumPy and Python values."""
    for spec in SPECS.values():
        if spec.is_array is not None and spec.is_array(param.leaf):
            return spec.name
    return param.owner


def check_native_p(name: str, p: Any) -> None:
    """Refuse a framework's own pytree in p on a backend of another framework."""
    for param in params(p):
        if param.owner is not None and param.owner != name:
            raise UnsupportedError(
                f"{param.node} is a {_type_of(p, param)} ({param.owner}), "
                f"which backend='{name}' cannot hand to f: it takes p as None, an "
                "array, or a dict / list / tuple of arrays. Pass "
                f"backend='{param.owner}' (or backend=None), or give p as a dict of "
                "arrays."
            )


def _type_of(p: Any, param: Param) -> str:
    cls = type(dict(tree_paths(p)).get(param.node or "p"))
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


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


def spec_of(name: str) -> BackendSpec:
    """The spec of a backend name or alias."""
    return SPECS[ALIASES.get(name, name)]


def check_events(name: str, sensealg: Any) -> None:
    """Refuse ``events=[...]`` on a backend that does not offer events, or with a
    sensealg that cannot differentiate them there; the message names what can."""
    caps = SPECS[name].capabilities
    if not caps.events:
        by = [b for b, s in SPECS.items() if s.capabilities.events]
        raise UnsupportedError(
            f"events=[...] are not available on backend='{name}'. "
            + (
                f"Backends with events: {listing(by)}."
                if by
                else "No backend offers them yet."
            )
        )
    if sensealg.name not in caps.events:
        raise UnsupportedError(
            f"sensealg=dk.{type(sensealg).__name__}() cannot differentiate a solve "
            f"with events on backend='{name}'. With events, {name} offers: "
            f"{listing(f'dk.{s}()' for s in caps.events)}."
        )


def check_sensealg(
    name: str, sensealg: Any, alg: AlgInfo | None = None, fixed_step: bool = False
) -> None:
    """Refuse a sensealg the backend does not run, one with an option that has no
    effect there (the backward tolerances with constant steps, `fixed_step`), or
    one that cannot run `alg`'s kind; each message names what works instead."""
    caps = SPECS[name].capabilities
    offered = caps.sensealgs
    if sensealg.name not in offered:
        by = [b for b, s in SPECS.items() if sensealg.name in s.capabilities.sensealgs]
        raise unsupported_sensealg(sensealg.name, name, offered, by)
    support = offered[sensealg.name]
    for option, value in options_set(sensealg).items():
        if option == "autodiff":
            if value not in caps.autodiff:
                by = [b for b, s in SPECS.items() if value in s.capabilities.autodiff]
                raise ineffective_option(sensealg, option, value, name, by)
        elif option not in support.options:
            by = [
                b
                for b, s in SPECS.items()
                if option
                in getattr(s.capabilities.sensealgs.get(sensealg.name), "options", ())
            ]
            raise ineffective_option(sensealg, option, value, name, by)
        elif fixed_step and option in _TOLS:
            raise InvalidProblemError(
                f"sensealg=dk.{type(sensealg).__name__}({option}={value!r}) has no "
                "effect with constant steps (a fixed-step alg, or adaptive=False): "
                f"the backward solve steps on the forward grid. Leave {option}=None."
            )
    if alg is not None and alg.kind not in support.kinds:
        others = [s for s, sup in offered.items() if alg.kind in sup.kinds]
        raise unsupported_kind(
            sensealg,
            alg.name,
            alg.kind,
            name,
            sensealg.kind_notes.get(alg.kind),
            others,
        )


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
