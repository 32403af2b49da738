"""ReverseThroughSolver and CheckpointedAdjoint: reverse-mode AD through diffrax's
steps with its `RecursiveCheckpointAdjoint`, one checkpoint per step (nothing
recomputed) or the sensealg's number (binomial checkpointing)."""

from __future__ import annotations

from typing import Any

import diffrax

from ._solve import Job, solve_with

__all__ = ["checkpointed", "reverse"]


def reverse(job: Job) -> tuple[Any, Any]:
    """ReverseThroughSolver: one checkpoint per possible step."""
    adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=job.cfg.max_steps)
    return solve_with(job, adjoint)


def checkpointed(job: Job) -> tuple[Any, Any]:
    """CheckpointedAdjoint: diffrax's recursive checkpointing, with the sensealg's
    number of checkpoints (None: diffrax's, about log2(max_steps))."""
    adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=job.sensealg.checkpoints)
    return solve_with(job, adjoint)
