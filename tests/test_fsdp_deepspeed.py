"""The engine on DeepSpeed ZeRO-2 and ZeRO-3 engines (torchrun, 2 ranks, gloo, ``DS_ACCELERATOR=cpu``).

Skipped without DeepSpeed (not a dependency of the project). Under ZeRO-3 the parameters are partitioned
(``p.numel() == 0``, the real shape in ``ds_shape``) and the engine is handed ``engine.module``, as the Trainer
hands it to callbacks.
"""

from __future__ import annotations

import importlib.util

import fsdp_worker as worker
import pytest
from test_fsdp import check_flags, check_results, run_worker

# Looked up, not imported: importing DeepSpeed picks an accelerator and patches torch in this process.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory) -> list[dict]:
    return run_worker("deepspeed", tmp_path_factory.mktemp("deepspeed"), env={"DS_ACCELERATOR": "cpu"})


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 2])
def test_zero_matches_oracles(ds_run, stage):
    names = set(ds_run[0]["results"])
    for variant in worker.VARIANTS:
        assert {f"zero{stage}/{variant}/{route}" for route in worker.ROUTES} <= names
    print(f"zero{stage} worst rel err", check_results(ds_run, (f"zero{stage}/",)))


@pytest.mark.slow
def test_zero_leaves_training_state_alone(ds_run):
    """``.grad`` stays None, ZeRO-3 parameters were partitioned and no module keeps parameters gathered for a
    backward, and the next optimizer step is bit-identical with and without the engine."""
    check_flags(ds_run, ("zero3/", "zero2/"))
    checks = ds_run[0]["checks"]
    assert all(checks[f"zero3/{v}"]["partitioned_before"] for v in worker.VARIANTS)
    assert all(checks[f"zero3/{v}"]["gathered_after"] == 0 for v in worker.VARIANTS)
    assert {"zero3/lora/training", "zero3/full-untied/training", "zero2/lora/training"} <= set(checks)
