"""``InfluenceCallback``: exact swift-study influence at every checkpoint save of a Trainer / SFTTrainer run."""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
import sys
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .configuration import ConfigError
from .influence import InfluenceEngine, InfluenceResult, block_scores, pairing_mask, relinf
from .influence import distributed as dist_utils
from .influence.arguments import InfluenceArguments
from .influence.engine import Progress, vocab_size
from .influence.modules import find_blocks
from .influence.variants import SCORE_VARIANTS
from .sets import ExampleSet, SetError, SetSource, check_unique_names, load_set, tokenize_set
from .store import HistoryError, InfluenceStore, StepExistsError
from .studies import Metric, Study, merge_studies
from .trainers import last_checkpoint

logger = logging.getLogger(__name__)
NEEDS_MASK = {"prompt_completion"}
_UNSEEN = object()  # train() was not called through the trainer the callback was given


class InfluenceCallback(TrainerCallback):
    """Compute the relative influence (RelInf) of probe sets on evaluation sets at every checkpoint save.

    At each save (and optionally every ``every_n_steps`` steps and at step 0) the callback computes, on the live
    model, ``RelInf(z, z0) = <∇ℓ(z), ∇ℓ(z0)> / |∇ℓ(z0)|²`` for every probe example z and evaluation example z0,
    where ℓ is the summed token cross-entropy over the example's completion tokens, tokenized by the trainer's
    own dataset preparation. It logs s_in / s_cross per (probe set, eval set) under ``swift/``, writes every pair
    to ``output_dir/swift_influence/`` and a resume sidecar into ``checkpoint-N/``. Training is unchanged.

    Example::

        from swift_callbacks import InfluenceCallback, load_scores

        influence = InfluenceCallback(probe_sets={"cot": cot_rows}, eval_sets={"qa": qa_rows})
        trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="out", save_steps=50), train_dataset=train,
                             callbacks=[influence])
        trainer.train()
        load_scores("out")

    ``trainer.add_callback(InfluenceCallback(trainer, ...))`` on a trainer already built works the same.

    Faults. Bad sets and options raise at construction; options that depend on the trainer (the schedule, the
    parameter filter, packing) and the sets' tokenization are checked when the callback is bound to it: at
    construction when it is given the trainer, otherwise when the trainer that receives it is constructed.
    At ``on_train_begin`` the callback takes the history's writer lock (a second training writing the same
    ``output_dir`` is refused; a lock left by a killed run is taken over) and, on resume, restores the history from
    the checkpoint's sidecar; a damaged sidecar or a held lock raises there, before the first step, whatever
    ``strict`` says. During training, with ``strict=False`` (default) these faults are recorded and training goes
    on:

    * an evaluation example whose gradient norm is zero or non-finite (its RelInf is undefined, eq. 3 divides by
      it) or a probe example whose norm is non-finite: the step is stored, the pairs of those examples with
      ``relinf`` (and ``cosine``) NaN, and they are left out of every s_in / s_cross (logged, ``load_scores``,
      report), whose ``n_in`` / ``n_cross`` count only the scored pairs;
    * an ``OSError`` (a full disk, say) or damage found while writing the history or the checkpoint sidecar:
      the step (or sidecar) is missing; a resume from that checkpoint computes a missing step again.

    Each fault is appended to ``swift_influence/failures.jsonl`` (step, kind, set, example ids, reason; read it
    with ``load_failures``; it follows the resumed lineage like the steps), logged as a warning and counted in the
    logged metric ``swift/failed`` (0 at a computation without fault). With ``strict=True`` each of them raises
    instead (``SetError`` for the examples, the ``OSError`` / ``HistoryError`` for the history).

    Args:
        trainer: The trainer (an ``SFTTrainer``, or any ``Trainer`` whose sets are given pre-tokenized), or None
            when the callback is passed to the trainer's constructor (see :meth:`bind`).
        probe_sets: ``{name: set}``; a set is a ``datasets.Dataset``, a list of dicts or a JSONL/JSON/Parquet
            path, in any TRL format, with optional ``id`` and ``task`` fields.
        eval_sets: ``{name: set}`` of evaluation sets, same forms.
        studies: Studies from ``swift_callbacks.studies`` (their sets are added and their metrics logged).
        every_n_steps: Also compute every N optimizer steps (in addition to saves).
        at_step_zero: Also compute before the first training step.
        allow_packing: Accept packing / padding-free training; probe and eval examples are then still scored
            one sequence each, which differs from how packed training sees them.
        metric_prefix: Prefix of logged metric keys.
        strict: Raise on a fault during training (see Faults) instead of recording it and going on.
        influence_args: The engine options as one :class:`~swift_callbacks.influence.arguments.InfluenceArguments`.
        **engine_options: Or the same options as keywords: ``param_filter`` (regex or predicate on parameter
            names), ``route`` (``"auto"``, ``"ghost"``, ``"materialize"``), ``micro_batch_size``,
            ``max_feature_bytes``, ``verify`` (``True``: check the engine against autograd on the live model when
            training starts and whenever the model's modules change, and every micro-batch's gradient sum at every
            computation, raising before anything is stored; ``"once"``, ``"every_save"``, ``False``),
            ``precision`` (``"auto"``: the precision training uses, about 2e-2 relative under bf16 autocast,
            measured; ``"fp32"``: exact to fp32 rounding) and ``score`` (the score variant, ``"exact"``). Unknown
            or invalid options raise ``ConfigError`` here, before training.
    """

    def __init__(
        self,
        trainer: Trainer | None = None,
        probe_sets: Mapping[str, SetSource] | None = None,
        eval_sets: Mapping[str, SetSource] | None = None,
        *,
        studies: Sequence[Study] = (),
        every_n_steps: int | None = None,
        at_step_zero: bool = False,
        allow_packing: bool = False,
        metric_prefix: str = "swift",
        strict: bool = False,
        influence_args: InfluenceArguments | None = None,
        **engine_options: Any,
    ) -> None:
        if trainer is not None and not isinstance(trainer, Trainer):
            raise ConfigError(
                f"InfluenceCallback's first argument is the trainer (or None), got {type(trainer).__name__}: pass "
                "the sets by keyword, InfluenceCallback(probe_sets={...}, eval_sets={...})"
            )
        probe_sets, eval_sets = dict(probe_sets or {}), dict(eval_sets or {})
        check_unique_names(probe_sets, eval_sets)
        probe_sets, eval_sets, metrics = merge_studies(list(studies), probe_sets, eval_sets)
        check_unique_names(probe_sets, eval_sets)
        if not probe_sets or not eval_sets:
            raise SetError("InfluenceCallback needs at least one probe set and one evaluation set.")
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ConfigError(f"every_n_steps must be an integer >= 1 or None, got {every_n_steps!r}")
        for name, flag in (("strict", strict), ("at_step_zero", at_step_zero), ("allow_packing", allow_packing)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name} must be True or False, got {flag!r}")
        if isinstance(influence_args, Mapping):
            influence_args = InfluenceArguments.from_options(influence_args, "influence_args")
        if influence_args is not None and not isinstance(influence_args, InfluenceArguments):
            raise ConfigError(f"influence_args must be an InfluenceArguments or a mapping, got {influence_args!r}")
        if influence_args is not None and engine_options:
            raise ConfigError(f"engine options go in influence_args or as keywords, not both: {sorted(engine_options)}")
        self.influence_args = influence_args or InfluenceArguments.from_options(engine_options)
        self.influence_args.check()
        if at_step_zero and SCORE_VARIANTS[self.influence_args.score].reads_optimizer:
            raise ConfigError(
                f"score variant {self.influence_args.score!r} reads the optimizer's state, which does not exist "
                "before the first step: drop at_step_zero, or use score='exact'"
            )
        self.every_n_steps = every_n_steps
        self.at_step_zero = at_step_zero
        self.allow_packing = allow_packing
        self.metric_prefix = metric_prefix
        self.strict = bool(strict)
        self.metrics: list[Metric] = metrics
        self.probe_sets = [load_set(n, s) for n, s in probe_sets.items()]
        self.eval_sets = [load_set(n, s) for n, s in eval_sets.items()]
        self._masks = {(p.name, e.name): _pairing(p, e) for p in self.probe_sets for e in self.eval_sets}
        _check_some_task_in_common(self.probe_sets, self.eval_sets, self._masks)
        self.trainer: Trainer | None = None
        self._trained = False  # the bound trainer began training: the binding is final
        self.store: InfluenceStore | None = None
        self._engine: InfluenceEngine | None = None
        self._done: set[int] = set()
        self._resumed_from: Any = _UNSEEN
        if trainer is not None:
            self.bind(trainer)

    def bind(self, trainer: Trainer) -> InfluenceCallback:
        """Attach the callback to ``trainer``: check the options against it and tokenize the sets its way.

        Called by the constructor when it is given the trainer, and otherwise by the trainer itself when the
        callback was passed as ``SFTTrainer(..., callbacks=[InfluenceCallback(probe_sets=..., eval_sets=...)])``
        (at the end of the trainer's construction). Call it yourself only when neither applies.

        A callback bound to a trainer that never began training moves to the new one (a notebook cell that builds
        the trainer run again, or a trainer whose constructor raised after binding); once its trainer has trained,
        another trainer is refused.

        Raises:
            ConfigError: The callback's trainer has trained and this is another one, or an option does not fit
                this trainer.
            SetError: A set cannot be prepared by this trainer.
        """
        if self.trainer is trainer:
            return self
        if self.trainer is not None and self._trained:
            raise ConfigError(
                "This InfluenceCallback is already bound to another trainer, which has trained with it; construct one "
                "callback per trainer."
            )
        # Unbound until every check and set below passes for ``trainer``: the sets are tokenized in place, so a
        # failure half-way must not leave the previous trainer bound to sets tokenized this trainer's way (its
        # train() binds it again, tokenizing them afresh).
        self.trainer = self.store = None
        _check_schedule(trainer.args, self.every_n_steps, self.at_step_zero)
        try:  # a param_filter that tracks nothing is found now, not at the first save
            find_blocks(trainer.model, self.influence_args.param_filter)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _check_training_layout(trainer, (*self.probe_sets, *self.eval_sets), self.allow_packing)
        for s in (*self.probe_sets, *self.eval_sets):
            _tokenize(trainer, s)
        self.trainer = trainer
        self.store = InfluenceStore(trainer.args.output_dir)
        self._watch_resume(trainer)
        return self

    # ----------------------------------------------------------------------------------- set-up helpers

    def _watch_resume(self, trainer: Trainer) -> None:
        """Record which checkpoint each ``trainer.train`` call resumes from.

        ``Trainer`` keeps no record of the ``resume_from_checkpoint`` path, and the history must be restored from
        that checkpoint's sidecar: ``output_dir/checkpoint-N`` may be another run's, or absent. The wrapper is a
        method bound to the trainer. (A ``copy.deepcopy`` of a TRL trainer is not supported for tracking: its model
        forward may stay bound to the original modules; the engine refuses it with one clear line.)
        """
        if not getattr(trainer.train, "_swift_watched", False):
            trainer.train = types.MethodType(_watched_train, trainer)

    def prepare_set(self, name: str, source: SetSource) -> ExampleSet:
        """Load ``source`` and tokenize it as this callback's sets are (the bound trainer's own preparation).

        Raises:
            ConfigError: The callback is not bound to a trainer yet.
            SetError: The set is empty, malformed or cannot be prepared (the message names the example).
        """
        if self.trainer is None:
            raise ConfigError("prepare_set needs the callback bound to its trainer (see bind)")
        example_set = load_set(name, source)
        _tokenize(self.trainer, example_set)
        return example_set

    @property
    def engine(self) -> InfluenceEngine:
        # trainer.model is the unwrapped model under DDP/DeepSpeed and the FSDP root under FSDP (transformers makes
        # it the wrapped module before on_train_begin): rebuild when it changes, never hold a stale module.
        if self.trainer is None:
            raise ConfigError("The InfluenceCallback is not bound to a trainer (see bind): it has no model to track.")
        model = self.trainer.model
        if self._engine is None or self._engine.model is not model:
            self._engine = InfluenceEngine(model, pad_token_id=self._pad_token_id(), args=self.influence_args)
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

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Passed in Trainer(callbacks=[...]): bind to the trainer being constructed.
        self._bind_calling_trainer("the trainer's construction")

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Added unbound with trainer.add_callback(InfluenceCallback(probe_sets=...)), or bound to another trainer.
        self._bind_calling_trainer("train()")
        self._check_single_instance()
        self._check_engine()  # before the history is touched or locked: a model it cannot track changes nothing
        self._done = set()  # a later train() on the same trainer (e.g. a resume) starts a new schedule
        step = state.global_step
        error, missing, resumed = None, False, None
        if state.is_world_process_zero:
            try:
                resumed = self._resumed_checkpoint(args, state) if step > 0 else None
                self._start_history(args, state, resumed)
                missing = step > 0 and step not in self.store.steps()
            except (HistoryError, OSError) as err:
                self.store.release_lock()
                error = err
        # Every rank learns rank 0's outcome (a refusal raises everywhere, no rank is left waiting in a collective).
        message, missing = dist_utils.from_rank0((str(error) if error else None, missing))
        if error is not None:
            raise error
        if message is not None:
            raise HistoryError(message)
        self._trained = True  # every check passed and training starts: from now on the binding is final
        if missing:
            # The run stopped between writing checkpoint-N and recording its influence (or the checkpoint was
            # made without the callback). The weights just loaded are those of step N: record it now.
            logger.warning("Influence of the resumed step %d is not recorded; computing it now.", step)
            self._run(state, self._own_checkpoint(args, step, resumed))
        elif self.at_step_zero and step == 0:
            self._run(state)

    def _bind_calling_trainer(self, event: str) -> None:
        """Bind to the trainer running this event; one that is not the bound trainer is refused by ``bind``."""
        trainer = _calling_trainer(self)
        if trainer is not None:
            self.bind(trainer)
        elif self.trainer is None:
            raise ConfigError(
                f"InfluenceCallback was not given its trainer and could not find it during {event}: construct it "
                "as InfluenceCallback(trainer, ...) or call callback.bind(trainer) before training."
            )

    def _check_engine(self) -> None:
        """Fail fast, before training spends any time: build the engine on the model training will use (a model
        it cannot track is refused here) and verify it against autograd on a sample of the sets."""
        engine = self.engine
        if not engine.variant.exact:
            logger.warning("swift influence: scores are approximate (%s), not the exact RelInf; the history "
                           "records the variant with every pair.", engine.variant.label)  # fmt: skip
        if engine.verify:
            examples = [ex for s in (*self.probe_sets, *self.eval_sets) for ex in s.examples]
            report = engine.check(examples)
            logger.info("swift influence: engine verified against autograd in %.1fs.", report.seconds)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._before_save(args, state, control)
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            # Trainer.log fires on_log, which clears control.should_log; keep the trainer's own loss log.
            should_log = control.should_log
            self._run(state)
            control.should_log = should_log

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._before_save(args, state, control)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self._run(state, ckpt if ckpt.is_dir() else None)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            self.store.release_lock()

    def _start_history(self, args: TrainingArguments, state: TrainerState, resumed: Path | None) -> None:
        """Rank 0 at train begin: lock, complete interrupted changes, resume or set an old history aside."""
        step = state.global_step
        self.store.acquire_lock()
        self.store.open_for_writing()
        if step > 0:
            self._resume(args, step, resumed, state.log_history)
        elif self.store.has_history():  # a fresh run in a used output_dir: keep the old history, out of the way
            label = f"previous-run-{time.strftime('%Y%m%d-%H%M%S')}"
            if self.store.set_aside(-1, label) or self.store.has_history():
                logger.warning("Moved an earlier influence history to %s/superseded/%s.", self.store.root, label)
        try:
            self.store.write_metrics({m.label: _metric_spec(m) for m in self.metrics})
        except (OSError, HistoryError) as err:
            self._history_fault(step, "write_metrics", f"could not write metrics.json: {err}", err)

    def _before_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """A checkpoint folder about to be overwritten (a resumed branch saving where an abandoned one did) loses
        its sidecar first: killed between the trainer's save and ours, it must not pair new weights with the
        abandoned branch's history."""
        if not (control.should_save and state.is_world_process_zero):
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        try:
            if self.store.discard_sidecar(ckpt):
                logger.info("Removed the influence sidecar of %s before the checkpoint is saved again.", ckpt)
        except OSError as err:
            self._history_fault(
                state.global_step, "snapshot", f"could not remove the old sidecar of {ckpt}: {err}", err
            )

    def _resumed_checkpoint(self, args: TrainingArguments, state: TrainerState) -> Path | None:
        """The checkpoint folder this run resumed from, checked against the state the trainer loaded.

        Raises:
            HistoryError: It cannot be told which checkpoint was resumed (train() was not called on the trainer
                the callback was given, and ``output_dir/checkpoint-N`` does not hold the loaded state).
        """
        step, resumed = state.global_step, self._resumed_from
        if isinstance(resumed, Path):
            saved = _saved_state(resumed)
            if saved is not None and saved.get("global_step") != step:
                raise HistoryError(
                    f"Resumed from {resumed}, whose trainer_state.json is at step {saved.get('global_step')}, but "
                    f"training starts at step {step}: cannot tell which influence history belongs to this run."
                )
            return resumed
        candidate = Path(args.output_dir) / f"checkpoint-{step}"
        saved = _saved_state(candidate)
        if saved is not None and saved.get("global_step") == step and saved.get("log_history") == state.log_history:
            return candidate
        raise HistoryError(
            f"Training starts at step {step}, but the callback cannot tell which checkpoint it resumed from "
            f"({candidate} does not hold the loaded trainer state). Resume with "
            "trainer.train(resume_from_checkpoint=PATH) on the trainer given to InfluenceCallback."
        )

    def _own_checkpoint(self, args: TrainingArguments, step: int, resumed: Path | None) -> Path | None:
        """The resumed checkpoint when it is this run's ``output_dir/checkpoint-N`` (sidecars are written only
        into this run's checkpoints, never into a folder the run was merely resumed from)."""
        ckpt = Path(args.output_dir) / f"checkpoint-{step}"
        if resumed is None or not ckpt.is_dir() or not resumed.is_dir():
            return None
        inside = ckpt.resolve().parent == Path(args.output_dir).resolve()  # not a link to a folder elsewhere
        return ckpt if inside and ckpt.resolve() == resumed.resolve() else None

    def _resume(
        self, args: TrainingArguments, step: int, resumed: Path | None, log_history: list[dict[str, Any]]
    ) -> None:
        ckpt = resumed
        report = self.store.resume(ckpt if ckpt is not None and ckpt.is_dir() else None, step)
        if report.superseded:
            logger.warning(
                "Resumed at step %d: influence steps %s of another branch moved to %s/%s.", step, report.superseded,
                self.store.root, report.folder,
            )  # fmt: skip
        if report.restored:
            logger.info("Resumed at step %d: influence steps %s restored from %s.", step, report.restored, ckpt)
        if report.dropped:
            logger.warning(
                "Influence history has no record of steps %s before the resumed step %d (their files are gone and "
                "there is no sidecar to restore them from).", report.dropped, step,
            )  # fmt: skip
        if report.sidecar:
            self._warn_changed_sets(step)
        else:
            self._check_lineage(step, ckpt, log_history)

    def _check_lineage(self, step: int, ckpt: Path | None, log_history: list[dict[str, Any]]) -> None:
        """Without a sidecar, keep a live step before ``step`` only if its scores are those the resumed checkpoint's
        own trainer state logged for it (another run's steps, or another branch's, are moved aside); the resumed
        step itself is always computed again from the loaded weights."""
        logged: dict[int, dict[str, float]] = {}
        for entry in log_history:
            values = {k: v for k, v in entry.items() if k.startswith((f"{self.metric_prefix}/s_in/",
                                                                      f"{self.metric_prefix}/s_cross/"))}  # fmt: skip
            if values:
                logged.setdefault(entry.get("step"), {}).update(values)
        live = self.store.steps()
        kept = [s for s in live if s < step and _same_scores(self._recorded_scores(s), logged.get(s))]
        moved = self.store.move_aside([s for s in live if s not in kept and s <= step], f"unverified-at-{step}")
        logger.warning(
            "Resumed at step %d from %s, which has no influence sidecar: steps %s match the scores its trainer state "
            "logged and are kept; %s could not be matched (another run or branch, or never logged) and were moved to "
            "%s/; step %d is computed again.", step, ckpt, kept, moved or "none", self.store.root / "superseded", step,
        )  # fmt: skip

    def _recorded_scores(self, step: int) -> dict[str, float]:
        """The s_in / s_cross the callback logged for a stored step, recomputed from its pairs (same arithmetic)."""
        from .store import scores_from_pairs

        scores, out = scores_from_pairs(self.store.read_step(step)), {}
        for row in scores.itertuples():
            for ctx in ("in", "cross"):
                value = getattr(row, f"s_{ctx}")
                if value is not None and math.isfinite(value):
                    out[f"{self.metric_prefix}/s_{ctx}/{row.probe_set}→{row.eval_set}"] = float(value)
        return out

    def _warn_changed_sets(self, step: int) -> None:
        """A resume whose sets differ from those of the restored steps mixes two set-ups in one history: say so."""
        restored = [s for s in self.store.steps() if s <= step]
        if not restored:
            return
        pairs = self.store.read_step(restored[-1])
        before = {(r.probe_set, r.probe_id) for r in pairs[["probe_set", "probe_id"]].drop_duplicates().itertuples()}
        before |= {(r.eval_set, r.eval_id) for r in pairs[["eval_set", "eval_id"]].drop_duplicates().itertuples()}
        now = {(x.name, i) for x in (*self.probe_sets, *self.eval_sets) for i in x.ids}
        changed = sorted({name for name, _ in before ^ now})
        if changed:
            logger.warning(
                "Resumed at step %d: sets %s differ from those of the restored steps (added, removed or renamed "
                "examples), so the history holds two set-ups; scores of steps <= %d and > %d are not comparable.",
                step, changed, step, step,
            )  # fmt: skip

    def _check_single_instance(self) -> None:
        handler = getattr(self.trainer, "callback_handler", None)
        others = [
            cb for cb in getattr(handler, "callbacks", [])
            if isinstance(cb, InfluenceCallback) and cb is not self and cb.store is not None
            and cb.store.root == self.store.root
        ]  # fmt: skip
        if others:
            raise ValueError(
                "Two InfluenceCallbacks would write the same influence history; register every probe and "
                "evaluation set (and study) in one callback."
            )

    # ----------------------------------------------------------------------------------------- compute

    def _run(self, state: TrainerState, checkpoint: Path | None = None) -> None:
        """Compute, store and log the influence of the current step; snapshot the history into ``checkpoint``."""
        step = state.global_step
        if step in self._done:
            return
        self._done.add(step)
        start = time.perf_counter()
        probes = [ex for s in self.probe_sets for ex in s.examples]
        evals = [ex for s in self.eval_sets for ex in s.examples]
        with _progress_bar(step, self.trainer.args, state) as progress:
            result = self.engine.compute(probes, evals, progress=progress, optimizer=self.trainer.optimizer)
        failures, bad_probe, bad_eval = self._data_failures(step, result)
        pairs, metrics = self._tables(step, result, bad_probe, bad_eval, failures)
        for record in failures:
            self._fault(record)
        if self.strict and failures:
            raise SetError(failures[0]["message"])
        elapsed = time.perf_counter() - start
        failed = len(failures)
        if state.is_world_process_zero:
            failed += self._store_step(step, pairs, checkpoint)
        metrics[f"{self.metric_prefix}/seconds"] = elapsed
        metrics[f"{self.metric_prefix}/failed"] = failed
        Trainer.log(self.trainer, metrics)
        logger.info("swift influence at step %d: %d pairs in %.1fs", step, len(pairs), elapsed)

    def _store_step(self, step: int, pairs: pd.DataFrame, checkpoint: Path | None) -> int:
        """Write the step and the sidecar (rank 0); the number of history faults."""
        faults = 0
        try:
            self.store.write_step(step, pairs)
        except StepExistsError:
            raise
        except (OSError, HistoryError) as err:
            faults += 1
            self._history_fault(step, "write_step", f"could not write step {step} to the history: {err}", err)
        if checkpoint is not None:
            try:
                self.store.snapshot(checkpoint, step)
            except (OSError, HistoryError) as err:
                faults += 1
                with contextlib.suppress(OSError):
                    self.store.discard_sidecar(checkpoint)  # never leave a sidecar of another history state
                self._history_fault(step, "snapshot", f"could not write the sidecar of {checkpoint}: {err}", err)
        return faults

    def _history_fault(self, step: int, kind: str, reason: str, err: BaseException) -> None:
        if self.strict:
            raise err
        self._fault({"step": step, "kind": kind, "side": None, "set": None, "ids": [], "reason": reason,
                     "stored": False, "message": reason})  # fmt: skip

    def _fault(self, record: dict[str, Any]) -> None:
        """Log a fault and append it to the history's failures.jsonl (rank 0)."""
        logger.warning("swift influence at step %d: %s", record["step"], record["message"])
        if not self.trainer.is_world_process_zero():
            return
        try:
            self.store.record_failure({k: v for k, v in record.items() if k != "message"})
        except (OSError, HistoryError) as err:
            logger.error("Could not record that failure in %s either: %s", self.store.root, err)

    def _data_failures(self, step: int, result: InfluenceResult):
        """Failure records of examples whose RelInf is undefined, and the probe / eval masks of those examples."""
        eval_norm, probe_norm = result.eval_sq_norm, result.probe_sq_norm
        bad_eval = ~torch.isfinite(eval_norm) | (eval_norm <= 0)
        bad_probe = ~torch.isfinite(probe_norm)
        failures = []
        for sets, bad, norms, side in ((self.eval_sets, bad_eval, eval_norm, "evaluation"),
                                       (self.probe_sets, bad_probe, probe_norm, "probe")):  # fmt: skip
            offset = 0
            for s in sets:
                idx = [i for i in range(len(s)) if bad[offset + i]]
                if idx:
                    ids = [s.ids[i] for i in idx]
                    zero = [s.ids[i] for i in idx if torch.isfinite(norms[offset + i])]
                    what = "a zero (or non-finite)" if side == "evaluation" else "a non-finite"
                    message = (
                        f"Set {s.name!r}: {side} examples {ids[:10]} have {what} gradient norm on the tracked "
                        "parameters"
                        + (", so RelInf is undefined (eq. 3 divides by it)." if side == "evaluation" else ".")
                    )
                    why = ("zero" if len(zero) == len(ids) else "zero or non-finite") if side == "evaluation" else (
                        "non-finite")  # fmt: skip
                    failures.append({
                        "step": step, "kind": "eval_norm" if side == "evaluation" else "probe_norm", "side": side,
                        "set": s.name, "ids": ids,
                        "reason": f"{why} gradient norm on the tracked parameters; RelInf of these examples' pairs "
                                  "is NaN at this step and left out of s_in / s_cross",
                        "stored": True, "message": message,
                    })  # fmt: skip
                offset += len(s)
        return failures, bad_probe, bad_eval

    def _tables(self, step: int, result: InfluenceResult, bad_probe, bad_eval, failures: list) -> tuple:
        """Pairs table and logged metrics of one step (pairs with an undefined RelInf: NaN, not scored)."""
        rel = torch.full_like(result.dot, float("nan"), dtype=torch.float64)
        ok_e = ~bad_eval
        if bool(ok_e.any()):
            rel[:, ok_e] = relinf(result.dot[:, ok_e], result.eval_sq_norm[ok_e]).to(torch.float64)
        rel[bad_probe, :] = float("nan")
        odd = ~torch.isfinite(rel) & ~bad_probe.unsqueeze(1) & ~bad_eval.unsqueeze(0)
        if bool(odd.any()):
            rel[odd] = float("nan")
            failures.append(self._odd_pairs(step, odd))
        frames, metrics, blocks = [], {}, {}
        p_off = 0
        for p in self.probe_sets:
            e_off = 0
            for e in self.eval_sets:
                sl = (slice(p_off, p_off + len(p)), slice(e_off, e_off + len(e)))
                paired = self._masks[(p.name, e.name)]
                frames.append(_pair_frame(step, p, e, paired, result, rel, sl, p_off, e_off, self.engine.variant.label))
                block = rel[sl]
                valid = torch.isfinite(block)
                scores = block_scores(block[valid], paired[valid])
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

    def _odd_pairs(self, step: int, odd: torch.Tensor) -> dict[str, Any]:
        probe_ids = [(s.name, i) for s in self.probe_sets for i in s.ids]
        eval_ids = [(s.name, i) for s in self.eval_sets for i in s.ids]
        where = [(probe_ids[r], eval_ids[c]) for r, c in torch.nonzero(odd).tolist()]
        message = f"{len(where)} pairs have a non-finite inner product with finite norms, e.g. {where[:5]}."
        return {"step": step, "kind": "nonfinite_pairs", "side": None, "set": None, "ids": [list(w) for w in where],
                "reason": "non-finite inner product; RelInf NaN and left out of s_in / s_cross", "stored": True,
                "message": message}  # fmt: skip


