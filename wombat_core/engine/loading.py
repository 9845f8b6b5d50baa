"""Loading a model directory for serving: weights from safetensors, tokenizer, and what ModelInfo reports."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from wombat_core.checkpoint.layout import Checkpoint, WeightFormat
from wombat_core.dtypes import DTYPES
from wombat_core.engine.cpu_kernels import use_packed_kernels
from wombat_core.errors import FailedPrecondition, InvalidArgument
from wombat_core.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    model_type: str
    context_length: int
    dtype: str
    device: str


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FailedPrecondition(f"--device {device} requested but CUDA is not available")
    return torch.device(device)


def load_for_serving(
    model_dir: Path, *, dtype: str = "auto", device: str = "auto", packed_kernels: bool = False
) -> LoadedModel:
    """Loads weights (safetensors only; convert `.bin` first) in `dtype`: auto is float16 on CUDA and
    float32 on CPU, where half-precision matmuls are slow. `packed_kernels` swaps in oneDNN's packed
    weights on CPU (cpu_kernels.py): inference only, as the inference service uses it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    checkpoint = Checkpoint.open(model_dir, role="model")
    if checkpoint.format is not WeightFormat.SAFETENSORS:
        raise FailedPrecondition(f"{model_dir.name} holds .bin weights; run `wombat convert` first")
    target_device = pick_device(device)
    if dtype == "auto":
        torch_dtype = torch.float16 if target_device.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise InvalidArgument(
            f"dtype must be auto, {', '.join(DTYPES)}; got {dtype}", metadata={"field": "dtype"}
        )
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "sliding_window", None) or layer_types != {"full_attention"}:
        raise FailedPrecondition(
            f"{model_dir.name}: only full-attention decoder models are supported by the batching engine"
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch_dtype, local_files_only=True, use_safetensors=True
    )
    model.to(target_device).eval()
    if packed_kernels:
        use_packed_kernels(model)
    tokenizer = load_tokenizer(model_dir)
    context = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    log.info("loaded %s (%s, %s, context %d)", model_dir.name, torch_dtype, target_device, context)
    return LoadedModel(
        name=model_dir.name,
        model=model,
        tokenizer=tokenizer,
        model_type=str(config.model_type),
        context_length=context,
        dtype=str(torch_dtype).removeprefix("torch."),
        device=str(target_device),
    )
