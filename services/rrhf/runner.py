"""Runs jobs on Ray: training through Ray Train's TorchTrainer, candidate generation in a Ray task.

The service process is the Ray driver. `trainer.fit()` blocks, so each job runs on its own thread; a
poller moves the workers' events from the job's channel actor into the job store.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import ray

from services.rrhf.events import create_channel
from services.rrhf.jobs import JobStore
from wombat_core.rrhf.data import PreferenceRecord
from wombat_core.rrhf.training import TrainingConfig, plan

log = logging.getLogger(__name__)


def init_ray(address: str | None, num_cpus: int | None = None, attempts: int = 2) -> None:
    """Joins `address` (a KubeRay head, say; else $RAY_ADDRESS) or starts a local cluster. Logical CPUs
    on a local cluster are at least 4 so that a 2-worker training job and the scorer actors fit on a
    small machine. A local start is retried once: on a loaded host Ray's node can miss its start-up
    deadline ("the current node timed out during startup") and then comes up fine the second time."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")  # set for a RayJob's driver: join that cluster
    if address:
        ray.init(address=address, namespace="wombat-rrhf", log_to_driver=False)
        return
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                     namespace="wombat-rrhf", log_to_driver=False, logging_level="WARNING")  # fmt: skip
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts:
                raise
            log.warning("the local Ray cluster did not start (attempt %d of %d); retrying", attempt, attempts)


