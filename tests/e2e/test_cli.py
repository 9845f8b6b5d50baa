"""The `wombat` CLI as a user runs it: local jobs with --json, verify's exit code, and --server mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.models import derive_finetuned, save_tiny_llama

pytestmark = pytest.mark.slow


def wombat(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"wombat {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_local_make_delta_materialize_verify_with_json(tmp_path):
    save_tiny_llama(tmp_path / "base", seed=1)
    derive_finetuned(tmp_path / "base", tmp_path / "target", seed=2)
    made = json_lines(wombat("make-delta", "--base", str(tmp_path / "base"), "--target", str(tmp_path / "target"),
                             "--delta", str(tmp_path / "delta"), "--json").stdout)  # fmt: skip
    assert made[0]["event"] == "progress" and made[-1]["event"] == "result"
    assert made[-1]["inexact_elements"] == 0
    done = json_lines(wombat("materialize", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "delta"),
                             "--target", str(tmp_path / "out"), "--json").stdout)  # fmt: skip
    assert done[-1]["event"] == "result" and done[-1]["manifest"]["kind"] == "materialize"
    again = json_lines(wombat("materialize", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "delta"),
                              "--target", str(tmp_path / "out"), "--json").stdout)  # fmt: skip
    assert again[-1]["already_materialized"] is True

    verified = json_lines(wombat("verify", str(tmp_path / "out"), "--json").stdout)
    assert verified[-1]["ok"] is True
    (tmp_path / "out" / "config.json").write_text("{}")
    failed = wombat("verify", str(tmp_path / "out"), check=False)
    assert failed.returncode == 1 and "mismatch" in failed.stderr


def test_cli_errors_are_one_clear_line(tmp_path):
    result = wombat("materialize", "--base", str(tmp_path / "nope"), "--delta", str(tmp_path), "--target",
                    str(tmp_path / "out"), check=False)  # fmt: skip
    assert result.returncode == 1
    assert "base directory 'nope' does not exist" in result.stderr and "Traceback" not in result.stderr


def test_server_mode(tmp_path, start_materializer):
    root = tmp_path / "root"
    save_tiny_llama(root / "base", seed=1)
    derive_finetuned(root / "base", root / "target", seed=2)
    service = start_materializer(root)
    server = f"127.0.0.1:{service.port}"
    wombat("make-delta", "--base", "base", "--target", "target", "--delta", "delta", "--server", server)
    out = json_lines(
        wombat(
            "materialize",
            "--base",
            "base",
            "--delta",
            "delta",
            "--target",
            "out",
            "--server",
            server,
            "--json",
        ).stdout
    )
    assert out[-1]["event"] == "result" and out[-1]["path"] == "out"
    assert json_lines(wombat("verify", "out", "--server", server, "--json").stdout)[-1]["ok"] is True
    refused = wombat(
        "materialize", "--base", "../x", "--delta", "delta", "--target", "o2", "--server", server, check=False
    )
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr


def test_rrhf_score_train_and_jobs(tmp_path):
    import shutil
    from importlib import resources

    from services.stack import ServiceProcess
    from tests.engine_fixtures import save_servable_tiny_model

    models, data = tmp_path / "models", tmp_path / "data"
    data.mkdir()
    save_servable_tiny_model(models / "policy")
    shutil.copyfile(resources.files("wombat_core.rrhf") / "data" / "preferences.jsonl", data / "prefs.jsonl")
    service = ServiceProcess(["rrhf", "--model-root", str(models), "--data-root", str(data), "--port", "0",
                              "--metrics-port", "-1", "--policy-model", "policy"], tmp_path / "rrhf.log")  # fmt: skip
    try:
        server = f"127.0.0.1:{service.port}"
        scored = json_lines(wombat("score", "--server", server, "--query", "Name a colour.", "--response", "Red.",
                                   "--response", "Blue is a colour.", "--json").stdout)[-1]  # fmt: skip
        assert len(scored["scores"]) == 2 and sorted(scored["ranking"]) == [0, 1]
        trained = json_lines(wombat("train", "--server", server, "--model", "policy", "--data", "prefs.jsonl",
                                    "--output", "trained", "--max-steps", "2", "--learning-rate", "1e-3",
                                    "--json").stdout)  # fmt: skip
        # Each line is one event named by its kind, carrying only that member of the oneof.
        kinds = ("step", "checkpoint", "job")
        assert all(e["event"] in kinds and [k for k in kinds if k in e] == [e["event"]] for e in trained)
        assert [e["step"]["step"] for e in trained if e["event"] == "step"] == [1, 2]
        assert trained[-1]["event"] == "job" and trained[-1]["job"]["state"] == "JOB_STATE_SUCCEEDED"
        assert all(e["job"]["state"] != "JOB_STATE_UNSPECIFIED" for e in trained if e["event"] == "job")
        (plan,) = json_lines(wombat("train", "--plan", "--server", server, "--model", "policy", "--workers", "2",
                                    "--device-memory-gb", "0.01", "--json").stdout)  # fmt: skip
        assert plan["event"] == "plan" and not plan["fits"] and int(plan["per_device_bytes"]) > 0
        table = wombat(
            "train", "--plan", "--server", server, "--model", "policy"
        ).stderr  # rich output goes to stderr
        assert "peak memory per cpu device" in table and "AdamW moments" in table and "fits" in table
        listed = json_lines(wombat("jobs", "list", "--server", server, "--json").stdout)
        assert [j["job_id"] for j in listed] == [trained[-1]["job"]["job_id"]]
        refused = wombat("train", "--server", server, "--model", "policy", "--data", "missing.jsonl", "--output", "x",
                         check=False)  # fmt: skip
        assert refused.returncode == 1 and "NOT_FOUND" in refused.stderr
    finally:
        service.stop()
    assert (models / "trained" / "model.safetensors").exists()
