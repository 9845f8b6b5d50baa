"""Synchronous client for the RRHF service.

Score, Rank, GetJob and ListJobs are read-only and retried on UNAVAILABLE; starting jobs is not retried
(a retry could start a second job).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from clients.base import ServiceClient
from wombat.rrhf.v1 import rrhf_pb2 as pb
from wombat.rrhf.v1 import rrhf_pb2_grpc

METHODS = {"policy_logprob": pb.SCORING_METHOD_POLICY_LOGPROB, "reward_model": pb.SCORING_METHOD_REWARD_MODEL}
WATCH_TIMEOUT = 24 * 3600.0  # a training job may run for hours; watching it needs a long deadline


class RrhfClient(ServiceClient):
    SERVICE = pb.DESCRIPTOR.services_by_name["RrhfService"].full_name
    STUB = rrhf_pb2_grpc.RrhfServiceStub
    RETRYABLE = ("Score", "Rank", "GetJob", "ListJobs")
    DEFAULT_TIMEOUT = 300.0

    def score(self, query: str, responses: Sequence[str], *, method: str = "policy_logprob", model_path: str = "",
              alpaca_prompt: bool = False) -> pb.ScoreResponse:  # fmt: skip
        options = pb.ScoringOptions(
            method=METHODS[method], model_path=model_path, alpaca_prompt=alpaca_prompt
        )
        return self.stub.Score(
            pb.ScoreRequest(query=query, responses=list(responses), options=options), **self._call()
        )

    def score_many(self, queries: Sequence[tuple[str, Sequence[str]]], *, method: str = "policy_logprob",
                   model_path: str = "", alpaca_prompt: bool = False) -> list[pb.QueryScores]:  # fmt: skip
        """Scores many (query, responses) pairs in one call; results in the same order."""
        options = pb.ScoringOptions(
            method=METHODS[method], model_path=model_path, alpaca_prompt=alpaca_prompt
        )
        request = pb.ScoreRequest(
            queries=[pb.ScoreQuery(query=q, responses=list(r)) for q, r in queries], options=options
        )
        return list(self.stub.Score(request, **self._call()).results)

    def rank(self, query: str, responses: Sequence[str], *, method: str = "policy_logprob", model_path: str = "",
             alpaca_prompt: bool = False) -> list[pb.RankedResponse]:  # fmt: skip
        options = pb.ScoringOptions(
            method=METHODS[method], model_path=model_path, alpaca_prompt=alpaca_prompt
        )
        request = pb.RankRequest(query=query, responses=list(responses), options=options)
        return list(self.stub.Rank(request, **self._call()).ranked)

    def start_training(self, model_path: str, output_path: str, *, data_path: str = "",
                       records: Sequence[pb.PreferenceRecord] = (), use_gpu: bool | None = None,
                       **hyperparameters) -> str:  # fmt: skip
        request = pb.StartTrainingRequest(
            model_path=model_path,
            output_path=output_path,
            hyperparameters=pb.TrainingHyperparameters(**hyperparameters),
            use_gpu=use_gpu,
        )
        if data_path:
            request.data_path = data_path
        else:
            request.records.CopyFrom(pb.PreferenceRecords(records=list(records)))
        return self.stub.StartTraining(request, **self._call()).job_id

    def generate_candidates(self, model_path: str, reward_model_path: str, queries: Sequence[str], output_path: str,
                            **options) -> str:  # fmt: skip
        request = pb.GenerateCandidatesRequest(model_path=model_path, reward_model_path=reward_model_path,
                                               queries=list(queries), output_path=output_path, **options)  # fmt: skip
        return self.stub.GenerateCandidates(request, **self._call()).job_id

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[pb.WatchJobResponse]:
        return self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), **self._call(timeout or WATCH_TIMEOUT))

    def get_job(self, job_id: str) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id), **self._call()).job

    def cancel_job(self, job_id: str) -> pb.Job:
        return self.stub.CancelJob(pb.CancelJobRequest(job_id=job_id), **self._call()).job

    def plan_training(self, model_path: str, *, use_gpu: bool | None = None, device_memory_gb: float | None = None,
                      responses_per_query: int | None = None, **hyperparameters) -> pb.MemoryPlan:  # fmt: skip
        request = pb.PlanTrainingRequest(model_path=model_path, use_gpu=use_gpu, device_memory_gb=device_memory_gb,
                                         responses_per_query=responses_per_query,
                                         hyperparameters=pb.TrainingHyperparameters(**hyperparameters))  # fmt: skip
        return self.stub.PlanTraining(request, **self._call()).plan

    def resume_job(self, job_id: str, num_workers: int | None = None) -> pb.Job:
        request = pb.ResumeJobRequest(job_id=job_id, num_workers=num_workers)
        return self.stub.ResumeJob(request, **self._call()).job

    def list_jobs(self, state: int = 0) -> list[pb.Job]:
        jobs, token = [], ""
        while True:
            response = self.stub.ListJobs(pb.ListJobsRequest(state=state, page_token=token), **self._call())
            jobs += list(response.jobs)
            token = response.next_page_token
            if not token:
                return jobs
