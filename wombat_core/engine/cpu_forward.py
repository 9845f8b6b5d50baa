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

It computes the model's function with the model's own pieces: its rotary embedding module (so any RoPE
scaling the config names applies), its activation, its epsilons and attention scaling, and the weights
cpu_kernels.py prepared. Float32 logits equal the Hugging Face forward's to ~1e-6 (tested), and the
engine's greedy ids equal HF `generate`'s (tested end to end).

It is used only where cpu_kernels swapped the model's modules (a CPU model of the LLaMA layout); every
other model, and every CUDA model, runs its own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wombat_core.engine.cpu_kernels import PackedLinear, PreparedWeight, Projection, linear


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

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 cache) -> torch.Tensor:  # fmt: skip
        """input_ids, position_ids: [rows, T]; mask: [rows, 1, T, columns] (True where a query may attend);
        `cache` prepared by the runner for this forward. Returns the logits of each row's last position,
        [rows, vocab], in the model's dtype."""
        rows, length = input_ids.shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        x = self.embed(input_ids)
        # SDPA turns a boolean mask into an additive one in every layer: once per forward is enough.
        mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        cos, sin = self.rotary(x, position_ids)  # [rows, T, head_dim]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over the heads of [rows, T, heads, d]
        half = head_dim // 2
        qk_width = (heads + kv_heads) * head_dim
        for index, layer in enumerate(self.layers):
            qkv = linear(rms_norm(x, layer.input_norm), layer.qkv, layer.qkv_width)
            qk = qkv[..., :qk_width].view(rows, length, heads + kv_heads, head_dim)
            rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)  # rotate_half, q and k at once
            qk = torch.addcmul(qk * cos, rotated, sin)
            queries = qk[:, :, :heads].transpose(1, 2)
            keys = qk[:, :, heads:].transpose(1, 2)
            values = qkv[..., qk_width:].view(rows, length, kv_heads, head_dim).transpose(1, 2)
            keys, values = cache.update(keys, values, index)
            attention = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=kv_heads != heads
            )
            attention = attention.transpose(1, 2).reshape(rows, length, heads * head_dim)
            x = x + linear(attention, layer.o, layer.hidden)
            gate_up = linear(rms_norm(x, layer.post_norm), layer.gate_up, 2 * layer.intermediate)
            gate, up = gate_up.split(layer.intermediate, dim=-1)
            x = x + linear(layer.act(gate) * up, layer.down, layer.hidden)
        last = rms_norm(x[:, -1, :], self.final_norm)
        return self.lm_head(last)


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
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
