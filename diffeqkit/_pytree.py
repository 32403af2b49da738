"""Pytrees of parameters without any framework.

A tree is a nested dict / list / tuple (named tuples included); anything else (an
array, a number, None) is a leaf. Dicts keep their insertion order. This is all the
structure diffeqkit needs to validate `p`, convert its leaves to a backend's arrays
and hand gradients back in the same shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["leaves", "tree_map", "tree_paths"]


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
