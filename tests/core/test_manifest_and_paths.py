"""Manifests verify what was written; client paths stay inside the root; outputs are atomic."""

from __future__ import annotations

import os

import pytest

from wombat_core.atomic import AtomicOutputDir
from wombat_core.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, PathOutsideRoot
from wombat_core.manifest import MANIFEST_NAME, Manifest, verify_directory
from wombat_core.paths import ConfinedRoot


def _write(tmp_path, files: dict[str, bytes]):
    with AtomicOutputDir(tmp_path / "out") as out:
        for name, data in files.items():
            (out.path / name).parent.mkdir(parents=True, exist_ok=True)
            (out.path / name).write_bytes(data)
        return out.commit(Manifest(kind="test", inputs=(), options={}, files=()))


def test_manifest_lists_every_file_and_verify_detects_changes(tmp_path):
    manifest = _write(tmp_path, {"a.bin": b"aaa", "sub/b.json": b"{}"})
    assert [f.path for f in manifest.files] == ["a.bin", "sub/b.json"]
    out = tmp_path / "out"
    assert verify_directory(out).ok
    (out / "a.bin").write_bytes(b"aab")
    (out / "sub" / "b.json").unlink()
    (out / "new.txt").write_text("x")
    statuses = {c.path: c.status for c in verify_directory(out).files}
    assert statuses == {"a.bin": "mismatch", "sub/b.json": "missing", "new.txt": "unexpected"}
    assert not verify_directory(out).ok


def test_verify_without_manifest_is_a_failed_precondition(tmp_path):
    with pytest.raises(FailedPrecondition, match=MANIFEST_NAME):
        verify_directory(tmp_path)


def test_failed_job_leaves_nothing_and_lock_excludes_a_second_writer(tmp_path):
    with pytest.raises(RuntimeError):
        with AtomicOutputDir(tmp_path / "out") as out:
            (out.path / "x").write_text("partial")
            with pytest.raises(Aborted, match="already writing"):
                AtomicOutputDir(tmp_path / "out").__enter__()
            raise RuntimeError("boom")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".out.wombat-lock"]


def test_stale_partial_from_a_killed_job_is_removed(tmp_path):
    stale = tmp_path / ".out.wombat-partial-deadbeef"
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"x")
    _write(tmp_path, {"a": b"1"})
    assert not stale.exists() and (tmp_path / "out" / "a").exists()


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside", "a/../../b", "", "a\0b"])
def test_malformed_paths_are_invalid_arguments(tmp_path, bad):
    with pytest.raises(InvalidArgument):
        ConfinedRoot(tmp_path).resolve(bad)


def test_symlink_escaping_the_root_is_denied(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path)
    (root / "inside").symlink_to(root)
    confined = ConfinedRoot(root)
    with pytest.raises(PathOutsideRoot):
        confined.resolve("escape/x")
    assert confined.resolve("inside") == root.resolve()
    with pytest.raises(NotFound):
        confined.resolve("missing", must_exist=True)
    assert confined.resolve("new/dir") == root.resolve() / "new" / "dir"
    assert os.path.isdir(confined.root)


def test_committed_output_is_readable_by_other_users_however_it_was_written(tmp_path):
    """A file written 0600 (as safetensors' save_file does) is committed 0644: a server running as
    another user on the same model store can read it."""
    import stat

    from wombat_core.atomic import AtomicOutputDir
    from wombat_core.manifest import Manifest, ManifestKind

    with AtomicOutputDir(tmp_path / "model") as output:
        private = output.path / "model.safetensors"
        private.write_bytes(b"weights")
        private.chmod(0o600)
        output.commit(Manifest(kind=ManifestKind.CONVERT, inputs=(), options={}, files=()))
    assert stat.S_IMODE((tmp_path / "model" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
