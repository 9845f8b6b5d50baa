"""RRHF training data: one JSON object per line, {"query": str, "responses": [str], "scores": [float]}.

Everything is validated before any training starts; an error names the line (or record) and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from wombat_core.errors import InvalidArgument
from wombat_core.paths import open_confined

MAX_RESPONSES = 64
MAX_TEXT_CHARS = 100_000


@dataclass(frozen=True)
class PreferenceRecord:
    query: str
    responses: tuple[str, ...]
    scores: tuple[float, ...]


def validate_record(raw: object, where: str) -> PreferenceRecord:
    def fail(field: str, problem: str) -> InvalidArgument:
        return InvalidArgument(f"{where}: {field} {problem}", metadata={"where": where, "field": field})

    if not isinstance(raw, dict):
        raise fail("record", "must be a JSON object with query, responses and scores")
    query, responses, scores = raw.get("query"), raw.get("responses"), raw.get("scores")
    if not isinstance(query, str) or not query.strip():
        raise fail("query", "must be a non-empty string")
    if len(query) > MAX_TEXT_CHARS:
        raise fail("query", f"must be at most {MAX_TEXT_CHARS} characters")
    if not isinstance(responses, list) or not responses:
        raise fail("responses", "must be a non-empty list of strings")
    if len(responses) > MAX_RESPONSES:
        raise fail("responses", f"must hold at most {MAX_RESPONSES} entries, got {len(responses)}")
    for i, response in enumerate(responses):
        if not isinstance(response, str) or not response.strip():
            raise fail(f"responses[{i}]", "must be a non-empty string")
        if len(response) > MAX_TEXT_CHARS:
            raise fail(f"responses[{i}]", f"must be at most {MAX_TEXT_CHARS} characters")
    if not isinstance(scores, list) or len(scores) != len(responses):
        got = len(scores) if isinstance(scores, list) else type(scores).__name__
        raise fail("scores", f"must be a list as long as responses ({len(responses)}), got {got}")
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise fail(f"scores[{i}]", f"must be a finite number, got {score!r}")
    return PreferenceRecord(query, tuple(responses), tuple(float(s) for s in scores))


def validate_records(raws: Iterable[object], label: str = "record") -> list[PreferenceRecord]:
    records = [validate_record(raw, f"{label} {i + 1}") for i, raw in enumerate(raws)]
    if not records:
        raise InvalidArgument("the training data holds no records")
    return records


def load_jsonl(path: Path, root: Path | None = None) -> list[PreferenceRecord]:
    """Parses and validates every line; blank lines are skipped. With `root`, the file is opened with
    `open_confined` (no link out of the root, even one swapped in after the path was checked)."""
    records = []
    with open_confined(Path(path), root) as f:
        for number, raw_line in enumerate(f, start=1):
            line = _decode(raw_line, f"{Path(path).name} line {number}")
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(
                    f"{Path(path).name} line {number}: not valid JSON ({exc.msg})",
                    metadata={"where": f"line {number}", "field": "json"},
                ) from None
            records.append(validate_record(raw, f"{Path(path).name} line {number}"))
    if not records:
        raise InvalidArgument(f"{Path(path).name} holds no records")
    return records


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def dump_jsonl(records: Iterable[PreferenceRecord]) -> str:
    return "".join(
        json.dumps(
            {"query": r.query, "responses": list(r.responses), "scores": list(r.scores)}, ensure_ascii=False
        )
        + "\n"
        for r in records
    )
