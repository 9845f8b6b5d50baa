"""Dependencies point one way: core domain modules never import transport or cluster libraries."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "google.rpc", "ray", "wombat.")
TRANSPORT_PACKAGES = ("server", "cli")  # the scaffold and the CLI are allowed to use grpc


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_domain_modules_import_no_grpc_proto_or_ray():
    domain_files = [
        p for p in (ROOT / "wombat_core").rglob("*.py")
        if p.relative_to(ROOT / "wombat_core").parts[0] not in TRANSPORT_PACKAGES
    ]  # fmt: skip
    assert len(domain_files) > 10
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            m
            for m in imported_modules(p)
            if m == "wombat" or m.startswith(FORBIDDEN) or m.split(".")[0] in {"grpc", "ray"}
        )
        for p in domain_files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_service_imports_another_service():
    services = [p.name for p in (ROOT / "services").iterdir() if p.is_dir() and not p.name.startswith("_")]
    for service in services:
        for path in (ROOT / "services" / service).rglob("*.py"):
            others = {
                m for m in imported_modules(path) if m.startswith("services.") and m.split(".")[1] != service
            }
            assert not others, f"{path} imports {others}"
