"""The CPU kernel swap (numba's compiled matmul, OpenBLAS or oneDNN-packed weights, shared-input
projections) and the lean forward on it (cpu_forward.py) compute what the plain Hugging Face model
computes."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from tests.models import tiny_config
from wombat_core.engine import cpu_fused, cpu_matmul
from wombat_core.engine.cpu_forward import LeanLlamaForward
from wombat_core.engine.cpu_kernels import (
    KERNELS,
    PackedLinear,
    Projection,
    default_float32_kernels,
    supported,
    use_packed_kernels,
    use_threads,
)
from wombat_core.engine.runner import ModelRunner


@pytest.fixture(scope="module")
def plain():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(vocab_size=300, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()  # fmt: skip


@pytest.mark.parametrize("kernels", KERNELS)
def test_packed_model_gives_the_plain_models_logits(plain, kernels):
    packed = copy.deepcopy(plain)
    assert use_packed_kernels(packed, kernels=kernels)
    assert isinstance(packed.lm_head, PackedLinear) and isinstance(
        packed.model.layers[0].self_attn.k_proj, Projection
    )
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (3, 17))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, :5] = 0  # a left-padded row
    with torch.no_grad():
        for width in (17, 4, 1):  # 51 token rows, 12, and 3
            expected = plain(input_ids=ids[:, :width], attention_mask=mask[:, :width]).logits
            got = packed(input_ids=ids[:, :width], attention_mask=mask[:, :width]).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, cpu_matmul.CHUNK_ROWS, 2 * cpu_matmul.CHUNK_ROWS + 3])
def test_the_compiled_matmul_computes_what_torch_computes(rows):
    """Every kernel, register block and remainder: one row (8-output blocks), 4-row blocks and the rows
    left over, chunks of CHUNK_ROWS, full and partial output blocks (576, 577 outputs) and a single
    output; against float64 torch."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=generator)
    for outputs in (576, 577, 1):
        weight = torch.randn(outputs, 96, generator=generator)
        got = torch.from_numpy(cpu_matmul.matmul(x.numpy(), weight.numpy()))
        torch.testing.assert_close(got, (x.double() @ weight.double().T).float(), rtol=1e-5, atol=1e-5)


def test_the_multi_row_kernel_prefetches_the_next_weight_block():
    """The prefetch (cpu_matmul's docstring: 10-13 % at 2-32 rows) is in the compiled code, not lost to a
    refactor or to LLVM. A fresh, uncached compilation of the same function, since numba does not show
    the code it loaded from its cache."""
    import numba
    import numpy as np

    fresh = numba.njit(parallel=True, fastmath={"reassoc", "contract"})(cpu_matmul._rows.py_func)
    fresh(np.ones((5, 32), np.float32), np.ones((10, 32), np.float32))
    assert "@llvm.prefetch" in "".join(fresh.inspect_llvm().values())


def test_checking_the_compiled_kernels_launches_no_threads():
    """`available()` runs on the loading thread; a launch there would give that thread an OpenMP team of
    its own and slow the engine thread's launches (cpu_matmul's docstring). numba's threading layer is
    chosen at the first launch, so none may have been chosen after the check."""
    code = (
        "import numba\n"
        "from wombat_core.engine import cpu_kernels, cpu_matmul\n"
        "assert cpu_matmul.available() and cpu_kernels.default_float32_kernels() in ('numba', 'onednn')\n"
        "try:\n"
        "    print(numba.threading_layer())\n"
        "except ValueError:\n"
        "    print('no launch')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "no launch"


def test_the_compiled_matmul_lets_nan_through():
    """fastmath here only reorders sums: a NaN in the input must reach the output (the engine fails a
    request on NaN logits rather than sampling from them)."""
    x = torch.ones(2, 8)
    x[1, 3] = float("nan")
    got = torch.from_numpy(cpu_matmul.matmul(x.numpy(), torch.ones(9, 8).numpy()))
    assert not got[0].isnan().any() and got[1].isnan().all()
    assert torch.from_numpy(cpu_matmul.matmul(x[1:].numpy(), torch.ones(9, 8).numpy())).isnan().all()


def test_the_swap_applies_only_where_it_is_made_for(plain):
    assert supported(plain)
    assert not supported(copy.deepcopy(plain).half())  # float16 matmuls are not what oneDNN packs here
    with_bias = copy.deepcopy(plain)
    with_bias.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 64, bias=True)
    assert not supported(with_bias) and not use_packed_kernels(with_bias)


