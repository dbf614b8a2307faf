"""The demo's settings, declared once: :class:`DemoConfig` fields, their command-line options and the presets.

Cheap to import (dataclasses and argparse only), so ``swift-study --help`` loads no torch. Each tunable field
carries its ``help`` and becomes ``--field-name`` on ``swift-study demo``; a preset is a set of field values, and
options given on the command line override it.

Presets:

* ``paper``: the paper's schedule on the bundled base set (all 480 examples, 6 epochs, a save every 30 steps,
  LoRA on every layer's up/down projections). The default for the offline tiny model.
* ``quick``: a short schedule sized for a real pretrained model on a CPU (the default with ``--model``): a seeded
  subset of 96 examples, 24 steps of 8, a save every 6 steps (5 checkpoints with step 0), LoRA on the up/down
  projections, influence through the LoRA B matrices only (``--track lora_B``: at step 0, where B is zero, that is
  the whole LoRA gradient, and the engine's self-check then covers every tracked block at its first computation).
  Enough to see the instrument at work on a real model in minutes; far too short to be evidence.
* ``smollm2``: ``quick`` with LoRA on the last 6 of SmolLM2-135M's 30 decoder layers (``--lora-layers 24-29``),
  so the backward passes of training and influence stop there. The default with ``--model smollm2``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

PAPER, QUICK, SMOLLM2 = "paper", "quick", "smollm2"
BASE_EXAMPLES = 480  # rows of the bundled base set (assets/data/base.jsonl)


class DemoError(UserError):
    """A demo option that cannot work (e.g. more examples than the bundled set holds)."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A field that is also a command-line option (``help`` shown by ``swift-study demo --help``)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DemoConfig:
    """Every setting of one demo run (defaults: the ``paper`` preset). Field ``help`` texts are the CLI's."""

    output_dir: str
    model: str | None = None
    warmup_epochs: float = _opt(8.0, "epochs of full fine-tuning that warm the tiny model up; tiny model only")
    epochs: float = _opt(6.0, "LoRA SFT epochs over the training examples, unless --max-steps is set")
    max_steps: int | None = _opt(None, "LoRA SFT optimizer steps; overrides --epochs")
    examples: int | None = _opt(
        None, f"train on a seeded random subset of this many of the {BASE_EXAMPLES} base examples; none: all"
    )
    save_every: int = _opt(30, "save (and compute influence) every N steps")
    at_step_zero: bool = _opt(True, "also compute influence before the first step")
    batch_size: int = _opt(16, "per-device training batch size")
    learning_rate: float = _opt(1e-3, "peak learning rate (linear decay after the warm-up steps)")
    warmup_steps: int = _opt(10, "learning-rate warm-up steps of the LoRA SFT")
    max_length: int = _opt(256, "truncate training and influence examples to this many tokens")
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: int = _opt(32, "LoRA alpha (the update is scaled by alpha / r)")
    lora_modules: list[str] = field(
        default_factory=lambda: ["up_proj", "down_proj"],
        metadata={"help": "comma-separated module name suffixes LoRA adapts (and influence tracks)", "csv": True},
    )
    lora_layers: str | None = _opt(
        None, "adapt only the decoder layers in this range, e.g. 24-29 (modules named ...layers.N...<module>)"
    )
    track: str | None = _opt(
        None, "regex on parameter names: track influence through these trainable parameters only (default: all)"
    )
    seed: int = _opt(0, "seed of the model, the data subset and training")

    def __post_init__(self) -> None:
        self.lora_modules = list(self.lora_modules)  # a tuple or a CSV-parsed list alike
        self.check()

    def check(self) -> None:
        """Raise :class:`DemoError` on a value that cannot work, naming its option."""
        for name in ("max_steps", "examples", "save_every", "batch_size", "max_length", "lora_r", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DemoError(f"{_flag(name)} must be >= 1, got {value}")
        if self.examples is not None and self.examples > BASE_EXAMPLES:
            raise DemoError(f"--examples {self.examples}: the bundled base set has {BASE_EXAMPLES} examples")
        if self.epochs <= 0 and self.max_steps is None:
            raise DemoError(f"--epochs must be > 0, got {self.epochs:g}")
        if not self.lora_modules or not all(m.strip() for m in self.lora_modules):
            raise DemoError(f"--lora-modules must name modules, got {','.join(self.lora_modules)!r}")
        if self.lora_layers is not None:
            self.layer_range  # noqa: B018  (raises on a malformed range)

    @property
    def layer_range(self) -> tuple[int, int] | None:
        """``(first, last)`` decoder layer of ``lora_layers`` (inclusive), or None for every layer."""
        if self.lora_layers is None:
            return None
        first, _, last = self.lora_layers.partition("-")
        try:
            bounds = int(first), int(last or first)
        except ValueError:
            bounds = (-1, -1)
        if not 0 <= bounds[0] <= bounds[1]:
            raise DemoError(f"--lora-layers must be a range FIRST-LAST of layer numbers, got {self.lora_layers!r}")
        return bounds


PRESETS: dict[str, dict[str, Any]] = {
    PAPER: {},
    QUICK: {
        "examples": 96,
        "batch_size": 8,
        "max_steps": 24,
        "save_every": 6,
        "warmup_steps": 2,
        "max_length": 128,
        "track": "lora_B",
    },
}
# SmolLM2-135M has 30 decoder layers: LoRA on the last 6 keeps the backward pass (training and influence) short.
PRESETS[SMOLLM2] = {**PRESETS[QUICK], "lora_layers": "24-29"}
"""Field values of each preset over :class:`DemoConfig`'s defaults."""


def default_preset(model: str | None) -> str:
    """``paper`` for the offline tiny model, ``smollm2`` for that model, ``quick`` for another real model."""
    if model is None:
        return PAPER
    return SMOLLM2 if model == SMOLLM2 else QUICK


def make_config(output_dir: str, model: str | None = None, preset: str | None = None, **options: Any) -> DemoConfig:
    """The :class:`DemoConfig` of a preset (default: :func:`default_preset`) with ``options`` over it.

    Raises:
        DemoError: Unknown preset or field, or a value out of range.
    """
    preset = preset or default_preset(model)
    if preset not in PRESETS:
        raise DemoError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(options) - {f.name for f in _tunable()}
    if unknown:
        raise DemoError(f"unknown demo settings: {', '.join(sorted(unknown))}")
    return DemoConfig(output_dir=output_dir, model=model, **{**PRESETS[preset], **options})


def _tunable() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(DemoConfig) if "help" in f.metadata]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_demo_options(parser: argparse.ArgumentParser) -> None:
    """``--preset`` and one option per tunable :class:`DemoConfig` field (absent ones keep the preset's value)."""
    parser.add_argument(
        "--preset", choices=list(PRESETS), default=None,
        help=f"a set of the values below: {PAPER} (default for the tiny model: all {BASE_EXAMPLES} examples, "
        f"6 epochs), {QUICK} (default with --model: {_describe(QUICK)}) or {SMOLLM2} (default with --model "
        f"{SMOLLM2}: {QUICK} and {_describe(SMOLLM2, QUICK)})",
    )  # fmt: skip
    for f in _tunable():
        default = PRESETS[PAPER].get(f.name, _default(f))
        help = f"{f.metadata['help']} (paper: {_show(default)})"
        if str(f.type) == "bool":
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help)  # fmt: skip
            continue
        kind = _csv if f.metadata.get("csv") else _scalar_type(f)
        parser.add_argument(_flag(f.name), type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help)


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The tunable fields given on the command line (those left out are absent, so the preset's apply)."""
    return {f.name: getattr(args, f.name) for f in _tunable() if hasattr(args, f.name)}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _scalar_type(f: dataclasses.Field):
    kinds = {"int": int, "float": float, "int | None": int, "float | None": float, "str | None": str}
    return kinds[str(f.type)]


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return (
        ",".join(value) if isinstance(value, list | tuple) else f"{value:g}" if isinstance(value, float) else str(value)
    )


def _describe(preset: str, over: str | None = None) -> str:
    """The options of ``preset`` (those that differ from preset ``over``) as command-line words."""
    base = PRESETS[over] if over else {}
    return ", ".join(f"{_flag(k)} {_show(v)}" for k, v in PRESETS[preset].items() if base.get(k, None) != v)
