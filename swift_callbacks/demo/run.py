"""``swift-study demo``: a complete CoT swift study, offline, on a CPU — an application of the recipe path.

The demo is two training recipes run exactly as ``swift-study train`` runs them (``training.train.run_training``
on a checked :class:`~swift_callbacks.training.config.TrainConfig`), plus a figure, a table and the report:

1. Warm-up (tiny model only): full fine-tuning of the offline tiny Llama (``tiny:`` spec) on the bundled base
   instruction set, so the study starts from a model that already knows something (a real pretrained model,
   ``--model``, needs none). Saved to ``OUTPUT/warmup``.
2. The study: LoRA SFT (up/down projections, as in the paper) on the base set with ``InfluenceCallback`` tracking
   the CoT study (Z, Z', Z'') at step 0 and every save. ``OUTPUT/run/swift_train_config.yaml`` is its recipe,
   runnable again with ``swift-study train --config``.
3. A PNG figure of the four CoT-study curves (like the paper's Figure 1), a summary table, and the full
   ``swift-study report`` (per-context panels, verdicts, length/gradient-norm diagnostics).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..assets.tiny import load_rows
from ..report import build_report, plot_metrics, summary_table

logger = logging.getLogger(__name__)
TINY_MODEL = "tiny:hidden_size=128,num_layers=4,num_heads=4,intermediate_size=344"
COT_SETS = {"z": "demo:cot_study_z", "z_similar": "demo:cot_study_z_similar", "z_cot": "demo:cot_study_z_cot"}


@dataclass
class DemoConfig:
    output_dir: str
    model: str | None = None
    warmup_epochs: float = 8.0
    epochs: float = 6.0  # as in the paper
    save_every: int = 30
    batch_size: int = 16
    learning_rate: float = 1e-3
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0


def _say(msg: str) -> None:
    print(f"[swift-study demo] {msg}", flush=True)


def _training(cfg: DemoConfig, out: Path, epochs: float, **extra: Any) -> dict[str, Any]:
    """The ``training`` section both recipes share."""
    import torch

    return {
        "output_dir": str(out), "num_train_epochs": epochs, "per_device_train_batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate, "lr_scheduler_type": "linear", "warmup_steps": 10, "seed": cfg.seed,
        "use_cpu": not torch.cuda.is_available(), "bf16": False, "gradient_checkpointing": False,
        "max_length": 256, "logging_steps": 10, "disable_tqdm": False, **extra,
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
    """The CoT study: LoRA on the up/down projections, influence at step 0 and every save."""
    report_to = ["tensorboard"] if _has_tensorboard() else []
    return {
        "model": {"name_or_path": model},
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": 0.05, "target_modules": ["up_proj", "down_proj"]},
        "data": {"train": [{"path": "demo:base", "columns": ["prompt", "completion"]}]},
        "training": _training(cfg, Path(cfg.output_dir) / "run", cfg.epochs, save_steps=cfg.save_every,
                              report_to=report_to),
        "influence": {"studies": [{"type": "cot", "sets": dict(COT_SETS)}], "schedule": {"at_step_zero": True}},
    }  # fmt: skip


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo study; returns paths of the outputs."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..store import load_metrics, load_pairs
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
    _say(f"study: LoRA SFT on the base set, influence of the CoT study at step 0 and every {cfg.save_every} steps")
    trainer = run_training(study)
    run_dir = study.output_dir
    metrics = load_metrics(run_dir)
    figure = out / "cot_study.png"
    plot_metrics(load_pairs(run_dir), metrics, figure, title="Swift study on CoT data (demo)")
    table = summary_table(metrics)
    report = build_report(run_dir)
    accuracy = _accuracy(trainer.model, trainer.processing_class)
    _say(f"done in {time.perf_counter() - start:.0f}s")
    print("\nCoT swift study, average RelInf by metric over the recorded steps:")
    print(table.to_string(float_format=lambda v: f"{v:+.4f}"))
    print(f"\nexact-match accuracy of the final model on Z' (held-out, greedy): {accuracy:.0%}")
    print(f"history: {run_dir}/swift_influence   figure: {figure}   report: {report}")
    print(f"recipe: {run_dir}/swift_train_config.yaml (run it again with swift-study train --config)")
    print(f"load it with: swift_callbacks.load_scores({run_dir!r})")
    return {"run_dir": run_dir, "figure": str(figure), "report": str(report), "summary": table, "accuracy": accuracy}


def _accuracy(model, tok) -> float:
    """Greedy exact match of the first completion word on Z' (checks that the model learned the tasks)."""
    import torch

    rows = load_rows("cot_study_z_similar")
    model.eval()
    hits = 0
    with torch.no_grad():
        for row in rows:
            ids = tok(row["prompt"], return_tensors="pt").input_ids.to(model.device)
            gen = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
            hits += text.split(" ")[0].rstrip(".") == row["answer"]
    return hits / len(rows)


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
