"""Dataset builders: probe and training sets made by an LLM generator from reference data.

Strategies of the swift-study method (``cot``, ``clarify``, ``evaluate``, ``similar``) and "silly question" rules
(``rules-extract``, ``rules-apply``). Templates and rules are versioned YAML data that users can override or
extend. Nothing here imports torch: the ``swift-study build`` command starts fast.

Example::

    from swift_callbacks.builders import build_cot
    from swift_callbacks.generation.runner import Generator

    with Generator(backend, ".swift_cache/generation") as gen:
        result = build_cot([{"id": "1", "query": "What is 2+3?", "response": "5", "task": "math"}], gen)
    result.rows, result.rejects, result.stats
"""

from .build import KINDS, run_build
from .parsing import Rejection, short_final_answer
from .records import FORMATS, BuildResult, BuildStats, Reject
from .rules import (
    Rule,
    RuleError,
    RuleRegistry,
    build_rules_apply,
    build_rules_extract,
    load_rules,
    rules_document,
)
from .strategies import build_clarify, build_cot, build_evaluate, build_similar, build_strategy
from .templating import TemplateError, TemplateSet, load_templates

__all__ = [
    "FORMATS",
    "KINDS",
    "BuildResult",
    "BuildStats",
    "Reject",
    "Rejection",
    "Rule",
    "RuleError",
    "RuleRegistry",
    "TemplateError",
    "TemplateSet",
    "build_clarify",
    "build_cot",
    "build_evaluate",
    "build_rules_apply",
    "build_rules_extract",
    "build_similar",
    "build_strategy",
    "load_rules",
    "load_templates",
    "rules_document",
    "run_build",
    "short_final_answer",
]
