"""Which torch engine a solve runs on: the named option and the ``"auto"`` policy.

Three engines names, one choice per solve (`chosen`):

- ``"eager"``: the reference drivers of `_rk` (and the other drivers), one
  Python-level step at a time;
- ``"compiled"``: the compiled engine (`_engine`) wherever it has the alg;
- ``"auto"`` (the default): ski rental per problem structure (the key of
  `structure`: ``f``, the alg, the direction, the modules in ``p``). Solves of a
  structure run eagerly until the eager seconds spent on it in this process reach
  the expected compile time (the mean compile seconds of the solves that compiled
  so far in this process, else `PRIOR_COMPILE_S`); from then on it is compiled.
  A single solve never pays a compile, and a long run of solves pays at most about
  twice the better of the two choices in hindsight. Only the forward solve's time
  counts (a backward pass runs later, outside `dk.solve`).

The option is read, first found: `engine` (a context manager, per thread and
task), `set_engine` (the process), the environment variable `ENV`, ``"auto"``.
``diffeqkit.torch.set_engine`` and ``diffeqkit.torch.engine`` are the public
names. A solve's choice is kept for its request: its backward pass replays on
the engine its forward pass ran on.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..._errors import invalid
from ..._pytree import leaves
from .._protocol import SolveRequest

__all__ = [
    "ENV",
    "MODES",
    "PRIOR_COMPILE_S",
    "Watch",
    "chosen",
    "current",
    "engine",
    "set_engine",
]

# The environment variable naming the engine.
ENV = "DIFFEQKIT_TORCH_ENGINE"
MODES = ("auto", "eager", "compiled")
# The expected compile seconds of a structure before any has been measured: a
# small problem takes 5-70 s on two loaded CPU cores, a few on a free machine.
PRIOR_COMPILE_S = 10.0
# Structures whose eager seconds are remembered (least recently used dropped).
_MAX_STRUCTURES = 512

_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "diffeqkit_torch_engine", default=None
)
_process: list[str | None] = [None]


def _checked(mode: Any, argument: str) -> str:
    if isinstance(mode, str) and mode.strip().lower() in MODES:
        return mode.strip().lower()
    raise invalid(
        argument,
        "must be one of " + ", ".join(repr(m) for m in MODES),
        mode,
        "'auto' compiles a problem once its eager solves have taken as long as a "
        "compile; 'eager' never compiles; 'compiled' always does.",
    )


def set_engine(mode: str | None) -> None:
    """Select the engine for this process (None: back to `ENV`, else "auto")."""
    _process[0] = None if mode is None else _checked(mode, "mode")


@contextlib.contextmanager
def engine(mode: str) -> Iterator[None]:
    """Select the engine inside the ``with`` block (this thread or task only)."""
    token = _scoped.set(_checked(mode, "mode"))
    try:
        yield
    finally:
        _scoped.reset(token)


def current() -> str:
    """The engine option in effect here: "auto", "eager" or "compiled"."""
    mode = _scoped.get() or _process[0]
    if mode is not None:
        return mode
    value = os.environ.get(ENV)
    if value is None or not value.strip():
        return "auto"
    if value.strip().lower() not in MODES:
        raise ValueError(
            f"{ENV} must be " + ", ".join(repr(m) for m in MODES) + f", not {value!r}"
        )
    return value.strip().lower()


# ---------------------------------------------------------------------------------
# The auto policy's bookkeeping.
# ---------------------------------------------------------------------------------


@dataclass
class _Auto:
    """Eager seconds per structure and the compile seconds measured so far."""

    spent: OrderedDict[tuple[Any, ...], tuple[float, tuple[Any, ...]]] = field(
        default_factory=OrderedDict
    )
    compiles: list[float] = field(default_factory=list)
    # A fixed expected compile time in seconds (tests), instead of the estimate.
    threshold_s: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expected_compile_s(self) -> float:
        if self.threshold_s is not None:
            return self.threshold_s
        if self.compiles:
            return sum(self.compiles) / len(self.compiles)
        return PRIOR_COMPILE_S

    def ready(self, key: tuple[Any, ...]) -> bool:
        """Whether the structure has spent its expected compile time eagerly."""
        with self.lock:
            found = self.spent.get(key)
        spent = 0.0 if found is None else found[0]
        return spent > 0.0 and spent >= self.expected_compile_s()

    def add(self, key: tuple[Any, ...], refs: tuple[Any, ...], seconds: float) -> None:
        with self.lock:
            found = self.spent.pop(key, None)
            self.spent[key] = ((0.0 if found is None else found[0]) + seconds, refs)
            while len(self.spent) > _MAX_STRUCTURES:
                self.spent.popitem(last=False)

    def reset(self) -> None:
        with self.lock:
            self.spent.clear()
            self.compiles.clear()


AUTO = _Auto()


def identity(f: Any) -> tuple[Any, ...]:
    """`f` as objects to compare by identity: a bound method is its function and
    its object (each attribute access makes a new bound method)."""
    func, owner = getattr(f, "__func__", None), getattr(f, "__self__", None)
    if func is not None and owner is not None:
        return (func, owner)
    return (f,)


def structure(req: SolveRequest) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The problem structure of `req` as a key, and the objects it names by
    identity (kept alive while the key is remembered, so that no identity is
    reused). The state's shape, dtype and device are part of it: compiled code
    is specialised to them (a new batch size compiles anew, so it pays its own
    rent)."""
    import torch

    modules = tuple(x for x in leaves(req.p) if isinstance(x, torch.nn.Module))
    refs = (*identity(req.f), *modules)
    backward = bool(req.t1 < req.t0)
    u0 = req.u0
    state = (
        tuple(np.shape(u0)),
        str(getattr(u0, "dtype", req.dtype)),
        str(getattr(u0, "device", req.device)),
    )
    return (req.alg.name, backward, *state, *map(id, refs)), refs


