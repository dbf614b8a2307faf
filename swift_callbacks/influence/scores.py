"""Relative influence (eq. 3 of the swift-study paper) and its in-task / cross-task averages (eq. 4-5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def relinf(dot: torch.Tensor, eval_sq_norm: torch.Tensor) -> torch.Tensor:
    """``RelInf(z, z0) = <∇ℓ(z), ∇ℓ(z0)> / <∇ℓ(z0), ∇ℓ(z0)>`` for every (probe row, eval column).

    Raises:
        ValueError: If an evaluation gradient has zero or non-finite squared norm (RelInf undefined); the
            message gives the column indices.
    """
    bad = torch.nonzero(~torch.isfinite(eval_sq_norm) | (eval_sq_norm <= 0)).flatten().tolist()
    if bad:
        raise ValueError(f"RelInf is undefined: evaluation examples at positions {bad} have zero gradient norm.")
    return dot / eval_sq_norm.unsqueeze(0)


def pairing_mask(probe_tasks: Sequence[str | None], eval_tasks: Sequence[str | None]) -> torch.Tensor:
    """Boolean ``(n_probe, n_eval)`` mask of in-task pairs.

    Pairs are in-task when both examples carry the same ``task``. When neither set has tasks, pairing is by
    position (probe i with eval i), which needs sets of equal size.

    Raises:
        ValueError: If only one side has tasks, or position pairing gets sets of different sizes.
    """
    has_p, has_e = any(t is not None for t in probe_tasks), any(t is not None for t in eval_tasks)
    if has_p and has_e:
        if any(t is None for t in (*probe_tasks, *eval_tasks)):
            raise ValueError("Pairing by task needs a task on every example of both sets.")
        return torch.tensor([[p == e for e in eval_tasks] for p in probe_tasks], dtype=torch.bool)
    if has_p != has_e:
        raise ValueError("Pairing by task needs a 'task' field in both the probe and the evaluation set.")
    if len(probe_tasks) != len(eval_tasks):
        raise ValueError(
            f"Pairing by position needs sets of equal size (probe set has {len(probe_tasks)}, evaluation set has "
            f"{len(eval_tasks)}); add a 'task' field to pair by task instead."
        )
    return torch.eye(len(probe_tasks), dtype=torch.bool)


@dataclass(frozen=True)
class BlockScores:
    """s_in and s_cross of one (probe set, eval set) block, with the pair counts and standard errors."""

    s_in: float | None
    s_cross: float | None
    n_in: int
    n_cross: int
    s_in_sem: float | None
    s_cross_sem: float | None


def block_scores(rel: torch.Tensor, paired: torch.Tensor) -> BlockScores:
    """Mean RelInf over in-task pairs (s_in, eq. 4) and over cross-task pairs (s_cross, eq. 5).

    An average over no pairs is ``None`` (and its count 0), never a silent zero.
    """
    s_in, sem_in, n_in = _mean_sem(rel[paired])
    s_cross, sem_cross, n_cross = _mean_sem(rel[~paired])
    return BlockScores(s_in, s_cross, n_in, n_cross, sem_in, sem_cross)


def _mean_sem(values: torch.Tensor) -> tuple[float | None, float | None, int]:
    n = values.numel()
    if n == 0:
        return None, None, 0
    values = values.double()
    sem = float(values.std(unbiased=True) / n**0.5) if n > 1 else None
    return float(values.mean()), sem, n
