"""A lean forward for LLaMA-family models on CPU: the decoder stack as a loop of the operations that must
run, and nothing else (after CTranslate2's decoder, which this engine is measured against).

Why: at one row a decode step of the demo model runs ~1,400 PyTorch operations through Hugging Face's
modules (hooks, kwargs plumbing, mask preparation, per-head transposes, a rotary embedding per tensor),
and on a CPU each costs a few microseconds of dispatch on top of its arithmetic: about a third of the
step once the weights are multiplied by OpenBLAS (cpu_kernels.py). This loop runs ~25 operations a layer:

    h = rms_norm(x)              one packed [q|k|v] multiplication
    rotary on q and k at once    (they are adjacent in the product)
    write k, v into the cache    SDPA over the cache's views, GQA in the kernel
    x += o(attention)            h = rms_norm(x)
    x += down(act(gate) * up)    one packed [gate|up] multiplication

And it runs a decode step and a prefill chunk as one forward over their tokens together (vLLM v1's
flattened batch): the weights are read once for both, a multiplication of 16 + 40 rows costs far less
than one of 16 plus one of 40, and a newcomer's prefill no longer waits for a decode step of its own.
Only attention runs per segment.

It computes the model's function with the model's own pieces: its rotary embedding module (so any RoPE
scaling the config names applies), its activation, its epsilons and attention scaling, and the weights
cpu_kernels.py prepared. Float32 logits equal the Hugging Face forward's to ~1e-6 (tested), and the
engine's greedy ids equal HF `generate`'s (tested end to end).

Between the multiplications, float32 models run cpu_fused.py's compiled kernels (numba) instead of the
PyTorch operations: the residual add with the norm, rotary with the cache write, a decode step's attention
and the activation, each one call (`_fused_layers`; `_layers` is the same forward in PyTorch operations).

It is used only where cpu_kernels swapped the model's modules (a CPU model of the LLaMA layout); every
other model, and every CUDA model, runs its own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wombat_core.engine import cpu_fused
from wombat_core.engine.cpu_kernels import PackedLinear, PreparedWeight, Projection, linear, multiply
from wombat_core.engine.kv_cache import CacheWrite, KVCache

# Up to this many tokens a forward's activation runs as cpu_fused.silu_mul; beyond, as PyTorch's SiLU, whose
# vectorised exp overtakes the kernel's scalar one (numba has no vector exp without Intel's SVML): on the
# AVX2 EPYC, 7 us against 13 at one token, 90 us against 41 at sixteen.
FUSED_ACTIVATION_MAX_TOKENS = 4


@dataclass
class Segment:
    """Rows that run the same number of tokens in a forward: a decode step (T = 1) or a prefill chunk.

    input_ids, position_ids: [rows, T]; mask: [rows, 1, T, columns], True where a query may attend; write:
    where the rows' keys and values go in the cache (the runner's plan); every_position: the rows (indices
    among the segment's) whose logits are wanted at every position, not only the last (prompt logprobs)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    write: CacheWrite
    every_position: torch.Tensor | None = None
    # A decode step's rows: each one's first and last column attended (the decode kernel reads them).
    spans: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class SegmentLogits:
    last: torch.Tensor  # [rows, vocab]: each row's last position
    every: torch.Tensor | None = None  # [len(every_position), T, vocab], when the segment asked


class LeanLlamaForward:
    def __init__(self, model: torch.nn.Module):
        body, config = model.model, model.config
        first = body.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = first.head_dim
        self.scaling = first.scaling
        self.embed, self.rotary, self.final_norm = body.embed_tokens, body.rotary_emb, body.norm
        self.lm_head = model.lm_head
        self.layers = [_Layer(layer) for layer in body.layers[: config.num_hidden_layers]]
        # The small operations between the multiplications as compiled loops (cpu_fused.py), for float32
        # models whose activation is SiLU (LLaMA's), where numba is installed.
        self.fused = (
            cpu_fused.available()
            and next(model.parameters()).dtype == torch.float32
            and all(layer.silu for layer in self.layers)
        )

    @torch.inference_mode()
    def __call__(self, segments: list[Segment], cache: KVCache) -> list[SegmentLogits]:
        """Runs the segments' tokens as one batch of N tokens: every matrix multiplication, norm and the
        rotary embedding take all N at once, and only attention runs per segment (each over its own rows of
        the cache, with its own mask). Returns each segment's logits at its rows' last position,
        [rows, vocab] in the model's dtype, and at every position of the rows it asked for."""
        x = self.embed(torch.cat([s.input_ids.reshape(-1) for s in segments]))  # [N, hidden]
        positions = torch.cat([s.position_ids.reshape(-1) for s in segments])
        cos, sin = self.rotary(x[None], positions[None])  # [1, N, head_dim]
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # broadcast over the heads of [N, heads, d]
        # SDPA turns a boolean mask into an additive one in every layer: once per forward is enough. A
        # decode step the fused kernel attends by its spans needs none.
        masks = [None if self.fused and s.spans is not None else _additive(s.mask, x.dtype) for s in segments]
        bounds, start = [], 0  # each segment's tokens are [start, end) of the N
        for segment in segments:
            bounds.append((start, start + segment.input_ids.numel()))
            start = bounds[-1][1]
        if self.fused:
            x = self._fused_layers(x, cos[:, 0], sin[:, 0], segments, masks, bounds, cache)
        else:
            x = self._layers(x, cos, sin, segments, masks, bounds, cache)
        lasts = []  # the index among the N of each row's last token, per segment
        for segment, (first, last) in zip(segments, bounds, strict=True):
            length = segment.input_ids.shape[1]
            lasts.append(torch.arange(first + length - 1, last, length, device=x.device))
        logits = self.lm_head(rms_norm(x[torch.cat(lasts)], self.final_norm))
        results = [SegmentLogits(part) for part in logits.split([len(index) for index in lasts])]
        for segment, (first, last), result in zip(segments, bounds, results, strict=True):
            if segment.every_position is not None:  # the LM head over those rows' every token
                rows, length = segment.input_ids.shape
                hidden = x[first:last].view(rows, length, -1)[segment.every_position]
                result.every = self.lm_head(rms_norm(hidden, self.final_norm))
        return results

    def _layers(self, x, cos, sin, segments: list[Segment], masks, bounds, cache: KVCache) -> torch.Tensor:
        """The decoder layers in PyTorch operations; returns the last layer's output [N, hidden]."""
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        half = head_dim // 2
        qk_width = (heads + kv_heads) * head_dim
        for index, layer in enumerate(self.layers):
            qkv = linear(rms_norm(x, layer.input_norm), layer.qkv, layer.qkv_width)
            qk = qkv[:, :qk_width].view(-1, heads + kv_heads, head_dim)
            rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)  # rotate_half, q and k at once
            qk = torch.addcmul(qk * cos, rotated, sin)
            outputs = []
            for segment, mask, (first, last) in zip(segments, masks, bounds, strict=True):
                rows, length = segment.input_ids.shape
                queries = qk[first:last, :heads].view(rows, length, heads, head_dim).transpose(1, 2)
                keys = qk[first:last, heads:].view(rows, length, kv_heads, head_dim).transpose(1, 2)
                values = qkv[first:last, qk_width:].view(rows, length, kv_heads, head_dim).transpose(1, 2)
                keys, values = cache.write(index, keys, values, segment.write)
                outputs.append(self._sdpa(queries, keys, values, mask))
            attention = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
            x = x + linear(attention, layer.o, layer.hidden)
            gate_up = linear(rms_norm(x, layer.post_norm), layer.gate_up, 2 * layer.intermediate)
            gate, up = gate_up.split(layer.intermediate, dim=-1)
            x = x + linear(layer.act(gate) * up, layer.down, layer.hidden)
        return x

    def _fused_layers(
        self, x, cos, sin, segments: list[Segment], masks, bounds, cache: KVCache
    ) -> torch.Tensor:
        """The decoder layers with cpu_fused's kernels between the multiplications: per layer, the residual
        add and norm, rotary with the cache write, attention (the decode kernel over the cache storage for
        a decode step, SDPA for a prefill chunk), the residual add and norm, and the activation: about eight
        calls instead of some twenty-five. x is updated in place and returned."""
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        places = [cache.token_places(s.write, s.input_ids.shape[1]) for s in segments]
        slots = torch.cat([slot for slot, _ in places]).numpy()
        columns = torch.cat([column for _, column in places]).numpy()
        cos, sin = cos.contiguous().numpy(), sin.contiguous().numpy()  # [N, head_dim]
        spans = [None if s.spans is None else (s.spans[0].numpy(), s.spans[1].numpy()) for s in segments]
        residual, delta = x.numpy(), None  # the stream x, and the last output still to be added to it
        for index, layer in enumerate(self.layers):
            h = cpu_fused.add_rms_norm(residual, delta, layer.input_weight, layer.input_eps)
            qkv = multiply(h, layer.qkv)
            key_store, value_store = cache.keys[index].numpy(), cache.values[index].numpy()
            queries = torch.from_numpy(
                cpu_fused.rotary_write(qkv, cos, sin, heads, kv_heads, key_store, value_store, slots, columns)
            )
            outputs = []
            for segment, mask, span, (first, last) in zip(segments, masks, spans, bounds, strict=True):
                rows, length = segment.input_ids.shape
                if span is not None:  # a decode step: over the storage, each row its own span of columns
                    outputs.append(torch.from_numpy(cpu_fused.decode_attention(
                        queries[first:last].numpy(), key_store, value_store, slots[first:last], *span, self.scaling
                    )))  # fmt: skip
                    continue
                query = queries[first:last].view(rows, length, heads, head_dim).transpose(1, 2)
                outputs.append(self._sdpa(query, *cache.attended(index, segment.write), mask))
            attention = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
            o = multiply(attention.numpy(), layer.o)
            h = cpu_fused.add_rms_norm(residual, o, layer.post_weight, layer.post_eps)
            gate_up = multiply(h, layer.gate_up)
            if len(gate_up) <= FUSED_ACTIVATION_MAX_TOKENS:
                activated = cpu_fused.silu_mul(gate_up, layer.intermediate)
            else:
                gate, up = torch.from_numpy(gate_up).split(layer.intermediate, dim=-1)
                activated = F.silu(gate).mul_(up).numpy()
            delta = multiply(activated, layer.down)
        np.add(residual, delta, out=residual)
        return x

    def _sdpa(self, queries, keys, values, mask) -> torch.Tensor:
        """SDPA of one segment's queries [rows, heads, T, head_dim] over its cache views, GQA in the kernel;
        returns [rows * T, heads * head_dim], the layout the output projection takes."""
        rows, heads, length, head_dim = queries.shape
        attention = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=self.kv_heads != heads
        )
        return attention.transpose(1, 2).reshape(rows * length, heads * head_dim)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True: may attend) as SDPA's additive one: 0 there, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """LLaMA's RMSNorm as Hugging Face computes it (in float32, the weight applied in the input's dtype), in
    five operations: `F.rms_norm` on CPU is a composite of a dozen (dtype round trips included)."""
    hidden = x if x.dtype == torch.float32 else x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * hidden.to(x.dtype)


class _Layer:
    """One decoder layer's prepared weights and pieces, read from the modules cpu_kernels swapped in."""

    def __init__(self, layer: torch.nn.Module):
        attention, mlp = layer.self_attn, layer.mlp
        q, gate = attention.q_proj, mlp.gate_proj
        if not (isinstance(q, Projection) and isinstance(gate, Projection)):
            raise TypeError("LeanLlamaForward needs a model whose kernels cpu_kernels swapped")
        o, down = attention.o_proj, mlp.down_proj
        assert isinstance(o, PackedLinear) and isinstance(down, PackedLinear)
        self.qkv: PreparedWeight = q.shared.packed
        self.qkv_width = sum(q.shared.sizes)
        self.o, self.hidden = o.packed, o.out_features
        self.gate_up: PreparedWeight = gate.shared.packed
        self.intermediate = gate.shared.sizes[0]
        self.down = down.packed
        self.act = mlp.act_fn
        self.silu = isinstance(self.act, torch.nn.SiLU) or type(self.act).__name__ == "SiLUActivation"
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        # What the fused kernels take: the norms' weights as float32 arrays (views of the parameters).
        self.input_weight = self.input_norm.weight.detach().numpy()
        self.post_weight = self.post_norm.weight.detach().numpy()
        self.input_eps = float(self.input_norm.variance_epsilon)
        self.post_eps = float(self.post_norm.variance_epsilon)
