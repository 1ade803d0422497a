"""Regenerate the committed Python code for the tessera.v1 wire contract.

Usage (from anywhere)::

    .venv/bin/python proto/generate.py            # rewrite tessera/v1/*_pb2*.py(i)
    .venv/bin/python proto/generate.py --out DIR  # write the same files into DIR instead

The .proto sources under ``proto/`` are the only definition of the wire (DESIGN.md section 3).
This script runs protoc in-process through ``grpc_tools.protoc`` with the well-known types that
grpcio-tools bundles, and four generators: protobuf's Python code, gRPC's Python stubs, and
mypy-protobuf's ``.pyi`` stubs for both. The proto root is ``proto/``, so generated modules import
each other as ``from tessera.v1 import common_pb2``.

The output is deterministic: the same sources and the same pinned tool versions (pyproject.toml)
give the same bytes. Files whose content is unchanged are not rewritten; generated files that no
source produces any more are deleted. ``tessera/v1/__init__.py`` is hand-written and never touched.
tests/test_proto_sync.py fails when the committed files differ from what this script produces.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]  # grpcio-tools ships no stubs

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PACKAGE_DIR = Path("tessera") / "v1"
DEFAULT_OUT = REPO_ROOT / PACKAGE_DIR

# Suffixes of the files this script owns in the output directory; nothing else is touched.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_sources() -> list[Path]:
    """The .proto files of the package, sorted so protoc always sees them in the same order."""
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def is_generated(path: Path) -> bool:
    """Whether ``path`` names a file this script generates."""
    return path.name.endswith(GENERATED_SUFFIXES)


def _plugin(name: str) -> Path:
    """Locate a protoc plugin installed next to the running interpreter (the virtualenv)."""
    plugin = Path(sys.executable).parent / name
    if not plugin.is_file():
        raise SystemExit(
            f"{name} not found next to {sys.executable}; "
            "install the dev dependencies (pip install -e '.[dev]') and run this script with "
            "the virtualenv's python"
        )
    return plugin


def run_protoc(out_dir: Path) -> None:
    """Run protoc with every generator, writing the package tree under ``out_dir``."""
    well_known = resources.files("grpc_tools") / "_proto"
    sources = proto_sources()
    if not sources:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out=quiet:{out_dir}",
        f"--mypy_grpc_out=quiet:{out_dir}",
        *(str(source.relative_to(PROTO_ROOT)) for source in sources),
    ]
    status = protoc.main(args)
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}; see the messages above")


def generate(target: Path) -> list[str]:
    """Regenerate into ``target``; return the names of files written or deleted, sorted."""
    changed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tessera-proto-") as scratch:
        scratch_dir = Path(scratch)
        run_protoc(scratch_dir)
        produced = {
            path.name: path.read_bytes()
            for path in (scratch_dir / PACKAGE_DIR).iterdir()
            if is_generated(path)
        }
    target.mkdir(parents=True, exist_ok=True)
    for name, content in sorted(produced.items()):
        destination = target / name
        if not destination.is_file() or destination.read_bytes() != content:
            destination.write_bytes(content)
            changed.append(name)
    for stale in sorted(target.iterdir()):
        if is_generated(stale) and stale.name not in produced:
            stale.unlink()
            changed.append(stale.name)
    return sorted(changed)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"directory to write the generated modules into (default: {DEFAULT_OUT})",
    )
    options = parser.parse_args(argv)
    changed = generate(options.out.resolve())
    summary = ", ".join(changed) if changed else "nothing changed"
    sys.stdout.write(f"{options.out}: {summary}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
