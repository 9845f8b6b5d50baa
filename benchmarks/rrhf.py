"""RRHF benchmark on the SmolLM2-135M demo model and the shipped preference data, in one run:

1. Score RPC throughput (responses/s, 8 concurrent callers) ÷ an RRHF-style per-sample loop on the same
   model and data (one forward per (query, response), log-softmax over the sequence, as the reference's
   scoring does); a per-query loop (the reference's compute_loss forward, k rows padded) is printed too.
2. Training step time through the service (a Ray Train job, consecutive step ends) ÷ a bare
   compute_loss + backward + optimiser step in this process.
3. Step time of FSDP on 2 Ray Train workers ÷ DDP on 2 workers (CPU, gloo), and samples/s 2 workers ÷ 1.
4. The memory planner's estimate ÷ the measured peak RSS of 2 gloo workers training a 25M-parameter
   LLaMA (FSDP and DDP).

  python benchmarks/rrhf.py [--model .demo/models/smollm2-135m] [--steps 10] [--turns 3]
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
    config = TrainingConfig(batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-5)
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
    from wombat_core.rrhf.training import TrainingConfig, build_optimizer, load_for_training, plan, train_step

    model, tokenizer = load_for_training(model_dir)  # as a training worker starts
    config = TrainingConfig(batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-5)
    optimizer = build_optimizer(model, config)
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


def training_job(address: str, workers: int, steps: int, output: str, strategy: int) -> str:
    """Runs a job (one query per worker per step) to the end and returns its id."""
    from clients.rrhf import RrhfClient

    with RrhfClient(address, timeout=1800) as client:
        job_id = client.start_training("policy", output, data_path="preferences.jsonl", num_workers=workers,
                                       max_steps=steps, batch_size=1, gradient_accumulation_steps=1,
                                       learning_rate=1e-5, checkpoint_every_steps=steps,
                                       strategy=strategy)  # fmt: skip
        events = list(client.watch(job_id))
    final = [e.job for e in events if e.HasField("job")][-1]
    if final.state != 3:
        raise RuntimeError(f"training job failed: {final.error}")
    return job_id


def step_seconds(events_file: Path) -> tuple[float, float]:
    """(median time between consecutive step ends, median time inside train_step itself), warm-up skipped,
    from the job's event log."""
    import json

    steps = [e for e in map(json.loads, events_file.read_text().splitlines()) if e["kind"] == "step"]
    gaps = [b["finished_at"] - a["finished_at"] for a, b in zip(steps[1:], steps[2:], strict=False)]
    inside = [e["world_size"] / e["samples_per_second"] for e in steps[1:]]
    return statistics.median(gaps), statistics.median(inside)


