"""The influence history on disk: one Parquet file per evaluated step, append-only and crash-safe.

Layout under the training ``output_dir``::

    swift_influence/
        pairs/step-000000050.parquet   one row per (probe example, eval example) at step 50
        metrics.json                   study metric labels -> (probe set, eval set, context)
        superseded/                    steps of an abandoned branch, moved aside on resume (never deleted)
    checkpoint-50/swift_influence/     sidecar: a copy of the history up to step 50

A step file is written to a temporary name and renamed, so an interrupted write never leaves a partial file
in the history. Resuming from ``checkpoint-N`` moves history after N aside and restores history up to N from the
sidecar, so the history continues with no gap and no duplicate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd

STORE_DIR = "swift_influence"
_STEP_FILE = re.compile(r"^step-(\d+)\.parquet$")

PAIR_COLUMNS = [
    "step", "probe_set", "probe_id", "probe_task", "eval_set", "eval_id", "eval_task", "paired",
    "dot", "eval_sq_norm", "relinf", "probe_sq_norm", "cosine", "probe_tokens", "eval_tokens",
    "probe_loss", "eval_loss",
]  # fmt: skip
SCORE_COLUMNS = [
    "step", "probe_set", "eval_set", "s_in", "s_cross", "n_in", "n_cross", "s_in_sem", "s_cross_sem",
    "mean_dot", "mean_probe_tokens", "mean_eval_tokens",
]  # fmt: skip


def store_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / STORE_DIR


def step_path(root: Path, step: int) -> Path:
    return root / "pairs" / f"step-{step:09d}.parquet"


def list_steps(root: Path) -> list[int]:
    """Steps with a complete file under ``root/pairs``."""
    pairs = root / "pairs"
    if not pairs.is_dir():
        return []
    return sorted(int(m.group(1)) for f in pairs.iterdir() if (m := _STEP_FILE.match(f.name)))


class InfluenceStore:
    """Writer for the history of one run (use on the main process only)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.root = store_dir(output_dir)

    def steps(self) -> list[int]:
        return list_steps(self.root)

    def write_step(self, step: int, pairs: pd.DataFrame) -> Path:
        """Atomically write the pairs of ``step``. Raises if the step is already recorded (no duplicates)."""
        path = step_path(self.root, step)
        if path.exists():
            raise FileExistsError(f"Influence history already has step {step} ({path}).")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pairs.to_parquet(tmp, index=False)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def write_metrics(self, metrics: dict[str, dict]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.root / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))

    def snapshot(self, checkpoint_dir: str | os.PathLike, upto: int) -> None:
        """Copy the history up to step ``upto`` into ``checkpoint_dir`` (the resume sidecar)."""
        side = Path(checkpoint_dir) / STORE_DIR
        # A checkpoint folder re-saved after a resume may hold an abandoned branch's sidecar: replace it whole.
        shutil.rmtree(side, ignore_errors=True)
        for step in self.steps():
            if step <= upto:
                step_path(side, step).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(step_path(self.root, step), step_path(side, step))
        if (self.root / "metrics.json").exists():
            shutil.copy2(self.root / "metrics.json", side / "metrics.json")

    def set_aside(self, after: int, label: str) -> list[int]:
        """Move every recorded step ``> after`` to ``superseded/<label>/`` (never deleted). Returns the steps."""
        moved = [s for s in self.steps() if s > after]
        folder, n = self.root / "superseded" / label, 1
        while moved and folder.exists():  # never overwrite history set aside earlier
            n += 1
            folder = self.root / "superseded" / f"{label}-{n}"
        for step in moved:
            dest = folder / step_path(self.root, step).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(step_path(self.root, step), dest)
        return moved

    def resume(self, checkpoint_dir: str | os.PathLike | None, step: int) -> list[int]:
        """Make the history consistent with a run resumed at ``step``.

        Steps after ``step`` belong to the abandoned continuation and are moved to ``superseded/``; steps up to
        ``step`` missing here are restored from the checkpoint's sidecar.

        Returns:
            Steps recorded in the sidecar that could not be restored here (a gap the caller should report).
        """
        self.set_aside(step, f"resumed-at-{step}")
        side = Path(checkpoint_dir) / STORE_DIR if checkpoint_dir else None
        if side is None or not side.is_dir():
            return []
        have = set(self.steps())
        for earlier in list_steps(side):
            if earlier <= step and earlier not in have:
                step_path(self.root, earlier).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(step_path(side, earlier), step_path(self.root, earlier))
        if (side / "metrics.json").exists() and not (self.root / "metrics.json").exists():
            shutil.copy2(side / "metrics.json", self.root / "metrics.json")
        return sorted(set(list_steps(side)) - set(self.steps()))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_pairs(output_dir: str | os.PathLike) -> pd.DataFrame:
    """Every recorded (step, probe example, eval example) row of a run, sorted by step.

    Columns: ``step, probe_set, probe_id, probe_task, eval_set, eval_id, eval_task, paired, dot, eval_sq_norm,
    relinf, probe_sq_norm, cosine, probe_tokens, eval_tokens, probe_loss, eval_loss``.
    """
    root = store_dir(output_dir)
    frames = [pd.read_parquet(step_path(root, s)) for s in list_steps(root)]
    if not frames:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values("step", kind="stable").reset_index(drop=True)


