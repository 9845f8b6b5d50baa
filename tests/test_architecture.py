"""Dependencies point one way: protos → wombat_core (the domain) → clients → services (scaffold, the
services, the CLI). Every import counts, including those inside functions; there are no exemptions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Wiring beside the services under services/: not services themselves.
WIRING = {"scaffold", "cli", "stack"}
TRANSPORT = ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "google.protobuf", "google.rpc", "ray")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; use the absolute module name"
            names.add(node.module)
    return names


def _top(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def offenders(package: str, forbidden) -> dict[str, list[str]]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = sorted(m for m in imported_modules(path) if forbidden(m))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def test_the_core_imports_nothing_above_it():
    assert len(list((ROOT / "wombat_core").rglob("*.py"))) > 20

    def forbidden(module: str) -> bool:
        return (
            _top(module, *TRANSPORT, "wombat", "services", "clients", "typer", "rich")
            or module.endswith("_pb2")
            or module.endswith("_pb2_grpc")
        )

    assert offenders("wombat_core", forbidden) == {}


def test_clients_import_no_service():
    assert offenders("clients", lambda m: _top(m, "services")) == {}


def services() -> list[str]:
    return sorted(p.name for p in (ROOT / "services").iterdir() if p.is_dir() and p.name not in WIRING
                  and not p.name.startswith("_"))  # fmt: skip


def test_no_service_imports_another_service_or_the_cli():
    assert set(services()) >= {"materializer", "inference", "rrhf"}
    for service in services():
        others = [s for s in services() if s != service]
        found = offenders(
            f"services/{service}",
            lambda m, others=others: _top(m, *(f"services.{o}" for o in others), "services.cli"),
        )
        assert found == {}, f"{service} imports another service or the CLI: {found}"


def test_the_scaffold_and_stack_know_no_particular_service():
    for wiring in ("scaffold", "stack"):
        found = offenders(
            f"services/{wiring}", lambda m: _top(m, "services.cli", *(f"services.{s}" for s in services()))
        )
        assert found == {}, found
