"""ScaleQuest: question synthesis from scratch as a pipeline of resumable, data-in/data-out stages.

The stages, in order (each a class in :mod:`.stages`, a function here and a ``swift-study scalequest <stage>``
command):

========================  =================================================================================
``qft-data``              seed problems -> questions-only SFT rows (prompt = chat prefix, completion = question + EOS)
``qft``                   TRL SFT on them (1 epoch, packing, max length 256, lr 2e-5)
``qpo-pairs``             sample questions, rewrite each for solvability or difficulty -> DPO pairs
``qpo``                   TRL DPO on the pairs (lr 5e-7, beta 0.1, 1 epoch, batch 128)
``generate``              questions from the chat prefix alone (temperature 1.0, top-p 0.99, max 512 tokens)
``filter-language``       keep non-empty all-ASCII questions
``filter-solvable``       an LLM judge reasons and ends with Yes/No (parsed strictly)
``difficulty``            solver fail rates -> a regression scorer -> drop the easiest fraction
``respond``               n step-by-step solutions per question, kept only with a final ``\\boxed{}`` answer
``reward-select``         the best solution per question by a reward model
``decontaminate``         drop rows sharing a 13-gram with an evaluation set
========================  =================================================================================

Every stage writes ``<output>``, ``<output stem>.rejects.jsonl`` and ``<output stem>.stats.json`` (see
:mod:`.contract`); generation goes through :class:`~swift_callbacks.generation.Generator`, so an interrupted stage
resumes without resending what it already has. :func:`run_pipeline` runs them all from one YAML config
(``recipes/scalequest/``), skipping complete stages.

Nothing here imports torch at import time: trainers and local models load when a stage needs them.
"""

from ...answers import boxed_answer, majority_answer, normalize_answer, parse_final_verdict, text_after_final_marker
from .backends import SequenceScoreBackend, generation_backend, score_backend
from .config import PipelineConfig, load_pipeline_config
from .contract import StageError, StageResult, StageStats, is_complete, load_stats, stats_path
from .models import ConfigError, ModelSpec
from .prompts import DEFAULT_PROMPTS, Prompts
from .runner import run_pipeline
from .settings import Sampling
from .stages import STAGE_ORDER, STAGES, Stage
from .stages.decontaminate import ContaminationIndex, DecontaminateSettings, EvalSet, decontaminate, normalized_tokens
from .stages.difficulty import DifficultySettings, ScorerSettings, difficulty, fail_rate
from .stages.filters import LanguageSettings, SolvableSettings, filter_language, filter_solvable
from .stages.generate import GenerateSettings, chat_prefix, generate_questions, training_prompt
from .stages.qft import QftDataSettings, qft_data, train_qft
from .stages.qpo import QpoPairsSettings, qpo_pairs, train_qpo
from .stages.respond import RespondSettings, RewardSettings, respond, reward_select

__all__ = [
    "DEFAULT_PROMPTS",
    "STAGES",
    "STAGE_ORDER",
    "ConfigError",
    "ContaminationIndex",
    "DecontaminateSettings",
    "DifficultySettings",
    "EvalSet",
    "GenerateSettings",
    "LanguageSettings",
    "ModelSpec",
    "PipelineConfig",
    "Prompts",
    "QftDataSettings",
    "QpoPairsSettings",
    "RespondSettings",
    "RewardSettings",
    "Sampling",
    "ScorerSettings",
    "SequenceScoreBackend",
    "SolvableSettings",
    "Stage",
    "StageError",
    "StageResult",
    "StageStats",
    "boxed_answer",
    "chat_prefix",
    "decontaminate",
    "difficulty",
    "fail_rate",
    "filter_language",
    "filter_solvable",
    "generate_questions",
    "generation_backend",
    "is_complete",
    "load_pipeline_config",
    "load_stats",
    "majority_answer",
    "normalize_answer",
    "normalized_tokens",
    "parse_final_verdict",
    "qft_data",
    "qpo_pairs",
    "respond",
    "reward_select",
    "run_pipeline",
    "score_backend",
    "stats_path",
    "text_after_final_marker",
    "train_qft",
    "train_qpo",
    "training_prompt",
]
