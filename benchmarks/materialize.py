"""Materialiser benchmark: peak memory and wall time of the streaming delta apply, side by side with the
reference's full-RAM method and with raw file I/O of the same bytes, in one run.

    python benchmarks/materialize.py [--size-mb 480] [--shards 6] [--keep DIR]

Prints two ratios (goals from issue 3):
  peak RSS above the interpreter's baseline ÷ model bytes   (goal ≤ 0.25; the reference is about 3)
  wall time ÷ time to read base + delta and write as many bytes (fsynced)   (goal ≤ 2)
Each method runs in a fresh subprocess so its peak RSS is its own. The synthetic checkpoint has LLaMA's
proportions (vocabulary tensors ~2 % of the weights, 7 projection matrices per layer), in float16.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, VOCAB = 1024, 2752, 4000


def make_checkpoints(directory: Path, size_mb: int, shards: int) -> int:
    """Writes base (VOCAB rows) and delta (VOCAB + 1 rows: the [PAD] row) as sharded safetensors."""
    import torch
    from safetensors.torch import save_file

    layer_bytes = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE) * 2
    layers = max(1, (size_mb * 1_000_000) // layer_bytes)
    total = 0
    for role, vocab, seed in (("base", VOCAB, 1), ("delta", VOCAB + 1, 2)):
        generator = torch.Generator().manual_seed(seed)
        names = {"model.embed_tokens.weight": (vocab, HIDDEN), "lm_head.weight": (vocab, HIDDEN),
                 "model.norm.weight": (HIDDEN,)}  # fmt: skip
        for i in range(layers):
            prefix = f"model.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                names[f"{prefix}self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
            names[f"{prefix}mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
            names[f"{prefix}mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
            names[f"{prefix}mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
            names[f"{prefix}input_layernorm.weight"] = (HIDDEN,)
        ordered = list(names.items())
        out = directory / role
        out.mkdir(parents=True)
        per_shard = -(-len(ordered) // shards)
        weight_map = {}
        for index in range(shards):
            chunk = ordered[index * per_shard : (index + 1) * per_shard]
            if not chunk:
                continue
            file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            tensors = {n: (torch.randn(s, generator=generator) * 0.02).half() for n, s in chunk}
            save_file(tensors, out / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in tensors})
            if role == "base":
                total += sum(t.numel() * 2 for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
        (out / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab}))
    return total


# --- workers (each in its own process) -----------------------------------------------------------------


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    """VmHWM: this process image's own peak RSS. (getrusage's ru_maxrss survives fork+exec, so a child can
    report its parent's size.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _report(baseline: int, started: float) -> None:
    peak = _peak_rss_bytes()
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak, "wall": time.perf_counter() - started}))


def worker_streaming(directory: Path) -> None:
    from wombat_core.delta import apply_delta

    baseline = _rss_bytes()
    started = time.perf_counter()
    apply_delta(directory / "base", directory / "delta", directory / "out-streaming")
    _report(baseline, started)


def worker_reference(directory: Path) -> None:
    """REFERENCE.md §1 as the public scripts do it: both models in RAM, resize, add in float16, save."""
    import torch
    from safetensors.torch import load_file, save_file

    baseline = _rss_bytes()
    started = time.perf_counter()
    base, delta = {}, {}
    for f in sorted((directory / "base").glob("*.safetensors")):
        base.update(load_file(f))
    for f in sorted((directory / "delta").glob("*.safetensors")):
        delta.update(load_file(f))
    for name, d in delta.items():
        b = base[name].half()
        if b.shape[0] < d.shape[0]:
            b = torch.cat([b, torch.zeros((d.shape[0] - b.shape[0], *b.shape[1:]), dtype=b.dtype)])
        base[name] = b + d.half()
    out = directory / "out-reference"
    out.mkdir()
    save_file({n: base[n] for n in delta}, out / "model.safetensors")
    _report(baseline, started)


def worker_io(directory: Path) -> None:
    """The floor: read every base and delta byte, write as many bytes, fsync."""
    baseline = _rss_bytes()
    started = time.perf_counter()
    buffer = bytearray(8 * 1024 * 1024)
    view = memoryview(buffer)
    total = 0
    for f in sorted(
        [*(directory / "base").glob("*.safetensors"), *(directory / "delta").glob("*.safetensors")]
    ):
        with open(f, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                total += n
    out_bytes = sum(f.stat().st_size for f in (directory / "delta").glob("*.safetensors"))
    with open(directory / "io-probe.bin", "wb", buffering=0) as handle:
        written = 0
        while written < out_bytes:
            written += handle.write(view[: min(len(buffer), out_bytes - written)])
        os.fsync(handle.fileno())
    _report(baseline, started)


WORKERS = {"streaming": worker_streaming, "reference": worker_reference, "io": worker_io}


def run_worker(name: str, directory: Path) -> dict:
    os.sync()  # flush earlier runs' dirty pages so their writeback does not throttle this run
    result = subprocess.run(
        [sys.executable, __file__, "--worker", name, str(directory)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=480)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for wall times (noisy machine)")
    parser.add_argument("--worker", choices=WORKERS)
    parser.add_argument("directory", nargs="?", type=Path)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        WORKERS[args.worker](args.directory)
        return

    import shutil

    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        directory = Path(tmp)
        model_bytes = make_checkpoints(directory, args.size_mb, args.shards)
        print(f"model: {model_bytes / 1e6:.0f} MB float16 in {args.shards} shards (base and delta each)")
        runs: dict[str, list[dict]] = {name: [] for name in WORKERS}
        for _ in range(args.repeats):
            for name in ("io", "streaming", "reference"):  # interleaved so drift hits all alike
                for leftover in ("out-streaming", "out-reference", "io-probe.bin"):
                    path = directory / leftover
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                for lock in directory.glob(".out-*"):
                    lock.unlink()
                runs[name].append(run_worker(name, directory))
        best = {name: min(r["wall"] for r in rs) for name, rs in runs.items()}
        mem = {
            name: max(r["peak_rss"] - r["baseline_rss"] for r in rs) / model_bytes
            for name, rs in runs.items()
        }
        print(f"{'method':<12}{'best wall s':>12}{'peak RSS above baseline / model bytes':>40}")
        for name in ("io", "streaming", "reference"):
            print(f"{name:<12}{best[name]:>12.2f}{mem[name]:>40.3f}")
        print()
        print(
            f"memory ratio (streaming): {mem['streaming']:.3f}   goal <= 0.25   reference: {mem['reference']:.2f}"
        )
        print(f"time ratio (streaming / raw I/O): {best['streaming'] / best['io']:.2f}   goal <= 2"
              f"   reference / raw I/O: {best['reference'] / best['io']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
