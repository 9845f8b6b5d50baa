"""MaterializerService: translates requests to wombat_core jobs and streams their progress back.

Heavy work runs in a thread pool so the event loop keeps answering health checks and other calls. When a
client cancels (or its deadline passes) the job's cancel flag is set and the call waits for the job to
remove its partial output before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

from services.materializer import convert
from wombat.materializer.v1 import materializer_pb2 as pb
from wombat.materializer.v1 import materializer_pb2_grpc
from wombat_core import catalog, delta
from wombat_core.errors import ResourceExhausted
from wombat_core.jobs import JobControl, Progress
from wombat_core.manifest import verify_directory
from wombat_core.paths import ConfinedRoot

log = logging.getLogger(__name__)

JobResponse = TypeVar("JobResponse", pb.MaterializeResponse, pb.MakeDeltaResponse, pb.ConvertResponse)


class MaterializerServicer(materializer_pb2_grpc.MaterializerServiceServicer):
    def __init__(self, model_root: Path, max_jobs: int = 2):
        self.root = ConfinedRoot(model_root)
        self._max_jobs = max_jobs
        self._running = 0
        self._executor = ThreadPoolExecutor(max_workers=max_jobs + 2, thread_name_prefix="materializer")

    # --- streaming jobs -------------------------------------------------------------------------------

    async def Materialize(
        self, request: pb.MaterializeRequest, context
    ) -> AsyncIterator[pb.MaterializeResponse]:
        base = self.root.resolve(request.base_path, field="base_path")
        delta_dir = self.root.resolve(request.delta_path, field="delta_path")
        target = self.root.resolve(request.target_path, field="target_path")
        options = convert.delta_options(request.options)
        displays = {"base": request.base_path, "delta": request.delta_path, "output": request.target_path}

        run = partial(
            delta.apply_delta, base, delta_dir, target, options, confine_to=self.root.root, displays=displays
        )
        async for event in self._run_job(run, pb.MaterializeResponse, request.target_path):
            yield event

    async def MakeDelta(self, request: pb.MakeDeltaRequest, context) -> AsyncIterator[pb.MakeDeltaResponse]:
        base = self.root.resolve(request.base_path, field="base_path")
        target = self.root.resolve(request.target_path, field="target_path")
        delta_dir = self.root.resolve(request.delta_path, field="delta_path")
        options = convert.delta_options(request.options)
        displays = {"base": request.base_path, "target": request.target_path, "output": request.delta_path}

        run = partial(
            delta.make_delta, base, target, delta_dir, options, confine_to=self.root.root, displays=displays
        )
        async for event in self._run_job(run, pb.MakeDeltaResponse, request.delta_path):
            yield event

    async def Convert(self, request: pb.ConvertRequest, context) -> AsyncIterator[pb.ConvertResponse]:
        source = self.root.resolve(request.source_path, field="source_path")
        output = self.root.resolve(request.output_path, field="output_path")
        displays = {"source": request.source_path, "output": request.output_path}

        run = partial(delta.convert_checkpoint, source, output, confine_to=self.root.root, displays=displays)
        async for event in self._run_job(run, pb.ConvertResponse, request.output_path):
            yield event

    # --- unary ----------------------------------------------------------------------------------------

    async def Verify(self, request: pb.VerifyRequest, context) -> pb.VerifyResponse:
        directory = self.root.resolve(request.path, field="path", must_exist=True)
        report = await self._in_thread(verify_directory, directory)
        return convert.verify_response(report)

    async def Describe(self, request: pb.DescribeRequest, context) -> pb.DescribeResponse:
        directory = self.root.resolve(request.path, field="path", must_exist=True)
        summary = await self._in_thread(
            catalog.describe_model, directory, request.path, confine_to=self.root.root
        )
        return pb.DescribeResponse(model=convert.model_summary(summary))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        start = self.root.resolve(request.prefix, field="prefix") if request.prefix else self.root.root
        summaries = await self._in_thread(catalog.list_models, self.root.root, start)
        return pb.ListModelsResponse(models=[convert.model_summary(s) for s in summaries])

    # --- plumbing -------------------------------------------------------------------------------------

    async def _in_thread(self, fn: Callable, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    @property
    def jobs_running(self) -> int:
        return self._running

    async def _run_job(
        self,
        run: Callable[[JobControl], delta.JobOutcome],
        response_type: type[JobResponse],
        output_path: str,
    ) -> AsyncIterator[JobResponse]:
        """Runs `run` in a worker thread; yields `response_type` progress events, then one result event."""
        if self._running >= self._max_jobs:
            raise ResourceExhausted(
                f"the materialiser is already running {self._running} job(s), its limit; retry when one finishes"
            )
        self._running += 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Progress] = asyncio.Queue()
        cancel = threading.Event()
        control = JobControl(lambda p: loop.call_soon_threadsafe(events.put_nowait, p), cancel)
        job = loop.run_in_executor(self._executor, run, control)
        next_event: asyncio.Future | None = None
        try:
            while not job.done() or not events.empty():
                next_event = asyncio.ensure_future(events.get())
                await asyncio.wait({next_event, job}, return_when=asyncio.FIRST_COMPLETED)
                if next_event.done():
                    yield response_type(progress=convert.progress(next_event.result()))
                else:
                    next_event.cancel()  # a stale getter must not swallow a later event
            yield response_type(result=convert.job_result(job.result(), output_path))
        finally:
            self._running -= 1
            if next_event is not None:
                next_event.cancel()
            if not job.done():
                # Client went away or the deadline passed: stop the job and wait until it has removed its
                # partial output, so nothing half-written outlives the call.
                log.info("job cancelled by the client; stopping it")
                cancel.set()
                with contextlib.suppress(BaseException):
                    await asyncio.shield(job)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
