"""Wall-time benchmark of ``InfluenceEngine.compute`` against a training-style floor and a LESS-style loop.

For every configuration the same model and the same probe + evaluation examples are timed three ways:

* **floor**: one batched forward + backward over the probe and evaluation tokens with the engine's micro-batch
  size, padding and length sorting (loss = summed token cross-entropy over completion tokens,
  ``torch.autograd.grad`` w.r.t. the trainable parameters, model in eval mode). This is what one training-style
  pass over those tokens costs, and the lower bound any gradient-based tracker has to pay.
* **tracking**: ``InfluenceEngine(model, route=...).compute(probes, evals)`` for ``route`` in
  ``auto``/``ghost``/``materialize``.
* **LESS loop**: one forward/backward per example (batch size 1), every trainable gradient flattened into one
  vector, then all probe x evaluation dot products.

The script also checks that every route's dot matrix equals the loop's, so it never times a wrong computation.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/bench_tracking.py            # full run (~5-8 min on 2 cores)
    HF_HUB_OFFLINE=1 python benchmarks/bench_tracking.py --quick    # smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from peft import LoraConfig, get_peft_model

from swift_callbacks.assets.tiny import build_model, build_tokenizer, demo_corpus, load_rows
from swift_callbacks.influence import InfluenceEngine, collate, example_losses

ROUTES = ("auto", "ghost", "materialize")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Config:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    lora_r: int | None  # None: full fine-tuning
    lora_targets: list[str] = field(default_factory=list)
    n_probe: int = 64
    n_eval: int = 16
    min_len: int = 20
    max_len: int = 120


def configs(quick: bool) -> list[Config]:
    n_probe, n_eval = (16, 4) if quick else (64, 16)
    max_len = 80 if quick else 120
    common = {"n_probe": n_probe, "n_eval": n_eval, "max_len": max_len}
    return [
        Config("(a) LoRA r=8, all linear, h256 L4", 256, 4, 4, 688, 8, ALL_LINEAR, **common),
        Config("(b) LoRA r=64, up/down, h256 L4", 256, 4, 4, 688, 64, ["up_proj", "down_proj"], **common),
        Config("(c) full FT, h128 L2", 128, 2, 4, 344, None, **common),
    ]


# ------------------------------------------------------------------------------------------------ data


def make_examples(tok, n: int, min_len: int, max_len: int, seed: int) -> list[dict[str, list[int]]]:
    """``n`` examples with token lengths uniform in [min_len, max_len], built by concatenating base rows.

    The prompt is the first row's prompt (labels -100); everything after it (that row's completion and the
    following rows, prompt and completion) is supervised. Sequences are cut to the target length, EOS last.
    """
    rows = load_rows("base")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = rng.randint(min_len, max_len)
        first = rows[rng.randrange(len(rows))]
        prompt = first["prompt"]
        completion = first["completion"]
        while len(tok(prompt + completion).input_ids) < target:
            row = rows[rng.randrange(len(rows))]
            completion += "\n" + row["prompt"] + row["completion"]
        ids = [*tok(prompt + completion).input_ids[: target - 1], tok.eos_token_id]
        n_prompt = min(len(tok(prompt).input_ids), len(ids) - 2)
        labels = [-100] * n_prompt + ids[n_prompt:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def build(cfg: Config, tok) -> torch.nn.Module:
    model = build_model(
        tok,
        hidden_size=cfg.hidden,
        num_layers=cfg.layers,
        num_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        seed=0,
    )
    if cfg.lora_r is not None:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules=cfg.lora_targets)
        model = get_peft_model(model, lora)
        # PEFT initialises lora_B to zero, which makes every lora_A gradient zero: give B random values so that
        # every tracked block carries signal (this does not change any cost).
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------- the timed work


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def micro_batch_indices(examples: Sequence[dict], size: int) -> list[list[int]]:
    """Same batching as the engine: sort by length, consecutive chunks of ``size`` (example indices)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    return [order[s : s + size] for s in range(0, len(order), size)]


def sorted_micro_batches(examples: Sequence[dict], size: int) -> list[list[dict]]:
    """The engine's micro-batches of ``examples`` (see :func:`micro_batch_indices`)."""
    return [[examples[i] for i in batch] for batch in micro_batch_indices(examples, size)]


