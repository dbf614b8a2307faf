"""The validation study: does the swift study's verdict predict what training on the data does?

From one YAML: train Base, Base+X (random mixture), Base->X (Base, then X, within each epoch) and combinations,
with several seeds; evaluate the final models; write the paper's Table 2 with intervals; and set the swift
verdicts of the Base run's influence history beside the measured accuracy changes (see :mod:`.tables`).
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# Resolved on first use, so that the command line (and ``import swift_callbacks``) does not import torch.
_LAZY = {
    "StrategyConfig": "config",
    "ValidationConfig": "config",
    "Variant": "config",
    "load_validation_config": "config",
    "parse_variant": "config",
    "validation_config": "config",
    "RunSpec": "study",
    "ValidationResults": "study",
    "plan": "study",
    "run_recipe": "study",
    "run_validation": "study",
    "agreement": "tables",
    "measured_call": "tables",
    "swift_call": "tables",
}

__all__ = [
    "RunSpec",
    "StrategyConfig",
    "ValidationConfig",
    "ValidationResults",
    "Variant",
    "agreement",
    "load_validation_config",
    "measured_call",
    "parse_variant",
    "plan",
    "run_recipe",
    "run_validation",
    "swift_call",
    "validation_config",
]

if TYPE_CHECKING:
    from .config import (
        StrategyConfig,
        ValidationConfig,
        Variant,
        load_validation_config,
        parse_variant,
        validation_config,
    )
    from .study import RunSpec, ValidationResults, plan, run_recipe, run_validation
    from .tables import agreement, measured_call, swift_call

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
