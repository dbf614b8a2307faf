"""Exactness on a GPU: the engine (with its self-verification) against a brute-force oracle on CUDA.

For a few model families (tiny configs, but on the GPU's real kernels: cuBLAS, SDPA, bf16 autocast), under full
fine-tuning and LoRA, this measures the largest relative error of the engine's inner products against one
``torch.autograd.grad`` per example in fp32 (TF32 off), three ways:

* ``fp32``: an fp32 model, no autocast (the engine must be exact to fp32 rounding, <= 1e-4);
* ``bf16-autocast/auto``: the same model under bf16 autocast (accelerate's mixed-precision wrapper), tracked in
  the precision training uses (expected around 1e-3 to 1e-2);
* ``bf16-autocast/fp32``: the same, tracked with ``precision="fp32"`` (must be <= 1e-4 again);

plus the self-verification's time and the peak GPU memory. Prints a Markdown table; exits 1 if an exactness bound
fails. Usage (about a minute on one GPU)::

    python benchmarks/gpu_exactness.py [--device cuda] [--out results.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
import transformers as tf
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

from swift_callbacks.influence import InfluenceEngine
from swift_callbacks.influence.modules import UnsupportedModelError

VOCAB = 512
WIDE = dict(
    vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0,
)  # fmt: skip
FAMILIES = {
    "Llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**WIDE)),
    "Qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**WIDE, tie_word_embeddings=False)),
    "Gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**WIDE, head_dim=32)),
    "GPT-2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=4, n_head=8)),
    "Mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**WIDE, num_local_experts=4, num_experts_per_tok=2)),
}


def examples(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3 :]})
    return out


def brute(model, exs, device):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for e in exs:
        logits = model(input_ids=torch.tensor([e["input_ids"]], device=device)).logits[0].float()
        labels = torch.tensor(e["labels"], device=device)
        loss = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                               for g, p in zip(grads, params, strict=True)]))  # fmt: skip
    return torch.stack(rows)


def rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().cpu().abs().max())


def build(family, mode, device):
    torch.manual_seed(0)
    model = FAMILIES[family]().float()
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
        with torch.no_grad():
            for i, (n, p) in enumerate(model.named_parameters()):
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
    return model.to(device).eval()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    warnings.simplefilter("ignore")
    probes, evals = examples(6, 16, 96, 1), examples(4, 16, 96, 2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"Device: {name}; torch {torch.__version__}, transformers {tf.__version__}; 6 probes x 4 evals, 16-96 tokens.",
        "",
        "| family | mode | fp32 | bf16-autocast/auto | bf16-autocast/fp32 | verify s | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    failed = False
    for family in FAMILIES:
        for mode in ("full", "lora"):
            try:
                model = build(family, mode, device)
                P, E = brute(model, probes, device), brute(model, evals, device)
                ref = P @ E.T
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                engine = InfluenceEngine(model, micro_batch_size=4)
                err32 = rel(engine.compute(probes, evals).dot, ref)
                verify_s = engine.verification.seconds
                mixed = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu").prepare_model(
                    copy.deepcopy(model)
                )
                err_auto = rel(InfluenceEngine(mixed, micro_batch_size=4).compute(probes, evals).dot, ref)
                err_fp32 = rel(
                    InfluenceEngine(mixed, micro_batch_size=4, precision="fp32").compute(probes, evals).dot, ref
                )
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                ok = err32 <= 1e-4 and err_fp32 <= 1e-4
                failed |= not ok
                lines.append(f"| {family} | {mode} | {err32:.1e} | {err_auto:.1e} | {err_fp32:.1e} | {verify_s:.2f} | "
                             f"{peak:.2f} |" + ("" if ok else " **FAIL**"))  # fmt: skip
            except UnsupportedModelError as err:  # a clear refusal is an outcome, not a failure
                lines.append(f"| {family} | {mode} | refused: {str(err)[:120]} | | | | |")
            except Exception as err:  # report and go on: one family must not hide the others
                failed = True
                lines.append(f"| {family} | {mode} | error: {type(err).__name__}: {str(err)[:120]} | | | | |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
