"""RRHF: `score`, `train`, and `jobs list|get|watch|cancel` against the rrhf service.

`wombat train` without --server (but with --model-root and --data-root) runs the same service in this
process for the one job: a KubeRay RayJob's entrypoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from services.cli import render
from services.cli.common import JsonOpt, client_settings, core, fail, rpc

app = typer.Typer()
jobs_app = typer.Typer(no_args_is_help=True, help="RRHF service jobs: list, get, watch, cancel.")

RrhfServerOpt = Annotated[str, typer.Option("--server", help="HOST:PORT of the rrhf service")]


def _client(server: str):
    from clients.rrhf import RrhfClient

    return RrhfClient(client_settings(server))


@contextlib.contextmanager
def _rrhf_server(server: str | None, model_root: Path | None, data_root: Path | None,
                 device_memory_gb: float | None = None):  # fmt: skip
    """The rrhf service to use: the one at --server, or one in this process on the given roots (planning
    and checking jobs against `device_memory_gb` per device)."""
    if server:
        if model_root or data_root:
            fail("--model-root and --data-root are for running without --server; the server has its own")
        yield server
        return
    if model_root is None or data_root is None:
        fail("give --server HOST:PORT, or --model-root and --data-root to run the job in this process")
    from services.rrhf.local import local_service
    from services.rrhf.server import RrhfSettings

    settings = core(
        lambda: RrhfSettings(model_root=model_root, data_root=data_root, device_memory_gb=device_memory_gb)
    )
    with local_service(settings) as address:
        yield address


@app.command()
def score(
    server: RrhfServerOpt,
    query: Annotated[str, typer.Option(help="the query the responses answer")],
    response: Annotated[list[str], typer.Option(help="a candidate response (repeat for each)")],
    method: Annotated[str, typer.Option(help="policy_logprob or reward_model")] = "policy_logprob",
    model: Annotated[str, typer.Option(help="model directory under the server's model root")] = "",
    alpaca: Annotated[bool, typer.Option(help="wrap the query in the Alpaca template")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Score candidate responses and print them best first."""
    if method not in ("policy_logprob", "reward_model"):
        fail(f"--method must be policy_logprob or reward_model, got {method}")
    with _client(server) as client:
        result = rpc(
            lambda: client.score(query, response, method=method, model_path=model, alpaca_prompt=alpaca)
        )
    if json_output:
        render.print_json("scores", {"scores": list(result.scores), "ranking": list(result.ranking)})
        return
    for rank, index in enumerate(result.ranking, start=1):
        render.console.print(f"{rank}. [{result.scores[index]:+.4f}] {response[index]}")


