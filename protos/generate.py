"""Regenerates the Python stubs beside the .proto files: `python protos/generate.py` (or `make protos`).

The stubs are committed so that installing the suite needs no code generation; tests/test_protos.py
regenerates them into a temporary directory and fails when the committed copies are stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((root / "wombat").rglob("*.proto"))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> None:
    """Writes stubs for every .proto under `root/wombat` into `out_dir` (mirroring the package tree)."""
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(root)) for p in proto_files(root)]
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Every generated directory must be a regular package so setuptools installs it.
    for directory in {out_dir / Path(f).parent for f in files}:
        for package_dir in [directory, *directory.parents]:
            if package_dir == out_dir or out_dir not in package_dir.parents:
                break
            (package_dir / "__init__.py").touch()


def generated_files(root: Path) -> dict[str, bytes]:
    found = {}
    for path in sorted((root / "wombat").rglob("*")):
        if path.is_file() and (path.name.endswith(GENERATED_SUFFIXES) or path.name == "__init__.py"):
            found[str(path.relative_to(root))] = path.read_bytes()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=PROTO_ROOT, help="output root (default: beside the protos)"
    )
    args = parser.parse_args()
    if args.out == PROTO_ROOT:
        for stale in PROTO_ROOT.joinpath("wombat").rglob("*"):
            if stale.is_file() and stale.name.endswith(GENERATED_SUFFIXES):
                stale.unlink()
    generate(args.out)
    print(f"generated {len(generated_files(args.out))} files under {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