def _pair_frame(step, p: ExampleSet, e: ExampleSet, paired, result: InfluenceResult, rel, sl, p_off, e_off, score):
    n_p, n_e = len(p), len(e)
    pi = torch.arange(n_p).repeat_interleave(n_e)
    ei = torch.arange(n_e).repeat(n_p)
    dot = result.dot[sl].reshape(-1)
    p_norm = result.probe_sq_norm[p_off + pi]
    e_norm = result.eval_sq_norm[e_off + ei]
    rel = rel[sl].reshape(-1)
    cosine = torch.where(torch.isfinite(rel), dot / (p_norm.sqrt() * e_norm.sqrt()), float("nan"))
    return pd.DataFrame({
        "step": step,
        "probe_set": p.name, "probe_id": [p.ids[i] for i in pi], "probe_task": [p.tasks[i] for i in pi],
        "eval_set": e.name, "eval_id": [e.ids[i] for i in ei], "eval_task": [e.tasks[i] for i in ei],
        "paired": paired.reshape(-1).numpy(),
        "dot": dot.numpy(), "eval_sq_norm": e_norm.numpy(), "relinf": rel.numpy(),
        "probe_sq_norm": p_norm.numpy(), "cosine": cosine.numpy(),
        "probe_tokens": result.probe_tokens[p_off + pi].numpy(), "eval_tokens": result.eval_tokens[e_off + ei].numpy(),
        "probe_loss": result.probe_loss[p_off + pi].numpy(), "eval_loss": result.eval_loss[e_off + ei].numpy(),
        "score": score,
    })  # fmt: skip


