"""Engine options declared once (``InfluenceArguments``) and the score-variant seam."""

from __future__ import annotations

import pytest
import torch
from test_engine import EVALS, PROBES, brute_grads, tiny_model

from swift_callbacks.configuration import ConfigError
from swift_callbacks.influence import InfluenceArguments, InfluenceEngine
from swift_callbacks.influence.features import Ghost, Materialized
from swift_callbacks.influence.variants import SCORE_VARIANTS, ScoreVariant, register_variant


@register_variant
class _Scaled(ScoreVariant):
    """Test variant: every feature scaled by ``factor`` (inner products scale by factor squared)."""

    name = "test-scaled"

    def __init__(self, factor: float = 2.0) -> None:
        self.factor = factor
        self.seen: list[str] = []

    def transform(self, blocks, features, side):
        self.seen.append(side)
        out = []
        for f in features:
            if isinstance(f, Ghost):
                out.append(Ghost(f.a, f.g * self.factor))
            else:
                out.append(Materialized(f.vec * self.factor))
        return out


def test_a_registered_variant_is_used_by_the_engine_and_checked_on_exact_gradients():
    model = tiny_model()
    exact = InfluenceEngine(model).compute(PROBES, EVALS)
    engine = InfluenceEngine(model, score="test-scaled", score_options={"factor": 3.0})
    scaled = engine.compute(PROBES, EVALS)
    assert {"probe", "eval"} <= set(engine.variant.seen)
    torch.testing.assert_close(scaled.dot, exact.dot * 9, rtol=1e-5, atol=0)  # scaled in fp32
    torch.testing.assert_close(scaled.eval_sq_norm, exact.eval_sq_norm * 9, rtol=1e-5, atol=0)
    # The default variant is the exact inner product of full per-example gradients (brute force).
    params = [p for p in model.parameters() if p.requires_grad]
    g_p, g_e = brute_grads(model, PROBES, params), brute_grads(model, EVALS, params)
    torch.testing.assert_close(exact.dot, (g_p @ g_e.T).double(), rtol=1e-4, atol=1e-6)


def test_options_are_checked_once_with_names_and_suggestions():
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"rout: unknown influence option; did you mean 'route'"):
        InfluenceEngine(model, rout="ghost")
    with pytest.raises(ConfigError, match=r"score: unknown score variant 'exakt'; did you mean 'exact'"):
        InfluenceEngine(model, score="exakt")
    with pytest.raises(ConfigError, match=r"param_filter: not a valid regex"):
        InfluenceArguments(param_filter="(").check()
    with pytest.raises(ConfigError, match="not both"):
        InfluenceEngine(model, args=InfluenceArguments(), route="ghost")
    args = InfluenceArguments.from_config({"max_feature_bytes": "1MiB", "verify": "once", "precision": "fp32"},
                                          "influence.engine")  # fmt: skip
    assert (args.max_feature_bytes, args.verify, args.precision) == (1 << 20, "once", "fp32")
    with pytest.raises(
        ConfigError,
        match=r"influence.engine.verify: expected a boolean, 'once' / 'every_save', got the string 'always'",
    ):
        InfluenceArguments.from_config({"verify": "always"}, "influence.engine")
    assert "exact" in SCORE_VARIANTS and SCORE_VARIANTS["exact"].exact


def test_every_field_has_help():
    import dataclasses

    for f in dataclasses.fields(InfluenceArguments):
        assert len(f.metadata.get("help", "")) > 20, f.name
