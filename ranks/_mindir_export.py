"""The child side of MINDIR conversion: ``python -m ranks._mindir_export REQUEST.json``.

Runs in its own short-lived process (started by ``ranks._mindir``) because it
imports MindSpore: a second C++ runtime with its own thread pools, logging and
about a gigabyte of libraries that a rank or worker should not carry for the
rest of its life just to read one file once. The child:

1. checks the file is a plain MINDIR (not encrypted, not truncated) with
   MindSpore's own protobuf module, and reads the inputs' names, types and shapes;
2. loads it into ``nn.GraphCell`` and exports it to ONNX with MindSpore;
3. makes the batch dimension free when the graph allows it (checked, not assumed);
4. runs the ONNX model with ONNX Runtime and the MINDIR with MindSpore on the
   same random inputs, and records the largest difference.

It writes a JSON result next to the request: ``{"ok": true, ...}`` or
``{"ok": false, "kind": ..., "message": ..., "operator": ...}``; the parent
turns the latter into a ``ModelError`` naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

# MindSpore writes an encrypted MINDIR as blocks that each start with this magic (crypto.cc: MAGIC_NUM 0x7F3A5ED8).
ENCRYPTED_MAGIC = bytes.fromhex("d85e3a7f")
UNSUPPORTED_OP = re.compile(r"Can not find key (\S+) in convert map")
BATCH = "batch"
WORK_PREFIX = "orch-mindir-"  # the requester's temporary folder, where the child runs
# MindSpore's communication primitives: in a per-rank MINDIR of a sliced network.
COMMUNICATION_OPS = ("AllReduce", "AllGather", "ReduceScatter", "Broadcast", "AlltoAll", "AllToAll", "Send", "Receive",
                     "NeighborExchange", "CollectiveScatter", "CollectiveGather", "Reduce")
COLLECTIVE_DOMAIN = "com.microsoft"  # ranks._staged_runner runs these nodes on the communicator

# mind_ir.proto's TensorProto.DataType -> numpy
_DTYPES = {
    "FLOAT": np.float32, "FLOAT16": np.float16, "DOUBLE": np.float64, "FLOAT64": np.float64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "BOOL": np.bool_,
}


class ConversionFailure(Exception):
    """A failure the parent reports as it is: ``kind`` says which, ``operator`` names MindSpore's operator."""

    def __init__(self, kind: str, message: str, operator: str | None = None):
        super().__init__(message)
        self.kind, self.operator = kind, operator


def check_head(head: bytes, *, have_key: bool = False) -> None:
    """ConversionFailure for what the first bytes already tell: an empty file, an encrypted one (without a key)."""
    if not head:
        raise ConversionFailure("not_mindir", "the file is empty")
    if head.startswith(ENCRYPTED_MAGIC) and not have_key:
        raise ConversionFailure(
            "encrypted",
            "the file is an encrypted MINDIR (it starts with MindSpore's encryption magic); this runtime does not "
            "keep decrypted models: convert it once with `orchestrate convert FILE -o FILE.onnx --dec-key-file KEY` "
            "(MindSpore decrypts it) and load the ONNX file, or export the network again without enc_key",
        )


def decrypted(path: Path, request: dict, copy: Path) -> Path:
    """``path``, or for an encrypted MINDIR given a key its plain bytes in ``copy`` (the parent's temporary folder)."""
    key = bytes.fromhex(request.get("dec_key_hex") or "")
    with open(path, "rb") as f:
        head = f.read(16)
    check_head(head, have_key=bool(key))
    if not head.startswith(ENCRYPTED_MAGIC):
        if key:
            raise ConversionFailure("usage", "a decryption key was given, but the file is not encrypted")
        return path
    # What mindspore.load(file, dec_key=..., dec_mode=...) runs first; the plain MINDIR is needed for its inputs.
    from mindspore._c_expression import _decrypt

    plain = _decrypt(str(path), key, len(key), request.get("dec_mode") or "AES-GCM")
    if not plain:
        raise ConversionFailure("encrypted", f"MindSpore could not decrypt the file with the given key and mode "
                                f"{request.get('dec_mode') or 'AES-GCM'}: a wrong key or mode, or a damaged file")
    copy.write_bytes(plain)
    return copy


