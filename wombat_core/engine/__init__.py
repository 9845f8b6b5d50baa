"""Continuous-batching generation engine for Hugging Face causal LMs (transport-agnostic).

Split after vLLM's engine core: `engine` owns the loop thread — it schedules (admits waiting requests
into a prefill group when slots are free, FIFO), turns sampled tokens into stream events, and retires
finished rows; `runner` executes prefill chunks and batched decode steps on the model and owns the
shared KV cache; `sampler` turns logits into tokens. Nothing here knows about gRPC.
"""

from wombat_core.engine.engine import Engine, EngineConfig
from wombat_core.engine.sampling import SamplingParams
from wombat_core.engine.types import FinishReason, GenerationRequest, StreamEvent

__all__ = ["Engine", "EngineConfig", "FinishReason", "GenerationRequest", "SamplingParams", "StreamEvent"]
