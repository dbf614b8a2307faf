"""Self-verification: the engine's per-example gradients checked against autograd on the live model.

The engine reconstructs per-example gradients from module calls it records, and how a module computes is
something it observes, not something it may assume from the module's type. So, before any number is stored, a
few real examples are run through both the engine and plain autograd (``torch.autograd.grad`` of the summed
loss w.r.t. every tracked parameter tensor) and compared block by block:

0. *Same function*: the per-example losses with the engine's hooks attached equal those of the plain model, and
   each example's loss inside a padded micro-batch equals its loss alone.
1. *Batch sum*: for a materialized block, the sum over a micro-batch of the per-example gradients equals the
   autograd gradient of the summed loss; for a ghost block, the sum of the block's Gram matrix equals that
   gradient's squared norm. A parameter the model used without a call the engine saw (an adapter that reads a
   weight directly) fails here: its reconstructed gradient is zero, autograd's is not.
2. *Alone*: each example run alone gives exactly autograd's gradient of its own loss (ghost features are turned
   into dense gradients for this).
3. *No interaction*: the engine's inner products of the examples' gradients computed inside the micro-batch equal
   those of autograd's per-example gradients in the same micro-batch (one backward per example through the same
   graph), so padding, flattened rows, routing or broadcasting cannot mix examples unseen. The oracle is the same
   forward, not the examples run alone: a deep fp32 model's gradients on a padded batch and on a lone example
   differ by rounding (measured up to 4e-4 relative on a LoRA-B of the first of SmolLM2's 30 layers), which says
   nothing about the engine. That difference is measured and reported (``Report.batch_vs_alone``), and the model's
   losses inside and outside a batch are compared (0.).

Every comparison is relative, with a tolerance set by the lowest floating-point precision the forward ran in (or the
precision the engine accumulates in, float32, where that is less precise).
Errors are measured against the block's own gradient norm, floored at ``FLOOR`` times the whole gradient's norm:
a block whose true gradient is zero up to rounding (a key projection's bias under softmax's shift invariance)
holds only rounding noise, and an error that small cannot move any reported inner product by more than
``FLOOR * tolerance`` of its scale. The math lives here; ``engine.py`` runs the passes.

Besides this full check on a sample, the batch-sum check (1.) runs on every micro-batch of every computation
(``check_sums``), so a reconstruction wrong only for inputs absent from the sample is still caught. The full
check runs in float32 even when tracking runs under bf16 autocast, so the tolerance can stay tight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .features import ACC, Feature, Ghost, Materialized, concat, pairwise
from .modules import Block, UnsupportedModelError

# Relative tolerance by the lowest precision seen in the forward.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
FLOOR = 1e-5
_DENSE_LIMIT = 1 << 26  # elements of one dense gradient built to check a ghost feature (256 MiB in fp32)
ISSUES = "report it with the model class, its config and this message on the swift_callbacks issue tracker"


class VerificationError(UnsupportedModelError):
    """The engine's per-example gradients disagree with autograd on the live model; nothing was stored."""


@dataclass
class Pass:
    """One forward/backward of the verification: features and autograd's reference gradient per block."""

    features: list[Feature]
    references: list[torch.Tensor]  # per block: flattened autograd gradient of the summed loss (ACC)
    dtype: torch.dtype  # lowest precision the forward ran in
    losses: torch.Tensor  # per-example losses of the hooked forward
    expanded: list[str] = field(default_factory=list)  # modules whose shared output was expanded per example
    # per block: Gram matrix of autograd's per-example gradients in this micro-batch (the interaction oracle)
    ref_grams: list[torch.Tensor] | None = None
    lengths: list[int] = field(default_factory=list)  # tokens per example, for messages


@dataclass
class Report:
    """What a verification checked and the largest relative error it measured per check."""

    examples: int
    blocks: int
    tolerance: float
    dtype: torch.dtype
    max_error: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: str | None = None
    unchecked: list[str] = field(default_factory=list)  # blocks whose reference gradient was zero: nothing tested
    # The model's own difference between per-example inner products in a padded batch and alone (rounding of
    # other batch shapes in a deep model; informative, not a check of the engine).
    batch_vs_alone: float = 0.0

    @property
    def complete(self) -> bool:
        return self.skipped is None and not self.unchecked


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, 5e-2)


