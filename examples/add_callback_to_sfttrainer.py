"""Add swift-study influence tracking to an existing SFTTrainer run.

    python examples/add_callback_to_sfttrainer.py --model Qwen/Qwen2.5-0.5B --output-dir out \
        --train train.jsonl --probe cot=cot_probes.jsonl --eval qa=qa_eval.jsonl

Every file is JSONL in a TRL format (e.g. {"prompt": ..., "completion": ...}), probe/eval rows optionally with
"id" and "task". Watch the swift/ metrics in TensorBoard (`tensorboard --logdir out`) while it trains; afterwards
`swift_callbacks.load_scores("out")` has s_in / s_cross per save.
"""

from __future__ import annotations

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from swift_callbacks import InfluenceCallback, load_scores


def named_files(values: list[str]) -> dict[str, str]:
    return dict(v.split("=", 1) for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--probe", action="append", required=True, help="NAME=FILE, repeatable")
    parser.add_argument("--eval", action="append", required=True, help="NAME=FILE, repeatable")
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=-1)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()

    trainer = SFTTrainer(
        model=args.model,
        args=SFTConfig(
            output_dir=args.output_dir,
            save_steps=args.save_steps,
            max_steps=args.max_steps,
            bf16=gpu and torch.cuda.is_bf16_supported(),
            use_cpu=not gpu,
            report_to=["tensorboard"],
        ),
        train_dataset=load_dataset("json", data_files=args.train, split="train"),
        peft_config=LoraConfig(r=64, lora_alpha=512, target_modules=["up_proj", "down_proj"], task_type="CAUSAL_LM"),
        callbacks=[InfluenceCallback(probe_sets=named_files(args.probe), eval_sets=named_files(args.eval))],
    )
    trainer.train()
    print(load_scores(args.output_dir).to_string())


if __name__ == "__main__":
    main()