def test_threads_sharing_one_packed_model_get_their_own_results(plain):
    """The engine thread and another (a test's reference run, a scorer) may run the same model at once."""
    import threading

    packed = copy.deepcopy(plain)
    use_packed_kernels(packed)
    torch.manual_seed(2)
    inputs = [torch.randint(0, 300, (1 + n, 5 + n)) for n in range(4)]
    with torch.no_grad():
        expected = [plain(input_ids=ids).logits for ids in inputs]
    failures = []

    def run(ids: torch.Tensor, reference: torch.Tensor) -> None:
        with torch.no_grad():
            for _ in range(20):
                try:
                    if not torch.allclose(packed(input_ids=ids).logits, reference, rtol=1e-5, atol=1e-5):
                        failures.append(f"{tuple(ids.shape)}: wrong logits")
                except RuntimeError as exc:  # another thread's projection, of another shape
                    failures.append(f"{tuple(ids.shape)}: {exc}")

    threads = [threading.Thread(target=run, args=pair) for pair in zip(inputs, expected, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


@pytest.mark.parametrize("fused", [True, False], ids=["fused kernels", "PyTorch operations"])
def test_the_lean_forward_gives_the_model_forwards_logits_through_the_runner(plain, fused, monkeypatch):
    """A left-padded group prefilled in two chunks, decode steps, then a newcomer's prefill chunks in the
    same steps as the running rows' decode (one forward on the lean path, two on the model's own), on the
    plain model and on the swapped one, fed the same tokens: the same logits at every step; with the small
    operations as cpu_fused's compiled kernels and as PyTorch operations."""
    monkeypatch.setenv("WOMBAT_FUSED_KERNELS", "1" if fused else "0")
    packed = copy.deepcopy(plain)
    use_packed_kernels(packed)
    reference, lean = ModelRunner(plain, 0, 6, 64), ModelRunner(packed, 0, 6, 64)
    assert isinstance(lean._lean, LeanLlamaForward) and reference._lean is None
    assert lean._lean.fused is fused
    torch.manual_seed(3)
    prompts = [tuple(torch.randint(1, 300, (n,)).tolist()) for n in (9, 4, 13)]
    newcomers = [tuple(torch.randint(1, 300, (n,)).tolist()) for n in (6, 11)]
    logits = []
    for runner in (reference, lean):
        group = runner.new_group(prompts, max_new_tokens=8)
        assert runner.prefill_chunk(group, max_tokens=3 * 7) is None  # two chunks: 7 then 6 columns
        steps = [runner.prefill_chunk(group, max_tokens=3 * 7)]
        runner.complete_group(group, [0, 1, 2])
        for _ in range(3):
            runner.set_last_tokens(0, steps[-1][:3].argmax(-1))
            steps.append(runner.decode())
        second = runner.new_group(newcomers, max_new_tokens=8)
        for _ in range(2):  # chunks of 6 then 5 columns, each with a decode step of the 3 running rows
            runner.set_last_tokens(0, steps[-1][:3].argmax(-1))
            step = runner.step(second, max_prefill_tokens=2 * 6)
            steps.append(step.decode)
        steps.append(step.prefill)
        runner.complete_group(second, [0, 1])
        runner.set_last_tokens(0, steps[-2].argmax(-1))
        runner.set_last_tokens(3, steps[-1].argmax(-1))
        steps.append(runner.decode())
        logits.append(torch.cat(steps))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", ["numba", "openblas"])
def test_blas_kernels_take_the_threads_and_torch_runs_single_threaded(plain, kernels):
    from threadpoolctl import threadpool_info

    packed = copy.deepcopy(plain)
    use_packed_kernels(packed, kernels=kernels)
    before = torch.get_num_threads()
    try:
        cpu_matmul.set_threads(2 if kernels == "openblas" else 1)
        use_threads(packed, 2)
        assert torch.get_num_threads() == 1
        assert {pool["num_threads"] for pool in threadpool_info() if pool["internal_api"] == "openblas"} == {
            2
        }
        assert cpu_matmul.numba.get_num_threads() == (2 if kernels == "numba" else 1)
    finally:
        torch.set_num_threads(before)


def test_the_float32_kernels_follow_the_cpu_and_the_override(plain, monkeypatch):
    monkeypatch.delenv("WOMBAT_CPU_KERNELS", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert default_float32_kernels() == "onednn"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert default_float32_kernels() == "numba"
    packed = copy.deepcopy(plain)
    use_packed_kernels(packed)
    assert packed.wombat_cpu_kernels == "numba"
    monkeypatch.setenv("WOMBAT_FUSED_KERNELS", "0")  # compiled kernels off: OpenBLAS alone
    assert default_float32_kernels() == "openblas"
    with pytest.raises(ValueError, match="numba kernels need numba with an OpenMP or TBB threading layer"):
        use_packed_kernels(copy.deepcopy(plain), kernels="numba")
    monkeypatch.setenv("WOMBAT_CPU_KERNELS", "onednn")
    assert default_float32_kernels() == "onednn"
    monkeypatch.setenv("WOMBAT_CPU_KERNELS", "mkl")
    with pytest.raises(ValueError, match="WOMBAT_CPU_KERNELS must be one of numba, openblas, onednn"):
        default_float32_kernels()


def test_the_fused_kernels_compute_what_hugging_faces_modules_compute():
    """cpu_fused's kernels against the modules they stand in for: LlamaRMSNorm after a residual add, SiLU
    times up, and apply_rotary_pos_emb with the keys and values landing in the cache where a plan says."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    torch.manual_seed(0)
    tokens, hidden, heads, kv_heads, head_dim = 5, 48, 4, 2, 16
    x, delta = torch.randn(tokens, hidden), torch.randn(tokens, hidden)
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    norm.weight.data = torch.randn(hidden)
    stream = x.clone().numpy()
    normed = cpu_fused.add_rms_norm(stream, delta.numpy(), norm.weight.detach().numpy(), 1e-5)
    torch.testing.assert_close(torch.from_numpy(stream), x + delta)  # the residual stream, updated in place
    torch.testing.assert_close(torch.from_numpy(normed), norm(x + delta).detach())
    alone = cpu_fused.add_rms_norm(x.numpy().copy(), None, norm.weight.detach().numpy(), 1e-5)
    torch.testing.assert_close(torch.from_numpy(alone), norm(x).detach())

    gate_up = torch.randn(tokens, 2 * hidden)
    expected = torch.nn.functional.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]
    torch.testing.assert_close(torch.from_numpy(cpu_fused.silu_mul(gate_up.numpy(), hidden)), expected)

    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    angles = torch.randn(tokens, head_dim // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    keys, values = torch.zeros(3, kv_heads, 8, head_dim), torch.zeros(3, kv_heads, 8, head_dim)
    slots, columns = torch.tensor([2, 2, 0, 1, 1]), torch.tensor([0, 1, 5, 7, 3])
    queries = cpu_fused.rotary_write(qkv.numpy(), cos.numpy(), sin.numpy(), heads, kv_heads, keys.numpy(),
                                     values.numpy(), slots.numpy(), columns.numpy())  # fmt: skip
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim).transpose(0, 1)  # [heads, tokens, d]
    k = (
        qkv[:, heads * head_dim : (heads + kv_heads) * head_dim]
        .view(tokens, kv_heads, head_dim)
        .transpose(0, 1)
    )
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    q_rotated, k_rotated = apply_rotary_pos_emb(q[None], k[None], cos[None], sin[None])
    torch.testing.assert_close(torch.from_numpy(queries), q_rotated[0].transpose(0, 1))
    torch.testing.assert_close(keys[slots, :, columns], k_rotated[0].transpose(0, 1))
    torch.testing.assert_close(values[slots, :, columns], v)
    untouched = torch.ones(3, 8, dtype=torch.bool)
    untouched[slots, columns] = False
    assert (
        keys.transpose(1, 2)[untouched].abs().sum() == 0
        and values.transpose(1, 2)[untouched].abs().sum() == 0
    )


@pytest.mark.parametrize("split", [False, True], ids=["on the calling thread", "split over the cores"])
def test_decode_attention_over_the_cache_equals_sdpa_with_the_runners_mask(split, monkeypatch):
    """Rows with their own spans of columns (left padding, different lengths) and GQA heads: the kernel
    over the cache storage gives what SDPA gives on the cache's views with a mask of those spans."""
    monkeypatch.setattr(cpu_fused, "SPLIT_ATTENTION_MIN_ROWS", 1 if split else 100)
    torch.manual_seed(1)
    slots, kv_heads, capacity, head_dim, heads = 4, 2, 32, 16, 6
    keys, values = (
        torch.randn(slots, kv_heads, capacity, head_dim),
        torch.randn(slots, kv_heads, capacity, head_dim),
    )
    queries = torch.randn(3, heads, head_dim)
    firsts, lasts = torch.tensor([0, 5, 2]), torch.tensor([20, 20, 9])
    columns = torch.arange(21)
    mask = (columns[None, :] >= firsts[:, None]) & (columns[None, :] <= lasts[:, None])  # [rows, columns]
    expected = torch.nn.functional.scaled_dot_product_attention(
        queries[:, :, None], keys[:3, :, :21], values[:3, :, :21], attn_mask=mask[:, None, None], scale=0.25,
        enable_gqa=True,
    )  # fmt: skip
    got = cpu_fused.decode_attention(queries.numpy(), keys.numpy(), values.numpy(), torch.arange(3).numpy(),
                                     firsts.numpy(), lasts.numpy(), 0.25)  # fmt: skip
    torch.testing.assert_close(torch.from_numpy(got), expected[:, :, 0].reshape(3, heads * head_dim))
