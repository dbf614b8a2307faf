"""``swift-study demo``: a complete CoT swift study, offline, on a CPU — an application of the recipe path.

The demo is two training recipes run exactly as ``swift-study train`` runs them (``training.train.run_training``
on a checked :class:`~swift_callbacks.training.config.TrainConfig`), plus a figure, a table and the report:

1. Warm-up (tiny model only): full fine-tuning of the offline tiny Llama (``tiny:`` spec) on the bundled base
   instruction set, so the study starts from a model that already knows something (a real pretrained model,
   ``--model``, needs none). Saved to ``OUTPUT/warmup``.
2. The study: LoRA SFT (up/down projections, as in the paper) on the base set with ``InfluenceCallback`` tracking
   the CoT study (Z, Z', Z'') at step 0 and every save. ``OUTPUT/run/swift_train_config.yaml`` is its recipe,
   runnable again with ``swift-study train --config``. Its schedule comes from a preset (``options``): the paper's
   for the tiny model, a short one for a real model.
3. The figure (``OUTPUT/cot_study.png``: the report's in-task and cross-task panels of the CoT study), a summary
   table, the full ``swift-study report`` (verdicts, robust statistics, length/gradient-norm diagnostics), and a
   plain-language reading of the report's verdicts with its cautions (``reading``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from ..evaluation.config import EvalSetConfig
from ..evaluation.examples import read_examples
from ..evaluation.metrics import make_metric
from ..evaluation.stats import Interval, wilson_interval
from ..report import analyse, build_report, summary_table
from ..report.figures import plot_panels, study_panels
from .options import BASE_EXAMPLES, DemoConfig
from .reading import RunFacts, reading_lines

logger = logging.getLogger(__name__)
TINY_MODEL = "tiny:hidden_size=128,num_layers=4,num_heads=4,intermediate_size=344"
COT_SETS = {"z": "demo:cot_study_z", "z_similar": "demo:cot_study_z_similar", "z_cot": "demo:cot_study_z_cot"}


def _say(msg: str) -> None:
    print(f"[swift-study demo] {msg}", flush=True)


def _training(cfg: DemoConfig, out: Path, epochs: float, **extra: Any) -> dict[str, Any]:
    """The ``training`` section both recipes share."""
    import torch

    return {
        "output_dir": str(out), "num_train_epochs": epochs, "per_device_train_batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate, "lr_scheduler_type": "linear", "warmup_steps": cfg.warmup_steps,
        "seed": cfg.seed, "use_cpu": not torch.cuda.is_available(), "bf16": False, "gradient_checkpointing": False,
        "max_length": cfg.max_length, "logging_steps": 10, "disable_tqdm": False, **extra,
    }  # fmt: skip


def warmup_recipe(cfg: DemoConfig) -> dict[str, Any]:
    """Full fine-tuning of the tiny model on the base set, no influence tracking."""
    training = _training(cfg, Path(cfg.output_dir) / "warmup", cfg.warmup_epochs, save_strategy="no", report_to=[])
    return {
        "model": {"name_or_path": f"{TINY_MODEL},seed={cfg.seed}"},
        "data": {"train": [{"path": "demo:base", "columns": ["prompt", "completion"]}]},
        "training": training,
    }


def study_recipe(cfg: DemoConfig, model: str) -> dict[str, Any]:
    """The CoT study: LoRA (up/down projections by default), influence at step 0 and every save."""
    report_to = ["tensorboard"] if _has_tensorboard() else []
    source: dict[str, Any] = {"path": "demo:base", "columns": ["prompt", "completion"]}
    if cfg.examples is not None and cfg.examples < BASE_EXAMPLES:
        source["weight"] = cfg.examples / BASE_EXAMPLES  # a fractional weight takes a seeded random subset
    steps = {"max_steps": cfg.max_steps} if cfg.max_steps is not None else {}
    training = _training(cfg, Path(cfg.output_dir) / "run", cfg.epochs, save_steps=cfg.save_every,
                         report_to=report_to, **steps)  # fmt: skip
    engine = {"engine": {"param_filter": cfg.track}} if cfg.track else {}
    lora = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": 0.05, "target_modules": lora_targets(cfg)}
    return {
        "model": {"name_or_path": model},
        "lora": lora,
        "data": {"train": [source], "seed": cfg.seed},
        "training": training,
        "influence": {
            "studies": [{"type": "cot", "sets": dict(COT_SETS)}],
            "schedule": {"at_step_zero": cfg.at_step_zero},
            **engine,
        },
    }


def lora_targets(cfg: DemoConfig) -> list[str] | str:
    """``lora.target_modules``: the module suffixes, or with ``lora_layers`` a regex PEFT matches whole names with."""
    if cfg.layer_range is None:
        return list(cfg.lora_modules)
    first, last = cfg.layer_range
    layers = "|".join(str(i) for i in range(first, last + 1))
    modules = "|".join(re.escape(m) for m in cfg.lora_modules)
    return rf".*\.layers\.({layers})\.(.*\.)?({modules})"


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo study; returns paths of the outputs."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..store import load_metrics
    from ..training.config import config_from_dict
    from ..training.train import run_training

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = cfg.model
    if model is None:
        _say("warm-up: full fine-tuning of an offline tiny Llama (built from config, tokenizer trained on the bundled "
             f"data) for {cfg.warmup_epochs:g} epochs on the base set")  # fmt: skip
        run_training(config_from_dict(warmup_recipe(cfg)), influence=False)
        model = str(out / "warmup")
    else:
        _say(f"loading {model}")
    study = config_from_dict(study_recipe(cfg, model))
    _say(f"study: {_schedule(cfg)}")
    trainer = run_training(study)
    run_dir = study.output_dir
    table = summary_table(load_metrics(run_dir))
    report = build_report(run_dir)
    analysis = analyse(run_dir)  # the report's verdicts, read for the plain-language summary
    figure = out / "cot_study.png"
    views = [v for v in analysis.views if v.name == "cot"]
    plot_panels(study_panels(analysis.history, views[0]), figure, "Swift study on CoT data (demo)")
    accuracy = _accuracy(trainer.model, trainer.processing_class)
    reading = reading_lines(analysis.verdicts.get("cot", []), analysis.history, _facts(cfg, trainer, accuracy))
    _say(f"done in {time.perf_counter() - start:.0f}s")
    print("\nCoT swift study, average RelInf by metric over the recorded steps:")
    print(table.to_string(float_format=lambda v: f"{v:+.4f}"))
    print(
        f"\nexact-match accuracy of the final model on Z' (held-out, greedy): {accuracy.value:.0%} "
        f"({accuracy.n} examples, 95% CI {accuracy.low:.0%}-{accuracy.high:.0%})"
    )
    print(f"history: {run_dir}/swift_influence   figure: {figure}   report: {report}")
    print(f"recipe: {run_dir}/swift_train_config.yaml (run it again with swift-study train --config)")
    print(f"load it with: swift_callbacks.load_scores({run_dir!r})")
    print("\n" + "\n".join(reading))
    return {"run_dir": run_dir, "figure": str(figure), "report": str(report), "summary": table,
            "accuracy": accuracy.value, "accuracy_interval": accuracy, "reading": reading}  # fmt: skip


def _schedule(cfg: DemoConfig) -> str:
    """The study's schedule in words, for the progress line."""
    data = f"{cfg.examples} of the {BASE_EXAMPLES}" if cfg.examples else f"all {BASE_EXAMPLES}"
    length = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs:g} epochs"
    when = ("at step 0 and " if cfg.at_step_zero else "") + f"every {cfg.save_every} steps"
    modules = ",".join(cfg.lora_modules) + (f" of layers {cfg.lora_layers}" if cfg.lora_layers else "")
    return f"LoRA SFT ({modules}) for {length} on {data} base examples, influence of the CoT study {when}"


def _facts(cfg: DemoConfig, trainer, accuracy: Interval) -> RunFacts:
    """What the plain-language reading says about the run besides its verdicts."""
    return RunFacts(
        tiny=cfg.model is None, model=cfg.model or "tiny", steps=int(trainer.state.global_step),
        examples=len(trainer.train_dataset), lora_modules=tuple(cfg.lora_modules), accuracy=accuracy.value,
        lora_layers=cfg.lora_layers,
    )  # fmt: skip


def _accuracy(model, tok) -> Interval:
    """Held-out exact match of the final answer on Z' (greedy; the case counts, as in the uppercase task), scored by
    ``swift-study evaluate``'s metric, with its Wilson interval."""
    config = EvalSetConfig(name="z_similar", path="demo:cot_study_z_similar", max_new_tokens=8, case_sensitive=True)
    examples = read_examples(config)
    metric = make_metric(config)
    model.eval()
    records = [
        r for start in range(0, len(examples), 16) for r in metric.score(model, tok, examples[start : start + 16])
    ]
    return wilson_interval(sum(bool(r.correct) for r in records), len(records), 0.95)


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
