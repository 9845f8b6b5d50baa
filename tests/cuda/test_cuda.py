"""The engine and the inference service on a real GPU. Skipped where CUDA is absent (CI, this project's
2-core machine); run them on a GPU machine: `pytest tests/cuda -m cuda`. The README says where they last
ran. Without a GPU, tests/core/test_device_discipline.py checks device placement with fake tensors."""

from __future__ import annotations

import pytest
import torch

from tests.engine_fixtures import save_servable_tiny_model
from wombat_core.engine import Engine, EngineConfig, FinishReason, GenerationRequest, SamplingParams
from wombat_core.engine.loading import load_for_serving

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: run on a GPU machine"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_servable_tiny_model(tmp_path_factory.mktemp("cuda") / "tiny")


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


def test_the_inference_service_streams_on_cuda(model_dir):
    from clients.inference import InferenceClient, prompt, sampling
    from services.inference.server import InferenceService, InferenceSettings
    from tests.conftest import ServerThread

    thread = ServerThread(
        InferenceService(InferenceSettings(model_dir=model_dir, device="cuda", dtype="float16"))
    )
    try:
        with InferenceClient(thread.address, timeout=60) as client:
            assert client.model_info().device.startswith("cuda")
            greedy = client.complete(prompt("Name three colours."), sampling(temperature=0, max_new_tokens=8))
            sampled = client.complete(prompt("Name three colours."), sampling(temperature=0.9, top_p=0.9, seed=1,
                                                                              max_new_tokens=8))  # fmt: skip
            assert greedy.usage.completion_tokens > 0 and sampled.usage.completion_tokens > 0
    finally:
        thread.stop()
