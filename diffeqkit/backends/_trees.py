"""Framework pytrees recognised without importing a framework.

`p` may hold a framework's own pytree (an ``equinox.Module``, a registered
dataclass, a flax or optax structure, a ``torch.nn.Module``). The core validates
its arrays, counts them and picks the backend from them, so it must see inside,
yet ``import diffeqkit`` imports no framework. Each function here answers for one
framework, and only when that framework is already imported: an object of a type
registered with an unimported framework cannot exist. The registry names them in
its specs.
"""

from __future__ import annotations

import sys
from typing import Any

from .._arrays import is_array, is_real_number

__all__ = ["is_input", "jax_tree", "torch_module"]


def is_input(x: Any) -> bool:
    """Whether a leaf of a framework pytree is an input (an array or a number);
    other leaves (activation functions, flags, names) are static."""
    return is_array(x) or is_real_number(x)


def jax_tree(obj: Any) -> list[tuple[str, Any]] | None:
    """The input leaves of a registered JAX pytree with their paths (``.layers[0]
    .weight``, as `jax.tree_util.keystr` writes them); None if `obj` is a leaf for
    JAX or JAX is not imported."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    tree_util = jax.tree_util
    pairs, treedef = tree_util.tree_flatten_with_path(obj)
    if tree_util.treedef_is_leaf(treedef):
        return None
    return [(tree_util.keystr(path), x) for path, x in pairs if is_input(x)]


def torch_module(obj: Any) -> list[tuple[str, Any]] | None:
    """A ``torch.nn.Module``'s parameters with their paths (``.net.0.weight``, from
    `named_parameters`); None for anything else or when torch is not imported.
    Buffers are not inputs: the torch backend hands them to `f` with the module."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.nn.Module):
        return None
    return [(f".{name}", x) for name, x in obj.named_parameters()]
