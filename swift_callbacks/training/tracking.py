"""The ``InfluenceCallback`` a training config's ``influence`` section describes."""

from __future__ import annotations

from typing import Any

from ..studies import STUDIES
from .config import DEMO_PREFIX, InfluenceConfig, SourceConfig, is_demo
from .data import load_source


class SetResolver:
    """Turns set specs into what ``InfluenceCallback`` accepts, loading each distinct source once.

    Studies that share a set (clarification and evaluation both use Z_pos, Z'_pos, Z'_neg) must hand the
    callback the same object for it; specs naming the same source get the same object here.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, Any] = {}

    def __call__(self, spec: str | SourceConfig) -> Any:
        source = SourceConfig(path=spec) if isinstance(spec, str) else spec
        columns = tuple(source.columns.items()) if isinstance(source.columns, dict) else source.columns
        key = (source.path, source.split, source.config, tuple(columns) if columns else None)
        if key not in self._cache:
            self._cache[key] = self._load(source)
        return self._cache[key]

    @staticmethod
    def _load(source: SourceConfig) -> Any:
        if is_demo(source.path):
            from ..assets.tiny import load_rows

            rows = load_rows(source.path.removeprefix(DEMO_PREFIX))
            return [{k: r[k] for k in ("id", "task", "prompt", "completion") if k in r} for r in rows]
        if source.columns is None and source.path.lower().endswith((".jsonl", ".json", ".parquet")):
            return source.path  # read by swift_callbacks.sets, whose errors name the line
        return load_source(source)


def callback_kwargs(influence: InfluenceConfig) -> dict[str, Any]:
    """Keyword arguments of ``InfluenceCallback(trainer, **kwargs)`` for an ``influence`` section."""
    resolve = SetResolver()
    study_objects = [
        STUDIES[s.type].build(**{name: resolve(spec) for name, spec in s.sets.items()}) for s in influence.studies
    ]
    return {
        "probe_sets": {name: resolve(spec) for name, spec in influence.probe_sets.items()},
        "eval_sets": {name: resolve(spec) for name, spec in influence.eval_sets.items()},
        "studies": study_objects,
        "every_n_steps": influence.schedule.every_n_steps,
        "at_step_zero": influence.schedule.at_step_zero,
        "influence_args": influence.engine,
        "allow_packing": influence.allow_packing,
        "metric_prefix": influence.metric_prefix,
    }


def build_callback(trainer, influence: InfluenceConfig):
    """An ``InfluenceCallback`` on ``trainer`` (not yet added to it)."""
    from ..callback import InfluenceCallback

    return InfluenceCallback(trainer, **callback_kwargs(influence))
