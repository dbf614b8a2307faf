"""The ScaleQuest stages, one class each (see :mod:`.base`), in pipeline order.

``STAGES`` is the one list of stages: the config, the runner and the CLI read everything about a stage from its
class. Adding a stage is one module here and one line below.
"""

from __future__ import annotations

from .base import OPTIONAL, REQUIRED, Stage, StageRun, TrainingSettings, TrainingStage
from .decontaminate import Decontaminate
from .difficulty import Difficulty
from .filters import FilterLanguage, FilterSolvable
from .generate import Generate
from .qft import Qft, QftData
from .qpo import Qpo, QpoPairs
from .respond import Respond, RewardSelect

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        QftData(),
        Qft(),
        QpoPairs(),
        Qpo(),
        Generate(),
        FilterLanguage(),
        FilterSolvable(),
        Difficulty(),
        Respond(),
        RewardSelect(),
        Decontaminate(),
    )
}
STAGE_ORDER = tuple(STAGES)

__all__ = ["OPTIONAL", "REQUIRED", "STAGES", "STAGE_ORDER", "Stage", "StageRun", "TrainingSettings", "TrainingStage"]
