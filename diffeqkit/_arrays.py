"""Framework-free array inspection: what is an array, is it concrete, which dtype.

Uses array-api-compat's type tests, which import no framework.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import array_api_compat as aac
import numpy as np

__all__ = [
    "FLOAT_DTYPES",
    "array_namespace",
    "dtype_name",
    "is_array",
    "is_concrete",
    "is_native_array",
    "is_real_number",
    "to_numpy",
]

FLOAT_DTYPES = ("float32", "float64")

_NAMESPACES: dict[type, Any] = {}


def array_namespace(*xs: Any, api_version: str | None = None, **kwargs: Any) -> Any:
    """The Array API namespace of arrays: `array_api_compat.array_namespace`.

    Same arguments and result; the common call in a right-hand side,
    ``array_namespace(u)``, is answered from a per-type cache, because the full
    lookup (~10 us for a NumPy array) would otherwise run on every evaluation of
    ``f`` and dominate small SciPy solves.

    Examples
    --------
    >>> import numpy as np, diffeqkit as dk
    >>> xp = dk.array_namespace(np.ones(2))
    >>> float(xp.sum(xp.ones(3)))
    3.0
    """
    if len(xs) == 1 and api_version is None and not kwargs:
        cls = type(xs[0])
        xp = _NAMESPACES.get(cls)
        if xp is None:
            # array-api-compat's namespace is a function of the array's type
            xp = _NAMESPACES[cls] = aac.array_namespace(xs[0])
        return xp
    return aac.array_namespace(*xs, api_version=api_version, **kwargs)


def is_array(x: object) -> bool:
    """True for NumPy, torch and JAX arrays (anything with a shape and a dtype)."""
    return hasattr(x, "shape") and hasattr(x, "dtype")


def is_native_array(x: object) -> bool:
    """True for framework arrays (torch, JAX, ...), False for NumPy and Python data."""
    return is_array(x) and not isinstance(x, np.ndarray | np.generic)


def is_concrete(x: object) -> bool:
    """False for values that cannot be read now (JAX tracers under jit/grad/vmap,
    torch tensors on the meta device)."""
    if not is_array(x):
        return True
    if getattr(x, "is_meta", False) is True:
        return False
    tracer = _jax_tracer_type(type(x))
    if tracer is not None:
        return not tracer
    return not aac.is_lazy_array(x)


@functools.cache
def _jax_tracer_type(cls: type) -> bool | None:
    """For JAX classes, whether `cls` is a tracer; None for other classes.

    array-api-compat calls every JAX array lazy (it might be a tracer); a JAX
    array that is not a tracer can be read. Decided from the class, without
    importing jax.
    """
    jax_bases = [b for b in cls.__mro__ if b.__module__.split(".")[0] in _JAX_MODULES]
    if not jax_bases:
        return None
    return any(b.__name__ == "Tracer" for b in jax_bases)


_JAX_MODULES = ("jax", "jaxlib")


def dtype_name(dtype: Any) -> str:
    """'float32' for np.float32, torch.float32, jnp.float32, 'float32', ..."""
    try:
        return _dtype_name(dtype)
    except TypeError:  # unhashable
        return _dtype_name.__wrapped__(dtype)


@functools.cache
def _dtype_name(dtype: Any) -> str:
    text = str(dtype)
    if text.startswith("torch."):
        return text[len("torch.") :]
    try:
        return np.dtype(dtype).name
    except TypeError:
        return text


def to_numpy(x: Any) -> np.ndarray:
    """A concrete array(-like) as a NumPy array; device arrays are copied to host."""
    if aac.is_torch_array(x):
        return x.detach().cpu().numpy()  # pyright: ignore[reportAttributeAccessIssue]
    return np.asarray(x)


def is_real_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
