"""Peers side by side: the same probe x evaluation inner products computed by each system in one process.

Systems (each checked against the LESS-style loop, one ``torch.autograd.grad`` per example, before it is timed):

* **floor**: one batched forward + backward over the same tokens (what training spends on them);
* **swift_callbacks**: ``InfluenceEngine.compute`` (``verify=False``: the computation alone);
* **LESS loop**: one backward per example, flattened gradients, then all dot products;
* **torch.func**: per-example gradients with ``vmap(grad(...))`` over each micro-batch (``functional_call``);
* **opacus**: ``GradSampleModule`` hooks (``grad_sample`` per parameter), flattened, then dot products.

kronfluence, bergson, dattri and captum are not in this script yet (see benchmarks/README.md).

Peers are optional: ``pip install --no-deps opacus==1.6.0 opt_einsum`` (``--no-deps`` keeps torch 2.13.0). A peer
that is not installed, or fails on the model, is reported as such. Peak memory is the rise of the process's
resident set (``VmHWM`` after resetting it) during one call. Usage::

    python benchmarks/bench_peers.py                # configs (a) LoRA and (c) full fine-tuning of bench_tracking
    python benchmarks/bench_peers.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_tracking import build, configs, floor_pass, less_loop, machine, make_examples, max_rel_err, trainable

from swift_callbacks.assets.tiny import build_tokenizer, demo_corpus
from swift_callbacks.influence import InfluenceEngine, collate, example_losses


def batches(examples: list[dict], size: int) -> list[list[int]]:
    """Index lists of length-sorted micro-batches (the engine's batching)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def in_order(rows: list[torch.Tensor], index: list[list[int]]) -> torch.Tensor:
    """Per-batch row blocks put back in example order."""
    out = torch.cat(rows)
    return out[torch.argsort(torch.tensor([i for batch in index for i in batch]))]


def torch_func(model, params, probes, evals, pad: int, size: int) -> torch.Tensor:
    """Per-example gradients with ``torch.func.vmap(grad(...))``, one micro-batch at a time."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_one(trainable_params, ids, mask, labels):
        state = {**frozen, **trainable_params, **buffers}
        out = torch.func.functional_call(
            model, state, (), {"input_ids": ids[None], "attention_mask": mask[None], "use_cache": False}
        )
        return example_losses(out.logits, labels[None]).sum()

    per_example = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0, 0))
    live = {n: p.detach() for n, p in zip(names, params, strict=True)}

    def side(examples):
        rows, index = [], batches(examples, size)
        for batch in index:
            ids, mask, labels = collate([examples[i] for i in batch], pad)
            grads = per_example(live, ids, mask, labels)
            rows.append(torch.cat([grads[n].reshape(len(batch), -1) for n in names], dim=1))
        return in_order(rows, index)

    with torch.no_grad():
        return side(probes) @ side(evals).T


def opacus(model, params, probes, evals, pad: int, size: int) -> torch.Tensor:
    """Per-example gradients from opacus' ``GradSampleModule`` hooks."""
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    wrapped.train()  # opacus records activations in training mode only (the configs have no dropout)

    def side(examples):
        rows, index = [], batches(examples, size)
        for batch in index:
            ids, mask, labels = collate([examples[i] for i in batch], pad)
            logits = wrapped(input_ids=ids, attention_mask=mask, use_cache=False).logits
            example_losses(logits, labels).sum().backward()
            rows.append(torch.cat([p.grad_sample.reshape(len(batch), -1) for p in params], dim=1))
            wrapped.zero_grad(set_to_none=True)
        return in_order(rows, index)

    try:
        return side(probes) @ side(evals).T
    finally:
        wrapped._close()
        model.eval()


def peak_rss_rise(fn: Callable[[], object]) -> tuple[object, float]:
    """``fn()`` and the rise of the resident set's high-water mark during it, in GiB (Linux)."""

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status("VmRSS:")
    out = fn()
    return out, max(0, status("VmHWM:") - before) / 2**30


def run(cfg, tok, repeats: int, size: int) -> list[str]:
    model = build(cfg, tok)
    params = trainable(model)
    pad = tok.pad_token_id
    probes = make_examples(tok, cfg.n_probe, cfg.min_len, cfg.max_len, seed=1)
    evals = make_examples(tok, cfg.n_eval, cfg.min_len, cfg.max_len, seed=2)
    engine = InfluenceEngine(model, pad_token_id=pad, micro_batch_size=size, verify=False)
    systems: dict[str, Callable[[], torch.Tensor | None]] = {
        "floor": lambda: floor_pass(model, params, probes, evals, pad, size),
        "swift_callbacks": lambda: engine.compute(probes, evals).dot,
        "LESS loop": lambda: less_loop(model, params, probes, evals, pad)[0],
        "torch.func vmap": lambda: torch_func(model, params, probes, evals, pad, size),
        "opacus": lambda: opacus(model, params, probes, evals, pad, size),
    }
    reference = systems["LESS loop"]()
    rows, times, memory, errors = [], {}, {}, {}
    for name, fn in systems.items():
        try:
            out, memory[name] = peak_rss_rise(fn)  # warm-up, memory and the check
        except Exception as err:  # a peer that fails is reported, not fatal
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
            continue
        if name != "floor":
            err = max_rel_err(out, reference)
            if err > 1e-3:
                errors[name] = f"disagrees with the loop (max rel err {err:.1e})"
                continue
            errors[name] = f"{err:.1e}"
        samples = []
        for _ in range(repeats):
            start = time.process_time()
            fn()
            samples.append(time.process_time() - start)
        times[name] = statistics.median(samples)
    floor = times.get("floor")
    for name in systems:
        if name in times:
            ratio = f"{times[name] / floor:.2f}x" if floor else "-"
            rows.append(
                f"| {cfg.name} | {name} | {times[name]:.3f} | {ratio} | {memory[name]:.2f} | {errors.get(name, '-')} |"
            )
        else:
            rows.append(f"| {cfg.name} | {name} | - | - | - | {errors[name]} |")
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--out", default="", help="Markdown file for the table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    head = (
        "| config | system | CPU s (median) | ratio to floor | peak RSS rise GiB | max rel err vs loop |\n"
        "|---|---|---|---|---|---|"
    )
    print(head)
    tok = build_tokenizer(demo_corpus())
    rows = []
    for cfg in configs(args.quick):
        if cfg.name.startswith(("(a)", "(c)")):
            rows += run(cfg, tok, args.repeats, args.micro_batch_size)
    if args.out:
        Path(args.out).write_text(f"Machine: {machine()}\n\n{head}\n" + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
