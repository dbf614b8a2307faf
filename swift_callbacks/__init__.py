"""swift_callbacks: exact inline gradient-based relative influence (the "swift study") for HF Trainer runs.

Public API::

    from swift_callbacks import InfluenceCallback, load_pairs, load_scores

Names are imported lazily so that light subpackages (``swift_callbacks.builders``, ``swift_callbacks.generation``)
and the CLI start without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "InfluenceCallback": "callback",
    "InfluenceEngine": "influence",
    "InfluenceResult": "influence",
    "ExampleSet": "sets",
    "SetError": "sets",
    "HistoryError": "store",
    "load_set": "sets",
    "load_failures": "store",
    "load_metrics": "store",
    "load_pairs": "store",
    "load_scores": "store",
    "Metric": "studies",
    "Study": "studies",
    "clarify_study": "studies",
    "cot_study": "studies",
    "evaluation_study": "studies",
}

__all__ = [
    "ExampleSet",
    "HistoryError",
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
    "load_failures",
    "load_metrics",
    "load_pairs",
    "load_scores",
    "load_set",
]

if TYPE_CHECKING:
    from .callback import InfluenceCallback
    from .influence import InfluenceEngine, InfluenceResult
    from .sets import ExampleSet, SetError, load_set
    from .store import HistoryError, load_failures, load_metrics, load_pairs, load_scores
    from .studies import Metric, Study, clarify_study, cot_study, evaluation_study


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
