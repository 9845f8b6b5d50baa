"""Faster CPU kernels for LLaMA-family models, swapped in module by module so that the model's own forward
still runs (the engine runs the lean forward of cpu_forward.py on the same weights).

Why: decoding multiplies a few rows by every weight matrix, which is bound by memory bandwidth at one row
and by the GEMM kernel's efficiency at sixteen. On this project's CPUs (an AVX2-only EPYC among them) the
BLAS that numpy ships (OpenBLAS) multiplies float32 rows 1.3x faster than oneDNN's pre-packed weights at
one row and about 2x faster at 16 to 64 rows, which is where continuous batching lives; and
cpu_matmul's compiled kernels are faster again (1.2x at 1 and 16 rows, 2x at 4), because they do not
repack the weight on every call as OpenBLAS does, and about as fast on prefill-sized products. On an
AVX-512 machine oneDNN's packed kernels ran near the memory bandwidth. So float32 weights keep
PyTorch's [out, in] layout for the compiled kernels ("numba"; "openblas" where they are unavailable),
except on AVX-512 CPUs, which get oneDNN (`default_float32_kernels`; `WOMBAT_CPU_KERNELS` overrides).
bfloat16 weights (which neither can multiply) use oneDNN. And the three attention projections
(q, k, v) and the two MLP input projections (gate, up) read the same input, so each trio and pair
becomes one matrix: fewer, larger multiplications.

Threads: OpenBLAS has its own thread pool, and two busy-waiting pools (OpenBLAS's and PyTorch's OpenMP
team) on the same cores slow each other down by several times. So a model on numba or OpenBLAS kernels
runs its PyTorch operations single-threaded and gives its BLAS the cores (`use_threads`; with "numba"
OpenBLAS never runs, as its spinning threads slowed numba's eightfold): the element-wise
operations of a decode step are too small to gain from a team anyway. (Attention split over Python
threads was tried: no gain beside OpenBLAS's spinning workers.)

The swapped model computes the same function; float32 results differ from the plain kernels only in the
order of additions (about 1e-6 relative, tested). The prepared weights replace the originals (no second
copy is kept), so the swap is for inference only: no gradients flow through them.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import NamedTuple

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from wombat_core.engine import cpu_matmul

log = logging.getLogger(__name__)

PACKING_BATCH_HINT = 16  # oneDNN chooses the blocking for this many rows; 1 to 64 rows all run well with it


class FloatWeight(NamedTuple):
    """A float32 weight in PyTorch's [out, in] layout (the parameter's own memory where it was contiguous),
    multiplied by cpu_matmul's compiled kernels or by numpy's BLAS (OpenBLAS)."""

    matrix: np.ndarray
    compiled: bool


PreparedWeight = FloatWeight | torch.Tensor  # oneDNN: a packed tensor


KERNELS = ("numba", "openblas", "onednn")


def _pack(weight: torch.Tensor, kernels: str) -> PreparedWeight:
    weight = weight.detach()
    if kernels in ("numba", "openblas"):
        return FloatWeight(np.ascontiguousarray(weight.numpy()), compiled=kernels == "numba")
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACKING_BATCH_HINT)


def linear(x: torch.Tensor, packed: PreparedWeight, out_features: int) -> torch.Tensor:
    rows = x.detach().reshape(-1, x.shape[-1])
    if isinstance(packed, FloatWeight):
        product = torch.from_numpy(multiply(rows.numpy(), packed))
    else:  # oneDNN's call made here, not through `multiply`: bfloat16 rows have no numpy form
        product = torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")
    return product.reshape(*x.shape[:-1], out_features)


def multiply(rows: np.ndarray, packed: PreparedWeight) -> np.ndarray:
    """rows [N, in] (float32) times the prepared weight: [N, out], as arrays. The lean forward's fused path
    calls this directly: going through tensors (`linear`) cost ~23 us more a call, and a decode step took
    24.1 ms instead of 25.9 at one row and 65.3 instead of 70.5 at 16 (medians, A/B in one process)."""
    if isinstance(packed, FloatWeight):  # both release the GIL while they multiply
        rows = np.ascontiguousarray(rows)
        return cpu_matmul.matmul(rows, packed.matrix) if packed.compiled else np.matmul(rows, packed.matrix.T)
    return torch.ops.mkldnn._linear_pointwise(torch.from_numpy(rows), packed, None, "none", [], "").numpy()


def use_threads(model: torch.nn.Module, threads: int) -> None:
    """Call on the thread that runs `model` with `threads` CPUs. With numba or OpenBLAS kernels, PyTorch's
    operations there run single-threaded and OpenBLAS (process-wide) and numba (for this thread) get the
    threads (the module docstring says why); sizing OpenBLAS also matters because it starts a thread per
    CPU of the node, not of the pod's quota. Otherwise PyTorch's OpenMP team gets them."""
    kernels = getattr(model, "wombat_cpu_kernels", None)  # set by use_packed_kernels
    if kernels in ("numba", "openblas"):
        torch.set_num_threads(1)
        threadpool_limits(limits=threads, user_api="blas")
        # numba's parallel kernels (the matmul, the fused attention) get the cores only where OpenBLAS
        # never runs: beside OpenBLAS's spinning pool a numba launch took eight times as long.
        cpu_matmul.set_threads(threads if kernels == "numba" else 1)
    else:
        torch.set_num_threads(threads)


def default_float32_kernels() -> str:
    """The float32 kernels for this CPU: `WOMBAT_CPU_KERNELS` when set (one of KERNELS), else oneDNN
    where the CPU has AVX-512 (its packed kernels ran near the memory bandwidth there) and numba's
    compiled kernels elsewhere (OpenBLAS where those are unavailable; on an AVX2-only EPYC OpenBLAS is
    1.3x to 2x faster than oneDNN, the compiled kernels faster again). Decided by ISA, not by timing them at
    load: a timing taken while the node is busy (other pods loading) picked the slower one here."""
    chosen = os.environ.get("WOMBAT_CPU_KERNELS")
    if not chosen:
        if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
            chosen = "onednn"
        else:
            chosen = "numba" if cpu_matmul.available() else "openblas"
    if chosen not in KERNELS:
        raise ValueError(f"WOMBAT_CPU_KERNELS must be one of {', '.join(KERNELS)}, got {chosen!r}")
    return chosen


class PackedLinear(torch.nn.Module):
    """A bias-free linear layer with its weight prepared for the fast kernel (OpenBLAS or oneDNN)."""

    def __init__(self, linear: torch.nn.Linear, kernels: str):
        super().__init__()
        self.out_features = linear.out_features
        self.packed = _pack(linear.weight, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed, self.out_features)


class SharedInputProjections:
    """Several bias-free projections of the same input as one packed multiplication. The model calls the
    projections one after the other on the same tensor (q, k, v; gate, up): the first call computes all
    of them and the next ones take their slice. A different input tensor is computed afresh. What was
    computed is kept per thread, so threads running the same model concurrently never see each other's."""

    def __init__(self, linears: list[torch.nn.Linear], kernels: str):
        self.sizes = [linear.out_features for linear in linears]
        self.packed = _pack(torch.cat([linear.weight for linear in linears]), kernels)
        self._last = threading.local()  # .input (held, so its identity cannot be reused meanwhile), .outputs

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        last = self._last
        if index == 0 or getattr(last, "input", None) is not x:
            last.input = x
            last.outputs = linear(x, self.packed, sum(self.sizes)).split(self.sizes, dim=-1)
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


