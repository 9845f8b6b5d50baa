"""Continuous-batching generation engine for Hugging Face causal LMs (transport-agnostic).

Split as in vLLM's engine core: `scheduler` decides which requests run each iteration, `runner` executes
prefill chunks and batched decode steps on the model, `engine` owns the loop thread and turns sampled
tokens into stream events. Nothing here knows about gRPC.
"""

from wombat_core.engine.engine import Engine, EngineConfig
from wombat_core.engine.sampling import SamplingParams
from wombat_core.engine.types import FinishReason, GenerationRequest, StreamEvent

__all__ = ["Engine", "EngineConfig", "FinishReason", "GenerationRequest", "SamplingParams", "StreamEvent"]
