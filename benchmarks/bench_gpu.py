"""Tracking cost and exactness on one GPU, on a ~0.5B-parameter model built from config (Qwen2.5-0.5B's shape).

For LoRA (r=16, all linear layers) and full fine-tuning this measures, on the same probe + evaluation examples:

* **floor**: one batched forward + backward over those tokens (the engine's micro-batching and loss), bf16
  autocast as training runs it;
* **tracking**: ``InfluenceEngine.compute`` under the same autocast, ``precision="fp32"`` (the option that tracks
  in float32 whatever the training precision) and ``verify=False`` (the once-per-run self-check is timed apart);
* **error**: the tracked dot products against a brute-force oracle (one ``torch.autograd.grad`` per example in
  float32, TF32 off) on a subset of the examples;
* **peak memory**: ``torch.cuda.max_memory_allocated`` during tracking, over the memory the model holds.

Prints a Markdown table (and writes it with ``--out``). Runs in about 3-5 minutes on one H100/H200-class GPU::

    python benchmarks/bench_gpu.py --out docs/gpu-results.md
    python benchmarks/bench_gpu.py --device cpu --tiny      # a smoke run of the script itself on a CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

from swift_callbacks.influence import InfluenceEngine, collate, example_losses

HALF_B = dict(  # Qwen2.5-0.5B's published shape (494M parameters with tied embeddings)
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=0,
)  # fmt: skip
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
)  # fmt: skip


def build(shape: dict, lora: bool, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**shape))
    if lora:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
        with torch.no_grad():  # LoRA B starts at zero (every A gradient zero): give it values
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    return model.to(device).eval()


def examples(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 4) + ids[length // 4 :]})
    return out


def floor(model, params, probes, evals, micro_batch: int, device: str) -> None:
    for side in (evals, probes):
        order = sorted(side, key=lambda e: len(e["input_ids"]))
        for start in range(0, len(order), micro_batch):
            ids, mask, labels = collate(order[start : start + micro_batch], 0, device)
            with torch.autocast(device, dtype=torch.bfloat16):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            torch.autograd.grad(example_losses(logits, labels).sum(), params)


def oracle(model, params, exs, device: str) -> torch.Tensor:
    """Per-example float32 gradients, flattened (no autocast, TF32 off)."""
    rows = []
    for e in exs:
        ids, mask, labels = collate([e], 0, device)
        loss = example_losses(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels).sum()
        rows.append(torch.cat([g.reshape(-1).float() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(name: str, lora: bool, args) -> str:
    device, shape = args.device, TINY if args.tiny else HALF_B
    model = build(shape, lora, device)
    params = [p for p in model.parameters() if p.requires_grad]
    probes = examples(args.probes, shape["vocab_size"], 32, args.max_len, seed=1)
    evals = examples(args.evals, shape["vocab_size"], 32, args.max_len, seed=2)
    engine = InfluenceEngine(model, pad_token_id=0, micro_batch_size=args.micro_batch, precision="fp32", verify=False)

    def track():
        with torch.autocast(device, dtype=torch.bfloat16):
            return engine.compute(probes, evals)

    t_floor = timed(lambda: floor(model, params, probes, evals, args.micro_batch, device), device, args.repeats)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    t_track = timed(track, device, args.repeats)
    peak = (torch.cuda.max_memory_allocated() - held) / 2**30 if device == "cuda" else float("nan")
    result = track()
    k = min(4, args.probes, args.evals)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with torch.enable_grad():
        p, e = oracle(model, params, probes[:k], device), oracle(model, params, evals[:k], device)
    ref = (p.double() @ e.double().T).cpu()
    err = float((result.dot[:k, :k] - ref).abs().max() / ref.abs().max())
    routes = [b.route for b in engine.blocks]
    line = (
        f"| {name} | {sum(x.numel() for x in params) / 1e6:.1f}M | {args.probes}x{args.evals} | {t_floor:.3f} "
        f"| {t_track:.3f} | {t_track / t_floor:.2f}x | {err:.1e} | {peak:.2f} "
        f"| ghost {routes.count('ghost')}, materialize {routes.count('materialize')} |"
    )
    print(line, flush=True)
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of the 0.5B shape (smoke run)")
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--evals", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="", help="Markdown file to write the table to")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    head = (
        f"{gpu}, torch {torch.__version__}, transformers {tf.__version__}; bf16 autocast, tracking precision='fp32', "
        f"examples of 32-{args.max_len} tokens, micro-batch {args.micro_batch}, median of {args.repeats}\n\n"
        "| setting | trainable | probes x evals | floor s | tracking s | ratio | max rel err (4x4 vs fp32 oracle) "
        "| peak GiB over the model | routes |\n|---|---|---|---|---|---|---|---|---|"
    )
    print(head, flush=True)
    lines = []
    for name, lora in (("LoRA r=16 all-linear", True), ("full fine-tuning", False)):
        lines.append(run(name, lora, args))
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the first model is gone with run()'s frame
    if args.out:
        Path(args.out).write_text(head + "\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
