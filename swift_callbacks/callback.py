"""``InfluenceCallback``: exact swift-study influence at every checkpoint save of a Trainer / SFTTrainer run."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .influence import InfluenceEngine, InfluenceResult, block_scores, pairing_mask, relinf
from .influence import distributed as dist_utils
from .influence.modules import ParamFilter
from .sets import ExampleSet, SetError, SetSource, check_unique_names, load_set, tokenize_set
from .store import STORE_DIR, InfluenceStore
from .studies import Metric, Study, merge_studies

logger = logging.getLogger(__name__)
NEEDS_MASK = {"prompt_completion"}


class InfluenceCallback(TrainerCallback):
    """Compute the relative influence (RelInf) of probe sets on evaluation sets at every checkpoint save.

    At each save (and optionally every ``every_n_steps`` steps and at step 0) the callback computes, on the live
    model, ``RelInf(z, z0) = <∇ℓ(z), ∇ℓ(z0)> / |∇ℓ(z0)|²`` for every probe example z and evaluation example z0,
    where ℓ is the summed token cross-entropy over the example's completion tokens, tokenized by the trainer's
    own dataset preparation. It logs s_in / s_cross per (probe set, eval set) under ``swift/``, writes every pair
    to ``output_dir/swift_influence/`` and a resume sidecar into ``checkpoint-N/``. Training is unchanged.

    Example::

        from swift_callbacks import InfluenceCallback, load_scores

        trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="out", save_steps=50), train_dataset=train)
        trainer.add_callback(InfluenceCallback(trainer, probe_sets={"cot": cot_rows}, eval_sets={"qa": qa_rows}))
        trainer.train()
        load_scores("out")

    Args:
        trainer: The trainer (an ``SFTTrainer``, or any ``Trainer`` whose sets are given pre-tokenized).
        probe_sets: ``{name: set}``; a set is a ``datasets.Dataset``, a list of dicts or a JSONL/JSON/Parquet
            path, in any TRL format, with optional ``id`` and ``task`` fields.
        eval_sets: ``{name: set}`` of evaluation sets, same forms.
        studies: Studies from ``swift_callbacks.studies`` (their sets are added and their metrics logged).
        every_n_steps: Also compute every N optimizer steps (in addition to saves).
        at_step_zero: Also compute before the first training step.
        param_filter: Regex or predicate on parameter names restricting the tracked trainable parameters.
        route: ``"auto"``, ``"ghost"`` or ``"materialize"`` (see ``InfluenceEngine``).
        micro_batch_size: Examples per tracking forward/backward.
        max_feature_bytes: Memory budget for stored evaluation features.
        allow_packing: Accept packing / padding-free training; probe and eval examples are then still scored
            one sequence each, which differs from how packed training sees them.
        metric_prefix: Prefix of logged metric keys.
    """

    def __init__(
        self,
        trainer: Trainer,
        probe_sets: Mapping[str, SetSource] | None = None,
        eval_sets: Mapping[str, SetSource] | None = None,
        *,
        studies: Sequence[Study] = (),
        every_n_steps: int | None = None,
        at_step_zero: bool = False,
        param_filter: ParamFilter = None,
        route: str = "auto",
        micro_batch_size: int = 8,
        max_feature_bytes: int = 2 << 30,
        allow_packing: bool = False,
        metric_prefix: str = "swift",
    ) -> None:
        probe_sets, eval_sets = dict(probe_sets or {}), dict(eval_sets or {})
        check_unique_names(probe_sets, eval_sets)
        probe_sets, eval_sets, metrics = merge_studies(list(studies), probe_sets, eval_sets)
        check_unique_names(probe_sets, eval_sets)
        if not probe_sets or not eval_sets:
            raise SetError("InfluenceCallback needs at least one probe set and one evaluation set.")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self.at_step_zero = at_step_zero
        self.metric_prefix = metric_prefix
        self.metrics: list[Metric] = metrics
        self._engine_kwargs = dict(
            param_filter=param_filter, route=route, micro_batch_size=micro_batch_size,
            max_feature_bytes=max_feature_bytes,
        )  # fmt: skip
        self._engine: InfluenceEngine | None = None
        self.probe_sets = [load_set(n, s) for n, s in probe_sets.items()]
        self.eval_sets = [load_set(n, s) for n, s in eval_sets.items()]
        self._check_training_layout(allow_packing)
        vocab = _vocab_size(trainer.model)
        for s in (*self.probe_sets, *self.eval_sets):
            tokenize_set(s, self._preparer(s.name), vocab_size=vocab)
        self._masks = {(p.name, e.name): _pairing(p, e) for p in self.probe_sets for e in self.eval_sets}
        self._done: set[int] = set()
        self.store = InfluenceStore(trainer.args.output_dir)

    # ----------------------------------------------------------------------------------- set-up helpers

    def _check_training_layout(self, allow_packing: bool) -> None:
        args = self.trainer.args
        packed = bool(getattr(args, "packing", False)) or bool(getattr(self.trainer, "padding_free", False))
        masked = [s.name for s in (*self.probe_sets, *self.eval_sets) if s.format in NEEDS_MASK]
        if getattr(args, "assistant_only_loss", False):
            masked = [s.name for s in (*self.probe_sets, *self.eval_sets)]
        if packed and masked and not allow_packing:
            raise SetError(
                f"Training uses packing/padding-free batches, but sets {masked} need per-example completion masks: "
                "the influence would score each example on its own while training sees packed sequences. Disable "
                "packing, or pass allow_packing=True to accept per-example scoring."
            )

    def _preparer(self, name: str):
        """The trainer's own dataset preparation, without packing or shuffling (row order is kept)."""
        trainer = self.trainer
        if not hasattr(trainer, "_prepare_dataset"):
            return _require_tokenized(name)
        args = copy.copy(trainer.args)
        args.shuffle_dataset = False
        args.dataset_num_proc = None

        def prepare(dataset):
            return trainer._prepare_dataset(
                dataset, trainer.processing_class, args, False, getattr(trainer, "_formatting_func", None),
                f"swift:{name}",
            )  # fmt: skip

        return prepare

    @property
    def engine(self) -> InfluenceEngine:
        # trainer.model is the unwrapped model under DDP/DeepSpeed and the FSDP root under FSDP (transformers makes
        # it the wrapped module before on_train_begin): rebuild when it changes, never hold a stale module.
        model = self.trainer.model
        if self._engine is None or self._engine.model is not model:
            self._engine = InfluenceEngine(model, pad_token_id=self._pad_token_id(), **self._engine_kwargs)
        return self._engine

    def _pad_token_id(self) -> int:
        """Any id in the vocabulary works (padding never changes a number); prefer the tokenizer's pad token."""
        tok = getattr(self.trainer, "processing_class", None)
        tok = getattr(tok, "tokenizer", tok)
        config = getattr(self.trainer.model, "config", None)
        for source, attr in ((tok, "pad_token_id"), (tok, "eos_token_id"), (config, "pad_token_id"),
                             (config, "eos_token_id")):  # fmt: skip
            value = getattr(source, attr, None)
            if isinstance(value, int):
                return value
        return 0

    # ------------------------------------------------------------------------------------------ events

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._check_single_instance()
        self._done = set()  # a later train() on the same trainer (e.g. a resume) starts a new schedule
        step = state.global_step
        if state.is_world_process_zero:
            self.store.write_metrics({m.label: _metric_spec(m) for m in self.metrics})
            if step > 0:
                self._resume(args, step)
            elif self.store.steps():  # a fresh run in a used output_dir: keep the old history, out of the way
                label = f"previous-run-{time.strftime('%Y%m%d-%H%M%S')}"
                self.store.set_aside(-1, label)
                logger.warning("Moved an earlier influence history to %s/superseded/%s.", self.store.root, label)
        missing = step > 0 and dist_utils.from_rank0(
            step not in self.store.steps() if state.is_world_process_zero else None
        )
        if missing:
            # The run stopped between writing checkpoint-N and recording its influence (or the checkpoint was
            # made without the callback). The weights just loaded are those of step N: record it now.
            logger.warning("Influence of the resumed step %d is not recorded; computing it now.", step)
        if missing or (self.at_step_zero and step == 0):
            self._run(state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            # Trainer.log fires on_log, which clears control.should_log; keep the trainer's own loss log.
            should_log = control.should_log
            self._run(state)
            control.should_log = should_log

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._run(state)
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                self.store.snapshot(ckpt, state.global_step)

    def _resume(self, args: TrainingArguments, step: int) -> None:
        ckpt = Path(args.output_dir) / f"checkpoint-{step}"
        gap = self.store.resume(ckpt if ckpt.is_dir() else None, step)
        if gap:
            logger.warning("Influence history has no record of steps %s before the resumed step %d.", gap, step)
        if not (ckpt / STORE_DIR).is_dir() and not any(s <= step for s in self.store.steps()):
            logger.warning(
                "Resumed at step %d, but %s has no influence sidecar and the history has no step up to %d: the "
                "history before this step is not restored (was the run resumed from a checkpoint outside "
                "output_dir, or saved without the callback?).", step, ckpt, step,
            )  # fmt: skip

    def _check_single_instance(self) -> None:
        handler = getattr(self.trainer, "callback_handler", None)
        others = [
            cb for cb in getattr(handler, "callbacks", [])
            if isinstance(cb, InfluenceCallback) and cb is not self and cb.store.root == self.store.root
        ]  # fmt: skip
        if others:
            raise ValueError(
                "Two InfluenceCallbacks would write the same influence history; register every probe and "
                "evaluation set (and study) in one callback."
            )

    # ----------------------------------------------------------------------------------------- compute

    def _run(self, state: TrainerState) -> None:
        step = state.global_step
        if step in self._done:
            return
        self._done.add(step)
        start = time.perf_counter()
        probes = [ex for s in self.probe_sets for ex in s.examples]
        evals = [ex for s in self.eval_sets for ex in s.examples]
        result = self.engine.compute(probes, evals)
        pairs, metrics = self._tables(step, result)
        elapsed = time.perf_counter() - start
        metrics[f"{self.metric_prefix}/seconds"] = elapsed
        if state.is_world_process_zero:
            self.store.write_step(step, pairs)
        Trainer.log(self.trainer, metrics)
        logger.info("swift influence at step %d: %d pairs in %.1fs", step, len(pairs), elapsed)

    def _tables(self, step: int, result: InfluenceResult) -> tuple[pd.DataFrame, dict[str, float]]:
        """Pairs table and logged metrics of one step."""
        self._check_norms(result)
        rel = relinf(result.dot, result.eval_sq_norm)
        frames, metrics, blocks = [], {}, {}
        p_off = 0
        for p in self.probe_sets:
            e_off = 0
            for e in self.eval_sets:
                sl = (slice(p_off, p_off + len(p)), slice(e_off, e_off + len(e)))
                paired = self._masks[(p.name, e.name)]
                frames.append(_pair_frame(step, p, e, paired, result, rel, sl, p_off, e_off))
                scores = block_scores(rel[sl], paired)
                blocks[(p.name, e.name)] = scores
                for ctx in ("in", "cross"):
                    value = getattr(scores, f"s_{ctx}")
                    if value is not None:
                        metrics[f"{self.metric_prefix}/s_{ctx}/{p.name}→{e.name}"] = value
                e_off += len(e)
            p_off += len(p)
        for m in self.metrics:
            value = getattr(blocks[(m.probe_set, m.eval_set)], f"s_{m.context}")
            if value is not None:
                metrics[f"{self.metric_prefix}/{m.label}"] = value
        return pd.concat(frames, ignore_index=True), metrics

    def _check_norms(self, result: InfluenceResult) -> None:
        """Eval norms must be positive (eq. 3 divides by them); every norm must be finite."""
        for sets, norms, side in ((self.eval_sets, result.eval_sq_norm, "evaluation"),
                                  (self.probe_sets, result.probe_sq_norm, "probe")):  # fmt: skip
            offset = 0
            for s in sets:
                part = norms[offset : offset + len(s)]
                bad = [
                    s.ids[i]
                    for i in range(len(s))
                    if not torch.isfinite(part[i]) or (side == "evaluation" and part[i] <= 0)
                ]
                if bad:
                    reason = "a zero (or non-finite)" if side == "evaluation" else "a non-finite"
                    raise SetError(
                        f"Set {s.name!r}: {side} examples {bad[:10]} have {reason} gradient norm on the tracked "
                        "parameters"
                        + (", so RelInf is undefined (eq. 3 divides by it)." if side == "evaluation" else ".")
                    )
                offset += len(s)


def _pair_frame(step, p: ExampleSet, e: ExampleSet, paired, result: InfluenceResult, rel, sl, p_off, e_off):
    n_p, n_e = len(p), len(e)
    pi = torch.arange(n_p).repeat_interleave(n_e)
    ei = torch.arange(n_e).repeat(n_p)
    dot = result.dot[sl].reshape(-1)
    p_norm = result.probe_sq_norm[p_off + pi]
    e_norm = result.eval_sq_norm[e_off + ei]
    return pd.DataFrame({
        "step": step,
        "probe_set": p.name, "probe_id": [p.ids[i] for i in pi], "probe_task": [p.tasks[i] for i in pi],
        "eval_set": e.name, "eval_id": [e.ids[i] for i in ei], "eval_task": [e.tasks[i] for i in ei],
        "paired": paired.reshape(-1).numpy(),
        "dot": dot.numpy(), "eval_sq_norm": e_norm.numpy(), "relinf": rel[sl].reshape(-1).numpy(),
        "probe_sq_norm": p_norm.numpy(), "cosine": (dot / (p_norm.sqrt() * e_norm.sqrt())).numpy(),
        "probe_tokens": result.probe_tokens[p_off + pi].numpy(), "eval_tokens": result.eval_tokens[e_off + ei].numpy(),
        "probe_loss": result.probe_loss[p_off + pi].numpy(), "eval_loss": result.eval_loss[e_off + ei].numpy(),
    })  # fmt: skip


def _pairing(probe: ExampleSet, evals: ExampleSet) -> torch.Tensor:
    try:
        return pairing_mask(probe.tasks, evals.tasks)
    except ValueError as err:
        raise SetError(f"Probe set {probe.name!r} / evaluation set {evals.name!r}: {err}") from err


def _vocab_size(model) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, TypeError):
        return None


def _metric_spec(m: Metric) -> dict[str, Any]:
    return {"study": m.study, "probe_set": m.probe_set, "eval_set": m.eval_set, "context": m.context}


def _require_tokenized(name: str):
    def prepare(dataset):
        if "input_ids" not in dataset.column_names:
            raise SetError(
                f"Set {name!r}: this trainer has no TRL dataset preparation; give the set pre-tokenized "
                "('input_ids' and optionally 'labels')."
            )
        return dataset

    return prepare
