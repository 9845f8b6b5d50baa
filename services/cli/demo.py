"""`make demo`: the whole Wombat lifecycle on SmolLM2-135M, through the four services as separate
processes (a `LocalStack`, as `wombat up` runs them):

1. prepare SmolLM2-135M (GGUF -> HF safetensors): the base;
2. RRHF-train it a few steps through the rrhf service on a local Ray cluster (2 Ray Train workers);
3. make the delta trained - base through the materialiser, in float16 as the published Wombat deltas;
4. materialise base + delta through the materialiser;
5. verify the manifest, and that the result equals the trained model in float16, value for value
   (-0.0 comes back as +0.0: base + delta cannot reproduce a zero's sign);
6. serve the result with the inference service and stream an Alpaca-prompted answer over gRPC, then the
   same question through the OpenAI-compatible gateway with the official openai SDK (the same answer);
7. rank candidate answers through the rrhf service, with the base and with the recovered model;
8. print a summary table with timings and checksums.

Every service stops (draining) when the demo ends, fails, or is interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from services.cli import render
from services.stack import LocalStack, ServiceSpec

app = typer.Typer()

BASE, TRAINED, DELTA, RECOVERED = (
    "smollm2-135m",
    "smollm2-135m-rrhf",
    "smollm2-135m-rrhf-delta",
    "smollm2-135m-rrhf-recovered",
)
DEMO_INSTRUCTION = "Give three tips for staying healthy."
RELEASE_DTYPE = "float16"  # Wombat's deltas and recovered weights are float16
STAGES = 8


@dataclass
class LifecycleResult:
    stages: list[tuple[str, float, str]] = field(default_factory=list)
    trained_digest: str = ""  # the trained model's tensors in float16
    recovered_digest: str = ""
    differences: list[str] = field(default_factory=list)
    manifest_ok: bool = False
    answer: str = ""
    gateway_answer: str = ""  # the same greedy question through the gateway, with the openai SDK
    ranking: Table | None = None

    @property
    def ok(self) -> bool:
        return (
            self.manifest_ok
            and not self.differences
            and self.trained_digest == self.recovered_digest
            and bool(self.answer.strip())
            and self.gateway_answer == self.answer
        )


def _say(step: int, text: str) -> None:
    render.console.print(f"[bold]{step}/{STAGES}[/bold] {text}")


def stack_specs(workdir: Path, models: Path, data: Path) -> dict[str, ServiceSpec]:
    """The demo's services on free ports; the inference model is the one the lifecycle recovers."""
    common = {"port": 0, "metrics_port": 0, "drain_seconds": 10}
    return {
        "materializer": ServiceSpec("materializer", {"model_root": str(models), **common}),
        "rrhf": ServiceSpec(
            "rrhf",
            {"model_root": str(models), "data_root": str(data), "state_dir": str(workdir / "jobs"), **common},
        ),  # fmt: skip
        "inference": ServiceSpec(
            "inference", {"model": str(models / RECOVERED), "max_batch_size": 4, **common}
        ),
    }


