"""Peers side by side: the same probe x evaluation inner products computed by each system in one process.

Systems (each checked against the LESS-style loop, one ``torch.autograd.grad`` per example, before it is timed):

* **floor**: one batched forward + backward over the same tokens (what training spends on them);
* **swift_callbacks**: ``InfluenceEngine.compute`` (``verify=False``: the computation alone);
* **LESS loop**: one backward per example, flattened gradients, then all dot products;
* **torch.func**: per-example gradients with ``vmap(grad(...))`` over each micro-batch (``functional_call``);
* **opacus**: ``GradSampleModule`` hooks (``grad_sample`` per parameter), flattened, then dot products;
* **kronfluence**: ``Analyzer.compute_pairwise_scores`` with the ``identity`` factor strategy (no preconditioning);
* **bergson**: ``InMemoryCollector`` + streaming ``Scorer`` with projection disabled (``projection_dim=0``);
* **dattri**: ``TracInAttributor`` as Grad-Dot (one checkpoint, weight 1, no normalization, identity projector);
* **captum**: ``TracInCP.influence`` (one checkpoint, learning rate 1).

kronfluence and bergson hook ``nn.Linear`` modules only: on full fine-tuning (embeddings and norms trainable) they
are reported as unsupported rather than timed on a partial inner product. Every system sees the same examples in
the same length-sorted micro-batches; each one's setup (wrapping, data sets) is not timed, its computation is.

Peers are optional. ``pip install -e ".[bench]"`` brings opacus, captum and dattri without touching torch 2.13.0;
kronfluence and bergson require torchvision (bergson also torchaudio, torchopt, bitsandbytes), which would replace
torch, so install them and their small dependencies (ml_dtypes is compiled, the rest pure Python) with ``--no-deps``::

    pip install --no-deps kronfluence==1.0.1 einops einconv
    pip install --no-deps bergson==2.5.1 jaxtyping wadler_lindig simple_parsing docstring_parser ml_dtypes \\
        natsort petname

A peer that is not installed, or fails on the model, is reported as such with a one-line reason. Peak memory is the
rise of the process's resident set (``VmHWM`` after resetting it) during one call. Usage::

    python benchmarks/bench_peers.py                # configs (a) LoRA and (c) full fine-tuning of bench_tracking
    python benchmarks/bench_peers.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars (tqdm reads it when first imported)

import torch
from bench_tracking import build, configs, floor_pass, less_loop, machine, make_examples, max_rel_err, trainable
from bench_tracking import micro_batch_indices as batches

from swift_callbacks.assets.tiny import build_tokenizer, demo_corpus
from swift_callbacks.influence import InfluenceEngine, collate, example_losses


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


class Unsupported(Exception):
    """The peer cannot compute this matrix on this model (the reason is the message)."""


def sorted_order(examples: list[dict], size: int) -> list[int]:
    """Example indices in micro-batch order: handing a peer the examples in this order with batch size ``size``
    reproduces the engine's micro-batches through a plain sequential loader."""
    return [i for batch in batches(examples, size) for i in batch]


