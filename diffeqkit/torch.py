"""PyTorch integration: `NeuralODE`, a neural ODE as a `torch.nn.Module`, and the
choice of the torch engine (`set_engine`, `engine`, `get_engine`).

Imported on demand (``import diffeqkit.torch``), never by ``import diffeqkit``.
Any `torch.nn.Module` can also be passed as `p` of an `ODEProblem` directly; this
module only packages the common case ``du/dt = vector_field(u)`` as a layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ._algs import get_alg
from ._errors import InvalidProblemError, invalid
from ._problem import ODEProblem
from ._saveat import save_times
from ._sensealg import check_sensealg
from ._solution import Solution
from ._solve import solve
from .backends.torch import _policy

__all__ = ["NeuralODE", "engine", "get_engine", "set_engine"]

# Arguments NeuralODE sets itself.
_OWN = ("prob", "alg", "saveat", "sensealg", "backend")


def _field(u: Any, p: Any, t: Any) -> Any:
    """``f(u, p, t)`` of a `NeuralODE`: its vector field, autonomous."""
    del t
    return p(u)


class NeuralODE(torch.nn.Module):
    """``du/dt = vector_field(u)`` solved over `tspan`, as a `torch.nn.Module`.

    Parameters
    ----------
    vector_field : torch.nn.Module
        Maps the state ``u`` (with its batch axis, if any) to du/dt of the same
        shape. It is a submodule: ``.parameters()``, ``.to(device)``,
        ``.double()`` and ``state_dict()`` include it.
    tspan : (t0, t1)
        The interval, finite numbers with ``t0 != t1``.
    alg : str, default "tsit5"
        Any alg of backend='torch' (`dk.support_matrix()`).
    saveat : None, float or 1-D array
        Save times as in `dk.solve`; default ``[t0, t1]``.
    sensealg : SensitivityAlgorithm or None
        How ``loss.backward()`` differentiates the solve; None is
        `dk.default_sensealg`'s choice.
    **solve_kwargs
        Further arguments of `dk.solve` (``rtol``, ``atol``, ``dt0``,
        ``max_steps``, ...).

    Notes
    -----
    ``node(u0)`` returns the states at the save times, shape ``(n_saves,) +
    u0.shape``; ``node.solve(u0)`` the whole `dk.Solution`. The solve runs in the
    dtype and on the device of `u0`; the vector field's parameters must match
    (``.double()``, ``.to(device)``). A leading batch axis of `u0` is solved as
    one system: adaptive steps are shared by the batch.

    Examples
    --------
    >>> import torch, diffeqkit.torch as dkt
    >>> field = torch.nn.Linear(2, 2).double()
    >>> node = dkt.NeuralODE(field, (0.0, 1.0), saveat=[0.0, 0.5, 1.0])
    >>> node(torch.ones(8, 2, dtype=torch.float64)).shape
    torch.Size([3, 8, 2])
    """

    def __init__(
        self,
        vector_field: torch.nn.Module,
        tspan: tuple[float, float],
        alg: str = "tsit5",
        *,
        saveat: Any = None,
        sensealg: Any = None,
        **solve_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(vector_field, torch.nn.Module):
            raise invalid(
                "vector_field",
                "must be a torch.nn.Module mapping u to du/dt",
                vector_field,
                "Wrap the function in a torch.nn.Module, or use dk.ODEProblem "
                "with f(u, p, t) directly.",
            )
        for name in _OWN:
            if name in solve_kwargs:
                raise InvalidProblemError(
                    f"NeuralODE sets {name} itself; got {name}= in solve_kwargs. "
                    + (
                        "It always runs on backend='torch'."
                        if name in ("backend", "prob")
                        else f"Pass {name} as NeuralODE's own argument."
                    )
                )
        self.vector_field = vector_field
        # Validated now, as the solve will: the interval, the alg, the save times
        # and the sensealg.
        probe = ODEProblem(_field, [0.0], tspan)
        self.tspan: tuple[float, float] = probe.tspan
        self.alg: str = get_alg(alg).name
        save_times(saveat, *self.tspan)
        self.saveat = saveat
        self.sensealg = check_sensealg(sensealg)
        self.solve_kwargs: dict[str, Any] = dict(solve_kwargs)

    def solve(self, u0: torch.Tensor) -> Solution:
        """The `dk.Solution` from `u0` (``sol.u`` of shape ``(n_saves,) +
        u0.shape``, differentiable with respect to `u0` and the parameters)."""
        if not isinstance(u0, torch.Tensor):
            raise invalid(
                "u0",
                "must be a torch tensor",
                u0,
                "Pass e.g. torch.tensor([1.0, 0.0]); its dtype and device are the "
                "solve's.",
            )
        prob = ODEProblem(_field, u0, self.tspan, self.vector_field)
        try:
            return solve(
                prob,
                self.alg,
                backend="torch",
                saveat=self.saveat,
                sensealg=self.sensealg,
                **self.solve_kwargs,
            )
        except InvalidProblemError as err:
            # Say it in the layer's terms: its f is vector_field(u), its p the
            # vector field.
            text = str(err)
            if text.startswith(("f(u0, p, t0)", "p (a ")):
                text = text.replace("f(u0, p, t0)", "vector_field(u0)", 1)
                text = text.replace("p (a ", "vector_field (a ", 1)
                text = text.replace(" f must return", " vector_field must return")
                raise InvalidProblemError(text) from None
            raise

    def forward(self, u0: torch.Tensor) -> torch.Tensor:
        """The states at the save times, shape ``(n_saves,) + u0.shape``."""
        return self.solve(u0).u

    def extra_repr(self) -> str:
        saves = "[t0, t1]" if self.saveat is None else _short_saveat(self.saveat)
        extra = "".join(f", {k}={v!r}" for k, v in self.solve_kwargs.items())
        sensealg = "default" if self.sensealg is None else repr(self.sensealg)
        return (
            f"alg={self.alg!r}, tspan={self.tspan!r}, saveat={saves}, "
            f"sensealg={sensealg}{extra}"
        )


def _short_saveat(saveat: Any) -> str:
    try:
        n = len(saveat)
    except TypeError:
        return f"every {saveat!r}"
    return f"{n} times"


def set_engine(mode: str | None) -> None:
    """Choose how backend='torch' runs its explicit Runge-Kutta solves, for this
    process.

    Parameters
    ----------
    mode : {"auto", "eager", "compiled"} or None
        ``"eager"``: the reference drivers, one Python-level step at a time
        (dopri5, bosh3 and dopri8 take torchdiffeq's steps). ``"compiled"``: the
        compiled engine, blocks of steps per call of ``torch.compile``-d code, compiled
        once per problem structure (``f``, alg, direction, the modules in ``p``)
        at a cost of seconds to a minute; new ``u0``, ``p``, ``tspan``, save
        times and tolerances reuse it. ``"auto"`` (the default): a structure
        runs eagerly until its solves have taken as long as a compile is
        expected to take (the mean of this process's compiles, else 10 s), then
        compiled; a single solve never compiles. None: back to the environment
        variable ``DIFFEQKIT_TORCH_ENGINE``, else ``"auto"``.

    Notes
    -----
    Precedence: the `engine` context manager, then `set_engine`, then the
    environment variable. ``sol.stats["engine"]`` says which ran, and
    ``sol.stats["compile_s"]`` the seconds a solve spent compiling. Where
    compilation fails the solve runs eagerly, with one
    ``EngineFallbackWarning``. Algs the engine does not have (see
    docs/design.md) always run on the reference drivers.

    Examples
    --------
    >>> import diffeqkit.torch as dkt
    >>> dkt.set_engine("eager")
    >>> dkt.get_engine()
    'eager'
    >>> dkt.set_engine(None)
    """
    _policy.set_engine(mode)


def get_engine() -> str:
    """The engine option in effect here: ``"auto"``, ``"eager"`` or
    ``"compiled"`` (see `set_engine`)."""
    return _policy.current()


@contextmanager
def engine(mode: str) -> Iterator[None]:
    """Choose the torch engine inside a ``with`` block (this thread or asyncio
    task only); `mode` as in `set_engine`.

    Examples
    --------
    >>> import diffeqkit.torch as dkt
    >>> with dkt.engine("compiled"):
    ...     dkt.get_engine()
    'compiled'
    """
    with _policy.engine(mode):
        yield
