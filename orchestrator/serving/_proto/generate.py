"""Regenerate the checked-in Python modules of the serving protocols from the .proto files here.

    python orchestrator/serving/_proto/generate.py

(by path: the package imports the modules this regenerates). The generated ``*_pb2.py`` /
``*_pb2_grpc.py`` are checked in, so a clean checkout runs without grpcio-tools; run this after
editing a ``.proto``, with grpcio-tools 1.81 (its protoc writes protobuf 6.33 code, which runs on
protobuf 6.33 and on 7; grpcio-tools >= 1.82 writes code that needs 7, and tritonclient[grpc]
asks for < 7, so code from 1.81 runs wherever the tests' clients do).

``grpc_predict_v2`` (KServe v2) is built into a descriptor pool of its own instead of protobuf's
default one: tritonclient.grpc puts the same message names (package ``inference``) in the default
pool, and two files defining one name in one pool fail to load, so a process could not hold both
our server and a Triton client. The messages' wire form is the same either way.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRIVATE_POOL = ("grpc_predict_v2",)  # see above
ROOT = HERE.parents[2]  # the directory holding the orchestrator package: imports come out as orchestrator.serving._proto


def main() -> int:
    from grpc_tools import protoc  # only needed here, not at run time

    protos = sorted(str(p.relative_to(ROOT)) for p in HERE.glob("*.proto"))
    code = protoc.main(["protoc", f"-I{ROOT}", f"--python_out={ROOT}", f"--grpc_python_out={ROOT}", *protos])
    if code:
        return code
    for name in PRIVATE_POOL:
        module = HERE / f"{name}_pb2.py"
        text = module.read_text()
        default = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
        if text.count(default) != 1:
            print(f"{module}: expected one {default!r} line to rewrite", file=sys.stderr)
            return 1
        module.write_text(text.replace(default, "DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile("))
    return 0


if __name__ == "__main__":
    sys.exit(main())
