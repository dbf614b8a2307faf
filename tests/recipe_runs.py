"""Shared helpers of the recipe and scoring tests: running the training entry point (in-process, or as 2 CPU
processes through ``accelerate launch`` with ``recipes/accelerate_configs/cpu_ddp.yaml``) and comparing histories.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_close_rel

from swift_callbacks.training import load_config, run_training

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
CPU_DDP = RECIPES / "accelerate_configs" / "cpu_ddp.yaml"
LAUNCH_TIMEOUT_S = 300
KEY = ["step", "probe_set", "probe_id", "eval_set", "eval_id"]
EXACT = ["probe_task", "eval_task", "paired", "probe_tokens", "eval_tokens"]
# A short run: influence at step 0 (the recipes ask for it), and at the saves of steps 2 and 4.
SHORT = ["training.max_steps=4", "training.save_steps=2", "training.logging_steps=2"]


def recipe(study: str) -> Path:
    return RECIPES / study / "config_tiny_cpu.yaml"


def overrides(out: Path, *extra: str) -> list[str]:
    return [f"training.output_dir={out}", *SHORT, *extra]


def train_in_process(study: str, out: Path, *extra: str, influence: bool = True):
    """Run a tiny recipe in this process (single rank); returns the trainer."""
    return run_training(load_config(recipe(study), overrides(out, *extra)), influence=influence)


def accelerate_launch(study: str, out: Path, *extra: str) -> str:
    """``accelerate launch --config_file cpu_ddp.yaml -m swift_callbacks.training.train`` on a tiny recipe.

    Returns:
        The combined output of the launcher and both workers.
    """
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # 2 ranks on 2 cores: one thread each, or OpenMP spin-waits stall the run
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(CPU_DDP)]
    cmd += ["-m", "swift_callbacks.training.train", "--config", str(recipe(study))]
    for item in overrides(out, *extra):
        cmd += ["--set", item]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"accelerate launch timed out after {LAUNCH_TIMEOUT_S}s\n{err.stdout}\n{err.stderr}")
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"accelerate launch failed ({proc.returncode})\n{output[-10000:]}")
    return output


def sorted_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEY, kind="stable").reset_index(drop=True)


def assert_same_history(actual: pd.DataFrame, expected: pd.DataFrame, rtol: float) -> None:
    """Same pairs (keys, tasks, pairing, token counts) and numbers equal to ``rtol`` relative error.

    Norms and losses are compared entry by entry. An inner product of two gradients is only as precise as the
    product of their norms (fp32 sums of terms of that size), so a dot product's error is measured relative to
    ``|g_probe| |g_eval|``, RelInf's relative to ``|g_probe| / |g_eval|`` and the cosine's absolutely: a pair of
    nearly orthogonal gradients has a tiny dot product whose own relative error means nothing. (A 2-rank DDP run
    batches examples differently from one process, which moves such entries by ~1e-8 absolute.)
    """
    a, e = sorted_pairs(actual), sorted_pairs(expected)
    assert len(a) == len(e) and len(a) > 0
    assert not a.duplicated(KEY).any()
    pd.testing.assert_frame_equal(a[KEY + EXACT], e[KEY + EXACT], check_dtype=False)
    for column in ("eval_sq_norm", "probe_sq_norm", "probe_loss", "eval_loss"):
        assert_close_rel(a[column].to_numpy(), e[column].to_numpy(), rtol, column)
    p_norm, e_norm = np.sqrt(e["probe_sq_norm"].to_numpy()), np.sqrt(e["eval_sq_norm"].to_numpy())
    scales = {"dot": p_norm * e_norm, "relinf": p_norm / e_norm, "cosine": np.ones(len(e))}
    for column, scale in scales.items():
        err = np.abs(a[column].to_numpy() - e[column].to_numpy()) / scale
        assert err.max() <= rtol, f"{column}: error {err.max():.3g} (relative to the gradient norms) > {rtol}"
