"""Pure-PyTorch influence engine: exact per-example gradient inner products and RelInf scores.

Nothing here imports ``transformers.Trainer``; the callback is the only Trainer glue.
"""

from .engine import InfluenceEngine, InfluenceResult, collate, example_losses
from .modules import Block, find_blocks
from .scores import BlockScores, block_scores, pairing_mask, relinf

__all__ = [
    "Block",
    "BlockScores",
    "InfluenceEngine",
    "InfluenceResult",
    "block_scores",
    "collate",
    "example_losses",
    "find_blocks",
    "pairing_mask",
    "relinf",
]
