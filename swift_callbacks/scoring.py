"""Post-hoc scoring: the influence history of an existing run, computed over its saved ``checkpoint-N`` folders.

This is the paper's original workflow (train first, score the checkpoints afterwards) and the way to score a run
trained without ``InfluenceCallback``, or to add sets to a finished run. The numbers are those the callback would
have logged inline at each save: the sets are tokenized by the same ``InfluenceCallback`` on an ``SFTTrainer``
built from the same training config (never trained), the checkpoint weights are those the live model had at the
save, and the history is written in the same store (``swift_influence/pairs/step-N.parquet``; ``load_pairs``,
``load_scores`` and ``swift-study report`` read it). Steps already in the history are skipped, so an interrupted
scoring run continues where it stopped and a run scored inline is left alone.

    swift-study score --run runs/cot-paper                       # config: runs/cot-paper/swift_train_config.yaml
    swift-study score --run OUTPUT_DIR --config recipes/cot/config_paper.yaml

Checkpoints with a LoRA adapter (``adapter_config.json``) are loaded as the config's base model plus
``PeftModel.from_pretrained(..., is_trainable=True)``; others as full weights with ``AutoModelForCausalLM``. Each
later checkpoint's weights are copied into the same model, so the base model is loaded once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from .configuration import ConfigError, add_override_argument
from .errors import run_command
from .files import write_atomic
from .training.config import TrainConfig, load_config

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_CONFIG = "adapter_config.json"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-N`` folder of a run, by step."""
    run = Path(run_dir)
    found = [(int(m.group(1)), p) for p in run.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def score_run(
    run_dir: str | os.PathLike,
    config: TrainConfig | str | os.PathLike | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    steps: Iterable[int] | None = None,
) -> list[int]:
    """Compute the influence history of ``run_dir``'s checkpoints that the history does not have yet.

    Args:
        run_dir: The training ``output_dir`` holding ``checkpoint-N`` folders.
        config: The training config (object or YAML path) whose ``model``, ``training`` (tokenization fields such
            as ``max_length``), ``data`` (the training data's format decides TRL's completion-only loss) and
            ``influence`` sections apply. Default: ``run_dir/swift_train_config.yaml``, written by
            ``swift-study train``.
        output_dir: Where the history goes (default ``run_dir``). When it is ``run_dir``, each scored checkpoint
            also gets the history sidecar the callback writes, so training can later resume from it with the
            callback and no gap.
        steps: Score only these checkpoint steps.

    Returns:
        The steps scored by this call (checkpoints already in the history are skipped).

    Raises:
        ConfigError: No config, or a config without an ``influence`` section.
        FileNotFoundError: ``run_dir`` has no checkpoint (of the requested steps).
        ValueError: Checkpoints of one run with different adapter configurations.
    """
    from .store import InfluenceStore

    run = Path(run_dir)
    config = _resolve_config(run, config)
    if config.influence is None:
        raise ConfigError("influence: the config has no influence section, so there is nothing to score")
    out = Path(output_dir) if output_dir is not None else run
    checkpoints = _select_checkpoints(run, steps)
    # Every rank lists the history before any rank can write to it (writing waits for all ranks' share of the
    # first computation), so under a multi-process launch all ranks agree on the pending steps.
    done = set(InfluenceStore(out).steps())
    _refuse_stale_history(out, [(s, p) for s, p in checkpoints if s in done])
    pending = [(s, p) for s, p in checkpoints if s not in done]
    skipped = [s for s, _ in checkpoints if s in done]
    if skipped:
        logger.info("Skipping steps already in the history of %s: %s", out, skipped)
    if not pending:
        return []
    trainer, callback = _scoring_trainer(config, pending[0][1], out)
    _write_metric_specs(callback)
    scored = []
    for index, (step, checkpoint) in enumerate(pending):
        if index:
            _load_weights(trainer.model, checkpoint, pending[0][1], config)
        start = time.perf_counter()
        _score_step(trainer, callback, step)
        logger.info("Scored %s (step %d) in %.1fs", checkpoint.name, step, time.perf_counter() - start)
        scored.append(step)
    return scored


def _refuse_stale_history(out: Path, recorded: list[tuple[int, Path]]) -> None:
    """A history step is written after its checkpoint (at the save, or by scoring it); a checkpoint newer than its
    history step was written by another training run into the same folder, so the history is not of these weights.
    """
    from .store import step_path, store_dir

    for step, checkpoint in recorded:
        history = step_path(store_dir(out), step)
        weights = _weight_files(checkpoint)
        if history.exists() and weights and max(f.stat().st_mtime for f in weights) > history.stat().st_mtime + 1:
            raise ConfigError(
                f"{checkpoint} is newer than the influence history's step {step} in {store_dir(out)}: the folder was "
                "trained again, so that history is not of these weights. Move the history away (or score into "
                "another --output-dir) and score again. (A run folder copied without its file times, as by "
                "`cp -r`, looks the same: copy it with `cp -a`.)"
            )


def _weight_files(checkpoint: Path) -> list[Path]:
    """The files holding a checkpoint's model or adapter weights (not the optimizer, scheduler or RNG state)."""
    prefixes = ("model", "adapter_model", "pytorch_model")
    return sorted(f for f in checkpoint.iterdir() if f.is_file() and f.name.startswith(prefixes))


def _checkpoint_digest(checkpoint: Path) -> str:
    """SHA-256 over a checkpoint's weight files (names and contents)."""
    import hashlib

    h = hashlib.sha256()
    for f in _weight_files(checkpoint):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _select_checkpoints(run: Path, steps: Iterable[int] | None) -> list[tuple[int, Path]]:
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a folder (give the training output_dir with checkpoint-N folders).")
    checkpoints = list_checkpoints(run)
    if steps is not None:
        wanted = set(steps)
        checkpoints = [(s, p) for s, p in checkpoints if s in wanted]
    if not checkpoints:
        raise FileNotFoundError(f"{run} has no checkpoint-N folder{' of the requested steps' if steps else ''}.")
    return checkpoints


def _resolve_config(run: Path, config: TrainConfig | str | os.PathLike | None) -> TrainConfig:
    if not run.is_dir():
        raise ConfigError(f"--run {run}: no such folder (give the training output_dir holding checkpoint-N folders)")
    if isinstance(config, TrainConfig):
        return config
    if config is None:
        from .training.train import CONFIG_FILE

        config = run / CONFIG_FILE
        if not config.exists():
            raise ConfigError(
                f"{run} has no {CONFIG_FILE} (it is written by swift-study train); pass the training config with "
                "--config"
            )
    return load_config(config)


def _scoring_trainer(config: TrainConfig, first_checkpoint: Path, out: Path):
    """An ``SFTTrainer`` on the first checkpoint's model, configured like training, and its callback."""
    from .models import load_model, load_tokenizer
    from .trainers import make_trainer
    from .training.data import build_mixture
    from .training.tracking import build_callback
    from .training.train import sft_config

    # Only the tokenization-relevant settings matter here. Logging backends, evaluation and Hub pushes are off:
    # this trainer never trains, and nothing but the history may be written.
    args = sft_config(
        config.training, output_dir=str(out), report_to=[], eval_strategy="no", load_best_model_at_end=False,
        push_to_hub=False,
    )  # fmt: skip
    tokenizer = load_tokenizer(config.model)
    if (first_checkpoint / ADAPTER_CONFIG).exists():
        from peft import PeftModel

        base = load_model(config.model, tokenizer)
        model = PeftModel.from_pretrained(base, str(first_checkpoint), is_trainable=True)
    else:
        model = load_model(config.model, tokenizer, name_or_path=str(first_checkpoint))
    # SFTTrainer decides completion-only loss from the first training example's format, and the sets are tokenized
    # with that decision: one row of the real training mixture reproduces it without preparing the whole set.
    with args.main_process_first(desc="loading the training data"):
        sample = build_mixture(config.data.train, config.data.seed, config.data.shuffle).select([0])
    trainer = make_trainer("sft", model, tokenizer, args, sample)
    return trainer, build_callback(trainer, config.influence)


def _load_weights(model, checkpoint: Path, first_checkpoint: Path, config: TrainConfig) -> None:
    """Copy ``checkpoint``'s weights into ``model`` in place (the callback's engine keeps hooks on its modules)."""
    if (first_checkpoint / ADAPTER_CONFIG).exists():
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        if not (checkpoint / ADAPTER_CONFIG).exists():
            raise ValueError(f"{checkpoint} has no LoRA adapter, but {first_checkpoint.name} of the same run has one.")
        if _adapter_settings(checkpoint) != _adapter_settings(first_checkpoint):
            raise ValueError(f"{checkpoint} has a different adapter configuration than {first_checkpoint.name}.")
        result = set_peft_model_state_dict(model, load_peft_weights(str(checkpoint), device="cpu"))
        if result.unexpected_keys:
            raise ValueError(f"{checkpoint}: adapter weights {result.unexpected_keys[:5]} do not fit the model.")
        return
    from .models import load_model

    fresh = load_model(config.model, None, name_or_path=str(checkpoint))
    model.load_state_dict(fresh.state_dict())
    del fresh


def _adapter_settings(checkpoint: Path) -> dict:
    settings = json.loads((checkpoint / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    # Where the base model came from may be recorded differently by different saves; the adapter's shape may not.
    for key in ("base_model_name_or_path", "revision", "inference_mode"):
        settings.pop(key, None)
    return settings


def _score_step(trainer, callback, step: int) -> None:
    """What the callback does at a save of ``step``: compute, log, write the step and the checkpoint sidecar."""
    from transformers import TrainerControl, TrainerState

    trainer.state.global_step = step  # the logged record carries the checkpoint's step
    state = TrainerState(
        global_step=step,
        is_local_process_zero=trainer.is_local_process_zero(),
        is_world_process_zero=trainer.is_world_process_zero(),
    )
    callback.on_save(trainer.args, state, TrainerControl())


def _write_metric_specs(callback) -> None:
    """Record the study metric names in the history (kept from an earlier config when labels differ)."""
    if not callback.metrics or not callback.trainer.is_world_process_zero():
        return
    path = callback.store.root / "metrics.json"
    specs = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    for m in callback.metrics:
        specs[m.label] = {"study": m.study, "probe_set": m.probe_set, "eval_set": m.eval_set, "context": m.context}
    callback.store.write_metrics(specs)


# ----------------------------------------------------------------------------------------- candidate scoring

CANDIDATES_DIR = "swift_candidates"
CANDIDATE_COLUMNS = ["step", "candidate_id", "candidate_task", "eval_set", "mean_relinf", "mean_cosine", "n_scored",
                     "candidate_tokens", "candidate_sq_norm"]  # fmt: skip
RANKING_COLUMNS = ["rank", "candidate_id", "candidate_task", "mean_relinf", "mean_cosine", "n_scores"]
_META = "meta.json"
_CHUNK = re.compile(r"^chunk-(\d+)\.parquet$")


def score_candidates(
    run_dir: str | os.PathLike,
    candidates: str | os.PathLike | Sequence[dict],
    config: TrainConfig | str | os.PathLike | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    steps: Iterable[int] | None = None,
    chunk_size: int = 1024,
    progress: bool = True,
):
    """Rank every example of a candidate training set by its mean RelInf (and cosine) on the run's evaluation sets.

    For each checkpoint and each evaluation set of the config's ``influence`` section, a candidate's score is its
    RelInf averaged over the set's examples (``<∇ℓ(z), ∇ℓ(z0)> / |∇ℓ(z0)|²``, evaluation examples whose gradient
    norm is zero left out), computed by the same engine and options as the history (``--set
    influence.engine.score=projection`` for the approximate variant). The ranking averages over checkpoints and
    evaluation sets. Candidates are processed in chunks of ``chunk_size``; each finished chunk is written at once
    (``OUT/step-N/chunk-K.parquet``), so an interrupted run continues where it stopped.

    Args:
        run_dir: The training ``output_dir`` holding ``checkpoint-N`` folders.
        candidates: The candidate set: a JSONL/JSON/Parquet path or rows, in any TRL format (optional ``id``,
            ``task``); tokenized as training tokenizes.
        config: The training config (see :func:`score_run`).
        output_dir: Where the scores go (default ``run_dir/swift_candidates``); it must not hold the scores of
            another candidate set, other evaluation sets or other engine options.
        steps: Score only these checkpoint steps.
        chunk_size: Candidates per written chunk.
        progress: Show a progress bar per checkpoint.

    Returns:
        The ranking (``RANKING_COLUMNS``, best first), also written to ``OUT/ranking.csv``; every per-checkpoint
        score is in ``OUT/scores.parquet`` (``CANDIDATE_COLUMNS``).

    Raises:
        ConfigError: No config or influence section, a bad chunk size, or ``output_dir`` holding another set-up.
        FileNotFoundError: ``run_dir`` has no checkpoint (of the requested steps).
        SetError: The candidate set is empty or malformed (the message names the example).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    run = Path(run_dir)
    config = _resolve_config(run, config)
    if config.influence is None:
        raise ConfigError("influence: the config has no influence section, so there are no evaluation sets")
    out = Path(output_dir) if output_dir is not None else run / CANDIDATES_DIR
    checkpoints = _select_checkpoints(run, steps)
    trainer, callback = _scoring_trainer(config, checkpoints[0][1], out)
    cands = callback.prepare_set("candidates", candidates)
    evals = [ex for s in callback.eval_sets for ex in s.examples]
    _claim_output(out, {**_candidate_meta(cands, callback, chunk_size), "model": repr(config.model)})
    n_chunks = -(-len(cands) // chunk_size)
    for index, (step, checkpoint) in enumerate(checkpoints):
        folder = out / f"step-{step}"
        _claim_step(folder, checkpoint)
        done = _chunks_done(folder)
        todo = [k for k in range(n_chunks) if k not in done]
        if not todo:
            continue
        if index:
            _load_weights(trainer.model, checkpoint, checkpoints[0][1], config)
        finished = sum(len(cands.examples[k * chunk_size : (k + 1) * chunk_size]) for k in done)
        bar = tqdm(total=len(cands), initial=finished, desc=f"candidates at step {step}", unit="example",
                   disable=not progress, dynamic_ncols=True)  # fmt: skip
        with bar:
            for k in todo:
                start = k * chunk_size
                chunk = cands.examples[start : start + chunk_size]
                result = callback.engine.compute(chunk, evals)
                frame = _candidate_frame(step, cands, start, result, callback.eval_sets)
                write_atomic(folder / f"chunk-{k:06d}.parquet", frame.to_parquet(index=False))
                bar.update(len(chunk))
    steps_wanted = [s for s, _ in checkpoints]
    scores = pd.concat([pd.read_parquet(folder / f"chunk-{k:06d}.parquet") for s in steps_wanted
                        for folder in [out / f"step-{s}"] for k in range(n_chunks)], ignore_index=True)  # fmt: skip
    ranking = rank_candidates(scores)
    unscored = ranking[ranking["n_scores"] == 0]["candidate_id"].tolist()
    if unscored:  # kept, last in the ranking with NaN scores; said, not silent
        logger.warning(
            "%d candidates have no score (a non-finite gradient, or every evaluation gradient zero): %s%s",
            len(unscored), unscored[:5], " ..." if len(unscored) > 5 else "",
        )  # fmt: skip
    write_atomic(out / "scores.parquet", scores.to_parquet(index=False))
    write_atomic(out / "ranking.csv", ranking.to_csv(index=False))
    return ranking


def rank_candidates(scores):
    """The ranking of a candidate score table: mean RelInf and cosine over checkpoints and evaluation sets."""
    grouped = scores.groupby(["candidate_id"], sort=False)
    ranking = grouped.agg(
        candidate_task=("candidate_task", "first"),
        mean_relinf=("mean_relinf", "mean"),
        mean_cosine=("mean_cosine", "mean"),
        n_scores=("mean_relinf", "count"),
    ).reset_index()
    ranking = ranking.sort_values("mean_relinf", ascending=False, kind="stable", na_position="last")
    ranking.insert(0, "rank", range(1, len(ranking) + 1))
    return ranking[RANKING_COLUMNS].reset_index(drop=True)


def _candidate_frame(step: int, cands, offset: int, result, eval_sets):
    """One row per (candidate of the chunk, evaluation set): its mean RelInf and cosine over the set."""
    import numpy as np
    import pandas as pd
    import torch

    dot, e_norm, p_norm = result.dot, result.eval_sq_norm, result.probe_sq_norm
    usable = torch.isfinite(e_norm) & (e_norm > 0)
    rel = torch.where(usable, dot / e_norm, torch.nan)
    cos = torch.where(usable, dot / (p_norm.sqrt().unsqueeze(1) * e_norm.sqrt()), torch.nan)
    rows, col = [], 0
    n = len(dot)
    for s in eval_sets:
        part = slice(col, col + len(s))
        col += len(s)
        r, c = rel[:, part].numpy(), cos[:, part].numpy()
        counts = np.isfinite(r).sum(1)
        with np.errstate(invalid="ignore"):
            mean_r = np.where(counts > 0, np.nansum(r, 1) / np.maximum(counts, 1), np.nan)
            mean_c = np.where(counts > 0, np.nansum(c, 1) / np.maximum(counts, 1), np.nan)
        rows.append(pd.DataFrame({
            "step": step, "candidate_id": cands.ids[offset : offset + n], "candidate_task":
            cands.tasks[offset : offset + n], "eval_set": s.name, "mean_relinf": mean_r, "mean_cosine": mean_c,
            "n_scored": counts, "candidate_tokens": result.probe_tokens.numpy(),
            "candidate_sq_norm": p_norm.numpy(),
        }))  # fmt: skip
    return pd.concat(rows, ignore_index=True)[CANDIDATE_COLUMNS]


def _candidate_meta(cands, callback, chunk_size: int) -> dict:
    """What the scores in an output folder depend on: the tokenized candidates and evaluation examples (by
    content), the engine options and the chunking."""
    import hashlib

    def digest(sets) -> str:
        h = hashlib.sha256()
        for s in sets:
            h.update(json.dumps([s.name, s.ids, s.tasks, s.examples], sort_keys=True).encode())
        return h.hexdigest()

    args = callback.influence_args
    return {"candidates": digest([cands]), "n_candidates": len(cands), "eval_sets": digest(callback.eval_sets),
            "eval_set_names": [s.name for s in callback.eval_sets], "score": callback.engine.variant.label,
            "param_filter": str(args.param_filter), "precision": args.precision, "chunk_size": chunk_size}  # fmt: skip


def _claim_output(out: Path, meta: dict) -> None:
    """Write ``meta`` into a new output folder, or check that an existing one was made with the same set-up."""
    path = out / _META
    if path.exists():
        try:
            held = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path} is unreadable ({err}); delete {out} or choose another --output-dir") from None
        changed = sorted(k for k in meta if held.get(k) != meta[k])
        if changed:
            raise ConfigError(
                f"{out} holds candidate scores of another set-up (it differs in {', '.join(changed)}); delete it or "
                "choose another --output-dir"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no {_META}; choose another --output-dir")
    write_atomic(path, json.dumps(meta, indent=1))


def _claim_step(folder: Path, checkpoint: Path) -> None:
    """Record which weights a step folder's scores come from, or check that its scores come from these weights
    (a run trained again into the same folder, or another run's output reused, has other weights)."""
    digest = _checkpoint_digest(checkpoint)
    path = folder / "checkpoint.json"
    if path.exists():
        try:
            held = json.loads(path.read_text(encoding="utf-8")).get("weights")
        except (OSError, ValueError, AttributeError):
            held = None
        if held != digest:
            raise ConfigError(
                f"{folder} holds scores of other weights than {checkpoint} (trained again, or another run's "
                "output); delete it or choose another --output-dir"
            )
        return
    if _chunks_done(folder):
        raise ConfigError(f"{folder} holds scores of unknown weights (no checkpoint.json); delete it or choose "
                          "another --output-dir")  # fmt: skip
    write_atomic(path, json.dumps({"checkpoint": str(checkpoint), "weights": digest}, indent=1))


def _chunks_done(folder: Path) -> set[int]:
    """Chunks written completely (readable Parquet); an unreadable one is computed again."""
    import pyarrow.parquet as pq

    if not folder.is_dir():
        return set()
    done = set()
    for p in folder.iterdir():
        if m := _CHUNK.match(p.name):
            try:
                pq.read_metadata(p)
            except Exception:  # truncated or corrupt: not done
                logger.warning("%s is unreadable; computing that chunk again.", p)
                continue
            done.add(int(m.group(1)))
    return done


# --------------------------------------------------------------------------------------------- command line


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="the training output_dir with checkpoint-N folders")
    parser.add_argument(
        "--config", default=None,
        help="training config YAML (default: RUN/swift_train_config.yaml, written by swift-study train)",
    )  # fmt: skip
    add_override_argument(parser, "influence.engine.micro_batch_size=4")
    parser.add_argument("--output-dir", default=None, help="write the history here instead of into RUN")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="score only these checkpoint steps")
    parser.add_argument(
        "--candidates", default=None, metavar="FILE",
        help="rank every example of this candidate training set (JSONL/JSON/Parquet, any TRL format) by its mean "
             "RelInf on the config's evaluation sets, instead of writing the history",
    )  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=1024, help="candidates per written (resumable) chunk")


def add_score_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``score`` to a ``swift-study`` subparsers object; returns the new parser."""
    parser = subparsers.add_parser(
        "score", help="compute the influence history over the saved checkpoints of an existing run (post hoc)"
    )
    add_score_arguments(parser)
    parser.set_defaults(func=score_command)
    return parser


def score_command(args: argparse.Namespace) -> int:
    """Run ``score`` from parsed arguments (errors are reported by ``errors.run_command``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = None
    if args.config is not None or args.overrides:
        from .training.train import CONFIG_FILE

        config = load_config(args.config or Path(args.run) / CONFIG_FILE, args.overrides)
    if args.candidates is not None:
        out = Path(args.output_dir) if args.output_dir else Path(args.run) / CANDIDATES_DIR
        ranking = score_candidates(args.run, args.candidates, config, output_dir=out, steps=args.steps,
                                   chunk_size=args.chunk_size)  # fmt: skip
        print(ranking.head(10).to_string(index=False))
        print(f"ranked {len(ranking)} candidates: {out / 'ranking.csv'} (per checkpoint: {out / 'scores.parquet'})")
        return 0
    scored = score_run(args.run, config, output_dir=args.output_dir, steps=args.steps)
    print(f"scored steps {scored}" if scored else "nothing to score: every checkpoint is already in the history")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swift_callbacks.scoring",
        description="Compute the influence history over the saved checkpoints of an existing run.",
    )
    add_score_arguments(parser)
    return run_command("swift_callbacks.scoring", score_command, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
