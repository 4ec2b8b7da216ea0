"""The loop of one batch-split worker process (started with ``spawn`` by ``_parallel_predictor``).

It pins itself to its cores (CPU target), builds the model, reports
BUILD_FINISH or ERROR, then answers PREDICT/COLLECT until EXIT. It exits on
its own when the master goes away: the pipe reaches EOF, or (while the model
is running, when nobody reads the pipe) a watcher thread sees the parent pid
change. Either way it removes the master's named segments first (those it
has mapped, and once the master is dead every other one), since a killed
master cannot.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import onnxruntime as ort

from ranks._context import Context
from ranks._model import Model, ModelType
from ranks._remote_errors import pack_exception, where_header

from . import _worker_protocol as proto
from ._worker_memory import Attachments, layout, view

EXIT_PARENT_GONE = 70
PARENT_POLL_SECONDS = 0.5


@dataclass
class WorkerSpec:
    index: int
    device_id: int
    model_path: str
    context: Context
    cores: list[int] | None  # CPU target: pin the process to these cores
    parent_pid: int


def _watch_parent(parent_pid: int, attachments: Attachments) -> None:
    while True:
        time.sleep(PARENT_POLL_SECONDS)
        if os.getppid() != parent_pid:
            attachments.unlink()
            os._exit(EXIT_PARENT_GONE)


def worker_main(conn, spec: WorkerSpec) -> None:
    """Entry point of the child: never returns normally before EXIT or the master's death."""
    # Ctrl-C in a terminal reaches the whole process group: the master turns it
    # into a shutdown of the workers, which must not die half way on their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    attachments = Attachments(spec.parent_pid)
    threading.Thread(target=_watch_parent, args=(spec.parent_pid, attachments), daemon=True,
                     name="orch-parent-watch").start()
    where = where_header(f"worker for device {spec.device_id}")
    try:
        if spec.cores:
            os.sched_setaffinity(0, spec.cores)
        model = Model()
        model.build_from_file(spec.model_path, ModelType.ONNX, spec.context)
        inputs = [(t.name, t.dtype.to_numpy().str, list(t.shape)) for t in model.get_inputs()]
        outputs = [(t.name, t.dtype.to_numpy().str, list(t.shape)) for t in model.get_outputs()]
    except BaseException as exc:  # noqa: BLE001  every failure must reach the master
        _send(conn, proto.message(proto.ERROR, 0, error=pack_exception(exc, where)), attachments)
        return
    _send(conn, proto.message(
        proto.BUILD_FINISH, 0, device_id=spec.device_id, pid=os.getpid(), inputs=inputs, outputs=outputs,
        cores=sorted(os.sched_getaffinity(0)), threads=spec.context.cpu.thread_num,
    ), attachments)

    runner = _BoundRunner(model)
    held = None  # (request id, arrays) waiting for a COLLECT after a need_space REPLY
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            _parent_gone(attachments)
        kind, request_id = msg.get("kind"), msg.get("id", 0)
        if msg.get("v") != proto.VERSION or kind == proto.EXIT:
            # A master of another version cannot be answered sensibly; it reports the mismatch.
            break
        try:
            if kind == proto.PREDICT:
                attachments.forget(msg.get("forget", ()))
                placement = msg.get("placement")
                reply = runner.run_placed(attachments, msg) if placement else None
                if reply is None:
                    buf = attachments.buffer(msg["slot"])
                    feeds = {s.name: view(buf, s) for s in msg["inputs"]}
                    results = model.predict(feeds)
                    del feeds, buf
                    arrays = [t.get_data_to_numpy() for t in results]
                    if placement and _fits(placement, arrays):
                        reply = _write_placed(attachments, msg, arrays)
                    else:
                        held = (request_id, arrays)
                        reply = _write_outputs(attachments, msg, arrays)
            elif kind == proto.COLLECT:
                if held is None or held[0] != request_id:
                    raise RuntimeError(f"COLLECT for request {request_id}, but this worker holds no outputs for it")
                attachments.buffer(msg["slot"])
                reply = _write_outputs(attachments, msg, held[1])
            else:
                raise RuntimeError(f"worker received {kind!r}, which a master never sends")
            if reply["status"] == proto.STATUS_OK:
                held = None
            _send(conn, reply, attachments)
        except BaseException as exc:  # noqa: BLE001
            held = None
            _send(conn, proto.message(proto.ERROR, request_id, error=pack_exception(exc, where)), attachments)
    attachments.close()
    model.close()


class _BoundRunner:
    """Runs the model with its outputs written straight into the request's block (ONNX Runtime I/O binding).

    The master says where each output goes (the placement, with the shapes it
    expects). If ONNX Runtime computes other shapes it refuses the bound
    buffers, and the plain path runs the model again and reports any real error.
    """

    def __init__(self, model: Model):
        self._model = model
        self._output_names = [t.name for t in model.get_outputs()]
        self._quiet = ort.RunOptions()
        self._quiet.log_severity_level = 4  # a refused placement is not an error worth a log line

    def run_placed(self, attachments: Attachments, msg: dict) -> dict | None:
        buf = attachments.buffer(msg["slot"])
        block = attachments.block(msg["block"])
        inputs = {spec.name: view(buf, spec) for spec in msg["inputs"]}
        outputs = {name: view(block, spec) for name, spec in zip(self._output_names, msg["placement"])}
        try:
            self._model.predict_into(inputs, outputs, self._quiet)
        except Exception:  # noqa: BLE001  the plain path runs it again and reports real errors
            return None
        finally:
            del inputs, outputs, buf, block
        return proto.message(proto.REPLY, msg["id"], status=proto.STATUS_OK, placed=True, outputs=msg["placement"])


def _fits(placement, arrays) -> bool:
    return len(placement) == len(arrays) and all(
        tuple(a.shape) == tuple(s.shape) and a.dtype.str == s.dtype for s, a in zip(placement, arrays)
    )


def _write_placed(attachments: Attachments, msg: dict, arrays) -> dict:
    block = attachments.block(msg["block"])
    for spec, array in zip(msg["placement"], arrays):
        target = view(block, spec)
        target[...] = array
        del target
    del block
    return proto.message(proto.REPLY, msg["id"], status=proto.STATUS_OK, placed=True, outputs=msg["placement"])


def _write_outputs(attachments: Attachments, msg: dict, arrays) -> dict:
    request_id = msg["id"]
    start = msg["out_offset"]
    specs, end = layout([(f"out{i}", a.dtype, a.shape) for i, a in enumerate(arrays)], start)
    needed = end - start
    if needed > msg["out_capacity"]:
        return proto.message(proto.REPLY, request_id, status=proto.STATUS_NEED_SPACE, needed=needed)
    buf = attachments.buffer(msg["slot"])
    for spec, array in zip(specs, arrays):
        target = view(buf, spec)
        target[...] = array
        del target
    del buf
    return proto.message(proto.REPLY, request_id, status=proto.STATUS_OK, placed=False, outputs=specs)


def _send(conn, msg: dict, attachments: Attachments) -> None:
    try:
        conn.send(msg)
    except (BrokenPipeError, EOFError, OSError):
        _parent_gone(attachments)


def _parent_gone(attachments: Attachments):
    # The pipe is closed without EXIT: the master is dying (a clean close sends EXIT first).
    attachments.unlink()
    os._exit(EXIT_PARENT_GONE)
