"""Every tensor the engine makes lives on the model's device, checked without a GPU.

The model runs under FakeTensorMode with fake parameters on a device other than the CPU, and the runner,
the KV cache and the sampler do a whole round with it: a chunked prefill, sampling with every parameter,
decode steps, a row leaving. FakeTensorMode raises as soon as a tensor on one device meets a tensor on
another, as CUDA does, so a stray CPU tensor (an index, a mask, a parameter row) fails this test.

The fake device is `meta`, not `cuda`: on a CPU-only build, indexing a fake *cuda* tensor needs CUDA's
device guard, which the build lacks, while meta's exists. FakeTensorMode checks devices the same way for
both. Two things it does not check are checked here explicitly: random generators (the sampler must
hold none, or one on the device) and the host transfer, which happens once per step in `to_host`.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from tests.models import tiny_config
from wombat_core.engine.kv_cache import compaction_moves
from wombat_core.engine.runner import ModelRunner
from wombat_core.engine.sampler import BatchSampler, SamplingRow
from wombat_core.engine.sampling import SamplingParams

VOCAB = 64
PROMPTS = [(1, 5, 6, 7, 8, 9), (1, 9), (1, 4, 4)]
ROWS = [
    SamplingParams(
        temperature=0.8,
        top_k=5,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.2,
        min_new_tokens=2,
        stop_token_ids=(11,),
        logprobs=True,
        top_logprobs=2,
        seed=3,
    ),  # fmt: skip
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.1, top_p=0.5, logprobs=True),
]


@pytest.fixture
def fake():
    """(mode, model): a tiny LLaMA whose parameters and buffers are fake tensors on the meta device."""
    from transformers import LlamaForCausalLM

    mode = FakeTensorMode()
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config(vocab_size=VOCAB, max_position_embeddings=64)).eval()
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                module._parameters[name] = torch.nn.Parameter(
                    mode.from_tensor(parameter), requires_grad=False
                )
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = mode.from_tensor(buffer)
    return mode, model


def test_prefill_sampling_decode_and_leaving_stay_on_the_models_device(fake):
    mode, model = fake
    device = next(model.parameters()).device
    assert device.type == "meta"
    with mode:
        runner = ModelRunner(model, pad_token_id=0, slots=4, context_length=64)
        sampler = BatchSampler(4, VOCAB, device)
        group = runner.new_group(PROMPTS)
        assert runner.prefill_chunk(group, max_tokens=6) is None  # two chunks
        logits = runner.prefill_chunk(group, max_tokens=12)
        first = runner.complete_group(group, [0, 1, 2])
        sampler.add_rows(
            first,
            [SamplingRow(params, 7, prompt, (2,)) for params, prompt in zip(ROWS, PROMPTS, strict=True)],
        )
        outputs = [sampler.sample(logits, slice(first, first + 3))]
        runner.set_last_tokens(first, outputs[-1].tokens)
        for _ in range(3):
            logits = runner.decode()
            outputs.append(sampler.sample(logits, slice(0, runner.rows)))
            runner.set_last_tokens(0, outputs[-1].tokens)
        moves = compaction_moves(3, [0])
        runner.move_rows(moves, 2)
        sampler.move_rows(moves)
        logits = runner.decode()
        outputs.append(sampler.sample(logits, slice(0, 2)))
        processed = sampler.processed_scores(logits, slice(0, 2))
    tensors = [processed, *runner.cache.keys, *runner.cache.values]
    tensors += [t for output in outputs for t in (output.tokens, output.packed_logprobs) if t is not None]
    tensors += [t for t in vars(sampler).values() if isinstance(t, torch.Tensor)]
    assert {t.device for t in tensors} == {device}
    generators = [value for value in vars(sampler).values() if isinstance(value, torch.Generator)]
    assert all(generator.device == device for generator in generators)


def test_a_stray_cpu_tensor_is_caught(fake):
    """The check itself works: a CPU index or a CPU parameter row meeting the model's tensors raises."""
    mode, model = fake
    device = next(model.parameters()).device
    with mode:
        scores = torch.zeros(2, VOCAB, device=device)
        with pytest.raises(FakeTensorDeviceMismatchError):
            scores.index_fill(-1, torch.tensor([1, 2]), float("-inf"))  # the old per-row sampler did this
        sampler = BatchSampler(2, VOCAB, device)
        sampler.add_rows(0, [SamplingRow(ROWS[2], 1, (1, 2), (2,)), SamplingRow(ROWS[2], 2, (1, 3), (2,))])
        sampler.top_p = torch.full((2,), 0.5)  # as if a per-row parameter had been made on the CPU
        with pytest.raises(FakeTensorDeviceMismatchError):
            sampler.sample(scores, slice(0, 2))
