"""Multi-process worker for the sharded-model tests: ``torchrun --nproc_per_node 2 tests/fsdp_worker.py MODE OUT``.

Modes:
    fsdp       ``InfluenceEngine.compute`` on tiny Llamas sharded with FSDP2 (``fully_shard`` per decoder layer and
               on the root) and FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``), gloo on CPU.
    deepspeed  The same on DeepSpeed ZeRO-2 and ZeRO-3 engines (``DS_ACCELERATOR=cpu``, gloo).

Every rank writes ``OUT/MODE-rank{r}.pt``: ``{"results": {config: InfluenceResult fields}, "checks": {config:
{check: value}}, "seconds": {config: seconds}, "configs": {config: engine keyword arguments}}``. Config names are
``scheme/variant/setting``. The test compares the results with single-process oracles.

Also importable (no side effects) for the builders shared with the test: ``build``, ``examples``, ``VARIANTS``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

VOCAB = 97
# Set sizes that do not divide by the world size (2): ranks get padded shares.
N_PROBE, N_EVAL = 5, 3
# Model variants: LoRA (adapters on every linear), and full fine-tuning with tied and untied embeddings (every
# parameter kind: embedding/lm_head, shared, linear, RMSNorm through the generic route).
VARIANTS = ("lora", "full-tied", "full-untied")
ROUTES = ("auto", "ghost", "materialize")


def build(variant: str) -> nn.Module:
    """A tiny Llama from config, identical on every rank and process for the same ``variant``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=variant == "full-tied", pad_token_id=0,
    )  # fmt: skip
    with torch.random.fork_rng():  # LoRA's initialisation draws from the global RNG too
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        if variant != "lora":
            return model
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    with torch.no_grad():  # LoRA B starts at zero; give it values so every path carries gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def examples() -> tuple[list[dict], list[dict]]:
    """``N_PROBE`` probes and ``N_EVAL`` evaluation examples of mixed lengths, prompt tokens masked."""

    def make(lengths: tuple[int, ...], prompt: int, seed: int) -> list[dict]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for n in lengths:
            ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
            out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        return out

    return make((7, 12, 5, 9, 16), 3, seed=1), make((6, 10, 8), 2, seed=2)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = model.base_model.model if hasattr(model, "peft_config") else model
    return inner.model.layers