def run_lifecycle(workdir: Path, *, base_dir: Path | None = None, train_steps: int = 4, workers: int = 2,
                  max_new_tokens: int = 96) -> LifecycleResult:  # fmt: skip
    """Runs the stages; `base_dir` skips preparing SmolLM2 (tests pass an already-converted one)."""
    from clients.inference import InferenceClient, prompt, sampling
    from clients.materializer import MaterializerClient, delta_options
    from clients.rrhf import RrhfClient
    from wombat_core.checkpoint.compare import checkpoint_differences, tensors_digest
    from wombat_core.demo_model import prepare_demo_model
    from wombat_core.dtypes import dtype_from_name
    from wombat_core.rrhf.data import load_jsonl

    workdir = workdir.resolve()
    models, data = workdir / "models", workdir / "data"
    models.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(
        resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl", data / "preferences.jsonl"
    )
    result = LifecycleResult()
    clock = [time.monotonic()]

    def done(name: str, detail: str) -> None:
        now = time.monotonic()
        result.stages.append((name, now - clock[0], detail))
        clock[0] = now

    with render.console.status(f"1/{STAGES} preparing SmolLM2-135M (GGUF -> safetensors)"):
        if base_dir is None:
            prepare_demo_model(models / BASE)
        elif not (models / BASE).exists():
            shutil.copytree(base_dir, models / BASE)
    done("prepare base", BASE)

    with LocalStack(stack_specs(workdir, models, data), workdir) as stack:
        render.console.print("    starting the materialiser and rrhf services (own processes, local Ray)")
        stack.start(["materializer", "rrhf"])
        done("start services", ", ".join(f"{n} {p.address}" for n, p in stack.processes.items()))
        release = delta_options(RELEASE_DTYPE, pad_vocab=True)
        with RrhfClient(stack.address("rrhf"), timeout=1800) as rrhf:
            _say(
                2,
                f"RRHF-training {BASE} through the rrhf service ({workers} Ray Train workers, {train_steps} steps)",
            )
            _train(rrhf, models, train_steps, workers)
            done("rrhf train", f"{TRAINED}, {train_steps} steps on {workers} workers")

            with MaterializerClient(stack.address("materializer")) as materializer:
                with render.job_progress(f"3/{STAGES} make delta (float16)", as_json=False) as update:
                    made = render.drain(materializer.make_delta(BASE, TRAINED, DELTA, release), update)
                done("make delta", f"{DELTA}; elements that do not round-trip: {made.inexact_elements}")
                with render.job_progress(f"4/{STAGES} materialise base + delta", as_json=False) as update:
                    recovered = render.drain(
                        materializer.materialize(BASE, DELTA, RECOVERED, release), update
                    )
                done("materialise", "already materialised" if recovered.already_materialized else "written")
                _say(5, "verifying the manifest and comparing with the trained model")
                result.manifest_ok = materializer.verify(RECOVERED).ok
            result.differences = checkpoint_differences(
                models / TRAINED, models / RECOVERED, a_as=dtype_from_name(RELEASE_DTYPE), signed_zeros=False
            )
            result.trained_digest = tensors_digest(models / TRAINED, as_dtype=dtype_from_name(RELEASE_DTYPE))
            result.recovered_digest = tensors_digest(models / RECOVERED)
            same = result.trained_digest == result.recovered_digest
            done("verify", f"manifest ok={result.manifest_ok}; equals trained (float16): {same}")

            _say(6, f"serving {RECOVERED} with the inference service (its own process)")
            stack.start(["inference"])
            with InferenceClient(stack.address("inference"), timeout=600) as inference:
                render.console.print(
                    f"[bold]### Instruction:[/bold] {DEMO_INSTRUCTION}\n[bold]### Response:[/bold]"
                )
                pieces, final = [], None
                for response in inference.generate(
                    prompt(DEMO_INSTRUCTION), sampling(temperature=0, max_new_tokens=max_new_tokens)
                ):
                    render.console.print(response.text, end="", highlight=False, markup=False)
                    pieces.append(response.text)
                    final = response
                render.console.print()
            result.answer = "".join(pieces)
            done("serve + stream", f"{final.usage.completion_tokens} tokens, first after "
                 f"{final.timings.time_to_first_token_seconds * 1000:.0f} ms")  # fmt: skip

            render.console.print(
                "    the same question through the OpenAI-compatible gateway (openai SDK, streaming)"
            )
            stack.specs["gateway"] = ServiceSpec(
                "gateway", {"upstream": [stack.address("inference")], "port": 0, "drain_seconds": 10}
            )
            stack.start(["gateway"])
            result.gateway_answer = _stream_through_gateway(stack.address("gateway"), max_new_tokens)
            same = result.gateway_answer == result.answer
            done(
                "openai sdk via gateway", f"http://{stack.address('gateway')}/v1; same answer as gRPC: {same}"
            )

            _say(7, "ranking candidate answers through the rrhf service")
            example = load_jsonl(data / "preferences.jsonl")[2]
            before = rrhf.rank(example.query, example.responses, model_path=BASE, alpaca_prompt=True)
            after = rrhf.rank(example.query, example.responses, model_path=RECOVERED, alpaca_prompt=True)
            result.ranking = _ranking_table(example, before, after)
            best = {r.index: n for n, r in enumerate(after, start=1)}[0]
            done("rank", f"best-reward answer ranked {best} of {len(after)} by the recovered model")
    return result


def _stream_through_gateway(address: str, max_tokens: int) -> str:
    """One streaming chat completion with the official openai SDK, as any OpenAI client would send it."""
    try:
        import openai
    except ImportError:
        raise SystemExit(
            "the demo streams through the gateway with the openai SDK: pip install openai"
        ) from None

    client = openai.OpenAI(base_url=f"http://{address}/v1", api_key="unused-locally")
    model = client.models.list().data[0].id
    render.console.print(f"[bold]openai> [/bold]chat.completions.create(model={model!r}, stream=True)")
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": DEMO_INSTRUCTION}], max_tokens=max_tokens,
        temperature=0, stream=True,
    )  # fmt: skip
    pieces = []
    for chunk in stream:
        text = chunk.choices[0].delta.content if chunk.choices else None
        if text:
            render.console.print(text, end="", highlight=False, markup=False)
            pieces.append(text)
    render.console.print()
    return "".join(pieces)


