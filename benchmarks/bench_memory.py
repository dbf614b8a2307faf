"""Peak memory and time of one influence computation as the evaluation set grows.

    python benchmarks/bench_memory.py --evals 16 1000 10000 [--score projection] [--budget 2GiB]

Each size runs in a fresh process (so its peak resident memory is its own): the tracking benchmark's model (a)
(Llama h256 L4, LoRA r=8 on every linear map; 156,160 tracked parameters, 0.62 MB of evaluation features per
example when materialized), 64 probes, N evaluation examples of 20-120 tokens, ``max_feature_bytes`` = the
budget, one thread. Prints the peak RSS, the RSS after building the model and the examples (the baseline), their
difference, the wall time, which side's features were held (the other is streamed past them) and in how many
chunks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def child(n_eval: int, score: str, budget: str) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from bench_tracking import build, configs, make_examples

    from swift_callbacks.assets.tiny import build_tokenizer, demo_corpus
    from swift_callbacks.influence import InfluenceEngine

    torch.set_num_threads(1)
    cfg = configs(False)[0]
    tok = build_tokenizer(demo_corpus())
    model = build(cfg, tok)
    probes = make_examples(tok, 64, cfg.min_len, cfg.max_len, seed=1)
    evals = make_examples(tok, n_eval, cfg.min_len, cfg.max_len, seed=2)
    options = {"score": "projection", "score_options": {"dim": 256}} if score == "projection" else {}
    engine = InfluenceEngine(model, pad_token_id=tok.eos_token_id, verify=False, max_feature_bytes=budget,
                             micro_batch_size=8, **options)  # fmt: skip
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    plan = engine._plan(probes, evals)
    start = time.perf_counter()
    result = engine.compute(probes, evals)
    seconds = time.perf_counter() - start
    assert result.dot.shape == (64, n_eval) and bool(result.dot.isfinite().all())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n_held = n_eval if plan.hold_evals else len(probes)
    print(json.dumps({"n_eval": n_eval, "base_gib": base, "peak_gib": peak, "seconds": seconds,
                      "held": "evaluations" if plan.hold_evals else "probes",
                      "chunks": -(-n_held // plan.chunk)}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evals", type=int, nargs="+", default=[16, 1000, 10000])
    parser.add_argument("--score", choices=["exact", "projection"], default="exact")
    parser.add_argument("--budget", default="2GiB")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.score, args.budget)
        return
    print(f"score {args.score}, max_feature_bytes {args.budget}")
    print("| evaluation examples | peak RSS GiB | baseline GiB | peak - baseline GiB | seconds | held side | chunks |")
    print("|---|---|---|---|---|---|---|")
    for n in args.evals:
        cmd = [sys.executable, __file__, "--child", str(n), "--score", args.score, "--budget", args.budget]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"| {n} | {r['peak_gib']:.2f} | {r['base_gib']:.2f} | {r['peak_gib'] - r['base_gib']:.2f} | "
              f"{r['seconds']:.1f} | {r['held']} | {r['chunks']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
