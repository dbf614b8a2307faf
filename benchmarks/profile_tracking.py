"""Where does ``InfluenceEngine.compute`` spend its time? cProfile (per Python function) + torch.profiler (per op).

Uses the models and examples of ``bench_tracking.py``::

    python benchmarks/profile_tracking.py --config c --route auto
    python benchmarks/profile_tracking.py --config a --route ghost --quick
    python benchmarks/profile_tracking.py --config c --no-verify     # ends with the ops' floor-vs-tracking table
"""

from __future__ import annotations

import argparse
import contextlib
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
from swift_callbacks.influence import InfluenceEngine, features
from swift_callbacks.influence import engine as engine_module
from swift_callbacks.influence import verify as verify_lib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="c", help="a, b or c (see bench_tracking.py)")
    parser.add_argument("--route", default="auto", choices=["auto", "ghost", "materialize"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-verify", action="store_true", help="verify=False: the computation alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tok = build_tokenizer(demo_corpus())
    cfg = next(c for c in configs(args.quick) if c.name.startswith(f"({args.config})"))
    model = build(cfg, tok)
    params = trainable(model)
    pad = tok.pad_token_id
    probes = make_examples(tok, cfg.n_probe, cfg.min_len, cfg.max_len, seed=1)
    evals = make_examples(tok, cfg.n_eval, cfg.min_len, cfg.max_len, seed=2)
    engine = InfluenceEngine(model, pad_token_id=pad, route=args.route, micro_batch_size=args.micro_batch_size,
                             verify=not args.no_verify)  # fmt: skip

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
    print_op_comparison(floor, track, args.top)
    print_stages(floor, track)
    return 0


# Where a tracked micro-batch spends its time, by the engine function (or torch call) that spends it.
_STAGES = {
    "forward": (InfluenceEngine, "_logits"),
    "backward": (torch.autograd, "grad"),
    "per-example gradients (all blocks)": (engine_module, "block_feature"),
    "  of which generic modules (norm replay)": (features, "_materialize_generic"),
    "products with the held side": (engine_module, "_dots"),
    "squared norms": (engine_module, "sq_norms"),
    "batch-sum check (verify)": (verify_lib, "check_sums"),
}


@contextlib.contextmanager
def stages_recorded():
    """Wrap each function of ``_STAGES`` in a ``record_function`` region named after its stage."""
    saved, depth = [], [0]
    for label, (owner, name) in _STAGES.items():
        original = getattr(owner, name)

        def wrapped(*a, _original=original, _label=label, **k):
            # Nested in another stage (the norm replay's own autograd.grad), a call is that stage's time: recorded
            # once. Only the indented "of which" stage is a deliberate part of its parent.
            if depth[0] and not _label.startswith(" "):
                return _original(*a, **k)
            depth[0] += 1
            try:
                with record_function(f"## {_label}"):
                    return _original(*a, **k)
            finally:
                depth[0] -= 1

        saved.append((owner, name, original))
        setattr(owner, name, wrapped)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def print_stages(floor, track, calls: int = 3) -> None:
    """CPU milliseconds per call of each stage, floor and tracking (the floor's backward is the same torch call,
    timed the same way; its forward is most of the rest); the rest of a call is Python and small ops."""
    print("=== stages, CPU ms per call (mean of 3; the floor's backward includes its weight gradients) ===")
    for name, fn in (("floor", floor), ("tracking", track)):
        with stages_recorded(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e3 / calls
        parts = {e.key[3:]: e.cpu_time_total / 1e3 / calls for e in events if e.key.startswith("## ")}
        stages = (f"{k.strip()} {parts[k]:.0f}" if not k.startswith(" ") else f"({k.strip()} {parts[k]:.0f})"
                  for k in _STAGES if k in parts)  # fmt: skip
        print(f"{name}: total {total:.0f} ms; " + "; ".join(stages))


def op_times(fn, calls: int = 3) -> dict[str, tuple[float, int]]:
    """Self CPU milliseconds and call count per op, averaged over ``calls`` calls of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    return {e.key: (e.self_cpu_time_total / 1e3 / calls, e.count // calls) for e in prof.key_averages()}


def print_op_comparison(floor, track, top: int) -> None:
    """The ops where tracking spends more than the floor, largest difference first (what the overhead is made of)."""
    f, t = op_times(floor), op_times(track)
    total_f, total_t = sum(v[0] for v in f.values()), sum(v[0] for v in t.values())
    print(f"=== per op, floor vs tracking (self CPU ms per call, mean of 3): {total_f:.1f} vs {total_t:.1f} ===")
    print(f"{'op':48s} {'floor ms':>9s} {'calls':>6s} {'tracking ms':>12s} {'calls':>6s} {'difference':>10s}")
    diff = lambda k: t.get(k, (0.0, 0))[0] - f.get(k, (0.0, 0))[0]  # noqa: E731
    for key in sorted(set(f) | set(t), key=lambda k: -abs(diff(k)))[:top]:
        (fm, fn), (tm, tn) = f.get(key, (0.0, 0)), t.get(key, (0.0, 0))
        print(f"{key[:48]:48s} {fm:9.1f} {fn:6d} {tm:12.1f} {tn:6d} {tm - fm:+10.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
