"""RrhfService: Score/Rank on the scorer pools; training and candidate jobs on Ray; job watching."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from services.rrhf import convert
from services.rrhf.jobs import JobStore
from services.rrhf.runner import JobRunner
from services.rrhf.scorer import ScorerPool
from wombat.rrhf.v1 import rrhf_pb2 as pb
from wombat.rrhf.v1 import rrhf_pb2_grpc
from wombat_core.checkpoint.layout import Checkpoint
from wombat_core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    WombatError,
)
from wombat_core.paths import ConfinedRoot
from wombat_core.rrhf.data import load_jsonl, validate_records
from wombat_core.rrhf.events import JobEvent, StateChanged
from wombat_core.rrhf.memory_plan import (
    GIB,
    ModelShape,
    describe,
    detected_device_memory,
    plan_with_suggestion,
)
from wombat_core.rrhf.scoring import ScoreItem

MAX_MODEL_POOLS = 4
MAX_QUERIES_PER_CALL = 256
log = logging.getLogger(__name__)


class RrhfServicer(rrhf_pb2_grpc.RrhfServiceServicer):
    def __init__(self, model_root: Path, data_root: Path, store: JobStore, runner: JobRunner,
                 default_models: dict[str, Path | None], scorer_replicas: int,
                 scorer_gpus: float = 0.0, max_pending_scores: int = 64,
                 device_memory_gb: float | None = None, scorer_dtype: str = "auto",
                 scorer_idle_seconds: float = 600.0):  # fmt: skip
        self.models = ConfinedRoot(model_root)
        self.data = ConfinedRoot(data_root)
        self.store, self.runner = store, runner
        self.default_models = default_models  # method -> directory
        self.scorer_replicas, self.scorer_gpus = scorer_replicas, scorer_gpus
        self.max_pending_scores = max_pending_scores
        self.device_memory_gb = device_memory_gb  # one training device's memory; None: detected
        self.scorer_dtype, self.scorer_idle_seconds = scorer_dtype, scorer_idle_seconds
        self._reaper: asyncio.Task | None = None
        self._pools: dict[tuple[str, Path], ScorerPool] = {}

    # --- scoring --------------------------------------------------------------------------------------

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        if not request.queries:
            scores = await self._score(request.query, request.responses, request.options)
            return pb.ScoreResponse(scores=scores, ranking=_ranking(scores))
        if request.query or request.responses:
            raise InvalidArgument(
                "send either query and responses, or queries; not both", metadata={"field": "queries"}
            )
        if len(request.queries) > MAX_QUERIES_PER_CALL:
            raise InvalidArgument(f"queries may hold at most {MAX_QUERIES_PER_CALL} entries, got {len(request.queries)}",
                                  metadata={"field": "queries"})  # fmt: skip
        # Every query goes to the pool at once, so they share packed forwards with each other and with other
        # callers; one invalid query fails the call with its position.
        results = await asyncio.gather(*(self._score(q.query, q.responses, request.options, where=f"queries[{n}]")
                                         for n, q in enumerate(request.queries)))  # fmt: skip
        return pb.ScoreResponse(results=[pb.QueryScores(scores=s, ranking=_ranking(s)) for s in results])

    async def Rank(self, request: pb.RankRequest, context) -> pb.RankResponse:
        scores = await self._score(request.query, request.responses, request.options)
        order = _ranking(scores)
        return pb.RankResponse(
            ranked=[pb.RankedResponse(index=i, response=request.responses[i], score=scores[i]) for i in order]
        )

    async def _score(self, query: str, responses, options: pb.ScoringOptions, where: str = "") -> list[float]:
        length_penalty = options.length_penalty if options.HasField("length_penalty") else 1.0
        with _located(where):
            item = ScoreItem(query, tuple(responses), length_penalty, options.alpaca_prompt)  # validates
        pool = self._pool(convert.scoring_method(options.method), options.model_path)
        try:
            await pool.wait_ready()
        except WombatError:
            # Forget a model that could not load, so a later call after the fix loads it afresh.
            self._pools = {key: value for key, value in self._pools.items() if value is not pool}
            await pool.close()
            raise
        with _located(where):
            return await pool.score(item)

    def _pool(self, method: str, model_path: str) -> ScorerPool:
        if model_path:
            directory = self._model_dir(model_path, "options.model_path")
        else:
            directory = self.default_models.get(method)
            if directory is None:
                flag = "--reward-model" if method == "reward_model" else "--policy-model"
                raise FailedPrecondition(
                    f"no default model for {method}: set options.model_path or start the service with {flag}"
                )
        key = (method, directory)
        if key not in self._pools:
            if len(self._pools) >= MAX_MODEL_POOLS:
                raise ResourceExhausted(f"at most {MAX_MODEL_POOLS} scoring models are loaded at once")
            self._pools[key] = ScorerPool(directory, method, self.scorer_replicas, gpus_per_replica=self.scorer_gpus,
                                          max_pending=self.max_pending_scores, dtype=self.scorer_dtype)  # fmt: skip
            if self._reaper is None:
                self._reaper = asyncio.create_task(self._close_idle_pools())
        return self._pools[key]

    async def _close_idle_pools(self) -> None:
        """Closes scorer pools unused for `scorer_idle_seconds`, so their actors give back the GPUs (and
        memory) they hold; the next call for the model loads it again."""
        while True:
            await asyncio.sleep(max(0.05, min(1.0, self.scorer_idle_seconds / 4)))
            now = time.monotonic()
            idle = [key for key, pool in self._pools.items()
                    if pool.in_progress == 0 and now - pool.last_used > self.scorer_idle_seconds]  # fmt: skip
            for key in idle:
                pool = self._pools.pop(key)
                log.info("closing the idle %s scorer of %s", key[0], key[1].name)
                await pool.close()

    def scores_in_progress(self) -> int:
        return sum(pool.in_progress for pool in list(self._pools.values()))

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()

    # --- jobs -------------------------------------------------------------------------------------------

    async def StartTraining(self, request: pb.StartTrainingRequest, context) -> pb.StartTrainingResponse:
        model_dir = self._model_dir(request.model_path, "model_path")
        output = self._new_output(request.output_path)
        config = convert.training_config(request.hyperparameters)
        records = await asyncio.to_thread(self._records, request)
        responses, length = await asyncio.to_thread(self._precheck, model_dir, records, config)
        use_gpu = self._use_gpu(request)
        await asyncio.to_thread(self._check_memory, model_dir, config, use_gpu, responses, length)
        job_id = self.runner.start_training(model_dir, output, request.output_path, records, config, use_gpu)
        return pb.StartTrainingResponse(job_id=job_id)

    async def PlanTraining(self, request: pb.PlanTrainingRequest, context) -> pb.PlanTrainingResponse:
        model_dir = self._model_dir(request.model_path, "model_path")
        config = convert.training_config(request.hyperparameters)
        use_gpu = self._use_gpu(request)
        responses = request.responses_per_query if request.HasField("responses_per_query") else 4
        length = request.sequence_length if request.HasField("sequence_length") else config.model_max_length
        if responses < 1 or length < 2:
            raise InvalidArgument("responses_per_query must be >= 1 and sequence_length >= 2")
        memory = request.device_memory_gb if request.HasField("device_memory_gb") else None
        if memory is not None and not 0 < memory < 1e6:
            raise InvalidArgument(
                f"device_memory_gb must be in (0, 1e6), got {memory}", metadata={"field": "device_memory_gb"}
            )
        plan = await asyncio.to_thread(self._plan, model_dir, config, use_gpu, responses, length, memory)
        return pb.PlanTrainingResponse(plan=convert.memory_plan(plan))

    def _model_dir(self, path: str, field: str) -> Path:
        """A model directory under the model root that holds weights (NOT_FOUND or FAILED_PRECONDITION if not)."""
        directory = self.models.resolve(path, field=field, must_exist=True)
        Checkpoint.open(directory, role="model", confine_to=self.models.root)
        return directory

    def _use_gpu(self, request) -> bool:
        """The request's `use_gpu`, else the service's --training-device."""
        return request.use_gpu if request.HasField("use_gpu") else self.runner.train_on_gpu

    def _plan(
        self, model_dir: Path, config, use_gpu: bool, responses: int, length: int, memory_gb: float | None
    ):
        memory_gb = memory_gb or self.device_memory_gb
        if memory_gb:
            device_memory = int(memory_gb * GIB)
        else:
            try:
                device_memory = detected_device_memory(use_gpu, config.num_workers)
            except ValueError as exc:
                raise FailedPrecondition(f"{exc} (or start the service with --device-memory-gb)") from None
        return plan_with_suggestion(ModelShape.from_directory(model_dir), config, use_gpu=use_gpu,
                                    responses_per_query=responses, device_memory_bytes=device_memory,
                                    sequence_length=length)  # fmt: skip

    def _check_memory(self, model_dir: Path, config, use_gpu: bool, responses: int, length: int) -> None:
        """Refuses a job whose plan does not fit its devices, before any worker starts. A GPU job planned on a
        service that cannot see the GPUs (a CPU head pod) and was given no --device-memory-gb is let through
        with a warning: the plan cannot be checked there."""
        try:
            plan = self._plan(model_dir, config, use_gpu, responses, length, None)
        except FailedPrecondition as exc:
            log.warning("training memory not checked: %s", exc.message)
            return
        except ValueError as exc:  # a model the planner cannot read the shape of
            log.warning("training memory not checked: %s", exc)
            return
        if not plan.fits:
            raise FailedPrecondition(
                describe(plan),
                metadata={
                    "per_device_bytes": str(plan.per_device_bytes),
                    "device_memory_bytes": str(plan.device_memory_bytes),
                },
            )

    async def ResumeJob(self, request: pb.ResumeJobRequest, context) -> pb.ResumeJobResponse:
        workers = request.num_workers if request.HasField("num_workers") else None
        if workers is not None and not 1 <= workers <= 1024:
            raise InvalidArgument(
                f"num_workers must be in [1, 1024], got {workers}", metadata={"field": "num_workers"}
            )
        run, use_gpu = await asyncio.to_thread(self.runner.resumable_run, request.job_id, workers)
        responses, length = await asyncio.to_thread(self._precheck, run.model_dir, run.records, run.config)
        await asyncio.to_thread(self._check_memory, run.model_dir, run.config, use_gpu, responses, length)
        self.runner.resume_training(request.job_id, run, use_gpu)
        return pb.ResumeJobResponse(job=convert.job(self.store.get(request.job_id)))

    def _records(self, request: pb.StartTrainingRequest):
        which = request.WhichOneof("data")
        if which == "data_path":
            return load_jsonl(
                self.data.resolve(request.data_path, field="data_path", must_exist=True), root=self.data.root
            )
        if which == "records":
            raws = [
                {"query": r.query, "responses": list(r.responses), "scores": list(r.scores)}
                for r in request.records.records
            ]
            return validate_records(raws)
        raise InvalidArgument(
            "give the training data as data_path (JSONL under the data root) or inline records"
        )

    @staticmethod
    def _precheck(model_dir: Path, records, config) -> tuple[int, int]:
        """Collates every record once, so a query too long for model_max_length fails now, not mid-run.
        Returns the most responses of a query and the longest sequence, which size the memory plan."""
        from wombat_core.rrhf.collate import collate_record
        from wombat_core.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir, padding_side="right")
        responses = length = 0
        for number, record in enumerate(records, start=1):
            group = collate_record(tokenizer, record, config.collation, where=f"record {number}")
            responses, length = (
                max(responses, group.input_ids.shape[0]),
                max(length, group.input_ids.shape[1]),
            )
        return responses, length

    def _new_output(self, path: str) -> Path:
        output = self.models.resolve(path, field="output_path")
        if output.exists():
            raise AlreadyExists(f"output_path {path!r} already exists; choose a new directory")
        return output

    async def GenerateCandidates(
        self, request: pb.GenerateCandidatesRequest, context
    ) -> pb.GenerateCandidatesResponse:
        model_dir = self.models.resolve(request.model_path, field="model_path", must_exist=True)
        reward_dir = self.models.resolve(
            request.reward_model_path, field="reward_model_path", must_exist=True
        )
        config = convert.candidates_config(request)
        output = self.data.resolve(request.output_path, field="output_path")
        if output.exists():
            raise AlreadyExists(f"output_path {request.output_path!r} already exists; choose a new file")
        use_gpu = self._use_gpu(request)
        job_id = self.runner.start_candidates(
            model_dir, reward_dir, output, request.output_path, config, use_gpu
        )
        return pb.GenerateCandidatesResponse(job_id=job_id)

    async def WatchJob(self, request: pb.WatchJobRequest, context) -> AsyncIterator[pb.WatchJobResponse]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def listener(job, event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (job, event))

        job = self.store.subscribe(request.job_id, listener)
        # The snapshot below already shows a finished job's state.
        event: JobEvent = StateChanged(job.state.value)
        try:
            yield pb.WatchJobResponse(job_id=job.job_id, job=convert.job(job))
            while not job.finished:
                job, event = await queue.get()
                message = convert.watch_event(job, event)
                if message is not None:
                    yield message
            if not isinstance(event, StateChanged):
                yield pb.WatchJobResponse(job_id=job.job_id, job=convert.job(job))
        finally:
            self.store.unsubscribe(request.job_id, listener)

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=convert.job(self.store.get(request.job_id)))

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.CancelJobResponse:
        self.runner.cancel(request.job_id)
        return pb.CancelJobResponse(job=convert.job(self.store.get(request.job_id)))

    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        size = request.page_size or 100
        if not 1 <= size <= 1000:
            raise InvalidArgument(f"page_size must be in [1, 1000], got {size}")
        try:
            offset = int(base64.urlsafe_b64decode(request.page_token).decode()) if request.page_token else 0
        except ValueError:
            raise InvalidArgument("page_token is not a token this service issued") from None
        jobs = self.store.list(convert.job_state(request.state) if request.state else None)
        page = jobs[offset : offset + size]
        token = (
            base64.urlsafe_b64encode(str(offset + size).encode()).decode()
            if offset + size < len(jobs)
            else ""
        )
        return pb.ListJobsResponse(jobs=[convert.job(j) for j in page], next_page_token=token)


def _ranking(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


@contextlib.contextmanager
def _located(where: str) -> Iterator[None]:
    """Prefixes an InvalidArgument with the request element it is about (e.g. "queries[3]: ..."), if any."""
    try:
        yield
    except InvalidArgument as exc:
        if not where:
            raise
        raise InvalidArgument(f"{where}: {exc.message}", metadata={"field": where}) from None