def _follow(client, job_id: str, as_json: bool):
    """Streams a job's events: a progress bar with the loss for people, JSON lines for scripts (one per
    event, named by the kind of event: "step", "checkpoint" or "job"). Returns the job's final state."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from wombat.rrhf.v1 import rrhf_pb2 as pb

    final = None
    if as_json:

        def stream() -> None:
            nonlocal final
            for event in client.watch(job_id):  # printed as each arrives, not when the job ends
                render.print_json(event.WhichOneof("event"), event)
                final = event.job if event.HasField("job") else final

        rpc(stream)
        return final
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=render.console) as bar:  # fmt: skip
        task = bar.add_task(f"job {job_id}", total=None, info="starting Ray workers")

        def follow() -> None:
            nonlocal final
            for event in client.watch(job_id):
                if event.HasField("step"):
                    s = event.step
                    info = f"loss {s.loss:.4f} (rank {s.rank_loss:.4f}, sft {s.sft_loss:.4f}) lr {s.learning_rate:.2e}"
                    bar.update(task, total=s.total_steps, completed=s.step, info=info)
                elif event.HasField("checkpoint"):
                    bar.update(task, info=f"checkpoint at step {event.checkpoint.step}")
                elif event.HasField("job"):
                    final = event.job
                    if final.kind == pb.JOB_KIND_CANDIDATES:  # no steps, only progress
                        bar.update(task, total=100, completed=round(final.progress * 100), info="")

        rpc(follow)
    return final


def _print_job(job) -> None:
    from wombat.rrhf.v1 import rrhf_pb2 as pb

    state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
    kind = pb.JobKind.Name(job.kind).removeprefix("JOB_KIND_").lower()
    latest = (
        f" step {job.latest.step}/{job.latest.total_steps} loss {job.latest.loss:.4f}"
        if job.latest.step
        else ""
    )
    error = f" — {job.error}" if job.error else ""
    render.console.print(
        f"{job.job_id}  {kind:10} {state:9} {job.progress * 100:5.1f}%  {job.output_path}{latest}{error}"
    )


@app.command()
def train(
    model: Annotated[str | None, typer.Option(help="model directory under the model root")] = None,
    data: Annotated[str | None, typer.Option(help="JSONL under the data root")] = None,
    output: Annotated[str | None, typer.Option(help="directory to create under the model root")] = None,
    server: Annotated[str | None, typer.Option(help="HOST:PORT of the rrhf service")] = None,
    model_root: Annotated[
        Path | None, typer.Option(help="without --server: run the job in this process, models here")
    ] = None,
    data_root: Annotated[Path | None, typer.Option(help="without --server: training data here")] = None,
    resume: Annotated[
        str | None, typer.Option(help="resume this failed or cancelled job from its latest checkpoint")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers [default: 1]")] = None,
    strategy: Annotated[str, typer.Option(help="fsdp (sharded, the reference recipe) or ddp")] = "fsdp",
    precision: Annotated[
        str | None, typer.Option(help="fp32 or bf16 [default: bf16 on GPUs, fp32 on CPU]")
    ] = None,
    gpu: Annotated[
        bool | None,
        typer.Option("--gpu/--cpu", help="train on GPUs [default: the service's --training-device]"),
    ] = None,
    epochs: Annotated[int, typer.Option(help="passes over the data")] = 3,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many steps")] = None,
    learning_rate: Annotated[float, typer.Option(help="peak learning rate")] = 2e-5,
    scheduler: Annotated[str, typer.Option(help="cosine or linear decay after the warm-up")] = "cosine",
    warmup_ratio: Annotated[float, typer.Option(help="fraction of the steps spent warming up")] = 0.03,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="clip the gradient norm to this (0: off)")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="queries per worker per micro-step")] = 1,
    gradient_accumulation_steps: Annotated[int, typer.Option(help="micro-steps per optimiser step")] = 8,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="recompute activations in the backward pass (less memory, ~30 % slower)")
    ] = False,
    rrhf_weight: Annotated[float, typer.Option(help="weight of the rank loss")] = 1.0,
    length_penalty: Annotated[float, typer.Option(help="exponent of the response length in p_i")] = 1.0,
    model_max_length: Annotated[int, typer.Option(help="max tokens of query + response")] = 512,
    alpaca: Annotated[bool, typer.Option(help="wrap each query in the Alpaca template")] = False,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="steps between checkpoints [default: an epoch]")
    ] = None,
    keep_checkpoints: Annotated[int, typer.Option(help="newest checkpoints kept in the job's directory")] = 2,
    detach: Annotated[bool, typer.Option(help="print the job id and return at once")] = False,
    plan: Annotated[
        bool, typer.Option("--plan", help="print the job's estimated peak memory per device and exit")
    ] = False,
    device_memory_gb: Annotated[
        float | None,
        typer.Option(
            help="memory of one device in GiB, for --plan and (without --server) the job's memory check"
        ),
    ] = None,
    responses_per_query: Annotated[int, typer.Option(help="--plan: responses per query")] = 4,
    json_output: JsonOpt = False,
) -> None:
    """Start (or --resume) an RRHF training job and follow it with a progress bar.

    With --server the rrhf service runs it. Without, give --model-root and --data-root: the same service
    runs in this process for the one job, on $RAY_ADDRESS's cluster (a KubeRay RayJob) or a local one; its
    job state lives under the data root, so `--resume JOB` works there after a restart too.
    """
    from wombat.rrhf.v1 import rrhf_pb2 as pb

    if plan and not model:
        fail("--plan needs --model")
    if not plan and resume is None and not (model and data and output):
        fail("give --model, --data and --output to start a job, or --resume JOB to continue one")
    choices = {"--strategy": (strategy, ("fsdp", "ddp")), "--scheduler": (scheduler, ("cosine", "linear")),
               "--precision": (precision, (None, "fp32", "bf16"))}  # fmt: skip
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            fail(f"{flag} must be one of {', '.join(a for a in allowed if a)}, got {value}")
    hyper = dict(num_workers=workers or 1, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                 rrhf_weight=rrhf_weight, length_penalty=length_penalty, model_max_length=model_max_length,
                 alpaca_prompt=alpaca, strategy=getattr(pb, f"STRATEGY_{strategy.upper()}"),
                 scheduler=getattr(pb, f"SCHEDULER_{scheduler.upper()}"), warmup_ratio=warmup_ratio,
                 weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                 gradient_accumulation_steps=gradient_accumulation_steps,
                 gradient_checkpointing=gradient_checkpointing, keep_checkpoints=keep_checkpoints,
                 max_steps=max_steps, checkpoint_every_steps=checkpoint_every,
                 precision=getattr(pb, f"PRECISION_{precision.upper()}") if precision else None)  # fmt: skip
    local_memory = None if server else device_memory_gb
    with _rrhf_server(server, model_root, data_root, local_memory) as address, _client(address) as client:
        if plan:
            result = rpc(lambda: client.plan_training(model, use_gpu=gpu, device_memory_gb=device_memory_gb,
                                                      responses_per_query=responses_per_query, **hyper))  # fmt: skip
            _print_plan(result, json_output)
            return
        if resume is not None:
            job_id = resume
            rpc(lambda: client.resume_job(resume, workers))
        else:
            job_id = rpc(lambda: client.start_training(model, output, data_path=data, use_gpu=gpu, **hyper))
        if detach:
            print(job_id)
            return
        final = _follow(client, job_id, json_output)
    if not json_output and final is not None:
        _print_job(final)
    if final is None or final.state != pb.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


def _print_plan(plan, as_json: bool) -> None:
    if as_json:
        render.print_json("plan", plan)
        return
    from rich.table import Table

    from wombat_core.rrhf.memory_plan import gib

    table = Table(title=f"peak memory per {plan.device} device, {plan.parameters / 1e9:.2f}B parameters on "
                        f"{plan.workers} workers")  # fmt: skip
    table.add_column("term")
    table.add_column("per device", justify="right")
    for item in plan.items:
        table.add_row(item.name, gib(item.bytes))
    table.add_row("[bold]peak[/bold]", f"[bold]{gib(plan.per_device_bytes)}[/bold]")
    table.add_row("device memory", gib(plan.device_memory_bytes))
    render.console.print(table)
    render.console.print(f"host memory to load the checkpoint, per worker: {gib(plan.host_load_bytes)}")
    if plan.fits:
        render.console.print("[green]fits[/green]")
    else:
        render.console.print(f"[red]does not fit[/red]; a configuration that fits: {plan.suggestion}")


@jobs_app.command("list")
def jobs_list(server: RrhfServerOpt, json_output: JsonOpt = False) -> None:
    """List jobs, newest first."""
    with _client(server) as client:
        jobs = rpc(client.list_jobs)
    for job in jobs:
        render.print_json("job", job) if json_output else _print_job(job)


@jobs_app.command("get")
def jobs_get(job_id: str, server: RrhfServerOpt, json_output: JsonOpt = False) -> None:
    """Show one job."""
    with _client(server) as client:
        job = rpc(lambda: client.get_job(job_id))
    render.print_json("job", job) if json_output else _print_job(job)


@jobs_app.command("watch")
def jobs_watch(job_id: str, server: RrhfServerOpt, json_output: JsonOpt = False) -> None:
    """Follow a job until it ends."""
    with _client(server) as client:
        final = _follow(client, job_id, json_output)
    if final is not None and not json_output:
        _print_job(final)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, server: RrhfServerOpt) -> None:
    """Cancel a job (a finished job is left as it is)."""
    with _client(server) as client:
        _print_job(rpc(lambda: client.cancel_job(job_id)))
