"""Named bad inputs with the status each must get, one table across the three services."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.reliability.rpc import SERVICES, invoke
from wombat.inference.v1 import inference_pb2 as ipb
from wombat.materializer.v1 import materializer_pb2 as mpb
from wombat.rrhf.v1 import rrhf_pb2 as rpb

Code = grpc.StatusCode


@dataclass(frozen=True)
class Case:
    name: str
    service: str
    method: str
    request: object
    code: grpc.StatusCode
    says: str  # a fragment of the message that tells the caller what to fix


def _generate(text: str = "Hi", **sampling) -> ipb.GenerateRequest:
    return ipb.GenerateRequest(prompt=ipb.PromptInput(format=ipb.PROMPT_FORMAT_ALPACA, text=text),
                               sampling=ipb.SamplingParams(**{"max_new_tokens": 4, **sampling}))  # fmt: skip


CASES = [
    Case("absolute base path", "materializer", "Materialize",
         mpb.MaterializeRequest(base_path="/etc", delta_path="target", target_path="out"), Code.INVALID_ARGUMENT, "absolute"),
    Case("'..' in the target", "materializer", "Materialize",
         mpb.MaterializeRequest(base_path="base", delta_path="target", target_path="../out"), Code.INVALID_ARGUMENT, "'..'"),
    Case("missing base", "materializer", "Materialize",
         mpb.MaterializeRequest(base_path="nope", delta_path="target", target_path="out"), Code.NOT_FOUND, "does not exist"),
    Case("NUL in a path", "materializer", "Verify", mpb.VerifyRequest(path="a\x00b"), Code.INVALID_ARGUMENT, "NUL"),
    Case("path component over 255 bytes", "materializer", "Describe", mpb.DescribeRequest(path="x" * 300),
         Code.INVALID_ARGUMENT, "255 bytes"),
    Case("verify without a manifest", "materializer", "Verify", mpb.VerifyRequest(path="base"),
         Code.FAILED_PRECONDITION, "manifest"),
    Case("convert a safetensors checkpoint", "materializer", "Convert",
         mpb.ConvertRequest(source_path="base", output_path="converted"), Code.INVALID_ARGUMENT, "already safetensors"),
    Case("empty instruction", "inference", "Complete", _generate(""), Code.INVALID_ARGUMENT, "empty"),
    Case("max_new_tokens above the server's limit", "inference", "Complete", _generate(max_new_tokens=100_000),
         Code.INVALID_ARGUMENT, "max_new_tokens must be <="),
    Case("prompt over a million characters", "inference", "Generate", _generate("x" * 1_000_001),
         Code.INVALID_ARGUMENT, "at most 1000000 characters"),
    Case("top_p above 1", "inference", "Generate", _generate(top_p=1.5), Code.INVALID_ARGUMENT, "top_p"),
    Case("negative temperature", "inference", "Complete", _generate(temperature=-1.0), Code.INVALID_ARGUMENT, "temperature"),
    Case("unknown prompt format", "inference", "Complete",
         ipb.GenerateRequest(prompt=ipb.PromptInput(format=99, text="Hi")), Code.INVALID_ARGUMENT, "format"),
    Case("65 responses in one Score call", "rrhf", "Score",
         rpb.ScoreRequest(query="q", responses=["r"] * 65), Code.INVALID_ARGUMENT, "at most 64"),
    Case("no responses to score", "rrhf", "Score", rpb.ScoreRequest(query="q"), Code.INVALID_ARGUMENT, "responses"),
    Case("scoring model that does not exist", "rrhf", "Score",
         rpb.ScoreRequest(query="q", responses=["a", "b"], options=rpb.ScoringOptions(model_path="nope")),
         Code.NOT_FOUND, "does not exist"),
    Case("training data outside the data root", "rrhf", "StartTraining",
         rpb.StartTrainingRequest(model_path="policy", data_path="../models/x.jsonl", output_path="o"),
         Code.INVALID_ARGUMENT, "'..'"),
    Case("training data that is not UTF-8", "rrhf", "StartTraining",
         rpb.StartTrainingRequest(model_path="policy", data_path="latin1.jsonl", output_path="o"),
         Code.INVALID_ARGUMENT, "not valid UTF-8"),
    Case("unknown job", "rrhf", "GetJob", rpb.GetJobRequest(job_id="0123456789ab"), Code.NOT_FOUND, "no job"),
    Case("page size 5000", "rrhf", "ListJobs", rpb.ListJobsRequest(page_size=5000), Code.INVALID_ARGUMENT, "page_size"),
]  # fmt: skip


@pytest.fixture(scope="module")
def latin1_data(services):
    data_root = Path(services["rrhf"].thread.servicer.data.root)
    (data_root / "latin1.jsonl").write_bytes(
        '{"query": "caf\xe9", "responses": ["a", "b"], "scores": [1, 2]}\n'.encode("latin-1")
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_named_bad_input_gets_its_status(services, latin1_data, case):
    method = SERVICES[case.service].methods_by_name[case.method]
    code, details = invoke(services[case.service].channel, method, case.request)
    assert code == case.code, f"{case.name}: {code.name} {details}"
    assert case.says in details, details


def test_a_request_over_the_receive_limit_is_resource_exhausted(services):
    method = SERVICES["inference"].methods_by_name["Tokenize"]
    huge = ipb.TokenizeRequest(
        prompt=ipb.PromptInput(format=ipb.PROMPT_FORMAT_RAW, text="x" * (17 * 1024 * 1024))
    )
    code, details = invoke(services["inference"].channel, method, huge)
    assert code == Code.RESOURCE_EXHAUSTED, details


def test_symlink_and_hard_link_out_of_the_root_are_permission_denied(services, tmp_path):
    root = services["materializer"].root
    outside = tmp_path / "outside"
    outside.mkdir()
    for item in (root / "base").iterdir():
        (outside / item.name).write_bytes(item.read_bytes())
    (root / "via-symlink").symlink_to(outside, target_is_directory=True)
    hard = root / "via-hard-link"
    hard.mkdir()
    for item in outside.iterdir():
        os.link(item, hard / item.name)  # the same files, linked into the root
    describe = SERVICES["materializer"].methods_by_name["Describe"]
    for name, says in (("via-symlink", "leads outside the model root"), ("via-hard-link", "hard links")):
        code, details = invoke(services["materializer"].channel, describe, mpb.DescribeRequest(path=name))
        assert code == Code.PERMISSION_DENIED, (name, details)
        assert says in details