def unsort(matrix: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """A probe x eval matrix computed in micro-batch order, put back in example order."""
    return matrix[torch.argsort(torch.tensor(rows))][:, torch.argsort(torch.tensor(cols))]


def loader(examples: list[dict], order: list[int], pad: int, size: int) -> torch.utils.data.DataLoader:
    """Sequential loader over ``examples`` in ``order`` yielding the engine's ``(input_ids, mask, labels)`` batches."""
    return torch.utils.data.DataLoader(
        [examples[i] for i in order], batch_size=size, shuffle=False, collate_fn=lambda b: collate(b, pad)
    )


def summed_loss(model, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Sum over the batch of each example's summed completion-token cross-entropy (the engine's loss)."""
    ids, mask, labels = batch
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return example_losses(logits, labels).sum()


def linear_modules(model) -> list[str]:
    """Names of the ``nn.Linear`` modules that hold the trainable parameters (kronfluence's and bergson's unit).

    Raises ``Unsupported`` when trainable parameters live elsewhere (embeddings, norms): such a peer would
    compute a different, partial inner product.
    """
    names, covered = [], set()
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if type(module) is torch.nn.Linear and any(p.requires_grad for p in own):
            names.append(name)
            covered |= {id(p) for p in own}
    outside = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in covered)
    if outside:
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        raise Unsupported(
            f"tracks nn.Linear only; {outside:,} of {total:,} trainable params (embeddings, norms) lie elsewhere"
        )
    return names


def kronfluence(model, probes, evals, pad: int, size: int, workdir: Path) -> Callable[[], torch.Tensor]:
    """kronfluence ``Analyzer.compute_pairwise_scores`` with the ``identity`` factor strategy (no preconditioning).

    Setup (not timed): a deep copy of the model is wrapped by ``prepare_model`` (it freezes every parameter and
    swaps the tracked ``nn.Linear`` modules for hooked wrappers), and ``fit_all_factors`` records the identity
    strategy (it fits nothing). Probes are the queries, accumulated over all their batches before the single pass
    over the evaluations (``query_gradient_accumulation_steps``), so every gradient is computed once.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    names = linear_modules(model)

    class SummedLoss(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return summed_loss(model, batch)

        def compute_measurement(self, batch, model):
            return summed_loss(model, batch)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch[1]

    analyzer = Analyzer(
        "peers",
        prepare_model(copy.deepcopy(model), SummedLoss()),
        SummedLoss(),
        cpu=True,
        disable_tqdm=True,
        output_dir=str(workdir / "kronfluence"),
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=lambda b: collate(b, pad)))
    analyzer.fit_all_factors(
        "identity",
        dataset=probes,
        per_device_batch_size=size,
        factor_args=FactorArguments(strategy="identity"),
        overwrite_output_dir=True,
    )
    p_order, e_order = sorted_order(probes, size), sorted_order(evals, size)
    score_args = ScoreArguments(query_gradient_accumulation_steps=len(batches(probes, size)))

    def compute() -> torch.Tensor:
        analyzer.compute_pairwise_scores(
            "dots",
            "identity",
            query_dataset=[probes[i] for i in p_order],
            train_dataset=[evals[i] for i in e_order],
            per_device_query_batch_size=size,
            per_device_train_batch_size=size,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        return unsort(analyzer.load_pairwise_scores("dots")["all_modules"], p_order, e_order)

    return compute


def bergson(model, probes, evals, size: int, workdir: Path) -> Callable[[], torch.Tensor]:
    """bergson's in-memory collector and streaming ``Scorer``, projection disabled (``projection_dim=0``).

    The probes' per-module gradients are collected by an ``InMemoryCollector`` (no normalizer, no projection, no
    Hessian); the evaluations' gradients are then scored against them on the fly by a second collector holding a
    ``Scorer`` (no unit normalization, individual scores). Both run over the engine's micro-batches
    (``CollectorComputer(batches=...)``) with bergson's own forward/backward (summed per-example cross-entropy); it
    pads with token 0 and passes no attention mask, which with right padding leaves every real position's context as
    is in a causal model.
    """
    from bergson import GradientProcessor, IndexConfig, InMemoryCollector, Scorer
    from bergson.collector.collector import CollectorComputer
    from bergson.score.score_writer import InMemorySequenceScoreWriter
    from datasets import Dataset

    names = linear_modules(model)
    cfg = IndexConfig(run_path=str(workdir / "bergson"), projection_dim=0, loss_fn="ce", loss_reduction="sum")
    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)

    def dataset(examples):
        return Dataset.from_dict({k: [e[k] for e in examples] for k in ("input_ids", "labels")})

    p_data, e_data = dataset(probes), dataset(evals)

    def collect(data, examples, scorer=None) -> InMemoryCollector:
        collector = InMemoryCollector(
            model=model, data=data, cfg=cfg, processor=GradientProcessor(), target_modules=set(names), scorer=scorer
        )
        CollectorComputer(
            model, data, collector=collector, batches=batches(examples, size), cfg=cfg
        ).run_with_collector_hooks()
        return collector

    def compute() -> torch.Tensor:
        query = collect(p_data, probes).gradients
        writer = InMemorySequenceScoreWriter(len(evals), len(probes))
        scorer = Scorer(query, names, writer, torch.device("cpu"), torch.float32)
        collect(e_data, evals, scorer)
        return writer.scores.T

    return compute


def dattri(model, probes, evals, pad: int, size: int) -> Callable[[], torch.Tensor]:
    """dattri ``TracInAttributor`` as Grad-Dot: one checkpoint (the model as is), weight 1, ``normalized_grad=False``
    and the ``identity`` projector (no random projection).

    Its per-example gradients are ``vmap(grad(loss))`` over each batch through ``functional_call``. TracIn
    recomputes the test side's gradients for every train batch, so the evaluations (fewer batches) are the train
    side and the probes the test side.
    """
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    def loss(params, data):
        ids, mask, labels = data
        kwargs = {"input_ids": ids[None], "attention_mask": mask[None], "use_cache": False}
        return example_losses(torch.func.functional_call(model, params, (), kwargs).logits, labels[None]).sum()

    task = AttributionTask(loss_func=loss, model=model, checkpoints=["as built"], checkpoints_load_func=lambda m, _: m)
    attributor = TracInAttributor(
        task, weight_list=torch.ones(1), normalized_grad=False, projector_kwargs={"proj_type": "identity"}
    )
    p_order, e_order = sorted_order(probes, size), sorted_order(evals, size)

    def compute() -> torch.Tensor:
        scores = attributor.attribute(loader(evals, e_order, pad, size), loader(probes, p_order, pad, size))
        return unsort(scores.T, p_order, e_order)

    return compute


class Logits(torch.nn.Module):
    """``model(*batch[:-1])`` returning a tensor, as captum's TracIn expects (the last element is the label)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def captum(model, probes, evals, pad: int, size: int) -> Callable[[], torch.Tensor]:
    """captum ``TracInCP.influence`` with one checkpoint (the model as is) whose learning rate is 1: plain dots.

    ``layers`` are the modules owning the trainable parameters. When they are all ``nn.Linear`` (LoRA), captum's
    ``sample_wise_grads_per_batch`` hooks give per-example gradients from one backward per batch (summed loss);
    otherwise (embeddings, norms) captum needs its per-example route, one ``autograd.grad`` per example of the
    batch's graph (per-example loss vector).
    """
    from captum.influence import TracInCP

    wrapped = Logits(model)
    layers = [n for n, m in wrapped.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    hooks = all(type(wrapped.get_submodule(n)) is torch.nn.Linear for n in layers)
    p_order, e_order = sorted_order(probes, size), sorted_order(evals, size)

    def loss(logits, labels):
        losses = example_losses(logits, labels)
        return losses.sum() if hooks else losses

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "loss_fn has no 'reduction' attribute": it is a sum, as assumed
        tracin = TracInCP(
            wrapped,
            loader(evals, e_order, pad, size),
            checkpoints=["as built"],
            checkpoints_load_func=lambda m, _: 1.0,
            layers=layers,
            loss_fn=loss,
            sample_wise_grads_per_batch=hooks,
        )

    def compute() -> torch.Tensor:
        # captum's hooks take each layer's output gradient from a hook on its *input*, which must require grad: with
        # frozen embeddings the first layers' inputs do not, so the embedding output is made to (HF's
        # ``enable_input_require_grads``), for this call only
        handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Input Tensor 0 has a dtype of torch.int64": token ids, as expected
                return unsort(tracin.influence(loader(probes, p_order, pad, size)), p_order, e_order)
        finally:
            handle.remove()

    return compute


def peers(model, probes, evals, pad: int, size: int, workdir: Path) -> dict[str, Callable[[], Callable]]:
    """The peers whose setup may fail (not installed, unsupported model): name -> setup returning the computation."""
    return {
        "kronfluence (identity)": lambda: kronfluence(model, probes, evals, pad, size, workdir),
        "bergson (no projection)": lambda: bergson(model, probes, evals, size, workdir),
        "dattri (TracIn, identity)": lambda: dattri(model, probes, evals, pad, size),
        "captum (TracInCP)": lambda: captum(model, probes, evals, pad, size),
    }


def reason(err: Exception) -> str:
    """One line saying why a peer produced no time."""
    if isinstance(err, ImportError):
        return f"not installed ({err.name or err})"
    if isinstance(err, Unsupported):
        return f"unsupported: {err}"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"


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
    """One configuration: every system checked against the loop, then timed in interleaved rounds."""
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
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as workdir:
        for name, setup in peers(model, probes, evals, pad, size, Path(workdir)).items():
            try:
                systems[name] = setup()  # imports, wrappers, data sets: not timed
            except Exception as err:  # not installed or unsupported: reported, not fatal
                errors[name] = reason(err)
        return measure(cfg.name, systems, errors, repeats)


def measure(config: str, systems: dict[str, Callable], errors: dict[str, str], repeats: int) -> list[str]:
    """Warm-up + check (and peak memory) per system, then ``repeats`` interleaved rounds of CPU times."""
    reference = systems["LESS loop"]()
    memory, samples = {}, {}
    for name, fn in systems.items():
        try:
            out, memory[name] = peak_rss_rise(fn)  # warm-up, memory and the check
        except Exception as err:  # a peer that fails is reported, not fatal
            errors[name] = reason(err)
            continue
        if name != "floor":
            err = max_rel_err(out, reference)
            if err > 1e-3:
                errors[name] = f"disagrees with the loop (max rel err {err:.1e})"
                continue
            errors[name] = f"{err:.1e}"
        samples[name] = []
    for _ in range(repeats):  # rounds: floor, swift_callbacks, ..., floor, ... so drift hits every system alike
        for name in samples:
            start = time.process_time()
            systems[name]()
            samples[name].append(time.process_time() - start)
    times = {name: statistics.median(s) for name, s in samples.items()}
    floor = times.get("floor")
    rows = []
    for name in [*systems, *(n for n in errors if n not in systems)]:
        if name in times:
            ratio = f"{times[name] / floor:.2f}x" if floor else "-"
            rows.append(
                f"| {config} | {name} | {times[name]:.3f} | {ratio} | {memory[name]:.2f} | {errors.get(name, '-')} |"
            )
        else:
            rows.append(f"| {config} | {name} | - | - | - | {errors[name]} |")
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
    logging.disable(logging.INFO)  # bergson's and kronfluence's per-call INFO lines
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
