"""`torch.nn.Module`s in `p`: their parameters as the solve's inputs.

The solvers and every sensealg see p's *view*: p with each module replaced by the
dict of its named parameters (``named_parameters()`` names), so the parameters
are ordinary tensor leaves, inputs of the sensealgs' autograd Functions and the
keys of ``grads.p``. `bind` makes the user's ``f(u, p, t)`` read the view: it
puts the view's tensors in place of the module's parameters for the call (what
``torch.func.functional_call`` does, at no cost when they are the module's own),
then hands `f` p with the module itself. Buffers stay on the module, without
gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ..._arrays import dtype_name, is_array
from ..._errors import InvalidProblemError
from ..._pytree import leaves, tree_map, tree_paths

__all__ = ["bind", "check_params", "has_modules", "param_view"]

# Where a module keeps one parameter: (the submodule, its attribute name). A
# parameter shared by several submodules (tied weights) has several.
_Slot = tuple[torch.nn.Module, str]


def has_modules(p: Any) -> bool:
    return any(isinstance(x, torch.nn.Module) for x in leaves(p))


def param_view(p: Any) -> Any:
    """`p` with each module replaced by ``dict(module.named_parameters())``."""
    return tree_map(
        lambda x: dict(x.named_parameters()) if isinstance(x, torch.nn.Module) else x,
        p,
    )


def _slots(module: torch.nn.Module) -> list[list[_Slot]]:
    """For each of ``named_parameters()`` in order, every place holding it."""
    where: dict[int, list[_Slot]] = {}
    for sub in module.modules(remove_duplicate=False):
        for name, param in sub._parameters.items():
            if param is not None:
                where.setdefault(id(param), []).append((sub, name))
    return [where[id(param)] for _, param in module.named_parameters()]


@contextlib.contextmanager
def _swapped(swaps: list[tuple[list[_Slot], torch.Tensor]]) -> Iterator[None]:
    """Put each tensor in its slots for the duration; the module's own parameter
    objects are restored afterwards."""
    saved: list[tuple[_Slot, Any]] = []
    try:
        for slots, value in swaps:
            for sub, name in slots:
                held: dict[str, Any] = sub._parameters
                saved.append(((sub, name), held[name]))
                # A plain tensor in a parameter's place, as functional_call does.
                held[name] = value
        yield
    finally:
        for (sub, name), old in reversed(saved):
            sub._parameters[name] = old


def bind(f: Callable[..., Any], template: Any) -> Callable[..., Any]:
    """``f(u, p, t)`` as a function ``(u, view, t)`` of p's view (`param_view`),
    `template` being p as the user gave it (modules in place). The view's tensors
    stand in for the module's parameters during each call."""
    parts: list[tuple[torch.nn.Module, list[list[_Slot]]] | None] = [
        (x, _slots(x)) if isinstance(x, torch.nn.Module) else None
        for x in leaves(template)
    ]

    def f_view(u: Any, view: Any, t: Any) -> Any:
        flat = iter(leaves(view))
        given: list[Any] = []
        swaps: list[tuple[list[_Slot], torch.Tensor]] = []
        for part in parts:
            if part is None:
                given.append(next(flat))
                continue
            module, slots = part
            given.append(module)
            for where in slots:
                value = next(flat)
                sub, name = where[0]
                if sub._parameters[name] is not value:
                    swaps.append((where, value))
        it = iter(given)
        p = tree_map(lambda _: next(it), template)
        if not swaps:
            return f(u, p, t)
        with _swapped(swaps):
            return f(u, p, t)

    return f_view


def check_params(
    p: Any, dtype: torch.dtype, device: torch.device, dtype_from: str
) -> None:
    """Refuse, before `f` first runs, a module whose floating parameters are not
    in the solve's `dtype` or not on its `device`, and a p that mixes torch
    values with NumPy or JAX arrays. `dtype_from` says where the dtype came from
    (for the message)."""
    pairs = tree_paths(p)
    torch_held = any(isinstance(x, torch.Tensor | torch.nn.Module) for _, x in pairs)
    for path, leaf in pairs:
        if isinstance(leaf, torch.nn.Module):
            _check_module(path, leaf, dtype, device, dtype_from)
        elif torch_held and is_array(leaf) and not isinstance(leaf, torch.Tensor):
            top = type(leaf).__module__.split(".")[0]
            kind = {"numpy": "NumPy", "jax": "JAX", "jaxlib": "JAX"}.get(top, top)
            raise InvalidProblemError(
                f"{path} is a {kind} array (dtype {dtype_name(leaf.dtype)}, shape "
                f"{tuple(np.shape(leaf))}) but p also holds torch values; on "
                "backend='torch' p's arrays are torch tensors. Convert it with "
                "torch.as_tensor(...), on the device and in the dtype of u0."
            )


def _check_module(
    path: str,
    module: torch.nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    dtype_from: str,
) -> None:
    want = dtype_name(dtype)
    cast = {"float64": ".double()", "float32": ".float()"}[want]
    for name, param in module.named_parameters():
        if param.is_floating_point() and param.dtype != dtype:
            raise InvalidProblemError(
                f"{path} (a {type(module).__name__}) has parameter {name!r} of dtype "
                f"{dtype_name(param.dtype)}, but the solve runs in {want} "
                f"({dtype_from}). Convert the module with module{cast}, or give u0 "
                f"dtype {dtype_name(param.dtype)}."
            )
        if not _same_device(param.device, device):
            raise InvalidProblemError(
                f"{path} (a {type(module).__name__}) has parameter {name!r} on "
                f"{param.device}, but the solve runs on {device}. Move the module "
                f"with module.to({str(device)!r}), or put u0 on {param.device}."
            )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else index) == (
        b.index if b.index is not None else index
    )