class JobRunner:
    def __init__(self, store: JobStore, state_dir: Path, max_failures: int = 2):
        self.store = store
        self.state_dir = Path(state_dir).resolve()  # Ray Train needs an absolute storage path
        self.max_failures = max_failures
        self._channels: dict[str, object] = {}

    def start_training(self, model_dir: Path, output_dir: Path, output_display: str,
                       records: list[PreferenceRecord], config: TrainingConfig) -> str:  # fmt: skip
        job = self.store.create("training", output_display)
        self._channels[job.job_id] = create_channel(job.job_id)
        settings = {
            "config": config.as_dict(),
            "records": [
                {"query": r.query, "responses": list(r.responses), "scores": list(r.scores)} for r in records
            ],
            "job_id": job.job_id,
            "model_dir": str(model_dir),
            "output_dir": str(output_dir),
            "output_display": output_display,
        }
        total = plan(config, len(records)).total_steps
        threading.Thread(target=self._run_training, args=(job.job_id, settings, config, total), daemon=True,
                         name=f"job-{job.job_id}").start()  # fmt: skip
        return job.job_id

    def _run_training(self, job_id: str, settings: dict, config: TrainingConfig, total_steps: int) -> None:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from services.rrhf.train_worker import train_loop_per_worker

        channel = self._channels[job_id]
        # The cluster's GPUs, not this process's: on KubeRay the service is a GPU-less driver pod.
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=settings,
            scaling_config=ScalingConfig(
                num_workers=config.num_workers,
                use_gpu=use_gpu,
                # On CPU each worker gets an equal share of the cores (Ray sets its torch thread count).
                resources_per_worker=None
                if use_gpu
                else {"CPU": max(1, (os.cpu_count() or 1) // config.num_workers)},
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                name=job_id,
                storage_path=str(self.state_dir / "ray-results"),
                failure_config=FailureConfig(max_failures=self.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        self._supervise(job_id, channel, total_steps, lambda: trainer.fit().error)

    def _supervise(self, job_id: str, channel, total: int, work: Callable[[], BaseException | None]) -> None:
        """Marks the job running, runs `work` (which returns or raises the job's error) while relaying
        the job's events to the store, then records how it ended."""
        self.store.update(job_id, {"kind": "state", "state": "running"}, state="running")
        stop = threading.Event()
        poller = threading.Thread(target=self._poll, args=(job_id, channel, total, stop), daemon=True)
        poller.start()
        try:
            error = work()
        except Exception as exc:  # noqa: BLE001 - any failure ends the job with its reason
            error = exc
        stop.set()
        poller.join()
        self._drain(job_id, channel, total)
        self._finish(job_id, channel, error)

    def _poll(self, job_id: str, channel, total_steps: int, stop: threading.Event) -> None:
        while not stop.wait(0.3):
            self._drain(job_id, channel, total_steps)

    def _drain(self, job_id: str, channel, total_steps: int) -> None:
        try:
            events = ray.get(channel.drain.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a missed poll is retried
            return
        for event in events:
            changes = {}
            if event["kind"] == "step":
                changes = {"latest": event, "progress": event["step"] / max(1, total_steps)}
            elif event["kind"] == "progress":
                changes = {"progress": event["done"] / max(1, event["total"])}
            elif event["kind"] == "checkpoint":
                changes = {"last_checkpoint_step": event["step"]}
            self.store.update(job_id, event, **changes)

    def start_candidates(self, settings: dict, output_display: str) -> str:
        job = self.store.create("candidates", output_display)
        channel = self._channels[job.job_id] = create_channel(job.job_id)
        settings = {**settings, "job_id": job.job_id, "output_display": output_display}
        threading.Thread(
            target=self._run_candidates, args=(job.job_id, settings, channel), daemon=True
        ).start()
        return job.job_id

    def _run_candidates(self, job_id: str, settings: dict, channel) -> None:
        def work() -> None:
            ray.get(candidates_task.remote(settings))

        self._supervise(job_id, channel, len(settings["queries"]), work)

    def _finish(self, job_id: str, channel, error: BaseException | None) -> None:
        job = self.store.get(job_id)
        if ray.get(channel.cancelled.remote()):
            self.store.update(
                job_id,
                {"kind": "state", "state": "cancelled"},
                state="cancelled",
                error="cancelled by a client",
            )
        elif error is not None:
            log.warning("job %s failed: %s", job_id, error)
            self.store.update(
                job_id, {"kind": "state", "state": "failed"}, state="failed", error=_reason(error)
            )
        elif not any(e.get("kind") == "saved" for e in job.events):
            self.store.update(
                job_id,
                {"kind": "state", "state": "failed"},
                state="failed",
                error="the job ended without saving its output",
            )
        else:
            self.store.update(
                job_id, {"kind": "state", "state": "succeeded"}, state="succeeded", progress=1.0
            )
        ray.kill(channel)

    def cancel(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job.finished:
            return
        channel = self._channels.get(job_id)
        if channel is not None:
            channel.cancel.remote()
        else:
            self.store.update(
                job_id,
                {"kind": "state", "state": "cancelled"},
                state="cancelled",
                error="cancelled by a client",
            )


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:500]


@ray.remote(num_cpus=1)
def candidates_task(settings: dict) -> int:
    """Generates k candidates per query with the policy (diverse beam search, or sampling through the
    inference engine), scores them with the reward model and writes RRHF JSONL atomically."""
    import os
    import tempfile

    from services.rrhf.events import get_channel
    from wombat_core.engine import Engine, EngineConfig
    from wombat_core.engine.loading import load_for_serving
    from wombat_core.prompts import alpaca_prompt_from_query
    from wombat_core.rrhf.candidates import diverse_beam_search
    from wombat_core.rrhf.data import PreferenceRecord, dump_jsonl
    from wombat_core.rrhf.scoring import RewardModel

    channel = get_channel(settings["job_id"])
    policy = load_for_serving(Path(settings["model_dir"]))
    reward = RewardModel.load(Path(settings["reward_model_dir"]))
    k, max_new = settings["num_candidates"], settings["max_new_tokens"]
    engine = None
    if settings["method"] == "sampling":
        engine = Engine(
            policy.model,
            policy.tokenizer,
            EngineConfig(max_batch_size=k, context_length=policy.context_length),
        )
        engine.start()
    records = []
    try:
        for index, query in enumerate(settings["queries"]):
            if ray.get(channel.cancelled.remote()):
                return index
            prompt = alpaca_prompt_from_query(query)
            ids = list(policy.tokenizer(prompt)["input_ids"])
            if engine is None:
                candidates = diverse_beam_search(
                    policy.model, policy.tokenizer, ids, num_groups=k, max_new_tokens=max_new
                )
            else:
                candidates = _sample(engine, ids, k, max_new, settings["seed"] + index * k)
            scores = reward.score([prompt + c for c in candidates])
            records.append(PreferenceRecord(query, tuple(candidates), tuple(scores)))
            channel.put.remote({"kind": "progress", "done": index + 1, "total": len(settings["queries"])})
    finally:
        if engine is not None:
            engine.stop()
    output = Path(settings["output_file"])
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=output.parent, delete=False, suffix=".partial") as handle:
        handle.write(dump_jsonl(records))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, output)
    channel.put.remote({"kind": "saved", "path": settings["output_display"]})
    return len(records)


def _sample(engine, prompt_ids: list[int], k: int, max_new_tokens: int, seed: int) -> list[str]:
    """k independent samples (temperature 1, seeds seed..seed+k-1), batched together by the engine."""
    import threading

    from wombat_core.engine import GenerationRequest, SamplingParams

    texts, remaining, all_done = [""] * k, [k], threading.Event()
    lock = threading.Lock()

    def sink_for(i: int):
        def sink(event) -> None:  # runs on the engine thread: must never block
            texts[i] += event.text
            if event.finished:
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        all_done.set()

        return sink

    for i in range(k):
        params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed + i)
        engine.submit(GenerationRequest(f"candidate-{seed}-{i}", tuple(prompt_ids), params), sink_for(i))
    all_done.wait()
    return [t.strip() for t in texts]
