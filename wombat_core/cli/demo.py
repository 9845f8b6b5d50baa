"""`make demo`: the delta lifecycle on a real small model, through a materialiser running as its own process.

1. prepare SmolLM2-135M as an HF safetensors directory (the 'base');
2. derive a Wombat-style fine-tune of it (float16, one added [PAD] row) as the 'target';
3. start `wombat serve materializer` as a separate process (like its pod);
4. make the delta target - base through it, with progress;
5. materialise base + delta through it, with progress;
6. verify the manifest and check the result is bit-identical to the target;
7. serve the recovered model with `wombat serve inference` (its own process) and stream an Alpaca answer;
8. start `wombat serve rrhf` (its own process, local Ray), rank candidate answers with the base model,
   RRHF-train a few steps on the shipped preference data, and rank them again with the trained model;
9. print a summary.
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

    render.console.print(f"7/9 serving {model_dir.name} with the inference service (its own process)")
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


TRAINED = "smollm2-135m-rrhf"


def rrhf_round(workdir: Path, models: Path) -> tuple[bool, str]:
    """Ranks one query's candidates with the base, RRHF-trains a few steps through the service, ranks again."""
    import shutil
    from importlib import resources

    from clients.rrhf import RrhfClient
    from wombat.rrhf.v1 import rrhf_pb2 as pb
    from wombat_core.rrhf.data import load_jsonl

    data = (workdir / "data").resolve()
    data.mkdir(parents=True, exist_ok=True)
    shipped = resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl"
    shutil.copyfile(shipped, data / "preferences.jsonl")
    example = load_jsonl(data / "preferences.jsonl")[2]
    render.console.print("8/9 starting the rrhf service (its own process, local Ray cluster)")
    service = ServiceProcess(["rrhf", "--model-root", str(models), "--data-root", str(data), "--port", "0",
                              "--metrics-port", "0", "--state-dir", str(workdir / "jobs")], workdir / "rrhf.log")  # fmt: skip
    try:
        with RrhfClient(f"127.0.0.1:{service.port}", timeout=900) as client:
            before = client.rank(example.query, example.responses, model_path=BASE, alpaca_prompt=True)
            if (models / TRAINED).exists():
                render.console.print(f"    {TRAINED} exists from an earlier run; ranking with it")
                state = "reused"
            else:
                job_id = client.start_training(BASE, TRAINED, data_path="preferences.jsonl", num_workers=2, max_steps=4,
                                               batch_size=1, learning_rate=1e-5, checkpoint_every_steps=2)  # fmt: skip
                render.console.print(f"    training job {job_id}: 2 Ray Train workers, 4 RRHF steps")
                final = None
                for event in client.watch(job_id):
                    if event.HasField("step"):
                        s = event.step
                        render.console.print(f"    step {s.step}/{s.total_steps}  loss {s.loss:.4f}  rank {s.rank_loss:.4f}  "
                                             f"sft {s.sft_loss:.4f}  {s.samples_per_second:.2f} queries/s")  # fmt: skip
                    elif event.HasField("job"):
                        final = event.job
                if final is None or final.state != pb.JOB_STATE_SUCCEEDED:
                    return False, f"training failed: {final.error if final else 'no final state'}"
                state = "trained"
            after = client.rank(example.query, example.responses, model_path=TRAINED, alpaca_prompt=True)
    finally:
        service.stop()
    table = Table(title=f"Ranking for: {example.query}")
    for column in ("reward", "response", "rank before (score)", "rank after (score)"):
        table.add_column(column)
    position_before = {r.index: (n, r.score) for n, r in enumerate(before, start=1)}
    position_after = {r.index: (n, r.score) for n, r in enumerate(after, start=1)}
    for index, response in enumerate(example.responses):
        b, a = position_before[index], position_after[index]
        table.add_row(
            f"{example.scores[index]:+.1f}", response, f"{b[0]} ({b[1]:.3f})", f"{a[0]} ({a[1]:.3f})"
        )
    render.console.print(table)
    return (
        True,
        f"{state}; best-reward answer ranked {position_before[0][0]} before, {position_after[0][0]} after",
    )


def run_demo(workdir: Path) -> int:
    from clients.channel import ChannelSettings
    from clients.materializer import MaterializerClient

    models = (workdir / "models").resolve()
    models.mkdir(parents=True, exist_ok=True)
    timings: list[tuple[str, float, str]] = []

    def stage(name: str, started: float, detail: str) -> None:
        timings.append((name, time.monotonic() - started, detail))

    t = time.monotonic()
    with render.console.status("1/9 preparing SmolLM2-135M (GGUF -> safetensors)"):
        prepare_demo_model(models / BASE)
    stage("prepare base", t, BASE)
    t = time.monotonic()
    if not (models / TARGET).exists():
        with render.console.status("2/9 deriving a Wombat-style fine-tune (+[PAD] row, float16)"):
            derive_finetuned_target(models / BASE, models / TARGET)
    stage("derive target", t, TARGET)

    render.console.print("3/9 starting the materialiser service (its own process)")
    service = ServiceProcess(
        ["materializer", "--model-root", str(models), "--port", "0", "--metrics-port", "0"],
        workdir / "materializer.log",
    )
    try:
        with MaterializerClient(ChannelSettings(f"127.0.0.1:{service.port}")) as client:
            render.console.print(f"    listening on 127.0.0.1:{service.port}")
            t = time.monotonic()
            with render.job_progress("4/9 make delta", as_json=False) as update:
                made = render.drain(client.make_delta(BASE, TARGET, DELTA), update)
            stage("make delta", t, f"inexact elements: {made.inexact_elements}")
            t = time.monotonic()
            with render.job_progress("5/9 materialise", as_json=False) as update:
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
    t = time.monotonic()
    trained_ok, detail = rrhf_round(workdir, models)
    stage("rrhf train + rank", t, detail)

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
    problems = [*differences, *([] if verified.ok else ["manifest verification failed"]),
                *([] if trained_ok else ["RRHF training failed (see rrhf.log)"])]  # fmt: skip
    if problems:
        render.console.print(f"[red]FAILED:[/red] {'; '.join(problems)}")
        return 1
    render.console.print(
        f"[green]OK:[/green] {RECOVERED} is bit-identical to {TARGET}; models under {models}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(Path(os.environ.get("WOMBAT_DEMO_DIR", ".demo"))))
