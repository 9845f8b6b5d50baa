"""RrhfService over real gRPC with a real local Ray cluster: scoring, jobs, status codes."""

from __future__ import annotations

import json
import shutil
import threading
from importlib import resources

import grpc
import pytest
import torch

from tests.conftest import ServerThread, rpc_error
from tests.engine_fixtures import save_reward_models, save_servable_tiny_model
from tests.models import save_tiny_llama
from wombat.rrhf.v1 import rrhf_pb2 as pb
from wombat.rrhf.v1 import rrhf_pb2_grpc
from wombat_core.rrhf.data import load_jsonl
from wombat_core.rrhf.scoring import ScoreItem, policy_scores

SHIPPED = resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl"
RESPONSES = ["Red, green and blue.", "Blue.", "The quick brown fox.", "café 你好"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("rrhf")
    models, data = base / "models", base / "data"
    data.mkdir()
    save_servable_tiny_model(models / "policy")
    save_reward_models(models, models / "policy")
    save_tiny_llama(models / "no-tokenizer", seed=3)  # weights only: cannot score
    shutil.copy(SHIPPED, data / "preferences.jsonl")
    return models, data


@pytest.fixture(scope="module")
def server(roots):
    from services.rrhf.server import RrhfService, RrhfSettings

    models, data = roots
    settings = RrhfSettings(model_root=models, data_root=data, policy_model="policy", scorer_replicas=1)
    thread = ServerThread(RrhfService(settings))
    yield thread
    thread.stop()  # closes the service, which stops the local Ray cluster it started


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield rrhf_pb2_grpc.RrhfServiceStub(channel)
    channel.close()


def test_score_equals_in_process_p_i_and_ranks(stub, roots):
    from wombat_core.engine.loading import load_for_serving

    loaded = load_for_serving(roots[0] / "policy")
    loaded.tokenizer.padding_side = "right"
    expected = policy_scores(
        loaded.model, loaded.tokenizer, [ScoreItem("Name three colours.", tuple(RESPONSES))]
    )[0]
    response = stub.Score(pb.ScoreRequest(query="Name three colours.", responses=RESPONSES), timeout=120)
    assert list(response.scores) == pytest.approx(expected, abs=1e-4)
    assert list(response.ranking) == sorted(range(4), key=lambda i: -expected[i])
    ranked = stub.Rank(pb.RankRequest(query="Name three colours.", responses=RESPONSES), timeout=60).ranked
    assert [r.index for r in ranked] == list(response.ranking)
    assert [r.response for r in ranked] == [RESPONSES[i] for i in response.ranking]


def test_concurrent_callers_are_batched_without_mixing_results(stub):
    queries = [f"Question number {i}?" for i in range(8)]
    alone = {q: list(stub.Score(pb.ScoreRequest(query=q, responses=RESPONSES[: 1 + i % 4]), timeout=60).scores)
             for i, q in enumerate(queries)}  # fmt: skip
    together: dict[str, list[float]] = {}

    def call(i: int, q: str) -> None:
        together[q] = list(
            stub.Score(pb.ScoreRequest(query=q, responses=RESPONSES[: 1 + i % 4]), timeout=60).scores
        )

    threads = [threading.Thread(target=call, args=(i, q)) for i, q in enumerate(queries)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for q in queries:
        assert together[q] == pytest.approx(alone[q], abs=1e-4)


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (pb.ScoreRequest(query="q", responses=[]), grpc.StatusCode.INVALID_ARGUMENT, "responses is empty"),
        (pb.ScoreRequest(query="", responses=["a"]), grpc.StatusCode.INVALID_ARGUMENT, "query is empty"),
        (pb.ScoreRequest(query="q", responses=["a"] * 65), grpc.StatusCode.INVALID_ARGUMENT, "at most 64"),
        (pb.ScoreRequest(query="q", responses=["a", " "]), grpc.StatusCode.INVALID_ARGUMENT, "non-empty"),
        (
            pb.ScoreRequest(query="q", responses=["a"], options=pb.ScoringOptions(model_path="nope")),
            grpc.StatusCode.NOT_FOUND,
            "does not exist",
        ),
        (
            pb.ScoreRequest(query="q", responses=["a"], options=pb.ScoringOptions(model_path="../x")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "contains '..'",
        ),
        (
            pb.ScoreRequest(
                query="q", responses=["a"], options=pb.ScoringOptions(method=pb.SCORING_METHOD_REWARD_MODEL)
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "--reward-model",
        ),
        (
            pb.ScoreRequest(query="word " * 2000, responses=["a"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "no room for a response",
        ),
    ],  # fmt: skip
)
def test_bad_score_requests(stub, request_, code, message):
    error = rpc_error(lambda: stub.Score(request_, timeout=60))
    assert error.code() == code and message in error.details()


def _write(data_dir, name: str, lines: list[str]) -> str:
    (data_dir / name).write_text("\n".join(lines) + "\n")
    return name


GOOD = json.dumps({"query": "q", "responses": ["a", "b"], "scores": [1, 0]})


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([GOOD, "{not json"], "line 2: not valid JSON"),
        (
            [GOOD, json.dumps({"query": "q", "responses": ["a", "b"], "scores": [1]})],
            "line 2: scores must be a list as long as responses (2), got 1",
        ),
        (
            [json.dumps({"query": "q", "responses": ["a", ""], "scores": [1, 0]})],
            "line 1: responses[1] must be a non-empty string",
        ),
        (
            [GOOD, GOOD, '{"query": "q", "responses": ["a"], "scores": [NaN]}'],
            "line 3: scores[0] must be a finite number",
        ),
    ],  # fmt: skip
)
def test_bad_training_data_is_invalid_argument_and_starts_nothing(stub, roots, lines, message):
    path = _write(roots[1], "bad.jsonl", lines)
    before = len(stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs)
    error = rpc_error(lambda: stub.StartTraining(
        pb.StartTrainingRequest(model_path="policy", data_path=path, output_path="never"), timeout=60))  # fmt: skip
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details()
    assert len(stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs) == before


def test_training_request_checks(stub):
    def start(**fields):
        request = pb.StartTrainingRequest(
            **{"model_path": "policy", "data_path": "preferences.jsonl", "output_path": "o", **fields}
        )
        return rpc_error(lambda: stub.StartTraining(request, timeout=60)).code()

    assert start(model_path="nope") == grpc.StatusCode.NOT_FOUND
    assert start(data_path="missing.jsonl") == grpc.StatusCode.NOT_FOUND
    assert start(output_path="policy") == grpc.StatusCode.ALREADY_EXISTS
    assert start(data_path="") == grpc.StatusCode.INVALID_ARGUMENT  # no data at all
    assert (
        start(hyperparameters=pb.TrainingHyperparameters(learning_rate=-1))
        == grpc.StatusCode.INVALID_ARGUMENT
    )


def test_unknown_job_is_not_found(stub):
    for call in (lambda: stub.GetJob(pb.GetJobRequest(job_id="nope"), timeout=10),
                 lambda: stub.CancelJob(pb.CancelJobRequest(job_id="nope"), timeout=10),
                 lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id="nope"), timeout=10))):  # fmt: skip
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND and "nope" in error.details()


