"""Terminal output for long jobs: a rich progress bar for people, one JSON object per line for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import PurePath
from typing import Any

from google.protobuf.message import Message
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

console = Console(stderr=True)


def _field_jsonable(field, value: Any) -> Any:
    """Enum values by name ("JOB_STATE_SUCCEEDED"): stable and readable for scripts; unknown numbers stay."""
    if field.enum_type is None:
        return to_jsonable(value)

    def name(number: int) -> str | int:
        known = field.enum_type.values_by_number.get(number)
        return known.name if known else number

    return [name(v) for v in value] if field.is_repeated else name(value)


def to_jsonable(value: Any) -> Any:
    if isinstance(value, PurePath):
        return str(value)
    if is_dataclass(value):
        return {k: to_jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Message):  # int64 kept as numbers (json_format makes them strings)
        # Of a oneof (or an `optional` field) only the member that is set appears: a consumer tells a
        # watch event's kind by which key it has, never by an alternative filled with defaults.
        fields = [f for f in value.DESCRIPTOR.fields if f.containing_oneof is None or value.HasField(f.name)]
        return {f.name: _field_jsonable(f, getattr(value, f.name)) for f in fields}
    if isinstance(value, Mapping):  # includes protobuf map fields
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # includes repeated fields
        return [to_jsonable(v) for v in value]
    return value


def print_json(kind: str, payload: Any) -> None:
    sys.stdout.write(json.dumps({"event": kind, **to_jsonable(payload)}) + "\n")
    sys.stdout.flush()


@contextmanager
def job_progress(description: str, as_json: bool) -> Iterator:
    """Yields `update(progress)`: draws a bar (or prints JSON lines) for objects with the Progress fields."""
    if as_json:
        yield lambda p: print_json("progress", p)
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[shard]}"),
        console=console,
    ) as bar:
        task = bar.add_task(description, total=None, shard="")

        def update(p) -> None:
            bar.update(task, total=p.bytes_total or None, completed=p.bytes_done, shard=p.current_shard)

        yield update


def drain(events: Iterable, update) -> Any:
    """Consumes a server event stream (progress events, then one result); returns the result."""
    result = None
    for event in events:
        if event.HasField("progress"):
            update(event.progress)
        else:
            result = event.result
    return result
