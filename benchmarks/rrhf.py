"""RRHF benchmark on the SmolLM2-135M demo model and the shipped preference data, in one run:

1. Score RPC throughput (responses/s, 8 concurrent callers) ÷ an RRHF-style per-sample loop on the same
   model and data (one forward per (query, response), log-softmax over the sequence, as the reference's
   scoring does); a per-query loop (the reference's compute_loss forward, k rows padded) is printed too.
2. Training step time through the service (a Ray Train job, consecutive step ends) ÷ a bare
   compute_loss + backward + optimiser step in this process.
3. Samples/s with 2 Ray Train workers vs 1.

  python benchmarks/rrhf.py [--model .demo/models/smollm2-135m] [--steps 6]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bare_baselines(model_dir: Path, records, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from wombat_core.rrhf.collate import CollationConfig, collate_group
    from wombat_core.rrhf.loss import compute_loss
    from wombat_core.rrhf.training import TrainingConfig
    from wombat_core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir, padding_side="right")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    config = TrainingConfig(batch_size=1, learning_rate=1e-5)
    with torch.inference_mode():
        started, count = time.perf_counter(), 0
        for record in records:
            for response, reward in zip(record.responses, record.scores, strict=True):
                group = collate_group(tokenizer, record.query, (response,), (reward,), CollationConfig())
                compute_loss(model, group, config.loss)
                count += 1
        per_sample = count / (time.perf_counter() - started)
        started = time.perf_counter()
        for record in records:
            compute_loss(
                model,
                collate_group(tokenizer, record.query, record.responses, record.scores, CollationConfig()),
                config.loss,
            )
        per_query = count / (time.perf_counter() - started)
    return {
        "per_sample": per_sample,
        "per_query": per_query,
        "step": bare_step_seconds(model_dir, records, steps),
    }


def bare_step_seconds(model_dir: Path, records, steps: int) -> float:
    """Median time of a bare compute_loss + backward + AdamW step, the first (warm-up) step excluded."""
    import torch

    from wombat_core.rrhf.training import TrainingConfig, load_for_training, plan, train_step

    model, tokenizer = load_for_training(model_dir)  # as the Ray Train worker starts
    config = TrainingConfig(batch_size=1, learning_rate=1e-5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    total = plan(config, len(records)).total_steps
    durations = []
    for step in range(steps):
        started = time.perf_counter()
        train_step(model, optimizer, tokenizer, records, config, step, total)
        durations.append(time.perf_counter() - started)
    return statistics.median(durations[1:])


def score_throughput(address: str, records, callers: int = 8) -> float:
    from clients.rrhf import RrhfClient

    with RrhfClient(address, timeout=600) as warm:
        warm.score(records[0].query, records[0].responses, model_path="policy")
    work = list(records)
    lock = threading.Lock()

    def caller() -> None:
        with RrhfClient(address, timeout=600) as client:
            while True:
                with lock:
                    if not work:
                        return
                    record = work.pop()
                client.score(record.query, record.responses, model_path="policy")

    started = time.perf_counter()
    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(len(r.responses) for r in records) / (time.perf_counter() - started)


def training_job(address: str, workers: int, steps: int, output: str) -> dict:
    from clients.rrhf import RrhfClient

    with RrhfClient(address, timeout=1800) as client:
        job_id = client.start_training("policy", output, data_path="preferences.jsonl", num_workers=workers,
                                       max_steps=steps, batch_size=1, learning_rate=1e-5,
                                       checkpoint_every_steps=steps)  # fmt: skip
        events = list(client.watch(job_id))
    final = [e.job for e in events if e.HasField("job")][-1]
    if final.state != 3:
        raise RuntimeError(f"training job failed: {final.error}")
    return {"steps": [e.step for e in events if e.HasField("step")]}


def step_seconds(store_events: list[dict]) -> tuple[float, float]:
    """(median time between consecutive step ends, median time inside train_step itself), warm-up skipped."""
    steps = [e for e in store_events if e.get("kind") == "step"]
    gaps = [b["finished_at"] - a["finished_at"] for a, b in zip(steps[1:], steps[2:], strict=False)]
    inside = [e["world_size"] / e["samples_per_second"] / e["world_size"] for e in steps[1:]]
    return statistics.median(gaps), statistics.median(inside)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=ROOT / ".demo" / "models" / "smollm2-135m")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    from wombat_core.demo_model import prepare_demo_model
    from wombat_core.rrhf.data import load_jsonl

    if not args.model.exists():
        prepare_demo_model(args.model)
    shipped = resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl"
    records = load_jsonl(shipped)

    bare = bare_baselines(args.model, records, args.steps)

    from services.stack import ServiceProcess

    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        base = Path(tmp)
        models = base / "models"
        models.mkdir()
        (base / "data").mkdir()
        shutil.copytree(
            args.model, models / "policy"
        )  # a symlink would (rightly) be refused as leaving the root
        shutil.copyfile(shipped, base / "data" / "preferences.jsonl")
        service = ServiceProcess(["rrhf", "--model-root", str(models), "--data-root", str(base / "data"),
                                  "--port", "0", "--metrics-port", "-1", "--state-dir", str(base / "jobs")],
                                 base / "rrhf.log")  # fmt: skip
        try:
            address = f"127.0.0.1:{service.port}"
            scored = score_throughput(address, records)
            import json

            runs = {}
            for workers in (1, 2):
                training_job(address, workers, args.steps, f"trained-{workers}")
                job_file = sorted((base / "jobs").glob("*.json"), key=lambda p: p.stat().st_mtime)[-1]
                events = json.loads(job_file.read_text())["events"]
                runs[workers] = step_seconds(events)
        finally:
            service.stop()
    # The machine's speed drifts: time the bare step again after the service runs and keep the faster.
    bare["step"] = min(bare["step"], bare_step_seconds(args.model, records, args.steps))

    print(f"\nSmolLM2-135M, float32 on CPU, shipped data ({len(records)} queries x 4 responses)")
    print(f"per-sample loop (one forward per response)      {bare['per_sample']:8.1f} responses/s")
    print(f"per-query loop (reference compute_loss forward) {bare['per_query']:8.1f} responses/s")
    print(f"Score RPC, 8 concurrent callers                 {scored:8.1f} responses/s")
    print(f"bare compute_loss + optimiser step              {bare['step']:8.2f} s/step")
    print(
        f"training step through the service, 1 worker     {runs[1][0]:8.2f} s/step "
        f"({runs[1][1]:.2f} s of it inside the worker's train_step)"
    )
    print(f"training step through the service, 2 workers    {runs[2][0]:8.2f} s/step "
          f"({runs[2][1]:.2f} s inside train_step)")  # fmt: skip
    print("\nratio                                                   value   goal")
    print(
        f"Score RPC / per-sample loop                             {scored / bare['per_sample']:5.2f}   >= 3"
    )
    print(f"  (Score RPC / per-query loop: {scored / bare['per_query']:.2f})")
    print(
        f"service step time / bare step time (1 worker)           {runs[1][0] / bare['step']:5.2f}   <= 1.15"
    )
    print(f"samples/s with 2 workers / 1 worker                     {2 * runs[1][0] / runs[2][0]:5.2f}")


if __name__ == "__main__":
    main()
