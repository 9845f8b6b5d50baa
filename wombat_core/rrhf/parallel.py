"""Data-parallel training for RRHF: FSDP2 or DDP over torch.distributed, or one plain process.

torch.distributed is the computation here, not transport: whoever starts the workers (Ray Train in the
service, torchrun, a test's spawned processes) initialises the process group, and this module decides
how the model is spread over it.

* FSDP (the reference recipe): `fully_shard` on every decoder layer, then on the root, over a 1-D mesh
  of all workers. Parameters, gradients and AdamW state are sharded, so a 7B model's ~108 GB of
  fp32 weights + grads + Adam moments is ~13.5 GB a GPU on 8 GPUs. Under bf16 precision the weights are
  loaded in bf16 (half the host memory per worker), sharded, then the shards become the fp32 master
  weights; `MixedPrecisionPolicy` runs each layer's forward and backward in bf16 and reduces gradients
  in fp32, which is what the HF Trainer's `--fsdp full_shard --bf16` does.
* DDP for small models: a full replica per worker, gradients all-reduced once per optimiser step
  (`no_sync` on every micro-batch but the last). FSDP reduce-scatters after every micro-batch instead:
  skipping it would keep unsharded gradients, the memory FSDP exists to save.
* One worker, or no process group: the model as it is, bf16 by autocast (FSDP only for bf16 on a GPU,
  see `uses_fsdp`). Without a process group this is the single-process reference that the distributed
  runs are tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from wombat_core.rrhf.training import Precision, Strategy, TrainingConfig


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def uses_fsdp(config: TrainingConfig, device: torch.device) -> bool:
    """Whether `prepare_model` wraps with FSDP. It shards over two or more workers. On one worker it shards
    nothing and only adds copies (20-45 % of a CPU step, measured), except that its mixed precision casts
    a layer at a time where autocast caches a bf16 copy of every weight: so one worker is wrapped only for
    bf16 on a GPU."""
    if not distributed() or config.strategy is not Strategy.FSDP:
        return False
    return world_size() > 1 or (config.precision is Precision.BF16 and device.type == "cuda")


def load_dtype(config: TrainingConfig, device: torch.device) -> torch.dtype:
    """The dtype to read the checkpoint in: bf16 for FSDP bf16 training (sharding then makes fp32 master
    shards), fp32 otherwise (DDP and single-process training keep fp32 weights, bf16 by autocast)."""
    return (
        torch.bfloat16 if uses_fsdp(config, device) and config.precision is Precision.BF16 else torch.float32
    )


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks FSDP wraps one by one (LLaMA's `model.layers`; the reference's auto-wrap
    class is LlamaDecoderLayer)."""
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} has no model.layers to shard; FSDP supports LLaMA-shaped models"
        )
    return list(layers)


def prepare_model(model: torch.nn.Module, config: TrainingConfig, device: torch.device) -> torch.nn.Module:
    """Moves, checkpoints and shards (or replicates) `model` for training. Build the optimiser after this."""
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing works with FSDP2 and with inputs that do not require grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not distributed():
        return model.to(device)
    if uses_fsdp(config, device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world_size(),))
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if config.precision is Precision.BF16
            else MixedPrecisionPolicy()
        )
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)  # embeddings, final norm and LM head
        return model.to(torch.float32)  # the local shards become fp32 master weights
    if world_size() == 1:
        return model.to(device)  # a wrapper of one worker would copy every gradient for nothing
    from torch.nn.parallel import DistributedDataParallel

    model = model.to(device)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP wrapper (FSDP2 shards in place and has none)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters())
    return parameter.device


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """DDP: skip the all-reduce unless `enabled` (the last micro-batch of a step). FSDP and plain models:
    nothing to skip (see the module docstring)."""
    if enabled or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        yield
        return
    with model.no_sync():
        yield


def compute_precision(
    model: torch.nn.Module, precision: Precision | None
) -> contextlib.AbstractContextManager:
    """bf16 autocast where FSDP's mixed-precision policy does not already cast (plain and DDP models)."""
    if precision is not Precision.BF16 or is_sharded(model):
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=torch.bfloat16)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """The global gradient norm before clipping (over all shards); clips to `max_norm` unless it is 0."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor, replicated over the mesh
        norm = norm.full_tensor()
    return float(norm)


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The elementwise sum over all workers (the tensor itself without a process group)."""
    if not distributed():
        return tensor
    # NCCL reduces only device tensors; gloo only host ones. float64 keeps loss sums exact enough.
    moved = tensor.to(device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(moved)
    return moved.cpu()


def any_worker(flag: bool, device: torch.device) -> bool:
    """True on every worker when it is true on any: all workers stop at the same step, or the others would
    wait in a collective forever."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64), device)[0] > 0)


def barrier() -> None:
    if distributed():
        dist.barrier()
