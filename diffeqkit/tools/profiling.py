"""Waiting for arrays and measuring a gradient's peak memory, per framework.

The framework is told by the arrays themselves (array-api-compat's type tests,
which import nothing); JAX and torch are imported inside the functions that need
them, once their arrays exist. Nothing here is part of a solve: the measuring
tools (`compare`, `sweep`) call it around one.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import array_api_compat as aac

from .._pytree import leaves

__all__ = ["peak_memory", "synchronize"]

# (peak in MiB, how it was measured), or (None, None) where nothing honest exists.
Measurement = tuple[float | None, str | None]


def synchronize(tree: Any) -> None:
    """Return once every array in `tree` is computed (JAX's asynchronous dispatch,
    CUDA kernels), so that a timer around a call measures its work."""
    arrays = leaves(tree)
    jax_arrays = [x for x in arrays if aac.is_jax_array(x)]
    if jax_arrays:
        import jax

        jax.block_until_ready(jax_arrays)
    cuda = {x.device for x in arrays if aac.is_torch_array(x) and x.is_cuda}
    if cuda:
        import torch

        for device in cuda:
            torch.cuda.synchronize(device)


def peak_memory(
    run: Callable[[], Any],
    loss: Callable[[Any, Any], Any],
    u0: Any,
    p: Any,
) -> Measurement:
    """Peak memory in MiB of one gradient with respect to ``(u0, p)``, and how it
    was measured; the framework is told by the arrays in `u0` and `p`.

    Parameters
    ----------
    run : callable
        ``run()`` computes the gradient eagerly (it is called where an allocator
        can be watched: NumPy, torch on CUDA).
    loss : callable
        ``loss(u0, p) -> scalar``, the same loss as a function the framework
        differentiates itself (JAX compiles ``jax.grad`` of it, never runs it).
    u0, p : arrays
        The inputs, in the framework's array type and on its device.

    Returns
    -------
    (float or None, str or None)
        The peak in MiB and the method: ``"xla buffer assignment"`` (JAX, any
        device), ``"cuda allocator"`` (torch on CUDA), ``"tracemalloc"``
        (NumPy); ``(None, None)`` for torch on the CPU, whose allocations bypass
        tracemalloc and whose allocator has no peak to read.
    """
    arrays = leaves((u0, p))
    for is_framework, measure in _MEASURES:
        if any(is_framework(x) for x in arrays):
            return measure(run, loss, u0, p)
    return _tracemalloc(run, loss, u0, p)


def _xla_buffers(
    run: Callable[[], Any], loss: Callable[..., Any], u0: Any, p: Any
) -> Measurement:
    """XLA's buffer assignment of the compiled gradient: its arguments, outputs and
    temporaries less the outputs that reuse an argument's buffer. XLA plans every
    buffer before the program runs, so this is its footprint exactly (the CPU
    allocator has no peak, a GPU's peak cannot be reset)."""
    del run
    import jax

    program = jax.jit(jax.grad(loss, argnums=(0, 1)))
    analysis = program.lower(u0, p).compile().memory_analysis()
    if analysis is None:  # a platform without the analysis
        return None, None
    size = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    return size / 2**20, "xla buffer assignment"


def _cuda_allocator(
    run: Callable[[], Any], loss: Callable[..., Any], u0: Any, p: Any
) -> Measurement:
    """The CUDA caching allocator's peak during `run` above what was allocated
    before it; None on the CPU."""
    del loss
    cuda = [x.device for x in leaves((u0, p)) if aac.is_torch_array(x) and x.is_cuda]
    if not cuda:
        return None, None
    import torch

    device = cuda[0]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    synchronize(run())
    peak = torch.cuda.max_memory_allocated(device)
    return (peak - before) / 2**20, "cuda allocator"


def _tracemalloc(
    run: Callable[[], Any], loss: Callable[..., Any], u0: Any, p: Any
) -> Measurement:
    """The peak of the NumPy buffers and Python objects allocated during `run`
    (memory a JAX or torch engine differentiating ``f`` allocates is not seen)."""
    del loss, u0, p
    tracemalloc.start()
    try:
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20, "tracemalloc"


# Frameworks with a measurement of their own, by the type test of their arrays;
# anything else (NumPy) is traced by tracemalloc.
_MEASURES: tuple[tuple[Callable[[object], bool], Callable[..., Measurement]], ...] = (
    (aac.is_jax_array, _xla_buffers),
    (aac.is_torch_array, _cuda_allocator),
)
