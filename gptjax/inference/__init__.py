"""Inference (imports ``config``, ``sharding``, ``model``, ``checkpoint``): the generation engine (KV-cache
prefill and decode, continuous batching, speculative decoding, on one device or a mesh), the generation config
and the per-row sampler, and the OpenAI-compatible HTTP server over the engine."""

from gptjax.inference.engine import Completion, Engine, Request, SpeculativeStats
from gptjax.inference.sampling import GenerationConfig, GenerationError, RowSettings, filter_logits, sample

__all__ = ["Completion", "Engine", "GenerationConfig", "GenerationError", "Request", "RowSettings",
           "SpeculativeStats", "filter_logits", "sample"]