def read_mindir_inputs(path: Path) -> list[tuple[str, np.dtype, list[int]]]:
    """The graph inputs of a plain MINDIR file: (name, dtype, dims with -1 for free ones)."""
    from google.protobuf.message import DecodeError
    from mindspore.train import mind_ir_pb2

    data = path.read_bytes()
    model = mind_ir_pb2.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError as exc:
        looks = data[:1] == b"\x0a" and b"MindSpore" in data[:64]
        raise ConversionFailure(
            "truncated" if looks else "not_mindir",
            (f"the file starts as a MINDIR written by MindSpore but cannot be parsed ({exc}): it is truncated or "
             f"corrupt ({len(data)} bytes)") if looks else
            f"the file is not a MINDIR model (MindSpore's protobuf parser: {exc})",
        ) from None
    if model.producer_name != "MindSpore" or not model.HasField("graph"):
        raise ConversionFailure(
            "not_mindir",
            f"the file is not a MINDIR model (producer {model.producer_name!r}, "
            f"{'a graph' if model.HasField('graph') else 'no graph'}; MindSpore writes producer 'MindSpore')",
        )
    names = mind_ir_pb2.TensorProto.DataType.Name
    inputs = []
    for value in model.graph.input:
        if len(value.tensor) != 1:
            raise ConversionFailure("unsupported", f"input {value.name!r} is not one tensor ({len(value.tensor)} entries)")
        tensor = value.tensor[0]
        kind = names(tensor.data_type)
        if kind not in _DTYPES:
            raise ConversionFailure("unsupported", f"input {value.name!r} has type {kind}, which this converter cannot feed")
        # MindSpore names inputs "<graph name>:<parameter name>": the part a user wrote is the last one.
        inputs.append((value.name.rsplit(":", 1)[-1], np.dtype(_DTYPES[kind]), list(tensor.dims)))
    return inputs


def export_shapes(inputs, requested: dict[str, list[int]]) -> list[list[int]]:
    """The shape each input is exported with: --input-shape, else the file's, a free batch taken as 1."""
    names = [name for name, _, _ in inputs]
    unknown = sorted(set(requested) - set(names))
    if unknown:
        raise ConversionFailure("usage", f"--input-shape names {unknown}, but the model's inputs are {names}")
    shapes = []
    for name, _, dims in inputs:
        shape = list(requested.get(name, dims))
        if name not in requested and shape and shape[0] == -1:
            shape[0] = 1
        if any(d < 0 for d in shape):
            raise ConversionFailure(
                "usage", f"input {name!r} has free dimensions {dims}; give its shape with --input-shape {name}:D0,D1,...")
        shapes.append(shape)
    return shapes


def random_inputs(inputs, shapes, rng) -> list[np.ndarray]:
    arrays = []
    for (_, dtype, _), shape in zip(inputs, shapes):
        if dtype.kind == "f":
            arrays.append(rng.standard_normal(shape).astype(dtype))
        elif dtype.kind == "b":
            arrays.append(rng.random(shape) < 0.5)
        else:  # small non-negative integers: valid as indices and as counts
            arrays.append(rng.integers(0, 4, size=shape).astype(dtype))
    return arrays


def _graph_cell(path: Path):
    # A GraphCell that was exported cannot be run, and one that ran cannot be exported (MindSpore 2.10:
    # "The pointer[context] is null"): every use gets its own load.
    import mindspore as ms
    from mindspore import nn

    try:
        return nn.GraphCell(ms.load(str(path)))
    except (RuntimeError, ValueError) as exc:
        raise ConversionFailure("load", f"MindSpore could not load it: {_first_line(exc)}") from None


def mindspore_outputs(path: Path, arrays: list[np.ndarray]) -> list[np.ndarray]:
    import mindspore as ms

    result = _graph_cell(path)(*[ms.Tensor(a) for a in arrays])
    results = result if isinstance(result, (tuple, list)) else [result]
    return [r.asnumpy() for r in results]


