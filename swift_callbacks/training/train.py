"""Training entry point: ``python -m swift_callbacks.training.train --config recipe.yaml [--set key=value ...]``.

Builds the tokenizer, model, datasets and ``SFTTrainer`` a config describes, attaches ``InfluenceCallback`` when
the config has an ``influence`` section, and trains. It is an ordinary script for ``accelerate launch``::

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml \\
        -m swift_callbacks.training.train --config recipes/cot/config_paper.yaml

Besides the trainer's own outputs, rank 0 writes into ``output_dir``: ``swift_train_config.yaml`` (the config
as resolved, absolute data paths; ``swift-study score`` reads it by default) and ``swift_run.json`` (world size,
distributed type, whether influence was tracked).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..configuration import ConfigError, add_override_argument
from ..errors import run_command
from ..models import load_model, load_tokenizer
from ..trainers import lora_config, make_trainer, trainer_arguments
from .config import TrainConfig, load_config

logger = logging.getLogger(__name__)
CONFIG_FILE = "swift_train_config.yaml"
RUN_FILE = "swift_run.json"


def sft_config(training: Mapping[str, Any], **overrides: Any):
    """``trl.SFTConfig`` of the ``training`` section (plus ``overrides``).

    Raises:
        ConfigError: SFTConfig rejected a value (e.g. ``bf16: true`` on a machine without bf16 support).
    """
    return trainer_arguments("sft", {**training, **overrides}, path="training")


def build_trainer(config: TrainConfig, *, influence: bool = True):
    """The ``SFTTrainer`` of ``config``, with its ``InfluenceCallback`` added when ``influence`` is on.

    Args:
        config: The training config.
        influence: Attach the callback (needs the config's ``influence`` section).

    Returns:
        ``(trainer, callback)``; ``callback`` is None when influence is off or the config has no section for it.
    """
    from .data import build_datasets
    from .tracking import build_callback

    # The training arguments come first: they set up the distributed state that model loading (ZeRO-3 partitioned
    # init, FSDP rank-0 loading) and main_process_first rely on.
    args = sft_config(config.training)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, tokenizer)
    with args.main_process_first(desc="loading the training data"):
        train_dataset, eval_dataset = build_datasets(config.data)
    lora = config.lora
    peft = lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules) if lora is not None else None
    try:
        trainer = make_trainer(
            "sft", model, tokenizer, args, train_dataset, eval_dataset=eval_dataset, peft_config=peft
        )
    except ValueError as err:
        if peft is None or "target_modules" not in str(err).replace(" ", "_").lower():
            raise
        # PEFT found none of the named modules in this model: the recipe's mistake, named by its key.
        raise ConfigError(f"lora.target_modules: {lora.target_modules!r} names no module of this model "
                          f"({str(err).splitlines()[0]})") from err  # fmt: skip
    callback = None
    if influence and config.influence is not None:
        callback = build_callback(trainer, config.influence)
        trainer.add_callback(callback)
    return trainer, callback


def run_training(config: TrainConfig, *, influence: bool = True):
    """Train as ``config`` says; returns the trainer.

    Args:
        config: The training config.
        influence: Track influence (when the config has an ``influence`` section). Off reproduces a plain run,
            to be scored later with ``swift-study score`` (the paper's original post-hoc workflow).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer, callback = build_trainer(config, influence=influence)
    if trainer.is_world_process_zero():
        write_run_files(trainer, config, tracked=callback is not None)
    resume = config.training.get("resume_from_checkpoint")
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    trainer.save_model()
    return trainer


def write_run_files(trainer, config: TrainConfig, *, tracked: bool) -> None:
    """``swift_train_config.yaml`` and ``swift_run.json`` in the output folder (call on rank 0 only)."""
    out = Path(trainer.args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
    (out / CONFIG_FILE).write_text(text, encoding="utf-8")
    info = {
        "world_size": trainer.args.world_size,
        "distributed_type": getattr(trainer.args.distributed_state.distributed_type, "value", None),
        "device": str(trainer.args.device),
        "influence_tracked": tracked,
    }
    (out / RUN_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")


# --------------------------------------------------------------------------------------------- command line


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config YAML (see recipes/)")
    add_override_argument(parser, "training.learning_rate=2e-5")
    parser.add_argument(
        "--no-influence", action="store_true",
        help="train without InfluenceCallback even if the config has an influence section (score later with "
        "swift-study score)",
    )  # fmt: skip


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to a ``swift-study`` subparsers object; returns the new parser."""
    parser = subparsers.add_parser(
        "train", help="fine-tune with SFTTrainer from a YAML config, tracking influence (works under accelerate launch)"
    )
    add_train_arguments(parser)
    parser.set_defaults(func=train_command)
    return parser


def train_command(args: argparse.Namespace) -> int:
    """Run ``train`` from parsed arguments (errors are reported by ``errors.run_command``)."""
    try:
        run_training(load_config(args.config, args.overrides), influence=not args.no_influence)
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Tear down torch.distributed before exit: a gloo group left to interpreter shutdown can abort a rank
    ("terminate called without an active exception") after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swift_callbacks.training.train",
        description="Fine-tune with TRL's SFTTrainer from a YAML config, tracking swift-study influence.",
    )
    add_train_arguments(parser)
    return run_command("swift_callbacks.training.train", train_command, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
