"""`wombat serve materializer|inference|rrhf|gateway`: run one service until SIGTERM (the serve lifecycle).

Every option can also come from the environment as WOMBAT_SERVE_<SERVICE>_<OPTION>, e.g.
WOMBAT_SERVE_INFERENCE_MAX_BATCH_SIZE: Kubernetes ConfigMaps and `wombat up` configure services this way.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from services.cli.common import core, fail
from wombat_core.errors import InvalidArgument, WombatError

app = typer.Typer(no_args_is_help=True, help="Run a Wombat gRPC service.")

# Options every `wombat serve <service>` shares (the scaffold's settings).
HostOpt = Annotated[str, typer.Option(help="address to bind")]
MetricsPortOpt = Annotated[int, typer.Option(help="Prometheus port (0 picks one, -1 disables)")]
HealthPortOpt = Annotated[
    int | None, typer.Option(help="plaintext health-only port for Kubernetes gRPC probes (TLS-less)")
]
DrainOpt = Annotated[float, typer.Option(help="SIGTERM: seconds in-flight calls get to finish")]
TlsCertOpt = Annotated[Path | None, typer.Option(help="PEM certificate; enables TLS")]
TlsKeyOpt = Annotated[Path | None, typer.Option(help="PEM private key")]
TlsCaOpt = Annotated[Path | None, typer.Option(help="PEM CA; requires client certificates (mTLS)")]
AuthTokenOpt = Annotated[Path | None, typer.Option(help="bearer token file (or $WOMBAT_AUTH_TOKEN)")]
LogLevelOpt = Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")]


@app.command("materializer")
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
    from services.materializer.server import MaterializerService

    _run(lambda: MaterializerService(model_root, max_jobs=max_jobs),
         log_level, host, port, metrics_port, health_port, drain_seconds,
         tls_cert, tls_key, tls_client_ca, auth_token_file)  # fmt: skip


@app.command("inference")
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
    cpu_threads: Annotated[
        int | None,
        typer.Option(
            help="the engine's threads on CPU (default: the pod's CPU quota, or every core it may use)"
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="auto (vllm where CUDA and the vllm package are present, else wombat), wombat or vllm"
        ),
    ] = "auto",
    max_model_len: Annotated[
        int | None, typer.Option(help="caps the context (prompt + output tokens) below the model's own")
    ] = None,
    gpu_memory_utilization: Annotated[
        float,
        typer.Option(
            help="share of the GPU's memory for weights, KV cache and activations (KV preallocated)"
        ),
    ] = 0.9,
    max_new_tokens_limit: Annotated[
        int, typer.Option(help="largest max_new_tokens a request may ask")
    ] = 4096,
    admission_wait_ms: Annotated[
        float,
        typer.Option(
            help="in-house engine: after a step that freed a slot, wait up to this long (at most 15 percent "
            "of a step) for the next request before stepping again; 0 turns it off"
        ),
    ] = 10.0,
    default_format: Annotated[
        str, typer.Option(help="prompt format when a request leaves it unset: raw, alpaca or chat")
    ] = "alpaca",
    drain_seconds: DrainOpt = 30.0,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_client_ca: TlsCaOpt = None,
    auth_token_file: AuthTokenOpt = None,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Serve token-streaming generation with continuous batching (the in-house engine or vLLM)."""
    from services.inference.server import EngineKind, InferenceService, InferenceSettings
    from wombat_core.engine.prompting import PromptFormat

    formats = {f.value: f for f in PromptFormat}
    if default_format not in formats:
        fail(f"--default-format must be raw, alpaca or chat, got {default_format}")
    engines = {e.value: e for e in EngineKind}
    if engine not in engines:
        fail(f"--engine must be auto, wombat or vllm, got {engine}")
    if max_model_len is not None and max_model_len < 2:
        fail(f"--max-model-len must be >= 2, got {max_model_len}")
    if not 0 < gpu_memory_utilization <= 1:
        fail(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    if admission_wait_ms < 0:
        fail(f"--admission-wait-ms must be >= 0, got {admission_wait_ms}")
    settings = InferenceSettings(
        model_dir=model,
        engine=engines[engine],
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        max_new_tokens_limit=max_new_tokens_limit,
        dtype=dtype,
        device=device,
        default_format=formats[default_format],
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_prefill_tokens=max_prefill_tokens,
        cpu_threads=cpu_threads,
        admission_wait_s=admission_wait_ms / 1000,
    )
    _run(lambda: InferenceService(settings),
         log_level, host, port, metrics_port, health_port, drain_seconds,
         tls_cert, tls_key, tls_client_ca, auth_token_file)  # fmt: skip


@app.command("rrhf")
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
    training_device: Annotated[
        str,
        typer.Option(help="cpu or gpu: what training and candidate jobs ask Ray for, unless a request says"),
    ] = "cpu",
    device_memory_gb: Annotated[
        float | None, typer.Option(help="memory of one training device (GPU) in GiB; default: detected")
    ] = None,
    scorer_dtype: Annotated[
        str, typer.Option(help="auto (float16 on a GPU, float32 on CPU), float32, bfloat16 or float16")
    ] = "auto",
    scorer_idle_seconds: Annotated[
        float, typer.Option(help="close a scorer pool unused this long, giving its GPUs back")
    ] = 600.0,
    drain_seconds: DrainOpt = 30.0,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_client_ca: TlsCaOpt = None,
    auth_token_file: AuthTokenOpt = None,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Serve RRHF scoring/ranking, candidate generation and training jobs on Ray."""
    from services.rrhf.server import RrhfService, RrhfSettings

    def service() -> RrhfService:
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
            train_on_gpu=training_device == "gpu",
            device_memory_gb=device_memory_gb,
            scorer_dtype=scorer_dtype,
            scorer_idle_seconds=scorer_idle_seconds,
        )
        return RrhfService(settings)

    if training_device not in ("cpu", "gpu"):
        fail(f"--training-device must be cpu or gpu, got {training_device}")

    _run(service, log_level, host, port, metrics_port, health_port, drain_seconds,
         tls_cert, tls_key, tls_client_ca, auth_token_file)  # fmt: skip


@app.command("gateway")
def serve_gateway(
    upstream: Annotated[
        list[str],
        typer.Option(help="an inference replica, host:port; repeat for several (env: space-separated)"),
    ],
    port: Annotated[int, typer.Option(help="HTTP port (0 picks a free one)")] = 8000,
    host: HostOpt = "0.0.0.0",
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            help="file holding the API key callers send as 'Authorization: Bearer <key>' "
            "(or $WOMBAT_GATEWAY_API_KEY); none: no key is checked"
        ),
    ] = None,  # fmt: skip
    served_model_name: Annotated[
        str | None, typer.Option(help="the model id callers use (default: the replicas' model name)")
    ] = None,
    balance: Annotated[str, typer.Option(help="least-loaded (GetLoad) or round-robin")] = "least-loaded",
    default_max_tokens: Annotated[
        int, typer.Option(help="max_tokens of a chat request that sets none")
    ] = 512,
    upstream_timeout: Annotated[float, typer.Option(help="seconds one generation may take")] = 600.0,
    poll_seconds: Annotated[float, typer.Option(help="how often each replica's load is read")] = 0.5,
    max_body_bytes: Annotated[
        int, typer.Option(help="largest request body accepted (413 beyond, before it is parsed)")
    ] = 8 * 1024 * 1024,
    drain_seconds: DrainOpt = 30.0,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Serve the OpenAI-compatible HTTP API over inference replicas (TLS and token to them from the
    environment, as every client: $WOMBAT_AUTH_TOKEN, $WOMBAT_TLS_CA_FILE, ...)."""
    from services.gateway.replicas import Balance
    from services.gateway.server import API_KEY_ENV, GatewaySettings, serve
    from services.scaffold.logs import configure_logging

    balances = {b.value: b for b in Balance}
    if balance not in balances:
        fail(f"--balance must be {' or '.join(balances)}, got {balance}")
    configure_logging(log_level)
    # A key file that is there must hold a key: an empty one would be "check nothing", so it refuses to start.
    key = api_key_file.read_text().strip() if api_key_file else os.environ.get(API_KEY_ENV) or None
    settings = core(
        lambda: GatewaySettings(
            upstreams=tuple(upstream),
            host=host,
            port=port,
            api_key=key,
            served_model_name=served_model_name,
            balance=balances[balance],
            default_max_tokens=default_max_tokens,
            drain_seconds=drain_seconds,
            upstream_timeout=upstream_timeout,
            poll_seconds=poll_seconds,
            max_body_bytes=max_body_bytes,
        )
    )
    asyncio.run(serve(settings))


def _run(make_service: Callable, log_level, *server_options) -> None:
    """Configures logging and the scaffold from the shared options, builds the service, and serves it
    through the scaffold's lifecycle until SIGTERM."""
    from services.scaffold import serve
    from services.scaffold.logs import configure_logging

    configure_logging(log_level)
    config = _server_config(*server_options)
    service = core(make_service)
    try:
        asyncio.run(serve(config, service))
    except WombatError as exc:
        fail(exc.message)


def _server_config(
    host, port, metrics_port, health_port, drain_seconds, tls_cert, tls_key, tls_client_ca, auth_token_file
):
    from clients.base import TOKEN_ENV
    from services.scaffold import ServerConfig, TlsConfig

    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together")
    token = auth_token_file.read_text().strip() if auth_token_file else os.environ.get(TOKEN_ENV) or None
    return core(
        lambda: ServerConfig(
            host=host,
            port=port,
            metrics_port=None if metrics_port < 0 else metrics_port,
            health_port=health_port,
            drain_grace_seconds=drain_seconds,
            tls=TlsConfig(tls_cert, tls_key, tls_client_ca) if tls_cert and tls_key else None,
            auth_token=token,
        )
    )


def check_serve_options(spec) -> None:
    """Parses a stack spec's options with the real `wombat serve <service>` command, so a typo in a stack
    config fails before anything starts, naming the option."""
    command = typer.main.get_command(app).commands[spec.name]
    unknown = sorted(set(spec.options) - {p.name for p in command.params})
    if unknown:
        raise InvalidArgument(
            f"[{spec.name}] has unknown option(s) {', '.join(unknown)}; see `wombat serve {spec.name} --help`"
        )
    try:
        command.make_context(spec.name, spec.argv()[2:])
    except Exception as exc:  # noqa: BLE001 - click's usage errors say which option and why
        raise InvalidArgument(f"[{spec.name}]: {getattr(exc, 'message', exc)}") from exc