def _check_training_layout(trainer: Trainer, sets: Sequence[ExampleSet], allow_packing: bool) -> None:
    args = trainer.args
    packed = bool(getattr(args, "packing", False)) or bool(getattr(trainer, "padding_free", False))
    masked = [s.name for s in sets if s.format in NEEDS_MASK]
    if getattr(args, "assistant_only_loss", False):
        masked = [s.name for s in sets]
    if packed and masked and not allow_packing:
        raise SetError(
            f"Training uses packing/padding-free batches, but sets {masked} need per-example completion masks: "
            "the influence would score each example on its own while training sees packed sequences. Disable "
            "packing, or pass allow_packing=True to accept per-example scoring."
        )


def _tokenize(trainer: Trainer, example_set: ExampleSet) -> None:
    """Tokenize ``example_set`` by ``trainer``'s own preparation, token ids checked against its vocabulary."""
    tokenize_set(example_set, _preparer(trainer, example_set.name), vocab_size=vocab_size(trainer.model))


def _preparer(trainer: Trainer, name: str):
    """The trainer's own dataset preparation, without packing or shuffling (row order is kept)."""
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


def _calling_trainer(callback: InfluenceCallback) -> Trainer | None:
    """The trainer whose method is running this callback event, or None.

    Event callbacks receive the model and the arguments, not the trainer; the trainer is the ``self`` of a frame
    a few levels up (``Trainer.__init__`` -> ``CallbackHandler.on_init_end`` -> ``call_event`` -> here). Only a
    trainer that holds this very callback is accepted.
    """
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        handler = getattr(candidate, "callback_handler", None)
        if isinstance(candidate, Trainer) and any(cb is callback for cb in getattr(handler, "callbacks", ())):
            return candidate
        frame = frame.f_back
    return None