def floor_pass(model, params, probes, evals, pad_id: int, micro_batch_size: int) -> float:
    """One forward+backward over every probe and eval token, batched exactly as the engine batches them.

    The engine sorts and batches each side (the held one, then the streamed one) separately, so the floor does
    too.
    """
    total = 0.0
    with torch.enable_grad():
        for side in (evals, probes):
            for batch in sorted_micro_batches(side, micro_batch_size):
                input_ids, attention_mask, labels = collate(batch, pad_id)
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                loss = example_losses(logits, labels).sum()
                torch.autograd.grad(loss, params)
                total += float(loss.detach())
    return total


def less_loop(model, params, probes, evals, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LESS-style: one backward per example, flattened gradient vectors, then all probe x eval dots.

    Returns ``(dot, probe_sq_norm, eval_sq_norm)`` in float64.
    """

    def vectors(examples):
        rows = []
        for e in examples:
            input_ids, attention_mask, labels = collate([e], pad_id)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            loss = example_losses(logits, labels).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            rows.append(
                torch.cat(
                    [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
                )
            )
        return torch.stack(rows)

    with torch.enable_grad():
        p_vec = vectors(probes)
        e_vec = vectors(evals)
    return (p_vec @ e_vec.T).double(), (p_vec * p_vec).sum(1).double(), (e_vec * e_vec).sum(1).double()


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (elementwise relative error is meaningless for near-zero dot products)."""
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def check(result, ref) -> float:
    """Largest relative error of the dot matrix and both squared-norm vectors against the loop's."""
    dot, p_sq, e_sq = ref
    return max(
        max_rel_err(result.dot, dot), max_rel_err(result.probe_sq_norm, p_sq), max_rel_err(result.eval_sq_norm, e_sq)
    )


# ----------------------------------------------------------------------------------------------- driver


@dataclass
class Row:
    config: str
    n_probe: int
    n_eval: int
    n_params: int
    mean_tokens: float
    floor: float
    tracking: dict[str, float]
    loop: float
    cpu_ratio: float
    err: dict[str, float]
    routes: str
    verify: float
    unchecked: float


def run_config(cfg: Config, tok, repeats: int, micro_batch_size: int) -> Row:
    model = build(cfg, tok)
    params = trainable(model)
    pad = tok.pad_token_id
    probes = make_examples(tok, cfg.n_probe, cfg.min_len, cfg.max_len, seed=1)
    evals = make_examples(tok, cfg.n_eval, cfg.min_len, cfg.max_len, seed=2)
    lengths = [len(e["input_ids"]) for e in (*probes, *evals)]
    engines = {r: InfluenceEngine(model, pad_token_id=pad, route=r, micro_batch_size=micro_batch_size) for r in ROUTES}
    unchecked = InfluenceEngine(model, pad_token_id=pad, route="auto", micro_batch_size=micro_batch_size, verify=False)
    jobs: dict[str, Callable[[], object]] = {
        "floor": lambda: floor_pass(model, params, probes, evals, pad, micro_batch_size),
        **{r: (lambda e=e: e.compute(probes, evals)) for r, e in engines.items()},
        "loop": lambda: less_loop(model, params, probes, evals, pad),
        # The same computation with verify=False: no batch-sum check on each micro-batch (its cost is the gap).
        "unchecked": lambda: unchecked.compute(probes, evals),
        # The self-verification (3 examples: one batched pass and three single ones, with autograd references),
        # which runs once per run before the first compute; timed apart from it.
        "verify": lambda: engines["auto"].check([*probes, *evals]),
    }
    print(
        f"\n{cfg.name}: {sum(p.numel() for p in params):,} trainable params, {len(probes)} probes, "
        f"{len(evals)} evals, tokens/example mean {statistics.mean(lengths):.1f} "
        f"[{min(lengths)}, {max(lengths)}]",
        flush=True,
    )

    # Warm-up (also the correctness check), then `repeats` interleaved rounds so that drift in machine load
    # affects every column alike.
    outputs = {name: fn() for name, fn in jobs.items()}
    ref = outputs["loop"]
    err = {r: check(outputs[r], ref) for r in ROUTES}
    auto_routes = [b.route for b in engines["auto"].blocks]
    routes = ", ".join(f"{k}:{auto_routes.count(k)}" for k in ("ghost", "materialize") if auto_routes.count(k))
    times: dict[str, list[float]] = {name: [] for name in jobs}
    cpu: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            wall, used = timed(fn)
            times[name].append(wall)
            cpu[name].append(used)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    for name, ts in times.items():
        print(
            f"  {name:12s} median {med[name]:7.3f}s wall, {med_cpu[name]:7.3f}s CPU;  wall runs "
            + " ".join(f"{t:.3f}" for t in ts),
            flush=True,
        )
    print("  max rel err vs loop (dot, sq norms): " + ", ".join(f"{r}={e:.1e}" for r, e in err.items()))
    print(f"  auto routes: {routes}; tracking/floor by CPU time {med_cpu['auto'] / med_cpu['floor']:.2f}x")
    return Row(
        cfg.name,
        len(probes),
        len(evals),
        sum(p.numel() for p in params),
        statistics.mean(lengths),
        med["floor"],
        {r: med[r] for r in ROUTES},
        med["loop"],
        med_cpu["auto"] / med_cpu["floor"],
        err,
        routes,
        med["verify"],
        med["unchecked"],
    )


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"torch.get_num_threads()={torch.get_num_threads()}, Python {platform.python_version()}"
    )


