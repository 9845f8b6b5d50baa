"""Streaming delta apply/make against the naive full-RAM reference method, on real tiny LLaMA files."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models import derive_finetuned, load_state, naive_apply, naive_make, save_tiny_llama
from wombat_core.atomic import PARTIAL_MARK
from wombat_core.delta import DeltaOptions, apply_delta, make_delta
from wombat_core.errors import AlreadyExists, Cancelled, TensorMismatch, VocabMismatch
from wombat_core.jobs import JobControl
from wombat_core.manifest import verify_directory


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert actual[name].shape == expected[name].shape, name
        assert torch.equal(bits(actual[name]), bits(expected[name])), f"{name} differs"


def no_partials(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if PARTIAL_MARK in p.name]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single-file"])
def test_round_trip_is_bit_identical_to_full_ram_reference(tmp_path, dtype, sharded):
    base = save_tiny_llama(tmp_path / "base", seed=1, dtype=dtype, max_shard_size="5KB" if sharded else None)
    target = derive_finetuned(base, tmp_path / "target", seed=2)
    options = DeltaOptions(dtype=dtype)

    made = make_delta(base, target, tmp_path / "delta", options)
    base_state, target_state = load_state(base), load_state(target)
    assert_bit_identical(load_state(tmp_path / "delta"), naive_make(base_state, target_state, dtype))

    applied = apply_delta(base, tmp_path / "delta", tmp_path / "out", options)
    out_state = load_state(tmp_path / "out")
    assert_bit_identical(out_state, naive_apply(base_state, load_state(tmp_path / "delta"), dtype))
    # The multiplicative fine-tune keeps weights within a factor of 2 of the base, so the round trip is exact.
    assert made.inexact_elements == 0
    assert_bit_identical(out_state, {k: v.to(dtype) for k, v in target_state.items()})
    # Output sharding follows the delta's, which follows the target's (one file here).
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 1
    assert applied.manifest.kind == "materialize" and not applied.already_materialized
    assert verify_directory(tmp_path / "out").ok


def test_sharded_delta_gives_sharded_output_with_index(tmp_path):
    base = save_tiny_llama(tmp_path / "base", seed=1, max_shard_size="5KB")
    target = save_tiny_llama(tmp_path / "target", seed=3, max_shard_size="5KB")
    make_delta(base, target, tmp_path / "delta")
    apply_delta(base, tmp_path / "delta", tmp_path / "out")
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert_bit_identical(
        load_state(tmp_path / "out"), naive_apply(load_state(base), load_state(tmp_path / "delta"))
    )


def test_reference_float16_default_casts_float32_inputs(tmp_path):
    base = save_tiny_llama(tmp_path / "base", seed=1, dtype=torch.float32)
    target = derive_finetuned(base, tmp_path / "target", seed=2)
    make_delta(base, target, tmp_path / "delta")  # default options: float16 like the reference
    delta = load_state(tmp_path / "delta")
    assert {t.dtype for t in delta.values()} == {torch.float16}
    apply_delta(base, tmp_path / "delta", tmp_path / "out")
    assert_bit_identical(load_state(tmp_path / "out"), naive_apply(load_state(base), delta, torch.float16))


def test_pad_row_of_base_is_zero_before_adding(tmp_path, tiny_models):
    make_delta(tiny_models / "base", tiny_models / "target", tmp_path / "delta")
    delta = load_state(tmp_path / "delta")
    target = load_state(tiny_models / "target")
    # base row 32 does not exist and counts as zero, so the delta's [PAD] row equals the target's.
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert delta[name].shape[0] == 33
        assert torch.equal(bits(delta[name][32]), bits(target[name][32].half()))


def test_delta_copies_the_targets_config_and_tokenizer_files(tmp_path, tiny_models):
    (tiny_models / "target" / "tokenizer_config.json").write_text('{"pad_token": "[PAD]"}')
    make_delta(tiny_models / "base", tiny_models / "target", tmp_path / "delta")
    apply_delta(tiny_models / "base", tmp_path / "delta", tmp_path / "out")
    for name in ("config.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tiny_models / "target" / name).read_bytes()


def _rewrite(directory: Path, change) -> None:
    state = load_file(directory / "model.safetensors")
    change(state)
    (directory / "model.safetensors").unlink()
    save_file(state, directory / "model.safetensors")


def test_missing_tensor_names_the_tensor_and_writes_nothing(tmp_path, tiny_models):
    make_delta(tiny_models / "base", tiny_models / "target", tmp_path / "delta")
    _rewrite(tmp_path / "delta", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(TensorMismatch, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as info:
        apply_delta(tiny_models / "base", tmp_path / "delta", tmp_path / "out")
    assert "missing from the delta" in info.value.message
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)


def test_extra_tensor_is_refused(tmp_path, tiny_models):
    make_delta(tiny_models / "base", tiny_models / "target", tmp_path / "delta")
    _rewrite(
        tmp_path / "delta", lambda s: s.update({"model.extra.weight": torch.zeros(2, dtype=torch.float16)})
    )
    with pytest.raises(TensorMismatch, match=r"not in the base: model\.extra\.weight"):
        apply_delta(tiny_models / "base", tmp_path / "delta", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, tiny_models):
    make_delta(tiny_models / "base", tiny_models / "target", tmp_path / "delta")
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite(tmp_path / "delta", lambda s: s.update({name: torch.zeros(16, 8, dtype=torch.float16)}))
    with pytest.raises(TensorMismatch) as info:
        apply_delta(tiny_models / "base", tmp_path / "delta", tmp_path / "out")
    assert info.value.message == f"tensor {name}: base shape [16, 16] vs delta shape [16, 8]"
    assert info.value.metadata["tensor"] == name


def test_vocab_mismatch_without_padding_says_what_to_do(tmp_path, tiny_models):
    make_delta(tiny_models / "base", tiny_models / "target", tmp_path / "delta")
    with pytest.raises(VocabMismatch) as info:
        apply_delta(tiny_models / "base", tmp_path / "delta", tmp_path / "out", DeltaOptions(pad_vocab=False))
    message = info.value.message
    assert "32 rows in the base but 33 in the delta" in message
    assert "[PAD]" in message and "--no-pad-vocab" in message


def test_base_that_already_has_the_pad_row_is_refused_with_advice(tmp_path, tiny_models):
    make_delta(tiny_models / "base", tiny_models / "target", tmp_path / "delta")
    # Passing the fine-tuned model (33 rows) as the base of a 32-row delta is the classic mistake.
    make_delta(tiny_models / "base", tiny_models / "base", tmp_path / "zero-delta")
    with pytest.raises(VocabMismatch) as info:
        apply_delta(tiny_models / "target", tmp_path / "zero-delta", tmp_path / "out")
    assert "33 rows in the base but only 32" in info.value.message
    assert "original LLaMA-7B" in info.value.message


def test_second_run_is_a_no_op_and_other_inputs_are_refused(tmp_path, tiny_models):
    make_delta(tiny_models / "base", tiny_models / "target", tmp_path / "delta")
    first = apply_delta(tiny_models / "base", tmp_path / "delta", tmp_path / "out")
    mtime = (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns
    second = apply_delta(tiny_models / "base", tmp_path / "delta", tmp_path / "out")
    assert second.already_materialized and second.manifest == first.manifest
    assert (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(AlreadyExists, match="other inputs or options"):
        apply_delta(
            tiny_models / "base", tmp_path / "delta", tmp_path / "out", DeltaOptions(dtype=torch.float32)
        )


def test_cancellation_leaves_no_output(tmp_path, tiny_models):
    make_delta(tiny_models / "base", tiny_models / "target", tmp_path / "delta")
    cancel = threading.Event()

    def on_progress(progress):
        if progress.tensors_done >= 3:
            cancel.set()

    control = JobControl(on_progress, cancel, interval=0)
    with pytest.raises(Cancelled):
        apply_delta(tiny_models / "base", tmp_path / "delta", tmp_path / "out", control=control)
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)
    apply_delta(tiny_models / "base", tmp_path / "delta", tmp_path / "out")  # and a rerun completes
    assert verify_directory(tmp_path / "out").ok


def test_progress_reports_tensors_and_bytes(tmp_path, tiny_models):
    events = []
    make_delta(
        tiny_models / "base",
        tiny_models / "target",
        tmp_path / "delta",
        control=JobControl(events.append, interval=0),
    )
    assert events[0].tensors_done == 0 and events[-1].tensors_done == events[-1].tensors_total > 0
    assert (
        events[-1].bytes_done
        == events[-1].bytes_total
        == sum(t.numel() * t.element_size() for t in load_state(tmp_path / "delta").values())
    )
    assert [e.bytes_done for e in events] == sorted(e.bytes_done for e in events)
