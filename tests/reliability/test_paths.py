"""Path confinement: `..`, absolute paths, symlinks and hard links that escape the root, and a symlink
swapped in after a path was checked (files are opened safely, not by re-resolving a name)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.models import save_tiny_llama
from wombat_core.checkpoint.layout import Checkpoint
from wombat_core.errors import InvalidArgument, NotFound, PathOutsideRoot
from wombat_core.paths import ConfinedRoot, _open_below, open_confined
from wombat_core.rrhf.data import load_jsonl


@pytest.fixture
def tree(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "inside.txt").write_text("inside")
    return root.resolve(), outside.resolve()


@pytest.mark.parametrize(
    ("relative", "error"),
    [("../outside/secret.txt", InvalidArgument), ("/etc/passwd", InvalidArgument), ("a/../../x", InvalidArgument),
     ("link-out/secret.txt", PathOutsideRoot), ("x" * 256, InvalidArgument), ("a\x00b", InvalidArgument)],
)  # fmt: skip
def test_escaping_names_are_refused(tree, relative, error):
    root, outside = tree
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    with pytest.raises(error):
        ConfinedRoot(root).resolve(relative)


def test_symlinks_that_stay_inside_are_followed(tree):
    root, _ = tree
    (root / "alias.txt").symlink_to(root / "inside.txt")
    with open_confined(root / "alias.txt", root) as f:
        assert f.read() == b"inside"


def test_a_hard_link_is_refused_wherever_it_points(tree):
    root, outside = tree
    os.link(outside / "secret.txt", root / "linked.txt")
    with pytest.raises(PathOutsideRoot, match="hard links"):
        open_confined(root / "linked.txt", root)
    (root / "data.jsonl").write_text('{"query": "q", "responses": ["a", "b"], "scores": [1, 2]}\n')
    os.link(root / "data.jsonl", outside / "copy.jsonl")  # a link from outside makes it suspect too
    with pytest.raises(PathOutsideRoot):
        load_jsonl(root / "data.jsonl", root=root)


def test_a_symlink_swapped_in_after_the_check_is_refused(tree):
    """The race: the server checks a path, then someone replaces a directory on it with a link out of the
    root before the file is opened. The walk opens each component with O_NOFOLLOW, so it refuses."""
    root, outside = tree
    (root / "models").mkdir()
    (root / "models" / "secret.txt").write_text("harmless")
    checked = ("models", "secret.txt")  # what was resolved and checked
    shutil.rmtree(root / "models")
    (root / "models").symlink_to(outside, target_is_directory=True)  # the swap
    with pytest.raises(PathOutsideRoot, match="symbolic link"):
        _open_below(root, checked, "models/secret.txt")
    with pytest.raises(PathOutsideRoot):
        open_confined(root / "models" / "secret.txt", root)  # and re-resolving sees the escape too


def test_a_checkpoint_swapped_for_a_link_between_open_and_read_is_refused(tmp_path):
    root = (tmp_path / "root").resolve()
    model = save_tiny_llama(root / "model", seed=1)
    checkpoint = Checkpoint.open(model, confine_to=root)
    assert checkpoint.tensors  # headers read through the confined open
    outside = tmp_path / "outside-model"
    shutil.move(model, outside)
    model.symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathOutsideRoot), checkpoint.reader() as reader:
        reader.read(next(iter(checkpoint.tensors)))


def test_missing_files_are_not_found(tree):
    root, _ = tree
    with pytest.raises(NotFound):
        _open_below(root, ("nope.txt",), "nope.txt")