# A solve's choice, kept per request object (its backward pass asks again).
_CHOSEN: dict[int, bool] = {}


def chosen(req: SolveRequest) -> bool:
    """Whether `req` is to run on the compiled engine (the same answer every time
    it is asked about the same request)."""
    found = _CHOSEN.get(id(req))
    if found is not None:
        return found
    mode = current()
    choice = mode == "compiled" or (mode == "auto" and AUTO.ready(structure(req)[0]))
    key = id(req)
    try:
        weakref.finalize(req, _CHOSEN.pop, key, None)
    except TypeError:  # not weakly referable: not remembered
        return choice
    _CHOSEN[key] = choice
    return choice


class Watch:
    """Times one solve of `req` for the auto policy and says which engine ran.

    `counts` is the engine's running totals ``{"calls": compiled calls,
    "compile_s": seconds compiling}``; `supported` whether the engine has the
    solve's alg at all. Every solve that compiled adds its compile seconds to
    the estimate; only eager solves under "auto" add to a structure's account.
    """

    def __init__(self, req: SolveRequest, counts: dict[str, float], supported: bool):
        self.req = req
        self.counts = counts
        self.auto = supported and current() == "auto"
        self.calls = counts["calls"]
        self.compile_s = counts["compile_s"]
        self.start = time.perf_counter()
        self.engine = "eager"

    def stop(self) -> str:
        """Account the solve; returns "compiled" if it ran compiled code."""
        elapsed = time.perf_counter() - self.start
        compiled = self.counts["calls"] > self.calls
        self.engine = "compiled" if compiled else "eager"
        compile_s = self.counts["compile_s"] - self.compile_s
        if compile_s > 0.0:
            with AUTO.lock:
                AUTO.compiles.append(compile_s)
        if self.auto and not compiled:
            key, refs = structure(self.req)
            AUTO.add(key, refs, elapsed)
        return self.engine
