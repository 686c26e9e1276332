"""Regenerate the Python code for the protos: `python protos/generate.py`.

grpcio-tools writes absolute imports rooted at the proto path (`from esm2.v1 import
...`); the generated modules live in the `esm2_service` package, so those imports
are rewritten to `from esm2_service.esm2...`. `--check` exits 1 when the checked-in
code differs from what the protos generate (CI runs it through the tests).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("esm2/v1/esm2.proto", "esm2/internal/v1/queue.proto")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_IMPORT = re.compile(r"^from esm2(\.| import)", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Writes the generated modules for PROTO_FILES under out_dir; returns their paths."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))
    for path in written:
        path.write_text(_IMPORT.sub(r"from esm2_service.esm2\1", path.read_text()))
    return written


def stale_files() -> list[str]:
    """Generated files that are missing or differ from what the protos generate now."""
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for fresh in generate(Path(tmp)):
            relative = fresh.relative_to(tmp)
            current = PROTO_ROOT / relative
            if not current.exists() or current.read_text() != fresh.read_text():
                stale.append(str(relative))
        return stale


def main() -> int:
    if "--check" in sys.argv[1:]:
        stale = stale_files()
        for name in stale:
            print(f"out of date: protos/{name} (run: python protos/generate.py)")
        return 1 if stale else 0
    for path in generate(PROTO_ROOT):
        print(f"wrote protos/{path.relative_to(PROTO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