def _start(stub, output: str, **hyper) -> str:
    request = pb.StartTrainingRequest(model_path="policy", data_path="preferences.jsonl", output_path=output,
                                      hyperparameters=pb.TrainingHyperparameters(**hyper))  # fmt: skip
    return stub.StartTraining(request, timeout=120).job_id


TWO_WORKERS = dict(num_workers=2, max_steps=4, batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3,
                   checkpoint_every_steps=2)  # fmt: skip


@pytest.mark.slow
def test_two_worker_fsdp_job_trains_the_weights_one_process_trains_while_rpcs_still_answer(stub, roots):
    from safetensors.torch import load_file

    from wombat_core.rrhf.trainer import TrainingRun, run_training
    from wombat_core.rrhf.training import TrainingConfig

    job_id = _start(stub, "trained", strategy=pb.STRATEGY_FSDP, **TWO_WORKERS)
    events = stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=300)
    first = next(events)
    assert first.job.job_id == job_id
    # While training runs, the other RPCs answer.
    assert stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).job.kind == pb.JOB_KIND_TRAINING
    assert len(stub.Score(pb.ScoreRequest(query="q?", responses=["a", "b"]), timeout=60).scores) == 2
    rest = list(events)
    steps = [e.step for e in rest if e.HasField("step")]
    assert [s.step for s in steps] == [1, 2, 3, 4] and all(s.total_steps == 4 for s in steps)
    assert all(s.loss > 0 and s.samples_per_second > 0 for s in steps)
    checkpoints = [e.checkpoint for e in rest if e.HasField("checkpoint")]
    assert [c.step for c in checkpoints] == [2, 4]
    # Sharded checkpoints in the job's directory on the model store, one DCP file per worker.
    assert checkpoints[-1].path == f".wombat-jobs/{job_id}/checkpoints/step-00000004"
    assert len(list((roots[0] / checkpoints[-1].path).glob("*.distcp"))) == 2
    final = rest[-1].job
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.progress == 1.0 and final.latest.step == 4 and final.last_checkpoint_step == 4
    # The 2 Ray Train workers' gathered weights equal one process trained on the same global batches.
    reference = TrainingConfig(**TWO_WORKERS, precision="fp32").with_workers(1)
    records = tuple(load_jsonl(roots[1] / "preferences.jsonl"))
    scratch = roots[0].parent / "single-process"
    run = TrainingRun(roots[0] / "policy", records, reference, scratch / "checkpoints", scratch / "model", "")
    run_training(run, torch.device("cpu"))
    trained = load_file(roots[0] / "trained" / "model.safetensors")
    expected = load_file(scratch / "model" / "model.safetensors")
    initial = load_file(roots[0] / "policy" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(trained[name], tensor, atol=2e-5, rtol=1e-4, msg=name)
        assert not torch.equal(trained[name], initial[name]), f"{name} did not train"

    from wombat_core.engine.loading import load_for_serving
    from wombat_core.manifest import verify_directory

    assert verify_directory(roots[0] / "trained").ok
    assert load_for_serving(roots[0] / "trained").model_type == "llama"  # the inference service can load it
    listed = stub.ListJobs(pb.ListJobsRequest(state=pb.JOB_STATE_SUCCEEDED), timeout=10).jobs
    assert job_id in [j.job_id for j in listed]


@pytest.mark.slow
def test_cancel_stops_a_running_job_and_resume_finishes_it(server, stub, roots):
    from wombat_core.rrhf.events import Resumed

    job_id = _start(stub, "cancelled-run", num_workers=1, epochs=50, max_steps=16, gradient_accumulation_steps=2,
                    checkpoint_every_steps=1, learning_rate=1e-4)  # fmt: skip
    events = stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=300)
    for event in events:
        if event.HasField("step"):
            break
    stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=10)
    final = [e for e in events if e.HasField("job")][-1].job
    assert final.state == pb.JOB_STATE_CANCELLED and "cancelled" in final.error
    assert not (roots[0] / "cancelled-run").exists()
    assert stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=10).job.state == pb.JOB_STATE_CANCELLED
    # Watching a job that has already ended gives its final state at once, then ends.
    (again,) = list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=10))
    assert again.job.state == pb.JOB_STATE_CANCELLED
    stopped_at = again.job.last_checkpoint_step
    assert 1 <= stopped_at < 16

    def resume(job, **fields):
        return rpc_error(lambda: stub.ResumeJob(pb.ResumeJobRequest(job_id=job, **fields), timeout=30))

    assert resume("nope").code() == grpc.StatusCode.NOT_FOUND
    bad = resume(job_id, num_workers=3)  # cannot keep the global batch of 2
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "divides 2" in bad.details()
    # Resumed on 2 workers (one micro-step each instead of two on one), from its latest checkpoint.
    resumed = stub.ResumeJob(pb.ResumeJobRequest(job_id=job_id, num_workers=2), timeout=30).job
    assert resumed.state in (pb.JOB_STATE_PENDING, pb.JOB_STATE_RUNNING) and resumed.attempts == 2
    events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=300))
    final = events[-1].job
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    (resume_event,) = [e for e in server.servicer.store.get(job_id).events if isinstance(e, Resumed)]
    assert (resume_event.step, resume_event.saved_by_workers, resume_event.num_workers) == (stopped_at, 1, 2)
    assert final.latest.step == 16
    assert (roots[0] / "cancelled-run" / "wombat-manifest.json").is_file()
    done = resume(job_id)
    assert (
        done.code() == grpc.StatusCode.FAILED_PRECONDITION
        and "only a failed or cancelled job" in done.details()
    )


