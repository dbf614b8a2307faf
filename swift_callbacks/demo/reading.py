"""The demo's plain-language reading of its result, and the cautions that go with it.

It reads the verdicts the report computes (:func:`swift_callbacks.report.analyse`: per strategy metric, the
checkpoints where the 95% interval of the paired difference from the plain-QA baseline lies above zero, below it,
or contains it; whether the median and the cosine agree; how often a few pairs carry the curve) and says in words
what they show and what they do not. Nothing here re-decides a verdict or computes a statistic of its own. Fields a
report version may lack (the robust-statistics counts) are read with a default of 0, so the reading works with
either.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class RunFacts:
    """What the reading needs to know about the run besides its verdicts.

    Attributes:
        tiny: The model is the offline tiny model (random weights, warmed up on the demo data).
        model: The model as named on the command line (``tiny`` for the default).
        steps: LoRA SFT optimizer steps run.
        examples: Training examples the study trained on.
        lora_modules: Module suffixes LoRA adapted (and influence tracked).
        accuracy: Held-out exact match of the final model on Z'.
        lora_layers: The decoder layers LoRA adapted (None: every layer).
    """

    tiny: bool
    model: str
    steps: int
    examples: int
    lora_modules: tuple[str, ...]
    accuracy: float
    lora_layers: str | None = None


def reading_lines(verdicts: list, history, facts: RunFacts) -> list[str]:
    """The reading (one line per strategy metric) followed by the cautions, ready to print.

    Args:
        verdicts: ``analyse(run).verdicts["cot"]`` (``report.verdicts.Verdict`` objects).
        history: ``analyse(run).history`` (the stored pairs, undefined RelInf left out, and the metric specs).
        facts: The run's facts.
    """
    lines = ["What this run shows (plain reading of the report's verdicts):"]
    lines += [f"  - {verdict_reading(v)}" for v in verdicts] or ["  - no verdict: the baseline was not recorded"]
    lines.append("Cautions:")
    lines += [f"  - {c}" for c in cautions(verdicts, history, facts)]
    return lines


def _count(v, name: str) -> int:
    """A verdict count, 0 when this report version does not compute it."""
    return int(getattr(v, name, 0) or 0)


def verdict_reading(v) -> str:
    """One strategy metric against its baseline, in words: counts of checkpoints, then what that does not show."""
    n, ahead, behind, fragile = v.n, v.beats, v.behind, _count(v, "not_robust")
    if n == 0:
        return f"{v.strategy}: no checkpoint where it and {v.baseline} are both recorded."
    unclear = n - ahead - behind - fragile
    data = v.strategy.split(" → ")[0]
    side = "above" if v.mean_diff > 0 else "below" if v.mean_diff < 0 else "level with"
    head = (
        f"{v.strategy} vs {v.baseline}: {data} data's influence was {side} the plain-QA baseline's on average "
        f"(mean difference {v.mean_diff:+.3g}); above it beyond doubt at {ahead} of {n} checkpoints, below at {behind}"
    )
    if fragile:
        why = getattr(v, "not_robust_why", "")
        head += (f", not robust at {fragile} (the mean's interval clears zero but the median or the cosine disagrees"
                 f"{'; driven by ' + why if why else ''})")  # fmt: skip
    head += f", and at {unclear} the 95% interval of the difference contains zero."
    return f"{head} {_conclusion(v, data)}{_extras(v)}"


def _conclusion(v, data: str) -> str:
    n, ahead, behind = v.n, v.beats, v.behind
    if ahead == n:
        return f"So in this run {data} data moved this influence above the baseline at every checkpoint."
    if behind == n:
        return f"So in this run {data} data stayed below the baseline at every checkpoint."
    if ahead == 0 and behind == 0:
        return f"So this run does not show {data} data's influence differing from plain QA's here."
    if ahead and behind:
        return f"So this run is mixed: {data} data is ahead at some checkpoints and behind at others."
    side = "ahead of" if ahead else "behind"
    since = f" (from step {v.ahead_from} on)" if ahead and v.ahead_from is not None else ""
    return f"So this run shows {data} data {side} the baseline at some checkpoints{since} only, not throughout."


def _extras(v) -> str:
    words = []
    if v.trend in ("rising", "falling"):
        words.append(f"its curve is {v.trend} over the last checkpoints")
    if v.n and _count(v, "beats_relinf") / v.n > 0.5 and v.beats_cosine / v.n <= 0.5:
        words.append("it is ahead by RelInf but not by cosine, so gradient size (length) does the work, not direction")
    words += list(v.cautions)
    return f" Note: {'; '.join(words)}." if words else ""


def cautions(verdicts: list, history, facts: RunFacts) -> list[str]:
    """Run-level cautions: few examples, what the model is, a short run, curves carried by a few pairs."""
    out = [_size_caution(history.pairs), _model_caution(facts)]
    out += [_few_pairs_caution(v) for v in verdicts]
    out.append(
        "The intervals resample pairs (or evaluation examples); pairs share examples, so the real uncertainty over "
        "fresh examples is larger than the bands show. See the report's Diagnostics for length and gradient-norm "
        "effects."
    )
    return [c for c in out if c]


def _size_caution(pairs: pd.DataFrame) -> str:
    probes = pairs.drop_duplicates(["probe_set", "probe_id"]).groupby("probe_set").size()
    evals = pairs.drop_duplicates(["eval_set", "eval_id"]).groupby("eval_set").size()
    sets = ", ".join(f"{k}: {v}" for k, v in probes.items())
    return (
        f"Few examples: {int(evals.sum())} evaluation examples and {sets} probe examples; a single "
        "example can move a checkpoint's interval across zero."
    )


def _model_caution(facts: RunFacts) -> str:
    if facts.tiny:
        return (
            f"The model is a tiny randomly initialised Llama warmed up on the demo data (held-out exact match "
            f"{facts.accuracy:.0%}): its numbers show the instrument working and say nothing about real models or "
            "real CoT data."
        )
    modules = ",".join(facts.lora_modules) + (f" of layers {facts.lora_layers}" if facts.lora_layers else "")
    return (
        f"A short run on {facts.model}: {facts.steps} LoRA steps ({modules}) on {facts.examples} examples, one seed "
        f"(held-out exact match {facts.accuracy:.0%}). It shows the instrument on a real model, not evidence about "
        "CoT data; a longer run (--preset paper) or another --seed can change the reading."
    )


def _few_pairs_caution(v) -> str:
    heavy, collapsed = _count(v, "dominated"), _count(v, "collapsed")
    if not heavy and not collapsed:
        return ""
    text = f"A few pairs carry {v.strategy}:"
    if heavy:
        text += f" at {heavy} of {v.n} checkpoints its largest pairs hold more than half of its summed |RelInf|"
    if collapsed:
        text += (f"{';' if heavy else ''} {collapsed} collapsed evaluation gradient(s) (example x checkpoint) lie "
                 "under its not-robust calls (RelInf divides by |∇z0|²: a learned example weighs more)")  # fmt: skip
    return text + ", so its mean follows those few examples (the report's verdict table has the details)."
