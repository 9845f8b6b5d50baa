"""Faster CPU kernels for LLaMA-family models, swapped in module by module so that the model's own forward
(and its own SDPA attention) still runs.

Why: decoding multiplies a few rows by every weight matrix, which is bound by memory bandwidth, and
PyTorch's default CPU GEMM streams a [out, in] weight at about 40 % of this machine's bandwidth for one
row. oneDNN's pre-packed (blocked) weights reach about 90 %, at one row and at sixteen. And the three
attention projections (q, k, v) and the two MLP input projections (gate, up) read the same input, so
each trio and pair becomes one packed matrix: fewer, larger multiplications. RMSNorm uses PyTorch's
fused kernel instead of five separate operations. benchmarks/inference.py measures the effect.

The swapped model computes the same function; float32 results differ from the plain kernels only in the
order of additions (about 1e-6 relative, tested). The packed weights replace the originals (no second
copy is kept), so the swap is for inference only: no gradients flow through them.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACKING_BATCH_HINT = 16  # oneDNN chooses the blocking for this many rows; 1 to 64 rows all run well with it


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKING_BATCH_HINT)


def _linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "").reshape(
        *x.shape[:-1], out_features
    )


class PackedLinear(torch.nn.Module):
    """A bias-free linear layer with its weight pre-packed by oneDNN."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.out_features = linear.out_features
        self.packed = _pack(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.packed, self.out_features)


class SharedInputProjections:
    """Several bias-free projections of the same input as one packed multiplication. The model calls the
    projections one after the other on the same tensor (q, k, v; gate, up): the first call computes all
    of them and the next ones take their slice. A different input tensor is computed afresh. What was
    computed is kept per thread, so threads running the same model concurrently never see each other's."""

    def __init__(self, linears: list[torch.nn.Linear]):
        self.sizes = [linear.out_features for linear in linears]
        self.packed = _pack(torch.cat([linear.weight for linear in linears]))
        self._last = threading.local()  # .input (held, so its identity cannot be reused meanwhile), .outputs

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        last = self._last
        if index == 0 or getattr(last, "input", None) is not x:
            last.input = x
            last.outputs = _linear(x, self.packed, sum(self.sizes)).split(self.sizes, dim=-1)
        return last.outputs[index]

    def modules(self) -> list[Projection]:
        return [Projection(self, index) for index in range(len(self.sizes))]


class Projection(torch.nn.Module):
    """One of a SharedInputProjections' outputs, in place of the linear layer it came from."""

    def __init__(self, shared: SharedInputProjections, index: int):
        super().__init__()
        self.shared, self.index = shared, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output(x, self.index)


class FusedRMSNorm(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def supported(model: torch.nn.Module) -> bool:
    """Whether the swap applies: a CPU model in float32 (or bfloat16 where the CPU has it), of the LLaMA
    family's module layout, with oneDNN available."""
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if parameter.dtype not in (torch.float32, torch.bfloat16):
        return False
    if parameter.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if not layers or not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        return False
    first = layers[0]
    attention, mlp = getattr(first, "self_attn", None), getattr(first, "mlp", None)
    names = [(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    names += [(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    linears = [getattr(owner, name, None) for owner, name in names]
    return all(isinstance(linear, torch.nn.Linear) and linear.bias is None for linear in linears) and all(
        hasattr(getattr(first, norm, None), "variance_epsilon")
        for norm in ("input_layernorm", "post_attention_layernorm")
    )


def use_packed_kernels(model: torch.nn.Module) -> bool:
    """Swaps the kernels in place when `supported(model)`; returns whether it did."""
    if not supported(model):
        return False
    with torch.no_grad():
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            q, k, v = SharedInputProjections([attention.q_proj, attention.k_proj, attention.v_proj]).modules()
            attention.q_proj, attention.k_proj, attention.v_proj = q, k, v
            attention.o_proj = PackedLinear(attention.o_proj)
            mlp.gate_proj, mlp.up_proj = SharedInputProjections([mlp.gate_proj, mlp.up_proj]).modules()
            mlp.down_proj = PackedLinear(mlp.down_proj)
            layer.input_layernorm = FusedRMSNorm(layer.input_layernorm)
            layer.post_attention_layernorm = FusedRMSNorm(layer.post_attention_layernorm)
        if hasattr(model.model.norm, "variance_epsilon"):
            model.model.norm = FusedRMSNorm(model.model.norm)
        model.lm_head = PackedLinear(model.lm_head)
    log.info("oneDNN packed weights and fused projections in use")
    return True
