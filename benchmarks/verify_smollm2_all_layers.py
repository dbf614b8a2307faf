"""The engine's self-verification on SmolLM2-135M-Instruct with LoRA on all 30 layers (not part of the tests).

    python benchmarks/verify_smollm2_all_layers.py [--samples 8] [--fp64]

LoRA r=16 on every up/down projection, the CoT study's sets (Z, Z', Z'') as plain prompt + completion + eos, and
``--samples`` verifications in a row, each on a new sample of 3 examples of different lengths. Prints, per sample,
the largest relative error of each check and the model's own difference between the per-example inner products of
a padded batch and of the examples alone (``batch_vs_alone``). That difference, up to 4.8e-4 on the first layer's
LoRA B in fp32, made an earlier verification call the examples "interacting"; the engine is compared with autograd
in the same micro-batch now (see ``swift_callbacks/influence/verify.py``). ~1 minute per sample on 2 cores.
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model

from swift_callbacks.assets.tiny import load_rows
from swift_callbacks.influence import InfluenceEngine
from swift_callbacks.influence.verify import VerificationError
from swift_callbacks.models import ModelConfig, load_model_and_tokenizer


def examples(tokenizer) -> list[dict]:
    """The study sets' rows as training tokenizes a plain prompt-completion row (completion + eos supervised)."""
    out = []
    for name in ("cot_study_z", "cot_study_z_cot", "cot_study_z_similar"):
        for row in load_rows(name):
            prompt = tokenizer(row["prompt"])["input_ids"]
            full = tokenizer(row["prompt"] + row["completion"])["input_ids"] + [tokenizer.eos_token_id]
            out.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt) :]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--fp64", action="store_true", help="cast the model to float64 first")
    args = parser.parse_args()
    tokenizer, model = load_model_and_tokenizer(ModelConfig(name_or_path="smollm2"))
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["up_proj", "down_proj"]))
    if args.fp64:
        model = model.double()
    engine = InfluenceEngine(model, pad_token_id=tokenizer.pad_token_id)
    rows = examples(tokenizer)
    for sample in range(args.samples):
        try:
            report = engine.check(rows)
        except VerificationError as err:
            print(sample, "refused:", err, flush=True)
            continue
        errors = ", ".join(f"{k} {v:.1e}" for k, v in report.max_error.items())
        print(f"{sample}: {errors}; batch_vs_alone {report.batch_vs_alone:.1e}", flush=True)


if __name__ == "__main__":
    main()