def export_onnx(path: Path, names: list[str], arrays: list[np.ndarray], output: Path) -> None:
    import mindspore as ms
    import mindspore.onnx

    cell = _graph_cell(path)
    try:
        mindspore.onnx.export(cell, *[ms.Tensor(a) for a in arrays], file_name=str(output), input_names=names)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        match = UNSUPPORTED_OP.search(str(exc))
        if match:
            raise ConversionFailure(
                "operator", f"MindSpore cannot export its operator {match[1]} to ONNX ({_first_line(exc)})", match[1]
            ) from None
        raise ConversionFailure("export", f"MindSpore's ONNX export failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if not output.exists():
        raise ConversionFailure("export", "MindSpore's ONNX export wrote no file")


def free_batch(model, batch: int) -> bool:
    """Name dimension 0 of every input and output ``batch`` when all of them have ``batch`` there."""
    values = list(model.graph.input) + list(model.graph.output)
    dims = [v.type.tensor_type.shape.dim for v in values]
    if not dims or any(len(d) == 0 or d[0].dim_value != batch for d in dims):
        return False
    for d in dims:
        d[0].Clear()
        d[0].dim_param = BATCH
    del model.graph.value_info[:]  # shapes inferred at the export batch would contradict a free one
    return True


def run_onnx(model_bytes: bytes, names: list[str], arrays: list[np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the export batch's shapes in the file would warn on every other batch
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, arrays)))


