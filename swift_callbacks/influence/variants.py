"""Score variants: how the engine's per-example gradient features become influence scores.

A variant is one registered subclass of :class:`ScoreVariant`; the engine calls :meth:`ScoreVariant.transform` on
every micro-batch's block features (after they have been checked against autograd, so verification always
concerns the exact gradients) and takes inner products and norms of what it returns. ``exact`` (the default)
returns them unchanged: scores are inner products of the full per-example gradients. Approximate variants (a
random projection, optimizer preconditioning) go here as further subclasses, each declaring ``exact = False``
so reports can say so.

Example::

    @register_variant
    class Halved(ScoreVariant):  # materialize route only, for the example
        name = "halved"

        def transform(self, blocks, features, side):
            return [Materialized(f.vec * 0.5) for f in features]
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..configuration import ConfigError, suggest
from .features import ACC, Feature, Ghost, Materialized
from .modules import Block

SCORE_VARIANTS: dict[str, type[ScoreVariant]] = {}


class ScoreVariant:
    """Base class of score variants.

    Attributes:
        name: The registry key (``InfluenceArguments.score``).
        exact: Whether scores equal inner products of the full per-example gradients.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    materialized: ClassVar[bool] = False  # needs per-example gradients as vectors (forces the materialize route)
    reads_optimizer: ClassVar[bool] = False  # needs the optimizer's state (none before the first step)

    def __init__(self, **options: Any) -> None:
        if options:
            raise ConfigError(f"score variant {self.name!r} takes no options, got {sorted(options)}")

    @property
    def label(self) -> str:
        """How the history records the variant: its name, with its options when it has any."""
        return self.name

    def check_blocks(self, model: Any, blocks: Sequence[Block]) -> None:
        """Called when the engine is built: refuse blocks the variant cannot serve (``ConfigError``)."""

    def setup(self, model: Any, blocks: Sequence[Block], optimizer: Any = None) -> None:
        """Called before each computation with the live optimizer, if any (to read its state, or draw
        projections per block)."""

    def feature_numel(self, block: Block) -> int | None:
        """Numbers per example :meth:`transform` keeps for ``block`` (sizes the held side's chunks); None: as the
        exact route keeps them."""
        return None

    def transform(self, blocks: Sequence[Block], features: list[Feature], side: str) -> list[Feature]:
        """The features scores are computed from, one per block, for a micro-batch of ``side`` (``"probe"`` or
        ``"eval"``)."""
        raise NotImplementedError