def _train(rrhf, models: Path, steps: int, workers: int) -> None:
    from wombat.rrhf.v1 import rrhf_pb2 as pb

    if (models / TRAINED).exists():
        render.console.print(f"    {TRAINED} exists from an earlier run; using it")
        return
    job_id = rrhf.start_training(BASE, TRAINED, data_path="preferences.jsonl", num_workers=workers,
                                 max_steps=steps, batch_size=1, learning_rate=1e-5,
                                 checkpoint_every_steps=max(1, steps // 2))  # fmt: skip
    render.console.print(f"    job {job_id}")
    final = None
    for event in rrhf.watch(job_id):
        if event.HasField("step"):
            s = event.step
            render.console.print(f"    step {s.step}/{s.total_steps}  loss {s.loss:.4f}  rank {s.rank_loss:.4f}  "
                                 f"sft {s.sft_loss:.4f}  {s.samples_per_second:.2f} queries/s")  # fmt: skip
        elif event.HasField("job"):
            final = event.job
    if final is None or final.state != pb.JOB_STATE_SUCCEEDED:
        raise RuntimeError(
            f"training failed: {final.error if final else 'no final state'}; see jobs/ and logs/"
        )


def _ranking_table(example, before, after) -> Table:
    table = Table(title=f"Ranking for: {example.query}")
    for column in ("reward", "response", "base: rank (score)", "recovered: rank (score)"):
        table.add_column(column)
    position_before = {r.index: (n, r.score) for n, r in enumerate(before, start=1)}
    position_after = {r.index: (n, r.score) for n, r in enumerate(after, start=1)}
    for index, response in enumerate(example.responses):
        b, a = position_before[index], position_after[index]
        table.add_row(
            f"{example.scores[index]:+.1f}", response, f"{b[0]} ({b[1]:.3f})", f"{a[0]} ({a[1]:.3f})"
        )
    return table


def _summary(result: LifecycleResult, models: Path) -> Table:
    from wombat_core.manifest import read_manifest

    table = Table(title="Wombat lifecycle on SmolLM2-135M")
    for column in ("stage", "seconds", "detail"):
        table.add_column(column)
    for name, seconds, detail in result.stages:
        table.add_row(name, f"{seconds:.1f}", detail)
    table.add_row("checksum", "", f"trained (float16 tensors)  sha256 {result.trained_digest[:24]}…")
    table.add_row("checksum", "", f"recovered (tensors)        sha256 {result.recovered_digest[:24]}…")
    manifest = read_manifest(models / RECOVERED)
    for f in manifest.files if manifest else []:
        if f.path.endswith(".safetensors"):
            table.add_row(
                "checksum", "", f"{RECOVERED}/{f.path} sha256 {f.sha256[:16]}… ({f.size_bytes / 1e6:.0f} MB)"
            )
    return table


def run_demo(workdir: Path) -> int:
    def terminate(signum, frame):
        raise KeyboardInterrupt  # SIGTERM stops the services like Ctrl-C does

    signal.signal(signal.SIGTERM, terminate)
    try:
        result = run_lifecycle(workdir)
    except KeyboardInterrupt:
        render.console.print("[yellow]interrupted:[/yellow] every service was stopped")
        return 130
    except Exception as exc:  # noqa: BLE001 - the services are stopped; say what failed and where to look
        render.console.print(f"[red]FAILED:[/red] {exc}\nservice logs: {workdir.resolve() / 'logs'}")
        return 1
    if result.ranking is not None:
        render.console.print(result.ranking)
    render.console.print(_summary(result, workdir.resolve() / "models"))
    if not result.ok:
        problems = [*result.differences, *([] if result.manifest_ok else ["manifest verification failed"])]
        if result.trained_digest != result.recovered_digest:
            problems.append("recovered tensors differ from the trained model's")
        if not result.answer.strip():
            problems.append("the streamed answer was empty")
        if result.gateway_answer != result.answer:
            problems.append("the answer through the gateway differs from the gRPC answer")
        render.console.print(f"[red]FAILED:[/red] {'; '.join(problems)}")
        return 1
    render.console.print(f"[green]OK:[/green] {RECOVERED} equals {TRAINED} in float16, value for value; "
                         f"models under {workdir.resolve() / 'models'}")  # fmt: skip
    return 0


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where demo models, job state and logs go")] = Path(".demo"),
) -> None:
    """The whole Wombat lifecycle on SmolLM2-135M through the three services as separate processes:
    RRHF-train, make the delta, materialise, verify, serve and stream, rank."""
    sys.exit(run_demo(workdir))
