"""The settings pieces the stages share: :class:`Sampling`, and the settings as JSON-ready data.

Every stage has a settings dataclass (next to its stage class in :mod:`.stages`) whose defaults are the paper's
settings; the configuration kernel (:func:`swift_callbacks.configuration.build`) reads them from YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ...generation.base import SamplingParams


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one generation role (``n`` and the seed are set by the stage).

    Attributes:
        temperature: 0 is greedy.
        top_p: Nucleus sampling mass.
        max_tokens: Completion length cap.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        # YAML's "temperature: 1" is the float 1.0: the sampling settings are part of generation cache keys.
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_tokens < 1:
            raise ValueError(
                f"invalid sampling settings {self}: need temperature >= 0, 0 < top_p <= 1, max_tokens >= 1"
            )

    def params(self, n: int = 1, seed: int | None = None) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens, n=n,
                              seed=seed)  # fmt: skip


def settings_dict(settings: Any) -> dict[str, Any]:
    """The settings as a JSON-ready dict (for stats files and fingerprints)."""
    return dataclasses.asdict(settings)