def supported(model: torch.nn.Module) -> bool:
    """Whether the swap applies: a CPU model in float32 (or bfloat16 where the CPU and oneDNN have it), of
    the LLaMA family's module layout."""
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype not in (torch.float32, torch.bfloat16):
        return False
    if parameter.dtype == torch.bfloat16 and not (
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ):
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
    norms = [getattr(first, "input_layernorm", None), getattr(first, "post_attention_layernorm", None)]
    norms.append(getattr(body, "norm", None))
    return all(isinstance(linear, torch.nn.Linear) and linear.bias is None for linear in linears) and all(
        hasattr(norm, "variance_epsilon") for norm in norms
    )


def swapped(model: torch.nn.Module) -> bool:
    """Whether `use_packed_kernels` swapped this model's kernels."""
    return getattr(model, "wombat_cpu_kernels", None) is not None


def use_packed_kernels(model: torch.nn.Module, *, kernels: str | None = None) -> bool:
    """Swaps the kernels in place when `supported(model)`; returns whether it did. `kernels` (one of
    KERNELS) forces a choice; by default float32 models get `default_float32_kernels()`, bfloat16 models
    oneDNN."""
    if not supported(model):
        return False
    float32 = next(model.parameters()).dtype == torch.float32
    if kernels is None:
        kernels = default_float32_kernels() if float32 else "onednn"
    if kernels not in KERNELS or (kernels != "onednn" and not float32):
        raise ValueError(f"kernels must be one of {KERNELS} (onednn only for bfloat16), got {kernels!r}")
    if kernels == "numba" and not cpu_matmul.available():
        raise ValueError(
            "numba kernels need numba with an OpenMP or TBB threading layer, and WOMBAT_FUSED_KERNELS unset or 1"
        )
    with torch.no_grad():
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            qkv = SharedInputProjections([attention.q_proj, attention.k_proj, attention.v_proj], kernels)
            attention.q_proj, attention.k_proj, attention.v_proj = qkv.modules()
            attention.o_proj = PackedLinear(attention.o_proj, kernels)
            mlp.gate_proj, mlp.up_proj = SharedInputProjections(
                [mlp.gate_proj, mlp.up_proj], kernels
            ).modules()
            mlp.down_proj = PackedLinear(mlp.down_proj, kernels)
        model.lm_head = PackedLinear(model.lm_head, kernels)
    model.wombat_cpu_kernels = kernels  # what use_threads reads
    log.info("CPU kernels in use: %s weights, fused projections", kernels)
    return True
