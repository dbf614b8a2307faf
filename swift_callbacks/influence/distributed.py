"""Splitting examples over ranks with equal work, and gathering per-example results back in order.

Every rank must run the same number of forward/backward passes (sharded models need it for their
collectives), so shards are padded to equal size by repeating the last example; repeats are dropped when
gathering.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class RankFailedError(RuntimeError):
    """Another rank failed in the same computation: no rank returns a result (see :func:`agree`)."""


def tell_failure(err: BaseException) -> None:
    """Tell the other ranks, waiting in :func:`agree`, that this rank failed with ``err``."""
    all_gather_cpu(f"{type(err).__name__}: {err}")


def agree() -> None:
    """Every rank reached this point: raise :class:`RankFailedError` if another rank failed on the way instead.

    A rank that fails calls :func:`tell_failure` where the others call this, so they fail too rather than wait, or
    take the failed rank's next computation's data for this one's.
    """
    failed = [(r, status) for r, status in enumerate(all_gather_cpu(None)) if status is not None]
    if failed:
        r, status = failed[0]
        raise RankFailedError(f"Rank {r} failed in this influence computation ({status}); no rank has a result.")


def shard(n: int, world: int, rank: int) -> list[int]:
    """Indices of ``rank``'s contiguous share of ``n`` examples, padded to ``ceil(n / world)`` entries."""
    per_rank = -(-n // world)
    index = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    return index + [n - 1] * (per_rank - len(index))


def all_gather_cpu(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``, tensors copied to CPU; ``[obj]`` on a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, map_tensors(obj, lambda t: t.detach().cpu()))
    return out


def from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a decision only rank 0 can make, e.g. from files it writes)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_positions(order: list[int], n: int) -> torch.Tensor:
    """For each example ``i < n``, the first position of ``i`` in ``order``."""
    pos = torch.full((n,), -1, dtype=torch.long)
    for p, i in reversed(list(enumerate(order))):
        pos[i] = p
    if (pos < 0).any():
        raise RuntimeError(f"examples {torch.nonzero(pos < 0).flatten().tolist()} were not computed by any rank")
    return pos


def map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor inside lists, tuples and dataclasses."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, list | tuple):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return type(obj)(**{k: map_tensors(getattr(obj, k), fn) for k in obj.__dataclass_fields__})
    return obj
