"""Weight deltas, streamed shard by shard: apply (target = base + delta) and make (delta = target - base).

Faithful to the reference Wombat/FastChat `apply_delta` (REFERENCE.md §1), but without loading whole
models: the base's vocabulary tensors get zero rows appended for the `[PAD]` token (32000 -> 32001 for
LLaMA-7B), then every tensor is combined in the chosen dtype (float16 by default, as the reference does)
with the very same torch operation, so the bytes are identical to the full-RAM method. Peak memory is a
few tensors: each output tensor is computed from one base and one delta tensor and written at once.

Every name and shape is checked before anything is written, so a mismatch never leaves partial output.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from wombat_core.atomic import AtomicOutputDir
from wombat_core.checkpoint.layout import Checkpoint, TensorMeta, WeightFormat
from wombat_core.checkpoint.safetensors_io import StreamingSafetensorsWriter, TensorSpec
from wombat_core.dtypes import dtype_name
from wombat_core.errors import AlreadyExists, InvalidArgument, TensorMismatch, VocabMismatch
from wombat_core.jobs import JobControl
from wombat_core.manifest import InputFingerprint, Manifest, ManifestKind, fingerprint_files, read_manifest

log = logging.getLogger(__name__)

VOCAB_TENSOR_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")
# Rotary inverse frequencies are derived from the config, not learned; old LLaMA `.bin` files carry them,
# current transformers neither saves nor loads them, so they are left out of both sides.
DERIVED_BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class DeltaOptions:
    """How tensors are combined. The defaults are the reference's: float16 arithmetic, [PAD] rows padded."""

    dtype: torch.dtype = torch.float16
    pad_vocab: bool = True

    def __post_init__(self) -> None:
        dtype_name(self.dtype)  # raises for a dtype outside the table

    def as_manifest_options(self) -> dict[str, str]:
        return {"dtype": dtype_name(self.dtype), "pad_vocab": str(self.pad_vocab).lower()}


@dataclass(frozen=True)
class JobOutcome:
    path: Path
    manifest: Manifest
    already_materialized: bool
    elapsed_seconds: float
    inexact_elements: int = 0


@dataclass(frozen=True)
class _PlannedTensor:
    name: str
    spec: TensorSpec
    base_pad_rows: int


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(VOCAB_TENSOR_SUFFIXES)


def _learned(tensors: dict[str, TensorMeta]) -> dict[str, TensorMeta]:
    return {n: m for n, m in tensors.items() if not n.endswith(DERIVED_BUFFER_SUFFIXES)}


