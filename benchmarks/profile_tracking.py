"""Where does ``InfluenceEngine.compute`` spend its time? cProfile (per Python function) + torch.profiler (per op).

Uses the models and examples of ``bench_tracking.py``::

    python benchmarks/profile_tracking.py --config c --route auto
    python benchmarks/profile_tracking.py --config a --route ghost --quick
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_tracking import build, configs, floor_pass, make_examples, trainable
from torch.profiler import ProfilerActivity, profile, record_function

from swift_callbacks.assets.tiny import build_tokenizer, demo_corpus
from swift_callbacks.influence import InfluenceEngine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="c", help="a, b or c (see bench_tracking.py)")
    parser.add_argument("--route", default="auto", choices=["auto", "ghost", "materialize"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tok = build_tokenizer(demo_corpus())
    cfg = next(c for c in configs(args.quick) if c.name.startswith(f"({args.config})"))
    model = build(cfg, tok)
    params = trainable(model)
    pad = tok.pad_token_id
    probes = make_examples(tok, cfg.n_probe, cfg.min_len, cfg.max_len, seed=1)
    evals = make_examples(tok, cfg.n_eval, cfg.min_len, cfg.max_len, seed=2)
    engine = InfluenceEngine(model, pad_token_id=pad, route=args.route, micro_batch_size=args.micro_batch_size)

    def floor():
        return floor_pass(model, params, probes, evals, pad, args.micro_batch_size)

    def track():
        return engine.compute(probes, evals)

    floor(), track()  # warm-up
    t0 = time.perf_counter()
    floor()
    t1 = time.perf_counter()
    track()
    t2 = time.perf_counter()
    print(
        f"{cfg.name}, route={args.route}, threads={args.threads}: floor {t1 - t0:.3f}s, tracking {t2 - t1:.3f}s "
        f"({(t2 - t1) / (t1 - t0):.2f}x)"
    )

    prof = cProfile.Profile()
    prof.enable()
    track()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
    stats.print_stats(r"swift_callbacks|torch/autograd/__init__|functional_call", args.top)
    print("=== cProfile of compute() (cumulative, swift_callbacks functions) ===")
    print(out.getvalue()[-12000:])

    with profile(activities=[ProfilerActivity.CPU]) as tprof:
        with record_function("## floor"):
            floor()
        with record_function("## tracking"):
            track()
    print("=== torch.profiler (self CPU time, floor + tracking) ===")
    print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
