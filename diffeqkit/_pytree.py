"""Pytrees of parameters without any framework.

A tree is a nested dict / list / tuple (named tuples included); anything else (an
array, a number, None) is a leaf. Dicts keep their insertion order. This is all the
structure diffeqkit needs to validate `p`, convert its leaves to a backend's arrays
and hand gradients back in the same shape.

A framework's own pytree inside `p` (an ``equinox.Module``, a registered
dataclass) is a leaf here; `param_paths` sees through it with a `NativeTree`
lookup that the backend registry supplies, so that the core validates and counts
its arrays without importing the framework.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["NativeTree", "Param", "leaves", "param_paths", "tree_map", "tree_paths"]


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply `fn` to every leaf, keeping the structure (dict, list, tuple)."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [tree_map(fn, v) for v in tree]
    if isinstance(tree, tuple):
        mapped = [tree_map(fn, v) for v in tree]
        return type(tree)(*mapped) if hasattr(tree, "_fields") else tuple(mapped)
    return fn(tree)


def tree_paths(tree: Any, prefix: str = "p") -> list[tuple[str, Any]]:
    """`(path, leaf)` pairs, the path written as the user would index it."""
    if isinstance(tree, dict):
        out: list[tuple[str, Any]] = []
        for k, v in tree.items():
            out.extend(tree_paths(v, f"{prefix}[{k!r}]"))
        return out
    if isinstance(tree, list | tuple):
        out = []
        for i, v in enumerate(tree):
            out.extend(tree_paths(v, f"{prefix}[{i}]"))
        return out
    return [(prefix, tree)]


def leaves(tree: Any) -> list[Any]:
    return [leaf for _, leaf in tree_paths(tree)]


class Param(NamedTuple):
    """One leaf of `p` as `param_paths` sees it.

    `owner` is the backend whose framework's pytree holds the leaf and `node` that
    pytree's path (both None for a leaf of dicts / lists / tuples only). A
    framework pytree without inputs appears once, as a None leaf.
    """

    path: str
    leaf: Any
    owner: str | None = None
    node: str | None = None


# obj -> (owning backend, [(path suffix, input leaf), ...]) when an installed and
# imported framework knows obj as a pytree node; None otherwise. The input leaves
# are the arrays and numbers; the node's other leaves (functions, flags) are
# static and left out.
NativeTree = Callable[[Any], "tuple[str, list[tuple[str, Any]]] | None"]


def param_paths(tree: Any, native: NativeTree, prefix: str = "p") -> list[Param]:
    """The leaves of `tree` with their paths, seeing through framework pytrees.

    Dicts, lists and tuples are walked here; a leaf that `native` recognises is
    replaced by its input leaves (paths such as ``p['nn'].layers[0].weight``).
    Arrays, numbers and None are never looked up.
    """
    out: list[Param] = []
    for path, leaf in tree_paths(tree, prefix):
        found = None if _plain(leaf) else native(leaf)
        if found is None:
            out.append(Param(path, leaf))
        else:
            owner, pairs = found
            out.extend(Param(path + key, x, owner, path) for key, x in pairs)
            if not pairs:
                out.append(Param(path, None, owner, path))
    return out


def _plain(x: Any) -> bool:
    return (
        x is None
        or isinstance(x, int | float | complex | str | bytes)
        or (hasattr(x, "shape") and hasattr(x, "dtype"))
    )
