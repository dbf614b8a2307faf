"""swift_callbacks: exact inline gradient-based relative influence (the "swift study") for HF Trainer runs.

Public API::

    from swift_callbacks import InfluenceCallback, load_pairs, load_scores
"""

from .callback import InfluenceCallback
from .influence import InfluenceEngine, InfluenceResult
from .sets import ExampleSet, SetError, load_set
from .store import load_metrics, load_pairs, load_scores
from .studies import Metric, Study, clarify_study, cot_study, evaluation_study

__version__ = "0.1.0"

__all__ = [
    "ExampleSet",
    "InfluenceCallback",
    "InfluenceEngine",
    "InfluenceResult",
    "Metric",
    "SetError",
    "Study",
    "__version__",
    "clarify_study",
    "cot_study",
    "evaluation_study",
    "load_metrics",
    "load_pairs",
    "load_scores",
    "load_set",
]
