"""`make image-test`: the service images built by `make images`, run with the pod's restrictions under
podman on this machine (deploy/images.sh holds the machine-specific runtime flags). Not part of
`make test`, which must not need podman; here a missing podman fails, it never skips."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images.sh"
TAG = "0.1.0-cpu"
UID = 10001
# Where a container may write: the emptyDirs the manifests mount (tests/test_k8s_manifests.py checks
# that they agree). Everything else is the read-only image or a mounted store.
WRITABLE = {"/tmp": "1g"}
REPORT = ROOT / ".wombat" / "images" / "image-test.json"


def podman() -> list[str]:
    if shutil.which("podman") is None:
        pytest.fail("make image-test needs podman: apt-get install -y podman buildah runc debootstrap")
    return ["podman", "--runtime", "/usr/sbin/runc"]


@dataclass
class Container:
    """One service image, started the way its pod runs it: read-only root, tmpfs only at the manifests'
    emptyDirs, uid 10001, every capability dropped, no new privileges, on the host's network."""

    name: str
    image: str
    args: list[str]
    volumes: list[str] = field(default_factory=list)
    started: float = 0.0
    ready_after: float = 0.0

    def start(self, timeout: float = 180) -> Container:
        subprocess.run([*podman(), "rm", "-f", self.name], capture_output=True)
        command = [str(IMAGES), "run", "-d", "--name", self.name, "--network", "host", "--read-only",
                   "--user", str(UID), "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                   "-e", "HOME=/tmp"]  # fmt: skip
        for path, size in WRITABLE.items():
            command += ["--tmpfs", f"{path}:rw,size={size},mode=1777"]
        for volume in self.volumes:
            command += ["-v", volume]
        self.started = time.monotonic()
        subprocess.run([*command, f"localhost/wombat-{self.image}:{TAG}", *self.args], check=True,
                       capture_output=True)  # fmt: skip
        while "WOMBAT_READY" not in self.logs():
            if time.monotonic() - self.started > timeout or not self.running():
                raise AssertionError(f"{self.name} did not become ready:\n{self.logs()[-3000:]}")
            time.sleep(0.2)
        self.ready_after = time.monotonic() - self.started
        return self

    def logs(self) -> str:
        result = subprocess.run([*podman(), "logs", self.name], capture_output=True, text=True)
        return result.stdout + result.stderr

    def running(self) -> bool:
        result = subprocess.run([*podman(), "inspect", "-f", "{{.State.Running}}", self.name],
                                capture_output=True, text=True)  # fmt: skip
        return result.stdout.strip() == "true"

    def stop(self, grace: int = 30) -> tuple[int, float]:
        """`podman stop` (SIGTERM, then SIGKILL after `grace`): returns the exit code and the seconds it took."""
        began = time.monotonic()
        subprocess.run([*podman(), "stop", "-t", str(grace), self.name], check=True, capture_output=True)
        took = time.monotonic() - began
        code = subprocess.run([*podman(), "inspect", "-f", "{{.State.ExitCode}}", self.name],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        subprocess.run([*podman(), "rm", "-f", self.name], capture_output=True)
        return int(code), took


def image_size(image: str) -> int:
    result = subprocess.run([*podman(), "image", "inspect", "-f", "{{.Size}}", f"localhost/wombat-{image}:{TAG}"],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"no image wombat-{image}:{TAG}: run `make images` first")
    return int(result.stdout.strip())


@pytest.fixture(scope="session")
def report():
    """Sizes and start-to-ready times, written for deploy/README."""
    import json

    data: dict[str, dict] = {}
    yield data
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(data, indent=2))
    for image, values in sorted(data.items()):
        print(
            f"{image:14} {values.get('size_mb', 0):8.0f} MB   ready after {values.get('ready_seconds', 0):5.1f} s   "
            f"stopped in {values.get('stop_seconds', 0):4.1f} s"
        )


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """A model store like the PVC: the SmolLM2 demo model, plus two tiny checkpoints for the materialiser
    and the rrhf scorer; writable by uid 10001 (as fsGroup makes the PVC)."""
    from tests.models import derive_finetuned, save_tiny_llama
    from wombat_core.demo_model import prepare_demo_model

    root = tmp_path_factory.mktemp("store")
    models, data = root / "models", root / "data"
    models.mkdir()
    data.mkdir()
    prepare_demo_model(models / "smollm2-135m")
    save_tiny_llama(models / "tiny-base", seed=1)
    derive_finetuned(models / "tiny-base", models / "tiny-target", seed=2)
    # The tiny checkpoints come from transformers' save_pretrained, which writes 0600 files; a store's
    # files are readable by the pods' uid (the suite's own writers commit 0644).
    for path in models.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    for path in (root, models, data):
        path.chmod(0o777)  # the container's uid 10001 writes new models and job state here
    return root
