"""The RRHF GPU check (issue 19), for one GPU, in about 2 minutes: a ~0.7B LLaMA-shaped model (random weights,
the tests' SentencePiece tokenizer, made on the machine) trained for a few steps exactly as a GPU worker
trains: FSDP2 over a one-GPU NCCL mesh, bf16 compute over fp32 master shards, gradient checkpointing, a
sharded DCP checkpoint, a resume from it, and the gathered HF output. It prints the measured peak GPU
memory against the memory plan's estimate for the same configuration.

  python3 benchmarks/gpu_check_rrhf.py [--steps 4] [--workdir /tmp/gpu-rrhf]

Multi-GPU FSDP (sharding across devices, NCCL reduce-scatter between them) needs more than one GPU and is
not covered here; on CPU the same code path runs on 2 gloo workers in `make test`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gpu-rrhf"))
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from tests.engine_fixtures import save_servable_tiny_model
    from wombat_core.rrhf.collate import collate_record
    from wombat_core.rrhf.data import load_jsonl
    from wombat_core.rrhf.events import Resumed, StepFinished
    from wombat_core.rrhf.memory_plan import ModelShape, estimate, gib
    from wombat_core.rrhf.trainer import TrainingHooks, TrainingRun, run_training
    from wombat_core.rrhf.training import TrainingConfig
    from wombat_core.tokenizer import load_tokenizer

    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    print("gpu:", torch.cuda.get_device_name(), gib(torch.cuda.get_device_properties(0).total_memory))
    shutil.rmtree(args.workdir, ignore_errors=True)
    model_dir = save_servable_tiny_model(args.workdir / "model", context=1024, hidden_size=2048, intermediate_size=5632,
                                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)  # fmt: skip
    records = tuple(load_jsonl(resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl"))
    config = TrainingConfig(num_workers=1, precision="bf16", gradient_checkpointing=True, gradient_accumulation_steps=2,
                            max_steps=args.steps, checkpoint_every_steps=2, learning_rate=1e-5)  # fmt: skip
    run = TrainingRun(
        model_dir, records, config, args.workdir / "checkpoints", args.workdir / "trained", "trained"
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    events: list = []
    stop_after = args.steps // 2

    def cancelled() -> bool:  # interrupt after the first checkpoint, to resume from it below
        return any(isinstance(e, StepFinished) and e.step >= stop_after for e in events)

    phases: list[tuple[str, float]] = []  # (what ended, peak allocated since the previous event)

    def measured(sink):  # the peak between two events, so the table says where the peak is
        def emit(event) -> None:
            phases.append((type(event).__name__ + (f" {event.step}" if hasattr(event, "step") else ""),
                           torch.cuda.max_memory_allocated()))  # fmt: skip
            torch.cuda.reset_peak_memory_stats()
            sink(event)

        return emit

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run_training(
        run, torch.device("cuda", 0), TrainingHooks(emit=measured(events.append), cancelled=cancelled)
    )
    first = time.perf_counter() - started
    first_phases, phases = phases, []
    peak_allocated = max(size for _, size in first_phases)
    peak = torch.cuda.max_memory_reserved()
    # The resumed run in the same process: what the first left behind is freed before it is measured.
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    resumed_events: list = []
    run_training(run, torch.device("cuda", 0), TrainingHooks(emit=measured(resumed_events.append)))
    dist.destroy_process_group()
    resumed_peak = max(size for _, size in phases)
    print("peak GPU memory allocated between events (first run | resumed run):")
    for name, size in first_phases + [("--- resumed", 0)] + phases:
        print(f"  {name:32} {gib(size):>10}")

    tokenizer = load_tokenizer(model_dir, padding_side="right")
    shapes = [collate_record(tokenizer, r, config.collation).input_ids.shape for r in records]
    plan = estimate(ModelShape.from_directory(model_dir), config, use_gpu=True, responses_per_query=max(s[0] for s in shapes),
                    device_memory_bytes=torch.cuda.get_device_properties(0).total_memory,
                    sequence_length=max(s[1] for s in shapes))  # fmt: skip
    steps = [e for e in events + resumed_events if isinstance(e, StepFinished)]
    for step in steps:
        print(f"step {step.step}: loss {step.loss:.4f} grad-norm {step.grad_norm:.3f} "
              f"{step.samples_per_second:.1f} queries/s")  # fmt: skip
    (resume,) = [e for e in resumed_events if isinstance(e, Resumed)]
    print(f"interrupted at step {stop_after} after {first:.0f} s; resumed from step {resume.step}")
    print(f"output: {sorted(p.name for p in run.output_dir.iterdir())}")
    print(
        f"{ModelShape.from_directory(model_dir).parameters / 1e9:.2f}B parameters, FSDP2 bf16, checkpointing"
    )
    for name, size in plan.items:
        print(f"  plan  {name:55} {gib(size):>10}")
    ratio = plan.per_device_bytes / peak
    print(f"first run: peak GPU memory reserved {gib(peak)}, allocated {gib(peak_allocated)}; resumed run: "
          f"allocated {gib(resumed_peak)}; plan {gib(plan.per_device_bytes)}; plan / reserved = {ratio:.2f} "
          f"(goal 0.75-1.25)")  # fmt: skip
    ok = (
        resume.step == stop_after
        and steps[-1].step == args.steps
        and (run.output_dir / "wombat-manifest.json").exists()
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
