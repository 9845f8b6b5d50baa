"""Synchronous client for the RRHF service.

Score, Rank, GetJob and ListJobs are read-only and retried on UNAVAILABLE; starting jobs is not retried
(a retry could start a second job).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

from clients.channel import ChannelSettings, call_metadata, open_channel
from wombat.rrhf.v1 import rrhf_pb2 as pb
from wombat.rrhf.v1 import rrhf_pb2_grpc

_SERVICE = "wombat.rrhf.v1.RrhfService"
_RETRY = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": _SERVICE, "method": m} for m in ("Score", "Rank", "GetJob", "ListJobs")],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
METHODS = {"policy_logprob": pb.SCORING_METHOD_POLICY_LOGPROB, "reward_model": pb.SCORING_METHOD_REWARD_MODEL}


class RrhfClient:
    def __init__(self, settings: ChannelSettings | str, *, timeout: float | None = 300.0):
        self.settings = ChannelSettings(settings) if isinstance(settings, str) else settings
        self._channel = open_channel(self.settings, _RETRY)
        self._stub = rrhf_pb2_grpc.RrhfServiceStub(self._channel)
        self.timeout = timeout

    def _kw(self, timeout: float | None = None) -> dict:
        return {"timeout": timeout or self.timeout, "metadata": call_metadata(self.settings)}

    def score(self, query: str, responses: Sequence[str], *, method: str = "policy_logprob", model_path: str = "",
              alpaca_prompt: bool = False) -> pb.ScoreResponse:  # fmt: skip
        options = pb.ScoringOptions(
            method=METHODS[method], model_path=model_path, alpaca_prompt=alpaca_prompt
        )
        return self._stub.Score(
            pb.ScoreRequest(query=query, responses=list(responses), options=options), **self._kw()
        )

    def rank(self, query: str, responses: Sequence[str], *, method: str = "policy_logprob", model_path: str = "",
             alpaca_prompt: bool = False) -> list[pb.RankedResponse]:  # fmt: skip
        options = pb.ScoringOptions(
            method=METHODS[method], model_path=model_path, alpaca_prompt=alpaca_prompt
        )
        request = pb.RankRequest(query=query, responses=list(responses), options=options)
        return list(self._stub.Rank(request, **self._kw()).ranked)

    def start_training(self, model_path: str, output_path: str, *, data_path: str = "",
                       records: Sequence[pb.PreferenceRecord] = (), **hyperparameters) -> str:  # fmt: skip
        request = pb.StartTrainingRequest(
            model_path=model_path,
            output_path=output_path,
            hyperparameters=pb.TrainingHyperparameters(**hyperparameters),
        )
        if data_path:
            request.data_path = data_path
        else:
            request.records.CopyFrom(pb.PreferenceRecords(records=list(records)))
        return self._stub.StartTraining(request, **self._kw()).job_id

    def generate_candidates(self, model_path: str, reward_model_path: str, queries: Sequence[str], output_path: str,
                            **options) -> str:  # fmt: skip
        request = pb.GenerateCandidatesRequest(model_path=model_path, reward_model_path=reward_model_path,
                                               queries=list(queries), output_path=output_path, **options)  # fmt: skip
        return self._stub.GenerateCandidates(request, **self._kw()).job_id

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[pb.WatchJobResponse]:
        return self._stub.WatchJob(pb.WatchJobRequest(job_id=job_id), **self._kw(timeout or 24 * 3600))

    def get_job(self, job_id: str) -> pb.Job:
        return self._stub.GetJob(pb.GetJobRequest(job_id=job_id), **self._kw()).job

    def cancel_job(self, job_id: str) -> pb.Job:
        return self._stub.CancelJob(pb.CancelJobRequest(job_id=job_id), **self._kw()).job

    def list_jobs(self, state: int = 0) -> list[pb.Job]:
        jobs, token = [], ""
        while True:
            response = self._stub.ListJobs(pb.ListJobsRequest(state=state, page_token=token), **self._kw())
            jobs += list(response.jobs)
            token = response.next_page_token
            if not token:
                return jobs

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RrhfClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
