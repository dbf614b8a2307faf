"""``swift-study demo``: a complete CoT swift study, offline, on a CPU in a few minutes.

1. Build a tiny Llama-style model from config and train a byte-level BPE tokenizer on the bundled data (or load
   ``--model`` from a local path or the Hub).
2. Warm-up: briefly fine-tune the tiny model on the bundled base instruction set, so it starts the study as a
   model that already knows something (a real pretrained model needs no warm-up).
3. The study: LoRA SFT (up/down projections, as in the paper) on the base set with ``InfluenceCallback``
   tracking the CoT study (Z, Z', Z'') at step 0 and every save.
4. A PNG figure of the four CoT-study curves (like the paper's Figure 1), a summary table, and the full
   ``swift-study report`` (per-context panels, verdicts, length/gradient-norm diagnostics).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..assets.tiny import build_model, build_tokenizer, demo_corpus, load_rows
from ..report import build_report, plot_metrics, summary_table

logger = logging.getLogger(__name__)


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


def _load_assets(cfg: DemoConfig):
    if cfg.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _say(f"loading {cfg.model}")
        tok = AutoTokenizer.from_pretrained(cfg.model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok, AutoModelForCausalLM.from_pretrained(cfg.model), False
    _say("building a tiny Llama-style model from config and training a tokenizer on the bundled data")
    tok = build_tokenizer(demo_corpus())
    model = build_model(tok, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=344, seed=cfg.seed)
    return tok, model, True


def _train_rows() -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in load_rows("base")]


def _sft_config(cfg: DemoConfig, out: str, epochs: float, **extra):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, lr_scheduler_type="linear", warmup_steps=10, seed=cfg.seed,
        use_cpu=not _has_gpu(), bf16=False, gradient_checkpointing=False, max_length=256, logging_steps=10,
        report_to=["tensorboard"] if _has_tensorboard() else [], disable_tqdm=False, **extra,
    )  # fmt: skip


def _warm_up(cfg: DemoConfig, tok, model) -> None:
    from datasets import Dataset
    from trl import SFTTrainer

    _say(f"warm-up: full fine-tuning of the tiny model for {cfg.warmup_epochs:g} epochs on the base set")
    args = _sft_config(cfg, str(Path(cfg.output_dir) / "warmup"), cfg.warmup_epochs, save_strategy="no")
    args.report_to = []
    SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(_train_rows()), processing_class=tok).train()


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo study; returns paths of the outputs."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTTrainer

    from .. import InfluenceCallback, cot_study, load_metrics, load_pairs

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok, model, tiny = _load_assets(cfg)
    if tiny:
        _warm_up(cfg, tok, model)
    targets = ["up_proj", "down_proj"] if any(n.endswith("up_proj") for n, _ in model.named_modules()) else "all-linear"
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.05, target_modules=targets)
    run_dir = str(out / "run")
    trainer = SFTTrainer(
        model=model, args=_sft_config(cfg, run_dir, cfg.epochs, save_steps=cfg.save_every),
        train_dataset=Dataset.from_list(_train_rows()), processing_class=tok, peft_config=lora,
    )  # fmt: skip
    study = cot_study(
        z=load_rows("cot_study_z"), z_similar=load_rows("cot_study_z_similar"), z_cot=load_rows("cot_study_z_cot")
    )
    trainer.add_callback(InfluenceCallback(trainer, studies=[study], at_step_zero=True))
    _say(f"study: LoRA SFT on {len(trainer.train_dataset)} base examples, influence at step 0 and every "
         f"{cfg.save_every} steps (Z, Z', Z'': {len(study.probe_sets['noncot'])} tasks)")  # fmt: skip
    trainer.train()
    metrics = load_metrics(run_dir)
    figure = out / "cot_study.png"
    plot_metrics(load_pairs(run_dir), metrics, figure, title="Swift study on CoT data (demo)")
    table = summary_table(metrics)
    report = build_report(run_dir)
    accuracy = _accuracy(trainer.model, tok)
    _say(f"done in {time.perf_counter() - start:.0f}s")
    print("\nCoT swift study, average RelInf by metric over the recorded steps:")
    print(table.to_string(float_format=lambda v: f"{v:+.4f}"))
    print(f"\nexact-match accuracy of the final model on Z' (held-out, greedy): {accuracy:.0%}")
    print(f"history: {run_dir}/swift_influence   figure: {figure}   report: {report}")
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


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