def load_scores(output_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per (step, probe_set, eval_set): s_in, s_cross (eq. 4-5), pair counts and standard errors.

    ``s_in``/``s_cross`` are NaN only where the block has no in-task/cross-task pair (``n_in``/``n_cross`` = 0).
    """
    return scores_from_pairs(load_pairs(output_dir))


def scores_from_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per-block scores from a pairs table (the same arithmetic the callback logs)."""
    import torch  # here, not at import: reading a history needs no torch until scores are computed

    from .influence.scores import block_scores

    rows = []
    for (step, probe_set, eval_set), block in pairs.groupby(["step", "probe_set", "eval_set"], sort=True):
        s = block_scores(torch.tensor(block["relinf"].to_numpy()), torch.tensor(block["paired"].to_numpy()))
        rows.append({
            "step": int(step), "probe_set": probe_set, "eval_set": eval_set,
            "s_in": s.s_in, "s_cross": s.s_cross, "n_in": s.n_in, "n_cross": s.n_cross,
            "s_in_sem": s.s_in_sem, "s_cross_sem": s.s_cross_sem, "mean_dot": float(block["dot"].mean()),
            "mean_probe_tokens": float(block.drop_duplicates("probe_id")["probe_tokens"].mean()),
            "mean_eval_tokens": float(block.drop_duplicates("eval_id")["eval_tokens"].mean()),
        })  # fmt: skip
    frame = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    return frame.astype({"s_in": float, "s_cross": float, "s_in_sem": float, "s_cross_sem": float})


def load_metrics(output_dir: str | os.PathLike) -> pd.DataFrame:
    """Study metrics by step (long format): ``step, metric, study, probe_set, eval_set, context, value``."""
    path = store_dir(output_dir) / "metrics.json"
    specs = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    scores = load_scores(output_dir)
    rows = []
    for label, spec in specs.items():
        block = scores[(scores.probe_set == spec["probe_set"]) & (scores.eval_set == spec["eval_set"])]
        for _, r in block.iterrows():
            rows.append(
                {
                    "step": r.step,
                    "metric": label,
                    "study": spec.get("study"),
                    "probe_set": spec["probe_set"],
                    "eval_set": spec["eval_set"],
                    "context": spec["context"],
                    "value": r[f"s_{spec['context']}"],
                }
            )
    return pd.DataFrame(rows, columns=["step", "metric", "study", "probe_set", "eval_set", "context", "value"])
