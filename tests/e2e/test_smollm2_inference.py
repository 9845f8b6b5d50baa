"""The real SmolLM2-135M weights served over gRPC by `wombat serve inference` as its own process."""

from __future__ import annotations

import pytest

from clients.inference import InferenceClient, prompt, sampling
from services.stack import ServiceProcess
from wombat.inference.v1 import inference_pb2 as pb

pytestmark = pytest.mark.slow


def test_smollm2_gives_a_coherent_alpaca_answer(demo_workdir, tmp_path):
    model = demo_workdir / "models" / "smollm2-135m"
    service = ServiceProcess(["inference", "--model", str(model), "--port", "0", "--metrics-port", "-1"],
                             tmp_path / "inference.log")  # fmt: skip
    try:
        with InferenceClient(f"127.0.0.1:{service.port}", timeout=300) as client:
            info = client.model_info()
            assert info.model_type == "llama" and info.vocab_size == 49152
            responses = list(client.generate(prompt("What is the capital of France?"),
                                             sampling(temperature=0, max_new_tokens=40)))  # fmt: skip
            answer = "".join(r.text for r in responses)
            chat = client.complete(prompt(format="chat", messages=[("user", "What is 2 + 2?")]),
                                   sampling(temperature=0, max_new_tokens=20))  # fmt: skip
    finally:
        service.stop()
    assert "Paris" in answer
    assert responses[-1].finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH)
    assert "4" in chat.text