def register_variant(cls: type[ScoreVariant]) -> type[ScoreVariant]:
    """Class decorator: make ``cls`` available as ``InfluenceArguments(score=cls.name)``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    if cls.name in SCORE_VARIANTS and SCORE_VARIANTS[cls.name] is not cls:
        raise ValueError(f"score variant {cls.name!r} is already registered ({SCORE_VARIANTS[cls.name].__name__})")
    SCORE_VARIANTS[cls.name] = cls
    return cls


def make_variant(name: str, options: dict[str, Any] | None = None) -> ScoreVariant:
    """The variant registered as ``name``.

    Raises:
        ConfigError: No such variant (with the closest name), or options it does not take.
    """
    cls = SCORE_VARIANTS.get(name)
    if cls is None:
        raise ConfigError(f"unknown score variant {name!r}; {suggest(name, list(SCORE_VARIANTS))}")
    return cls(**(options or {}))


@register_variant
class ExactScore(ScoreVariant):
    """Inner products of the full per-example gradients (the paper's RelInf, exact)."""

    name = "exact"
    exact = True

    def transform(self, blocks: Sequence[Block], features: list[Feature], side: str) -> list[Feature]:
        return features


_DENSE_LIMIT_BYTES = 1 << 30  # largest dense projection matrix one block may hold


@register_variant
class RandomProjection(ScoreVariant):
    """Inner products of seeded Gaussian random projections of each block's per-example gradient (approximate).

    A linear or embedding block's gradient is a matrix ``M`` (``d_out x d_in`` for a linear map, with a bias
    column when its bias is tracked; ``vocabulary x width`` for an embedding). It is projected on both sides,
    ``P_leftᵀ M P_right`` (a Kronecker-structured projection, as in LoGra), which the ghost route computes from the
    per-token factors without ever forming ``M``. Any other block's flattened gradient gets one dense projection.
    Entries are ``N(0, 1/k)``, so a projected inner product is an unbiased estimate of the exact one; a factor no
    wider than its target is kept as it is (that side is exact), and a block of at most ``dim`` numbers is not
    projected at all. The matrices come from a private generator seeded by ``seed`` and the block's name: the same
    numbers at every save, on every rank, and the training's random state untouched.

    Args:
        dim: Target dimension per block (about ``dim`` numbers per example and block are kept).
        seed: Seed of the projections.
    """

    name = "projection"
    exact = False

    def __init__(self, dim: int = 256, seed: int = 0) -> None:
        for key, value, low in (("dim", dim, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"score variant 'projection': {key} must be an integer >= {low}, got {value!r}")
        self.dim, self.seed = dim, seed
        self._maps: dict[str, _Projection] = {}

    @property
    def label(self) -> str:
        return f"projection(dim={self.dim}, seed={self.seed})"

    def check_blocks(self, model: Any, blocks: Sequence[Block]) -> None:
        self.setup(model, blocks)

    def setup(self, model: Any, blocks: Sequence[Block], optimizer: Any = None) -> None:
        for block in blocks:
            if block.name not in self._maps:
                self._maps[block.name] = _Projection.for_block(block, self.dim, self.seed)

    def feature_numel(self, block: Block) -> int:
        return self._maps[block.name].numel if block.name in self._maps else self.dim

    def transform(self, blocks: Sequence[Block], features: list[Feature], side: str) -> list[Feature]:
        return [Materialized(self._maps[b.name].apply(b, f)) for b, f in zip(blocks, features, strict=True)]


@register_variant
class AdamPreconditioned(ScoreVariant):
    """Probe gradients preconditioned by the live Adam second moments, as LESS scores training examples.

    Each probe example's gradient is divided elementwise by ``sqrt(v̂) + eps``, where ``v̂`` is the optimizer's
    bias-corrected ``exp_avg_sq`` of that parameter at the save (read, never changed); evaluation gradients and
    their norms stay plain, so RelInf keeps the paper's denominator. The state must be a plain PyTorch Adam /
    AdamW state holding every tracked parameter whole: a sharded optimizer (DeepSpeed ZeRO, FSDP) or another
    optimizer is refused with a message, and so is a computation before the first optimizer step (no state yet).
    Data-parallel training (DDP) keeps the same state on every rank and works as is.

    Args:
        eps: The ``eps`` added to ``sqrt(v̂)``; default: the optimizer's own.
    """

    name = "adam"
    exact = False
    materialized = True  # an elementwise scaling of the gradient does not factorize over tokens
    reads_optimizer = True

    def __init__(self, eps: float | None = None) -> None:
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0):
            raise ConfigError(f"score variant 'adam': eps must be a number > 0, got {eps!r}")
        self.eps = eps
        self._scale: dict[str, torch.Tensor] = {}

    @property
    def label(self) -> str:
        return "adam" if self.eps is None else f"adam(eps={self.eps:g})"

    def setup(self, model: Any, blocks: Sequence[Block], optimizer: Any = None) -> None:
        if optimizer is None:
            raise ConfigError(
                "score variant 'adam' reads the live optimizer's state; it works in InfluenceCallback during "
                "training (or pass optimizer= to InfluenceEngine.compute), not on a saved checkpoint."
            )
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self._scale = {b.name: torch.cat([self._inverse_scale(model, optimizer, groups, n) for n in b.param_names])
                       for b in blocks}  # fmt: skip

    def _inverse_scale(self, model: Any, optimizer: Any, groups: dict, name: str) -> torch.Tensor:
        param = model.get_parameter(name)
        state = optimizer.state.get(param) or {}
        group = groups.get(id(param))
        if group is None or "exp_avg_sq" not in state or "betas" not in group:
            what = (
                "holds no Adam state for it yet (no optimizer step has been taken)"
                if group is not None
                else ("does not hold it (a sharded optimizer such as DeepSpeed ZeRO or FSDP, or another optimizer)")
            )
            raise ConfigError(f"score variant 'adam': the optimizer {what}: parameter {name!r}. Use score='exact', "
                              "or compute only after the first step (no at_step_zero).")  # fmt: skip
        v = state["exp_avg_sq"]
        if v.shape != param.shape:
            raise ConfigError(f"score variant 'adam': the Adam state of {name!r} has shape {tuple(v.shape)}, the "
                              f"parameter {tuple(param.shape)} (a sharded optimizer?); use score='exact'.")  # fmt: skip
        step = float(state["step"])
        correction = 1.0 - group["betas"][1] ** step
        eps = self.eps if self.eps is not None else group["eps"]
        return ((v.detach().to(ACC) / correction).sqrt() + eps).reciprocal().flatten()

    def transform(self, blocks: Sequence[Block], features: list[Feature], side: str) -> list[Feature]:
        if side == "eval":
            return features
        return [Materialized(f.vec * self._scale[b.name].to(f.vec.device)) for b, f in zip(blocks, features,
                                                                                             strict=True)]  # fmt: skip


class _Projection:
    """The projection of one block: two factors (``left``, ``right``; None keeps a side as it is) or one dense
    matrix (None: the block is kept as it is)."""

    def __init__(self, left=None, right=None, dense=None, shape=None, numel: int = 0) -> None:
        self.left, self.right, self.dense, self.shape, self.numel = left, right, dense, shape, numel

    @classmethod
    def for_block(cls, block: Block, dim: int, seed: int) -> _Projection:
        gen = torch.Generator(device="cpu")
        digest = hashlib.sha256(f"{seed}:{block.name}".encode()).digest()
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        shape = _matrix_shape(block)
        if block.numel <= dim:  # kept as it is (a matrix still: a ghost feature is summed into one)
            return cls(shape=shape, numel=block.numel)
        if shape is not None:
            rows, cols = shape
            k_left = min(rows, math.ceil(math.sqrt(dim)))
            k_right = min(cols, math.ceil(dim / k_left))
            left = None if k_left == rows else _gaussian(gen, rows, k_left)
            right = None if k_right == cols else _gaussian(gen, cols, k_right)
            return cls(left=left, right=right, shape=shape, numel=k_left * k_right)
        if block.numel * dim * 4 > _DENSE_LIMIT_BYTES:
            raise ConfigError(
                f"score variant 'projection': block {block.name!r} has {block.numel:,} parameters and is not one "
                f"weight matrix; its dense {dim}-column projection would take {block.numel * dim * 4 / 2**30:.1f} "
                "GiB. Use a smaller dim, or leave the block out with param_filter."
            )
        return cls(dense=_gaussian(gen, block.numel, dim), numel=dim)

    def apply(self, block: Block, feature: Feature) -> torch.Tensor:
        """The projected per-example gradients of ``feature``, shape ``(n, numel)``, float32."""
        if self.shape is None:
            vec = _flat(block, feature)
            return vec if self.dense is None else vec @ self.dense.to(vec.device)
        if isinstance(feature, Materialized):  # the gradient matrix itself, (n, rows, cols)
            m = _matrix(block, feature.vec)
            if self.left is not None:
                m = torch.einsum("nrc,rk->nkc", m, self.left.to(m.device))
            if self.right is not None:
                m = m @ self.right.to(m.device)
            return m.reshape(len(m), -1)
        # Ghost: M = Σ_t left_t right_tᵀ per example; project each token's factors, then sum their outer products.
        left, right = _ghost_sides(block, feature)
        left = _project_side(left, self.left, self.shape[0])
        right = _project_side(right, self.right, self.shape[1])
        return torch.einsum("ntk,ntj->nkj", left, right).reshape(left.shape[0], -1)


def _gaussian(gen: torch.Generator, n: int, k: int) -> torch.Tensor:
    return torch.randn(n, k, generator=gen, dtype=ACC) / math.sqrt(k)


def _matrix_shape(block: Block) -> tuple[int, int] | None:
    """(rows, cols) of the block's gradient as one matrix, or None when it is not one weight matrix."""
    if block.kind == "linear" and len(block.shapes[0]) == 2:
        d_in, d_out = block.linear_dims
        if block.numel == d_in * d_out:
            return d_out, d_in
    if block.kind == "embedding" and len(block.shapes) == 1 and len(block.shapes[0]) == 2:
        return tuple(block.shapes[0])
    return None


def _matrix(block: Block, vec: torch.Tensor) -> torch.Tensor:
    """A materialized linear / embedding gradient as ``(n, rows, cols)``, a tracked bias as the last column."""
    rows, cols = _matrix_shape(block)
    n = vec.shape[0]
    if block.kind == "linear" and len(block.shapes) == 2:  # weight then bias
        weight = vec[:, : rows * (cols - 1)].reshape(n, rows, cols - 1)
        return torch.cat([weight, vec[:, rows * (cols - 1) :].reshape(n, rows, 1)], dim=2)
    return vec.reshape(n, rows, cols)


def _ghost_sides(block: Block, feature: Ghost) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token factors ``(left, right)`` of the gradient matrix: ``(g, a)`` for a linear map (``a`` with its bias
    column already), ``(one-hot ids, g)`` for an embedding (ids kept as a LongTensor)."""
    if block.kind == "embedding":
        return feature.a, feature.g
    return feature.g, feature.a


def _project_side(x: torch.Tensor, p: torch.Tensor | None, width: int) -> torch.Tensor:
    """Per-token factors ``x`` (``(n, T, width)``, or token ids ``(n, T)``) times ``p`` (None: unprojected)."""
    if x.dtype == torch.long:  # token ids: a one-hot row times P is a row of P
        return torch.nn.functional.one_hot(x, width).to(ACC) if p is None else p.to(x.device)[x]
    return x if p is None else x @ p.to(x.device)


def _flat(block: Block, feature: Feature) -> torch.Tensor:
    """A block's per-example gradients as ``(n, numel)`` (a ghost block is a matrix, never flattened here)."""
    if not isinstance(feature, Materialized):
        raise TypeError(f"block {block.name!r}: a ghost feature of a block that is not one weight matrix")
    return feature.vec
