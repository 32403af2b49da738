"""PyMC integration: an ODE solve as a PyTensor expression with gradients.

`solve` wraps `dk.solve` in a PyTensor `Op` so that a PyMC model can use the
solution like any other tensor; the gradient NUTS asks for is `dk.vjp` with the
chosen ``sensealg``, on any backend. With ``backend="jax"`` the Op also has a
JAX implementation, so a model compiled to JAX (``pm.sample(nuts_sampler=
"numpyro")``) runs `dk.solve` inside the jitted program.

Design of the gradient: the value Op and the vector-Jacobian-product Op share
one cache. Once a gradient graph has been built for the solve (as PyMC does for
NUTS), the value Op runs `dk.vjp` and keeps the pullback of the last inputs; the
VJP Op, which gets the same inputs and the cotangent, reuses it, so each
log-density-and-gradient evaluation solves forward once. On a cache miss the VJP
Op runs `dk.vjp` itself. Before any gradient graph exists the value Op runs the
cheaper `dk.solve`.

A solve that fails (or inputs that are not finite) gives NaN values and NaN
gradients instead of an exception, so the sampler rejects the point and counts a
divergence; ``Op.n_failed`` counts them in the current process.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
from pytensor.gradient import grad_not_implemented
from pytensor.graph.basic import Apply, Variable
from pytensor.graph.op import Op
from pytensor.tensor.basic import as_tensor_variable, cast
from pytensor.tensor.type import tensor

from . import backends
from ._arrays import to_numpy
from ._errors import InvalidProblemError, SolveError, invalid, short
from ._gradients import vjp
from ._problem import ODEProblem, rhs_nonfinite_error
from ._pytree import tree_map, tree_paths
from ._solve import build_request, check_problem
from ._solve import solve as dk_solve

__all__ = ["SolveOp", "VJPOp", "solve"]


def solve(
    prob: ODEProblem,
    alg: str = "tsit5",
    *,
    u0: Any = None,
    p: Any = None,
    saveat: Any = None,
    backend: str | None = None,
    sensealg: Any = None,
    **solve_kwargs: Any,
) -> Variable:
    """The solution of `prob` at the save times, as a PyTensor expression.

    Parameters
    ----------
    prob : ODEProblem
        The problem. Its ``u0`` and ``p`` are the defaults and the templates the
        shapes of `u0` and `p` are checked against.
    alg : str
        The solver, as in `dk.solve`.
    u0 : PyTensor variable or array-like, optional
        The initial state, shape ``prob.u0.shape``. Default: ``prob.u0``.
    p : PyTensor variable, array-like, or a tuple / list / dict of them, optional
        The parameters, with ``prob.p``'s structure and leaf shapes (a single
        vector where ``prob.p`` is a flat sequence of numbers is accepted).
        Default: ``prob.p``.
    saveat : None, float or 1-D array
        As in `dk.solve` (constants, not PyTensor variables).
    backend : {"jax", "torch", "scipy", None}
        As in `dk.solve`; None infers it from ``prob.u0`` and ``prob.p``.
    sensealg : SensitivityAlgorithm or None
        How `dk.vjp` computes the gradient (None: the backend's default).
    **solve_kwargs
        Other keywords of `dk.solve` (``rtol``, ``atol``, ``max_steps``, ...).
        ``throw`` and ``dtype`` are set here: failures become NaN and values
        are float64.

    Returns
    -------
    TensorVariable
        Float64, shape ``(n_saves,) + u0.shape``.

    Raises
    ------
    InvalidProblemError
        A bad argument, or `u0` / `p` whose structure or static shape does not
        match the problem's (raised here, when the model is built).

    Examples
    --------
    >>> import numpy as np, diffeqkit as dk, diffeqkit.pymc as dkpm
    >>> import pytensor.tensor as pt
    >>> prob = dk.ODEProblem(lambda u, p, t: -p * u, [1.0], (0.0, 1.0), 2.0)
    >>> k = pt.dscalar("k")
    >>> u = dkpm.solve(prob, p=k, backend="scipy", rtol=1e-10, atol=1e-12)
    >>> bool(abs(u.eval({k: 2.0})[-1, 0] - np.exp(-2.0)) < 1e-9)
    True
    """
    for key in ("throw", "dtype"):
        if key in solve_kwargs:
            raise invalid(
                key,
                "is set by diffeqkit.pymc.solve",
                solve_kwargs[key],
                "Drop it: failed solves become NaN (a rejected proposal) and "
                "values are float64.",
            )
    check_problem(prob)
    name = backends.resolve_name(backend, prob.u0, prob.p)
    kwargs = dict(solve_kwargs, saveat=saveat, backend=name, sensealg=sensealg)
    req = build_request(prob, alg, dtype="float64", **kwargs)  # validates all
    u0_shape = tuple(np.shape(to_numpy(prob.u0)))
    u0_var = _as_input("u0", prob.u0 if u0 is None else u0, u0_shape)
    if p is None:
        structure, p_vars = _template(prob.p)
    else:
        structure, p_vars = _match_p(p, prob.p)
    if name == "jax":
        _jax_register()
    core = _Core(prob, alg, kwargs, structure, (len(req.saveat), *u0_shape))
    out: Any = SolveOp(core)(u0_var, *p_vars)
    return out


class _Core:
    """What both Ops share: the problem, the solve options, the pullback cache."""

    def __init__(
        self,
        prob: ODEProblem,
        alg: str,
        kwargs: dict[str, Any],
        structure: Any,
        out_shape: tuple[int, ...],
    ) -> None:
        self.prob = prob
        self.alg = alg
        self.kwargs = kwargs
        self.structure = structure  # p's tree with leaf indices (ints) as leaves
        self.out_shape = out_shape
        self.want_pullback = False  # set once a gradient graph exists
        self.n_failed = 0
        self._key: tuple | None = None
        self._pullback: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_key"] = state["_pullback"] = None  # closures over framework arrays
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.kwargs["backend"] == "jax":
            # A sampling worker (spawn) starts fresh: load PyTensor's JAX linker
            # there too, as `solve` did where the model was built.
            _jax_register()

    def problem(self, u0: Any, leaves: list[Any]) -> ODEProblem:
        p = _rebuild(self.structure, leaves)
        return self.prob.remake(u0=u0, p=p)

    def value(self, inputs: list[np.ndarray]) -> np.ndarray:
        nan = np.full(self.out_shape, np.nan)
        if not all(np.all(np.isfinite(x)) for x in inputs):
            return self._fail(nan)
        key = _key(inputs)
        try:
            prob = self.problem(inputs[0], inputs[1:])
            if self.want_pullback:
                sol, pullback = vjp(
                    prob, self.alg, throw=False, dtype="float64", **self.kwargs
                )
                self._key, self._pullback = key, (sol.success, pullback)
            else:
                sol = dk_solve(
                    prob, self.alg, throw=False, dtype="float64", **self.kwargs
                )
        except (SolveError, InvalidProblemError) as err:
            if not _is_failure(err, self.prob):
                raise
            return self._fail(nan)
        if not sol.success:
            return self._fail(nan)
        return np.asarray(to_numpy(sol.u), dtype=np.float64)

    def vjp(self, inputs: list[np.ndarray], cotangent: np.ndarray) -> list[np.ndarray]:
        nans = [np.full(np.shape(x), np.nan) for x in inputs]
        if not all(np.all(np.isfinite(x)) for x in inputs):
            return nans
        key = _key(inputs)
        try:
            if self._key == key:
                success, pullback = self._pullback
            else:
                sol, pullback = vjp(
                    self.problem(inputs[0], inputs[1:]),
                    self.alg,
                    throw=False,
                    dtype="float64",
                    **self.kwargs,
                )
                success = sol.success
            if not success:
                return nans
            grads = pullback(cotangent)
        except (SolveError, InvalidProblemError) as err:
            # A failed forward solve, or a failed backward (adjoint) solve.
            if not _is_failure(err, self.prob):
                raise
            return nans
        out = [grads.u0, *_gather(self.structure, grads.p)]
        return [
            np.asarray(to_numpy(g), dtype=np.float64).reshape(np.shape(x))
            for g, x in zip(out, inputs, strict=True)
        ]

    def _fail(self, nan: np.ndarray) -> np.ndarray:
        self.n_failed += 1
        return nan


class SolveOp(Op):
    """PyTensor Op: ``(u0, *p_leaves) -> sol.u`` (float64), made by `solve`.

    Attributes
    ----------
    n_failed : int
        Evaluations in this process that gave NaN (a failed solve, or inputs that
        are not finite). Under ``pm.sample(cores>1)`` each worker counts its own;
        the divergence count (``idata.sample_stats.diverging``) includes them.
    """

    def __init__(self, core: _Core) -> None:
        self.core = core

    @property
    def n_failed(self) -> int:
        return self.core.n_failed

    def make_node(self, *inputs: Any) -> Apply:
        shape = self.core.out_shape
        out = tensor(dtype="float64", shape=shape)
        return Apply(self, [as_tensor_variable(x) for x in inputs], [out])

    def perform(self, node: Apply, inputs: Any, output_storage: Any) -> None:
        output_storage[0][0] = self.core.value(list(inputs))

    def infer_shape(self, fgraph: Any, node: Apply, input_shapes: Any) -> list:
        return [self.core.out_shape]

    def L_op(self, inputs: Any, outputs: Any, output_grads: Any) -> list:
        self.core.want_pullback = True
        grads: Any = VJPOp(self.core)(*inputs, output_grads[0])
        return list(grads) if isinstance(grads, list) else [grads]

    def __str__(self) -> str:
        return f"dk.SolveOp({self.core.alg}, backend={self.core.kwargs['backend']})"


class VJPOp(Op):
    """PyTensor Op: ``(u0, *p_leaves, cotangent) -> (du0, *dp_leaves)``."""

    def __init__(self, core: _Core) -> None:
        self.core = core

    def make_node(self, *inputs: Any) -> Apply:
        ins = [as_tensor_variable(x) for x in inputs]
        outs = [tensor(dtype="float64", shape=x.type.shape) for x in ins[:-1]]
        return Apply(self, ins, outs)

    def perform(self, node: Apply, inputs: Any, output_storage: Any) -> None:
        *xs, cot = inputs
        for store, g in zip(output_storage, self.core.vjp(list(xs), cot), strict=True):
            store[0] = g

    def infer_shape(self, fgraph: Any, node: Apply, input_shapes: Any) -> list:
        return list(input_shapes[:-1])

    def L_op(self, inputs: Any, outputs: Any, output_grads: Any) -> list:
        return [
            grad_not_implemented(self, i, x, "second derivatives of an ODE solve")
            for i, x in enumerate(inputs)
        ]

    def __str__(self) -> str:
        return f"dk.VJPOp({self.core.alg}, backend={self.core.kwargs['backend']})"


def _key(inputs: list[np.ndarray]) -> tuple:
    return tuple((x.shape, np.ascontiguousarray(x).tobytes()) for x in inputs)


def _is_failure(err: Exception, prob: ODEProblem) -> bool:
    """Whether `err` means "no solution at this point" rather than a bug.

    A `SolveError` is a failed integration (a backward solve that fails in the
    pullback of a forward solve that succeeded); the only
    `InvalidProblemError` that depends on the parameter values is f being not
    finite at t0.
    """
    if isinstance(err, SolveError):
        return True
    return str(err) == str(rhs_nonfinite_error(prob.t0))


def _as_input(name: str, value: Any, shape: tuple[int, ...]) -> Variable:
    """`value` as a float64 tensor variable whose shape must be `shape`."""
    if not isinstance(value, Variable):
        try:
            value = np.asarray(to_numpy(value), dtype=np.float64)
        except (TypeError, ValueError):
            raise invalid(
                name, "must be a number, an array or a PyTensor variable", value, ""
            ) from None
    var = as_tensor_variable(value)
    if var.type.dtype.startswith("complex") or var.type.dtype == "bool":
        raise invalid(name, f"must be real, not {var.type.dtype}", value, "")
    static = tuple(var.type.shape)
    fits = len(static) == len(shape) and all(
        s is None or s == want for s, want in zip(static, shape, strict=True)
    )
    if not fits:
        got = tuple("?" if s is None else s for s in static)
        raise InvalidProblemError(
            f"{name} must have shape {shape} (the problem's); got shape {got}. "
            f"Pass a variable of that shape, e.g. pm.Normal(..., shape={shape})."
        )
    return cast(var, "float64") if var.type.dtype != "float64" else var


def _template(p: Any) -> tuple[Any, list[Variable]]:
    """The problem's own `p` as constants, with its structure."""
    paths = [(path, leaf) for path, leaf in tree_paths(p) if leaf is not None]
    variables = [
        _as_input(path, leaf, tuple(np.shape(to_numpy(leaf)))) for path, leaf in paths
    ]
    return _index_tree(p), variables


def _match_p(p: Any, template: Any) -> tuple[Any, list[Variable]]:
    """Check `p` against the problem's `p` and return its structure and leaves."""
    user = [(path, leaf) for path, leaf in tree_paths(p) if leaf is not None]
    if template is None:
        variables = [_as_input(path, leaf, _own_shape(leaf)) for path, leaf in user]
        return _index_tree(p), variables
    want = [(path, leaf) for path, leaf in tree_paths(template) if leaf is not None]
    if len(user) == 1 and user[0][0] == "p" and _is_flat_numbers(template):
        # One vector for a problem whose p is a flat sequence of numbers.
        shape = (len(want),) if isinstance(template, list | tuple) else ()
        if not isinstance(template, list | tuple):
            shape = tuple(np.shape(to_numpy(template)))
        return 0, [_as_input("p", p, shape)]
    if [path for path, _ in user] != [path for path, _ in want]:
        raise InvalidProblemError(
            f"p must have the problem's structure, leaves {[q for q, _ in want]}; "
            f"got leaves {[q for q, _ in user]} (from p={short(p)}). Pass the same "
            "dict keys / tuple length as prob.p, or remake the problem with the p "
            "you mean."
        )
    variables = [
        _as_input(path, leaf, tuple(np.shape(to_numpy(ref))))
        for (path, leaf), (_, ref) in zip(user, want, strict=True)
    ]
    return _index_tree(p), variables


def _own_shape(leaf: Any) -> tuple[int, ...]:
    if isinstance(leaf, Variable):
        shape = tuple(getattr(leaf.type, "shape", ()))
        if any(s is None for s in shape):
            raise InvalidProblemError(
                "p has a dimension of unknown length and the problem has no p to "
                "check it against. Give the variable a static shape (e.g. "
                "pm.Normal(..., shape=4)) or build the problem with a template p."
            )
        return shape  # pyright: ignore[reportReturnType]
    return tuple(np.shape(to_numpy(leaf)))


def _is_flat_numbers(template: Any) -> bool:
    if isinstance(template, list | tuple):
        return all(np.ndim(to_numpy(x)) == 0 for x in template)
    return not isinstance(template, Mapping)


def _index_tree(tree: Any) -> Any:
    """`tree` with each non-None leaf replaced by its index (the Op's input order)."""
    counter = iter(range(1 << 30))

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, tuple):
            items = [walk(v) for v in node]
            return type(node)(*items) if hasattr(node, "_fields") else tuple(items)
        return None if node is None else next(counter)

    return walk(tree)


