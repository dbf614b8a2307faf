"""Multi-process worker for ``test_ddp.py``; run as ``torchrun --nproc_per_node 2 tests/ddp_worker.py MODE OUT``.

Modes:
    trainer  LoRA SFTTrainer (DDP, gloo, CPU) with an ``InfluenceCallback``; every rank writes the influence metrics
             it logged to ``OUT/logs-rank{r}.json``, rank 0 the tokenized examples to ``OUT/examples.json``.
    engine   ``InfluenceEngine.compute`` alone under a plain ``init_process_group("gloo")``; every rank saves its
             results for each of ``helpers.ENGINE_CONFIGS`` to ``OUT/engine-rank{r}.pt``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import helpers  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class RecordLogs(TrainerCallback):
    """Keeps the influence metrics this rank logged and writes them at the end of training."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        swift = {k: v for k, v in (logs or {}).items() if k.startswith("swift/") and k != "swift/seconds"}
        if swift:
            self.records.append({"step": state.global_step, **swift})

    def on_train_end(self, args, state, control, **kwargs):
        self.path.write_text(json.dumps(self.records, indent=1, ensure_ascii=False), encoding="utf-8")


class DumpAdamState(TrainerCallback):
    """Rank 0 writes the optimizer's second moments by parameter name at every save (the test's oracle input)."""

    def __init__(self, out: Path, model) -> None:
        self.out, self.names = out, {id(p): n for n, p in model.named_parameters()}

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        if not state.is_world_process_zero:
            return
        dump = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = optimizer.state[p]
                dump[self.names[id(p)]] = {"exp_avg_sq": st["exp_avg_sq"].clone(), "step": float(st["step"]),
                                           "beta2": group["betas"][1], "eps": group["eps"]}  # fmt: skip
        torch.save(dump, self.out / f"adam-{state.global_step}.pt")


def run_trainer(out: Path, score: str = "exact") -> None:
    rank = int(os.environ["RANK"])
    trainer, cb = helpers.make_trainer(
        out / "run",
        callback_kwargs={**helpers.ddp_callback_kwargs(), "score": score},
        extra_callbacks=[RecordLogs(out / f"logs-rank{rank}.json")],
        **helpers.DDP_CONFIG,
    )
    if score == "adam":
        trainer.add_callback(DumpAdamState(out, trainer.model))
    assert trainer.args.world_size == 2, trainer.args.world_size
    try:
        trainer.train()
        if rank == 0:
            probes, evals = helpers.examples_of(cb)
            (out / "examples.json").write_text(json.dumps({"probes": probes, "evals": evals}), encoding="utf-8")
        dist.barrier()
    finally:
        # Trainer leaves the gloo group up; tearing it down at interpreter exit can abort a rank
        # ("terminate called without an active exception"), as the recipe's run_training also avoids.
        dist.destroy_process_group()


def run_engine(out: Path) -> None:
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        assert dist.get_world_size() == 2
        model = helpers.build_model(seed=0)  # every parameter trainable: embeddings, norms, linears
        results = {}
        for name in helpers.ENGINE_CONFIGS:
            kwargs, probes, evals = helpers.engine_case(name)
            results[name] = helpers.result_dict(helpers.engine_on(model, **kwargs).compute(probes, evals))
        results["one_rank_fails"] = one_rank_fails(model, rank)
        torch.save(results, out / f"engine-rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def one_rank_fails(model, rank: int) -> dict:
    """Rank 1's forward fails (in the verification, then in a side) while rank 0's does not: every rank must raise,
    none wait or pair this computation with the next; the computation after it is whole on every rank."""
    kwargs, probes, evals = helpers.engine_case("auto")
    outcomes = []
    for verify in (True, False):  # fails in the verification's forward, then in the first side's
        engine = helpers.engine_on(model, **{**kwargs, "verify": verify})
        failing = model.model.layers[0].register_forward_pre_hook(lambda *_: 1 / 0) if rank == 1 else None
        try:
            engine.compute(probes, evals)
            outcomes.append("returned")
        except Exception as err:  # the test reads the type and message
            outcomes.append(f"{type(err).__name__}: {err}")
        finally:
            if failing is not None:
                failing.remove()
    after = helpers.result_dict(helpers.engine_on(model, **kwargs).compute(probes, evals))
    return {"outcomes": outcomes, "after": after}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    modes = {"trainer": run_trainer, "trainer_adam": lambda o: run_trainer(o, "adam"), "engine": run_engine}
    modes[mode](out)


if __name__ == "__main__":
    main()
