"""LLM generation backends behind one interface, with a persistent cache (no torch import at module load)."""

from .base import Backend, GenerationRequest, GenerationResult, SamplingParams, ScriptedBackend

__all__ = ["Backend", "GenerationRequest", "GenerationResult", "SamplingParams", "ScriptedBackend"]
