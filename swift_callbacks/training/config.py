"""The training config: a YAML file with the sections ``model``, ``lora``, ``data``, ``training`` and ``influence``.

Example (``recipes/cot/config_tiny_cpu.yaml`` is a complete one)::

    model:
      name_or_path: Qwen/Qwen2.5-7B        # or a local folder, or "tiny:" for the offline tiny model
      dtype: bfloat16
    lora: {r: 64, alpha: 512, dropout: 0.05, target_modules: [up_proj, down_proj]}   # absent: full fine-tuning
    data:
      train:
        - path: data/base.jsonl             # local JSONL/JSON/Parquet/CSV, a Hub dataset id, or demo:<name>
          weight: 1.0
    training:                               # any trl.SFTConfig field
      output_dir: runs/cot
      learning_rate: 1e-5
    influence:
      studies:
        - type: cot
          sets: {z: data/z.jsonl, z_similar: data/z_similar.jsonl, z_cot: data/z_cot.jsonl}
      schedule: {at_step_zero: true}
      engine: {micro_batch_size: 8}

Every key is checked: an unknown key anywhere is an error naming its path and the closest known key, and so are
a missing required key and a value of the wrong type. Relative file paths are resolved against the config file's
folder first and the working directory second. Values can be overridden from the command line with
``--set training.learning_rate=2e-5`` (the value is read as YAML).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..configuration import ConfigError, build, join, load_yaml, suggest
from ..configuration import resolve_local as resolve_file
from ..influence.arguments import InfluenceArguments
from ..models import ModelConfig
from ..studies import STUDIES
from ..trainers import check_arguments

DEMO_PREFIX = "demo:"
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# ------------------------------------------------------------------------------------------------ sections


@dataclass
class LoraSettings:
    """``lora:``: LoRA adapters (the section absent means full fine-tuning).

    Attributes:
        r: Rank.
        alpha: ``lora_alpha`` (the update is scaled by alpha / r).
        dropout: Dropout on the adapter input during training (off while influence is computed).
        target_modules: Module name suffixes to adapt, or ``all-linear``.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"

    def check(self, path: str) -> None:
        if self.r < 1:
            raise ConfigError(f"{join(path, 'r')}: must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{join(path, 'dropout')}: must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError(f"{join(path, 'target_modules')}: must name at least one module")


@dataclass
class SourceConfig:
    """One dataset.

    Attributes:
        path: A local ``.jsonl``/``.json``/``.parquet``/``.csv`` file or data folder, ``demo:<name>`` for a file
            bundled with ``swift_callbacks.assets`` (e.g. ``demo:base``), or a Hub dataset id.
        split: Split to load (Hub datasets and data folders).
        config: Hub dataset configuration name.
        columns: Columns to keep (a list), or ``{source column: new name}`` to keep and rename.
    """

    path: str
    split: str = "train"
    config: str | None = None
    columns: list[str] | dict[str, str] | None = None

    def check(self, path: str) -> None:
        if not self.path.strip():
            raise ConfigError(f"{join(path, 'path')}: must not be empty")
        if isinstance(self.columns, list) and not self.columns:
            raise ConfigError(f"{join(path, 'columns')}: must name at least one column")


@dataclass
class MixtureSource(SourceConfig):
    """One dataset of a training mixture.

    Attributes:
        weight: How much of the source goes into the mixture, as a multiple of its size: ``0.25`` takes a seeded
            random quarter of the rows (the alignment-handbook meaning), ``1`` all of them, ``2.5`` every row twice
            plus a random half.
    """

    weight: float = 1.0

    def check(self, path: str) -> None:
        super().check(path)
        if not self.weight > 0:
            raise ConfigError(f"{join(path, 'weight')}: must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    """``data:``: the training (and optional evaluation) datasets.

    Attributes:
        train: Sources mixed into the training set (a bare string is a source with only ``path``).
        eval: Sources concatenated into the evaluation set (for ``training.eval_strategy``).
        seed: Seed of the mixture's subsampling and shuffling.
        shuffle: Shuffle a mixture of several sources once after concatenation (the trainer's sampler shuffles
            every epoch anyway; the order matters for packing and when reading the mixture).
    """

    train: list[MixtureSource | str]
    eval: list[SourceConfig | str] = field(default_factory=list)
    seed: int = 0
    shuffle: bool = True

    def check(self, path: str) -> None:
        if not self.train:
            raise ConfigError(f"{join(path, 'train')}: needs at least one source")
        self.train = [MixtureSource(path=s) if isinstance(s, str) else s for s in self.train]
        self.eval = [SourceConfig(path=s) if isinstance(s, str) else s for s in self.eval]
        for name, sources in (("train", self.train), ("eval", self.eval)):
            for i, source in enumerate(sources):
                source.check(join(join(path, name), i))


@dataclass
class ScheduleConfig:
    """``influence.schedule:``: when influence is computed, besides every checkpoint save.

    Attributes:
        every_n_steps: Also every N optimizer steps.
        at_step_zero: Also before the first step.
    """

    every_n_steps: int | None = None
    at_step_zero: bool = False

    def check(self, path: str) -> None:
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ConfigError(f"{join(path, 'every_n_steps')}: must be >= 1, got {self.every_n_steps}")


SetSpec = str | SourceConfig


@dataclass
class StudyConfig:
    """One of the paper's studies.

    Attributes:
        type: ``cot``, ``clarify`` or ``evaluation``.
        sets: The study's sets by the argument names of ``cot_study`` / ``clarify_study`` / ``evaluation_study``
            (``z``, ``z_similar``, ``z_cot``; ``z_clarify``, ``z_pos``, ``z_pos_similar``, ``z_neg_similar``;
            ``e_pos``, ``e_neg``, ``z_pos``, ``z_pos_similar``, ``z_neg_similar``).
    """

    type: str
    sets: dict[str, SetSpec]

    def check(self, path: str) -> None:
        if self.type not in STUDIES:
            raise ConfigError(f"{join(path, 'type')}: unknown study {self.type!r}; {suggest(self.type, list(STUDIES))}")
        names = list(inspect.signature(STUDIES[self.type].build).parameters)
        where = join(path, "sets")
        for name in self.sets:
            if name not in names:
                raise ConfigError(f"{join(where, name)}: not a set of a {self.type} study; {suggest(name, names)}")
        for name in names:
            if name not in self.sets:
                raise ConfigError(f"{join(where, name)}: required set of a {self.type} study is missing")


@dataclass
class InfluenceConfig:
    """``influence:``: the swift-study sets and how influence is tracked.

    Attributes:
        probe_sets: ``{name: set}``; a set is a path / ``demo:<name>`` / Hub id string, or a source mapping.
        eval_sets: ``{name: set}`` of evaluation sets.
        studies: The paper's studies (their sets and metric names are registered too).
        schedule: When to compute besides every save.
        engine: Engine options (``InfluenceArguments``: route, micro_batch_size, param_filter, max_feature_bytes,
            verify, precision, score).
        allow_packing: Accept packing / padding-free training.
        metric_prefix: Prefix of logged metric keys.
    """

    probe_sets: dict[str, SetSpec] = field(default_factory=dict)
    eval_sets: dict[str, SetSpec] = field(default_factory=dict)
    studies: list[StudyConfig] = field(default_factory=list)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: InfluenceArguments = field(default_factory=InfluenceArguments)
    allow_packing: bool = False
    metric_prefix: str = "swift"

    def check(self, path: str) -> None:
        if not self.studies and not (self.probe_sets and self.eval_sets):
            raise ConfigError(f"{path}: needs probe_sets and eval_sets, or at least one study")
        for name in self.probe_sets:
            if name in self.eval_sets:
                raise ConfigError(
                    f"{join(join(path, 'eval_sets'), name)}: also a probe set; every set needs its own name"
                )


@dataclass
class TrainConfig:
    """The whole training config.

    Attributes:
        model: The model section.
        data: The data section.
        training: ``trl.SFTConfig`` fields (``output_dir`` is required).
        lora: LoRA settings; None for full fine-tuning.
        influence: Influence tracking; None to train without the callback.
        base_dir: Folder relative file paths are resolved against first (the config file's folder).
    """

    model: ModelConfig
    data: DataConfig
    training: dict[str, Any]
    lora: LoraSettings | None = None
    influence: InfluenceConfig | None = None
    base_dir: Path = field(default_factory=Path.cwd, metadata={"config": False})

    def check(self, path: str) -> None:
        check_training(self.training, join(path, "training"))
        out = Path(str(self.training["output_dir"])).expanduser()
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{join(path, 'training.output_dir')}: {str(out)!r} is a file, not a folder")

    @property
    def output_dir(self) -> str:
        return str(self.training["output_dir"])

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (paths as resolved), loadable again with :func:`config_from_dict`."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("config", True)}
        return _plain(data)


# ----------------------------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), *, resolve_files: bool = True) -> TrainConfig:
    """Read, override and check a training config file.

    Args:
        path: The YAML file.
        overrides: ``"dotted.key=value"`` strings (``training.learning_rate=2e-5``, ``data.train[0].weight=0.5``);
            values are read as YAML.
        resolve_files: Make local data paths absolute and check that they exist (off: check the config's shape
            only, e.g. for a recipe whose data paths are placeholders).

    Returns:
        The checked config, with local data paths made absolute.

    Raises:
        ConfigError: Unreadable file, bad override, or an invalid config (the message names the key path).
    """
    path = Path(path)
    data = load_yaml(path, overrides)
    return config_from_dict(data, base_dir=path.resolve().parent, resolve_files=resolve_files)


def config_from_dict(
    data: Mapping[str, Any], base_dir: str | os.PathLike | None = None, *, resolve_files: bool = True
) -> TrainConfig:
    """Check plain config data (as read from YAML) and build a :class:`TrainConfig`.

    Args:
        data: The config mapping.
        base_dir: Folder relative file paths are resolved against first (default: the working directory).
        resolve_files: Make local data paths absolute and check that they exist.

    Raises:
        ConfigError: The message names the key path of the problem.
    """
    config = build(TrainConfig, data, "")
    config.base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    if resolve_files:
        resolve_paths(config)
    return config


# ------------------------------------------------------------------------------------- training section


def check_training(training: Mapping[str, Any], path: str = "training") -> None:
    """Check the ``training`` section against ``trl.SFTConfig``'s fields and their types.

    Raises:
        ConfigError: Unknown field, value of the wrong type, or no ``output_dir``.
    """
    check_arguments("sft", training, path)
    if not training.get("output_dir"):
        raise ConfigError(f"{join(path, 'output_dir')}: required key is missing")


# -------------------------------------------------------------------------------------------- helpers


def demo_files() -> set[str]:
    """Stems of the JSONL files bundled with ``swift_callbacks.assets`` (what ``demo:<name>`` can name)."""
    folder = resources.files("swift_callbacks.assets").joinpath("data")
    return {f.name.removesuffix(".jsonl") for f in folder.iterdir() if f.name.endswith(".jsonl")}


def is_demo(path: str) -> bool:
    return path.startswith(DEMO_PREFIX)


def resolve_local(path: str, base_dir: Path, where: str) -> str:
    """The absolute path of a local file or folder, or ``path`` unchanged for a Hub id / ``demo:`` name.

    A relative path is looked up in ``base_dir`` first and the working directory second.

    Raises:
        ConfigError: ``path`` looks like a file (a data suffix, or starts with ``/``, ``./``, ``../``, ``~``) but
            exists in neither place.
    """
    if is_demo(path):
        available = demo_files()
        if path.removeprefix(DEMO_PREFIX).removesuffix(".jsonl") not in available:
            raise ConfigError(f"{where}: no bundled demo file {path!r}; available: {', '.join(sorted(available))}")
        return path
    looks_local = Path(path).suffix.lower() in DATA_SUFFIXES or path.startswith(("/", "./", "../", "~"))
    found = resolve_file(path, base_dir, where, must_exist=looks_local)
    return str(found) if looks_local or found.exists() else path  # else a Hub dataset id


def resolve_paths(config: TrainConfig) -> None:
    """Make every local data path of ``config`` absolute (see :func:`resolve_local`)."""
    base = config.base_dir
    for name, sources in (("train", config.data.train), ("eval", config.data.eval)):
        for i, source in enumerate(sources):
            source.path = resolve_local(source.path, base, f"data.{name}[{i}].path")
    if config.influence is None:
        return
    inf = config.influence
    groups = [("influence.probe_sets", inf.probe_sets), ("influence.eval_sets", inf.eval_sets)]
    groups += [(f"influence.studies[{i}].sets", s.sets) for i, s in enumerate(inf.studies)]
    for where, sets in groups:
        for name, spec in sets.items():
            if isinstance(spec, str):
                sets[name] = resolve_local(spec, base, join(where, name))
            else:
                spec.path = resolve_local(spec.path, base, join(join(where, name), "path"))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