@contextlib.contextmanager
def _progress_bar(step: int, args: TrainingArguments, state: TrainerState) -> Iterator[Progress | None]:
    """A progress bar on the main process while influence is computed (training's own bar is still meanwhile),
    shown unless the trainer's ``disable_tqdm`` is set."""
    if args.disable_tqdm or not state.is_world_process_zero:
        yield None
        return
    bar = tqdm(desc=f"swift influence (step {step})", unit="example", leave=False, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        bar.close()


def _check_schedule(args: TrainingArguments, every_n_steps: int | None, at_step_zero: bool) -> None:
    """Influence is computed at checkpoint saves (and at ``every_n_steps`` / step 0): a run that saves nothing
    and has no schedule would record nothing, without a word."""
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    if strategy == "no" and every_n_steps is None and not at_step_zero:
        raise ConfigError(
            "InfluenceCallback computes influence at checkpoint saves, and save_strategy='no' saves none: set "
            "save_strategy/save_steps, or give every_n_steps (or at_step_zero=True)"
        )


def _check_some_task_in_common(probes: Sequence[ExampleSet], evals: Sequence[ExampleSet], masks: Mapping) -> None:
    """With tasks on both sides, at least one probe/eval pair shares a task; otherwise no in-task score (s_in)
    could ever be computed."""
    tasked = all(t is not None for s in (*probes, *evals) for t in s.tasks)
    if tasked and not any(bool(m.any()) for m in masks.values()):
        probe_tasks = sorted({t for s in probes for t in s.tasks})
        eval_tasks = sorted({t for s in evals for t in s.tasks})
        raise SetError(
            f"No probe example shares a task with any evaluation example (probe tasks {probe_tasks[:5]}, evaluation "
            f"tasks {eval_tasks[:5]}), so no in-task influence (s_in) can be computed; check the 'task' fields."
        )


def _watched_train(trainer: Trainer, *args: Any, **kwargs: Any):
    """``Trainer.train`` that first tells the trainer's influence callbacks which checkpoint it resumes from.

    The call goes on exactly as made (a subclass's ``train`` may name its parameters otherwise); the checkpoint is
    read from the argument the class's signature calls ``resume_from_checkpoint``, when it has one.
    """
    train = type(trainer).train
    try:
        bound = inspect.signature(train).bind(trainer, *args, **kwargs)
        known = "resume_from_checkpoint" in bound.signature.parameters
    except TypeError:  # the class's own train will say what is wrong with the call
        bound, known = None, False
    callbacks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, InfluenceCallback)]
    if known:
        resume = bound.arguments.get("resume_from_checkpoint")
        for cb in callbacks:
            cb._resumed_from = _resolve_checkpoint(trainer.args.output_dir, resume)
    try:
        return train(trainer, *args, **kwargs)
    finally:
        for cb in callbacks:
            cb._resumed_from = _UNSEEN


_watched_train._swift_watched = True  # type: ignore[attr-defined]


def _resolve_checkpoint(output_dir: str, resume_from_checkpoint: Any) -> Path | None:
    """The folder ``Trainer.train(resume_from_checkpoint=...)`` loads (``True``: the last one in output_dir)."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        last = last_checkpoint(output_dir)
        return Path(last) if last else None
    return Path(resume_from_checkpoint)


def _same_scores(recorded: dict[str, float], logged: dict[str, float] | None) -> bool:
    if not logged or recorded.keys() != logged.keys():
        return False
    return all(math.isclose(recorded[k], logged[k], rel_tol=1e-9, abs_tol=1e-12) for k in recorded)


def _saved_state(checkpoint: Path) -> dict[str, Any] | None:
    """A checkpoint's trainer_state.json, or None when it has none that can be read."""
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None


def _pairing(probe: ExampleSet, evals: ExampleSet) -> torch.Tensor:
    try:
        return pairing_mask(probe.tasks, evals.tasks)
    except ValueError as err:
        raise SetError(f"Probe set {probe.name!r} / evaluation set {evals.name!r}: {err}") from err


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
