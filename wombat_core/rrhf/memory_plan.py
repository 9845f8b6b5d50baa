"""Peak memory of an RRHF training job on each device, estimated before launch.

From the model's config (parameters counted on the meta device, no weights read), the strategy, the
worker count, the precision, AdamW, the sequence length, the responses per query and checkpointing. A job
whose plan does not fit its device is refused at once with a configuration that does, instead of running
out of memory minutes later at the first backward or optimiser step.

The terms, per device (P parameters, S = workers under FSDP and 1 otherwise):
  * fp32 master weights 4P/S, fp32 gradients 4P/S, AdamW's two fp32 moments 8P/S;
  * DDP's gradient buckets, another 4P (gradients are copied into them for the all-reduce);
  * compute copies: FSDP all-gathers the root (embeddings, LM head) and two decoder layers at a time (one
    prefetched) in the compute dtype, plus a layer's unsharded fp32 gradients before its reduce-scatter;
    autocast without FSDP caches a bf16 copy of every weight for the step;
  * activations of one query's k responses (the loop runs one query per forward): per layer and token the
    tensors LLaMA's backward keeps (8H + 2H_kv + 4I elements), only each layer's input under gradient
    checkpointing (plus one layer recomputed), and twice one layer's worth of gradients in flight during
    the backward; the logits and their log-softmax and gradient in fp32
    (12 bytes per vocabulary entry per token); on CPU the attention probabilities too (PyTorch's CPU SDPA
    with a padding mask takes the math path, heads x L^2 per layer);
  * the runtime: PyTorch, transformers and the tokenizer on CPU; the CUDA context, NCCL and cuBLAS
    workspaces on a GPU, and 10 % for the caching allocator's fragmentation.
On a CPU the "device" is the host, and loading the checkpoint before sharding is part of the same peak.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from wombat_core.rrhf.training import Precision, Strategy, TrainingConfig

GIB = 1 << 30
CPU_RUNTIME_BYTES = 400 << 20  # torch + transformers + tokenizers imported, measured ~330-380 MiB
CPU_DISTRIBUTED_BYTES = 64 << 20  # torch.distributed, FSDP and DCP code and gloo's buffers, measured ~55 MiB
CUDA_RUNTIME_BYTES = 1 << 30  # CUDA context, NCCL and cuBLAS workspaces
CUDA_FRAGMENTATION = 1.10
USABLE_FRACTION = 0.95  # headroom: a plan within 5 % of the device is not a plan that fits


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    largest_layer: int  # parameters of the largest decoder layer
    root: int  # parameters outside the decoder layers (embeddings, final norm, LM head)

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """Counts parameters by building the model on the meta device: exact, and no memory used."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        parameters = sum(p.numel() for p in model.parameters())  # tied weights are counted once
        layers = list(getattr(getattr(model, "model", None), "layers", None) or ())
        if not layers:
            raise ValueError(
                f"{type(model).__name__} has no model.layers: the planner knows LLaMA-shaped models"
            )
        per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        heads = config.num_attention_heads
        return cls(parameters, len(layers), config.hidden_size, config.intermediate_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads, config.vocab_size, max(per_layer),
                   parameters - sum(per_layer))  # fmt: skip

    @classmethod
    def from_directory(cls, model_dir: Path) -> ModelShape:
        from transformers import AutoConfig

        return cls.from_config(AutoConfig.from_pretrained(str(model_dir), local_files_only=True))


@dataclass(frozen=True)
class MemoryPlan:
    items: tuple[tuple[str, int], ...]  # (what, bytes per device), summing to per_device_bytes
    per_device_bytes: int
    device_memory_bytes: int
    parameters: int
    workers: int
    device: str  # "cuda" or "cpu"
    host_load_bytes: int  # host memory each worker needs to read the checkpoint before sharding
    suggestion: str = ""  # `wombat train` options that fit, when this does not

    @property
    def fits(self) -> bool:
        return self.per_device_bytes <= self.device_memory_bytes * USABLE_FRACTION


