"""`make demo`: the delta lifecycle on a real small model, through a materialiser running as its own process.

1. prepare SmolLM2-135M as an HF safetensors directory (the 'base');
2. derive a Wombat-style fine-tune of it (float16, one added [PAD] row) as the 'target';
3. start `wombat serve materializer` as a separate process (like its pod);
4. make the delta target - base through it, with progress;
5. materialise base + delta through it, with progress;
6. verify the manifest and check the result is bit-identical to the target;
7. serve the recovered model with `wombat serve inference` (its own process) and stream an Alpaca answer;
8. print a summary.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.table import Table

from wombat_core.checkpoint.compare import checkpoint_differences
from wombat_core.cli import render
from wombat_core.demo_model import derive_finetuned_target, prepare_demo_model
from wombat_core.manifest import read_manifest

BASE, TARGET, DELTA, RECOVERED = (
    "smollm2-135m",
    "smollm2-135m-wombat-style",
    "smollm2-135m-delta",
    "smollm2-135m-recovered",
)
READY_PATTERN = re.compile(r"WOMBAT_READY port=(\d+)")


class ServiceProcess:
    """A `wombat serve ...` child process, stopped with SIGTERM (graceful drain) on exit."""

    def __init__(self, args: list[str], log_path: Path):
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wombat_core.cli.main", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.port = self._wait_ready(log_path)

    def _wait_ready(self, log_path: Path, timeout: float = 120.0) -> int:
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"service exited with code {self.process.returncode}; see {log_path}")
            match = READY_PATTERN.search(line or "")
            if match:
                return int(match.group(1))
        raise RuntimeError(f"service not ready after {timeout:.0f}s; see {log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


DEMO_INSTRUCTION = "Give three tips for staying healthy."


def stream_answer(model_dir: Path, log_path: Path):
    """Starts the inference service on `model_dir` and streams an Alpaca-prompted answer to the terminal."""
    from clients.inference import InferenceClient, prompt, sampling

    render.console.print(f"7/8 serving {model_dir.name} with the inference service (its own process)")
    service = ServiceProcess(
        ["inference", "--model", str(model_dir), "--port", "0", "--metrics-port", "0"], log_path
    )
    try:
        with InferenceClient(f"127.0.0.1:{service.port}", timeout=300) as client:
            render.console.print(
                f"[bold]### Instruction:[/bold] {DEMO_INSTRUCTION}\n[bold]### Response:[/bold]"
            )
            final = None
            for response in client.generate(
                prompt(DEMO_INSTRUCTION), sampling(temperature=0, max_new_tokens=96)
            ):
                sys.stderr.write(response.text)
                sys.stderr.flush()
                final = response
            sys.stderr.write("\n")
            return final
    finally:
        service.stop()


def run_demo(workdir: Path) -> int:
    from clients.channel import ChannelSettings
    from clients.materializer import MaterializerClient

    models = (workdir / "models").resolve()
    models.mkdir(parents=True, exist_ok=True)
    timings: list[tuple[str, float, str]] = []

    def stage(name: str, started: float, detail: str) -> None:
        timings.append((name, time.monotonic() - started, detail))

    t = time.monotonic()
    with render.console.status("1/8 preparing SmolLM2-135M (GGUF -> safetensors)"):
        prepare_demo_model(models / BASE)
    stage("prepare base", t, BASE)
    t = time.monotonic()
    if not (models / TARGET).exists():
        with render.console.status("2/8 deriving a Wombat-style fine-tune (+[PAD] row, float16)"):
            derive_finetuned_target(models / BASE, models / TARGET)
    stage("derive target", t, TARGET)

    render.console.print("3/8 starting the materialiser service (its own process)")
    service = ServiceProcess(
        ["materializer", "--model-root", str(models), "--port", "0", "--metrics-port", "0"],
        workdir / "materializer.log",
    )
    try:
        with MaterializerClient(ChannelSettings(f"127.0.0.1:{service.port}")) as client:
            render.console.print(f"    listening on 127.0.0.1:{service.port}")
            t = time.monotonic()
            with render.job_progress("4/8 make delta", as_json=False) as update:
                made = render.drain(client.make_delta(BASE, TARGET, DELTA), update)
            stage("make delta", t, f"inexact elements: {made.inexact_elements}")
            t = time.monotonic()
            with render.job_progress("5/8 materialise", as_json=False) as update:
                result = render.drain(client.materialize(BASE, DELTA, RECOVERED), update)
            stage("materialise", t, "already materialised" if result.already_materialized else "written")
            t = time.monotonic()
            verified = client.verify(RECOVERED)
        differences = checkpoint_differences(models / TARGET, models / RECOVERED)
        stage("verify", t, f"manifest ok={verified.ok}, bit-identical={not differences}")
    finally:
        service.stop()

    t = time.monotonic()
    answer = stream_answer(models / RECOVERED, workdir / "inference.log")
    stage("serve + generate", t, f"{answer.usage.completion_tokens} tokens, first after "
          f"{answer.timings.time_to_first_token_seconds * 1000:.0f} ms")  # fmt: skip

    table = Table(title="Wombat delta lifecycle on SmolLM2-135M")
    for column in ("stage", "seconds", "detail"):
        table.add_column(column)
    for name, seconds, detail in timings:
        table.add_row(name, f"{seconds:.1f}", detail)
    manifest = read_manifest(models / RECOVERED)
    assert manifest is not None
    for f in manifest.files:
        if f.path.endswith(".safetensors"):
            table.add_row("checksum", "", f"{f.path} sha256 {f.sha256[:16]}… ({f.size_bytes / 1e6:.0f} MB)")
    render.console.print(table)
    if differences or not verified.ok:
        render.console.print(f"[red]FAILED:[/red] {differences or 'manifest verification failed'}")
        return 1
    render.console.print(
        f"[green]OK:[/green] {RECOVERED} is bit-identical to {TARGET}; models under {models}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(Path(os.environ.get("WOMBAT_DEMO_DIR", ".demo"))))