def table(rows: list[Row]) -> str:
    head = (
        "| config | n_probe | n_eval | trainable params | mean tokens | floor s | tracking s (auto) | ratio "
        "| ghost s (ratio) | materialize s (ratio) | LESS-loop s | speed-up | max rel err | ratio (CPU time) "
        "| auto routes | verify s (vs tracking) | verify=False s (ratio) |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for r in rows:
        t = r.tracking
        lines.append(
            f"| {r.config} | {r.n_probe} | {r.n_eval} | {r.n_params:,} | {r.mean_tokens:.1f} | {r.floor:.3f} "
            f"| {t['auto']:.3f} | {t['auto'] / r.floor:.2f}x "
            f"| {t['ghost']:.3f} ({t['ghost'] / r.floor:.2f}x) "
            f"| {t['materialize']:.3f} ({t['materialize'] / r.floor:.2f}x) "
            f"| {r.loop:.3f} | {r.loop / t['auto']:.2f}x | {max(r.err.values()):.1e} | {r.cpu_ratio:.2f}x "
            f"| {r.routes} | {r.verify:.3f} ({r.verify / t['auto']:.2f}x) "
            f"| {r.unchecked:.3f} ({r.unchecked / r.floor:.2f}x) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (< 1 minute)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads value (default 1: on a small shared machine, oversubscribed OpenMP threads "
        "make wall times swing by several x)",
    )
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--only", default=None, help="run only configs whose name contains this string")
    parser.add_argument(
        "--out", default=str(Path(__file__).with_name("results.md")), help="Markdown results file ('' for none)"
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {machine()}")
    print(
        f"torch.set_num_threads({args.threads}); repeats={repeats} (median) after 1 warm-up; "
        f"micro_batch_size={args.micro_batch_size}"
    )

    tok = build_tokenizer(demo_corpus())
    start = time.perf_counter()
    rows = [
        run_config(cfg, tok, repeats, args.micro_batch_size)
        for cfg in configs(args.quick)
        if args.only is None or args.only in cfg.name
    ]
    md = table(rows)
    print("\n" + md)
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f}s")
    worst = max(max(r.err.values()) for r in rows)
    if args.out:
        text = (
            "# `InfluenceEngine.compute` benchmark\n\n"
            f"Command: `python benchmarks/bench_tracking.py{' --quick' if args.quick else ''}`\n\n"
            f"Machine: {machine()}\n\n"
            f"Timing: median of {repeats} interleaved repeat(s) after one warm-up; micro_batch_size="
            f"{args.micro_batch_size}. Ratio = tracking (auto) / floor; speed-up = LESS loop / tracking (auto).\n\n"
            f"{md}\n"
        )
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    if worst > 1e-3:
        print(f"ERROR: tracking disagrees with the per-example loop (max rel err {worst:.1e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
