"""A pickle payload for the "never unpickle" tests."""

from __future__ import annotations

import os
from pathlib import Path


class CreatesFileWhenUnpickled:
    """Pickles to a call of `os.system("touch <marker>")`: the marker file appears only if something
    fully unpickles it, which the suite must never do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
