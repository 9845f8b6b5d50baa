"""Streaming safetensors I/O against the official library, corrupt files, and safe `.bin` handling."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.malicious import CreatesFileWhenUnpickled
from tests.models import load_state, save_tiny_llama
from wombat_core.checkpoint.layout import Checkpoint, WeightFormat
from wombat_core.checkpoint.safetensors_io import SafetensorsFile, StreamingSafetensorsWriter, TensorSpec
from wombat_core.delta import convert_checkpoint
from wombat_core.errors import CheckpointFormatError, NotFound, PathOutsideRoot, UnsafeCheckpoint

TENSORS = {
    "a.weight": torch.randn(3, 5, dtype=torch.float32),
    "b.weight": torch.randn(7, dtype=torch.float32).to(torch.bfloat16),
    "c.half": torch.randn(2, 2, 2, dtype=torch.float16),
    "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "e.empty": torch.zeros(0, 4, dtype=torch.float16),
    "f.scalar": torch.tensor(1.5, dtype=torch.float32),
}


def test_streaming_writer_output_is_read_by_the_official_library(tmp_path):
    path = tmp_path / "x.safetensors"
    writer = StreamingSafetensorsWriter(
        path, [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in TENSORS.items()]
    )
    for name, tensor in TENSORS.items():
        writer.write(name, tensor)
    digest = writer.finish()
    import hashlib

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(TENSORS)
        for name, tensor in TENSORS.items():
            assert torch.equal(f.get_tensor(name), tensor)


def test_reader_reads_official_files(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(TENSORS, path)
    with SafetensorsFile(path) as f:
        for name, tensor in TENSORS.items():
            assert torch.equal(f.read(name), tensor)


def test_writer_refuses_out_of_order_or_wrong_shape(tmp_path):
    writer = StreamingSafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("a", torch.float16, (2,))])
    with pytest.raises(ValueError, match="expected tensor a"):
        writer.write("a", torch.zeros(3, dtype=torch.float16))
    writer.abort()


def _corrupt(tmp_path: Path, mutate) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, path)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(mutate(data)))
    return path


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d[: len(d) - 10], "truncated"),
        (lambda d: d[:5], "shorter than the 8-byte header"),
        (lambda d: struct.pack("<Q", 10**12) + d[8:], "does not fit"),
        (lambda d: d[:8] + b"\xff" * 8 + d[16:], "not UTF-8 JSON"),
        (lambda d: d + b"extra", "file has"),
    ],
    ids=["truncated-data", "truncated-header", "huge-header-length", "garbage-header", "trailing-bytes"],
)
def test_corrupt_files_fail_clearly(tmp_path, mutate, expected):
    path = _corrupt(tmp_path, mutate)
    with pytest.raises(CheckpointFormatError, match=expected):
        SafetensorsFile(path)


def test_overlapping_offsets_are_refused(tmp_path):
    import json

    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}  # fmt: skip
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 12)
    with pytest.raises(CheckpointFormatError, match="starts at byte"):
        SafetensorsFile(path)


def test_pickle_named_safetensors_is_refused_with_advice(tmp_path):
    torch.save(TENSORS, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointFormatError) as info:
        Checkpoint.open(tmp_path).tensors  # noqa: B018
    assert info.value.reason == "PICKLE_NOT_SAFETENSORS"
    assert "wombat convert" in info.value.message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_bin_is_refused_and_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    source = tmp_path / "evil"
    source.mkdir()
    with open(source / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.weight": CreatesFileWhenUnpickled(marker)}, f)
    with pytest.raises(UnsafeCheckpoint, match="weights_only=True"):
        convert_checkpoint(source, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_convert_bin_shards_to_safetensors(tmp_path):
    base = save_tiny_llama(tmp_path / "st", seed=4)
    state = load_state(base)
    source = tmp_path / "bin"
    source.mkdir()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}  # fmt: skip
    import json

    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, source / file)
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (source / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (source / "config.json").write_text((base / "config.json").read_text())
    assert Checkpoint.open(source).format is WeightFormat.PYTORCH_BIN

    outcome = convert_checkpoint(source, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    converted = load_state(out)
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    assert (out / "config.json").exists() and outcome.manifest.kind == "convert"


def test_index_naming_a_file_outside_the_directory_is_refused(tmp_path):
    import json

    root = tmp_path / "root"
    model = root / "m"
    model.mkdir(parents=True)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../secret"}}))
    with pytest.raises(CheckpointFormatError, match="not a plain file name"):
        Checkpoint.open(model, confine_to=root)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "link.safetensors"}}))
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (model / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(PathOutsideRoot):
        Checkpoint.open(model, confine_to=root.resolve())


def test_missing_directory_and_missing_shard(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        Checkpoint.open(tmp_path / "nope", role="base")
    base = save_tiny_llama(tmp_path / "base", seed=1, max_shard_size="5KB")
    next(base.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(NotFound, match="is missing"):
        Checkpoint.open(base, role="base")