def _name_list(names: set[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _vocab_error(
    name: str, base_rows: int, other_rows: int, other_role: str, pad_vocab: bool
) -> VocabMismatch:
    meta = {"tensor": name, "base_rows": str(base_rows), f"{other_role}_rows": str(other_rows)}
    if other_rows > base_rows:
        # pad_vocab was switched off; the reference always pads.
        return VocabMismatch(
            f"{name} has {base_rows} rows in the base but {other_rows} in the {other_role}: the {other_role} was "
            f"made after adding the [PAD] token (LLaMA 32000 -> 32001 rows). Turn vocabulary padding back on "
            f"(drop --no-pad-vocab / set pad_vocab=true) so the base gets zero [PAD] rows first, as the "
            f"reference apply_delta does.",
            metadata=meta,
        )
    return VocabMismatch(
        f"{name} has {base_rows} rows in the base but only {other_rows} in the {other_role}: the base already "
        f"contains added tokens such as [PAD], so it is probably an already-materialised Wombat/Alpaca model "
        f"or a base with a different tokenizer. Use the original LLaMA-7B weights (32000 rows) as the base.",
        metadata=meta,
    )


def plan_tensors(
    base: Checkpoint, other: Checkpoint, other_role: str, options: DeltaOptions
) -> list[tuple[str, list[_PlannedTensor]]]:
    """Checks that `other` (delta or target) lines up with `base`; returns (source shard, output tensors).

    Output shards follow `other`'s sharding and tensor order.
    """
    base_tensors, other_tensors = _learned(base.tensors), _learned(other.tensors)
    missing = set(base_tensors) - set(other_tensors)
    if missing:
        raise TensorMismatch(
            f"{len(missing)} tensor(s) of the base are missing from the {other_role}: {_name_list(missing)}. "
            f"The {other_role} must contain every parameter of the base model; check that both are the same "
            f"architecture and size.",
            metadata={"tensor": sorted(missing)[0], "missing_count": str(len(missing))},
        )
    extra = set(other_tensors) - set(base_tensors)
    if extra:
        raise TensorMismatch(
            f"{len(extra)} tensor(s) of the {other_role} are not in the base: {_name_list(extra)}. "
            f"Check that the base is the model the {other_role} was made against.",
            metadata={"tensor": sorted(extra)[0], "extra_count": str(len(extra))},
        )
    by_shard: dict[str, list[_PlannedTensor]] = {}
    for name, meta in other_tensors.items():
        base_shape, shape = base_tensors[name].shape, meta.shape
        pad = 0
        if base_shape != shape:
            same_width = len(base_shape) == len(shape) and base_shape[1:] == shape[1:]
            if not (is_vocab_tensor(name) and same_width):
                raise TensorMismatch(
                    f"tensor {name}: base shape {list(base_shape)} vs {other_role} shape {list(shape)}",
                    metadata={
                        "tensor": name,
                        "base_shape": str(list(base_shape)),
                        f"{other_role}_shape": str(list(shape)),
                    },
                )
            if shape[0] < base_shape[0] or not options.pad_vocab:
                raise _vocab_error(name, base_shape[0], shape[0], other_role, options.pad_vocab)
            pad = shape[0] - base_shape[0]
        dtype = options.dtype if meta.dtype.is_floating_point else meta.dtype
        by_shard.setdefault(meta.shard, []).append(_PlannedTensor(name, TensorSpec(name, dtype, shape), pad))
    return [(s, by_shard[s]) for s in other.shards if s in by_shard]


def padded_base(base_tensor: torch.Tensor, pad_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """The base tensor in the arithmetic dtype, with `pad_rows` zero rows appended ([PAD] embedding rows)."""
    tensor = base_tensor.to(dtype) if base_tensor.is_floating_point() else base_tensor
    if pad_rows:
        tensor = torch.cat([tensor, tensor.new_zeros((pad_rows, *tensor.shape[1:]))])
    return tensor


def output_shard_name(source_shard: str) -> str:
    """Outputs are always safetensors; legacy shard names map to the HF safetensors names."""
    if source_shard.endswith(".bin"):
        return source_shard.removesuffix(".bin").replace("pytorch_model", "model", 1) + ".safetensors"
    return source_shard


def _fingerprint(role: str, checkpoint: Checkpoint, display: str) -> InputFingerprint:
    return fingerprint_files(role, display, [checkpoint.file(s) for s in checkpoint.shards])


def _existing_result(
    target: Path, kind: str, inputs: tuple[InputFingerprint, ...], options: dict[str, str], display: str
) -> Manifest | None:
    """The manifest of an identical earlier run, None when the target is free; AlreadyExists otherwise."""
    if not target.exists():
        return None
    manifest = read_manifest(target) if target.is_dir() else None
    if manifest is not None and manifest.same_job(kind, inputs, options):
        sizes_ok = all(
            (target / f.path).is_file() and (target / f.path).stat().st_size == f.size_bytes
            for f in manifest.files
        )
        if sizes_ok:
            return manifest
        raise AlreadyExists(
            f"{display!r} was materialised from these inputs but its files changed since; run verify, "
            f"then delete it and run again"
        )
    what = "was written from other inputs or options" if manifest else "exists and was not written by wombat"
    raise AlreadyExists(f"target {display!r} {what}; choose another target or delete it first")


def _write_combined(
    *,
    kind: str,
    out_dir: Path,
    aux_source: Checkpoint,
    inputs: tuple[InputFingerprint, ...],
    options: dict[str, str],
    shards: list[tuple[str, list[_PlannedTensor]]],
    compute: Callable[[_PlannedTensor], torch.Tensor],
    control: JobControl,
) -> Manifest:
    total_bytes = sum(t.spec.nbytes for _, planned in shards for t in planned)
    control.start(sum(len(planned) for _, planned in shards), total_bytes)
    with AtomicOutputDir(out_dir) as output:
        weight_map: dict[str, str] = {}
        for source_shard, planned in shards:
            shard_name = output_shard_name(source_shard)
            writer = StreamingSafetensorsWriter(output.path / shard_name, [t.spec for t in planned])
            try:
                for tensor_plan in planned:
                    control.check_cancelled()
                    writer.write(tensor_plan.name, compute(tensor_plan))
                    weight_map[tensor_plan.name] = shard_name
                    control.advance(shard_name, 1, tensor_plan.spec.nbytes)
                digest = writer.finish()
            except BaseException:
                writer.abort()
                raise
            output.record(shard_name, digest, writer.bytes_written)
        if len(shards) > 1:
            _write_index(output.path, weight_map, total_bytes)
        for name in aux_source.auxiliary_files():
            with aux_source.open_file(name) as source, open(output.path / name, "xb") as copy:
                shutil.copyfileobj(source, copy)
        control.check_cancelled()
        return output.commit(Manifest(kind=kind, inputs=inputs, options=options, files=()))


def _write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _run(
    kind: str,
    base_dir: Path,
    other_dir: Path,
    other_role: str,
    out_dir: Path,
    options: DeltaOptions,
    control: JobControl,
    displays: dict[str, str],
    confine_to: Path | None,
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    count_inexact: bool,
) -> JobOutcome:
    base = Checkpoint.open(base_dir, role="base", confine_to=confine_to)
    other = Checkpoint.open(other_dir, role=other_role, confine_to=confine_to)
    shards = plan_tensors(base, other, other_role, options)
    inputs = (
        _fingerprint("base", base, displays["base"]),
        _fingerprint(other_role, other, displays[other_role]),
    )
    manifest_options = options.as_manifest_options()
    existing = _existing_result(out_dir, kind, inputs, manifest_options, displays["output"])
    if existing is not None:
        log.info("%s is already materialised from the same inputs; nothing to do", displays["output"])
        return JobOutcome(out_dir, existing, True, control.elapsed)

    inexact = 0
    with base.reader() as base_reader, other.reader() as other_reader:

        def compute(planned: _PlannedTensor) -> torch.Tensor:
            nonlocal inexact
            b = padded_base(base_reader.read(planned.name), planned.base_pad_rows, planned.spec.dtype)
            o = other_reader.read(planned.name)
            o = o.to(planned.spec.dtype) if o.is_floating_point() else o
            result = combine(b, o)
            if count_inexact:  # would base + delta give the target back bit for bit?
                inexact += int(torch.count_nonzero((b + result) != o))
            return result

        manifest = _write_combined(
            kind=kind,
            out_dir=out_dir,
            aux_source=other,
            inputs=inputs,
            options=manifest_options,
            shards=shards,
            compute=compute,
            control=control,
        )
    return JobOutcome(out_dir, manifest, False, control.elapsed, inexact)


def apply_delta(
    base_dir: Path,
    delta_dir: Path,
    target_dir: Path,
    options: DeltaOptions = DeltaOptions(),
    control: JobControl | None = None,
    *,
    confine_to: Path | None = None,
    displays: dict[str, str] | None = None,
) -> JobOutcome:
    """target = base (+ zero [PAD] rows) + delta, written atomically with the delta's config/tokenizer files."""
    displays = displays or {"base": str(base_dir), "delta": str(delta_dir), "output": str(target_dir)}
    return _run(
        ManifestKind.MATERIALIZE, Path(base_dir), Path(delta_dir), "delta", Path(target_dir), options,
        control or JobControl(), displays, confine_to, combine=lambda b, d: b + d, count_inexact=False,
    )  # fmt: skip


def make_delta(
    base_dir: Path,
    target_dir: Path,
    delta_dir: Path,
    options: DeltaOptions = DeltaOptions(),
    control: JobControl | None = None,
    *,
    confine_to: Path | None = None,
    displays: dict[str, str] | None = None,
) -> JobOutcome:
    """delta = target - base (+ zero [PAD] rows), written atomically with the target's config/tokenizer files.

    `inexact_elements` counts elements for which base + delta would not give the target back exactly in the
    chosen dtype (possible where a weight changes sign or magnitude a lot; zero for typical fine-tunes).
    """
    displays = displays or {"base": str(base_dir), "target": str(target_dir), "output": str(delta_dir)}
    return _run(
        ManifestKind.MAKE_DELTA, Path(base_dir), Path(target_dir), "target", Path(delta_dir), options,
        control or JobControl(), displays, confine_to, combine=lambda b, t: t - b, count_inexact=True,
    )  # fmt: skip


def convert_checkpoint(
    source_dir: Path,
    output_dir: Path,
    control: JobControl | None = None,
    *,
    confine_to: Path | None = None,
    displays: dict[str, str] | None = None,
) -> JobOutcome:
    """Converts a `.bin` checkpoint (read with weights_only=True) to safetensors with the same sharding."""
    control = control or JobControl()
    displays = displays or {"source": str(source_dir), "output": str(output_dir)}
    source = Checkpoint.open(Path(source_dir), role="source", confine_to=confine_to)
    if source.format is not WeightFormat.PYTORCH_BIN:
        raise InvalidArgument(f"{displays['source']!r} is already safetensors; there is nothing to convert")
    inputs = (_fingerprint("source", source, displays["source"]),)
    existing = _existing_result(Path(output_dir), ManifestKind.CONVERT, inputs, {}, displays["output"])
    if existing is not None:
        return JobOutcome(Path(output_dir), existing, True, control.elapsed)
    shards: dict[str, list[_PlannedTensor]] = {}
    for name, meta in source.tensors.items():
        shards.setdefault(meta.shard, []).append(
            _PlannedTensor(name, TensorSpec(name, meta.dtype, meta.shape), 0)
        )
    with source.reader() as reader:
        manifest = _write_combined(
            kind=ManifestKind.CONVERT,
            out_dir=Path(output_dir),
            aux_source=source,
            inputs=inputs,
            options={},
            shards=[(s, shards[s]) for s in source.shards if s in shards],
            compute=lambda planned: reader.read(planned.name),
            control=control,
        )
    return JobOutcome(Path(output_dir), manifest, False, control.elapsed)