def test_restarted_service_reports_its_jobs_from_their_event_logs(tmp_path):
    from services.rrhf.jobs import JobKind, JobState, JobStore
    from wombat_core.rrhf.events import CheckpointSaved, StepFinished

    store = JobStore(tmp_path)
    running = store.create(JobKind.TRAINING, "out-a")
    store.set_state(running.job_id, JobState.RUNNING)
    step = StepFinished(3, 10, 0, 1.5, 0.5, 1.0, 1e-5, 2.0, 0.7, 2, 0.0)
    store.append(running.job_id, step)
    store.append(running.job_id, CheckpointSaved(3, "ckpt"))
    done = store.create(JobKind.CANDIDATES, "out-b")
    store.set_state(done.job_id, JobState.SUCCEEDED)
    # Events are appended, one JSON line each; the snapshot is rewritten only on state changes.
    log = (tmp_path / f"{running.job_id}.events.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in log] == ["state", "step", "checkpoint"]
    with (tmp_path / f"{running.job_id}.events.jsonl").open("a") as cut:
        cut.write('{"kind": "step", "st')  # a crash mid-line is skipped, not fatal
    reopened = JobStore(tmp_path)
    assert reopened.get(done.job_id).state is JobState.SUCCEEDED and reopened.get(done.job_id).progress == 1.0
    assert reopened.get(done.job_id).kind is JobKind.CANDIDATES
    lost = reopened.get(running.job_id)
    assert lost.latest == step and lost.progress == 0.3 and lost.last_checkpoint_step == 3
    assert lost.state is JobState.FAILED and "restarted while the job was running" in lost.error
    assert "step 3" in lost.error and f"wombat train --resume {running.job_id}" in lost.error


@pytest.mark.slow
@pytest.mark.parametrize("method", [pb.CANDIDATE_METHOD_DIVERSE_BEAM_SEARCH, pb.CANDIDATE_METHOD_SAMPLING])
def test_generate_candidates_writes_scored_rrhf_jsonl(stub, roots, method):
    from wombat_core.rrhf.data import load_jsonl
    from wombat_core.rrhf.scoring import RewardModel

    models, data = roots
    output = f"candidates-{method}.jsonl"
    queries = ["Name a colour.", "Say hi.\nPlease."]
    request = pb.GenerateCandidatesRequest(model_path="policy", reward_model_path="reward-cls", queries=queries,
                                           num_candidates=4, max_new_tokens=8, method=method, output_path=output)  # fmt: skip
    job_id = stub.GenerateCandidates(request, timeout=60).job_id
    final = [e for e in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=300) if e.HasField("job")][
        -1
    ].job
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.kind == pb.JOB_KIND_CANDIDATES and final.progress == 1.0
    records = load_jsonl(data / output)
    assert [r.query for r in records] == ["Name a colour.", "Say hi.\nPlease."]
    assert all(len(r.responses) == 4 == len(r.scores) for r in records)
    from wombat_core.prompts import alpaca_prompt_from_query

    reward = RewardModel.load(models / "reward-cls")
    expected = reward.score([alpaca_prompt_from_query(records[0].query) + c for c in records[0].responses])
    assert list(records[0].scores) == pytest.approx(expected, abs=1e-4)
    again = rpc_error(lambda: stub.GenerateCandidates(request, timeout=60))
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS


