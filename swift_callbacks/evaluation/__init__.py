"""Evaluation: accuracy of models, checkpoints or every checkpoint of a run on evaluation sets, per task, with
confidence intervals (Wilson for an accuracy, Newcombe's paired score interval for a difference); final-answer
exact match, multiple choice by option log-likelihood, and LLM-judged generation. Records are cached per example
(a rerun resumes); results are ``results.csv`` and a DataFrame.

Example::

    from swift_callbacks.evaluation import EvalSetConfig, EvaluateConfig, evaluate

    results = evaluate(EvaluateConfig(models=["out/run"], sets=[EvalSetConfig("gsm8k", "gsm8k_test.jsonl")],
                                      output_dir="out/eval"))
    print(results.table)
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# Resolved on first use, so that the command line (and ``import swift_callbacks``) does not import torch.
_LAZY = {
    "EvalSetConfig": "config",
    "EvaluateConfig": "config",
    "JudgeConfig": "config",
    "evaluate_config": "config",
    "load_evaluate_config": "config",
    "EvalExample": "examples",
    "read_examples": "examples",
    "JUDGE_PROMPT": "metrics",
    "JUDGE_PROMPT_VERSION": "metrics",
    "METRIC_CLASSES": "metrics",
    "Metric": "metrics",
    "register_metric": "metrics",
    "ExampleRecord": "records",
    "RecordError": "records",
    "EvalResults": "run",
    "Target": "run",
    "evaluate": "run",
    "format_table": "run",
    "resolve_targets": "run",
    "Interval": "stats",
    "bootstrap_mean": "stats",
    "paired_difference": "stats",
    "paired_proportions": "stats",
    "wilson_interval": "stats",
}

__all__ = [
    "JUDGE_PROMPT",
    "JUDGE_PROMPT_VERSION",
    "METRIC_CLASSES",
    "EvalExample",
    "EvalResults",
    "EvalSetConfig",
    "EvaluateConfig",
    "ExampleRecord",
    "Interval",
    "JudgeConfig",
    "Metric",
    "RecordError",
    "Target",
    "bootstrap_mean",
    "evaluate",
    "evaluate_config",
    "format_table",
    "load_evaluate_config",
    "paired_difference",
    "paired_proportions",
    "read_examples",
    "register_metric",
    "resolve_targets",
    "wilson_interval",
]

if TYPE_CHECKING:
    from .config import EvalSetConfig, EvaluateConfig, JudgeConfig, evaluate_config, load_evaluate_config
    from .examples import EvalExample, read_examples
    from .metrics import JUDGE_PROMPT, JUDGE_PROMPT_VERSION, METRIC_CLASSES, Metric, register_metric
    from .records import ExampleRecord, RecordError
    from .run import EvalResults, Target, evaluate, format_table, resolve_targets
    from .stats import Interval, bootstrap_mean, paired_difference, paired_proportions, wilson_interval

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
