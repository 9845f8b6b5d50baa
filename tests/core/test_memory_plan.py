"""The training memory plan: the arithmetic for LLaMA-7B, the configurations it suggests, and its estimate
against the measured peak memory of real CPU workers."""

from __future__ import annotations

from importlib import resources

import pytest

from wombat_core.rrhf.memory_plan import GIB, ModelShape, estimate, plan_with_suggestion
from wombat_core.rrhf.training import TrainingConfig

SHIPPED = resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl"


@pytest.fixture(scope="module")
def llama_7b():
    from transformers import LlamaConfig

    # LLaMA-7B with Alpaca's [PAD] row (32001), as Wombat-7B is.
    config = LlamaConfig(vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)  # fmt: skip
    return ModelShape.from_config(config)


def test_parameters_are_counted_on_the_meta_device(llama_7b):
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # attention, MLP, two norms
    assert llama_7b.largest_layer == layer
    assert llama_7b.parameters == 32 * layer + 2 * 32001 * 4096 + 4096  # + embeddings, LM head, final norm
    assert round(llama_7b.parameters / 1e9, 2) == 6.74


def test_the_wombat_recipe_fits_80gb_gpus_and_the_old_ddp_default_does_not(llama_7b):
    fsdp = plan_with_suggestion(llama_7b, TrainingConfig(num_workers=8), use_gpu=True, responses_per_query=4,
                                device_memory_bytes=80 * GIB)  # fmt: skip
    items = dict(fsdp.items)
    p = llama_7b.parameters
    # Weights, gradients and AdamW's moments in fp32, sharded 8 ways: 16 bytes a parameter / 8.
    assert items["fp32 weights"] + items["fp32 gradients"] + items["AdamW moments (fp32)"] == 2 * p
    assert fsdp.fits and fsdp.per_device_bytes < 40 * GIB and fsdp.suggestion == ""
    assert fsdp.host_load_bytes == 2 * p  # read in bf16 before sharding

    # The RayJob's old default: DDP on 4 GPUs, a full fp32 replica with gradients, buckets and AdamW each.
    ddp = plan_with_suggestion(llama_7b, TrainingConfig(strategy="ddp", num_workers=4), use_gpu=True,
                               responses_per_query=4, device_memory_bytes=141 * GIB)  # fmt: skip
    assert not ddp.fits and ddp.per_device_bytes > 141 * GIB
    assert dict(ddp.items)["DDP gradient buckets"] == 4 * p
    assert ddp.suggestion == "--strategy fsdp"
    assert estimate(llama_7b, TrainingConfig(num_workers=4), use_gpu=True, responses_per_query=4,
                    device_memory_bytes=141 * GIB).fits  # fmt: skip

    # One 80 GB GPU cannot hold 7B with AdamW however it is configured: more workers is the answer.
    one = plan_with_suggestion(llama_7b, TrainingConfig(num_workers=1), use_gpu=True, responses_per_query=4,
                               device_memory_bytes=80 * GIB)  # fmt: skip
    assert not one.fits and one.suggestion == "--workers 2 --gradient-checkpointing"


def test_gradient_checkpointing_shrinks_the_activations(llama_7b):
    plain = dict(estimate(llama_7b, TrainingConfig(num_workers=8), use_gpu=True, responses_per_query=4,
                          device_memory_bytes=80 * GIB).items)  # fmt: skip
    checkpointed = dict(estimate(llama_7b, TrainingConfig(num_workers=8, gradient_checkpointing=True), use_gpu=True,
                                 responses_per_query=4, device_memory_bytes=80 * GIB).items)  # fmt: skip
    assert checkpointed["activations"] < plain["activations"] / 5


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_the_estimate_is_within_25_percent_of_the_measured_peak_of_cpu_workers(strategy, tmp_path):
    """Two gloo workers train a 25M-parameter LLaMA (big enough that its weights, gradients and AdamW state,
    not the Python runtime, are most of the memory); each worker's peak RSS is set against the plan."""
    from tests.distributed import train_and_measure
    from tests.engine_fixtures import save_servable_tiny_model
    from wombat_core.rrhf.collate import collate_record
    from wombat_core.rrhf.data import load_jsonl
    from wombat_core.rrhf.trainer import TrainingRun
    from wombat_core.tokenizer import load_tokenizer

    model = save_servable_tiny_model(tmp_path / "model", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                     num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    records = tuple(load_jsonl(SHIPPED))
    config = TrainingConfig(num_workers=2, gradient_accumulation_steps=1, max_steps=2, strategy=strategy,
                            precision="fp32")  # fmt: skip
    tokenizer = load_tokenizer(model, padding_side="right")
    groups = [collate_record(tokenizer, r, config.collation).input_ids.shape for r in records]
    shape = ModelShape.from_directory(model)
    assert shape.parameters > 25_000_000
    plan = estimate(shape, config, use_gpu=False, responses_per_query=max(g[0] for g in groups),
                    device_memory_bytes=64 * GIB, sequence_length=max(g[1] for g in groups))  # fmt: skip
    _, peaks = train_and_measure(
        TrainingRun(model, records, config, tmp_path / "ckpt", tmp_path / "out", "out"), 2
    )
    ratios = [plan.per_device_bytes / peak for peak in peaks]
    assert all(0.75 <= r <= 1.25 for r in ratios), (ratios, plan.items, peaks)
