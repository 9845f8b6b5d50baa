"""The protobuf contracts: committed stubs are fresh, buf lint is clean, conventions hold."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"


def _generator():
    spec = importlib.util.spec_from_file_location("generate", PROTOS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_not_stale(tmp_path):
    generator = _generator()
    shutil.copytree(
        PROTOS / "wombat", tmp_path / "wombat", ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__")
    )
    out = tmp_path / "out"
    out.mkdir()
    generator.generate(out, root=tmp_path)
    fresh, committed = generator.generated_files(out), generator.generated_files(PROTOS)
    assert fresh.keys() == committed.keys(), "run `make protos` and commit the result"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated stubs (run `make protos`): {stale}"


def test_buf_lint_is_clean():
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if buf is None:
        pytest.fail("buf is not installed; it comes with the dev extra (buf-bin)")
    result = subprocess.run([buf, "lint"], cwd=PROTOS, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_is_clean_against_the_last_release():
    """protos/releases/ holds the buf image of each released contract (`buf build -o
    releases/vX.Y.Z.binpb` at release); the contracts may only grow compatibly from the newest one."""
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if buf is None:
        pytest.fail("buf is not installed; it comes with the dev extra (buf-bin)")
    releases = sorted(
        (PROTOS / "releases").glob("v*.binpb"), key=lambda p: [int(x) for x in p.stem[1:].split(".")]
    )
    assert releases, "no released contract image under protos/releases"
    result = subprocess.run(
        [buf, "breaking", "--against", str(releases[-1])], cwd=PROTOS, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_removed_field(tmp_path):
    """The check above can fail: a copy of the contracts with a field renumbered is reported."""
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy, ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    proto = copy / "wombat" / "inference" / "v1" / "inference.proto"
    proto.write_text(
        proto.read_text().replace("optional float temperature = 1;", "optional float temperature = 99;")
    )
    result = subprocess.run([buf, "breaking", "--against", str(PROTOS / "releases" / "v0.1.0.binpb")], cwd=copy,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and "temperature" in result.stdout + result.stderr


def test_every_service_has_a_versioned_package_and_unique_request_response_pairs():
    from wombat.inference.v1 import inference_pb2
    from wombat.materializer.v1 import materializer_pb2
    from wombat.rrhf.v1 import rrhf_pb2

    expected = {
        materializer_pb2: {"Materialize", "MakeDelta", "Convert", "Verify", "Describe", "ListModels"},
        inference_pb2: {"Generate", "Complete", "Tokenize", "Detokenize", "ModelInfo", "GetLoad"},
        rrhf_pb2: {
            "Score",
            "Rank",
            "StartTraining",
            "PlanTraining",
            "GenerateCandidates",
            "WatchJob",
            "GetJob",
            "CancelJob",
            "ResumeJob",
            "ListJobs",
        },
    }
    for module, methods in expected.items():
        (service,) = module.DESCRIPTOR.services_by_name.values()
        assert module.DESCRIPTOR.package.endswith(".v1")
        assert {m.name for m in service.methods} == methods
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request"
            assert method.output_type.name == f"{method.name}Response"
        assert module.DESCRIPTOR.package.startswith("wombat.")


def test_documented_values_match_the_code():
    """Comments that list values the code defines name exactly those values."""
    import re

    from wombat_core.manifest import ManifestKind

    common = (PROTOS / "wombat" / "common" / "v1" / "common.proto").read_text()
    comment = re.search(r"((?:\s*//[^\n]*\n)+)\s*string kind = 2;", common).group(1)
    assert set(re.findall(r'"([a-z-]+)"', comment)) == {kind.value for kind in ManifestKind}