def largest_difference(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    if len(expected) != len(got):
        raise ConversionFailure("check", f"MindSpore computes {len(expected)} outputs, the ONNX model {len(got)}")
    worst = 0.0
    for index, (e, g) in enumerate(zip(expected, got)):
        if e.shape != g.shape:
            raise ConversionFailure("check", f"output {index}: MindSpore computes shape {list(e.shape)}, the ONNX model {list(g.shape)}")
        if e.size:
            worst = max(worst, float(np.max(np.abs(e.astype(np.float64) - g.astype(np.float64)))))
    return worst


def convert(request: dict) -> dict:
    import onnx

    original, output = Path(request["source"]), Path(request["output"])
    plain = decrypted(original, request, Path.cwd() / "decrypted.mindir")
    inputs = read_mindir_inputs(plain)
    # A per-rank MINDIR (one rank's piece of a sliced network) holds AllReduce: MindSpore neither exports it to
    # ONNX nor runs it without a world. Everything below sees a copy with Identity in its place (a world of one),
    # and the written file gets com.microsoft AllReduce there, which ranks' staged runner runs on its communicator.
    source, stand_ins = stand_in_collectives(plain, Path.cwd() / "stand_in.mindir")
    shapes = export_shapes(inputs, {k: list(v) for k, v in request.get("input_shapes", {}).items()})
    names = [name for name, _, _ in inputs]
    rng = np.random.default_rng(request.get("seed", 0))
    arrays = random_inputs(inputs, shapes, rng)
    started = time.monotonic()
    exported = Path.cwd() / "exported.onnx"  # the parent's temporary folder; MindSpore insists on the .onnx suffix
    export_onnx(source, names, arrays, exported)
    model = onnx.load(str(exported))
    expected = mindspore_outputs(source, arrays)

    # A free batch is kept only when ONNX Runtime, at another batch, matches MindSpore run chunk by chunk at the
    # export batch: a Reshape or constant that baked the batch in makes it fail, and the file stays static.
    batch = shapes[0][0] if shapes and shapes[0] else None
    wanted = request.get("dynamic_batch", True)
    if wanted == "declared":  # as MindSpore Lite would run the file: free only where the MINDIR itself says so
        fixed = [dims[0] for _, _, dims in inputs if dims and dims[0] != -1]
        static_reason = f"the MINDIR file declares a batch of {fixed[0]}" if fixed or not inputs else ""
    else:
        static_reason = "" if wanted else "not asked for"
    if not static_reason and (batch is None or not free_batch(model, batch)):
        static_reason = "the inputs and outputs do not all have the same first dimension"
    if not static_reason:
        chunks = [random_inputs(inputs, shapes, rng) for _ in range(2)]
        wide = [np.concatenate([c[i] for c in chunks]) for i in range(len(inputs))]
        reference = [np.concatenate(parts) for parts in zip(*[mindspore_outputs(source, c) for c in chunks])]
        try:
            diff = largest_difference(reference, run_onnx(model.SerializeToString(), names, wide))
        except Exception as exc:  # noqa: BLE001  ONNX Runtime refusing the other batch is an answer too
            diff, static_reason = None, f"at batch {2 * batch} ONNX Runtime failed: {_first_line(exc)}"
        if diff is not None and diff > request["tolerance"] * max(1.0, max(float(np.max(np.abs(r))) for r in reference)):
            static_reason = f"at batch {2 * batch} the outputs differ from MindSpore's by {diff:.3g}"
        if static_reason:
            model = onnx.load(str(exported))
    got = run_onnx(model.SerializeToString(), names, arrays)
    diff = largest_difference(expected, got)
    if stand_ins:
        restore_collectives(model, stand_ins)
    meta = model.metadata_props.add()
    meta.key, meta.value = "mindir_source", original.name
    onnx.save(model, str(output))
    scale = max((float(np.max(np.abs(e))) for e in expected if e.size and e.dtype.kind in "fiu"), default=0.0)
    import mindspore

    return {
        "ok": True,
        "inputs": [[name, dtype.str, shape] for (name, dtype, _), shape in zip(inputs, shapes)],
        "outputs": [[o.name, [d.dim_value if d.HasField("dim_value") else -1 for d in o.type.tensor_type.shape.dim]]
                    for o in model.graph.output],
        "max_abs_diff": diff,
        "scale": scale,
        "dynamic_batch": not static_reason,
        "static_reason": static_reason,
        "mindspore_version": mindspore.__version__,
        "collectives": stand_ins,
        "seconds": round(time.monotonic() - started, 3),
    }


def stand_in_collectives(path: Path, copy: Path) -> tuple[Path, int]:
    """(file to hand MindSpore, number of AllReduce replaced): ``path`` itself when it has no communication operator."""
    from mindspore.train import mind_ir_pb2

    model = mind_ir_pb2.ModelProto()
    model.ParseFromString(path.read_bytes())
    found = [p for p in model.primitives if p.op_type in COMMUNICATION_OPS]
    if not found:
        return path, 0
    if any(p.op_type == "Identity" for p in model.primitives):
        raise ConversionFailure("operator", "the file holds both Identity and communication operators; the "
                                "converter marks AllReduce with Identity and could not tell them apart", "Identity")
    for primitive in found:
        attrs = {a.name: a for a in primitive.attribute}
        reduce_op = attrs["op"].s.decode() if "op" in attrs else "sum"
        if primitive.op_type != "AllReduce" or reduce_op != "sum":
            what = primitive.op_type + (f" (op={reduce_op})" if primitive.op_type == "AllReduce" else "")
            raise ConversionFailure(
                "operator", f"its communication operator {what} has no counterpart here: only AllReduce with "
                f"op=sum is mapped (to the ranks' allreduce)", primitive.op_type)
        primitive.op_type = "Identity"
        del primitive.attribute[:]
    copy.write_bytes(model.SerializeToString())
    return copy, len(found)


def restore_collectives(model, count: int) -> None:
    """The stand-in Identity nodes of the exported graph become com.microsoft AllReduce nodes."""
    from onnx import helper

    marks = [node for node in model.graph.node if node.op_type == "Identity" and not node.domain]
    if len(marks) != count:
        raise ConversionFailure("export", f"{count} AllReduce operators went into MindSpore's ONNX export and "
                                f"{len(marks)} came out; cannot place the collectives")
    for node in marks:
        node.op_type, node.domain = "AllReduce", COLLECTIVE_DOMAIN
    if not any(o.domain == COLLECTIVE_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(COLLECTIVE_DOMAIN, 1))
    del model.graph.value_info[:]  # the shapes of a world of one


def _first_line(exc: BaseException) -> str:
    # MindSpore appends its C++ call stack after a blank line and a row of dashes: the first part says it.
    text = str(exc).strip().split("\n----", 1)[0].strip()
    return " ".join(text.split())


def _watch_parent(parent: int, work: Path) -> None:
    # A conversion whose requester died has nobody to hand its file to: stop, leave nothing running, and remove
    # the requester's temporary folder (the request, which may hold a decryption key), which it can no longer do.
    while True:
        if os.getppid() != parent:
            if work.name.startswith(WORK_PREFIX):
                shutil.rmtree(work, ignore_errors=True)
            os._exit(3)
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    request_file = Path(argv[0])
    request = json.loads(request_file.read_text())
    threading.Thread(target=_watch_parent, args=(request["parent_pid"], request_file.parent), daemon=True).start()
    try:
        result = convert(request)
    except ConversionFailure as exc:
        result = {"ok": False, "kind": exc.kind, "message": str(exc), "operator": exc.operator}
    Path(request["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