def test_generate_candidates_checks_its_request(stub):
    base = dict(model_path="policy", reward_model_path="reward-cls", queries=["q"], output_path="c.jsonl")
    for fields, code in (({"num_candidates": 0}, grpc.StatusCode.INVALID_ARGUMENT),
                         ({"queries": []}, grpc.StatusCode.INVALID_ARGUMENT),
                         ({"max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT),
                         ({"reward_model_path": "missing"}, grpc.StatusCode.NOT_FOUND),
                         ({"output_path": "/abs.jsonl"}, grpc.StatusCode.INVALID_ARGUMENT)):  # fmt: skip
        request = pb.GenerateCandidatesRequest(**{**base, **fields})
        assert rpc_error(lambda r=request: stub.GenerateCandidates(r, timeout=30)).code() == code


def test_reward_model_scoring_through_the_service(stub, roots):
    from wombat_core.rrhf.scoring import RewardModel

    options = pb.ScoringOptions(method=pb.SCORING_METHOD_REWARD_MODEL, model_path="reward-value-head")
    response = stub.Score(
        pb.ScoreRequest(query="Name a colour. ", responses=["Red.", "Blue."], options=options), timeout=120
    )
    expected = RewardModel.load(roots[0] / "reward-value-head").score(
        ["Name a colour. Red.", "Name a colour. Blue."]
    )
    assert list(response.scores) == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_train_without_a_server_runs_the_same_job_in_process(roots, server):
    """`wombat train --model-root --data-root` (a KubeRay RayJob's entrypoint) runs the service's job in
    its own process: same validation, same atomic, manifest-verified output."""
    from typer.testing import CliRunner

    from services.cli.app import app
    from wombat_core.manifest import verify_directory

    models, data = roots
    args = ["train", "--model", "policy", "--data", "preferences.jsonl", "--output", "trained-locally",
            "--model-root", str(models), "--data-root", str(data), "--max-steps", "2", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert events[-1]["job"]["state"] == "JOB_STATE_SUCCEEDED"
    assert verify_directory(models / "trained-locally").ok
    bad = CliRunner().invoke(app, ["train", "--model", "policy", "--data", "x.jsonl", "--output", "y"])
    assert bad.exit_code == 1 and "--model-root and --data-root" in bad.output


def test_metrics_show_jobs_by_state_and_scores_in_progress(server, stub):
    from collections import Counter

    stub.Score(pb.ScoreRequest(query="q", responses=["a", "b"]), timeout=60)
    registry = server.server.registry
    assert registry.get_sample_value("wombat_rrhf_score_requests_in_progress") == 0
    counts = Counter((job.kind, job.state) for job in server.servicer.store.list())
    for kind in ("training", "candidates"):
        for state in ("pending", "running", "succeeded", "failed", "cancelled"):
            value = registry.get_sample_value("wombat_rrhf_jobs", {"kind": kind, "state": state})
            assert value == counts.get((kind, state), 0), (kind, state)


def test_a_model_that_cannot_load_is_failed_precondition_not_internal(stub):
    """The scorer actor's load error crosses Ray as the suite's own error (not ActorDiedError), and the
    pool is forgotten so a fixed model would load on the next call."""
    options = pb.ScoringOptions(model_path="no-tokenizer")
    for _ in range(2):  # the second call loads afresh and fails the same way
        error = rpc_error(
            lambda: stub.Score(pb.ScoreRequest(query="q", responses=["a"], options=options), timeout=120)
        )
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert "tokenizer" in error.details()


def test_plan_training_and_a_job_that_does_not_fit_is_refused_before_it_starts(server, stub):
    request = pb.PlanTrainingRequest(model_path="policy", hyperparameters=pb.TrainingHyperparameters(num_workers=2),
                                     device_memory_gb=64)  # fmt: skip
    plan = stub.PlanTraining(request, timeout=60).plan
    assert plan.fits and plan.device == "cpu" and plan.workers == 2 and plan.parameters > 0
    assert (
        plan.per_device_bytes >= sum(item.bytes for item in plan.items)
        and plan.device_memory_bytes == 64 << 30
    )
    request.device_memory_gb = 0.01
    small = stub.PlanTraining(request, timeout=60).plan
    assert not small.fits and small.suggestion
    bad = rpc_error(
        lambda: stub.PlanTraining(
            pb.PlanTrainingRequest(model_path="policy", device_memory_gb=-1), timeout=10
        )
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "device_memory_gb" in bad.details()

    before = len(stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs)
    server.servicer.device_memory_gb = 0.01  # as if started with --device-memory-gb 0.01
    try:
        error = rpc_error(lambda: _start(stub, "too-big", num_workers=2))
    finally:
        server.servicer.device_memory_gb = None
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        "per cpu device but it has 10 MiB" in error.details()
        and "a configuration that fits" in error.details()
    )
    assert len(stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs) == before


def test_many_queries_in_one_score_call_score_as_single_calls_do(stub):
    queries = [
        ("Name three colours.", RESPONSES),
        ("What is two plus two?", ["Four.", "5"]),
        ("Hi", ["Hello."]),
    ]
    alone = [list(stub.Score(pb.ScoreRequest(query=q, responses=r), timeout=60).scores) for q, r in queries]
    request = pb.ScoreRequest(queries=[pb.ScoreQuery(query=q, responses=r) for q, r in queries])
    results = stub.Score(request, timeout=60).results
    assert len(results) == 3
    for result, expected in zip(results, alone, strict=True):
        assert list(result.scores) == pytest.approx(expected, abs=1e-5)
        assert list(result.ranking) == sorted(range(len(expected)), key=lambda i: -expected[i])
    both = rpc_error(
        lambda: stub.Score(pb.ScoreRequest(query="q", responses=["a"], queries=request.queries), timeout=10)
    )
    assert both.code() == grpc.StatusCode.INVALID_ARGUMENT and "not both" in both.details()
    request.queries[1].responses[:] = ["fine", ""]
    bad = rpc_error(lambda: stub.Score(request, timeout=30))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and bad.details().startswith("queries[1]: ")


def test_an_idle_scorer_pool_is_closed_and_loads_again_when_called(server, stub):
    import time

    servicer = server.servicer
    stub.Score(pb.ScoreRequest(query="Warm?", responses=["Yes."]), timeout=60)
    assert any(key[0] == "policy_logprob" for key in servicer._pools)
    servicer.scorer_idle_seconds = 0.5
    try:
        deadline = time.monotonic() + 20
        while servicer._pools and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not servicer._pools  # the actors are gone, and with them any GPU they held
    finally:
        servicer.scorer_idle_seconds = 600.0
    assert (
        len(stub.Score(pb.ScoreRequest(query="Again?", responses=["Yes.", "No."]), timeout=120).scores) == 2
    )