def planner_ratios() -> dict[str, list[float]]:
    """Planner estimate ÷ measured peak RSS of each of 2 gloo workers (FSDP, DDP) on a 25M-parameter LLaMA."""
    from tests.distributed import train_and_measure
    from tests.engine_fixtures import save_servable_tiny_model
    from wombat_core.rrhf.collate import collate_record
    from wombat_core.rrhf.data import load_jsonl
    from wombat_core.rrhf.memory_plan import GIB, ModelShape, estimate
    from wombat_core.rrhf.trainer import TrainingRun
    from wombat_core.rrhf.training import TrainingConfig
    from wombat_core.tokenizer import load_tokenizer

    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = save_servable_tiny_model(Path(tmp) / "model", hidden_size=512, intermediate_size=1536,
                                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
        records = tuple(load_jsonl(resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl"))
        tokenizer = load_tokenizer(model, padding_side="right")
        shapes = [collate_record(tokenizer, r, TrainingConfig().collation).input_ids.shape for r in records]
        for strategy in ("fsdp", "ddp"):
            config = TrainingConfig(num_workers=2, gradient_accumulation_steps=1, max_steps=2, strategy=strategy,
                                    precision="fp32")  # fmt: skip
            plan = estimate(ModelShape.from_directory(model), config, use_gpu=False,
                            responses_per_query=max(s[0] for s in shapes), device_memory_bytes=64 * GIB,
                            sequence_length=max(s[1] for s in shapes))  # fmt: skip
            run = TrainingRun(
                model, records, config, Path(tmp) / strategy / "ckpt", Path(tmp) / strategy / "out", "o"
            )
            _, peaks = train_and_measure(run, 2)
            ratios[strategy] = [plan.per_device_bytes / peak for peak in peaks]
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=ROOT / ".demo" / "models" / "smollm2-135m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--turns", type=int, default=3, help="1-worker job / bare step alternations")
    args = parser.parse_args()
    from wombat_core.demo_model import prepare_demo_model
    from wombat_core.host_memory import keep_freed_memory
    from wombat_core.rrhf.data import load_jsonl

    if not args.model.exists():
        prepare_demo_model(args.model)
    shipped = resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl"
    records = load_jsonl(shipped)
    # The baselines run with the malloc settings the service starts its CPU training workers with
    # (host_memory.py), so the service-step ratio compares the same computation, not glibc's defaults.
    keep_freed_memory()

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
            from wombat.rrhf.v1 import rrhf_pb2 as pb

            runs = {}
            # The machine's speed drifts within minutes: the 1-worker job and the bare step alternate,
            # each ratio is taken against the bare step timed next to it, and the verdict is their median.
            service_over_bare = []
            for turn in range(args.turns):
                job_id = training_job(address, 1, args.steps, f"trained-1-{turn}", pb.STRATEGY_FSDP)
                runs["1"] = step_seconds(base / "jobs" / f"{job_id}.events.jsonl")
                service_over_bare.append(runs["1"][0] / bare_step_seconds(args.model, records, args.steps))
            for name, workers, strategy in (("2", 2, pb.STRATEGY_FSDP), ("ddp2", 2, pb.STRATEGY_DDP)):
                job_id = training_job(address, workers, args.steps, f"trained-{name}", strategy)
                runs[name] = step_seconds(base / "jobs" / f"{job_id}.events.jsonl")
        finally:
            service.stop()
    planner = planner_ratios()

    print(f"\nSmolLM2-135M, float32 on CPU, shipped data ({len(records)} queries x 4 responses)")
    print(f"per-sample loop (one forward per response)      {bare['per_sample']:8.1f} responses/s")
    print(f"per-query loop (reference compute_loss forward) {bare['per_query']:8.1f} responses/s")
    print(f"Score RPC, 8 concurrent callers                 {scored:8.1f} responses/s")
    print(f"bare compute_loss + optimiser step              {bare['step']:8.2f} s/step")
    for name, label in (("1", "1 worker"), ("2", "2 workers, FSDP"), ("ddp2", "2 workers, DDP")):
        print(f"training step through the service, {label:16} {runs[name][0]:6.2f} s/step "
              f"({runs[name][1]:.2f} s of it inside the worker's train_step)")  # fmt: skip
    print("\nratio                                                   value   goal")
    print(
        f"Score RPC / per-sample loop                             {scored / bare['per_sample']:5.2f}   >= 3"
    )
    print(f"  (Score RPC / per-query loop: {scored / bare['per_query']:.2f})")
    print(f"service step time / bare step time (1 worker), median   {statistics.median(service_over_bare):5.2f}"
          f"   <= 1.15   (turns: {' '.join(f'{r:.2f}' for r in service_over_bare)})")  # fmt: skip
    print(
        f"FSDP step time / DDP step time (2 workers, CPU)         {runs['2'][0] / runs['ddp2'][0]:5.2f}   report"
    )
    print(f"samples/s with 2 workers / 1 worker (FSDP)              {2 * runs['1'][0] / runs['2'][0]:5.2f}")
    for strategy, ratios in planner.items():
        print(f"planner estimate / measured peak RSS, {strategy}, 2 workers  "
              f"{' '.join(f'{r:.2f}' for r in ratios)}   0.75-1.25")  # fmt: skip


if __name__ == "__main__":
    main()
