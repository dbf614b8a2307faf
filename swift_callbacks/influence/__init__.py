"""Pure-PyTorch influence engine: exact per-example gradient inner products and RelInf scores.

Nothing here imports ``transformers.Trainer``; the callback is the only Trainer glue. Names resolve lazily, so
``InfluenceArguments`` (read with a config) does not import torch.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "Block": "modules",
    "BlockScores": "scores",
    "InfluenceArguments": "arguments",
    "InfluenceEngine": "engine",
    "InfluenceResult": "engine",
    "RankFailedError": "distributed",
    "UnsupportedModelError": "modules",
    "VerificationError": "verify",
    "ScoreVariant": "variants",
    "block_scores": "scores",
    "collate": "engine",
    "example_losses": "engine",
    "find_blocks": "modules",
    "pairing_mask": "scores",
    "register_variant": "variants",
    "relinf": "scores",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