def estimate(shape: ModelShape, config: TrainingConfig, *, use_gpu: bool, responses_per_query: int,
             device_memory_bytes: int, sequence_length: int | None = None) -> MemoryPlan:  # fmt: skip
    """The plan of `config` (precision decided by `use_gpu` when unset) on devices of the given size."""
    config = config.for_device(use_gpu)
    workers = config.num_workers
    sharded = config.strategy is Strategy.FSDP and workers > 1
    bf16 = config.precision is Precision.BF16
    # As parallel.uses_fsdp: one worker is wrapped (in FSDP) only for bf16 on a GPU, never in DDP.
    fsdp = sharded or (config.strategy is Strategy.FSDP and bf16 and use_gpu)
    compute_bytes = 2 if bf16 else 4
    p, shards = shape.parameters, workers if sharded else 1
    items = [
        ("fp32 weights", 4 * p // shards),
        ("fp32 gradients", 4 * p // shards),
        ("AdamW moments (fp32)", 8 * p // shards),
    ]
    if config.strategy is Strategy.DDP and workers > 1:
        items.append(("DDP gradient buckets", 4 * p))
    if fsdp:
        gathered = compute_bytes * (shape.root + 2 * shape.largest_layer) + 4 * shape.largest_layer
        items.append(("FSDP all-gathered units", gathered))
    elif bf16:
        items.append(("bf16 weight copies (autocast)", 2 * p))
    length = sequence_length or config.model_max_length
    tokens = responses_per_query * length
    per_token_layer = (
        8 * shape.hidden + 2 * shape.hidden * shape.kv_heads // shape.heads + 4 * shape.intermediate
    )
    layer_activations = tokens * compute_bytes * per_token_layer
    if config.gradient_checkpointing:
        activations = tokens * compute_bytes * shape.layers * shape.hidden + layer_activations
    else:
        activations = shape.layers * layer_activations
    items.append(("activations", activations))
    items.append(("backward working set (a layer's gradients in flight)", 2 * layer_activations))
    if not use_gpu:
        items.append(
            (
                "attention probabilities (CPU)",
                responses_per_query * shape.heads * length * length * 4 * shape.layers,
            )
        )
    items.append(
        ("logits, log-softmax and their gradient (fp32)", tokens * shape.vocab * (12 + (2 if bf16 else 0)))
    )
    load_bytes = p * (2 if bf16 and fsdp else 4)
    if use_gpu:
        subtotal = sum(size for _, size in items)
        items.append(("CUDA runtime and allocator fragmentation",
                      CUDA_RUNTIME_BYTES + int(subtotal * (CUDA_FRAGMENTATION - 1))))  # fmt: skip
    else:
        distributed_runtime = CPU_DISTRIBUTED_BYTES if workers > 1 else 0
        items.append(
            ("runtime (PyTorch, transformers, tokenizer, gloo)", CPU_RUNTIME_BYTES + distributed_runtime)
        )
    total = sum(size for _, size in items)
    if not use_gpu:
        # The host is the device: the checkpoint read before sharding is part of the same peak.
        total = max(total, CPU_RUNTIME_BYTES + load_bytes + 4 * p // shards)
    return MemoryPlan(
        tuple(items), total, device_memory_bytes, p, workers, "cuda" if use_gpu else "cpu", load_bytes
    )


def plan_with_suggestion(shape: ModelShape, config: TrainingConfig, *, use_gpu: bool, responses_per_query: int,
                         device_memory_bytes: int, sequence_length: int | None = None) -> MemoryPlan:  # fmt: skip
    """The plan, with `suggestion` naming the first configuration that fits when it does not: FSDP, then
    gradient checkpointing, then bf16, then twice the workers, again and again."""
    kwargs = dict(use_gpu=use_gpu, responses_per_query=responses_per_query, device_memory_bytes=device_memory_bytes,
                  sequence_length=sequence_length)  # fmt: skip
    config = config.for_device(use_gpu)  # so a suggestion names only what changes
    plan = estimate(shape, config, **kwargs)
    if plan.fits:
        return plan
    candidates = []
    fsdp = replace(config, strategy=Strategy.FSDP)
    candidates.append(fsdp)
    checkpointed = replace(fsdp, gradient_checkpointing=True)
    candidates.append(checkpointed)
    precise = replace(checkpointed, precision=Precision.BF16) if use_gpu else checkpointed
    candidates.append(precise)
    workers = config.num_workers
    while workers < 1024:
        workers *= 2
        candidates.append(replace(precise, num_workers=workers))
    for candidate in candidates:
        if estimate(shape, candidate, **kwargs).fits:
            return replace(plan, suggestion=_options(candidate, config))
    return replace(plan, suggestion="nothing up to 1024 workers fits: use devices with more memory")


def _options(candidate: TrainingConfig, original: TrainingConfig) -> str:
    options = []
    if candidate.strategy is not original.strategy:
        options.append(f"--strategy {candidate.strategy}")
    if candidate.num_workers != original.num_workers:
        options.append(f"--workers {candidate.num_workers}")
    if candidate.gradient_checkpointing and not original.gradient_checkpointing:
        options.append("--gradient-checkpointing")
    if candidate.precision is not None and candidate.precision != original.precision:
        options.append(f"--precision {candidate.precision}")
    return " ".join(options)


def detected_device_memory(use_gpu: bool, workers: int) -> int:
    """The memory of one device: the first CUDA device's on a GPU; on a CPU, the memory this process may
    use (the cgroup limit in a pod, else the machine's) shared by the workers of a local cluster."""
    if use_gpu:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
        raise ValueError("no CUDA device here to measure: give the device's memory (--device-memory-gb)")
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return (min(physical, limit) if limit else physical) // max(1, workers)


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB / 10 else f"{size / (1 << 20):.0f} MiB"


def describe(plan: MemoryPlan) -> str:
    """One line for an error message: both figures and what fits."""
    text = (
        f"the training plan needs ~{gib(plan.per_device_bytes)} per {plan.device} device but it has "
        f"{gib(plan.device_memory_bytes)} ({plan.parameters / 1e9:.2f}B parameters on {plan.workers} workers)"
    )
    return text + (f"; a configuration that fits: {plan.suggestion}" if plan.suggestion else "")
