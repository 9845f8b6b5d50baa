"""The one loader of RRHF models: training workers, policy scorers and reward models all read a checkpoint
here, so the same directory gives the same weights, tokenizer and padding on every path (the p_i of Score
and of training agree because of it).

Weights come from safetensors only; the tokenizer pads on the right with the RRHF pad policy
(wombat_core.rrhf.collate: the vocabulary is never grown).
"""

from __future__ import annotations

from pathlib import Path

import torch

from wombat_core.dtypes import DTYPES
from wombat_core.errors import FailedPrecondition, InvalidArgument


def scoring_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float16 on CUDA (the reference scored in fp16) and float32 on CPU, where half precision is
    slow; otherwise the named dtype."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InvalidArgument(
            f"dtype must be auto, {', '.join(DTYPES)}; got {name}", metadata={"field": "dtype"}
        )
    return DTYPES[name]


def load_rrhf_model(model_dir: Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    architecture: str = "causal_lm") -> tuple[torch.nn.Module, object]:  # fmt: skip
    """The model (`architecture`: a causal LM, a sequence classifier, or the bare decoder of a value-head
    reward model) in `dtype` on `device`, and its right-padding tokenizer."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from wombat_core.checkpoint.layout import Checkpoint, WeightFormat
    from wombat_core.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    if Checkpoint.open(model_dir, role="model").format is not WeightFormat.SAFETENSORS:
        raise FailedPrecondition(f"{model_dir.name} holds .bin weights; run `wombat convert` first")
    cls = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification,
           "base": AutoModel}[architecture]  # fmt: skip
    model = cls.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True, use_safetensors=True)
    return model.to(device), load_tokenizer(model_dir, padding_side="right")
