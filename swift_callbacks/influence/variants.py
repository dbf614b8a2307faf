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

from collections.abc import Sequence
from typing import Any, ClassVar

from ..configuration import ConfigError, suggest
from .features import Feature
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

    def __init__(self, **options: Any) -> None:
        if options:
            raise ConfigError(f"score variant {self.name!r} takes no options, got {sorted(options)}")

    def setup(self, model: Any, blocks: Sequence[Block]) -> None:
        """Called before each computation (e.g. to read optimizer state, or draw projections per block)."""

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
