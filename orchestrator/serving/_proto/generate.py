"""Regenerate the checked-in Python modules of the serving protocols from the .proto files here.

    python -m orchestrator.serving._proto.generate

The generated ``*_pb2.py`` / ``*_pb2_grpc.py`` are checked in, so a clean
checkout runs without grpcio-tools; run this after editing a ``.proto``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]  # the directory holding the orchestrator package: imports come out as orchestrator.serving._proto


def main() -> int:
    from grpc_tools import protoc  # only needed here, not at run time

    protos = sorted(str(p.relative_to(ROOT)) for p in HERE.glob("*.proto"))
    return protoc.main(["protoc", f"-I{ROOT}", f"--python_out={ROOT}", f"--grpc_python_out={ROOT}", *protos])


if __name__ == "__main__":
    sys.exit(main())
