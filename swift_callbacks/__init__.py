"""swift_callbacks: exact inline gradient-based relative influence (the "swift study") for HF Trainer runs.

Public API::

    from swift_callbacks import InfluenceCallback, load_pairs, load_scores

Engine options are one ``InfluenceArguments``; models load through ``load_model_and_tokenizer(ModelConfig(...))``
(a Hub id, a folder, a ``.gguf`` file or a ``tiny:`` spec).

Names are imported lazily so that light subpackages (``swift_callbacks.builders``, ``swift_callbacks.generation``)
and the CLI start without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "InfluenceCallback": "callback",
    "ConfigError": "configuration",
    "InfluenceArguments": "influence",
    "InfluenceEngine": "influence",
    "ModelConfig": "models",
    "UserError": "errors",
    "load_model": "models",
    "load_model_and_tokenizer": "models",
    "load_tokenizer": "models",
    "register_variant": "influence",
    "ScoreVariant": "influence",
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
    "score_candidates": "scoring",
    "score_run": "scoring",
}

__all__ = [
    "ConfigError",
    "ExampleSet",
    "HistoryError",
    "InfluenceArguments",
    "InfluenceCallback",
    "InfluenceEngine",
    "InfluenceResult",
    "Metric",
    "ModelConfig",
    "ScoreVariant",
    "SetError",
    "Study",
    "UserError",
    "__version__",
    "clarify_study",
    "cot_study",
    "evaluation_study",
    "load_failures",
    "load_metrics",
    "load_model",
    "load_model_and_tokenizer",
    "load_pairs",
    "load_scores",
    "load_set",
    "load_tokenizer",
    "register_variant",
    "score_candidates",
    "score_run",
]

if TYPE_CHECKING:
    from .callback import InfluenceCallback
    from .configuration import ConfigError
    from .errors import UserError
    from .influence import InfluenceArguments, InfluenceEngine, InfluenceResult, ScoreVariant, register_variant
    from .models import ModelConfig, load_model, load_model_and_tokenizer, load_tokenizer
    from .scoring import score_candidates, score_run
    from .sets import ExampleSet, SetError, load_set
    from .store import HistoryError, load_failures, load_metrics, load_pairs, load_scores
    from .studies import Metric, Study, clarify_study, cot_study, evaluation_study


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