def result_dict(result) -> dict[str, torch.Tensor]:
    return {k: getattr(result, k) for k in result.__dataclass_fields__}


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, seed: int) -> None:
    """One AdamW step on the full causal-LM loss, in train mode (LoRA dropout drawn from a seeded global RNG)."""
    torch.manual_seed(seed)
    model.train()
    ids = torch.tensor([batch["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ FSDP


def fsdp2(variant: str, reshard_after_forward: bool = True) -> nn.Module:
    return fsdp2_in_place(build(variant), reshard_after_forward)


def fsdp2_in_place(model: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` on every decoder layer, then on the root (as accelerate's FSDP2 plugin does)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def fsdp1(variant: str) -> nn.Module:
    return fsdp1_wrap(build(variant))


def fsdp1_wrap(model: nn.Module) -> nn.Module:
    """FSDP1 with the original parameters exposed, one unit per decoder layer plus the root."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return FullyShardedDataParallel(
        model,
        use_orig_params=True,
        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
        device_id=torch.device("cpu"),
    )


def local_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's values of every parameter (a DTensor's local shard), cloned."""
    out = {}
    for name, p in model.named_parameters():
        value = p.to_local() if hasattr(p, "to_local") else p
        out[name] = value.detach().clone()
    return out


def run_fsdp(out: Path) -> dict[str, Any]:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from swift_callbacks.influence import InfluenceEngine

    probes, evals = examples()
    results, checks, seconds, configs = {}, {}, {}, {}

    def run(name: str, model: nn.Module, **kwargs) -> None:
        start = time.perf_counter()
        results[name] = result_dict(InfluenceEngine(model, **kwargs).compute(probes, evals))
        seconds[name] = time.perf_counter() - start
        configs[name] = kwargs

    for variant in VARIANTS:
        model = fsdp2(variant)
        model.train()  # the engine switches to eval and must come back to train
        for route in ROUTES:
            run(f"fsdp2/{variant}/{route}", model, route=route, micro_batch_size=2)
        sharded = all(isinstance(p, DTensor) for p in model.parameters())
        checks[f"fsdp2/{variant}"] = {
            "grad_none": all(p.grad is None for p in model.parameters()),
            "resharded": sharded,
            "train_mode": all(m.training for m in model.modules()),
        }
    # A one-byte feature budget: evaluation chunks of one example, fewer than the ranks (one rank repeats it).
    run("fsdp2/full-untied/chunked", fsdp2("full-untied"), route="ghost", micro_batch_size=3, max_feature_bytes=1)
    # Parameters kept unsharded between forward and backward (ZeRO-2-like).
    run("fsdp2/full-tied/no-reshard", fsdp2("full-tied", reshard_after_forward=False), micro_batch_size=2)
    # Engine built while the root is unsharded (after a forward without backward), then used.
    model = fsdp2("full-tied")
    model.unshard()  # the root's parameters only: plain unsharded Parameters (other objects) on its modules
    checks["fsdp2/full-tied/built-unsharded"] = {"root_unsharded": not isinstance(model.lm_head.weight, DTensor)}
    start = time.perf_counter()
    engine = InfluenceEngine(model, micro_batch_size=2)
    model.reshard()
    results["fsdp2/full-tied/built-unsharded"] = result_dict(engine.compute(probes, evals))
    seconds["fsdp2/full-tied/built-unsharded"] = time.perf_counter() - start
    configs["fsdp2/full-tied/built-unsharded"] = {"micro_batch_size": 2}

    # Activation checkpointing as accelerate applies it under FSDP (checkpoint_wrapper around each decoder layer): it
    # recomputes the layer inside backward even in eval mode, re-firing the capture hooks and FSDP's unshard.
    model = build("full-tied")
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: isinstance(m, LlamaDecoderLayer)
    )
    run("fsdp2/full-tied/checkpointed", fsdp2_in_place(model), micro_batch_size=2)
    # bf16 parameters in forward/backward (MixedPrecisionPolicy): runs, inner products still accumulated in fp32,
    # and close to the fp32 result (bf16 activations: ~1e-2).
    model = build("full-tied")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    bf16 = InfluenceEngine(model, micro_batch_size=2).compute(probes, evals).dot
    fp32 = results["fsdp2/full-tied/auto"]["dot"]
    checks["fsdp2/full-tied/bf16"] = {"close": bool((bf16 - fp32).abs().max() <= 2e-2 * fp32.abs().max())}

    # Engine built on the plain model, which is then sharded in place (the engine keeps no parameter tensors).
    model = build("full-untied")
    engine = InfluenceEngine(model, route="materialize", micro_batch_size=2)
    model = fsdp2_in_place(model)
    start = time.perf_counter()
    results["fsdp2/full-untied/built-before-sharding"] = result_dict(engine.compute(probes, evals))
    seconds["fsdp2/full-untied/built-before-sharding"] = time.perf_counter() - start
    configs["fsdp2/full-untied/built-before-sharding"] = {"route": "materialize", "micro_batch_size": 2}

    # Existing gradients and the next optimizer step are untouched: step, (backward, engine | backward), step.
    for variant in ("lora", "full-tied"):
        states = []
        for with_engine in (True, False):
            model = fsdp2(variant)
            optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
            train_step(model, optimizer, probes[1], seed=1)
            torch.manual_seed(2)
            ids = torch.tensor([probes[2]["input_ids"]])
            model(input_ids=ids, labels=ids).loss.backward()  # reduce-scattered, sharded .grad
            grads = {n: p.grad.to_local().clone() for n, p in model.named_parameters() if p.grad is not None}
            if with_engine:
                rng = torch.get_rng_state()
                InfluenceEngine(model, micro_batch_size=2).compute(probes, evals)
                torch.set_rng_state(rng)  # the engine draws nothing; restore anyway so both runs see one stream
                after = {n: p.grad.to_local() for n, p in model.named_parameters() if p.grad is not None}
                checks[f"fsdp2/{variant}/grads"] = {
                    "same_keys": after.keys() == grads.keys() and bool(grads),
                    "bit_identical": all(torch.equal(grads[n], after[n]) for n in grads),
                }
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_step(model, optimizer, probes[3], seed=3)
            states.append(local_params(model))
        checks[f"fsdp2/{variant}/training"] = {
            "bit_identical": all(torch.equal(states[0][n], states[1][n]) for n in states[0]),
        }
    # With unused parameters reduce-scattered, FSDP2's post-backward would write zero gradients into .grad unless
    # the engine turns gradient reduction off.
    model = fsdp2("lora")
    assert isinstance(model, FSDPModule)
    model.set_reduce_scatter_unused_params(True)
    InfluenceEngine(model, micro_batch_size=4).compute(probes, evals)
    checks["fsdp2/lora/reduce-unused"] = {"grad_none": all(p.grad is None for p in model.parameters())}

    for variant in VARIANTS:
        model = fsdp1(variant)
        for route in ROUTES:
            run(f"fsdp1/{variant}/{route}", model, route=route, micro_batch_size=2)
        checks[f"fsdp1/{variant}"] = {"grad_none": all(p.grad is None for p in model.parameters())}
    for variant in ("lora", "full-untied"):
        states = []
        for with_engine in (True, False):
            model = fsdp1(variant)
            optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
            train_step(model, optimizer, probes[1], seed=1)
            if with_engine:
                InfluenceEngine(model, micro_batch_size=2).compute(probes, evals)
            train_step(model, optimizer, probes[3], seed=3)
            states.append(local_params(model))
        checks[f"fsdp1/{variant}/training"] = {
            "bit_identical": all(torch.equal(states[0][n], states[1][n]) for n in states[0]),
        }
    # Passing the inner module instead of the FSDP1 root is refused with a clear message, also when the engine
    # was built before the wrapping (then at compute time, on every rank alike, before any collective).
    try:
        InfluenceEngine(fsdp1("lora").module)
        checks["fsdp1/inner-module"] = {"refused": False}
    except ValueError as err:
        checks["fsdp1/inner-module"] = {"refused": "model_wrapped" in str(err)}
    model = build("lora")
    engine = InfluenceEngine(model)
    fsdp1_wrap(model)
    try:
        engine.compute(probes, evals)
        checks["fsdp1/wrapped-after-set-up"] = {"refused": False}
    except ValueError as err:
        checks["fsdp1/wrapped-after-set-up"] = {"refused": "model_wrapped" in str(err)}
    return {"results": results, "checks": checks, "seconds": seconds, "configs": configs}


# ------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_engine(variant: str, stage: int, reentrant_checkpointing: bool = False):
    import deepspeed

    model = build(variant)
    if reentrant_checkpointing:  # what TRL forces for PEFT under ZeRO-3
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # No persistent parameters: every parameter is partitioned outside its module's forward, as the large
        # ones of a real model are (the default threshold would keep all of these tiny ones whole after step 1).
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def ds_step(engine, batch: dict, seed: int) -> None:
    torch.manual_seed(seed)
    engine.train()
    ids = torch.tensor([batch["input_ids"]])
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()


def gathered(module: nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def run_deepspeed(out: Path) -> dict[str, Any]:
    import deepspeed

    from swift_callbacks.influence import InfluenceEngine

    deepspeed.init_distributed(dist_backend="gloo")
    probes, evals = examples()
    results, checks, seconds, configs = {}, {}, {}, {}
    for stage in (3, 2):
        for variant in VARIANTS:
            engine = deepspeed_engine(variant, stage)
            module = engine.module  # what the Trainer hands to callbacks under DeepSpeed
            partitioned = [p.numel() == 0 and tuple(p.ds_shape) != (0,) for p in module.parameters()]
            for route in ROUTES:
                name = f"zero{stage}/{variant}/{route}"
                start = time.perf_counter()
                result = InfluenceEngine(module, route=route, micro_batch_size=2).compute(probes, evals)
                seconds[name] = time.perf_counter() - start
                results[name] = result_dict(result)
                configs[name] = {"route": route, "micro_batch_size": 2}
            check = {"grad_none": all(p.grad is None for p in module.parameters())}
            if stage == 3:
                check["partitioned_before"] = all(partitioned)
                # No module left holding parameters it gathered for a backward (ZeRO-3 refuses to free those).
                check["none_active_after"] = not any(p.ds_active_sub_modules for p in module.parameters())
                check["gathered_after"] = sum(p.numel() > 0 for p in module.parameters())
            checks[f"zero{stage}/{variant}"] = check
    # Reentrant activation checkpointing, model in train mode: autograd.grad would fail inside checkpointed
    # segments, but the engine runs in eval mode, where transformers does not checkpoint; the mode comes back.
    engine = deepspeed_engine("lora", 3, reentrant_checkpointing=True)
    engine.module.train()
    name = "zero3/lora/reentrant-checkpointing"
    start = time.perf_counter()
    results[name] = result_dict(InfluenceEngine(engine.module, micro_batch_size=2).compute(probes, evals))
    seconds[name] = time.perf_counter() - start
    configs[name] = {"micro_batch_size": 2}
    checks[name] = {"train_mode": all(m.training for m in engine.module.modules())}

    for stage in (3, 2):
        for variant in ("lora", "full-untied"):
            states = []
            for with_engine in (True, False):
                engine = deepspeed_engine(variant, stage)
                ds_step(engine, probes[1], seed=1)
                if with_engine:
                    InfluenceEngine(engine.module, micro_batch_size=2).compute(probes, evals)
                ds_step(engine, probes[3], seed=3)
                states.append(gathered(engine.module) if stage == 3 else local_params(engine.module))
            checks[f"zero{stage}/{variant}/training"] = {
                "bit_identical": all(torch.equal(states[0][n], states[1][n]) for n in states[0]),
            }
    return {"results": results, "checks": checks, "seconds": seconds, "configs": configs}


MODES: dict[str, Callable[[Path], dict[str, Any]]] = {"fsdp": run_fsdp, "deepspeed": run_deepspeed}


def torchrun(mode: str, out: Path, timeout_s: int = 240, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run this worker in ``mode`` on 2 CPU processes; returns ``(exit code, last output)``."""
    import subprocess

    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    full_env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(Path(__file__).resolve()), mode, str(out)]
    try:
        proc = subprocess.run(cmd, env=full_env, cwd=HERE.parent, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        return -1, f"timed out after {timeout_s}s\n{err.stdout!s:.4000}\n{err.stderr!s:.4000}"
    return proc.returncode, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if mode != "deepspeed":
        dist.init_process_group("gloo")
    try:
        start = time.perf_counter()
        payload = MODES[mode](out)
        payload["total_seconds"] = time.perf_counter() - start
        torch.save(payload, out / f"{mode}-rank{dist.get_rank()}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
