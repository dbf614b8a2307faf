"""The paper's three swift studies as ready-made registrations with the metric names of its Figures 1-3.

Each helper takes the example sets the paper builds (in any form ``InfluenceCallback`` accepts) and returns a
``Study``: the probe and evaluation sets to register and the named metrics to log. Example::

    study = cot_study(z=qa_rows, z_similar=similar_rows, z_cot=cot_rows)
    trainer.add_callback(InfluenceCallback(trainer, studies=[study]))
    # logs swift/CoT → In-task non-CoT, swift/non-CoT → Cross-task non-CoT, ...

Examples of the sets are paired by their ``task`` field, or by position when they have none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Context = Literal["in", "cross"]


@dataclass(frozen=True)
class StudyType:
    """A registered study: its builder (whose argument names are the sets a recipe gives) and the probe set that is
    its plain-QA baseline (what reports compare each strategy probe set against)."""

    build: Callable[..., Study]
    baseline: str


STUDIES: dict[str, StudyType] = {}
"""``{name: StudyType}``: the studies recipes (``influence.studies[].type``) and reports know by name."""


def register_study(name: str, baseline: str) -> Callable[[Callable[..., Study]], Callable[..., Study]]:
    """Decorator registering a study builder under ``name`` with its baseline probe set."""

    def register(build: Callable[..., Study]) -> Callable[..., Study]:
        STUDIES[name] = StudyType(build, baseline)
        return build

    return register


@dataclass(frozen=True)
class Metric:
    """One curve of a study: s_in or s_cross of a probe set on an evaluation set."""

    label: str
    probe_set: str
    eval_set: str
    context: Context
    study: str


@dataclass
class Study:
    """Probe sets, evaluation sets and the named metrics of one study."""

    name: str
    probe_sets: dict[str, Any]
    eval_sets: dict[str, Any]
    metrics: list[Metric] = field(default_factory=list)


def _metrics(study: str, probes: dict[str, str], evals: dict[str, str]) -> list[Metric]:
    """All in-task and cross-task metrics for ``{probe label: set}`` x ``{eval label: set}``."""
    out = []
    for context, word in (("in", "In-task"), ("cross", "Cross-task")):
        for p_label, p_set in probes.items():
            for e_label, e_set in evals.items():
                out.append(Metric(f"{p_label} → {word} {e_label}", p_set, e_set, context, study))
    return out


@register_study("cot", baseline="noncot")
def cot_study(z: Any, z_similar: Any, z_cot: Any) -> Study:
    """Can CoT training data improve generalization on non-CoT queries? (paper section 4.1, Figure 1)

    Args:
        z: Z, non-CoT reference examples from distinct tasks (the baseline probes).
        z_similar: Z', an analogous non-CoT example for each example of Z (the evaluation set).
        z_cot: Z'', the CoT version of each example of Z (the strategy probes).
    """
    probes = {"CoT": "cot", "non-CoT": "noncot"}
    return Study(
        "cot",
        probe_sets={"cot": z_cot, "noncot": z},
        eval_sets={"noncot_similar": z_similar},
        metrics=_metrics("cot", probes, {"non-CoT": "noncot_similar"}),
    )


@register_study("clarify", baseline="pos")
def clarify_study(z_clarify: Any, z_pos: Any, z_pos_similar: Any, z_neg_similar: Any) -> Study:
    """Can query clarification data improve generalization on confused queries? (section 4.2, Figure 2)

    Args:
        z_clarify: Z_clarify, (misbehaved query -> clarified query) examples.
        z_pos: Z_pos, (clarified query, satisfactory response) examples (the baseline probes).
        z_pos_similar: Z'_pos, an analogous example for each example of Z_pos.
        z_neg_similar: Z'_neg, an analogous example for each negative example Z_neg.
    """
    return Study(
        "clarify",
        probe_sets={"clarify": z_clarify, "pos": z_pos},
        eval_sets={"pos_similar": z_pos_similar, "neg_similar": z_neg_similar},
        metrics=_metrics("clarify", {"Clarify": "clarify", "Pos": "pos"}, {"Pos": "pos_similar", "Neg": "neg_similar"}),
    )


@register_study("evaluation", baseline="pos")
def evaluation_study(e_pos: Any, e_neg: Any, z_pos: Any, z_pos_similar: Any, z_neg_similar: Any) -> Study:
    """Can response evaluation data improve generalization? (section 4.3, Figure 3)

    Args:
        e_pos: E_pos, evaluation examples judging the positive responses.
        e_neg: E_neg, evaluation examples judging the negative responses.
        z_pos: Z_pos (the baseline probes).
        z_pos_similar: Z'_pos.
        z_neg_similar: Z'_neg.
    """
    probes = {"EvalPos": "eval_pos", "EvalNeg": "eval_neg", "Pos": "pos"}
    return Study(
        "evaluation",
        probe_sets={"eval_pos": e_pos, "eval_neg": e_neg, "pos": z_pos},
        eval_sets={"pos_similar": z_pos_similar, "neg_similar": z_neg_similar},
        metrics=_metrics("evaluation", probes, {"Pos": "pos_similar", "Neg": "neg_similar"}),
    )


def merge_studies(
    studies: list[Study], probe_sets: dict[str, Any], eval_sets: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], list[Metric]]:
    """Union of the studies' sets with the user's own sets.

    Studies may share a set (the clarification and evaluation studies both use Z_pos, Z'_pos, Z'_neg): a name
    registered twice must refer to the same object.

    Raises:
        ValueError: If a name is registered twice with different sets.
    """
    probes, evals, metrics = dict(probe_sets), dict(eval_sets), []
    for study in studies:
        for target, sets in ((probes, study.probe_sets), (evals, study.eval_sets)):
            for name, source in sets.items():
                if name in target and target[name] is not source:
                    raise ValueError(
                        f"Set name {name!r} is registered twice with different data (study {study.name!r}); "
                        "pass the same object to both studies or rename one."
                    )
                target[name] = source
        for m in study.metrics:
            same = next((k for k in metrics if k.label == m.label), None)
            if same is None:
                metrics.append(m)
            elif (same.probe_set, same.eval_set, same.context) != (m.probe_set, m.eval_set, m.context):
                raise ValueError(f"Metric {m.label!r} is defined differently by studies {same.study!r}, {m.study!r}.")
    return probes, evals, metrics
