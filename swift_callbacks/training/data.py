"""Datasets of a training config: one source (local file, bundled demo file or Hub dataset) and mixtures of them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..configuration import ConfigError
from .config import DATA_SUFFIXES, DEMO_PREFIX, DataConfig, MixtureSource, SourceConfig, is_demo


def load_source(source: SourceConfig):
    """One source as a ``datasets.Dataset``, with ``columns`` applied.

    Local files are read with the ``json`` / ``parquet`` / ``csv`` builders (works offline), a local folder or a
    Hub id with ``load_dataset(path, config, split=...)``, and ``demo:<name>`` from the files bundled with
    ``swift_callbacks.assets``.

    Raises:
        ConfigError: A ``columns`` entry the dataset does not have, or a source that cannot be read.
    """
    from datasets.exceptions import DatasetsError

    path = Path(source.path)
    if path.is_file() and path.stat().st_size == 0:
        raise ConfigError(f"data source {source.path!r} is an empty file; give a file with rows")
    try:
        dataset = select_columns(_load(source), source)
    except ConfigError:
        raise
    except (ValueError, StopIteration, OSError, DatasetsError) as err:  # a file that is not what its name says
        if "corresponds to no data" in str(err):  # datasets' words for a file without rows ("[]")
            raise ConfigError(f"data source {source.path!r} has no rows") from None
        raise ConfigError(f"data source {source.path!r} cannot be read: {type(err).__name__}: {err}") from err
    if len(dataset) == 0:
        raise ConfigError(f"data source {source.path!r} has no rows")
    return dataset


def _load(source: SourceConfig):
    from datasets import Dataset, load_dataset

    if is_demo(source.path):
        from ..assets.tiny import load_rows

        dataset = Dataset.from_list(load_rows(source.path.removeprefix(DEMO_PREFIX)))
    else:
        path = Path(source.path)
        builder = DATA_SUFFIXES.get(path.suffix.lower()) if path.is_file() else None
        if builder is not None:
            dataset = load_dataset(builder, data_files=str(path), split="train")
        else:
            dataset = load_dataset(source.path, source.config, split=source.split)
    return dataset


def select_columns(dataset, source: SourceConfig):
    """Keep (and with a mapping, rename) the source's ``columns``."""
    if source.columns is None:
        return dataset
    wanted = list(source.columns)
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise ConfigError(f"Dataset {source.path!r}: columns {missing} not found; it has {dataset.column_names}.")
    dataset = dataset.select_columns(wanted)
    if isinstance(source.columns, dict):
        dataset = dataset.rename_columns({k: v for k, v in source.columns.items() if k != v})
    return dataset


def weighted(dataset, weight: float, seed: int):
    """``weight`` times ``dataset``: whole copies, plus a seeded random subset for the fractional part."""
    whole = math.floor(weight)
    extra = round((weight - whole) * len(dataset))
    parts = [dataset] * whole
    if extra:
        parts.append(dataset.shuffle(seed=seed).select(range(extra)))
    if not parts:
        raise ValueError(f"weight {weight} of a dataset of {len(dataset)} rows selects no row")
    return _concatenate(parts, ["copy"] * len(parts))


def build_mixture(sources: Sequence[MixtureSource], seed: int = 0, shuffle: bool = True):
    """The training set: every source scaled by its weight, concatenated, optionally shuffled.

    Raises:
        ValueError: Sources whose columns differ (name the differing columns so ``columns:`` can fix it).
    """
    parts = [weighted(load_source(s), s.weight, seed + i) for i, s in enumerate(sources)]
    mixture = _concatenate(parts, [s.path for s in sources])
    return mixture.shuffle(seed=seed) if shuffle and len(parts) > 1 else mixture


def build_datasets(data: DataConfig):
    """``(train_dataset, eval_dataset or None)`` of the ``data`` section."""
    train = build_mixture(data.train, data.seed, data.shuffle)
    evaluation = _concatenate([load_source(s) for s in data.eval], [s.path for s in data.eval]) if data.eval else None
    return train, evaluation


def _concatenate(parts: list, names: list[str]):
    from datasets import concatenate_datasets

    if len(parts) == 1:
        return parts[0]
    columns = [sorted(p.column_names) for p in parts]
    if any(c != columns[0] for c in columns):
        listing = "; ".join(f"{n}: {c}" for n, c in zip(names, columns, strict=True))
        raise ConfigError(f"Mixed datasets have different columns ({listing}); select shared ones with 'columns:'.")
    return concatenate_datasets(parts)