def _gather(structure: Any, tree: Any) -> list[Any]:
    """The leaves of `tree` in the Op's input order (`structure`'s, not `tree`'s:
    JAX returns dicts with sorted keys)."""
    if isinstance(structure, dict):
        return [g for k, v in structure.items() for g in _gather(v, tree[k])]
    if isinstance(structure, list | tuple):
        return [g for i, v in enumerate(structure) for g in _gather(v, tree[i])]
    return [] if structure is None else [tree]


def _rebuild(structure: Any, leaves: list[Any]) -> Any:
    """`structure` (a tree of leaf indices) with each index replaced by its leaf."""
    return tree_map(lambda i: None if i is None else leaves[i], structure)


@functools.cache
def _jax_register() -> None:
    """Give the Ops a JAX implementation (for models compiled to JAX).

    Called on the first JAX-backed `solve`, not at import: PyTensor's JAX linker
    sets ``jax_enable_x64`` to match ``floatX`` when it is imported.
    """
    from pytensor.link.jax.dispatch.basic import jax_funcify

    @jax_funcify.register(SolveOp)
    def _solve_jax(op: SolveOp, **_: Any) -> Any:
        return _jax_solve_fn(op.core)

    @jax_funcify.register(VJPOp)
    def _vjp_jax(op: VJPOp, **_: Any) -> Any:
        import jax

        value = _jax_solve_fn(op.core)

        def vjp_fn(*inputs: Any) -> Any:
            *xs, cot = inputs
            _, pull = jax.vjp(value, *xs)
            return tuple(pull(cot))

        return vjp_fn


def _jax_solve_fn(core: _Core) -> Any:
    from ._errors import UnsupportedError

    if core.kwargs["backend"] != "jax":
        raise UnsupportedError(
            f"This model is compiled to JAX, but its ODE solve uses "
            f"backend={core.kwargs['backend']!r}. Build it with "
            "diffeqkit.pymc.solve(..., backend='jax') to run the solve inside the "
            "jitted program, or sample with PyMC's own NUTS."
        )
    import jax.numpy as jnp

    def value(u0: Any, *leaves: Any) -> Any:
        prob = core.problem(u0, list(leaves))
        # Under the sampler's jit, success is a traced value: a failed solve is
        # NaN (a rejected proposal), never an error at run time.
        sol = dk_solve(prob, core.alg, throw=False, dtype="float64", **core.kwargs)
        return jnp.where(sol.success, sol.u, jnp.nan)

    return value