def lowest_precision(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The least precise floating dtype of ``dtypes`` (float32 if none)."""
    floats = [d for d in dtypes if d.is_floating_point]
    return max(floats, key=lambda d: torch.finfo(d).eps, default=torch.float32)


def sample(examples: Sequence, k: int = 3, attempt: int = 0) -> list:
    """Up to ``k`` examples with supervised tokens, of different lengths so padding is exercised.

    The first attempt takes the shortest, the longest and a middle one; later attempts (while some block has not
    been tested yet) draw other examples with a private generator, so the global RNG is untouched.
    """
    supervised = [i for i, e in enumerate(examples) if any(x != -100 for x in list(e["labels"])[1:])]
    pool = supervised or list(range(len(examples)))
    order = sorted(pool, key=lambda i: len(examples[i]["input_ids"]))
    if attempt == 0:
        chosen = list(dict.fromkeys([order[0], order[-1], order[len(order) // 2]]))[:k]
    else:
        g = torch.Generator().manual_seed(attempt)
        chosen = [order[i] for i in torch.randperm(len(order), generator=g)[:k].tolist()]
    return [examples[i] for i in chosen]


def check(blocks: Sequence[Block], batch: Pass, singles: Sequence[Pass], plain_losses: torch.Tensor) -> Report:
    """Run the checks; raise ``VerificationError`` naming the first block that fails.

    Args:
        blocks: The engine's blocks (with routes set).
        batch: The pass over all sampled examples in one micro-batch.
        singles: One pass per sampled example, in the batch's order.
        plain_losses: The same examples' losses from the model without the engine's hooks: the hooks (which may
            hand the model an expanded or aliased output) must not change what the model computes.
    """
    # The engine accumulates in ACC whatever the model's precision, so ACC bounds how exact it can be.
    dtype = lowest_precision([batch.dtype, ACC, *(s.dtype for s in singles)])
    tol = tolerance(dtype)
    report = Report(examples=len(singles), blocks=len(blocks), tolerance=tol, dtype=dtype)
    worst = {"forward": _rel(batch.losses, plain_losses.to(batch.losses), 0.0),
             "batch_sum": 0.0, "alone": 0.0, "interaction": 0.0}  # fmt: skip
    if worst["forward"] > tol:
        raise VerificationError(
            f"Influence verification failed: with the engine's hooks attached the model computes different losses "
            f"(relative difference {worst['forward']:.2e}, tolerance {tol:.0e}), so the engine would score another "
            f"function than the one trained{_expansion_hint(batch)}. No influence was stored; {ISSUES}."
        )
    alone = torch.cat([s.losses for s in singles])
    worst["batching"] = _rel(batch.losses, alone.to(batch.losses), 0.0)
    if worst["batching"] > tol:
        raise VerificationError(
            "Influence verification failed: an example's loss computed inside a padded micro-batch differs from its "
            f"loss computed alone (relative difference {worst['batching']:.2e}, tolerance {tol:.0e}), so the model "
            "mixes examples or depends on padding and per-example influence is not defined for it. Try "
            f"micro_batch_size=1 (no padding){_expansion_hint(batch)}; otherwise {ISSUES}."
        )
    floor = FLOOR * _total(batch)
    single_floors = [FLOOR * _total(s) for s in singles]
    assert batch.ref_grams is not None, "the batch pass of a verification carries per-example reference Grams"
    example_floors = FLOOR * torch.stack([g.diagonal() for g in batch.ref_grams]).sum(0).clamp_min(0).sqrt()
    for k, block in enumerate(blocks):
        err, param = _batch_sum(block, batch.features[k], batch.references[k], floor)
        worst["batch_sum"] = max(worst["batch_sum"], err)
        if err > tol:
            _fail(block, param, err, tol, dtype, "the per-example gradients summed over a micro-batch differ from "
                  "autograd's gradient of the summed loss")  # fmt: skip
        for single, single_floor in zip(singles, single_floors, strict=True):
            err, param = _alone(block, single.features[k], single.references[k], single_floor)
            worst["alone"] = max(worst["alone"], err)
            if err > tol:
                _fail(block, param, err, tol, dtype, "an example's gradient computed alone differs from autograd's")
        err, pair = _interaction(pairwise(batch.features[k], batch.features[k]), batch.ref_grams[k], example_floors)
        worst["interaction"] = max(worst["interaction"], err)
        if err > tol:
            _fail(block, block.param_names[0], err, tol, dtype, "examples interact: the engine's inner product of "
                  f"examples {pair[0]} and {pair[1]} of a padded micro-batch (lengths {batch.lengths}) differs from "
                  "that of autograd's per-example gradients in the same micro-batch")  # fmt: skip
        alone = pairwise(concat([s.features[k] for s in singles]), concat([s.features[k] for s in singles]))
        report.batch_vs_alone = max(report.batch_vs_alone, _interaction(alone, batch.ref_grams[k], example_floors)[0])
    report.max_error = worst
    # A block whose gradient on these examples is zero or below the floor (LoRA's A matrices while B is still
    # zero, at step 0) passed without being tested; the engine checks again at its next computation.
    report.unchecked = [b.name for b, ref in zip(blocks, batch.references, strict=True) if float(ref.norm()) <= floor]
    return report


def check_sums(blocks: Sequence[Block], batch: Pass) -> float:
    """The batch-sum check alone, for one micro-batch of a computation; returns the largest error or raises.

    It runs on every micro-batch (``verify`` on): a parameter whose reconstruction is wrong only for some inputs
    (tokens absent from the verification sample, a path that opens later in training) is caught where it shows.
    """
    tol = tolerance(batch.dtype)
    floor = FLOOR * _total(batch)
    worst = 0.0
    for k, block in enumerate(blocks):
        err, param = _batch_sum(block, batch.features[k], batch.references[k], floor)
        worst = max(worst, err)
        if err > tol:
            _fail(block, param, err, tol, batch.dtype, "in a micro-batch of this computation, the per-example "
                  "gradients summed differ from autograd's gradient of the summed loss")  # fmt: skip
    return worst


def _expansion_hint(batch: Pass) -> str:
    if not batch.expanded:
        return ""
    return (
        f" (the engine gave each example its own copy of the output of {batch.expanded[0]!r}, which the model "
        "computes once for the whole batch; the model's code seems to depend on that output's batch size of 1)"
    )


def _total(p: Pass) -> float:
    """Norm of the whole reference gradient of a pass (all blocks)."""
    return math.sqrt(sum(float((r * r).sum()) for r in p.references))


def _rel(x: torch.Tensor, ref: torch.Tensor, floor: float) -> float:
    scale = max(float(ref.norm()), float(x.norm()), floor)
    if scale == 0.0:
        return 0.0
    if not math.isfinite(scale):
        return math.inf
    return float((x - ref).norm()) / scale


def _worst_param(block: Block, x: torch.Tensor, ref: torch.Tensor, floor: float) -> tuple[float, str]:
    """Largest relative error over the block's parameters (slices of the flattened gradients)."""
    worst, name, offset = 0.0, block.param_names[0], 0
    for param, shape in zip(block.param_names, block.shapes, strict=True):
        n = shape.numel()
        err = _rel(x[offset : offset + n], ref[offset : offset + n], floor)
        if err > worst:
            worst, name = err, param
        offset += n
    return worst, name


def _batch_sum(block: Block, feature: Feature, ref: torch.Tensor, floor: float) -> tuple[float, str]:
    if isinstance(feature, Materialized):
        return _worst_param(block, feature.vec.sum(0), ref, floor)
    gram = float(pairwise(feature, feature).sum())
    expected = float((ref * ref).sum())
    scale = max(abs(expected), abs(gram), floor * floor)
    err = 0.0 if scale == 0 else abs(gram - expected) / scale / 2  # a squared norm: halve to compare like for like
    return err, block.param_names[0]


def _alone(block: Block, feature: Feature, ref: torch.Tensor, floor: float) -> tuple[float, str]:
    dense = densify(block, feature)
    if dense is not None:
        return _worst_param(block, dense[0], ref, floor)
    norm = float(pairwise(feature, feature)[0, 0])
    expected = float((ref * ref).sum())
    scale = max(abs(expected), abs(norm), floor * floor)
    return (0.0 if scale == 0 else abs(norm - expected) / scale / 2), block.param_names[0]


def _interaction(gram: torch.Tensor, reference: torch.Tensor, floors: torch.Tensor) -> tuple[float, tuple[int, int]]:
    """Largest error of a Gram matrix against the reference one, per pair relative to the product of the two
    examples' gradient norms (floored); and the pair where it is."""
    scale = torch.maximum(reference.diagonal().clamp_min(0).sqrt(), floors.to(reference))
    bound = scale[:, None] * scale[None, :]
    diff = (gram.to(reference) - reference).abs()
    if float(bound.max()) == 0.0:
        return (0.0 if float(diff.max()) == 0.0 else math.inf), (0, 0)
    ratio = diff / bound.clamp_min(1e-30)
    at = int(ratio.argmax())
    return float(ratio.max()), divmod(at, ratio.shape[1])


def densify(block: Block, feature: Feature) -> torch.Tensor | None:
    """Per-example flattened gradients of a feature, or None when a ghost block's would be too large."""
    if isinstance(feature, Materialized):
        return feature.vec
    assert isinstance(feature, Ghost)
    module = block.modules[0][1]
    n = len(feature)
    if block.kind == "embedding":
        if module.num_embeddings * module.embedding_dim > _DENSE_LIMIT:
            return None
        weight = torch.zeros(n, module.num_embeddings, module.embedding_dim, dtype=ACC, device=feature.g.device)
        weight.scatter_add_(1, feature.a.unsqueeze(-1).expand(-1, -1, feature.g.shape[-1]), feature.g.to(ACC))
        return weight.reshape(n, -1)
    if feature.a.shape[-1] * feature.g.shape[-1] > _DENSE_LIMIT:
        return None
    grad = torch.einsum("nto,nti->noi", feature.g.to(ACC), feature.a.to(ACC))  # (n, d_out, d_in [+ bias column])
    weight, bias = grad, None
    if feature.a.shape[-1] != module.in_features:  # the appended ones column carries the bias gradient
        weight, bias = grad[..., :-1], grad[..., -1]
    parts = [weight.reshape(n, -1)] + ([bias] if bias is not None else [])
    return torch.cat(parts, dim=1)


def _fail(block: Block, param: str, err: float, tol: float, dtype: torch.dtype, what: str) -> None:
    module_name, module = block.modules[0]
    raise VerificationError(
        f"Influence verification failed for parameter {param!r} (module {module_name!r}, "
        f"{type(module).__name__}, {block.route} route): {what} by {err:.2e} (relative; tolerance {tol:.0e} for "
        f"{str(dtype).removeprefix('torch.')}). No influence was stored. Exclude this parameter with param_filter, "
        f"or {ISSUES}."
    )
