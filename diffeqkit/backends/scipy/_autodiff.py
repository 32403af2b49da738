"""What differentiates ``f`` for the SciPy backend's gradients and Newton
Jacobians: the JAX, PyTorch and ``prob.jac`` engines, and p's flat layout
(docs/design.md, "SciPy").
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..._arrays import to_numpy
from ..._cache import LRUCache as _Cache
from ..._errors import InvalidProblemError, UnsupportedError
from ..._pytree import tree_map
from ..._solution import Solution

if TYPE_CHECKING:  # _solve imports this module: no import cycle at runtime
    from .._protocol import SolveRequest
    from ._solve import Problem

__all__ = [
    "FINITE_DIFFERENCES",
    "Engine",
    "Job",
    "Layout",
    "Pull",
    "engine_label",
    "engine_name",
    "finite_difference_jacobians",
    "finite_differences_forced",
    "jac_adapter",
    "make_engine",
    "newton_jacobian_of_f",
    "value_and_grad",
]

# ---------------------------------------------------------------------------------
# p as one float64 vector.
# ---------------------------------------------------------------------------------


def _signature(tree: Any) -> Hashable:
    """A hashable description of p's structure: containers, leaf kinds and
    shapes, and the values of integer leaves."""
    if isinstance(tree, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in tree.items()))
    if isinstance(tree, list):
        return ("list", tuple(_signature(v) for v in tree))
    if isinstance(tree, tuple):
        return (type(tree), tuple(_signature(v) for v in tree))
    if tree is None:
        return None
    if tree.dtype.kind == "f":
        return ("float", tree.shape)
    return ("int", tree.shape, tree.dtype.str, tree.tobytes())


@dataclass(frozen=True, eq=False)
class Layout:
    """Where each leaf of p lives in the flat parameter vector.

    `template` is p (NumPy leaves, as `Problem.p`); `offsets[i]` is ``(start,
    shape)`` of the i-th leaf (in p's order) for floating leaves, None otherwise.
    """

    template: Any
    leaves: tuple[Any, ...]
    offsets: tuple[tuple[int, tuple[int, ...]] | None, ...]
    size: int
    signature: Hashable

    @classmethod
    def of(cls, p: Any) -> Layout:
        found: list[Any] = []
        tree_map(found.append, p)
        offsets: list[tuple[int, tuple[int, ...]] | None] = []
        size = 0
        for leaf in found:
            if leaf is not None and leaf.dtype.kind == "f":
                offsets.append((size, leaf.shape))
                size += leaf.size
            else:
                offsets.append(None)
        return cls(p, tuple(found), tuple(offsets), size, _signature(p))

    def values(self) -> Any:
        """p's floating leaves as one float64 vector."""
        parts = [
            leaf.reshape(-1)
            for leaf, off in zip(self.leaves, self.offsets, strict=True)
            if off is not None
        ]
        return np.concatenate(parts) if parts else np.zeros(0)

    def unflatten(self, vec: Any, constant: Callable[[Any], Any]) -> Any:
        """p rebuilt around `vec` (any framework's vector): floating leaves are
        reshaped slices, other leaves ``constant(leaf)``, None stays None."""
        new = []
        for leaf, off in zip(self.leaves, self.offsets, strict=True):
            if off is None:
                new.append(None if leaf is None else constant(leaf))
            else:
                start, shape = off
                new.append(vec[start : start + math.prod(shape)].reshape(shape))
        it = iter(new)
        return tree_map(lambda _: next(it), self.template)

    def gradient(self, g: Any) -> Any:
        """The gradient vector `g` (NumPy) in p's structure."""
        new = []
        for leaf, off in zip(self.leaves, self.offsets, strict=True):
            if leaf is None:
                new.append(None)
            elif off is None:
                new.append(np.zeros(leaf.shape))  # integers: no gradient
            else:
                start, shape = off
                new.append(np.array(g[start : start + math.prod(shape)]).reshape(shape))
        it = iter(new)
        return tree_map(lambda _: next(it), self.template)


# ---------------------------------------------------------------------------------
# Engines.
# ---------------------------------------------------------------------------------


class Engine(Protocol):
    """The systems the gradient methods integrate, on flat float64 NumPy arrays.

    With ``n = u0.size`` and ``P`` = `size` parameters (0 for "jac"), the
    sensitivities have ``k = n + P`` columns, ``d u / d(u0, p)``.
    """

    name: str
    size: int

    def forward(self, t: float, y: Any) -> Any:
        """``y = [u, S]`` (``S`` of shape ``(n, k)``, row-major) ->
        ``[f, (df/du) S + (df/dp) [0 | I]]``."""
        ...

    def backsolve(self, t: float, y: Any) -> Any:
        """``y = [u, λ, μ]`` -> ``[f, -(df/du)^T λ, -(df/dp)^T λ]``."""
        ...

    def adjoint(self, t: float, u: Any, z: Any) -> Any:
        """``z = [λ, μ]`` at the state `u` -> ``[-(df/du)^T λ, -(df/dp)^T λ]``."""
        ...

    def jacobians(self, t: float, u: Any) -> tuple[Any, Any]:
        """``(df/du, df/dp)`` of shapes ``(n, n)`` and ``(n, P)``."""
        ...

    def state_jacobian(self, t: float, u: Any) -> Any:
        """``df/du`` of shape ``(n, n)`` (no parameter columns computed)."""
        ...

    def forward_coupling(self, t: float, y: Any) -> Any:
        """``d/du`` of the sensitivities' right-hand side at ``y = [u, S]``:
        ``d vec((df/du) S + (df/dp) [0 | I]) / du``, shape ``(n k, n)``."""
        ...

    def backsolve_coupling(self, t: float, y: Any) -> Any:
        """``d/du`` of the adjoints' right-hand side at ``y = [u, λ, μ]``:
        ``d [-(df/du)^T λ, -(df/dp)^T λ] / du``, shape ``(n + P, n)``."""
        ...


# Structures (f, u0 shape, p layout) whose compiled functions are kept, per engine.
_CACHE_SIZE = 64
_JAX_CACHE = _Cache(_CACHE_SIZE)
_TORCH_CACHE = _Cache(_CACHE_SIZE)


# The relative step of `_coupling_by_differences` (sqrt of float64's epsilon).
_DIFF_STEP = 1.5e-8


def _coupling_by_differences(
    system: Callable[[float, Any], Any], t: float, y: Any, n: int
) -> Any:
    """``d system(t, y)[n:] / d y[:n]`` by forward differences along the ``n``
    state directions only (n + 1 calls of `system`, whose other blocks are known
    exactly): the engines without second derivatives at hand use it for the
    coupling blocks, which only steer Newton's iteration."""
    base = system(t, y)[n:]
    out = np.empty((base.size, n))
    for j in range(n):
        step = _DIFF_STEP * max(1.0, abs(float(y[j])))
        shifted = y.copy()
        shifted[j] += step
        out[:, j] = (system(t, shifted)[n:] - base) / step
    return out


def _p_tangents(n: int, size: int) -> Any:
    """``[0 | I]``, of shape ``(P, n + P)``: the tangent of p in each column."""
    return np.concatenate([np.zeros((size, n)), np.eye(size)], axis=1)


def _writable(y: Any) -> Any:
    # torch.from_numpy warns on read-only arrays (SciPy's are writable, but an
    # interpolant's value may be a view of read-only data).
    return y if y.flags.writeable else y.copy()


class _JaxFunctions:
    """The jitted systems of one (f, u0 shape, p layout)."""

    def __init__(self, f: Callable[..., Any], shape: tuple[int, ...], lay: Layout):
        import jax
        import jax.numpy as jnp

        n, size = math.prod(shape), lay.size
        k = n + size
        tangents = _p_tangents(n, size)

        def rhs(u: Any, q: Any, t: Any) -> Any:
            p = lay.unflatten(q, lambda leaf: leaf)
            return jnp.reshape(f(jnp.reshape(u, shape), p, t), (-1,))

        def forward(t: Any, y: Any, q: Any) -> Any:
            fu, lin = jax.linearize(lambda u, q: rhs(u, q, t), y[:n], q)
            dS = jax.vmap(lin, in_axes=(1, 1), out_axes=1)(
                jnp.reshape(y[n:], (n, k)), tangents
            )
            return jnp.concatenate([fu, jnp.reshape(dS, (-1,))])

        def backsolve(t: Any, y: Any, q: Any) -> Any:
            fu, pull = jax.vjp(lambda u, q: rhs(u, q, t), y[:n], q)
            gu, gq = pull(y[n : 2 * n])
            return jnp.concatenate([fu, -gu, -gq])

        def adjoint(t: Any, u: Any, z: Any, q: Any) -> Any:
            _, pull = jax.vjp(lambda u, q: rhs(u, q, t), u, q)
            gu, gq = pull(z[:n])
            return jnp.concatenate([-gu, -gq])

        def jacobians(t: Any, u: Any, q: Any) -> Any:
            return jax.jacfwd(lambda u, q: rhs(u, q, t), argnums=(0, 1))(u, q)

        def state_jacobian(t: Any, u: Any, q: Any) -> Any:
            return jax.jacfwd(lambda u: rhs(u, q, t))(u)

        def forward_coupling(t: Any, y: Any, q: Any) -> Any:
            S = jnp.reshape(y[n:], (n, k))

            def sensitivities(u: Any) -> Any:
                def column(s: Any, e: Any) -> Any:
                    return jax.jvp(lambda u, q: rhs(u, q, t), (u, q), (s, e))[1]

                dS = jax.vmap(column, in_axes=(1, 1), out_axes=1)(S, tangents)
                return jnp.reshape(dS, (-1,))

            return jax.jacfwd(sensitivities)(y[:n])

        def backsolve_coupling(t: Any, y: Any, q: Any) -> Any:
            def pulled(u: Any) -> Any:
                _, pull = jax.vjp(lambda u, q: rhs(u, q, t), u, q)
                gu, gq = pull(y[n : 2 * n])
                return -jnp.concatenate([gu, gq])

            return jax.jacfwd(pulled)(y[:n])

        # jax.jit compiles each on its first call: a plain solve compiles only
        # state_jacobian, a gradient method only what it integrates.
        self.forward = jax.jit(forward)
        self.backsolve = jax.jit(backsolve)
        self.adjoint = jax.jit(adjoint)
        self.jacobians = jax.jit(jacobians)
        self.state_jacobian = jax.jit(state_jacobian)
        self.forward_coupling = jax.jit(forward_coupling)
        self.backsolve_coupling = jax.jit(backsolve_coupling)


def _jax_functions(
    f: Callable[..., Any], shape: tuple[int, ...], lay: Layout
) -> _JaxFunctions:
    """The cached jitted systems of (f, u0 shape, p layout)."""
    return _JAX_CACHE.get(
        (f, shape, lay.signature), lambda: _JaxFunctions(f, shape, lay)
    )


_F64 = np.float64


def _f64(t: Any) -> Any:
    """`t` as the jitted functions' time argument, a NumPy float64 (one compiled
    signature, whatever scalar SciPy hands over). SciPy's steps already pass
    float64 scalars, which go through as they are: a new one per evaluation
    cost ~0.6 us (~0.7 ms per gradient of Lotka-Volterra, ~1200 evaluations)."""
    return t if type(t) is _F64 else _F64(t)


class _JaxEngine:
    """JAX: jitted JVPs/VJPs of f (x64 mode required)."""

    name = "jax"

    def __init__(self, problem: Problem, lay: Layout) -> None:
        self._fns = _jax_functions(problem.req.f, problem.shape, lay)
        self._q = lay.values()
        self.size = lay.size

    def forward(self, t: float, y: Any) -> Any:
        return np.asarray(self._fns.forward(_f64(t), y, self._q))

    def backsolve(self, t: float, y: Any) -> Any:
        return np.asarray(self._fns.backsolve(_f64(t), y, self._q))

    def adjoint(self, t: float, u: Any, z: Any) -> Any:
        return np.asarray(self._fns.adjoint(_f64(t), u, z, self._q))

    def jacobians(self, t: float, u: Any) -> tuple[Any, Any]:
        Ju, Jp = self._fns.jacobians(_f64(t), u, self._q)
        return np.asarray(Ju), np.asarray(Jp)

    def state_jacobian(self, t: float, u: Any) -> Any:
        return np.asarray(self._fns.state_jacobian(_f64(t), u, self._q))

    def forward_coupling(self, t: float, y: Any) -> Any:
        return np.asarray(self._fns.forward_coupling(_f64(t), y, self._q))

    def backsolve_coupling(self, t: float, y: Any) -> Any:
        return np.asarray(self._fns.backsolve_coupling(_f64(t), y, self._q))


class _TorchFunctions:
    """The Jacobian products of one (f, u0 shape, p layout) in PyTorch.

    Plain autograd, a graph per call: VJPs are ``torch.autograd.grad``, and the
    sensitivities come from the full Jacobian, all its rows in one batched
    reverse pass (``is_grads_batched``), times ``S`` in NumPy. Measured on small
    states this costs about half of ``torch.func``'s ``vjp``, and far less than
    ``vmap`` of ``jvp`` (0.5 ms against 1.6 ms at n = 2, 23 ms at n = 10 with
    110 sensitivity columns).
    """

    def __init__(self, f: Callable[..., Any], shape: tuple[int, ...], lay: Layout):
        import torch

        self.n = n = math.prod(shape)
        self.k = n + lay.size
        self.rows = torch.eye(n, dtype=torch.float64)

        def rhs(u: Any, q: Any, t: float) -> Any:
            p = lay.unflatten(q, torch.tensor)
            return f(u.reshape(shape), p, t).reshape(-1)

        self.rhs = rhs

    def _pull(self, u: Any, q: Any, t: float, lam: Any, batched: bool) -> Any:
        """``(f, lam^T df/du, lam^T df/dp)``; with `batched`, one row per row of
        `lam`."""
        import torch

        u = u.detach().requires_grad_()
        q = q.detach().requires_grad_()
        with torch.enable_grad():
            out = self.rhs(u, q, t)
        if not out.requires_grad:  # f depends on neither u nor p
            lead = (lam.shape[0],) if batched else ()
            zeros = (u.new_zeros((*lead, *u.shape)), q.new_zeros((*lead, *q.shape)))
            return out.detach(), *zeros
        gu, gq = torch.autograd.grad(
            out,
            (u, q),
            lam,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=batched,
        )
        return out.detach(), gu, gq

    def vjp(self, u: Any, q: Any, t: float, lam: Any) -> tuple[Any, Any, Any]:
        return self._pull(u, q, t, lam, batched=False)

    def jacobians(self, u: Any, q: Any, t: float) -> tuple[Any, Any, Any]:
        """``(f, df/du, df/dp)``."""
        return self._pull(u, q, t, self.rows, batched=True)

    def state_jacobian(self, u: Any, q: Any, t: float) -> Any:
        """``df/du`` alone: p takes no part in the graph (a network's weights
        would cost a reverse pass each row for nothing)."""
        import torch

        u = u.detach().requires_grad_()
        with torch.enable_grad():
            out = self.rhs(u, q, t)
        if not out.requires_grad:  # f does not depend on u
            return u.new_zeros((self.n, self.n))
        (gu,) = torch.autograd.grad(
            out,
            u,
            self.rows,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=True,
        )
        return gu


def _torch_functions(
    f: Callable[..., Any], shape: tuple[int, ...], lay: Layout
) -> _TorchFunctions:
    """The cached autograd functions of (f, u0 shape, p layout)."""
    return _TORCH_CACHE.get(
        (f, shape, lay.signature), lambda: _TorchFunctions(f, shape, lay)
    )


class _TorchEngine:
    """PyTorch: autograd VJPs and batched-VJP Jacobians on float64 tensors."""

    name = "torch"

    def __init__(self, problem: Problem, lay: Layout) -> None:
        import torch

        self._torch = torch
        self._fns = _torch_functions(problem.req.f, problem.shape, lay)
        self._q = torch.from_numpy(lay.values())
        self.size = lay.size

    def forward(self, t: float, y: Any) -> Any:
        n, k = self._fns.n, self._fns.k
        u = self._torch.from_numpy(y[:n].copy())
        fu, Ju, Jq = self._fns.jacobians(u, self._q, float(t))
        dS = Ju.numpy() @ y[n:].reshape(n, k)
        dS[:, n:] += Jq.numpy()
        return np.concatenate([fu.numpy(), dS.reshape(-1)])

    def backsolve(self, t: float, y: Any) -> Any:
        n = self._fns.n
        y = self._torch.from_numpy(_writable(y))
        fu, gu, gq = self._fns.vjp(y[:n], self._q, float(t), y[n : 2 * n])
        return self._torch.cat([fu, -gu, -gq]).numpy()

    def adjoint(self, t: float, u: Any, z: Any) -> Any:
        n = self._fns.n
        z = self._torch.from_numpy(_writable(z))
        u = self._torch.from_numpy(_writable(u))
        _, gu, gq = self._fns.vjp(u, self._q, float(t), z[:n])
        return self._torch.cat([-gu, -gq]).numpy()

    def jacobians(self, t: float, u: Any) -> tuple[Any, Any]:
        u = self._torch.from_numpy(_writable(u))
        _, Ju, Jq = self._fns.jacobians(u, self._q, float(t))
        return Ju.numpy(), Jq.numpy()

    def state_jacobian(self, t: float, u: Any) -> Any:
        u = self._torch.from_numpy(_writable(u))
        return self._fns.state_jacobian(u, self._q, float(t)).numpy()

    # Second derivatives by eager autograd would cost a batched double-backward
    # per block; differences of the first-order systems cost n + 1 of them.
    def forward_coupling(self, t: float, y: Any) -> Any:
        return _coupling_by_differences(self.forward, t, y, self._fns.n)

    def backsolve_coupling(self, t: float, y: Any) -> Any:
        return _coupling_by_differences(self.backsolve, t, y, self._fns.n)


class _JacEngine:
    """The user's ``jac(u, p, t)``: ``df/du`` only, so no parameter columns."""

    name = "jac"
    size = 0

    def __init__(self, problem: Problem, lay: Layout) -> None:
        req = problem.req
        if req.jac is None:
            raise UnsupportedError(
                "autodiff='jac' uses prob.jac for df/du, but this problem has no "
                "jac. Pass jac=... to dk.ODEProblem, or use autodiff='jax' or "
                "autodiff='torch'."
            )
        if lay.size:
            raise UnsupportedError(
                "autodiff='jac' gives gradients with respect to u0 only (prob.jac "
                f"is df/du; nothing here gives df/dp), but p has {lay.size} "
                "parameter(s). For gradients with respect to p use autodiff='jax' "
                "or autodiff='torch' (" + _INSTALL + "); for u0 alone, close f "
                "over the parameters and pass p=None."
            )
        self._f, self._p, shape = req.f, problem.p, problem.shape
        self._shape = shape
        self._n = problem.n
        self._jac = jac_adapter(req.jac, problem.p, shape)

    def _rhs(self, t: float, u: Any) -> Any:
        return np.asarray(self._f(u.reshape(self._shape), self._p, float(t))).reshape(
            -1
        )

    def forward(self, t: float, y: Any) -> Any:
        n = self._n
        u, S = y[:n], y[n:].reshape(n, n)
        return np.concatenate([self._rhs(t, u), (self._jac(t, u) @ S).reshape(-1)])

    def backsolve(self, t: float, y: Any) -> Any:
        n = self._n
        u, lam = y[:n], y[n : 2 * n]
        return np.concatenate([self._rhs(t, u), -(lam @ self._jac(t, u))])

    def adjoint(self, t: float, u: Any, z: Any) -> Any:
        return -(z @ self._jac(t, u))

    def jacobians(self, t: float, u: Any) -> tuple[Any, Any]:
        return self._jac(t, u), np.zeros((self._n, 0))

    def state_jacobian(self, t: float, u: Any) -> Any:
        return self._jac(t, u)

    # prob.jac gives no second derivatives.
    def forward_coupling(self, t: float, y: Any) -> Any:
        return _coupling_by_differences(self.forward, t, y, self._n)

    def backsolve_coupling(self, t: float, y: Any) -> Any:
        return _coupling_by_differences(self.backsolve, t, y, self._n)


_ENGINES: Mapping[str, Callable[[Problem, Layout], Engine]] = {
    "jax": _JaxEngine,
    "torch": _TorchEngine,
    "jac": _JacEngine,
}

# ---------------------------------------------------------------------------------
# Which engine.
# ---------------------------------------------------------------------------------

_INSTALL = 'pip install "diffeqkit[jax]" or pip install "diffeqkit[torch]"'
_X64 = 'jax.config.update("jax_enable_x64", True)'


def _installed(name: str) -> bool:
    """Whether a framework can be imported (never imports it)."""
    return importlib.util.find_spec(name) is not None


def _jax_x64() -> bool:
    import jax

    return bool(jax.config.jax_enable_x64)  # pyright: ignore[reportAttributeAccessIssue]


def _require(name: str) -> None:
    """Raise unless the engine named explicitly can run."""
    if name in ("jax", "torch") and not _installed(name):
        raise UnsupportedError(
            f"autodiff='{name}' needs {name}, which is not installed. Run: pip "
            f'install "diffeqkit[{name}]", or pass autodiff=None to use what is '
            "installed."
        )
    if name == "jax" and not _jax_x64():
        raise UnsupportedError(
            "autodiff='jax' needs JAX's 64-bit mode (backend='scipy' integrates "
            "in float64), but jax_enable_x64 is off, so JAX would compute in "
            f"float32. Enable it once at the start of your program with {_X64}, "
            "or pass autodiff='torch'."
        )


def _auto(has_jac: bool) -> str | None:
    """The rule for autodiff=None; None when nothing can run."""
    if _installed("jax") and _jax_x64():
        return "jax"
    if _installed("torch"):
        return "torch"
    return "jac" if has_jac else None


def _why_not() -> str:
    """Why neither framework can be used, for the messages."""
    if not _installed("jax"):
        jax = "jax is not installed"
    else:
        jax = f"jax is installed but its 64-bit mode is off (enable it with {_X64})"
    return f"{jax}; torch is not installed"


def engine_name(autodiff: str | None, has_jac: bool) -> str:
    """The engine for the sensealg option `autodiff` (see the module docstring)."""
    if autodiff is not None:
        _require(autodiff)
        return autodiff
    name = _auto(has_jac)
    if name is None:
        raise UnsupportedError(
            "backend='scipy' differentiates f(u, p, t) with JAX or PyTorch, and "
            f"neither can be used here ({_why_not()}). Run: {_INSTALL}; or pass "
            "jac=... to dk.ODEProblem for gradients with respect to u0 only."
        )
    return name


@dataclass(frozen=True)
class Job:
    """What a gradient method runs on (the one argument of a `_backend.SENSEALGS`
    entry): the converted problem, the engine that differentiates f, p's layout."""

    problem: Problem
    engine: Engine
    layout: Layout


# A gradient method's pullback on NumPy cotangents of shape (m, n).
Pull = Callable[..., tuple[Any, Any]]


def make_engine(problem: Problem, lay: Layout) -> Engine:
    """The engine of ``problem.req.sensealg.autodiff``, bound to p's values."""
    req = problem.req
    name = engine_name(getattr(req.sensealg, "autodiff", None), req.jac is not None)
    return _ENGINES[name](problem, lay)


# ---------------------------------------------------------------------------------
# The Newton Jacobian of the implicit algs.
# ---------------------------------------------------------------------------------

# What `Solution.stats["jacobian"]` says built the implicit algs' Jacobian.
FINITE_DIFFERENCES = "finite differences"
_LABELS: Mapping[str, str] = {"jax": "jax", "torch": "torch", "jac": "prob.jac"}

# Set by `finite_difference_jacobians`; a ContextVar so that threads and asyncio
# tasks each see their own.
_FORCE_FD: ContextVar[bool] = ContextVar("diffeqkit_scipy_fd", default=False)


@contextmanager
def finite_difference_jacobians() -> Iterator[None]:
    """Inside this block the SciPy backend's implicit algs build every Jacobian by
    SciPy's finite differences (LSODA: its own difference quotients), ignoring
    ``prob.jac`` and the autodiff frameworks: the plain solve's, and those of the
    systems the gradient methods integrate (decided when `dk.vjp` is called, so
    its pullback follows suit wherever it is called). For benchmarks of
    autodiff against finite-difference Jacobians, and tests; not public API.
    """
    token = _FORCE_FD.set(True)
    try:
        yield
    finally:
        _FORCE_FD.reset(token)


def finite_differences_forced() -> bool:
    """Whether `finite_difference_jacobians` is in force here."""
    return _FORCE_FD.get()


def engine_label(engine: Engine) -> str:
    """The ``stats["jacobian"]`` value of Jacobians built by `engine`."""
    return _LABELS[engine.name]


def jac_adapter(
    user_jac: Callable[..., Any], p: Any, shape: tuple[int, ...]
) -> Callable[[float, Any], Any]:
    """SciPy's ``jac(t, y)`` from the user's ``jac(u, p, t)``, as an (n, n) array."""
    n = math.prod(shape)
    expected = shape + shape

    def jac(t: float, y: Any) -> Any:
        J = np.asarray(to_numpy(user_jac(y.reshape(shape), p, float(t))))
        if J.shape != expected:
            raise InvalidProblemError(
                f"jac(u, p, t) returned shape {J.shape} but must return df/du of "
                f"shape u.shape + u.shape = {expected}."
            )
        return J.astype(np.float64, copy=False).reshape(n, n)

    return jac


def _jax_jacobian(
    f: Callable[..., Any], p: Any, shape: tuple[int, ...]
) -> Callable[[float, Any], Any]:
    lay = Layout.of(p)
    fns, q = _jax_functions(f, shape, lay), lay.values()

    def jac(t: float, y: Any) -> Any:
        return np.asarray(fns.state_jacobian(_f64(t), y, q))

    return jac


def _torch_jacobian(
    f: Callable[..., Any], p: Any, shape: tuple[int, ...]
) -> Callable[[float, Any], Any]:
    import torch

    lay = Layout.of(p)
    fns, q = _torch_functions(f, shape, lay), torch.from_numpy(lay.values())

    def jac(t: float, y: Any) -> Any:
        u = torch.from_numpy(_writable(y))
        return fns.state_jacobian(u, q, float(t)).numpy()

    return jac


_JACOBIANS: Mapping[
    str,
    Callable[[Callable[..., Any], Any, tuple[int, ...]], Callable[[float, Any], Any]],
] = {"jax": _jax_jacobian, "torch": _torch_jacobian}


def newton_jacobian_of_f(
    req: SolveRequest, p: Any, u0: Any
) -> tuple[Callable[[float, Any], Any] | None, str]:
    """SciPy's ``jac(t, y)`` for the plain solve of an implicit alg (None: SciPy's
    finite differences), and its ``stats["jacobian"]`` label.

    In order: finite differences inside `finite_difference_jacobians`;
    ``prob.jac`` when given; the framework the sensealg's ``autodiff`` names
    (checked as for the gradients); else the rule of `engine_name` (JAX with
    x64, else torch); else finite differences (SciPy alone installed). An ``f``
    the framework cannot differentiate (Python branches on traced values,
    NumPy-only functions) is not an error for a plain solve, which needs no
    gradient: its Jacobian falls back to finite differences, and the label says
    so (the gradient methods raise the framework's error instead).
    """
    if finite_differences_forced():
        return None, FINITE_DIFFERENCES
    if req.jac is not None:
        return jac_adapter(req.jac, p, u0.shape), _LABELS["jac"]
    autodiff = getattr(req.sensealg, "autodiff", None)
    if isinstance(autodiff, str) and autodiff in _JACOBIANS:
        _require(autodiff)
        name: str | None = autodiff
    else:
        name = _auto(has_jac=False)
    if name is None:
        return None, FINITE_DIFFERENCES
    jac = _JACOBIANS[name](req.f, p, u0.shape)
    try:
        # JAX traces (and compiles, once per structure) here; the value is
        # discarded
        jac(float(req.t0), u0.reshape(-1))
    except Exception:  # any failure of the framework on f
        return None, FINITE_DIFFERENCES
    return jac, _LABELS[name]


# ---------------------------------------------------------------------------------
# The loss.
# ---------------------------------------------------------------------------------


def _jax_value_and_grad(loss: Callable[[Solution], Any], sol: Solution) -> Any:
    import jax
    import jax.numpy as jnp

    t = jnp.asarray(sol.t)
    events = sol.t_events is not None

    def of_outputs(outputs: Any) -> Any:
        u, t_events, u_events = outputs
        if not events:
            return loss(dataclasses.replace(sol, u=u, t=t))
        return loss(
            dataclasses.replace(sol, u=u, t=t, t_events=t_events, u_events=u_events)
        )

    outputs = (
        jnp.asarray(sol.u),
        [jnp.asarray(x) for x in sol.t_events or ()],
        [jnp.asarray(x) for x in sol.u_events or ()],
    )
    # Not jitted: a loss closes over data the user may change between calls.
    value, (cot, t_cots, u_cots) = jax.value_and_grad(of_outputs)(outputs)
    grads = [[np.asarray(g, dtype=np.float64) for g in c] for c in (t_cots, u_cots)]
    return (
        float(value),
        np.asarray(cot, dtype=np.float64),
        (tuple(grads) if events else None),
    )


def _torch_value_and_grad(loss: Callable[[Solution], Any], sol: Solution) -> Any:
    import torch

    def leaf(x: Any) -> Any:
        return torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)

    u = leaf(sol.u)
    t = torch.from_numpy(np.array(sol.t, dtype=np.float64))
    events = sol.t_events is not None
    t_events = [leaf(x) for x in sol.t_events or ()]
    u_events = [leaf(x) for x in sol.u_events or ()]
    fields: dict[str, Any] = {"u": u, "t": t}
    if events:
        fields.update(t_events=t_events, u_events=u_events)
    inputs = [u, *t_events, *u_events]
    with torch.enable_grad():
        value = loss(dataclasses.replace(sol, **fields))
        found = torch.autograd.grad(value, inputs, allow_unused=True)
    grads = [
        np.zeros(tuple(x.shape)) if g is None else g.detach().numpy()
        for x, g in zip(inputs, found, strict=True)
    ]
    n = len(t_events)
    cot_events = (grads[1 : 1 + n], grads[1 + n :]) if events else None
    return float(value.detach()), grads[0], cot_events


_LOSS_GRADS: Mapping[str, Callable[[Callable[[Solution], Any], Solution], Any]] = {
    "jax": _jax_value_and_grad,
    "torch": _torch_value_and_grad,
}


def value_and_grad(
    loss: Callable[[Solution], Any], sol: Solution, autodiff: str | None
) -> tuple[float, Any, Any]:
    """``loss(sol)`` as a float, ``d loss / d sol.u`` as NumPy, and for a solve
    with events ``(t_cots, u_cots)``, those of ``sol.t_events`` and
    ``sol.u_events`` (else None), by the sensealg's framework (for "jac", or
    None, the rule's framework)."""
    if autodiff is not None and autodiff in _LOSS_GRADS:
        _require(autodiff)
        return _LOSS_GRADS[autodiff](loss, sol)
    name = _auto(has_jac=False)
    if name is None:
        raise UnsupportedError(
            "dk.value_and_grad on backend='scipy' differentiates loss(sol) "
            f"with JAX or PyTorch, and neither can be used here ({_why_not()}). "
            f"Run: {_INSTALL}; or call dk.vjp and pass the cotangent "
            "dL/d(sol.u) to its pullback yourself."
        )
    return _LOSS_GRADS[name](loss, sol)
