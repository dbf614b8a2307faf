"""Config-driven training: ``python -m swift_callbacks.training.train --config recipe.yaml`` (also under
``accelerate launch``), an ``SFTTrainer`` run with ``InfluenceCallback`` attached from the config's ``influence``
section. See ``recipes/README.md``.

Modules: ``config`` (the YAML sections and their checks), ``schema`` (checking data against dataclasses),
``assets`` (tokenizer, model, LoRA), ``data`` (sources and mixtures), ``tracking`` (the callback from the config),
``train`` (the entry point).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# Imported on first use: ``python -m swift_callbacks.training.train`` must not find ``train`` already imported by
# this package (runpy warns that the module would then run twice).
_EXPORTS = {
    "ConfigError": "config",
    "TrainConfig": "config",
    "config_from_dict": "config",
    "load_config": "config",
    "add_train_parser": "train",
    "build_trainer": "train",
    "run_training": "train",
}

__all__ = [
    "ConfigError",
    "TrainConfig",
    "add_train_parser",
    "build_trainer",
    "config_from_dict",
    "load_config",
    "run_training",
]

if TYPE_CHECKING:
    from .config import ConfigError, TrainConfig, config_from_dict, load_config
    from .train import add_train_parser, build_trainer, run_training


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
